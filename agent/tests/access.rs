//! Access policies through the real proxy over TLS: a rustls/hyper client that sends a PROXY v2
//! header first (as the edge does), the proxy with an access table, and a workload on
//! 127.0.0.1 that echoes what it received. Login assertions are signed here with
//! `edgible::access::AssertionSigner`, standing in for the server.

// The fixtures below are test code outside `#[test]` functions, where `clippy.toml`'s
// `allow-unwrap-in-tests` does not reach; a failed setup is a test failure with a message.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use bytes::Bytes;
use chrono::Utc;
use edgible::access::{Assertion, AssertionSigner, sha256_hex, short_code_digest};
use edgible::model::{
    AccessPolicy, ApiKeyAccess, ApplicationId, OrganizationAccess, OrganizationId, Role, ShortCodeAccess, UserId,
};
use edgible::protocol::v1::{AccessKeyDigest, ApplicationAccess, ShortCodeDigest};
use edgible_agent::proxy::access::cookies::CookieKey;
use edgible_agent::proxy::{
    AccessControl, AccessSettings, AccessTable, ApplicationGate, CertificateStore, Proxy, ProxyConfig, ProxyMetrics,
    Route, RouteTable,
};
use http::{Request, Response, StatusCode, header};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair};
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::{ClientConfig, RootCertStore};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsConnector;
use url::Url;

const TIMEOUT: Duration = Duration::from_secs(30);
/// The client address the "edge" claims in its PROXY header.
const CLIENT: &str = "203.0.113.7:50123";
const LOGIN_URL: &str = "https://login.example.test";
const API_KEY: &str = "edg_access_test_key";
const CODE: &str = "K7P2QX";
const ORGANIZATION_APP: &str = "members.example.test";
const KEY_APP: &str = "api.example.test";
const CODE_APP: &str = "shared.example.test";
const RAW_APP: &str = "raw.example.test";

type TestBody = BoxBody<Bytes, Infallible>;

// ---------------------------------------------------------------------------------------------
// The proxy, a workload, and the "server" that signs assertions
// ---------------------------------------------------------------------------------------------

struct Fixture {
    proxy: SocketAddr,
    roots: Arc<ClientConfig>,
    access: Arc<AccessControl>,
    signer: AssertionSigner,
    organization_id: OrganizationId,
    gates: BTreeMap<&'static str, ApplicationGate>,
    metrics: Arc<ProxyMetrics>,
    _shutdown: watch::Sender<bool>,
}

fn gate(organization_id: OrganizationId, policy: AccessPolicy) -> ApplicationGate {
    let application_id = ApplicationId::new();
    ApplicationGate {
        application_id,
        organization_id,
        policy,
        secrets: Some(ApplicationAccess {
            application_id,
            api_keys: vec![AccessKeyDigest { sha256: sha256_hex(API_KEY), expires_at: None }],
            short_code: Some(ShortCodeDigest {
                sha256: short_code_digest(application_id, CODE),
                version: 1,
                expires_at: None,
            }),
        }),
    }
}

