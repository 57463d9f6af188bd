//! Pebble, Let's Encrypt's ACME test CA (Debian's `pebble` package), in a namespace of a
//! [`Topology`](crate::netns::Topology), for the certificate tests of issue 6.
//!
//! Two processes run in the namespace: `pebble` (the ACME server on [`ACME_PORT`] and its
//! management interface on [`MANAGEMENT_PORT`]) and `pebble-challtestsrv` as Pebble's only DNS
//! server (`-dnsserver`, on [`DNS_PORT`]). The mock DNS answers every `A` query with one
//! address, [`PebbleSettings::resolve_to`] (the edge's public address), so Pebble's HTTP-01
//! validation of any application hostname goes to the edge's :80 ([`PebbleSettings::http_port`]);
//! single names can be pointed elsewhere through the management API ([`Pebble::add_a`]).
//!
//! Debian does not ship Pebble's test certificates, so [`Pebble::start`] generates a CA and a
//! certificate for Pebble's HTTPS listeners (rcgen, for the namespace's address) and writes the
//! CA to [`Pebble::https_ca_file`]: that is what ACME clients trust to talk to Pebble. The CA
//! that signs the certificates Pebble *issues* is another one, regenerated at every start;
//! [`Pebble::root_pem`] fetches it from the management interface (`/roots/0`) for the clients
//! that verify served certificates.
//!
//! Pebble runs at full speed and deterministically: no validation sleep
//! (`PEBBLE_VA_NOSLEEP=1`), no nonce rejected on purpose (`PEBBLE_WFE_NONCEREJECT=0`), no
//! authorization reused across orders (`PEBBLE_AUTHZREUSE=0`, so every order validates
//! through the edge again). Pebble 2.4 (Debian 12) sets the lifetime of every certificate it
//! issues with `certificateValidityPeriod` (seconds) in its configuration
//! ([`PebbleSettings::validity`]); it has no per-order validity.
//!
//! Pebble keeps everything in memory; the only view of its accounts and orders from outside
//! is its log ([`Pebble::accounts_in_memory`], [`Pebble::orders_added`]).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType};
use rustls::client::danger::ServerCertVerifier as _;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::netns::{Namespace, NsProcess};
use crate::platform::tls_connector;

/// Pebble's ACME port (the directory is `https://ADDRESS:14000/dir`).
pub const ACME_PORT: u16 = 14000;
/// Pebble's management port (`/roots/0`, `/intermediates/0`).
pub const MANAGEMENT_PORT: u16 = 15000;
/// The mock DNS server's port (`pebble-challtestsrv -dns01`), Pebble's resolver.
pub const DNS_PORT: u16 = 8053;
/// The mock DNS server's management port (`/add-a`, `/clear-a`), plain HTTP.
pub const DNS_MANAGEMENT_PORT: u16 = 8055;

/// How long Pebble and its DNS server may take to answer after being started.
const STARTUP: Duration = Duration::from_secs(30);
/// How long one request to Pebble or its DNS server may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How Pebble is configured.
#[derive(Debug, Clone)]
pub struct PebbleSettings {
    /// The address every name resolves to in Pebble's DNS: the edge's public address.
    pub resolve_to: Ipv4Addr,
    /// The port HTTP-01 validation connects to on that address: the edge's :80.
    pub http_port: u16,
    /// The lifetime of the certificates Pebble issues; Pebble's default (five years) when
    /// absent. Whole seconds.
    pub validity: Option<Duration>,
}

impl PebbleSettings {
    /// HTTP-01 against `edge`'s port 80, Pebble's default validity.
    pub fn for_edge(edge: Ipv4Addr) -> Self {
        Self { resolve_to: edge, http_port: 80, validity: None }
    }
}

/// Pebble and its DNS server, running in a namespace. Both stop when dropped.
#[derive(Debug)]
pub struct Pebble {
    pub pebble: NsProcess,
    pub dns: NsProcess,
    address: Ipv4Addr,
    /// Where its configuration, certificates and logs live.
    pub dir: PathBuf,
    /// The CA that signed the certificate of Pebble's HTTPS listeners, PEM.
    pub https_ca_pem: String,
}

impl Pebble {
    /// Starts Pebble and `pebble-challtestsrv` in `namespace`, listening on `address`, with
    /// their files in `dir`, and waits until the directory is served and the DNS answers.
    pub async fn start(
        namespace: &Namespace,
        address: Ipv4Addr,
        dir: &Path,
        settings: &PebbleSettings,
    ) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let pebble_bin = find_program("pebble")?;
        let dns_bin = find_program("pebble-challtestsrv")?;

