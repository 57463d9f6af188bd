//! Bad requests of every kind: invalid values (422 naming the field), malformed requests
//! (400, 413, 415), missing or bad keys (401) and missing scopes (403).

use anyhow::ensure;
use axum::http::{Method, header};
use serde_json::{Value, json};

use crate::support::{TestApp, TestRequest, application, fleet};

pub async fn invalid_values_name_the_field(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let fleet = fleet(&app, &org, "web.example.com").await?;
    let mut bad_hostname = application("web2", &["ok.example.com", "Bad_Host.example.com"]);
    let mut bad_port = application("web3", &["p.example.com"]);
    bad_port["port"] = json!(0);
    let mut bad_env = application("web4", &["e.example.com"]);
    bad_env["workload"] = json!({"process": {"command": "/bin/x", "env": {"1BAD": "v"}}});
    let mut unknown_nested = application("web5", &["u.example.com"]);
    unknown_nested["workload"] = json!({"process": {"command": "/bin/x", "colour": "red"}});
    let device = &fleet.device;
    let app_id = &fleet.application;

    // (path, body, field) for POST; the same bodies are sent as PUT to an existing object.
    let cases: Vec<(&str, String, Value, Option<&str>)> = vec![
        ("/v1/organizations", format!("/v1/organizations/{}", org.id), json!({"name": "Not A Name"}), Some("name")),
        ("/v1/organizations", format!("/v1/organizations/{}", org.id), json!({"name": "acme", "extra": 1}), None),
        ("/v1/members", String::new(), json!({"email": "not-an-address", "role": "member"}), Some("email")),
        ("/v1/members", String::new(), json!({"email": "a@example.com", "role": "king"}), Some("role")),
        ("/v1/api-keys", String::new(), json!({"name": "k", "scopes": []}), Some("scopes")),
        ("/v1/api-keys", String::new(), json!({"name": "-k", "scopes": ["read"]}), Some("name")),
        (
            "/v1/api-keys",
            String::new(),
            json!({"name": "k", "scopes": ["read"], "expires_at": "soon"}),
            Some("expires_at"),
        ),
        (
            "/v1/device-pools",
            format!("/v1/device-pools/{}", fleet.pool),
            json!({"name": "home", "tunnel_cidr": "100.96.0.1/24"}),
            Some("tunnel_cidr"),
        ),
        ("/v1/device-pools", String::new(), json!({"name": "p", "tunnel_cidr": "fd00::/64"}), Some("tunnel_cidr")),
        ("/v1/device-pools", String::new(), json!({"name": "p", "tunnel_cidr": "10.0.0.0/31"}), Some("tunnel_cidr")),
        (
            "/v1/device-pools",
            String::new(),
            json!({"name": "p", "tunnel_cidr": "10.0.0.0/8", "kind": "cloud"}),
            Some("region"),
        ),
        ("/v1/device-pools", String::new(), json!({"name": "Home", "tunnel_cidr": "10.0.0.0/8"}), Some("name")),
        (
            "/v1/devices",
            format!("/v1/devices/{device}"),
            json!({"name": "laptop", "pool_id": fleet.pool, "labels": {"room": "x".repeat(300)}}),
            Some("labels.room"),
        ),
        ("/v1/devices", String::new(), json!({"name": "d", "pool_id": "not-an-id"}), Some("pool_id")),
        ("/v1/devices", String::new(), json!({"name": "d_1", "pool_id": fleet.pool}), Some("name")),
        ("/v1/applications", format!("/v1/applications/{app_id}"), bad_hostname.take(), Some("hostnames[1]")),
        ("/v1/applications", String::new(), bad_port.take(), Some("port")),
        ("/v1/applications", String::new(), bad_env.take(), Some("workload.process.env.1BAD")),
        ("/v1/applications", String::new(), unknown_nested.take(), None),
        ("/v1/placements", String::new(), json!({"strategy": "cloud", "application_id": app_id}), Some("pool_id")),
        ("/v1/placements", String::new(), json!({"strategy": "moon", "application_id": app_id}), None),
    ];
    for (collection, item, body, field) in cases {
        let answer = app.post(collection, key, body.clone()).await?.expect_error(422, "invalid", field)?;
        if field.is_none() {
            ensure!(answer.text.contains("unknown") || answer.text.contains("variant"), "{}", answer.text);
        }
        if !item.is_empty() {
            app.put(&item, key, body).await?.expect_error(422, "invalid", field)?;
        }
    }
    let answer = app
        .post(
            "/v1/placements",
            key,
            json!({"strategy": "serving-device", "application_id": app_id, "device_id": "nope"}),
        )
        .await?
        .expect_error(422, "invalid", Some("device_id"))?;
    ensure!(answer.text.contains("UUID"), "{}", answer.text);

    // Nothing was created by any refused request.
    let applications = app.get("/v1/applications", key).await?.expect(200)?;
    ensure!(applications.ids()? == vec![fleet.application.clone()], "{}", applications.text);
    Ok(())
}

