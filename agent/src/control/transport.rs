//! The WebSocket under the push session: frames independent of the WebSocket library, and the
//! connector that dials the server (`ws://` for `http://` servers, `wss://` over rustls for
//! `https://` ones) with the device credential.

use std::fmt;
use std::pin::Pin;
use std::sync::Arc;

use edgible::model::ErrorBody;
use edgible::protocol::MAX_FRAME_BYTES;
use futures::{Sink, SinkExt, Stream, StreamExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::{HeaderValue, header};
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Message, WebSocketConfig};
use tokio_tungstenite::{Connector, tungstenite};
use url::Url;

/// The path of the agents' push endpoint, below the server's base URL.
pub const CONNECT_PATH: &str = edgible::protocol::AGENT_CONNECT_PATH;

/// The largest message the transport reads. Twice the protocol's limit, so that a frame
/// between the two reaches the decoder and is reported as too large rather than breaking the
/// connection.
const TRANSPORT_LIMIT: usize = 2 * MAX_FRAME_BYTES;

/// One WebSocket frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    Text(String),
    Binary(Vec<u8>),
    /// A WebSocket-level ping or pong; the library answers pings by itself.
    Control,
    /// The peer closes, or (outbound) this side closes, with a code and a reason.
    Close(Option<(u16, String)>),
}

impl From<Message> for Frame {
    fn from(message: Message) -> Self {
        match message {
            Message::Text(text) => Frame::Text(text.as_str().to_owned()),
            Message::Binary(bytes) => Frame::Binary(bytes.to_vec()),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => Frame::Control,
            Message::Close(close) => Frame::Close(close.map(|close| (u16::from(close.code), close.reason.to_string()))),
        }
    }
}

impl From<Frame> for Message {
    fn from(frame: Frame) -> Self {
        match frame {
            Frame::Text(text) => Message::text(text),
            Frame::Binary(bytes) => Message::binary(bytes),
            Frame::Control => Message::Ping(Vec::new().into()),
            Frame::Close(close) => {
                Message::Close(close.map(|(code, reason)| CloseFrame { code: code.into(), reason: reason.into() }))
            }
        }
    }
}

/// A broken connection, as text: the session only logs it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct TransportError(pub String);

pub type FrameSink = Pin<Box<dyn Sink<Frame, Error = TransportError> + Send>>;
pub type FrameStream = Pin<Box<dyn Stream<Item = Result<Frame, TransportError>> + Send>>;

/// An open connection to the server.
pub struct Connection {
    pub tx: FrameSink,
    pub rx: FrameStream,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Connection")
    }
}

/// Why a connection could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("invalid server URL {url:?}: {message}")]
    InvalidServer { url: String, message: String },
    /// The server answered the upgrade with an error status: nothing to retry soon unless the
    /// server changes (an unknown credential, a deleted device).
    #[error("the server refused the connection ({status}): {message}")]
    Refused { status: u16, message: String },
    #[error("cannot connect to {url}: {message}")]
    Transport { url: String, message: String },
    #[error("connecting to {0} took too long")]
    TimedOut(String),
}

/// Opens connections to the server.
#[async_trait::async_trait]
pub trait Connect: Send + Sync {
    async fn connect(&self) -> Result<Connection, ConnectError>;

    /// Where it connects to, for messages.
    fn target(&self) -> String;
}

/// The URL of the push endpoint of the server at `server` (`http(s)://host[:port][/prefix]`).
pub fn connect_url(server: &str) -> Result<Url, ConnectError> {
    edgible::protocol::hub_url(server, CONNECT_PATH)
        .map_err(|message| ConnectError::InvalidServer { url: server.to_owned(), message })
}

/// Dials the server's push endpoint over a real WebSocket.
#[derive(Debug, Clone)]
pub struct WebSocketConnector {
    url: Url,
    credential: String,
    /// The TLS configuration for `https` servers; `None` trusts the system's and the Mozilla
    /// roots, with the process's crypto provider.
    tls: Option<Arc<rustls::ClientConfig>>,
}

