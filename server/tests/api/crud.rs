//! Create, read, list, update and delete of every collection, revisions and ETags, and the
//! rules that tie objects together (unique names, immutable fields, dependents).

use anyhow::{Context, ensure};
use axum::http::{Method, header};
use serde_json::{Value, json};

use crate::support::{Answer, TestApp, TestRequest, application, fleet};

/// Where the object sits in a creation answer (`/device` for devices, `` for plain objects).
pub(crate) struct Collection<'a> {
    pub(crate) path: &'a str,
    pub(crate) created_object: &'a str,
}

/// Runs the whole life of one object: create, get (with ETag), list (and by name), update
/// with the current revision, delete, and gone afterwards. Returns the updated object.
pub(crate) async fn life_cycle(
    app: &TestApp,
    key: &str,
    collection: Collection<'_>,
    create: Value,
    update: Value,
    name: Option<&str>,
) -> anyhow::Result<Value> {
    let path = collection.path;
    let created = app.post(path, key, create.clone()).await?.expect(201)?;
    let object = created.body.pointer(collection.created_object).cloned().context("created object")?;
    let id = object["id"].as_str().context("id")?.to_owned();
    let revision = object["revision"].as_u64().context("revision")?;
    ensure!(object["created_at"] == object["updated_at"], "a new object was never updated: {object}");

    let fetched = app.get(&format!("{path}/{id}"), key).await?.expect(200)?;
    ensure!(fetched.body == object, "GET answered {} after POST answered {object}", fetched.body);
    ensure!(etag(&fetched)? == format!("\"{revision}\""), "ETag of revision {revision}");

    let listed = app.get(path, key).await?.expect(200)?;
    ensure!(listed.ids()?.contains(&id), "{path} does not list {id}");
    if let Some(name) = name {
        let by_name = app.get(&format!("{path}?name={}", encode(name)), key).await?.expect(200)?;
        ensure!(by_name.ids()? == vec![id.clone()], "{path}?name={name} answered {}", by_name.text);
        let other = app.get(&format!("{path}?name=nobody-has-this-name"), key).await?.expect(200)?;
        ensure!(other.ids()?.is_empty(), "a name filter matched the wrong object");
    }

    let updated = app
        .send(
            TestRequest::new(Method::PUT, &format!("{path}/{id}"))
                .key(key)
                .header(header::IF_MATCH, &format!("\"{revision}\""))
                .json(&update),
        )
        .await?
        .expect(200)?;
    ensure!(updated.u64("/revision")? > revision, "an update must raise the revision: {}", updated.text);
    ensure!(updated.body["created_at"] == object["created_at"], "created_at changed on update");
    ensure!(updated.body["id"] == object["id"], "the id changed on update");
    ensure!(etag(&updated)? == format!("\"{}\"", updated.u64("/revision")?), "PUT answers the new ETag");
    let refetched = app.get(&format!("{path}/{id}"), key).await?.expect(200)?;
    ensure!(refetched.body == updated.body, "GET after PUT answered {}", refetched.text);

    let unchanged = app.put(&format!("{path}/{id}"), key, update).await?.expect(200)?;
    ensure!(unchanged.body == updated.body, "an update that changes nothing must not raise the revision");

    app.delete(&format!("{path}/{id}"), key).await?.expect(204)?;
    app.get(&format!("{path}/{id}"), key).await?.expect_error(404, "not_found", None)?;
    app.delete(&format!("{path}/{id}"), key).await?.expect_error(404, "not_found", None)?;
    let listed = app.get(path, key).await?.expect(200)?;
    ensure!(!listed.ids()?.contains(&id), "{path} still lists deleted {id}");
    Ok(updated.body)
}

fn etag(answer: &Answer) -> anyhow::Result<String> {
    Ok(answer.headers.get(header::ETAG).context("no ETag")?.to_str()?.to_owned())
}

/// Percent-encodes the few characters test names and e-mail addresses contain.
fn encode(text: &str) -> String {
    text.replace('@', "%40").replace('+', "%2B")
}

