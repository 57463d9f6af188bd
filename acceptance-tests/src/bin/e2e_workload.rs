//! The workload of the data path tests: a small HTTP server (HTTP/1.1 and HTTP/2 cleartext)
//! that the agent runs as a process workload on `127.0.0.1:$PORT` (or `$BIND_ADDRESS:$PORT`),
//! named by `$NAME`.
//!
//! - `GET /`: who answered, the `X-Forwarded-For/-Proto/-Host` it received
//!   and the identity headers (`X-Edgible-User/-Email`) it received ([`greeting`]), so a test
//!   sees which device served it and what the proxy told it.
//! - `GET /headers`: every request header it received, one `name=value` line each.
//! - `POST /upload`: the hex SHA-256 and length of the body, read as a stream.
//! - `GET /download?bytes=N`: N bytes of the deterministic pattern, streamed.
//! - `GET /ws`: a WebSocket echo (the upgrade goes through the edge and the device's proxy).
//! - `GET /whereami`: the kernel's boot id and release, which tell a microVM from its host,
//!   and the machine's IPv4 addresses.
//! - `GET /connect?to=ADDRESS:PORT`: whether a TCP connection to there opens within 3 s, for
//!   the cloud tests' check that one tenant's guest cannot reach another's.
//! - The migration tests' stateful endpoints, on the volume the agent passes as
//!   `EDGIBLE_VOLUME_DATA` (503 when there is none): `POST /records/ID` appends the id to
//!   `records.log` and answers 200 only after an fsync (an acknowledged record is on disk);
//!   `GET /records` lists the stored ids; `POST /fill?bytes=N` writes N random (so
//!   incompressible) bytes to `fill.bin` and answers their SHA-256, which `GET /fill` reads
//!   back. `GET /slow?ms=N` answers after N ms (a request in flight during a drain).
//! - `GET /health` answers 503 on a machine that has the address in `$UNHEALTHY_AT`.
//!
//! The pure parts live in `edgible_acceptance_tests::workload` and are unit tested there.

use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};

use anyhow::Context;
use bytes::Bytes;
use edgible_acceptance_tests::workload::{
    FILL_FILE, Forwarded, RECORDS_FILE, RECORDS_VOLUME_ENV, UNHEALTHY_AT_ENV, connect_outcome, connect_target,
    download_len, fill_pattern, greeting, header_lines, local_addresses, record_id, record_receipt, records_listing,
    slow_ms, unhealthy_here, upload_receipt, whereami,
};
use futures::{SinkExt, StreamExt};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use sha2::{Digest, Sha256};
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;

/// How long `GET /connect` waits for a connection to open.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// The size of each chunk of a download.
const CHUNK: usize = 64 << 10;

type ResponseBody = Either<Full<Bytes>, PatternBody>;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let port: u16 = std::env::var("PORT")
        .context("PORT is not set (the agent sets it to the application's port)")?
        .parse()
        .context("PORT is not a port number")?;
    let name: Arc<str> = std::env::var("NAME").unwrap_or_else(|_| "e2e-workload".to_owned()).into();
    // Loopback unless told otherwise: in a microVM the host's proxy reaches the workload at
    // the guest's address, so the cloud tests set `BIND_ADDRESS=0.0.0.0`.
    let address: Ipv4Addr = match std::env::var("BIND_ADDRESS") {
        Ok(text) => text.parse().with_context(|| format!("BIND_ADDRESS {text:?} is not an IPv4 address"))?,
        Err(_) => Ipv4Addr::LOCALHOST,
    };
    let listener = tokio::net::TcpListener::bind(SocketAddr::from((address, port)))
        .await
        .with_context(|| format!("listening on {address}:{port}"))?;
    println!("{name} listening on {address}:{port}");
    loop {
        let (stream, _) = listener.accept().await?;
        let name = name.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| handle(name.clone(), request));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            if let Err(error) = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await {
                eprintln!("connection ended with an error: {error}");
            }
        });
    }
}

