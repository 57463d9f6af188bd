//! Organizations never see, change or use each other's objects, and answers never reveal
//! that another organization's object exists.

use anyhow::ensure;
use serde_json::json;

use crate::support::{TestApp, application, fleet};

pub async fn other_organizations_objects_are_invisible(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let a = app.org("org-a").await?;
    let b = app.org("org-b").await?;
    let fleet_a = fleet(&app, &a, "web.a.example.com").await?;
    fleet(&app, &b, "web.b.example.com").await?;
    let placement = app
        .post(
            "/v1/placements",
            &a.admin_key,
            json!({"strategy": "serving-device", "application_id": fleet_a.application, "device_id": fleet_a.device}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    let member = app
        .post("/v1/members", &a.admin_key, json!({"email": "a@example.com", "role": "owner"}))
        .await?
        .expect(201)?
        .str("/id")?;
    let api_key = app
        .post("/v1/api-keys", &a.admin_key, json!({"name": "ci", "scopes": ["read"]}))
        .await?
        .expect(201)?
        .str("/api_key/id")?;

    // Every object of org A, with a valid update body for it.
    let objects = [
        ("organizations", a.id.clone(), json!({"name": "stolen"})),
        ("members", member, json!({"email": "a@example.com", "role": "member"})),
        ("api-keys", api_key, json!({"name": "stolen", "scopes": ["read"]})),
        ("device-pools", fleet_a.pool.clone(), json!({"name": "stolen", "tunnel_cidr": "100.96.0.0/24"})),
        ("devices", fleet_a.device.clone(), json!({"name": "stolen", "pool_id": fleet_a.pool})),
        ("applications", fleet_a.application.clone(), application("stolen", &["web.a.example.com"])),
        (
            "placements",
            placement,
            json!({"strategy": "serving-device", "application_id": fleet_a.application, "device_id": fleet_a.device}),
        ),
    ];
    for (collection, id, update) in &objects {
        let path = format!("/v1/{collection}/{id}");
        let before = app.get(&path, &a.admin_key).await?.expect(200)?;
        app.get(&path, &b.admin_key).await?.expect_error(404, "not_found", None)?;
        app.put(&path, &b.admin_key, update.clone()).await?.expect_error(404, "not_found", None)?;
        app.delete(&path, &b.admin_key).await?.expect_error(404, "not_found", None)?;
        let listed = app.get(&format!("/v1/{collection}"), &b.admin_key).await?.expect(200)?;
        ensure!(!listed.ids()?.contains(id), "org B lists org A's {collection}");
        let after = app.get(&path, &a.admin_key).await?.expect(200)?;
        ensure!(before.body == after.body, "org B changed org A's {collection}");
    }
    // A 404 for another organization's object reads exactly like one for no object at all.
    let missing = app.get("/v1/devices/00000000-0000-7000-8000-000000000000", &b.admin_key).await?;
    let foreign = app.get(&format!("/v1/devices/{}", fleet_a.device), &b.admin_key).await?;
    ensure!(missing.status == foreign.status && missing.body["error"]["code"] == foreign.body["error"]["code"]);
    // Even B's write key cannot delete A's organization.
    app.delete(&format!("/v1/organizations/{}", a.id), &b.admin_key).await?.expect_error(404, "not_found", None)?;
    Ok(())
}

pub async fn hostnames_are_unique_across_organizations(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let a = app.org("org-a").await?;
    let b = app.org("org-b").await?;
    app.post("/v1/applications", &a.admin_key, application("web", &["web.example.com", "*.apps.example.com"]))
        .await?
        .expect(201)?;

    // B cannot take A's name, a name under A's wildcard, or a wildcard over A's names.
    let refused = [
        (vec!["ok.example.org", "web.example.com"], "hostnames[1]"),
        (vec!["x.apps.example.com"], "hostnames[0]"),
        (vec!["*.apps.example.com"], "hostnames[0]"),
        (vec!["*.example.com"], "hostnames[0]"),
    ];
    for (hostnames, field) in refused {
        app.post("/v1/applications", &b.admin_key, application("web", &hostnames)).await?.expect_error(
            409,
            "conflict",
            Some(field),
        )?;
    }
    // Nor by updating an application of its own.
    let own =
        app.post("/v1/applications", &b.admin_key, application("web", &["web.example.org"])).await?.expect(201)?;
    app.put(
        &format!("/v1/applications/{}", own.str("/id")?),
        &b.admin_key,
        application("web", &["web.example.org", "web.example.com"]),
    )
    .await?
    .expect_error(409, "conflict", Some("hostnames[1]"))?;
    // Names next to A's, but not under its wildcard, are free.
    app.post("/v1/applications", &b.admin_key, application("deep", &["a.b.apps.example.com", "example.com"]))
        .await?
        .expect(201)?;
    // Inside one organization a hostname is still held by one application only, but a name
    // under its own wildcard is fine.
    app.post("/v1/applications", &a.admin_key, application("copy", &["web.example.com"])).await?.expect_error(
        409,
        "conflict",
        Some("hostnames[0]"),
    )?;
    app.post("/v1/applications", &a.admin_key, application("special", &["special.apps.example.com"]))
        .await?
        .expect(201)?;
    Ok(())
}

pub async fn references_to_other_organizations_are_refused(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let a = app.org("org-a").await?;
    let b = app.org("org-b").await?;
    let fleet_a = fleet(&app, &a, "web.a.example.com").await?;
    let fleet_b = fleet(&app, &b, "web.b.example.com").await?;

    // B cannot add a device to A's pool...
    app.post("/v1/devices", &b.admin_key, json!({"name": "intruder", "pool_id": fleet_a.pool})).await?.expect_error(
        422,
        "invalid",
        Some("pool_id"),
    )?;
    // ...place its application on A's device...
    app.post(
        "/v1/placements",
        &b.admin_key,
        json!({"strategy": "serving-device", "application_id": fleet_b.application, "device_id": fleet_a.device}),
    )
    .await?
    .expect_error(422, "invalid", Some("device_id"))?;
    // ...or place A's application anywhere.
    app.post(
        "/v1/placements",
        &b.admin_key,
        json!({"strategy": "serving-device", "application_id": fleet_a.application, "device_id": fleet_b.device}),
    )
    .await?
    .expect_error(422, "invalid", Some("application_id"))?;
    // Moving its own placement onto A's device is refused too.
    let placement = app
        .post(
            "/v1/placements",
            &b.admin_key,
            json!({"strategy": "serving-device", "application_id": fleet_b.application, "device_id": fleet_b.device}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    app.put(
        &format!("/v1/placements/{placement}"),
        &b.admin_key,
        json!({"strategy": "serving-device", "application_id": fleet_b.application, "device_id": fleet_a.device}),
    )
    .await?
    .expect_error(422, "invalid", Some("device_id"))?;
    Ok(())
}