async fn fixture() -> Fixture {
    let _ = rustls::crypto::ring::default_provider().install_default();
    // A test CA and one certificate per application.
    let ca_key = KeyPair::generate().unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.distinguished_name.push(DnType::CommonName, "Edgible access test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap().der().clone();
    let issuer = Issuer::new(ca_params, ca_key);
    let certificates = CertificateStore::new();
    let routes = RouteTable::new();
    let port = start_workload().await;
    for name in [ORGANIZATION_APP, KEY_APP, CODE_APP] {
        let key = KeyPair::generate().unwrap();
        let certificate = CertificateParams::new(vec![name.to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
        certificates.insert_pem(name, certificate.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
        routes.insert(name, Route { port, raw_tcp: false });
    }
    let key = KeyPair::generate().unwrap();
    let certificate = CertificateParams::new(vec![RAW_APP.to_owned()]).unwrap().signed_by(&key, &issuer).unwrap();
    certificates.insert_pem(RAW_APP, certificate.pem().as_bytes(), key.serialize_pem().as_bytes()).unwrap();
    routes.insert(RAW_APP, Route { port, raw_tcp: true });

    let organization_id = OrganizationId::new();
    let mut gates = BTreeMap::new();
    let members = OrganizationAccess::default();
    gates.insert(
        ORGANIZATION_APP,
        gate(organization_id, AccessPolicy { organization: Some(members), ..Default::default() }),
    );
    gates.insert(KEY_APP, gate(organization_id, AccessPolicy { api_key: Some(ApiKeyAccess {}), ..Default::default() }));
    let code = ShortCodeAccess::default();
    gates.insert(CODE_APP, gate(organization_id, AccessPolicy { short_code: Some(code), ..Default::default() }));
    gates.insert(RAW_APP, gate(organization_id, AccessPolicy { api_key: Some(ApiKeyAccess {}), ..Default::default() }));

    let signer = AssertionSigner::from_pkcs8("k1", &AssertionSigner::generate_pkcs8().unwrap()).unwrap();
    let access = AccessControl::new(CookieKey::random());
    let mut config = ProxyConfig::new(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), [Ipv4Addr::LOCALHOST.into()]);
    config.connect_timeout = Duration::from_secs(2);
    let proxy = Proxy::bind_with_access(config, certificates, routes, Arc::clone(&access)).await.unwrap();
    let address = proxy.local_addr().unwrap();
    let metrics = proxy.metrics();
    let (shutdown, shutdown_rx) = watch::channel(false);
    tokio::spawn(proxy.run(shutdown_rx));

    let mut roots = RootCertStore::empty();
    roots.add(CertificateDer::from(ca.to_vec())).unwrap();
    let mut client = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    client.alpn_protocols = vec![b"http/1.1".to_vec()];
    let fixture = Fixture {
        proxy: address,
        roots: Arc::new(client),
        access,
        signer,
        organization_id,
        gates,
        metrics,
        _shutdown: shutdown,
    };
    fixture.publish();
    fixture
}

impl Fixture {
    /// Hands the current gates to the proxy, as the data path does on every change.
    fn publish(&self) {
        let settings = AccessSettings::new(LOGIN_URL, vec![self.signer.public_key()], 300);
        let mut table = AccessTable::new(Some(settings));
        for (hostname, gate) in &self.gates {
            table.insert(hostname, Arc::new(gate.clone()));
        }
        self.access.replace(table);
    }

    /// A TLS connection like the edge's: the PROXY header, then the client's handshake.
    async fn connect(&self, server_name: &str) -> Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut stream = TcpStream::connect(self.proxy).await?;
        stream.write_all(&proxy_header(CLIENT.parse()?, self.proxy)).await?;
        let connector = TlsConnector::from(Arc::clone(&self.roots));
        let name = ServerName::try_from(server_name.to_owned())?;
        Ok(tokio::time::timeout(TIMEOUT, connector.connect(name, stream)).await??)
    }

    async fn client(&self, server_name: &str) -> Result<hyper::client::conn::http1::SendRequest<TestBody>> {
        let (sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(self.connect(server_name).await?)).await?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// One request on a fresh connection.
    async fn send(&self, server_name: &str, request: Request<TestBody>) -> Result<Response<Incoming>> {
        let mut sender = self.client(server_name).await?;
        Ok(tokio::time::timeout(TIMEOUT, sender.send_request(request)).await??)
    }

    fn assertion(&self, state: &str, jti: &str) -> String {
        let now = Utc::now().timestamp();
        self.signer.sign(&Assertion {
            iss: LOGIN_URL.into(),
            aud: ORGANIZATION_APP.parse().unwrap(),
            sub: UserId::new(),
            email: "ada@example.test".into(),
            name: Some("Ada Lovelace".into()),
            organization_id: self.organization_id,
            role: Role::Member,
            state: state.into(),
            iat: now,
            exp: now + 60,
            jti: jti.into(),
        })
    }
}

/// A PROXY v2 header for a TCP/IPv4 connection from `source` to `destination`.
fn proxy_header(source: SocketAddr, destination: SocketAddr) -> Vec<u8> {
    edgible::proxy_protocol::encode_tcp(source, destination)
}

/// A workload that answers every request with what it saw, as JSON; raw connections get the
/// same treatment from hyper, so they too would answer if they ever got through.
async fn start_workload() -> u16 {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { return };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(|request: Request<Incoming>| async move {
                    let headers: BTreeMap<String, String> = request
                        .headers()
                        .iter()
                        .map(|(name, value)| (name.as_str().to_owned(), value.to_str().unwrap_or("?").to_owned()))
                        .collect();
                    let echo = serde_json::json!({ "path": request.uri().to_string(), "headers": headers });
                    Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(echo.to_string()))))
                });
                let _ =
                    hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service).await;
            });
        }
    });
    port
}

fn get(host: &str, path: &str) -> http::request::Builder {
    Request::get(path).header(header::HOST, host)
}

fn browser(host: &str, path: &str) -> http::request::Builder {
    get(host, path).header(header::ACCEPT, "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8")
}

fn empty(builder: http::request::Builder) -> Request<TestBody> {
    builder.body(Empty::new().boxed()).unwrap()
}

