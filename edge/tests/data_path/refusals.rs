//! Connections the edge refuses: a TLS alert (or a plain close), counted by reason, and the
//! device never contacted.

use std::sync::Arc;
use std::time::{Duration, Instant};

use edgible_edge::metrics::Outcome;
use rustls::pki_types::ServerName;
use tokio::io::AsyncWriteExt as _;

use crate::support::{
    ALERT_DECODE_ERROR, ALERT_INTERNAL_ERROR, ALERT_UNRECOGNIZED_NAME, Devices, TestEdge, hello, read_to_close, route,
    sample, table, test_config,
};

/// Sends `bytes` and returns everything the edge answers until it closes.
async fn answer_to(edge: &TestEdge, bytes: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut client = edge.connect().await?;
    client.write_all(bytes).await?;
    read_to_close(&mut client).await
}

#[tokio::test]
async fn unknown_names_and_missing_sni_get_unrecognized_name() -> anyhow::Result<()> {
    let devices = Devices::bind(1, 0).await?;
    let edge =
        TestEdge::start(test_config(devices.port), table(vec![route("app.example.test", 1, devices.address(0), true)]))
            .await?;

    // api.example.test is not routed.
    assert_eq!(answer_to(&edge, hello::OPENSSL).await?, ALERT_UNRECOGNIZED_NAME);
    assert_eq!(answer_to(&edge, hello::CURL_NO_SNI).await?, ALERT_UNRECOGNIZED_NAME);
    assert_eq!(answer_to(&edge, hello::RUSTLS_NO_SNI).await?, ALERT_UNRECOGNIZED_NAME);
    assert!(!devices.has_pending(0), "a refused connection must never reach a device");

    // A real rustls client reports the alert.
    let error = rustls_handshake(&edge, "unknown.example.test").await.unwrap_err();
    assert!(error.to_string().contains("UnrecognisedName"), "{error}");

    let metrics = edge.scrape().await?;
    assert_eq!(
        sample(&metrics, "edgible_edge_connections_total{outcome=\"refused\",reason=\"unknown_name\"}"),
        Some(2)
    );
    assert_eq!(sample(&metrics, "edgible_edge_connections_total{outcome=\"refused\",reason=\"no_sni\"}"), Some(2));
    assert_eq!(sample(&metrics, "edgible_edge_connections_total{outcome=\"routed\",reason=\"exact\"}"), Some(0));
    assert!(!devices.has_pending(0));
    edge.stop().await
}

#[tokio::test]
async fn an_unreachable_or_offline_device_gets_internal_error_quickly() -> anyhow::Result<()> {
    let devices = Devices::bind(1, 1).await?;
    let routes = table(vec![
        route("app.example.test", 1, devices.unreachable[0], true),
        route("api.example.test", 2, devices.address(0), false),
    ]);
    let edge = TestEdge::start(test_config(devices.port), routes).await?;

    let started = Instant::now();
    assert_eq!(answer_to(&edge, hello::CURL).await?, ALERT_INTERNAL_ERROR);
    assert!(started.elapsed() < Duration::from_secs(2), "refused after {:?}", started.elapsed());

    // Offline: refused without even trying the device, which is listening.
    let started = Instant::now();
    assert_eq!(answer_to(&edge, hello::OPENSSL).await?, ALERT_INTERNAL_ERROR);
    assert!(started.elapsed() < Duration::from_secs(2), "refused after {:?}", started.elapsed());
    assert!(!devices.has_pending(0));

    let error = rustls_handshake(&edge, "app.example.test").await.unwrap_err();
    assert!(error.to_string().contains("InternalError"), "{error}");

    assert_eq!(edge.metrics.outcome_count(Outcome::DeviceUnreachable), 2);
    assert_eq!(edge.metrics.outcome_count(Outcome::DeviceOffline), 1);
    let metrics = edge.scrape().await?;
    assert_eq!(sample(&metrics, "edgible_edge_routes{state=\"offline\"}"), Some(1));
    edge.stop().await
}

