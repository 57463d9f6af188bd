//! A full TLS handshake through the edge: a rustls client, the edge, and a rustls server
//! behind it that reads the PROXY v2 header and then terminates TLS. The edge holds no key and
//! no certificate, so the session working end to end proves it only ever forwards bytes.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{Devices, TestEdge, read_header_and, route, table, test_config};

#[tokio::test]
async fn a_tls_session_passes_through_the_edge_untouched() -> anyhow::Result<()> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certified = rcgen::generate_simple_self_signed(vec!["app.example.test".to_owned()])?;
    let certificate = CertificateDer::from(certified.cert.der().to_vec());
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(certified.signing_key.serialize_der()));

    let server_config = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(vec![certificate.clone()], key)?;
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config));

    let devices = Devices::bind(1, 0).await?;
    let edge =
        TestEdge::start(test_config(devices.port), table(vec![route("app.example.test", 1, devices.address(0), true)]))
            .await?;

    // The device: strip the PROXY header, then terminate TLS and answer with what it learned.
    let listener = &devices;
    let device = async {
        let mut stream = listener.accept(0).await?;
        let (header, _) = read_header_and(&mut stream, 0).await?;
        let client_address = header.addresses.source().ok_or_else(|| anyhow::anyhow!("no client address"))?;
        let mut tls = acceptor.accept(stream).await?;
        let server_name = tls.get_ref().1.server_name().map(str::to_owned);
        let mut request = [0u8; 4];
        tls.read_exact(&mut request).await?;
        assert_eq!(&request, b"ping");
        tls.write_all(format!("pong from {} for {client_address}", server_name.unwrap_or_default()).as_bytes()).await?;
        tls.shutdown().await?;
        anyhow::Ok(client_address)
    };

    let client = async {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(certificate.clone())?;
        let client_config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client_config));
        let stream = edge.connect().await?;
        let local = stream.local_addr()?;
        let mut tls = connector.connect(ServerName::try_from("app.example.test")?, stream).await?;
        tls.write_all(b"ping").await?;
        let mut answer = String::new();
        tls.read_to_string(&mut answer).await?;
        anyhow::Ok((local, answer))
    };

    let (device_saw, (client_local, answer)) =
        tokio::time::timeout(crate::support::WAIT, async { tokio::try_join!(device, client) }).await??;
    assert_eq!(device_saw, client_local);
    assert_eq!(answer, format!("pong from app.example.test for {client_local}"));
    edge.stop().await
}