pub async fn malformed_requests_are_refused(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let key = &org.admin_key;
    let fleet = fleet(&app, &org, "web.example.com").await?;
    let writes = [
        (Method::POST, "/v1/organizations".to_owned()),
        (Method::PUT, format!("/v1/organizations/{}", org.id)),
        (Method::POST, "/v1/members".to_owned()),
        (Method::POST, "/v1/api-keys".to_owned()),
        (Method::POST, "/v1/device-pools".to_owned()),
        (Method::PUT, format!("/v1/device-pools/{}", fleet.pool)),
        (Method::POST, "/v1/devices".to_owned()),
        (Method::PUT, format!("/v1/devices/{}", fleet.device)),
        (Method::POST, "/v1/applications".to_owned()),
        (Method::PUT, format!("/v1/applications/{}", fleet.application)),
        (Method::POST, "/v1/placements".to_owned()),
    ];
    for (method, path) in &writes {
        // Organizations are created with the platform key; everything else with org's admin.
        let key = if path == "/v1/organizations" { &app.platform_key } else { key };
        let send = |content_type: &str, body: &[u8]| {
            app.send(TestRequest::new(method.clone(), path).key(key).raw(content_type, body.to_vec()))
        };
        send("application/json", b"{\"name\": ").await?.expect_error(400, "bad_request", None)?;
        send("application/json", b"{\"name\": \"x\"} trailing").await?.expect_error(400, "bad_request", None)?;
        send("application/json", b"").await?.expect_error(400, "bad_request", None)?;
        send("text/plain", b"{\"name\": \"x\"}").await?.expect_error(415, "unsupported_media_type", None)?;
        app.send(TestRequest::new(method.clone(), path).key(key)).await?.expect_error(
            415,
            "unsupported_media_type",
            None,
        )?;
        let huge = format!("{{\"name\": \"{}\"}}", "a".repeat(2 * 1024 * 1024));
        send("application/json", huge.as_bytes()).await?.expect_error(413, "payload_too_large", None)?;
        // Valid JSON of the wrong shape is an invalid value, not a malformed request.
        send("application/json", b"[]").await?.expect_error(422, "invalid", None)?;
    }

    // Unknown query parameters, malformed ids and unknown routes.
    app.get(&format!("/v1/devices/{}?verbose=1", fleet.device), key).await?.expect_error(400, "bad_request", None)?;
    app.delete(&format!("/v1/devices/{}?force=1", fleet.device), key).await?.expect_error(400, "bad_request", None)?;
    app.get("/v1/whoami?x=1", key).await?.expect_error(400, "bad_request", None)?;
    for collection in ["organizations", "members", "api-keys", "device-pools", "devices", "applications", "placements"]
    {
        app.get(&format!("/v1/{collection}/not-an-id"), key).await?.expect_error(400, "bad_request", None)?;
    }
    app.get("/v1/nothing-here", key).await?.expect_error(404, "not_found", None)?;
    app.send(TestRequest::new(Method::PATCH, "/v1/devices").key(key)).await?.expect_error(
        405,
        "method_not_allowed",
        None,
    )?;
    Ok(())
}

pub async fn keys_must_be_valid(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let expired = app
        .post(
            "/v1/api-keys",
            &org.admin_key,
            json!({"name": "old", "scopes": ["read"], "expires_at": "2020-01-01T00:00:00Z"}),
        )
        .await?
        .expect(201)?
        .str("/secret")?;
    let paths = [
        "/v1/whoami",
        "/v1/organizations",
        "/v1/members",
        "/v1/api-keys",
        "/v1/device-pools",
        "/v1/devices",
        "/v1/applications",
        "/v1/placements",
    ];
    for path in paths {
        let missing = app.send(TestRequest::new(Method::GET, path)).await?.expect_error(401, "unauthorized", None)?;
        ensure!(missing.headers.get(header::WWW_AUTHENTICATE).is_some_and(|v| v == "Bearer"), "{path}: no challenge");
        app.get(path, "edg_not-a-real-key").await?.expect_error(401, "unauthorized", None)?;
        app.get(path, &expired).await?.expect_error(401, "unauthorized", None)?;
        app.send(
            TestRequest::new(Method::GET, path).header(header::AUTHORIZATION, &format!("Basic {}", org.admin_key)),
        )
        .await?
        .expect_error(401, "unauthorized", None)?;
        // Writes are refused before their body is even looked at.
        if path != "/v1/whoami" {
            app.send(TestRequest::new(Method::POST, path).raw("application/json", b"{".to_vec())).await?.expect_error(
                401,
                "unauthorized",
                None,
            )?;
        }
        app.get(path, &org.admin_key).await?.expect(200)?;
    }
    Ok(())
}

