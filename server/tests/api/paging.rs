//! Listings come in pages, in creation order, and walking the cursors visits every object
//! exactly once.

use std::collections::BTreeSet;

use anyhow::ensure;
use serde_json::json;

use crate::support::TestApp;

pub async fn paging_walks_every_object_once(url: String) -> anyhow::Result<()> {
    const POOLS: usize = 23;
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let mut created = Vec::new();
    for index in 0..POOLS {
        let body = json!({"name": format!("pool-{index}"), "tunnel_cidr": format!("10.{index}.0.0/16")});
        created.push(app.post("/v1/device-pools", &org.admin_key, body).await?.expect(201)?.str("/id")?);
    }
    for limit in [1, 5, 7, 23, 100] {
        let walked = app.list_ids("device-pools", &org.admin_key, limit).await?;
        ensure!(walked == created, "limit {limit}: walked {walked:?}");
    }
    // The default page holds them all; a full last page has no cursor.
    let all = app.get("/v1/device-pools", &org.admin_key).await?.expect(200)?;
    ensure!(all.ids()? == created && all.body.get("next_cursor").is_none(), "{}", all.text);
    let exact = app.get("/v1/device-pools?limit=23", &org.admin_key).await?.expect(200)?;
    ensure!(exact.body.get("next_cursor").is_none(), "a page that holds the rest has no cursor");

    // Deleting objects between pages neither repeats nor skips the others.
    let first = app.get("/v1/device-pools?limit=10", &org.admin_key).await?.expect(200)?;
    let cursor = first.str("/next_cursor")?;
    for id in &created[8..12] {
        app.delete(&format!("/v1/device-pools/{id}"), &org.admin_key).await?.expect(204)?;
    }
    let rest = app.get(&format!("/v1/device-pools?limit=1000&cursor={cursor}"), &org.admin_key).await?.expect(200)?;
    let expected: Vec<String> = created[12..].to_vec();
    ensure!(rest.ids()? == expected, "after deletes: {}", rest.text);

    // The name filter pages too.
    let named = app.get("/v1/device-pools?name=pool-20&limit=1", &org.admin_key).await?.expect(200)?;
    ensure!(named.ids()? == vec![created[20].clone()], "{}", named.text);

    // Another organization's listing is empty, and stays empty with org A's cursor.
    let other = app.org("other").await?;
    let foreign = app.get(&format!("/v1/device-pools?cursor={}", created[0]), &other.admin_key).await?.expect(200)?;
    ensure!(foreign.ids()?.is_empty(), "{}", foreign.text);
    let unique: BTreeSet<_> = created.iter().collect();
    ensure!(unique.len() == POOLS);
    Ok(())
}

pub async fn bad_paging_parameters_are_refused(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    for collection in ["organizations", "members", "api-keys", "device-pools", "devices", "applications", "placements"]
    {
        for (query, field) in [
            ("limit=0", Some("limit")),
            ("limit=1001", Some("limit")),
            ("limit=ten", None),
            ("limit=-1", None),
            ("cursor=not-a-cursor", Some("cursor")),
            ("sort=name", None),
        ] {
            app.get(&format!("/v1/{collection}?{query}"), &org.admin_key).await?.expect_error(
                400,
                "bad_request",
                field,
            )?;
        }
        app.get(&format!("/v1/{collection}?limit=1000"), &org.admin_key).await?.expect(200)?;
    }
    Ok(())
}
