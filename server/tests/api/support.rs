//! The harness of the API suite: a server router built on a fresh database, requests sent
//! through it in-process with `oneshot`, and answers read back as JSON.

use anyhow::{Context, bail, ensure};
use axum::Router;
use axum::body::Body;
use axum::http::{HeaderMap, HeaderValue, Method, Request, StatusCode, header};
use std::future::IntoFuture;

use edgible_server::db::Db;
use edgible_server::hub::agent::SessionConfig;
use edgible_server::{AppState, router};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};
use tower::ServiceExt;

/// A SQLite database file in its own temporary directory, removed on drop.
pub struct SqliteDb {
    dir: tempfile::TempDir,
}

impl SqliteDb {
    pub fn new() -> anyhow::Result<Self> {
        Ok(Self { dir: tempfile::Builder::new().prefix("edgible-api-").tempdir()? })
    }

    pub fn url(&self) -> String {
        format!("sqlite://{}?mode=rwc", self.dir.path().join("edgible.db").display())
    }
}

/// The server under test, bootstrapped with a `platform` key.
#[derive(Clone)]
pub struct TestApp {
    router: Router,
    /// The secret of the bootstrap key (scope `platform`).
    pub platform_key: String,
}

/// An organization made for a test, with its admin key.
#[derive(Debug, Clone)]
pub struct Org {
    pub id: String,
    pub name: String,
    pub admin_key: String,
}

impl TestApp {
    pub async fn new(url: &str) -> anyhow::Result<TestApp> {
        let db = Db::connect(url).await.context("connecting to the test database")?;
        let created = edgible_server::bootstrap::bootstrap(&db, &"platform".parse()?).await?;
        Ok(TestApp { router: router(AppState::new(db)), platform_key: created.admin_key.secret })
    }

    /// The server with hostname ownership configured by `settings` (`crate::domains`).
    pub async fn with_domain_settings(
        url: &str,
        settings: edgible_server::domains::DomainSettings,
    ) -> anyhow::Result<TestApp> {
        let db = Db::connect(url).await.context("connecting to the test database")?;
        let created = edgible_server::bootstrap::bootstrap(&db, &"platform".parse()?).await?;
        let state = AppState::new(db).with_domain_settings(settings);
        Ok(TestApp { router: router(state), platform_key: created.admin_key.secret })
    }

    /// The server with access policies configured by `settings`, and its state (for the
    /// published assertion keys).
    pub async fn with_access_settings(
        url: &str,
        settings: edgible_server::access::AccessSettings,
    ) -> anyhow::Result<(TestApp, AppState)> {
        let db = Db::connect(url).await.context("connecting to the test database")?;
        let created = edgible_server::bootstrap::bootstrap(&db, &"platform".parse()?).await?;
        let state = AppState::new(db).with_access_settings(settings);
        Ok((TestApp { router: router(state.clone()), platform_key: created.admin_key.secret }, state))
    }

    /// The server with agent sessions timed by `config`, also served over HTTP on an
    /// ephemeral loopback port (for WebSockets and streamed answers); requests through
    /// [`TestApp::send`] and through the socket reach the same state.
    pub async fn serve(url: &str, config: SessionConfig) -> anyhow::Result<Served> {
        Self::serve_state(url, config, None).await
    }

    /// [`TestApp::serve`] with migrations timed (and their blobs kept) as `settings` say, and
    /// the migration driver's clock running. On a database a previous [`Served`] used, the
    /// bootstrap is skipped (a restart): its key stays valid.
    pub async fn serve_migrating(
        url: &str,
        config: SessionConfig,
        settings: edgible_server::migrations::driver::MigrationSettings,
    ) -> anyhow::Result<Served> {
        Self::serve_state(url, config, Some(settings)).await
    }