        let https = HttpsCertificate::generate(address)?;
        let certificate_file = dir.join("pebble-https.pem");
        let key_file = dir.join("pebble-https.key");
        std::fs::write(dir.join("https-ca.pem"), &https.ca_pem)?;
        std::fs::write(&certificate_file, &https.certificate_pem)?;
        std::fs::write(&key_file, &https.key_pem)?;
        let config_file = dir.join("pebble-config.json");
        std::fs::write(&config_file, config_json(address, &certificate_file, &key_file, settings).to_string())?;

        let dns_address = SocketAddr::from((address, DNS_PORT));
        let mut command = namespace.nsenter(&dns_bin);
        command
            .args(["-dns01", &dns_address.to_string()])
            .args(["-management", &SocketAddr::from((address, DNS_MANAGEMENT_PORT)).to_string()])
            .args(["-defaultIPv4", &settings.resolve_to.to_string()])
            // No AAAA answers: Pebble must reach the edge over IPv4, not at some `::1`.
            .args(["-defaultIPv6", ""])
            // Only the DNS: the challenges are answered by the edge, not by challtestsrv.
            .args(["-http01", "", "-https01", "", "-tlsalpn01", ""]);
        let dns = namespace.spawn("pebble-challtestsrv", command, &dir.join("challtestsrv.log"))?;

        let mut command = namespace.nsenter(&pebble_bin);
        command
            .arg("-config")
            .arg(&config_file)
            .args(["-dnsserver", &dns_address.to_string()])
            .env("PEBBLE_VA_NOSLEEP", "1")
            .env("PEBBLE_WFE_NONCEREJECT", "0")
            .env("PEBBLE_AUTHZREUSE", "0");
        let pebble = namespace.spawn("pebble", command, &dir.join("pebble.log"))?;

