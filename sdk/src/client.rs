//! The async REST client of the server's `/v1` API.
//!
//! Every object kind implements [`Resource`], which names its collection path and its spec
//! and creation types, so one set of generic calls (`list`, `get`, `create`, `update`,
//! `delete`) serves them all:
//!
//! ```no_run
//! # async fn demo() -> Result<(), edgible::ClientError> {
//! use edgible::model::Application;
//! let client = edgible::Client::new("http://127.0.0.1:7070", "edg_...")?;
//! for application in client.list_all::<Application>().await? {
//!     println!("{} at revision {}", application.spec.name, application.revision);
//! }
//! # Ok(()) }
//! ```

use std::fmt;
use std::time::Duration;

use reqwest::{Method, StatusCode};
use serde::Serialize;
use serde::de::DeserializeOwned;
use url::Url;

use futures::Stream;

use crate::model::{
    ApiKey, ApiKeyCreated, ApiKeyId, ApiKeySpec, Application, ApplicationId, ApplicationLogs, ApplicationSpec,
    ApplicationStatus, Device, DeviceCreated, DeviceId, DevicePool, DevicePoolId, DevicePoolSpec, DeviceSpec, Domain,
    DomainId, DomainSpec, Edge, EdgeCreated, EdgeEnrollment, EdgeId, EdgeSpec, Enrollment, EnrollmentRequest,
    ErrorBody, Event, LogEntry, Member, MemberId, MemberSpec, Organization, OrganizationCreated, OrganizationId,
    OrganizationSpec, Page, Placement, PlacementId, PlacementSpec, Revision,
};

/// What went wrong talking to the server, and whether the server said so.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The server answered with an error status.
    #[error("{}", api_error_message(*status, body.as_ref(), raw))]
    Api {
        status: StatusCode,
        /// The server's structured error, when the body was one.
        body: Option<ErrorBody>,
        /// The raw body, for errors from something other than the server (a proxy).
        raw: String,
    },
    /// The server could not be reached or the connection broke.
    #[error("cannot reach the server at {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    /// The server answered 2xx with a body this client does not understand.
    #[error("unexpected answer from {url}: {message}")]
    Decode { url: String, message: String },
    #[error("invalid server URL {url:?}: {message}")]
    InvalidEndpoint { url: String, message: String },
}

fn api_error_message(status: StatusCode, body: Option<&ErrorBody>, raw: &str) -> String {
    match body {
        Some(ErrorBody { error }) => match &error.field {
            Some(field) => format!("{} ({}): {field}: {}", status.as_u16(), error.code, error.message),
            None => format!("{} ({}): {}", status.as_u16(), error.code, error.message),
        },
        None if raw.trim().is_empty() => format!("server answered {status}"),
        None => format!("server answered {status}: {}", raw.trim()),
    }
}

impl ClientError {
    /// The HTTP status, for errors the server answered.
    pub fn status(&self) -> Option<StatusCode> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    pub fn is_not_found(&self) -> bool {
        self.status() == Some(StatusCode::NOT_FOUND)
    }

    pub fn is_conflict(&self) -> bool {
        self.status() == Some(StatusCode::CONFLICT)
    }

    /// The request field the server blamed, if any (`hostnames[1]`).
    pub fn field(&self) -> Option<&str> {
        match self {
            ClientError::Api { body: Some(body), .. } => body.error.field.as_deref(),
            _ => None,
        }
    }

    /// The server's message without status and code, for showing next to a field.
    pub fn message(&self) -> String {
        match self {
            ClientError::Api { body: Some(body), .. } => body.error.message.clone(),
            other => other.to_string(),
        }
    }

    /// Whether the same request may succeed later (transport failures and 5xx/429).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Transport { .. } => true,
            ClientError::Api { status, .. } => status.is_server_error() || *status == StatusCode::TOO_MANY_REQUESTS,
            _ => false,
        }
    }
}

/// An object kind of the API: where it lives and what its requests and answers look like.
pub trait Resource: DeserializeOwned + Send {
    type Id: fmt::Display + Send + Sync;
    type Spec: Serialize + Send + Sync;
    /// What creating one answers (the object, or the object plus a one-time secret).
    type Created: DeserializeOwned + Send;
    /// The collection path below `/v1/`.
    const PATH: &'static str;
    /// The singular name used in messages (`application`).
    const KIND: &'static str;

    fn id(&self) -> &Self::Id;
    fn revision(&self) -> Revision;
}

