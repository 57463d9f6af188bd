//! The plugin side of go-plugin: handshake, mutually authenticated TLS, the gRPC server with
//! the provider, controller and stdio services, and a clean shutdown.

pub mod handshake;
pub mod tls;

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tonic::transport::server::Connected;
use tonic::{Request, Response, Status};

use crate::proto::plugin::grpc_controller_server::{GrpcController, GrpcControllerServer};
use crate::proto::plugin::grpc_stdio_server::{GrpcStdio, GrpcStdioServer};
use crate::proto::plugin::{Empty, StdioData};
use crate::proto::tfplugin6::provider_server::{Provider, ProviderServer};

pub use handshake::{HandshakeError, PluginEnv};

/// How long a TLS handshake may take before the connection is dropped.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the server may drain open requests after a shutdown request.
const DRAIN_DEADLINE: Duration = Duration::from_secs(2);
/// The largest gRPC message accepted or sent (go-plugin allows large ones too).
const MAX_MESSAGE_SIZE: usize = 256 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum PluginError {
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on 127.0.0.1: {0}")]
    Listen(#[source] io::Error),
    #[error("the gRPC server failed: {0}")]
    Serve(#[from] tonic::transport::Error),
}

/// A plugin ready to serve: listening, with its TLS configuration, not yet announced.
pub struct Plugin {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    certificate_der: Vec<u8>,
    shutdown: watch::Sender<bool>,
}

impl Plugin {
    /// Checks the handshake environment and listens on an ephemeral port of 127.0.0.1.
    pub async fn bind(env: &PluginEnv) -> Result<Self, PluginError> {
        let client_pem = env.check()?;
        let client_certificate = tls::parse_client_certificate(client_pem)?;
        let identity = tls::ServerIdentity::generate()?;
        let config = tls::server_config(&identity, client_certificate)?;
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.map_err(PluginError::Listen)?;
        Ok(Self {
            listener,
            acceptor: TlsAcceptor::from(config),
            certificate_der: identity.certificate.to_vec(),
            shutdown: watch::channel(false).0,
        })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, PluginError> {
        self.listener.local_addr().map_err(PluginError::Listen)
    }

    /// The handshake line to print on stdout.
    pub fn handshake_line(&self) -> Result<String, PluginError> {
        Ok(handshake::handshake_line(self.local_addr()?, &self.certificate_der))
    }

    /// A handle that stops the server, like the controller's `Shutdown` does.
    pub fn shutdown_handle(&self) -> watch::Sender<bool> {
        self.shutdown.clone()
    }

    /// Serves the provider until Terraform asks the plugin to shut down (or the handle is
    /// used), then drains open requests for a short while.
    pub async fn serve<P: Provider>(self, provider: P) -> Result<(), PluginError> {
        let Plugin { listener, acceptor, shutdown, .. } = self;
        let (connections, incoming) = mpsc::channel::<TlsConnection>(16);
        let accept_loop = tokio::spawn(accept_connections(listener, acceptor, connections, shutdown.subscribe()));
        let incoming = futures::stream::unfold(incoming, |mut incoming| async move {
            incoming.recv().await.map(|connection| (Ok::<_, io::Error>(connection), incoming))
        });

        let mut stopped = shutdown.subscribe();
        let signal = async move {
            let _ = stopped.wait_for(|stop| *stop).await;
        };
        let server = tonic::transport::Server::builder()
            .add_service(
                ProviderServer::new(provider)
                    .max_decoding_message_size(MAX_MESSAGE_SIZE)
                    .max_encoding_message_size(MAX_MESSAGE_SIZE),
            )
            .add_service(GrpcControllerServer::new(Controller { shutdown: shutdown.clone() }))
            .add_service(GrpcStdioServer::new(Stdio { shutdown: shutdown.subscribe() }))
            .serve_with_incoming_shutdown(incoming, signal);

        let mut deadline = shutdown.subscribe();
        let result = tokio::select! {
            result = server => result.map_err(PluginError::Serve),
            // Connections that do not close in time must not keep the process alive.
            _ = async move {
                let _ = deadline.wait_for(|stop| *stop).await;
                tokio::time::sleep(DRAIN_DEADLINE).await;
            } => Ok(()),
        };
        accept_loop.abort();
        result
    }
}

/// Accepts TCP connections and hands those that complete the mutual TLS handshake to the
/// server. A refused handshake is logged and the connection dropped; the loop goes on.
async fn accept_connections(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    connections: mpsc::Sender<TlsConnection>,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let (stream, peer) = match accepted {
            Ok(accepted) => accepted,
            Err(error) => {
                tracing::warn!(%error, "accepting a connection failed");
                // Out of file descriptors and the like: give the system a moment.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let acceptor = acceptor.clone();
        let connections = connections.clone();
        tokio::spawn(async move {
            match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => {
                    let _ = connections.send(TlsConnection(tls)).await;
                }
                Ok(Err(error)) => tracing::warn!(%peer, %error, "refused a connection"),
                Err(_) => tracing::warn!(%peer, "a TLS handshake timed out"),
            }
        });
    }
}

/// A connection that completed the mutual TLS handshake.
pub struct TlsConnection(tokio_rustls::server::TlsStream<TcpStream>);

impl Connected for TlsConnection {
    type ConnectInfo = Option<SocketAddr>;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.0.get_ref().0.peer_addr().ok()
    }
}

impl AsyncRead for TlsConnection {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsConnection {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }
}

/// go-plugin's controller: `Shutdown` stops the server once the answer is out.
struct Controller {
    shutdown: watch::Sender<bool>,
}

#[tonic::async_trait]
impl GrpcController for Controller {
    async fn shutdown(&self, _request: Request<Empty>) -> Result<Response<Empty>, Status> {
        tracing::info!("Terraform asked the plugin to shut down");
        self.shutdown.send_replace(true);
        Ok(Response::new(Empty {}))
    }
}

/// go-plugin's stdio mirror. The provider writes nothing to stdout after the handshake and
/// logs go to stderr, which Terraform reads directly; the stream stays open, empty, until
/// shutdown so that Terraform does not report the service as missing.
struct Stdio {
    shutdown: watch::Receiver<bool>,
}

#[tonic::async_trait]
impl GrpcStdio for Stdio {
    type StreamStdioStream = Pin<Box<dyn Stream<Item = Result<StdioData, Status>> + Send>>;

    async fn stream_stdio(&self, _request: Request<()>) -> Result<Response<Self::StreamStdioStream>, Status> {
        let mut shutdown = self.shutdown.clone();
        let stream = futures::stream::once(async move {
            let _ = shutdown.wait_for(|stop| *stop).await;
        })
        .filter_map(|()| async { None::<Result<StdioData, Status>> });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// Stops the plugin when the process that started it goes away without saying so, so that
/// a killed Terraform leaves no provider behind.
pub fn watch_parent(shutdown: watch::Sender<bool>) {
    let parent = std::os::unix::process::parent_id();
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        loop {
            interval.tick().await;
            if std::os::unix::process::parent_id() != parent {
                tracing::warn!("Terraform went away; shutting down");
                shutdown.send_replace(true);
                return;
            }
        }
    });
}