    async fn serve_state(
        url: &str,
        config: SessionConfig,
        migrations: Option<edgible_server::migrations::driver::MigrationSettings>,
    ) -> anyhow::Result<Served> {
        let db = Db::connect(url).await.context("connecting to the test database")?;
        let platform_key = match edgible_server::bootstrap::bootstrap(&db, &"platform".parse()?).await {
            Ok(created) => created.admin_key.secret,
            // A restart: the platform key is of no use to the restart tests.
            Err(_) if migrations.is_some() => String::new(),
            Err(error) => return Err(error.into()),
        };
        let mut state = AppState::with_session_config(db.clone(), config);
        let mut ticker = None;
        if let Some(settings) = migrations {
            state = state.with_migration_settings(settings);
            let (stop, stopped) = tokio::sync::watch::channel(false);
            let task = tokio::spawn(std::sync::Arc::clone(state.migrations()).run(stopped));
            ticker = Some((stop, task));
        }
        let router = router(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let server = tokio::spawn(axum::serve(listener, router.clone()).into_future());
        Ok(Served {
            app: TestApp { router, platform_key },
            base: format!("http://{address}"),
            state,
            db,
            server,
            ticker,
        })
    }

    /// Creates an organization through the API.
    pub async fn org(&self, name: &str) -> anyhow::Result<Org> {
        let answer = self.post("/v1/organizations", &self.platform_key, json!({"name": name})).await?.expect(201)?;
        Ok(Org {
            id: answer.str("/organization/id")?,
            name: name.to_owned(),
            admin_key: answer.str("/admin_key/secret")?,
        })
    }

    /// Creates an API key with the given scopes in `org` and returns its secret.
    pub async fn key(&self, org: &Org, name: &str, scopes: &[&str]) -> anyhow::Result<String> {
        let answer =
            self.post("/v1/api-keys", &org.admin_key, json!({"name": name, "scopes": scopes})).await?.expect(201)?;
        answer.str("/secret")
    }

    pub async fn get(&self, path: &str, key: &str) -> anyhow::Result<Answer> {
        self.send(TestRequest::new(Method::GET, path).key(key)).await
    }

    pub async fn post(&self, path: &str, key: &str, body: Value) -> anyhow::Result<Answer> {
        self.send(TestRequest::new(Method::POST, path).key(key).json(&body)).await
    }

    pub async fn put(&self, path: &str, key: &str, body: Value) -> anyhow::Result<Answer> {
        self.send(TestRequest::new(Method::PUT, path).key(key).json(&body)).await
    }

    pub async fn delete(&self, path: &str, key: &str) -> anyhow::Result<Answer> {
        self.send(TestRequest::new(Method::DELETE, path).key(key)).await
    }

    pub async fn send(&self, request: TestRequest) -> anyhow::Result<Answer> {
        let description = format!("{} {}", request.method, request.path);
        let mut builder = Request::builder().method(request.method).uri(&request.path);
        for (name, value) in request.headers {
            builder = builder.header(name, value);
        }
        let http_request = builder.body(Body::from(request.body))?;
        let response = self.router.clone().oneshot(http_request).await?;
        let status = response.status();
        let headers = response.headers().clone();
        let bytes = response.into_body().collect().await?.to_bytes();
        let text = String::from_utf8_lossy(&bytes).into_owned();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        Ok(Answer { description, status, headers, body, text })
    }

    /// Walks every page of a listing with `limit`, returning the ids in order.
    pub async fn list_ids(&self, collection: &str, key: &str, limit: u32) -> anyhow::Result<Vec<String>> {
        let mut ids = Vec::new();
        let mut cursor: Option<String> = None;
        for _ in 0..10_000 {
            let path = match &cursor {
                Some(cursor) => format!("/v1/{collection}?limit={limit}&cursor={cursor}"),
                None => format!("/v1/{collection}?limit={limit}"),
            };
            let page = self.get(&path, key).await?.expect(200)?;
            let items = page.body["items"].as_array().context("items")?;
            ensure!(items.len() <= limit as usize, "page of {} items for limit {limit}", items.len());
            for item in items {
                ids.push(item["id"].as_str().context("id")?.to_owned());
            }
            match page.body.get("next_cursor").and_then(Value::as_str) {
                Some(next) => cursor = Some(next.to_owned()),
                None => return Ok(ids),
            }
        }
        bail!("listing {collection} did not end")
    }
}

/// A request to build by hand (odd headers, raw bodies).
pub struct TestRequest {
    method: Method,
    path: String,
    headers: Vec<(header::HeaderName, HeaderValue)>,
    body: Vec<u8>,
}

impl TestRequest {
    pub fn new(method: Method, path: &str) -> Self {
        Self { method, path: path.to_owned(), headers: Vec::new(), body: Vec::new() }
    }

    pub fn key(self, key: &str) -> Self {
        self.header(header::AUTHORIZATION, &format!("Bearer {key}"))
    }

    pub fn header(mut self, name: header::HeaderName, value: &str) -> Self {
        // Test code passes literal, valid header values.
        let value = HeaderValue::from_str(value).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        self.headers.push((name, value));
        self
    }

    pub fn json(self, body: &Value) -> Self {
        self.raw("application/json", body.to_string().into_bytes())
    }

    /// A form body (`application/x-www-form-urlencoded`), as the login page posts it.
    pub fn form(self, fields: &[(&str, &str)]) -> Self {
        let body: Vec<String> = fields.iter().map(|(name, value)| format!("{name}={}", form_encode(value))).collect();
        self.raw("application/x-www-form-urlencoded", body.join("&").into_bytes())
    }