macro_rules! resource {
    ($object:ty, $id:ty, $spec:ty, $created:ty, $path:literal, $kind:literal) => {
        impl Resource for $object {
            type Id = $id;
            type Spec = $spec;
            type Created = $created;
            const PATH: &'static str = $path;
            const KIND: &'static str = $kind;

            fn id(&self) -> &Self::Id {
                &self.id
            }

            fn revision(&self) -> Revision {
                self.revision
            }
        }
    };
}

resource!(Organization, OrganizationId, OrganizationSpec, OrganizationCreated, "organizations", "organization");
resource!(Member, MemberId, MemberSpec, Member, "members", "member");
resource!(ApiKey, ApiKeyId, ApiKeySpec, ApiKeyCreated, "api-keys", "API key");
resource!(DevicePool, DevicePoolId, DevicePoolSpec, DevicePool, "device-pools", "device pool");
resource!(Device, DeviceId, DeviceSpec, DeviceCreated, "devices", "device");
resource!(Application, ApplicationId, ApplicationSpec, Application, "applications", "application");
resource!(Placement, PlacementId, PlacementSpec, Placement, "placements", "placement");
resource!(Edge, EdgeId, EdgeSpec, EdgeCreated, "edges", "edge");
resource!(Domain, DomainId, DomainSpec, Domain, "domains", "domain");

/// Filters and paging for a listing.
#[derive(Debug, Clone, Default)]
pub struct ListOptions {
    /// Page size (1-1000); the server's default when absent.
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page.
    pub cursor: Option<String>,
    /// Only objects with this name.
    pub name: Option<String>,
}

/// Which events to list: the newest first, optionally of one application or device.
#[derive(Debug, Clone, Default)]
pub struct EventQuery {
    pub application_id: Option<ApplicationId>,
    pub device_id: Option<DeviceId>,
    /// Page size (1-1000); the server's default (100) when absent.
    pub limit: Option<u32>,
    /// `next_cursor` of the previous page, to go further back in time.
    pub cursor: Option<String>,
}

/// How long one `follow_logs` request may stay open; following longer means calling again.
const FOLLOW_LIMIT: Duration = Duration::from_secs(24 * 60 * 60);

/// Who the client is, as the server sees its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct WhoAmI {
    pub organization: Organization,
    pub api_key: ApiKey,
}

/// A client of one server with one API key. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    api_key: String,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client").field("base", &self.base.as_str()).finish_non_exhaustive()
    }
}

impl Client {
    /// A client for the server at `endpoint` (`https://edgible.example.com`), authenticating
    /// with `api_key`.
    pub fn new(endpoint: &str, api_key: &str) -> Result<Self, ClientError> {
        Self::with_http(endpoint, api_key, default_http_client()?)
    }

    /// Like [`Client::new`], with a caller-built HTTP client (extra root certificates,
    /// proxies, timeouts).
    pub fn with_http(endpoint: &str, api_key: &str, http: reqwest::Client) -> Result<Self, ClientError> {
        let invalid =
            |message: &str| ClientError::InvalidEndpoint { url: endpoint.to_owned(), message: message.to_owned() };
        let mut base = Url::parse(endpoint).map_err(|e| invalid(&e.to_string()))?;
        if !matches!(base.scheme(), "http" | "https") {
            return Err(invalid("the scheme must be http or https"));
        }
        if base.cannot_be_a_base() {
            return Err(invalid("not a base URL"));
        }
        if !base.path().ends_with('/') {
            let path = format!("{}/", base.path());
            base.set_path(&path);
        }
        Ok(Self { http, base, api_key: api_key.to_owned() })
    }

    pub fn endpoint(&self) -> &str {
        self.base.as_str()
    }

    /// The organization and key the client acts as.
    pub async fn whoami(&self) -> Result<WhoAmI, ClientError> {
        self.send(Method::GET, "v1/whoami", &[], None::<&()>, None).await
    }

    pub async fn list<R: Resource>(&self, options: &ListOptions) -> Result<Page<R>, ClientError> {
        let mut query = Vec::new();
        if let Some(limit) = options.limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = &options.cursor {
            query.push(("cursor", cursor.clone()));
        }
        if let Some(name) = &options.name {
            query.push(("name", name.clone()));
        }
        self.send(Method::GET, &format!("v1/{}", R::PATH), &query, None::<&()>, None).await
    }

    /// Every object of a kind, following pages.
    pub async fn list_all<R: Resource>(&self) -> Result<Vec<R>, ClientError> {
        let mut options = ListOptions { limit: Some(1000), ..ListOptions::default() };
        let mut all = Vec::new();
        loop {
            let page = self.list::<R>(&options).await?;
            all.extend(page.items);
            match page.next_cursor {
                Some(cursor) => options.cursor = Some(cursor),
                None => return Ok(all),
            }
        }
    }