pub async fn crud_organizations(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let created = app.post("/v1/organizations", &app.platform_key, json!({"name": "acme"})).await?.expect(201)?;
    let id = created.str("/organization/id")?;
    let admin = created.str("/admin_key/secret")?;
    ensure!(created.body["admin_key"]["api_key"]["spec"]["scopes"] == json!(["admin"]), "{}", created.text);
    ensure!(created.body["admin_key"]["api_key"]["organization_id"] == id.as_str(), "the key belongs to the new org");

    let fetched = app.get(&format!("/v1/organizations/{id}"), &admin).await?.expect(200)?;
    ensure!(fetched.body == created.body["organization"], "GET answered {}", fetched.text);
    // A key lists only its own organization, even a platform key.
    let own = app.get("/v1/organizations", &admin).await?.expect(200)?;
    ensure!(own.ids()? == vec![id.clone()], "listing: {}", own.text);
    let platform_list = app.get("/v1/organizations", &app.platform_key).await?.expect(200)?;
    ensure!(!platform_list.ids()?.contains(&id), "the platform key listed another organization");
    let by_name = app.get("/v1/organizations?name=acme", &admin).await?.expect(200)?;
    ensure!(by_name.ids()? == vec![id.clone()], "by name: {}", by_name.text);

    let revision = fetched.u64("/revision")?;
    let renamed = app
        .send(
            TestRequest::new(Method::PUT, &format!("/v1/organizations/{id}"))
                .key(&admin)
                .header(header::IF_MATCH, &format!("\"{revision}\""))
                .json(&json!({"name": "acme-corp"})),
        )
        .await?
        .expect(200)?;
    ensure!(renamed.body["spec"]["name"] == "acme-corp" && renamed.u64("/revision")? > revision, "{}", renamed.text);

    // Organization names are unique across the server.
    app.post("/v1/organizations", &app.platform_key, json!({"name": "acme-corp"})).await?.expect_error(
        409,
        "conflict",
        Some("name"),
    )?;

    // Only a platform key deletes organizations.
    app.delete(&format!("/v1/organizations/{id}"), &admin).await?.expect_error(403, "forbidden", None)?;
    app.delete(&format!("/v1/organizations/{id}"), &app.platform_key).await?.expect(204)?;
    app.get(&format!("/v1/organizations/{id}"), &app.platform_key).await?.expect_error(404, "not_found", None)?;
    // Its keys went with it.
    app.get("/v1/whoami", &admin).await?.expect_error(401, "unauthorized", None)?;
    Ok(())
}

pub async fn crud_members(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let member = life_cycle(
        &app,
        &org.admin_key,
        Collection { path: "/v1/members", created_object: "" },
        json!({"email": "ada@example.com", "role": "member"}),
        json!({"email": "ada@example.com", "role": "admin", "display_name": "Ada"}),
        Some("ada@example.com"),
    )
    .await?;
    ensure!(member["spec"]["role"] == "admin" && member["spec"]["display_name"] == "Ada", "{member}");
    ensure!(member["user_id"].is_string(), "members name their user: {member}");
    Ok(())
}

pub async fn crud_api_keys(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let created =
        app.post("/v1/api-keys", &org.admin_key, json!({"name": "ci", "scopes": ["write"]})).await?.expect(201)?;
    let secret = created.str("/secret")?;
    let prefix = created.str("/api_key/prefix")?;
    ensure!(secret.starts_with(&prefix) && secret.len() > prefix.len() + 16, "prefix {prefix} of secret");
    // The new key works and the secret is never shown again.
    app.get("/v1/whoami", &secret).await?.expect(200)?;
    let listed = app.get("/v1/api-keys", &org.admin_key).await?.expect(200)?;
    ensure!(!listed.text.contains(&secret), "a listing showed a secret");
    let id = created.str("/api_key/id")?;
    app.delete(&format!("/v1/api-keys/{id}"), &org.admin_key).await?.expect(204)?;
    app.get("/v1/whoami", &secret).await?.expect_error(401, "unauthorized", None)?;

    let key = life_cycle(
        &app,
        &org.admin_key,
        Collection { path: "/v1/api-keys", created_object: "/api_key" },
        json!({"name": "deploy", "scopes": ["read"]}),
        json!({"name": "deploy-2", "scopes": ["read", "write"], "expires_at": "2999-01-01T00:00:00Z"}),
        Some("deploy"),
    )
    .await?;
    ensure!(key["spec"]["scopes"] == json!(["read", "write"]), "{key}");
    ensure!(key["spec"]["expires_at"] == "2999-01-01T00:00:00Z", "{key}");
    Ok(())
}

