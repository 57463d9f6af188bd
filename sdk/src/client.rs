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
    ApiKey, ApiKeyCreated, ApiKeyId, ApiKeySpec, Application, ApplicationId, ApplicationKey, ApplicationKeyCreated,
    ApplicationKeyId, ApplicationKeySpec, ApplicationLogs, ApplicationSpec, ApplicationStatus, Device, DeviceCreated,
    DeviceId, DevicePool, DevicePoolId, DevicePoolSpec, DeviceSpec, Domain, DomainId, DomainSpec, Edge, EdgeCreated,
    EdgeEnrollment, EdgeId, EdgeSpec, Enrollment, EnrollmentRequest, ErrorBody, Event, LogEntry, Member, MemberId,
    MemberSpec, Migration, MigrationId, MigrationRequest, Organization, OrganizationCreated, OrganizationId,
    OrganizationSpec, Page, PasswordSpec, Placement, PlacementId, PlacementSpec, Revision, ShortCode,
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

impl ListOptions {
    fn query(&self) -> Vec<(&'static str, String)> {
        let mut query = Vec::new();
        if let Some(limit) = self.limit {
            query.push(("limit", limit.to_string()));
        }
        if let Some(cursor) = &self.cursor {
            query.push(("cursor", cursor.clone()));
        }
        if let Some(name) = &self.name {
            query.push(("name", name.clone()));
        }
        query
    }
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

/// Answer to rotating the server's assertion signing key: the id of the new current key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
pub struct AssertionKeyRotated {
    pub kid: String,
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
        self.send(Method::GET, &format!("v1/{}", R::PATH), &options.query(), None::<&()>, None).await
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
        self.send_without_answer(Method::DELETE, &format!("v1/{}/{id}", R::PATH), None::<&()>).await
    }

    /// Sets the password the member's user logs in with on the server's login page (admin
    /// scope). The server stores only an argon2 hash of it.
    pub async fn set_member_password(&self, id: &MemberId, spec: &PasswordSpec) -> Result<(), ClientError> {
        self.send_without_answer(Method::PUT, &format!("v1/members/{id}/password"), Some(spec)).await
    }

    /// One page of the keys that pass the application's `api_key` access policy.
    pub async fn list_application_keys(
        &self,
        application: &ApplicationId,
        options: &ListOptions,
    ) -> Result<Page<ApplicationKey>, ClientError> {
        let path = format!("v1/applications/{application}/keys");
        self.send(Method::GET, &path, &options.query(), None::<&()>, None).await
    }

    /// Every key of the application, following pages.
    pub async fn list_all_application_keys(
        &self,
        application: &ApplicationId,
    ) -> Result<Vec<ApplicationKey>, ClientError> {
        let mut options = ListOptions { limit: Some(1000), ..ListOptions::default() };
        let mut all = Vec::new();
        loop {
            let page = self.list_application_keys(application, &options).await?;
            all.extend(page.items);
            match page.next_cursor {
                Some(cursor) => options.cursor = Some(cursor),
                None => return Ok(all),
            }
        }
    }

    /// Creates a key for the application; the answer carries its secret, shown only this once.
    pub async fn create_application_key(
        &self,
        application: &ApplicationId,
        spec: &ApplicationKeySpec,
    ) -> Result<ApplicationKeyCreated, ClientError> {
        let path = format!("v1/applications/{application}/keys");
        self.send(Method::POST, &path, &[], Some(spec), None).await
    }

    pub async fn application_key(
        &self,
        application: &ApplicationId,
        key: &ApplicationKeyId,
    ) -> Result<ApplicationKey, ClientError> {
        let path = format!("v1/applications/{application}/keys/{key}");
        self.send(Method::GET, &path, &[], None::<&()>, None).await
    }

