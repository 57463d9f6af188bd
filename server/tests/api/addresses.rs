//! Tunnel addresses: each device gets the lowest free /32 of its pool, never one another
//! device holds, even when many are created at once.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;

use anyhow::{Context, ensure};
use serde_json::json;

use crate::support::TestApp;

async fn pool(app: &TestApp, key: &str, name: &str, cidr: &str) -> anyhow::Result<String> {
    app.post("/v1/device-pools", key, json!({"name": name, "tunnel_cidr": cidr})).await?.expect(201)?.str("/id")
}

async fn device(app: &TestApp, key: &str, name: &str, pool: &str) -> anyhow::Result<(String, Ipv4Addr)> {
    let created = app.post("/v1/devices", key, json!({"name": name, "pool_id": pool})).await?.expect(201)?;
    Ok((created.str("/device/id")?, created.str("/device/status/tunnel_address")?.parse()?))
}

pub async fn concurrent_devices_get_distinct_addresses(url: String) -> anyhow::Result<()> {
    const DEVICES: usize = 50;
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let pool = pool(&app, &org.admin_key, "home", "100.96.0.0/24").await?;
    let mut tasks = Vec::new();
    for index in 0..DEVICES {
        let (app, key, pool) = (app.clone(), org.admin_key.clone(), pool.clone());
        tasks.push(tokio::spawn(async move { device(&app, &key, &format!("device-{index}"), &pool).await }));
    }
    let mut addresses = BTreeSet::new();
    for task in tasks {
        let (_, address) = task.await??;
        ensure!(addresses.insert(address), "{address} was handed out twice");
    }
    // The lowest addresses, without holes: .1 to .50.
    let expected: BTreeSet<Ipv4Addr> = (1..=DEVICES).map(|host| Ipv4Addr::new(100, 96, 0, host as u8)).collect();
    ensure!(addresses == expected, "addresses {addresses:?}");
    // What the API lists agrees with what creation answered.
    let listed = app.get("/v1/devices?limit=1000", &org.admin_key).await?.expect(200)?;
    let listed: BTreeSet<Ipv4Addr> = listed.body["items"]
        .as_array()
        .context("items")?
        .iter()
        .map(|device| device["status"]["tunnel_address"].as_str().context("address")?.parse().context("IPv4"))
        .collect::<anyhow::Result<_>>()?;
    ensure!(listed == expected, "listed {listed:?}");
    Ok(())
}

pub async fn addresses_are_released_and_reused(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let pool = pool(&app, key, "home", "10.20.0.0/24").await?;
    let mut devices = Vec::new();
    for index in 0..4 {
        devices.push(device(&app, key, &format!("d{index}"), &pool).await?);
    }
    ensure!(devices[3].1 == Ipv4Addr::new(10, 20, 0, 4), "{devices:?}");
    // Freeing .2 makes it the next address handed out, before .5.
    app.delete(&format!("/v1/devices/{}", devices[1].0), key).await?.expect(204)?;
    let (_, reused) = device(&app, key, "again", &pool).await?;
    ensure!(reused == Ipv4Addr::new(10, 20, 0, 2), "got {reused}");
    let (_, next) = device(&app, key, "next", &pool).await?;
    ensure!(next == Ipv4Addr::new(10, 20, 0, 5), "got {next}");
    // Pools allocate independently.
    let other = pool_in(&app, key).await?;
    let (_, first) = device(&app, key, "elsewhere", &other).await?;
    ensure!(first == Ipv4Addr::new(10, 30, 0, 1), "got {first}");
    Ok(())
}

async fn pool_in(app: &TestApp, key: &str) -> anyhow::Result<String> {
    pool(app, key, "office", "10.30.0.0/24").await
}

pub async fn exhausted_pools_refuse_devices(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    // A /30 holds two assignable addresses (.1 and .2).
    let pool = pool(&app, key, "tiny", "192.168.7.0/30").await?;
    let (first, _) = device(&app, key, "one", &pool).await?;
    device(&app, key, "two", &pool).await?;
    app.post("/v1/devices", key, json!({"name": "three", "pool_id": pool})).await?.expect_error(
        409,
        "conflict",
        Some("pool_id"),
    )?;
    // The refused device was not half-created.
    app.get("/v1/devices?name=three", key).await?.expect(200)?.ids()?.is_empty().then_some(()).context("ghost")?;
    app.delete(&format!("/v1/devices/{first}"), key).await?.expect(204)?;
    let (_, address) = device(&app, key, "three", &pool).await?;
    ensure!(address == Ipv4Addr::new(192, 168, 7, 1), "got {address}");
    Ok(())
}