    /// The object of a kind with this name, if there is one (names are unique per kind and
    /// organization).
    pub async fn find_by_name<R: Resource>(&self, name: &str) -> Result<Option<R>, ClientError> {
        let options = ListOptions { name: Some(name.to_owned()), limit: Some(1), cursor: None };
        Ok(self.list::<R>(&options).await?.items.into_iter().next())
    }

    pub async fn get<R: Resource>(&self, id: &R::Id) -> Result<R, ClientError> {
        self.send(Method::GET, &format!("v1/{}/{id}", R::PATH), &[], None::<&()>, None).await
    }

    pub async fn create<R: Resource>(&self, spec: &R::Spec) -> Result<R::Created, ClientError> {
        self.send(Method::POST, &format!("v1/{}", R::PATH), &[], Some(spec), None).await
    }

    /// Replaces the object's spec. With `expected_revision`, the server refuses (409) if the
    /// object changed since that revision.
    pub async fn update<R: Resource>(
        &self,
        id: &R::Id,
        expected_revision: Option<Revision>,
        spec: &R::Spec,
    ) -> Result<R, ClientError> {
        self.send(Method::PUT, &format!("v1/{}/{id}", R::PATH), &[], Some(spec), expected_revision).await
    }

    pub async fn delete<R: Resource>(&self, id: &R::Id) -> Result<(), ClientError> {
        let url = self.url(&format!("v1/{}/{id}", R::PATH))?;
        let request = self.http.delete(url.clone()).bearer_auth(&self.api_key);
        let response =
            request.send().await.map_err(|source| ClientError::Transport { url: url.to_string(), source })?;
        check_status(response).await.map(drop)
    }

    /// Exchanges a device's one-time enrollment token for its long-lived credential, recording
    /// the device's WireGuard public key. Needs no API key: the token is the authority. A used
    /// token answers 401, an expired one 410.
    pub async fn enroll(endpoint: &str, request: &EnrollmentRequest) -> Result<Enrollment, ClientError> {
        let client = Client::new(endpoint, "")?;
        let url = client.url("v1/agent/enroll")?;
        let response = client
            .http
            .post(url.clone())
            .json(request)
            .send()
            .await
            .map_err(|source| ClientError::Transport { url: url.to_string(), source })?;
        decode(check_status(response).await?, &url).await
    }

    /// Exchanges an edge's one-time enrollment token for its long-lived credential, recording
    /// the edge's WireGuard public key; the answer also carries the pool's network. Needs no
    /// API key: the token is the authority. A used token answers 401, an expired one 410.
    pub async fn edge_enroll(endpoint: &str, request: &EnrollmentRequest) -> Result<EdgeEnrollment, ClientError> {
        let client = Client::new(endpoint, "")?;
        let url = client.url("v1/edge/enroll")?;
        let response = client
            .http
            .post(url.clone())
            .json(request)
            .send()
            .await
            .map_err(|source| ClientError::Transport { url: url.to_string(), source })?;
        decode(check_status(response).await?, &url).await
    }

    /// The certificate of the server's internal CA (PEM), which signs the certificates devices
    /// serve. Public: no API key is sent.
    pub async fn ca_pem(endpoint: &str) -> Result<String, ClientError> {
        let client = Client::new(endpoint, "")?;
        let url = client.url("v1/ca.pem")?;
        let response = client
            .http
            .get(url.clone())
            .send()
            .await
            .map_err(|source| ClientError::Transport { url: url.to_string(), source })?;
        check_status(response)
            .await?
            .text()
            .await
            .map_err(|source| ClientError::Transport { url: url.to_string(), source })
    }

    /// Asks the server to look up the domain's TXT record now and mark the domain verified
    /// when it holds the domain's token. The server answers 422 (naming what it found) when it
    /// does not, and 409 when another organization holds the domain.
    pub async fn verify_domain(&self, id: &DomainId) -> Result<Domain, ClientError> {
        self.send(Method::POST, &format!("v1/domains/{id}/verify"), &[], None::<&()>, None).await
    }

    /// What the application's device last reported about it.
    pub async fn application_status(&self, id: &ApplicationId) -> Result<ApplicationStatus, ClientError> {
        self.send(Method::GET, &format!("v1/applications/{id}/status"), &[], None::<&()>, None).await
    }

    /// The application's most recent output lines (at most `limit`, 1-1000), oldest first.
    pub async fn logs(&self, id: &ApplicationId, limit: Option<u32>) -> Result<ApplicationLogs, ClientError> {
        let query: Vec<(&str, String)> = limit.map(|limit| ("limit", limit.to_string())).into_iter().collect();
        self.send(Method::GET, &format!("v1/applications/{id}/logs"), &query, None::<&()>, None).await
    }