pub async fn scopes_are_enforced(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let fleet = fleet(&app, &org, "web.example.com").await?;
    let read = app.key(&org, "reader", &["read"]).await?;
    let write = app.key(&org, "writer", &["write"]).await?;
    let member = app
        .post("/v1/members", &org.admin_key, json!({"email": "a@example.com", "role": "owner"}))
        .await?
        .expect(201)?
        .str("/id")?;
    let api_key = app
        .post("/v1/api-keys", &org.admin_key, json!({"name": "spare", "scopes": ["read"]}))
        .await?
        .expect(201)?
        .str("/api_key/id")?;

    // (collection, id, create body, update body, scope needed to write)
    let objects = [
        (
            "members",
            member,
            json!({"email": "b@example.com", "role": "member"}),
            json!({"email": "a@example.com", "role": "owner"}),
            "admin",
        ),
        (
            "api-keys",
            api_key,
            json!({"name": "k", "scopes": ["read"]}),
            json!({"name": "spare", "scopes": ["read"]}),
            "admin",
        ),
        (
            "device-pools",
            fleet.pool.clone(),
            json!({"name": "p", "tunnel_cidr": "10.0.0.0/24"}),
            json!({"name": "home", "tunnel_cidr": "100.96.0.0/24"}),
            "write",
        ),
        (
            "devices",
            fleet.device.clone(),
            json!({"name": "d", "pool_id": fleet.pool}),
            json!({"name": "laptop", "pool_id": fleet.pool}),
            "write",
        ),
        (
            "applications",
            fleet.application.clone(),
            application("a", &["a.example.com"]),
            application("web", &["web.example.com"]),
            "write",
        ),
    ];
    for (collection, id, create, update, needed) in &objects {
        let path = format!("/v1/{collection}/{id}");
        app.get(&path, &read).await?.expect(200)?;
        app.get(&format!("/v1/{collection}"), &read).await?.expect(200)?;
        let mut weak = vec![&read];
        if *needed == "admin" {
            weak.push(&write);
        }
        for key in weak {
            app.post(&format!("/v1/{collection}"), key, create.clone()).await?.expect_error(403, "forbidden", None)?;
            app.put(&path, key, update.clone()).await?.expect_error(403, "forbidden", None)?;
            app.delete(&path, key).await?.expect_error(403, "forbidden", None)?;
        }
        if *needed == "write" {
            app.put(&path, &write, update.clone()).await?.expect(200)?;
        }
    }
    app.post(
        "/v1/placements",
        &read,
        json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": fleet.device}),
    )
    .await?
    .expect_error(403, "forbidden", None)?;
    app.post(
        "/v1/placements",
        &write,
        json!({"strategy": "serving-device", "application_id": fleet.application, "device_id": fleet.device}),
    )
    .await?
    .expect(201)?;

    // Organizations: renaming needs admin, creating and deleting need platform.
    app.put(&format!("/v1/organizations/{}", org.id), &write, json!({"name": "renamed"})).await?.expect_error(
        403,
        "forbidden",
        None,
    )?;
    app.post("/v1/organizations", &org.admin_key, json!({"name": "another"})).await?.expect_error(
        403,
        "forbidden",
        None,
    )?;
    app.delete(&format!("/v1/organizations/{}", org.id), &org.admin_key).await?.expect_error(403, "forbidden", None)?;

    // A key cannot mint or become a key stronger than itself.
    app.post("/v1/api-keys", &org.admin_key, json!({"name": "super", "scopes": ["platform"]})).await?.expect_error(
        403,
        "forbidden",
        None,
    )?;
    let spare = app.get("/v1/api-keys?name=spare", &org.admin_key).await?.expect(200)?.str("/items/0/id")?;
    app.put(&format!("/v1/api-keys/{spare}"), &org.admin_key, json!({"name": "spare", "scopes": ["read", "platform"]}))
        .await?
        .expect_error(403, "forbidden", None)?;
    app.post("/v1/api-keys", &org.admin_key, json!({"name": "peer", "scopes": ["admin"]})).await?.expect(201)?;
    Ok(())
}