        let mut started = Self { pebble, dns, address, dir: dir.to_owned(), https_ca_pem: https.ca_pem };
        let deadline = Instant::now() + STARTUP;
        loop {
            started.pebble.check_running()?;
            started.dns.check_running()?;
            let directory = started.directory().await;
            let resolved = resolve_a(started.dns_address(), "pebble-startup.example.test").await;
            match (directory, resolved) {
                (Ok(_), Ok(addresses)) if !addresses.is_empty() => return Ok(started),
                (directory, resolved) if Instant::now() >= deadline => anyhow::bail!(
                    "Pebble did not come up within {STARTUP:?} (directory: {:?}, DNS: {:?}); its log:\n{}",
                    directory.err(),
                    resolved,
                    started.pebble.log_tail()
                ),
                _ => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    /// The ACME directory URL, for `--acme-directory`.
    pub fn directory_url(&self) -> String {
        format!("https://{}/dir", SocketAddr::from((self.address, ACME_PORT)))
    }

    /// The file holding the CA of Pebble's HTTPS listeners, for `--acme-ca-bundle`.
    pub fn https_ca_file(&self) -> PathBuf {
        self.dir.join("https-ca.pem")
    }

    /// Pebble's DNS server.
    pub fn dns_address(&self) -> SocketAddr {
        SocketAddr::from((self.address, DNS_PORT))
    }

    /// The ACME directory, fetched over HTTPS verified against the generated CA.
    pub async fn directory(&self) -> anyhow::Result<serde_json::Value> {
        let url = self.directory_url();
        let (status, body) = https_get(&url, &self.https_ca_pem).await?;
        anyhow::ensure!(status == 200, "GET {url} answered {status}: {body}");
        serde_json::from_str(&body).with_context(|| format!("GET {url} is not JSON: {body}"))
    }

    /// The root of the certificates Pebble issues (`/roots/0` of the management interface),
    /// PEM. It changes at every start of Pebble.
    pub async fn root_pem(&self) -> anyhow::Result<String> {
        let url = format!("https://{}/roots/0", SocketAddr::from((self.address, MANAGEMENT_PORT)));
        let (status, body) = https_get(&url, &self.https_ca_pem).await?;
        anyhow::ensure!(status == 200, "GET {url} answered {status}: {body}");
        anyhow::ensure!(body.contains("BEGIN CERTIFICATE"), "GET {url} is not a PEM certificate: {body}");
        Ok(body)
    }

    /// Makes Pebble's DNS answer `host` with `address` instead of the default.
    pub async fn add_a(&self, host: &str, address: Ipv4Addr) -> anyhow::Result<()> {
        let body = serde_json::json!({ "host": fqdn(host), "addresses": [address.to_string()] });
        self.dns_management("add-a", &body).await
    }

    /// Undoes [`Pebble::add_a`]: `host` resolves to the default address again.
    pub async fn clear_a(&self, host: &str) -> anyhow::Result<()> {
        self.dns_management("clear-a", &serde_json::json!({ "host": fqdn(host) })).await
    }

    async fn dns_management(&self, path: &str, body: &serde_json::Value) -> anyhow::Result<()> {
        let authority = SocketAddr::from((self.address, DNS_MANAGEMENT_PORT));
        let (status, answer) = http_post_json(authority, &format!("/{path}"), body).await?;
        anyhow::ensure!(status == 200, "POST http://{authority}/{path} answered {status}: {answer}");
        Ok(())
    }

    /// How many ACME accounts Pebble holds, from its log (`There are now N accounts in
    /// memory`, printed at each new account); 0 before the first.
    pub fn accounts_in_memory(&self) -> anyhow::Result<u32> {
        let log = std::fs::read_to_string(self.pebble.log_file())?;
        Ok(accounts_in_log(&log))
    }

    /// How many orders Pebble has created, from its log (`Added order`).
    pub fn orders_added(&self) -> anyhow::Result<usize> {
        let log = std::fs::read_to_string(self.pebble.log_file())?;
        Ok(log.lines().filter(|line| line.contains("Added order")).count())
    }

    /// The end of Pebble's log, then of its DNS server's, for failure messages.
    pub fn log_tail(&self) -> String {
        format!("--- pebble log\n{}\n--- pebble-challtestsrv log\n{}", self.pebble.log_tail(), self.dns.log_tail())
    }
}

/// The generated CA and Pebble's HTTPS certificate (for its address and `localhost`).
struct HttpsCertificate {
    ca_pem: String,
    certificate_pem: String,
    key_pem: String,
}

impl HttpsCertificate {
    fn generate(address: Ipv4Addr) -> anyhow::Result<Self> {
        let ca_key = KeyPair::generate()?;
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.distinguished_name.push(DnType::CommonName, "Edgible test CA for Pebble's HTTPS");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let ca_pem = ca_params.self_signed(&ca_key)?.pem();
        let issuer = Issuer::new(ca_params, ca_key);

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(vec!["localhost".to_owned()])?;
        params.distinguished_name.push(DnType::CommonName, "pebble");
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(address)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth];
        let certificate_pem = params.signed_by(&key, &issuer)?.pem();
        Ok(Self { ca_pem, certificate_pem, key_pem: key.serialize_pem() })
    }
}

/// Pebble's `-config` file.
fn config_json(address: Ipv4Addr, certificate: &Path, key: &Path, settings: &PebbleSettings) -> serde_json::Value {
    let mut pebble = serde_json::json!({
        "listenAddress": SocketAddr::from((address, ACME_PORT)).to_string(),
        "managementListenAddress": SocketAddr::from((address, MANAGEMENT_PORT)).to_string(),
        "certificate": certificate.display().to_string(),
        "privateKey": key.display().to_string(),
        "httpPort": settings.http_port,
        "tlsPort": 443,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": false,
    });
    if let Some(validity) = settings.validity {
        pebble["certificateValidityPeriod"] = validity.as_secs().into();
    }
    serde_json::json!({ "pebble": pebble })
}

/// The number in the last `There are now N accounts in memory` line of a Pebble log.
fn accounts_in_log(log: &str) -> u32 {
    log.lines()
        .filter_map(|line| {
            let rest = &line[line.find("There are now ")? + "There are now ".len()..];
            rest.strip_suffix(" accounts in memory").or_else(|| rest.split(" accounts in memory").next())?.parse().ok()
        })
        .next_back()
        .unwrap_or(0)
}

/// `name` with the trailing dot challtestsrv's management API keys its records by.
fn fqdn(name: &str) -> String {
    if name.ends_with('.') { name.to_owned() } else { format!("{name}.") }
}

/// A program on PATH, or an error naming the Debian package.
fn find_program(name: &str) -> anyhow::Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|dir| dir.join(name)).find(|candidate| candidate.is_file()).with_context(|| {
        format!("`{name}` is not on PATH: install Debian's `pebble` package (it ships pebble and pebble-challtestsrv)")
    })
}