    /// The application's last `tail` lines and then every new line as it arrives, until the
    /// stream is dropped (or after a day; call again to go on).
    pub async fn follow_logs(
        &self,
        id: &ApplicationId,
        tail: Option<u32>,
    ) -> Result<impl Stream<Item = Result<LogEntry, ClientError>> + Send + use<>, ClientError> {
        let url = self.url(&format!("v1/applications/{id}/logs"))?;
        let mut query = vec![("follow", "true".to_owned())];
        if let Some(tail) = tail {
            query.push(("limit", tail.to_string()));
        }
        let response = self
            .http
            .get(url.clone())
            .bearer_auth(&self.api_key)
            .query(&query)
            .timeout(FOLLOW_LIMIT)
            .send()
            .await
            .map_err(|source| ClientError::Transport { url: url.to_string(), source })?;
        let response = check_status(response).await?;
        let state = (response, Vec::<u8>::new(), url.to_string());
        Ok(futures::stream::unfold(Some(state), |state| async move {
            let (mut response, mut buffer, url) = state?;
            loop {
                // Answer a complete line from the buffer first; the server sends one JSON object
                // per line and empty lines as keep-alives.
                if let Some(end) = buffer.iter().position(|byte| *byte == b'\n') {
                    let line: Vec<u8> = buffer.drain(..=end).collect();
                    let line = &line[..line.len() - 1];
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    let entry = serde_json::from_slice::<LogEntry>(line)
                        .map_err(|e| ClientError::Decode { url: url.clone(), message: e.to_string() });
                    return Some((entry, Some((response, buffer, url))));
                }
                match response.chunk().await {
                    Ok(Some(chunk)) => buffer.extend_from_slice(&chunk),
                    Ok(None) => return None,
                    Err(source) => return Some((Err(ClientError::Transport { url, source }), None)),
                }
            }
        }))
    }

    /// Lifecycle events, newest first.
    pub async fn events(&self, query: &EventQuery) -> Result<Page<Event>, ClientError> {
        let mut pairs = Vec::new();
        if let Some(application_id) = query.application_id {
            pairs.push(("application_id", application_id.to_string()));
        }
        if let Some(device_id) = query.device_id {
            pairs.push(("device_id", device_id.to_string()));
        }
        if let Some(limit) = query.limit {
            pairs.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = &query.cursor {
            pairs.push(("cursor", cursor.clone()));
        }
        self.send(Method::GET, "v1/events", &pairs, None::<&()>, None).await
    }

    fn url(&self, path: &str) -> Result<Url, ClientError> {
        self.base
            .join(path)
            .map_err(|e| ClientError::InvalidEndpoint { url: self.base.to_string(), message: e.to_string() })
    }

    async fn send<T: DeserializeOwned, B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        body: Option<&B>,
        if_match: Option<Revision>,
    ) -> Result<T, ClientError> {
        let url = self.url(path)?;
        let mut request = self.http.request(method, url.clone()).bearer_auth(&self.api_key).query(query);
        if let Some(body) = body {
            request = request.json(body);
        }
        if let Some(revision) = if_match {
            request = request.header(reqwest::header::IF_MATCH, format!("\"{revision}\""));
        }
        let response =
            request.send().await.map_err(|source| ClientError::Transport { url: url.to_string(), source })?;
        decode(check_status(response).await?, &url).await
    }
}

/// Reads a 2xx answer's JSON body.
async fn decode<T: DeserializeOwned>(response: reqwest::Response, url: &Url) -> Result<T, ClientError> {
    let bytes = response.bytes().await.map_err(|source| ClientError::Transport { url: url.to_string(), source })?;
    serde_json::from_slice(&bytes).map_err(|e| ClientError::Decode { url: url.to_string(), message: e.to_string() })
}

/// Passes 2xx answers through and turns the others into [`ClientError::Api`].
async fn check_status(response: reqwest::Response) -> Result<reqwest::Response, ClientError> {
    let status = response.status();
    if status.is_success() {
        return Ok(response);
    }
    let raw = response.text().await.unwrap_or_default();
    let body = serde_json::from_str::<ErrorBody>(&raw).ok();
    Err(ClientError::Api { status, body, raw })
}

fn default_http_client() -> Result<reqwest::Client, ClientError> {
    reqwest::Client::builder()
        .user_agent(concat!("edgible/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(Duration::from_secs(10))
        .timeout(Duration::from_secs(60))
        .build()
        .map_err(|source| ClientError::Transport { url: String::new(), source })
}