async fn handle(name: Arc<str>, request: Request<Incoming>) -> Result<Response<ResponseBody>, Infallible> {
    let response = match (request.method(), request.uri().path()) {
        (&Method::GET, "/") => {
            let headers = request.headers();
            let forwarded = Forwarded {
                forwarded_for: header_text(headers, "x-forwarded-for"),
                proto: header_text(headers, "x-forwarded-proto"),
                host: header_text(headers, "x-forwarded-host"),
                user: header_text(headers, "x-edgible-user"),
                email: header_text(headers, "x-edgible-email"),
            };
            text_response(StatusCode::OK, greeting(&name, std::process::id(), &forwarded))
        }
        (&Method::GET, "/headers") => {
            let headers = request.headers().iter().map(|(name, value)| (name.as_str(), value.to_str().ok()));
            text_response(StatusCode::OK, header_lines(headers))
        }
        (&Method::GET, "/health") => {
            let unhealthy_at = std::env::var(UNHEALTHY_AT_ENV).ok();
            if unhealthy_here(unhealthy_at.as_deref(), &machine_addresses()) {
                text_response(StatusCode::SERVICE_UNAVAILABLE, format!("unhealthy: {UNHEALTHY_AT_ENV} is set here\n"))
            } else {
                text_response(StatusCode::OK, "ok\n".to_owned())
            }
        }
        (&Method::POST, path) if path.starts_with("/records/") => match record_id(path) {
            Ok(id) => stateful(move |volume| append_record(volume, id)).await,
            Err(error) => text_response(StatusCode::BAD_REQUEST, format!("{error}\n")),
        },
        (&Method::GET, "/records") => stateful(read_records).await,
        (&Method::POST, "/fill") => match download_len(request.uri().query()) {
            Ok(len) => stateful(move |volume| fill(volume, len)).await,
            Err(error) => text_response(StatusCode::BAD_REQUEST, format!("{error}\n")),
        },
        (&Method::GET, "/fill") => stateful(read_fill).await,
        (&Method::GET, "/slow") => match slow_ms(request.uri().query()) {
            Ok(ms) => {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
                text_response(StatusCode::OK, format!("slept={ms}\n"))
            }
            Err(error) => text_response(StatusCode::BAD_REQUEST, format!("{error}\n")),
        },
        (&Method::POST, "/upload") => upload(request.into_body()).await,
        (&Method::GET, "/download") => match download_len(request.uri().query()) {
            Ok(len) => {
                let mut response = Response::new(Either::Right(PatternBody { offset: 0, len }));
                response
                    .headers_mut()
                    .insert(header::CONTENT_TYPE, HeaderValue::from_static("application/octet-stream"));
                response
            }
            Err(error) => text_response(StatusCode::BAD_REQUEST, format!("{error}\n")),
        },
        (&Method::GET, "/ws") => websocket(request),
        (&Method::GET, "/whereami") => {
            let read =
                |path: &str| std::fs::read_to_string(path).unwrap_or_else(|error| format!("unreadable: {error}"));
            let addresses = local_addresses(&read("/proc/net/fib_trie"));
            text_response(
                StatusCode::OK,
                whereami(&read("/proc/sys/kernel/random/boot_id"), &read("/proc/sys/kernel/osrelease"), &addresses),
            )
        }
        (&Method::GET, "/connect") => match connect_target(request.uri().query()) {
            Ok(target) => {
                let result = match tokio::time::timeout(CONNECT_TIMEOUT, tokio::net::TcpStream::connect(target)).await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err(error)) if error.kind() == std::io::ErrorKind::ConnectionRefused => {
                        Err("refused".to_owned())
                    }
                    Ok(Err(error)) => Err(error.to_string()),
                    Err(_) => Err("timeout".to_owned()),
                };
                text_response(StatusCode::OK, connect_outcome(target, result))
            }
            Err(error) => text_response(StatusCode::BAD_REQUEST, format!("{error}\n")),
        },
        _ => text_response(StatusCode::NOT_FOUND, "not found\n".to_owned()),
    };
    Ok(response)
}

/// This machine's IPv4 addresses (not loopback); per network namespace, so per device.
fn machine_addresses() -> Vec<Ipv4Addr> {
    local_addresses(&std::fs::read_to_string("/proc/net/fib_trie").unwrap_or_default())
}

/// Serializes the writers of the volume's files.
static VOLUME_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `work` on the volume (blocking I/O, on a blocking thread, one at a time): 200 with its
/// text, 500 with its error, 503 when the agent gave the workload no volume.
async fn stateful(
    work: impl FnOnce(&std::path::Path) -> std::io::Result<String> + Send + 'static,
) -> Response<ResponseBody> {
    let Some(volume) = std::env::var_os(RECORDS_VOLUME_ENV) else {
        return text_response(StatusCode::SERVICE_UNAVAILABLE, format!("{RECORDS_VOLUME_ENV} is not set: no volume\n"));
    };
    let outcome = tokio::task::spawn_blocking(move || {
        let _guard = VOLUME_LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        work(std::path::Path::new(&volume))
    })
    .await;
    match outcome {
        Ok(Ok(text)) => text_response(StatusCode::OK, text),
        Ok(Err(error)) => text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("{error}\n")),
        Err(error) => text_response(StatusCode::INTERNAL_SERVER_ERROR, format!("the writer panicked: {error}\n")),
    }
}

/// Appends `id` to the records file and syncs it (and, when the file is new, its directory)
/// before answering: only then is the record acknowledged.
fn append_record(volume: &std::path::Path, id: u64) -> std::io::Result<String> {
    use std::io::Write as _;
    let path = volume.join(RECORDS_FILE);
    let new = !path.exists();
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&path)?;
    file.write_all(format!("{id}\n").as_bytes())?;
    file.sync_data()?;
    if new {
        std::fs::File::open(volume)?.sync_all()?;
    }
    Ok(record_receipt(id, &machine_addresses()))
}

fn read_records(volume: &std::path::Path) -> std::io::Result<String> {
    match std::fs::read_to_string(volume.join(RECORDS_FILE)) {
        Ok(text) => Ok(records_listing(&text)),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(records_listing("")),
        Err(error) => Err(error),
    }
}