pub async fn crud_device_pools(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let pool = life_cycle(
        &app,
        &org.admin_key,
        Collection { path: "/v1/device-pools", created_object: "" },
        json!({"name": "home", "tunnel_cidr": "100.96.0.0/16"}),
        json!({"name": "house", "tunnel_cidr": "100.96.0.0/16", "region": "eu-west"}),
        Some("home"),
    )
    .await?;
    ensure!(pool["spec"]["kind"] == "devices" && pool["spec"]["region"] == "eu-west", "{pool}");
    Ok(())
}

pub async fn crud_devices(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let pool = app
        .post("/v1/device-pools", &org.admin_key, json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"}))
        .await?
        .expect(201)?
        .str("/id")?;
    let created =
        app.post("/v1/devices", &org.admin_key, json!({"name": "probe", "pool_id": pool})).await?.expect(201)?;
    ensure!(created.str("/enrollment_token")?.len() > 20, "an enrollment token is answered once");
    ensure!(created.body["enrollment_expires_at"].is_string(), "{}", created.text);
    ensure!(created.body["device"]["status"]["state"] == "pending", "{}", created.text);
    ensure!(created.body["device"]["status"]["tunnel_address"] == "100.96.0.1", "{}", created.text);
    let fetched = app.get(&format!("/v1/devices/{}", created.str("/device/id")?), &org.admin_key).await?.expect(200)?;
    ensure!(!fetched.text.contains(&created.str("/enrollment_token")?), "the token is shown only at creation");

    let device = life_cycle(
        &app,
        &org.admin_key,
        Collection { path: "/v1/devices", created_object: "/device" },
        json!({"name": "laptop", "pool_id": pool}),
        json!({"name": "laptop-2", "pool_id": pool, "labels": {"room": "attic"}}),
        Some("laptop"),
    )
    .await?;
    ensure!(device["spec"]["labels"] == json!({"room": "attic"}), "{device}");
    ensure!(device["status"]["tunnel_address"] == "100.96.0.2", "{device}");
    Ok(())
}

pub async fn crud_applications(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let mut update = application("web", &["www.example.com", "*.apps.example.com"]);
    update["access"] = json!({"short_code": {}});
    update["health_check"] = json!({"protocol": "http", "path": "/healthz"});
    let updated = life_cycle(
        &app,
        &org.admin_key,
        Collection { path: "/v1/applications", created_object: "" },
        application("web", &["web.example.com"]),
        update,
        Some("web"),
    )
    .await?;
    ensure!(updated["spec"]["hostnames"] == json!(["www.example.com", "*.apps.example.com"]), "{updated}");
    // The generated short code is not part of the spec (see `access.rs`); the spec reads back
    // as it was written.
    ensure!(updated["spec"]["access"] == json!({"short_code": {}}), "{updated}");
    // Hostnames of a deleted application are free again.
    app.post("/v1/applications", &org.admin_key, application("again", &["www.example.com"])).await?.expect(201)?;
    Ok(())
}

pub async fn crud_placements(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let fleet = fleet(&app, &org, "web.example.com").await?;
    let cloud_pool = app
        .post(
            "/v1/device-pools",
            &org.admin_key,
            json!({"name": "cloud", "tunnel_cidr": "100.97.0.0/24", "kind": "cloud", "region": "eu-west"}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    // The device can change in place (the strategy too: see `cloud.rs`, which has cloud hosts).
    // With no agent connected this is a plain move; between online devices it is a migration
    // (`migrations.rs`).
    let tablet = app
        .post("/v1/devices", &org.admin_key, json!({"name": "tablet", "pool_id": fleet.pool}))
        .await?
        .expect(201)?
        .str("/device/id")?;
    let placement = life_cycle(
        &app,
        &org.admin_key,
        Collection { path: "/v1/placements", created_object: "" },
        json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": fleet.device}),
        json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": tablet}),
        None,
    )
    .await?;
    ensure!(placement["spec"]["device_id"] == tablet.as_str() && placement["host"] == tablet.as_str(), "{placement}");
    // A cloud placement needs a cloud pool of an operator organization, which this is not.
    app.post(
        "/v1/placements",
        &org.admin_key,
        json!({"strategy": "cloud", "application_id": fleet.application, "pool_id": cloud_pool}),
    )
    .await?
    .expect_error(422, "invalid", Some("pool_id"))?;

    let second_device = app
        .post("/v1/devices", &org.admin_key, json!({"name": "desktop", "pool_id": fleet.pool}))
        .await?
        .expect(201)?
        .str("/device/id")?;
    let id = app
        .post(
            "/v1/placements",
            &org.admin_key,
            json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": fleet.device}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    let moved = app
        .put(
            &format!("/v1/placements/{id}"),
            &org.admin_key,
            json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": second_device}),
        )
        .await?
        .expect(200)?;
    ensure!(moved.str("/id")? == id && moved.str("/spec/device_id")? == second_device, "{}", moved.text);
    // One placement per application.
    app.post(
        "/v1/placements",
        &org.admin_key,
        json!({"strategy": "cloud", "application_id": fleet.application, "region": "eu-west"}),
    )
    .await?
    .expect_error(409, "conflict", Some("application_id"))?;
    Ok(())
}

pub async fn stale_revisions_are_refused(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let fleet = fleet(&app, &org, "web.example.com").await?;
    let placement = app
        .post(
            "/v1/placements",
            key,
            json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": fleet.device}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    let second_device = app
        .post("/v1/devices", key, json!({"name": "desktop", "pool_id": fleet.pool}))
        .await?
        .expect(201)?
        .str("/device/id")?;
    let member = app.post("/v1/members", key, json!({"email": "a@example.com", "role": "owner"})).await?.expect(201)?;
    let api_key = app.post("/v1/api-keys", key, json!({"name": "ci", "scopes": ["read"]})).await?.expect(201)?;
    let cases = [
        (format!("/v1/organizations/{}", org.id), json!({"name": "acme-2"})),
        (
            format!("/v1/members/{}", member.str("/id")?),
            json!({"email": "a@example.com", "role": "owner", "display_name": "A"}),
        ),
        (format!("/v1/api-keys/{}", api_key.str("/api_key/id")?), json!({"name": "ci-2", "scopes": ["read"]})),
        (format!("/v1/device-pools/{}", fleet.pool), json!({"name": "home-2", "tunnel_cidr": "100.96.0.0/24"})),
        (format!("/v1/devices/{}", fleet.device), json!({"name": "laptop-2", "pool_id": fleet.pool})),
        (format!("/v1/applications/{}", fleet.application), application("web-2", &["web.example.com"])),
        (
            format!("/v1/placements/{placement}"),
            json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": second_device}),
        ),
    ];
    for (path, update) in cases {
        let current = app.get(&path, key).await?.expect(200)?;
        let revision = current.u64("/revision")?;
        // Someone else writes first...
        app.put(&path, key, update.clone()).await?.expect(200)?;
        // ...so an update based on the old revision is refused and changes nothing.
        let mut stale = update;
        if let Some(name) = stale.get_mut("name") {
            *name = json!("stale-name");
        }
        for if_match in [format!("\"{revision}\""), format!("W/\"{revision}\"")] {
            app.send(TestRequest::new(Method::PUT, &path).key(key).header(header::IF_MATCH, &if_match).json(&stale))
                .await?
                .expect_error(409, "stale_revision", None)?;
        }
        let after = app.get(&path, key).await?.expect(200)?;
        ensure!(after.body["spec"]["name"] != "stale-name", "{path}: a stale update was applied");
        let fresh = etag(&after)?;
        app.send(TestRequest::new(Method::PUT, &path).key(key).header(header::IF_MATCH, &fresh).json(&stale))
            .await?
            .expect(200)?;
        app.send(TestRequest::new(Method::PUT, &path).key(key).header(header::IF_MATCH, "seven").json(&stale))
            .await?
            .expect_error(400, "bad_request", None)?;
    }
    Ok(())
}

pub async fn names_are_unique_per_organization(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let acme = app.org("acme").await?;
    let other = app.org("other").await?;
    for org in [&acme, &other] {
        fleet(&app, org, &format!("web.{}.example.com", org.name)).await?;
        app.post("/v1/api-keys", &org.admin_key, json!({"name": "ci", "scopes": ["read"]})).await?.expect(201)?;
    }
    let key = &acme.admin_key;
    let pool = app.get("/v1/device-pools?name=home", key).await?.expect(200)?.str("/items/0/id")?;
    let taken = [
        ("/v1/device-pools", json!({"name": "home", "tunnel_cidr": "100.100.0.0/24"})),
        ("/v1/devices", json!({"name": "laptop", "pool_id": pool})),
        ("/v1/applications", application("web", &["other.example.com"])),
        ("/v1/api-keys", json!({"name": "ci", "scopes": ["read"]})),
    ];
    for (path, body) in taken {
        app.post(path, key, body).await?.expect_error(409, "conflict", Some("name"))?;
    }
    // Renaming onto a taken name is refused too.
    let second = app
        .post("/v1/device-pools", key, json!({"name": "office", "tunnel_cidr": "100.101.0.0/24"}))
        .await?
        .expect(201)?
        .str("/id")?;
    app.put(&format!("/v1/device-pools/{second}"), key, json!({"name": "home", "tunnel_cidr": "100.101.0.0/24"}))
        .await?
        .expect_error(409, "conflict", Some("name"))?;
    Ok(())
}

pub async fn immutable_fields_are_refused(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let fleet = fleet(&app, &org, "web.example.com").await?;
    let other_pool = app
        .post("/v1/device-pools", key, json!({"name": "office", "tunnel_cidr": "100.101.0.0/24"}))
        .await?
        .expect(201)?
        .str("/id")?;
    let other_application =
        app.post("/v1/applications", key, application("api", &["api.example.com"])).await?.expect(201)?.str("/id")?;
    let placement = app
        .post(
            "/v1/placements",
            key,
            json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": fleet.device}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    let member = app
        .post("/v1/members", key, json!({"email": "a@example.com", "role": "owner"}))
        .await?
        .expect(201)?
        .str("/id")?;

    let refused = [
        (
            format!("/v1/device-pools/{}", fleet.pool),
            json!({"name": "home", "tunnel_cidr": "100.96.1.0/24"}),
            "tunnel_cidr",
        ),
        (
            format!("/v1/device-pools/{}", fleet.pool),
            json!({"name": "home", "tunnel_cidr": "100.96.0.0/24", "kind": "cloud", "region": "eu-west"}),
            "kind",
        ),
        (format!("/v1/devices/{}", fleet.device), json!({"name": "laptop", "pool_id": other_pool}), "pool_id"),
        (
            format!("/v1/placements/{placement}"),
            json!({"strategy": "serving-device", "application_id": other_application, "device_id": fleet.device}),
            "application_id",
        ),
        (format!("/v1/members/{member}"), json!({"email": "b@example.com", "role": "owner"}), "email"),
    ];
    for (path, body, field) in refused {
        let before = app.get(&path, key).await?.expect(200)?;
        app.put(&path, key, body).await?.expect_error(422, "invalid", Some(field))?;
        let after = app.get(&path, key).await?.expect(200)?;
        ensure!(before.body == after.body, "{path}: a refused update changed the object");
    }
    Ok(())
}

pub async fn dependents_block_deletes(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let fleet = fleet(&app, &org, "web.example.com").await?;
    let placement = app
        .post(
            "/v1/placements",
            key,
            json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": fleet.device}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    app.delete(&format!("/v1/device-pools/{}", fleet.pool), key).await?.expect_error(409, "conflict", None)?;
    app.delete(&format!("/v1/devices/{}", fleet.device), key).await?.expect_error(409, "conflict", None)?;
    app.delete(&format!("/v1/placements/{placement}"), key).await?.expect(204)?;
    app.delete(&format!("/v1/devices/{}", fleet.device), key).await?.expect(204)?;
    app.delete(&format!("/v1/device-pools/{}", fleet.pool), key).await?.expect(204)?;
    Ok(())
}

pub async fn deleting_an_application_deletes_its_placement(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let fleet = fleet(&app, &org, "web.example.com").await?;
    let placement = app
        .post(
            "/v1/placements",
            key,
            json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": fleet.device}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    app.delete(&format!("/v1/applications/{}", fleet.application), key).await?.expect(204)?;
    app.get(&format!("/v1/placements/{placement}"), key).await?.expect_error(404, "not_found", None)?;
    // With the placement gone, the device can go too.
    app.delete(&format!("/v1/devices/{}", fleet.device), key).await?.expect(204)?;
    Ok(())
}

pub async fn deleting_an_organization_deletes_everything(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let fleet = fleet(&app, &org, "web.example.com").await?;
    app.post(
        "/v1/placements",
        key,
        json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": fleet.device}),
    )
    .await?
    .expect(201)?;
    app.post("/v1/members", key, json!({"email": "a@example.com", "role": "owner"})).await?.expect(201)?;
    app.delete(&format!("/v1/organizations/{}", org.id), &app.platform_key).await?.expect(204)?;
    app.get("/v1/devices", key).await?.expect_error(401, "unauthorized", None)?;
    // Its names and hostnames are free for others.
    let again = app.org("acme").await?;
    crate::support::fleet(&app, &again, "web.example.com").await?;
    Ok(())
}

pub async fn members_reuse_users_and_keep_an_owner(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let acme = app.org("acme").await?;
    let other = app.org("other").await?;
    let first = app
        .post("/v1/members", &acme.admin_key, json!({"email": "ada@example.com", "role": "owner"}))
        .await?
        .expect(201)?;
    let second = app
        .post("/v1/members", &other.admin_key, json!({"email": "ada@example.com", "role": "member"}))
        .await?
        .expect(201)?;
    ensure!(first.body["user_id"] == second.body["user_id"], "one user per e-mail address");
    ensure!(first.body["id"] != second.body["id"], "one membership per organization");
    app.post("/v1/members", &acme.admin_key, json!({"email": "ada@example.com", "role": "admin"}))
        .await?
        .expect_error(409, "conflict", Some("email"))?;

    // The last owner can be neither demoted nor removed.
    let owner = first.str("/id")?;
    app.put(&format!("/v1/members/{owner}"), &acme.admin_key, json!({"email": "ada@example.com", "role": "member"}))
        .await?
        .expect_error(409, "conflict", Some("role"))?;
    app.delete(&format!("/v1/members/{owner}"), &acme.admin_key).await?.expect_error(409, "conflict", None)?;
    let second_owner = app
        .post("/v1/members", &acme.admin_key, json!({"email": "bob@example.com", "role": "owner"}))
        .await?
        .expect(201)?
        .str("/id")?;
    app.delete(&format!("/v1/members/{owner}"), &acme.admin_key).await?.expect(204)?;
    app.delete(&format!("/v1/members/{second_owner}"), &acme.admin_key).await?.expect_error(409, "conflict", None)?;
    // The other organization's membership of the same user is untouched.
    app.get(&format!("/v1/members/{}", second.str("/id")?), &other.admin_key).await?.expect(200)?;
    Ok(())
}