impl WebSocketConnector {
    pub fn new(server: &str, credential: &str) -> Result<Self, ConnectError> {
        Ok(Self { url: connect_url(server)?, credential: credential.to_owned(), tls: None })
    }

    /// Uses `config` for `https` servers instead of the default roots (a private CA).
    pub fn with_tls_config(mut self, config: Arc<rustls::ClientConfig>) -> Self {
        self.tls = Some(config);
        self
    }
}

#[async_trait::async_trait]
impl Connect for WebSocketConnector {
    async fn connect(&self) -> Result<Connection, ConnectError> {
        let transport = |message: String| ConnectError::Transport { url: self.url.to_string(), message };
        let mut request = self.url.as_str().into_client_request().map_err(|error| transport(error.to_string()))?;
        let authorization = HeaderValue::from_str(&format!("Bearer {}", self.credential))
            .map_err(|_| transport("the device credential is not a valid header value".to_owned()))?;
        request.headers_mut().insert(header::AUTHORIZATION, authorization);
        let config =
            WebSocketConfig::default().max_message_size(Some(TRANSPORT_LIMIT)).max_frame_size(Some(TRANSPORT_LIMIT));
        // Nagle's algorithm would hold back small frames (acks, pongs) for up to 40 ms.
        let connector = self.tls.clone().map(Connector::Rustls);
        let (socket, _response) =
            tokio_tungstenite::connect_async_tls_with_config(request, Some(config), true, connector).await.map_err(
                |error| match error {
                    tungstenite::Error::Http(response) => {
                        let status = response.status().as_u16();
                        let body = response.body().as_deref().unwrap_or_default();
                        ConnectError::Refused { status, message: refusal_message(body) }
                    }
                    other => transport(other.to_string()),
                },
            )?;
        let (sink, stream) = socket.split();
        let tx = sink
            .sink_map_err(|error| TransportError(error.to_string()))
            .with(|frame: Frame| futures::future::ready(Ok::<_, TransportError>(Message::from(frame))));
        let rx = stream.map(|message| message.map(Frame::from).map_err(|error| TransportError(error.to_string())));
        Ok(Connection { tx: Box::pin(tx), rx: Box::pin(rx) })
    }

    fn target(&self) -> String {
        self.url.to_string()
    }
}

