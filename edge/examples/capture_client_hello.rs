//! Captures real TLS ClientHellos for `edge/testdata/` (driven by `edge/testdata/capture.sh`).
//!
//! `listen --out FILE --port-file FILE` binds 127.0.0.1:0, writes the bound port to the port
//! file, accepts one connection, reads until the edge's own parser has a complete ClientHello
//! (or refuses the bytes), writes exactly the bytes read to FILE and closes the connection. A
//! client pointed at the port (curl, openssl s_client, Chromium) then fails its handshake,
//! which is expected: only its first flight is wanted.
//!
//! `rustls --out FILE (--server-name NAME | --no-sni)` writes the ClientHello that rustls
//! produces in-process for that name, with SNI turned off for `--no-sni`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use edgible_edge::sni::{self, MAX_CLIENT_HELLO_LEN};

/// How long the listener waits for the client's bytes once connected.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let command = args.next().context("usage: capture_client_hello (listen|rustls) OPTIONS")?;
    let mut out = None;
    let mut port_file = None;
    let mut server_name = None;
    let mut sni = true;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--out" => out = Some(PathBuf::from(args.next().context("--out needs a path")?)),
            "--port-file" => port_file = Some(PathBuf::from(args.next().context("--port-file needs a path")?)),
            "--server-name" => server_name = Some(args.next().context("--server-name needs a name")?),
            "--no-sni" => sni = false,
            other => bail!("unknown argument {other:?}"),
        }
    }
    let out = out.context("--out is required")?;
    let hello = match command.as_str() {
        "listen" => listen(&port_file.context("listen needs --port-file")?)?,
        "rustls" => rustls_hello(server_name.as_deref().unwrap_or("rustls.example.test"), sni)?,
        other => bail!("unknown command {other:?}"),
    };
    std::fs::write(&out, &hello).with_context(|| format!("writing {}", out.display()))?;
    println!("{}: {} bytes, parsed as {:?}", out.display(), hello.len(), sni::parse_client_hello(&hello));
    Ok(())
}

fn listen(port_file: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    let port = listener.local_addr()?.port();
    // Written under another name and renamed, so the script never reads a half-written file.
    let partial = port_file.with_extension("partial");
    std::fs::write(&partial, format!("{port}\n"))?;
    std::fs::rename(&partial, port_file)?;

    let (mut stream, peer) = listener.accept().context("accepting the client")?;
    stream.set_read_timeout(Some(READ_TIMEOUT))?;
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match sni::parse_client_hello(&buffer) {
            Err(error) if error.is_incomplete() && buffer.len() < MAX_CLIENT_HELLO_LEN => {}
            Ok(_) => break,
            Err(error) => bail!("{peer} sent bytes the parser refuses: {error}"),
        }
        let read = stream.read(&mut chunk).context("reading the ClientHello")?;
        let Some(bytes) = chunk.get(..read).filter(|bytes| !bytes.is_empty()) else {
            bail!("{peer} closed the connection after {} bytes", buffer.len());
        };
        buffer.extend_from_slice(bytes);
    }
    // A TLS alert (fatal, handshake_failure) makes clients give up at once instead of
    // retrying or waiting for their timeout.
    stream.write_all(&[21, 3, 3, 0, 2, 2, 40]).ok();
    Ok(buffer)
}

fn rustls_hello(server_name: &str, sni: bool) -> anyhow::Result<Vec<u8>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    config.enable_sni = sni;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())?;
    let mut connection = rustls::ClientConnection::new(Arc::new(config), name)?;
    let mut hello = Vec::new();
    while connection.wants_write() {
        connection.write_tls(&mut hello)?;
    }
    Ok(hello)
}