/// Writes `len` bytes from `/dev/urandom` to the fill file, synced; answers their SHA-256.
fn fill(volume: &std::path::Path, len: u64) -> std::io::Result<String> {
    use std::io::{Read as _, Write as _};
    let mut random = std::fs::File::open("/dev/urandom")?;
    let mut file = std::fs::File::create(volume.join(FILL_FILE))?;
    let mut digest = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < len {
        let chunk = usize::try_from(len - written).unwrap_or(buffer.len()).min(buffer.len());
        random.read_exact(&mut buffer[..chunk])?;
        file.write_all(&buffer[..chunk])?;
        digest.update(&buffer[..chunk]);
        written += chunk as u64;
    }
    file.sync_all()?;
    Ok(upload_receipt(&hex::encode(digest.finalize()), len))
}

/// The SHA-256 and length of the fill file (`bytes=0` and no digest when there is none).
fn read_fill(volume: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read as _;
    let mut file = match std::fs::File::open(volume.join(FILL_FILE)) {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(upload_receipt("-", 0)),
        Err(error) => return Err(error),
    };
    let mut digest = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let read = file.read(&mut buffer)?;
        if read == 0 {
            return Ok(upload_receipt(&hex::encode(digest.finalize()), len));
        }
        digest.update(&buffer[..read]);
        len += read as u64;
    }
}

fn header_text<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers.get(name).and_then(|value| value.to_str().ok())
}

fn text_response(status: StatusCode, text: String) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Left(Full::new(Bytes::from(text))));
    *response.status_mut() = status;
    response.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Hashes the body frame by frame, never holding more than one frame.
async fn upload(mut body: Incoming) -> Response<ResponseBody> {
    let mut digest = Sha256::new();
    let mut len: u64 = 0;
    while let Some(frame) = body.frame().await {
        match frame {
            Ok(frame) => {
                if let Some(data) = frame.data_ref() {
                    digest.update(data);
                    len += data.len() as u64;
                }
            }
            Err(error) => {
                return text_response(
                    StatusCode::BAD_REQUEST,
                    format!("the upload broke off after {len} bytes: {error}\n"),
                );
            }
        }
    }
    text_response(StatusCode::OK, upload_receipt(&hex::encode(digest.finalize()), len))
}

/// Answers a WebSocket upgrade with 101 and echoes every message on the upgraded connection.
fn websocket(mut request: Request<Incoming>) -> Response<ResponseBody> {
    let wants_websocket =
        header_text(request.headers(), "upgrade").is_some_and(|value| value.eq_ignore_ascii_case("websocket"));
    let Some(key) = request.headers().get("sec-websocket-key").filter(|_| wants_websocket) else {
        return text_response(
            StatusCode::BAD_REQUEST,
            "expected a WebSocket upgrade with Sec-WebSocket-Key\n".to_owned(),
        );
    };
    let accept = derive_accept_key(key.as_bytes());
    let upgrade = hyper::upgrade::on(&mut request);
    tokio::spawn(async move {
        let upgraded = match upgrade.await {
            Ok(upgraded) => upgraded,
            Err(error) => {
                eprintln!("the WebSocket upgrade failed: {error}");
                return;
            }
        };
        let mut socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
        while let Some(Ok(message)) = socket.next().await {
            let echo = match message {
                Message::Text(_) | Message::Binary(_) => message,
                Message::Close(_) => break,
                // Pings are answered by tungstenite itself.
                _ => continue,
            };
            if socket.send(echo).await.is_err() {
                break;
            }
        }
        let _ = socket.close(None).await;
    });
    let mut response = Response::new(Either::Left(Full::new(Bytes::new())));
    *response.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let headers = response.headers_mut();
    headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    if let Ok(value) = HeaderValue::from_str(&accept) {
        headers.insert(header::SEC_WEBSOCKET_ACCEPT, value);
    }
    response
}

/// A streamed body of `len` bytes of the pattern, made one chunk at a time.
struct PatternBody {
    offset: u64,
    len: u64,
}

impl Body for PatternBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut TaskContext<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let remaining = self.len - self.offset;
        if remaining == 0 {
            return Poll::Ready(None);
        }
        let size = usize::try_from(remaining).unwrap_or(CHUNK).min(CHUNK);
        let mut chunk = vec![0u8; size];
        fill_pattern(self.offset, &mut chunk);
        self.offset += size as u64;
        Poll::Ready(Some(Ok(Frame::data(Bytes::from(chunk)))))
    }

    fn is_end_stream(&self) -> bool {
        self.offset == self.len
    }

    fn size_hint(&self) -> SizeHint {
        SizeHint::with_exact(self.len - self.offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_pattern_body_streams_exactly_its_length() -> anyhow::Result<()> {
        let len = 3 * CHUNK as u64 + 17;
        let body = PatternBody { offset: 0, len };
        assert_eq!(body.size_hint().exact(), Some(len));
        let bytes = body.collect().await?.to_bytes();
        assert_eq!(bytes.len() as u64, len);
        let mut expected = vec![0u8; bytes.len()];
        fill_pattern(0, &mut expected);
        assert_eq!(&bytes[..], &expected[..]);
        Ok(())
    }
}
