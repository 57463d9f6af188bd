//! Connections with a routed server name reach their device: PROXY v2 header with the client's
//! real address first, then the ClientHello exactly as sent, then both directions, half-close
//! included.

use std::time::Duration;

use edgible::proxy_protocol::{Addresses, Command};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::support::{Devices, TestEdge, hello, read_header_and, read_to_close, route, sample, table, test_config};

#[tokio::test]
async fn each_name_reaches_its_device_with_the_client_address_and_the_exact_hello() -> anyhow::Result<()> {
    let devices = Devices::bind(2, 0).await?;
    let routes = table(vec![
        route("app.example.test", 1, devices.address(0), true),
        route("api.example.test", 2, devices.address(1), true),
    ]);
    let edge = TestEdge::start(test_config(devices.port), routes).await?;

    for (capture, backend) in [(hello::CURL, 0), (hello::OPENSSL, 1)] {
        let mut client = edge.connect().await?;
        let client_address = client.local_addr()?;
        client.write_all(capture).await?;

        let mut device = devices.accept(backend).await?;
        let (header, bytes) = read_header_and(&mut device, capture.len()).await?;
        assert_eq!(header.command, Command::Proxy);
        assert_eq!(header.addresses.source(), Some(client_address));
        assert_eq!(header.addresses.destination(), Some(edge.addresses.https));
        assert!(matches!(header.addresses, Addresses::Ipv4 { .. }));
        assert_eq!(bytes, capture, "the device must see the ClientHello byte for byte");

        // Both directions are spliced.
        device.write_all(b"from the device").await?;
        let mut answer = [0u8; 15];
        client.read_exact(&mut answer).await?;
        assert_eq!(&answer, b"from the device");
        client.write_all(b"from the client").await?;
        let mut question = [0u8; 15];
        device.read_exact(&mut question).await?;
        assert_eq!(&question, b"from the client");
    }
    assert!(!devices.has_pending(0) && !devices.has_pending(1));
    assert_eq!(edge.metrics.outcome_count(edgible_edge::metrics::Outcome::Routed), 2);
    edge.stop().await
}