async fn body_text(response: Response<Incoming>) -> Result<String> {
    let bytes = tokio::time::timeout(TIMEOUT, response.into_body().collect()).await??.to_bytes();
    Ok(String::from_utf8(bytes.to_vec())?)
}

/// What the workload saw, from a response that must be its answer.
async fn echo(response: Response<Incoming>) -> Result<serde_json::Value> {
    let status = response.status();
    let text = body_text(response).await?;
    ensure!(status == StatusCode::OK, "status {status}: {text}");
    serde_json::from_str(&text).with_context(|| format!("not the workload's echo: {text}"))
}

/// The value a response sets cookie `name` to.
fn set_cookie(response: &Response<Incoming>, name: &str) -> Option<String> {
    response.headers().get_all(header::SET_COOKIE).iter().find_map(|value| {
        let text = value.to_str().ok()?;
        ensure_attributes(text);
        Some(text.strip_prefix(&format!("{name}="))?.split(';').next()?.to_owned())
    })
}

fn ensure_attributes(set_cookie: &str) {
    for attribute in ["; Secure", "; HttpOnly", "; SameSite=Lax", "; Path=/", "; Max-Age="] {
        assert!(set_cookie.contains(attribute), "{set_cookie} lacks {attribute}");
    }
}

fn location(response: &Response<Incoming>) -> String {
    response.headers().get(header::LOCATION).and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned()
}

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[tokio::test]
async fn the_login_callback_sets_a_session_and_the_workload_sees_who_signed_in() -> Result<()> {
    let fixture = fixture().await;

    // A browser without a session is sent to the server's login page.
    let response = fixture.send(ORGANIZATION_APP, empty(browser(ORGANIZATION_APP, "/reports?year=2026"))).await?;
    assert_eq!(response.status(), StatusCode::FOUND);
    let login = Url::parse(&location(&response))?;
    assert_eq!(format!("{}{}", login.origin().ascii_serialization(), login.path()), format!("{LOGIN_URL}/login"));
    let query: HashMap<String, String> = login.query_pairs().into_owned().collect();
    assert_eq!(query["host"], ORGANIZATION_APP);
    let state = query["state"].clone();
    let nonce = set_cookie(&response, "__Host-edgible_state").context("the state cookie")?;

    // The server answers with an assertion; the browser brings it and the state cookie back.
    let callback = |assertion: &str| {
        let query = url::form_urlencoded::Serializer::new(String::new())
            .append_pair("assertion", assertion)
            .append_pair("state", &state)
            .finish();
        empty(
            browser(ORGANIZATION_APP, &format!("/.edgible/callback?{query}"))
                .header(header::COOKIE, format!("__Host-edgible_state={nonce}")),
        )
    };
    let assertion = fixture.assertion(&state, "jti-login");
    let response = fixture.send(ORGANIZATION_APP, callback(&assertion)).await?;
    assert_eq!(response.status(), StatusCode::FOUND, "{}", body_text(response).await?);
    assert_eq!(location(&response), "/reports?year=2026");
    let session = set_cookie(&response, "__Host-edgible_session").context("the session cookie")?;
    assert_eq!(set_cookie(&response, "__Host-edgible_state").as_deref(), Some(""), "the state cookie is cleared");

    // With the session, the workload sees the user, never what the client forged.
    let request = browser(ORGANIZATION_APP, "/reports?year=2026")
        .header(header::COOKIE, format!("__Host-edgible_session={session}; theirs=1"))
        .header("X-Edgible-User", "forged-user")
        .header("x-edgible-email", "forged@example.test")
        .header("x-edgible-role", "owner");
    let seen = echo(fixture.send(ORGANIZATION_APP, empty(request)).await?).await?;
    let headers = &seen["headers"];
    assert_eq!(headers["x-edgible-email"], "ada@example.test");
    assert_ne!(headers["x-edgible-user"], "forged-user");
    assert!(headers["x-edgible-user"].as_str().is_some_and(|user| user.contains('-')), "{headers}");
    assert!(headers.get("x-edgible-role").is_none(), "{headers}");
    assert_eq!(headers["cookie"], "theirs=1", "the proxy's cookies stay with the proxy");

    // The same assertion a second time (a replay) is refused.
    let response = fixture.send(ORGANIZATION_APP, callback(&assertion)).await?;
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let page = body_text(response).await?;
    assert!(page.starts_with("<!doctype html>") && page.contains("already used"), "{page}");

    // Without a session, a program gets 401, not a redirect.
    let response = fixture.send(ORGANIZATION_APP, empty(get(ORGANIZATION_APP, "/reports"))).await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()[header::WWW_AUTHENTICATE], format!("Bearer realm=\"{ORGANIZATION_APP}\""));

    // Logout clears the session and ends at the server.
    let response = fixture.send(ORGANIZATION_APP, empty(browser(ORGANIZATION_APP, "/.edgible/logout"))).await?;
    assert_eq!(location(&response), format!("{LOGIN_URL}/logout"));
    assert_eq!(set_cookie(&response, "__Host-edgible_session").as_deref(), Some(""));
    Ok(())
}