    /// Revokes an application key; devices stop accepting it once the server pushed the change.
    pub async fn delete_application_key(
        &self,
        application: &ApplicationId,
        key: &ApplicationKeyId,
    ) -> Result<(), ClientError> {
        self.send_without_answer(Method::DELETE, &format!("v1/applications/{application}/keys/{key}"), None::<&()>)
            .await
    }

    /// The application's current short code. 404 when the application has no `short_code`
    /// access policy.
    pub async fn short_code(&self, application: &ApplicationId) -> Result<ShortCode, ClientError> {
        self.send(Method::GET, &format!("v1/applications/{application}/short-code"), &[], None::<&()>, None).await
    }

    /// Replaces a generated short code with a new one, ending the sessions made with the old
    /// one. 409 when the code is set in the application's spec (change the spec instead).
    pub async fn rotate_short_code(&self, application: &ApplicationId) -> Result<ShortCode, ClientError> {
        let path = format!("v1/applications/{application}/short-code/rotate");
        self.send(Method::POST, &path, &[], None::<&()>, None).await
    }

    /// Makes a new key sign login assertions (platform scope); devices keep accepting the
    /// previous keys for a grace period.
    pub async fn rotate_assertion_key(&self) -> Result<AssertionKeyRotated, ClientError> {
        self.send(Method::POST, "v1/assertion-keys/rotate", &[], None::<&()>, None).await
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

    /// Starts moving the application to where `request.to` says (202). The server refuses
    /// with 409, creating nothing, when another migration of the application runs, a volume
    /// is not movable, or the target is offline, outside the organization or the source.
    pub async fn create_migration(
        &self,
        application: &ApplicationId,
        request: &MigrationRequest,
    ) -> Result<Migration, ClientError> {
        let path = format!("v1/applications/{application}/migrations");
        self.send(Method::POST, &path, &[], Some(request), None).await
    }

    /// One migration, with its phase, its phase records and, once it failed, why.
    pub async fn migration(&self, id: &MigrationId) -> Result<Migration, ClientError> {
        self.send(Method::GET, &format!("v1/migrations/{id}"), &[], None::<&()>, None).await
    }

    /// Every migration of the application, newest first, following pages.
    pub async fn application_migrations(&self, application: &ApplicationId) -> Result<Vec<Migration>, ClientError> {
        let path = format!("v1/applications/{application}/migrations");
        let mut options = ListOptions { limit: Some(1000), ..ListOptions::default() };
        let mut all = Vec::new();
        loop {
            let page: Page<Migration> = self.send(Method::GET, &path, &options.query(), None::<&()>, None).await?;
            all.extend(page.items);
            match page.next_cursor {
                Some(cursor) => options.cursor = Some(cursor),
                None => return Ok(all),
            }
        }
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

    /// Usage per application and hour in every hour that overlaps `[from, to)` (at most 93
    /// days), of the caller's organization or, with a `platform` key, of `organization`.
    pub async fn usage(
        &self,
        from: chrono::DateTime<chrono::Utc>,
        to: chrono::DateTime<chrono::Utc>,
        organization: Option<OrganizationId>,
    ) -> Result<crate::model::UsageReport, ClientError> {
        let time = |at: chrono::DateTime<chrono::Utc>| at.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true);
        let mut pairs = vec![("from", time(from)), ("to", time(to))];
        if let Some(organization) = organization {
            pairs.push(("organization_id", organization.to_string()));
        }
        self.send(Method::GET, "v1/usage", &pairs, None::<&()>, None).await
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

    /// A request whose answer has no body (`204 No Content`).
    async fn send_without_answer<B: Serialize + ?Sized>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(), ClientError> {
        let url = self.url(path)?;
        let mut request = self.http.request(method, url.clone()).bearer_auth(&self.api_key);
        if let Some(body) = body {
            request = request.json(body);
        }
        let response =
            request.send().await.map_err(|source| ClientError::Transport { url: url.to_string(), source })?;
        check_status(response).await.map(drop)
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

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    use super::*;

    /// What the canned server saw of one request.
    #[derive(Debug)]
    struct Seen {
        request_line: String,
        body: String,
    }

    /// Serves one HTTP/1.1 request on loopback with `status` and `body`, and hands back what it
    /// received.
    async fn one_request(status: &'static str, body: String) -> (String, tokio::task::JoinHandle<Seen>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let endpoint = format!("http://{}", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut received = Vec::new();
            let mut buffer = [0u8; 4096];
            let (head_end, content_length) = loop {
                let read = stream.read(&mut buffer).await.unwrap();
                assert!(read > 0, "the client closed before a whole request");
                received.extend_from_slice(&buffer[..read]);
                if let Some(end) = received.windows(4).position(|window| window == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&received[..end]).to_lowercase();
                    let length = head
                        .lines()
                        .find_map(|line| line.strip_prefix("content-length:"))
                        .map_or(0, |value| value.trim().parse::<usize>().unwrap());
                    break (end + 4, length);
                }
            };
            while received.len() < head_end + content_length {
                let read = stream.read(&mut buffer).await.unwrap();
                assert!(read > 0, "the client closed before the whole body");
                received.extend_from_slice(&buffer[..read]);
            }
            let head = String::from_utf8_lossy(&received[..head_end]).into_owned();
            let answer = format!(
                "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            stream.write_all(answer.as_bytes()).await.unwrap();
            Seen {
                request_line: head.lines().next().unwrap_or_default().to_owned(),
                body: String::from_utf8_lossy(&received[head_end..]).into_owned(),
            }
        });
        (endpoint, task)
    }

    fn application_key_json(application: ApplicationId) -> serde_json::Value {
        serde_json::json!({
            "id": ApplicationKeyId::new(),
            "organization_id": crate::model::OrganizationId::new(),
            "application_id": application,
            "revision": 3,
            "created_at": "2030-01-01T00:00:00Z",
            "updated_at": "2030-01-01T00:00:00Z",
            "prefix": "edgak_ab",
            "spec": {"name": "ci"},
        })
    }

    #[tokio::test]
    async fn setting_a_password_puts_it_to_the_member() {
        let (endpoint, server) = one_request("204 No Content", String::new()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        let member = MemberId::new();
        client.set_member_password(&member, &PasswordSpec { password: "correct horse".into() }).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen.request_line, format!("PUT /v1/members/{member}/password HTTP/1.1"));
        assert_eq!(seen.body, r#"{"password":"correct horse"}"#);
    }

    #[tokio::test]
    async fn application_keys_live_under_their_application() {
        let application = ApplicationId::new();
        let created =
            serde_json::json!({"application_key": application_key_json(application), "secret": "edgak_secret"});
        let (endpoint, server) = one_request("201 Created", created.to_string()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        let spec = ApplicationKeySpec { name: "ci".parse().unwrap(), expires_at: None };
        let answer = client.create_application_key(&application, &spec).await.unwrap();
        assert_eq!(answer.secret, "edgak_secret");
        assert_eq!(answer.application_key.prefix, "edgak_ab");
        let seen = server.await.unwrap();
        assert_eq!(seen.request_line, format!("POST /v1/applications/{application}/keys HTTP/1.1"));
        assert_eq!(seen.body, r#"{"name":"ci"}"#);

        let page = serde_json::json!({"items": [application_key_json(application)], "next_cursor": null});
        let (endpoint, server) = one_request("200 OK", page.to_string()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        let keys = client.list_all_application_keys(&application).await.unwrap();
        assert_eq!(keys.len(), 1);
        let seen = server.await.unwrap();
        assert_eq!(seen.request_line, format!("GET /v1/applications/{application}/keys?limit=1000 HTTP/1.1"));

        let key = ApplicationKeyId::new();
        let (endpoint, server) = one_request("204 No Content", String::new()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        client.delete_application_key(&application, &key).await.unwrap();
        let seen = server.await.unwrap();
        assert_eq!(seen.request_line, format!("DELETE /v1/applications/{application}/keys/{key} HTTP/1.1"));
    }

    #[tokio::test]
    async fn short_codes_are_read_and_rotated() {
        let application = ApplicationId::new();
        let code =
            serde_json::json!({"application_id": application, "code": "k3x9q2", "version": 2, "set_by_spec": false});
        let (endpoint, server) = one_request("200 OK", code.to_string()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        let short_code = client.rotate_short_code(&application).await.unwrap();
        assert_eq!((short_code.code.as_str(), short_code.version), ("k3x9q2", 2));
        let seen = server.await.unwrap();
        assert_eq!(seen.request_line, format!("POST /v1/applications/{application}/short-code/rotate HTTP/1.1"));

        let error = serde_json::json!({"error": {"code": "not_found", "message": "application web has no short_code access policy", "field": null}});
        let (endpoint, server) = one_request("404 Not Found", error.to_string()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        let error = client.short_code(&application).await.unwrap_err();
        assert!(error.is_not_found(), "{error}");
        assert!(error.message().contains("short_code"), "{error}");
        let seen = server.await.unwrap();
        assert_eq!(seen.request_line, format!("GET /v1/applications/{application}/short-code HTTP/1.1"));
    }

    #[tokio::test]
    async fn rotating_the_assertion_key_answers_its_id() {
        let (endpoint, server) = one_request("200 OK", r#"{"kid":"k2"}"#.to_owned()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        assert_eq!(client.rotate_assertion_key().await.unwrap().kid, "k2");
        assert_eq!(server.await.unwrap().request_line, "POST /v1/assertion-keys/rotate HTTP/1.1");
    }
    #[tokio::test]
    async fn migrations_are_started_and_read() {
        let application = ApplicationId::new();
        let migration = MigrationId::new();
        let device = crate::model::DeviceId::new();
        let to = serde_json::json!({"strategy": "serving-device", "application_id": application, "device_id": device});
        let record = serde_json::json!({
            "id": migration,
            "organization_id": crate::model::OrganizationId::new(),
            "application_id": application,
            "placement_id": PlacementId::new(),
            "source": crate::model::DeviceId::new(),
            "target": device,
            "to": to,
            "stateful": true,
            "phase": "preflight",
            "phases": [{"phase": "preflight", "started_at": "2030-01-01T00:00:00Z"}],
            "created_at": "2030-01-01T00:00:00Z",
            "updated_at": "2030-01-01T00:00:00Z",
        });
        let (endpoint, server) = one_request("202 Accepted", record.to_string()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        let request: MigrationRequest = serde_json::from_value(serde_json::json!({"to": to})).unwrap();
        let answer = client.create_migration(&application, &request).await.unwrap();
        assert_eq!((answer.id, answer.phase), (migration, crate::model::MigrationPhase::Preflight));
        let seen = server.await.unwrap();
        assert_eq!(seen.request_line, format!("POST /v1/applications/{application}/migrations HTTP/1.1"));
        assert_eq!(serde_json::from_str::<serde_json::Value>(&seen.body).unwrap(), serde_json::json!({"to": to}));

        let (endpoint, server) = one_request("200 OK", record.to_string()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        assert_eq!(client.migration(&migration).await.unwrap().target, device);
        assert_eq!(server.await.unwrap().request_line, format!("GET /v1/migrations/{migration} HTTP/1.1"));

        let page = serde_json::json!({"items": [record]});
        let (endpoint, server) = one_request("200 OK", page.to_string()).await;
        let client = Client::new(&endpoint, "edg_test").unwrap();
        assert_eq!(client.application_migrations(&application).await.unwrap().len(), 1);
        assert_eq!(
            server.await.unwrap().request_line,
            format!("GET /v1/applications/{application}/migrations?limit=1000 HTTP/1.1")
        );
    }
}