/// A `GET` over HTTPS (HTTP/1.0), the server verified against `ca_pem` only: answers the status
/// and the body.
pub async fn https_get(url: &str, ca_pem: &str) -> anyhow::Result<(u16, String)> {
    let rest = url.strip_prefix("https://").with_context(|| format!("{url} is not an https:// URL"))?;
    let (authority, path) = match rest.find('/') {
        Some(index) => (&rest[..index], &rest[index..]),
        None => (rest, "/"),
    };
    let host = authority.rsplit_once(':').map_or(authority, |(host, _)| host);
    let name = ServerName::try_from(host.to_owned()).with_context(|| format!("{host} is not a server name"))?;
    let connector = tls_connector(ca_pem, &[b"http/1.1"])?;
    let exchange = async {
        let tcp = tokio::net::TcpStream::connect(authority).await?;
        let mut tls = connector.connect(name, tcp).await.context("the TLS handshake")?;
        tls.write_all(format!("GET {path} HTTP/1.0\r\nHost: {authority}\r\n\r\n").as_bytes()).await?;
        read_response(&mut tls).await
    };
    let response =
        tokio::time::timeout(REQUEST_TIMEOUT, exchange).await.with_context(|| format!("GET {url}: no answer"))??;
    split_response(&response)
}

/// A `POST` of a JSON body over plain HTTP/1.0: answers the status and the body.
async fn http_post_json(authority: SocketAddr, path: &str, body: &serde_json::Value) -> anyhow::Result<(u16, String)> {
    let body = body.to_string();
    let exchange = async {
        let mut tcp = tokio::net::TcpStream::connect(authority).await?;
        let head = format!(
            "POST {path} HTTP/1.0\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tcp.write_all(head.as_bytes()).await?;
        tcp.write_all(body.as_bytes()).await?;
        read_response(&mut tcp).await
    };
    let response = tokio::time::timeout(REQUEST_TIMEOUT, exchange)
        .await
        .with_context(|| format!("POST http://{authority}{path}: no answer"))??;
    split_response(&response)
}

/// Reads a response to its end. A TLS peer that closes without `close_notify` after a whole
/// HTTP/1.0 response is fine: the connection's end is the body's end.
async fn read_response(stream: &mut (impl tokio::io::AsyncRead + Unpin)) -> anyhow::Result<Vec<u8>> {
    let mut response = Vec::new();
    match stream.read_to_end(&mut response).await {
        Ok(_) => Ok(response),
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof && !response.is_empty() => Ok(response),
        Err(error) => Err(error.into()),
    }
}

fn split_response(response: &[u8]) -> anyhow::Result<(u16, String)> {
    let text = String::from_utf8_lossy(response);
    let (head, body) = text.split_once("\r\n\r\n").context("the answer has no header end")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .with_context(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Asks the DNS server at `server` for the `A` records of `name` (one UDP query, recursion
/// desired): answers the addresses, empty for a name without any.
pub async fn resolve_a(server: SocketAddr, name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
    let id: u16 = rand_id();
    let query = dns_query(id, name)?;
    let socket = tokio::net::UdpSocket::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, 0))).await?;
    socket.connect(server).await?;
    socket.send(&query).await?;
    let mut answer = vec![0u8; 1500];
    let len = tokio::time::timeout(Duration::from_secs(2), socket.recv(&mut answer))
        .await
        .with_context(|| format!("no DNS answer from {server} within 2 s"))??;
    dns_a_records(id, &answer[..len])
}

/// A query id that differs between queries.
fn rand_id() -> u16 {
    use std::hash::{BuildHasher as _, Hasher as _};
    // Every `RandomState` is seeded afresh, so this differs from call to call.
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u32(std::process::id());
    hasher.finish() as u16
}

/// A DNS query (RFC 1035 section 4) for the `A` records of `name`.
fn dns_query(id: u16, name: &str) -> anyhow::Result<Vec<u8>> {
    let mut query = Vec::with_capacity(12 + name.len() + 6);
    query.extend_from_slice(&id.to_be_bytes());
    // Flags: a standard query, recursion desired; one question, no other records.
    query.extend_from_slice(&[0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0]);
    for label in name.trim_end_matches('.').split('.') {
        let len = u8::try_from(label.len()).ok().filter(|len| (1..=63).contains(len));
        let len = len.with_context(|| format!("{name:?} has a label that is empty or longer than 63 bytes"))?;
        query.push(len);
        query.extend_from_slice(label.as_bytes());
    }
    // The root label, type A, class IN.
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    Ok(query)
}

/// The `A` records in the answer section of the DNS response `message` to query `id`.
fn dns_a_records(id: u16, message: &[u8]) -> anyhow::Result<Vec<Ipv4Addr>> {
    let field = |at: usize| -> anyhow::Result<u16> {
        let bytes = message.get(at..at + 2).context("the DNS answer is truncated")?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    };
    anyhow::ensure!(field(0)? == id, "the DNS answer is for another query");
    let flags = field(2)?;
    anyhow::ensure!(flags & 0x8000 != 0, "the DNS message is not a response");
    anyhow::ensure!(flags & 0x000f == 0, "the DNS server answered with rcode {}", flags & 0x000f);
    let (questions, answers) = (field(4)?, field(6)?);
    let mut at = 12;
    for _ in 0..questions {
        at = skip_name(message, at)? + 4;
    }
    let mut addresses = Vec::new();
    for _ in 0..answers {
        at = skip_name(message, at)?;
        let (kind, class, len) = (field(at)?, field(at + 2)?, usize::from(field(at + 8)?));
        let data = message.get(at + 10..at + 10 + len).context("the DNS answer is truncated")?;
        if kind == 1 && class == 1 && len == 4 {
            addresses.push(Ipv4Addr::new(data[0], data[1], data[2], data[3]));
        }
        at += 10 + len;
    }
    Ok(addresses)
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(message: &[u8], mut at: usize) -> anyhow::Result<usize> {
    loop {
        let len = *message.get(at).context("the DNS answer is truncated")?;
        match len {
            0 => return Ok(at + 1),
            // A compression pointer ends the name.
            0xc0..=0xff => return Ok(at + 2),
            _ => at += 1 + usize::from(len),
        }
    }
}

/// What a served or issued certificate says, read from its DER.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// The DNS names of its subject alternative names.
    pub dns_names: Vec<String>,
    pub issuer: String,
    /// The serial number in hex.
    pub serial: String,
    /// Unix seconds.
    pub not_before: i64,
    /// Unix seconds.
    pub not_after: i64,
}

impl CertificateFacts {
    /// Reads a DER certificate.
    pub fn read(der: &[u8]) -> anyhow::Result<Self> {
        let (_, certificate) = x509_parser::parse_x509_certificate(der).context("parsing the certificate")?;
        let mut dns_names = Vec::new();
        if let Some(names) = certificate.subject_alternative_name().context("reading the names")? {
            for name in &names.value.general_names {
                if let x509_parser::extensions::GeneralName::DNSName(name) = name {
                    dns_names.push((*name).to_owned());
                }
            }
        }
        Ok(Self {
            dns_names,
            issuer: certificate.issuer().to_string(),
            serial: certificate.raw_serial_as_string(),
            not_before: certificate.validity().not_before.timestamp(),
            not_after: certificate.validity().not_after.timestamp(),
        })
    }

    /// Its lifetime.
    pub fn lifetime(&self) -> Duration {
        Duration::from_secs(u64::try_from(self.not_after - self.not_before).unwrap_or(0))
    }
}

/// Verifies `chain` (leaf first) for `hostname` against `root_pem` only, as a TLS client would
/// (rustls' WebPKI verifier: signatures, validity now, names): answers the leaf's facts.
pub fn verify_chain(chain: &[CertificateDer<'_>], root_pem: &str, hostname: &str) -> anyhow::Result<CertificateFacts> {
    let mut roots = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(root_pem.as_bytes()) {
        roots.add(certificate.context("parsing the root's PEM")?).context("adding the root")?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), provider)
        .build()
        .context("building the verifier")?;
    let (leaf, intermediates) = chain.split_first().context("the chain is empty")?;
    let name = ServerName::try_from(hostname.to_owned()).with_context(|| format!("{hostname} is not a name"))?;
    verifier.verify_server_cert(leaf, intermediates, &name, &[], UnixTime::now()).with_context(|| {
        format!("the chain does not verify for {hostname} against the root (chain of {} certificates)", chain.len())
    })?;
    CertificateFacts::read(leaf)
}

/// The certificates of a PEM chain, in order.
pub fn pem_chain(pem: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()?;
    anyhow::ensure!(!chain.is_empty(), "no certificate in the PEM");
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_query_asks_for_the_a_records_of_the_name() -> anyhow::Result<()> {
        let query = dns_query(0x1234, "a.example.test")?;
        let mut expected = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
        expected.extend_from_slice(b"\x01a\x07example\x04test\x00\x00\x01\x00\x01");
        assert_eq!(query, expected);
        assert_eq!(dns_query(1, "a.example.test.")?, dns_query(1, "a.example.test")?);
        assert!(dns_query(1, "a..test").is_err());
        Ok(())
    }

    /// A response as challtestsrv sends it: the question, then answers naming it by a
    /// compression pointer.
    fn response(id: u16, rcode: u8, answers: &[([u8; 4], u16)]) -> Vec<u8> {
        let mut message = id.to_be_bytes().to_vec();
        message.extend_from_slice(&[0x81, 0x80 | rcode, 0, 1, 0, answers.len() as u8, 0, 0, 0, 0]);
        message.extend_from_slice(b"\x01a\x07example\x04test\x00\x00\x01\x00\x01");
        for (address, kind) in answers {
            message.extend_from_slice(&[0xc0, 12]);
            message.extend_from_slice(&kind.to_be_bytes());
            message.extend_from_slice(&[0, 1, 0, 0, 0, 60, 0, 4]);
            message.extend_from_slice(address);
        }
        message
    }

    #[test]
    fn a_records_are_read_from_the_answer_section() -> anyhow::Result<()> {
        let message = response(7, 0, &[([203, 0, 113, 1], 1), ([0, 0, 0, 0], 16), ([203, 0, 113, 2], 1)]);
        assert_eq!(dns_a_records(7, &message)?, [Ipv4Addr::new(203, 0, 113, 1), Ipv4Addr::new(203, 0, 113, 2)]);
        assert!(dns_a_records(7, &response(7, 0, &[]))?.is_empty());
        assert!(dns_a_records(8, &message).is_err(), "another query's answer");
        assert!(dns_a_records(7, &response(7, 3, &[])).is_err(), "NXDOMAIN");
        assert!(dns_a_records(7, &message[..message.len() - 2]).is_err(), "truncated");
        Ok(())
    }

    #[test]
    fn accounts_are_counted_from_the_last_log_line() {
        let log = "\
Pebble 2024/01/01 00:00:00 There are now 1 accounts in memory
Pebble 2024/01/01 00:00:01 Added order \"x\" to the db
Pebble 2024/01/01 00:00:02 There are now 2 accounts in memory
";
        assert_eq!(accounts_in_log(log), 2);
        assert_eq!(accounts_in_log("Pebble starting\n"), 0);
    }

    #[test]
    fn the_config_sets_ports_and_validity() {
        let settings =
            PebbleSettings { validity: Some(Duration::from_secs(90)), ..PebbleSettings::for_edge(Ipv4Addr::LOCALHOST) };
        let config = config_json(Ipv4Addr::new(203, 0, 113, 30), Path::new("/c.pem"), Path::new("/k.pem"), &settings);
        assert_eq!(config["pebble"]["listenAddress"], "203.0.113.30:14000");
        assert_eq!(config["pebble"]["httpPort"], 80);
        assert_eq!(config["pebble"]["certificateValidityPeriod"], 90);
        let config = config_json(
            Ipv4Addr::new(203, 0, 113, 30),
            Path::new("/c.pem"),
            Path::new("/k.pem"),
            &PebbleSettings::for_edge(Ipv4Addr::LOCALHOST),
        );
        assert!(config["pebble"].get("certificateValidityPeriod").is_none());
    }

    #[test]
    fn the_https_certificate_verifies_against_its_ca_for_the_address() -> anyhow::Result<()> {
        let address = Ipv4Addr::new(203, 0, 113, 30);
        let https = HttpsCertificate::generate(address)?;
        let chain = pem_chain(&https.certificate_pem)?;
        let facts = verify_chain(&chain, &https.ca_pem, "localhost")?;
        assert_eq!(facts.dns_names, ["localhost"]);
        verify_chain(&chain, &https.ca_pem, "203.0.113.30")?;
        assert!(verify_chain(&chain, &https.ca_pem, "203.0.113.31").is_err());
        let other = HttpsCertificate::generate(address)?;
        assert!(verify_chain(&chain, &other.ca_pem, "localhost").is_err(), "another CA must not verify it");
        Ok(())
    }
}
