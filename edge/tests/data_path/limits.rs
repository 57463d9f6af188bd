//! The per-address and global caps on concurrent connections.

use std::net::Ipv4Addr;

use edgible_edge::limits::LimitsConfig;
use edgible_edge::metrics::Outcome;
use tokio::io::AsyncWriteExt as _;

use crate::support::{ALERT_UNRECOGNIZED_NAME, TestEdge, hello, read_to_close, sample, table, test_config, wait_until};

#[tokio::test]
async fn the_per_ip_cap_refuses_the_extra_connection_of_one_address_only() -> anyhow::Result<()> {
    let mut config = test_config(443);
    config.limits = LimitsConfig { max_connections: 100, max_connections_per_ip: 2 };
    let edge = TestEdge::start(config, table(vec![])).await?;
    let local = Ipv4Addr::LOCALHOST;

    // Two connections that have not sent their hello yet hold both slots of 127.0.0.1.
    let first = edge.connect_from(local).await?;
    let _second = edge.connect_from(local).await?;
    wait_until("both connections are admitted", || async { edge.limits.active_from(local.into()) == 2 }).await?;

    // The third is closed at once, without an alert.
    let mut third = edge.connect_from(local).await?;
    assert!(read_to_close(&mut third).await?.is_empty());
    assert_eq!(edge.metrics.outcome_count(Outcome::PerIpLimit), 1);

    // Another address is not affected.
    let mut other = edge.connect_from(Ipv4Addr::new(127, 0, 0, 2)).await?;
    other.write_all(hello::OPENSSL).await?;
    assert_eq!(read_to_close(&mut other).await?, ALERT_UNRECOGNIZED_NAME);

    // Once a slot is free, the address is admitted again.
    drop(first);
    wait_until("the closed connection frees its slot", || async { edge.limits.active_from(local.into()) == 1 }).await?;
    let mut again = edge.connect_from(local).await?;
    again.write_all(hello::OPENSSL).await?;
    assert_eq!(read_to_close(&mut again).await?, ALERT_UNRECOGNIZED_NAME);

    let metrics = edge.scrape().await?;
    assert_eq!(sample(&metrics, "edgible_edge_connections_total{outcome=\"limited\",reason=\"per_ip\"}"), Some(1));
    assert_eq!(sample(&metrics, "edgible_edge_connection_limit{scope=\"per_ip\"}"), Some(2));
    edge.stop().await
}

#[tokio::test]
async fn the_global_cap_applies_across_addresses() -> anyhow::Result<()> {
    let mut config = test_config(443);
    config.limits = LimitsConfig { max_connections: 2, max_connections_per_ip: 2 };
    let edge = TestEdge::start(config, table(vec![])).await?;

    let _a = edge.connect_from(Ipv4Addr::new(127, 0, 0, 1)).await?;
    let _b = edge.connect_from(Ipv4Addr::new(127, 0, 0, 2)).await?;
    wait_until("both connections are admitted", || async { edge.limits.active() == 2 }).await?;
    let metrics = edge.scrape().await?;
    assert_eq!(sample(&metrics, "edgible_edge_connections_active"), Some(2));

    let mut c = edge.connect_from(Ipv4Addr::new(127, 0, 0, 3)).await?;
    assert!(read_to_close(&mut c).await?.is_empty());
    assert_eq!(edge.metrics.outcome_count(Outcome::GlobalLimit), 1);
    edge.stop().await
}