#[tokio::test]
async fn a_hello_trickled_in_pieces_is_reassembled() -> anyhow::Result<()> {
    let devices = Devices::bind(1, 0).await?;
    let edge =
        TestEdge::start(test_config(devices.port), table(vec![route("www.example.test", 1, devices.address(0), true)]))
            .await?;

    let mut client = edge.connect().await?;
    // Chromium's hello in uneven pieces, each sent on its own: the edge must wait for the rest.
    for piece in [&hello::CHROMIUM[..3], &hello::CHROMIUM[3..700], &hello::CHROMIUM[700..701], &hello::CHROMIUM[701..]]
    {
        client.write_all(piece).await?;
        client.flush().await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut device = devices.accept(0).await?;
    let (_, bytes) = read_header_and(&mut device, hello::CHROMIUM.len()).await?;
    assert_eq!(bytes, hello::CHROMIUM);
    edge.stop().await
}

#[tokio::test]
async fn wildcard_routes_match_one_label() -> anyhow::Result<()> {
    let devices = Devices::bind(2, 0).await?;
    let routes = table(vec![
        route("*.example.test", 1, devices.address(0), true),
        route("api.example.test", 2, devices.address(1), true),
    ]);
    let edge = TestEdge::start(test_config(devices.port), routes).await?;

    // `MiXeD.Example.TEST` is normalized to `mixed.example.test`, then matches the wildcard.
    let mut client = edge.connect().await?;
    client.write_all(hello::OPENSSL_MIXED_CASE).await?;
    let mut device = devices.accept(0).await?;
    let (_, bytes) = read_header_and(&mut device, hello::OPENSSL_MIXED_CASE.len()).await?;
    assert_eq!(bytes, hello::OPENSSL_MIXED_CASE);

    // An exact route wins over the wildcard.
    let mut client = edge.connect().await?;
    client.write_all(hello::OPENSSL).await?;
    let mut device = devices.accept(1).await?;
    read_header_and(&mut device, hello::OPENSSL.len()).await?;

    let metrics = edge.scrape().await?;
    assert_eq!(sample(&metrics, "edgible_edge_connections_total{outcome=\"routed\",reason=\"wildcard\"}"), Some(1));
    assert_eq!(sample(&metrics, "edgible_edge_connections_total{outcome=\"routed\",reason=\"exact\"}"), Some(1));
    assert_eq!(sample(&metrics, "edgible_edge_routes{state=\"online\"}"), Some(2));
    edge.stop().await
}

#[tokio::test]
async fn half_close_keeps_the_other_direction_open() -> anyhow::Result<()> {
    let devices = Devices::bind(1, 0).await?;
    let edge =
        TestEdge::start(test_config(devices.port), table(vec![route("app.example.test", 1, devices.address(0), true)]))
            .await?;

    let mut client = edge.connect().await?;
    client.write_all(hello::CURL).await?;
    client.write_all(b"request").await?;
    // The client is done sending, as `curl --data ... ` or a shut-down TLS writer would be.
    client.shutdown().await?;

    let mut device = devices.accept(0).await?;
    let (_, bytes) = read_header_and(&mut device, hello::CURL.len() + 7).await?;
    assert_eq!(&bytes[hello::CURL.len()..], b"request");
    // The device sees the client's end of stream...
    let rest = read_to_close(&mut device).await?;
    assert!(rest.is_empty());
    // ...and can still answer, at length, before closing its side.
    let response = vec![7u8; 256 * 1024];
    device.write_all(&response).await?;
    device.shutdown().await?;

    let received = read_to_close(&mut client).await?;
    assert_eq!(received.len(), response.len());
    assert!(received == response);

    crate::support::wait_until("the spliced connection is counted as completed", || async {
        edge.metrics.splice_end_count(edgible_edge::metrics::SpliceEnd::Completed) == 1
    })
    .await?;
    let metrics = edge.scrape().await?;
    let to_client = sample(&metrics, "edgible_edge_bytes_total{direction=\"device_to_client\"}").unwrap();
    let to_device = sample(&metrics, "edgible_edge_bytes_total{direction=\"client_to_device\"}").unwrap();
    assert_eq!(to_client, response.len() as u64);
    assert_eq!(to_device, (hello::CURL.len() + 7) as u64);
    edge.stop().await
}

#[tokio::test]
async fn idle_connections_are_closed_and_active_ones_are_not() -> anyhow::Result<()> {
    let devices = Devices::bind(1, 0).await?;
    let mut config = test_config(devices.port);
    config.splice.idle_timeout = Duration::from_millis(1500);
    let edge = TestEdge::start(config, table(vec![route("app.example.test", 1, devices.address(0), true)])).await?;

    // A connection that keeps talking outlives the idle timeout several times over.
    let mut client = edge.connect().await?;
    client.write_all(hello::CURL).await?;
    let mut device = devices.accept(0).await?;
    read_header_and(&mut device, hello::CURL.len()).await?;
    for _ in 0..15 {
        client.write_all(b"x").await?;
        let mut byte = [0u8; 1];
        device.read_exact(&mut byte).await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    device.write_all(b"still here").await?;
    let mut answer = [0u8; 10];
    client.read_exact(&mut answer).await?;

    // Then silence: both sides are closed by the edge.
    let started = tokio::time::Instant::now();
    assert!(read_to_close(&mut client).await?.is_empty());
    assert!(read_to_close(&mut device).await?.is_empty());
    assert!(started.elapsed() >= Duration::from_millis(1300), "closed after {:?}", started.elapsed());
    crate::support::wait_until("the idle timeout is counted", || async {
        edge.metrics.splice_end_count(edgible_edge::metrics::SpliceEnd::IdleTimeout) == 1
    })
    .await?;
    assert_eq!(edge.metrics.spliced_active(), 0);
    edge.stop().await
}

#[tokio::test]
async fn a_route_change_applies_to_new_connections() -> anyhow::Result<()> {
    let devices = Devices::bind(2, 0).await?;
    let edge =
        TestEdge::start(test_config(devices.port), table(vec![route("app.example.test", 1, devices.address(0), true)]))
            .await?;

    let mut first = edge.connect().await?;
    first.write_all(hello::CURL).await?;
    let mut first_device = devices.accept(0).await?;
    read_header_and(&mut first_device, hello::CURL.len()).await?;

    // The placement moves to the second device.
    let changes = edge.routes.replace(table(vec![route("app.example.test", 2, devices.address(1), true)]));
    assert_eq!(changes.len(), 1);
    let mut second = edge.connect().await?;
    second.write_all(hello::CURL).await?;
    let mut second_device = devices.accept(1).await?;
    read_header_and(&mut second_device, hello::CURL.len()).await?;

    // The connection spliced before the change is undisturbed.
    first_device.write_all(b"ok").await?;
    let mut answer = [0u8; 2];
    first.read_exact(&mut answer).await?;
    assert_eq!(&answer, b"ok");
    edge.stop().await
}