    pub fn raw(mut self, content_type: &str, body: Vec<u8>) -> Self {
        self.body = body;
        self.header(header::CONTENT_TYPE, content_type)
    }
}

/// Percent-encodes a form or query value.
pub fn form_encode(value: &str) -> String {
    value
        .bytes()
        .map(|byte| {
            if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'_' | b'.' | b'~') {
                char::from(byte).to_string()
            } else {
                format!("%{byte:02X}")
            }
        })
        .collect()
}

/// A response, its body parsed as JSON when it is JSON (`Null` otherwise).
#[derive(Debug)]
pub struct Answer {
    description: String,
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Answer {
    /// Fails, showing the body, unless the status is `status`.
    pub fn expect(self, status: u16) -> anyhow::Result<Answer> {
        if self.status.as_u16() != status {
            bail!("{}: expected {status}, got {}: {}", self.description, self.status, self.text);
        }
        Ok(self)
    }

    /// Fails unless this is an error answer with `status`, `code` and (if given) `field`.
    pub fn expect_error(self, status: u16, code: &str, field: Option<&str>) -> anyhow::Result<Answer> {
        let answer = self.expect(status)?;
        let error = &answer.body["error"];
        ensure!(error["code"] == code, "{}: expected code {code}: {}", answer.description, answer.text);
        ensure!(error["message"].as_str().is_some_and(|m| !m.is_empty()), "{}: no message", answer.description);
        if let Some(field) = field {
            ensure!(error["field"] == field, "{}: expected field {field}: {}", answer.description, answer.text);
        }
        Ok(answer)
    }

    /// The string at a JSON pointer (`/device/id`).
    pub fn str(&self, pointer: &str) -> anyhow::Result<String> {
        self.body
            .pointer(pointer)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .with_context(|| format!("{}: no string at {pointer} in {}", self.description, self.text))
    }

    pub fn u64(&self, pointer: &str) -> anyhow::Result<u64> {
        self.body
            .pointer(pointer)
            .and_then(Value::as_u64)
            .with_context(|| format!("{}: no number at {pointer} in {}", self.description, self.text))
    }

    pub fn parse<T: DeserializeOwned>(&self) -> anyhow::Result<T> {
        serde_json::from_value(self.body.clone())
            .with_context(|| format!("{}: decoding {}", self.description, self.text))
    }

    /// The ids of the items of a page.
    pub fn ids(&self) -> anyhow::Result<Vec<String>> {
        self.body["items"]
            .as_array()
            .with_context(|| format!("{}: not a page: {}", self.description, self.text))?
            .iter()
            .map(|item| item["id"].as_str().map(str::to_owned).context("item without id"))
            .collect()
    }
}

/// A minimal valid application spec.
pub fn application(name: &str, hostnames: &[&str]) -> Value {
    json!({
        "name": name,
        "hostnames": hostnames,
        "workload": {"process": {"command": "/usr/bin/web", "args": ["--port", "8080"]}},
        "port": 8080
    })
}

/// Creates a device pool, a device in it and an application in `org`; returns their ids.
pub async fn fleet(app: &TestApp, org: &Org, hostname: &str) -> anyhow::Result<Fleet> {
    let key = &org.admin_key;
    let pool = app
        .post("/v1/device-pools", key, json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"}))
        .await?
        .expect(201)?
        .str("/id")?;
    let device = app
        .post("/v1/devices", key, json!({"name": "laptop", "pool_id": pool}))
        .await?
        .expect(201)?
        .str("/device/id")?;
    let application =
        app.post("/v1/applications", key, application("web", &[hostname])).await?.expect(201)?.str("/id")?;
    Ok(Fleet { pool, device, application })
}

#[derive(Debug, Clone)]
pub struct Fleet {
    pub pool: String,
    pub device: String,
    pub application: String,
}

/// A [`TestApp`] that is also listening on loopback.
pub struct Served {
    pub app: TestApp,
    /// `http://127.0.0.1:PORT`.
    pub base: String,
    pub state: AppState,
    /// Another handle on the server's database, for setting up what the API cannot.
    pub db: Db,
    server: tokio::task::JoinHandle<std::io::Result<()>>,
    /// The migration driver's clock, when it runs.
    ticker: Option<(tokio::sync::watch::Sender<bool>, tokio::task::JoinHandle<()>)>,
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.abort();
        if let Some((stop, task)) = &self.ticker {
            let _ = stop.send(true);
            task.abort();
        }
    }
}

/// Retries `check` until it holds, failing with `what` after a bounded wait.
pub async fn eventually<F, Fut>(what: &str, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<bool>>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        if check().await? {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            bail!("timed out waiting until {what}");
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}
