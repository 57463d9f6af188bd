//! The accept loop of the TLS port: admits each connection under the connection caps and
//! hands it to the [`Forwarder`] in a task of its own.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::limits::{ConnectionLimits, LimitExceeded};
use crate::metrics::{Metrics, Outcome};
use crate::splice::Forwarder;

/// The pause after an accept error other than a client aborting its own connection. Such
/// errors (out of file descriptors, out of memory) persist for a while; retrying at once
/// would spin a core without accepting anything.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_millis(50);

/// Accepts connections forever, spawning one task per admitted connection into `tasks`
/// (which the caller drains at shutdown). Finished tasks are reaped as it goes, so `tasks`
/// holds only live connections.
pub async fn accept_loop(
    listener: &TcpListener,
    forwarder: Arc<Forwarder>,
    limits: Arc<ConnectionLimits>,
    metrics: Arc<Metrics>,
    tasks: &mut JoinSet<()>,
) {
    loop {
        while tasks.try_join_next().is_some() {}
        let (stream, peer) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(error) if is_per_connection(&error) => {
                tracing::debug!(%error, "a connection was aborted before it was accepted");
                continue;
            }
            Err(error) => {
                tracing::warn!(%error, "accepting connections failed; retrying");
                tokio::time::sleep(ACCEPT_ERROR_PAUSE).await;
                continue;
            }
        };
        let permit = match limits.try_acquire(peer.ip()) {
            Ok(permit) => permit,
            Err(exceeded) => {
                let outcome = match exceeded {
                    LimitExceeded::Global => Outcome::GlobalLimit,
                    LimitExceeded::PerIp => Outcome::PerIpLimit,
                };
                metrics.count(outcome);
                tracing::debug!(%peer, reason = %exceeded, "connection refused");
                // Dropped without reading: over a cap, even the bytes of a hello are not
                // worth the edge's time.
                drop(stream);
                continue;
            }
        };
        let local = match stream.local_addr() {
            Ok(local) => local,
            Err(error) => {
                tracing::debug!(%peer, %error, "the accepted connection has no local address");
                continue;
            }
        };
        let forwarder = Arc::clone(&forwarder);
        tasks.spawn(async move {
            let _permit = permit;
            forwarder.handle(stream, peer, local).await;
        });
    }
}

/// Whether an accept error concerns only the connection being accepted.
fn is_per_connection(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::ConnectionAborted | io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionRefused
    )
}