#[tokio::test]
async fn api_keys_pass_until_revoked_which_takes_effect_on_the_next_request() -> Result<()> {
    let mut fixture = fixture().await;
    // One kept-alive connection for the whole test: revocation must not wait for a new one.
    let mut sender = fixture.client(KEY_APP).await?;
    let request = get(KEY_APP, "/data").header(header::AUTHORIZATION, format!("Bearer {API_KEY}"));
    let seen = echo(sender.send_request(empty(request)).await?).await?;
    assert!(seen["headers"].get("authorization").is_none(), "the key is not forwarded: {seen}");
    let seen = echo(sender.send_request(empty(get(KEY_APP, "/data").header("x-edgible-key", API_KEY))).await?).await?;
    assert!(seen["headers"].get("x-edgible-key").is_none());

    let wrong = get(KEY_APP, "/data").header(header::AUTHORIZATION, "Bearer edg_not_a_key");
    let response = sender.send_request(empty(wrong)).await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(response.headers()[header::WWW_AUTHENTICATE], format!("Bearer realm=\"{KEY_APP}\""));
    assert!(body_text(response).await?.contains("API key"));

    // A new access configuration without the key: refused at once, on the same connection.
    if let Some(gate) = fixture.gates.get_mut(KEY_APP)
        && let Some(secrets) = &mut gate.secrets
    {
        secrets.api_keys.clear();
    }
    fixture.publish();
    let response = sender.send_request(empty(get(KEY_APP, "/data").header("x-edgible-key", API_KEY))).await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    Ok(())
}

#[tokio::test]
async fn short_codes_set_a_cookie_and_wrong_ones_are_throttled() -> Result<()> {
    let fixture = fixture().await;
    // A browser is shown the form.
    let response = fixture.send(CODE_APP, empty(browser(CODE_APP, "/album"))).await?;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    let page = body_text(response).await?;
    assert!(page.contains("<html lang=\"en\">") && page.contains("<label for=\"code\">"), "{page}");

    // A link with the code: the cookie, and the same URL without the code.
    let response = fixture.send(CODE_APP, empty(browser(CODE_APP, &format!("/album?code={CODE}&photo=3")))).await?;
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    assert_eq!(location(&response), "/album?photo=3");
    let cookie = set_cookie(&response, "__Host-edgible_code").context("the code cookie")?;
    let request = get(CODE_APP, "/album?photo=3").header(header::COOKIE, format!("__Host-edgible_code={cookie}"));
    let seen = echo(fixture.send(CODE_APP, empty(request)).await?).await?;
    assert_eq!(seen["path"], "/album?photo=3");

    // Guessing: five free failures, then 429 with Retry-After, even for the right code.
    let mut sender = fixture.client(CODE_APP).await?;
    for attempt in 0..6 {
        let response = sender.send_request(empty(get(CODE_APP, &format!("/?code=GUESS{attempt}")))).await?;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "attempt {attempt}");
        body_text(response).await?;
    }
    let response = sender.send_request(empty(get(CODE_APP, &format!("/?code={CODE}")))).await?;
    assert_eq!(response.status(), StatusCode::TOO_MANY_REQUESTS);
    let retry_after: u64 = response.headers()[header::RETRY_AFTER].to_str()?.parse()?;
    assert!((1..=900).contains(&retry_after), "{retry_after}");
    Ok(())
}

#[tokio::test]
async fn raw_tcp_with_a_policy_is_closed_and_unknown_hostnames_are_refused() -> Result<()> {
    let mut fixture = fixture().await;
    let mut tls = fixture.connect(RAW_APP).await?;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: raw.example.test\r\n\r\n").await?;
    let mut buffer = Vec::new();
    let read = tokio::time::timeout(TIMEOUT, tls.read_to_end(&mut buffer)).await?;
    assert!(read.is_err() || buffer.is_empty(), "the workload answered: {}", String::from_utf8_lossy(&buffer));
    assert_eq!(fixture.metrics.raw_refused.load(std::sync::atomic::Ordering::Relaxed), 1);

    // A routed hostname whose policy the proxy does not know (yet) is refused, not public.
    fixture.gates.remove(KEY_APP);
    fixture.publish();
    let response = fixture.send(KEY_APP, empty(get(KEY_APP, "/").header("x-edgible-key", API_KEY))).await?;
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    Ok(())
}