/// The server's message from an error answer's body.
fn refusal_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody { error }) => error.message,
        Err(_) if body.is_empty() => "no explanation given".to_owned(),
        Err(_) => String::from_utf8_lossy(&body[..body.len().min(512)]).trim().to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_urls_become_push_endpoint_urls() {
        let cases = [
            ("http://127.0.0.1:7070", "ws://127.0.0.1:7070/v1/agent/connect"),
            ("http://127.0.0.1:7070/", "ws://127.0.0.1:7070/v1/agent/connect"),
            ("https://edgible.example.com", "wss://edgible.example.com/v1/agent/connect"),
            ("https://example.com/edgible?x=1", "wss://example.com/edgible/v1/agent/connect"),
        ];
        for (server, expected) in cases {
            assert_eq!(connect_url(server).expect(server).as_str(), expected);
        }
        for bad in ["ftp://example.com", "not a url", "mailto:a@example.com"] {
            assert!(matches!(connect_url(bad), Err(ConnectError::InvalidServer { .. })), "{bad}");
        }
    }

    #[test]
    fn frames_convert_both_ways() {
        for frame in
            [Frame::Text("{}".into()), Frame::Binary(vec![1, 2]), Frame::Close(Some((4000, "replaced".into())))]
        {
            assert_eq!(Frame::from(Message::from(frame.clone())), frame);
        }
        assert_eq!(Frame::from(Message::Pong(Vec::new().into())), Frame::Control);
        assert_eq!(Frame::from(Message::Close(None)), Frame::Close(None));
    }

    /// A `wss` server on loopback with a self-signed certificate for 127.0.0.1 that answers
    /// one connection with the `Authorization` header it received, then closes.
    async fn tls_server() -> (u16, rustls::pki_types::CertificateDer<'static>, tokio::task::JoinHandle<()>) {
        use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
        use tokio_tungstenite::tungstenite::handshake::server::{Request, Response};

        let certified = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).expect("a certificate");
        let certificate = certified.cert.der().clone();
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_no_client_auth()
            .with_single_cert(vec![certificate.clone()], key)
            .expect("a server configuration");
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("an address").port();
        let task = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("a connection");
            let tls = acceptor.accept(tcp).await.expect("a TLS handshake");
            let mut authorization = String::new();
            // The callback's signature is tungstenite's, error type included.
            #[allow(clippy::result_large_err)]
            let callback = |request: &Request, response: Response| {
                let header = request.headers().get(header::AUTHORIZATION);
                authorization = header.and_then(|value| value.to_str().ok()).unwrap_or_default().to_owned();
                Ok(response)
            };
            let mut socket = tokio_tungstenite::accept_hdr_async(tls, callback).await.expect("an upgrade");
            socket.send(Message::text(authorization)).await.expect("sent");
            let _ = socket.close(None).await;
        });
        (port, certificate, task)
    }

    #[tokio::test]
    async fn https_servers_are_reached_over_tls_with_the_credential() {
        let (port, certificate, server) = tls_server().await;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certificate).expect("a root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = WebSocketConnector::new(&format!("https://127.0.0.1:{port}"), "edgdev_secret")
            .expect("a valid URL")
            .with_tls_config(Arc::new(config));
        assert_eq!(connector.target(), format!("wss://127.0.0.1:{port}/v1/agent/connect"));
        let mut connection = connector.connect().await.expect("connected");
        let first = connection.rx.next().await.expect("a frame").expect("no error");
        assert_eq!(first, Frame::Text("Bearer edgdev_secret".into()));
        server.await.expect("the server ran");
    }

    #[tokio::test]
    async fn an_untrusted_certificate_is_refused() {
        let (port, _certificate, server) = tls_server().await;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("protocol versions")
            .with_root_certificates(rustls::RootCertStore::empty())
            .with_no_client_auth();
        let connector = WebSocketConnector::new(&format!("https://127.0.0.1:{port}"), "c")
            .expect("a valid URL")
            .with_tls_config(Arc::new(config));
        let error = connector.connect().await.expect_err("refused");
        assert!(matches!(error, ConnectError::Transport { .. }), "{error}");
        server.abort();
    }

    #[tokio::test]
    async fn an_http_error_answer_is_a_refusal_with_the_servers_message() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("an address").port();
        let server = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.expect("a connection");
            let mut request = vec![0; 4096];
            let _ = tcp.read(&mut request).await;
            let body =
                r#"{"error":{"code":"unauthorized","message":"unknown device credential; enroll the device again"}}"#;
            let answer = format!(
                "HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
                body.len()
            );
            tcp.write_all(answer.as_bytes()).await.expect("answered");
        });
        let connector = WebSocketConnector::new(&format!("http://127.0.0.1:{port}"), "wrong").expect("a valid URL");
        let error = connector.connect().await.expect_err("refused");
        assert!(
            matches!(&error, ConnectError::Refused { status: 401, message } if message.starts_with("unknown device credential")),
            "{error}"
        );
        server.await.expect("the server ran");
    }

    #[test]
    fn refusals_carry_the_servers_message() {
        let body = br#"{"error":{"code":"unauthorized","message":"unknown device credential"}}"#;
        assert_eq!(refusal_message(body), "unknown device credential");
        assert_eq!(refusal_message(b""), "no explanation given");
        assert_eq!(refusal_message(b"Bad Gateway\n"), "Bad Gateway");
    }
}