#[tokio::test]
async fn a_slowloris_is_closed_at_the_hello_deadline() -> anyhow::Result<()> {
    let devices = Devices::bind(1, 0).await?;
    let mut config = test_config(devices.port);
    config.splice.hello_timeout = Duration::from_millis(500);
    let edge = TestEdge::start(config, table(vec![route("app.example.test", 1, devices.address(0), true)])).await?;

    let client = edge.connect().await?;
    let (mut reader, mut writer) = client.into_split();
    // One byte every 100 ms: each read is well within any per-read timeout, but the whole
    // hello would take minutes.
    let trickle = tokio::spawn(async move {
        for byte in hello::CURL {
            if writer.write_all(&[*byte]).await.is_err() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    });
    let started = Instant::now();
    let received = read_to_close(&mut reader).await?;
    let elapsed = started.elapsed();
    trickle.abort();
    assert!(received.is_empty(), "no alert for a client that never finished its hello: {received:?}");
    assert!(elapsed >= Duration::from_millis(400) && elapsed < Duration::from_secs(5), "closed after {elapsed:?}");
    assert_eq!(edge.metrics.outcome_count(Outcome::HelloTimeout), 1);
    assert!(!devices.has_pending(0));
    edge.stop().await
}

#[tokio::test]
async fn oversized_hellos_are_refused_without_buffering_them() -> anyhow::Result<()> {
    let devices = Devices::bind(1, 0).await?;
    let edge =
        TestEdge::start(test_config(devices.port), table(vec![route("app.example.test", 1, devices.address(0), true)]))
            .await?;

    // A record header announcing more than TLS allows: refused from its five bytes.
    assert_eq!(answer_to(&edge, &[22, 3, 1, 0x40, 0x01]).await?, ALERT_DECODE_ERROR);
    // A handshake message longer than one record can hold.
    assert_eq!(answer_to(&edge, &[22, 3, 1, 0x40, 0x00, 1, 0, 0x40, 0x00]).await?, ALERT_DECODE_ERROR);

    // A hello cut into one-byte records: each costs five header bytes, so it runs out of the
    // edge's bound long before it is complete.
    let message_len: usize = 3000;
    let mut message = vec![1, 0, (message_len >> 8) as u8, message_len as u8];
    message.resize(4 + message_len, 0);
    let fragmented: Vec<u8> = message.iter().flat_map(|byte| [22, 3, 1, 0, 1, *byte]).collect();
    assert!(fragmented.len() > edgible_edge::sni::MAX_CLIENT_HELLO_LEN);
    let client = edge.connect().await?;
    let (mut reader, mut writer) = client.into_split();
    let sender = tokio::spawn(async move {
        let _ = writer.write_all(&fragmented).await;
    });
    assert_eq!(read_to_close(&mut reader).await?, ALERT_DECODE_ERROR);
    sender.abort();

    // Plain HTTP on the TLS port.
    assert_eq!(answer_to(&edge, b"GET / HTTP/1.1\r\nHost: app.example.test\r\n\r\n").await?, [21, 3, 3, 0, 2, 2, 10]);

    assert_eq!(edge.metrics.outcome_count(Outcome::TooLarge), 3);
    assert_eq!(edge.metrics.outcome_count(Outcome::NotTls), 1);
    assert!(!devices.has_pending(0));
    edge.stop().await
}

#[tokio::test]
async fn a_client_that_closes_early_is_counted() -> anyhow::Result<()> {
    let edge = TestEdge::start(test_config(443), table(vec![])).await?;
    let mut client = edge.connect().await?;
    client.write_all(&hello::CURL[..100]).await?;
    client.shutdown().await?;
    assert!(read_to_close(&mut client).await?.is_empty());
    crate::support::wait_until("the early close is counted", || async {
        edge.metrics.outcome_count(Outcome::ClientClosed) == 1
    })
    .await?;
    edge.stop().await
}

/// A rustls handshake through the edge, which must fail (the edge has no certificate).
async fn rustls_handshake(edge: &TestEdge, name: &str) -> Result<(), std::io::Error> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(std::io::Error::other)?
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let stream = edge.connect().await.map_err(std::io::Error::other)?;
    let server_name = ServerName::try_from(name.to_owned()).map_err(std::io::Error::other)?;
    tokio::time::timeout(crate::support::WAIT, connector.connect(server_name, stream))
        .await
        .map_err(std::io::Error::other)??;
    Ok(())
}
