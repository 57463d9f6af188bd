//! Bootstrap, whoami, the OpenAPI document, health and metrics.

use anyhow::{Context, ensure};
use edgible_server::bootstrap::{BootstrapError, bootstrap};
use edgible_server::db::Db;
use serde_json::Value;

use crate::support::TestApp;

pub async fn bootstrap_only_runs_on_an_empty_database(url: String) -> anyhow::Result<()> {
    let db = Db::connect(&url).await?;
    ensure!(db.is_empty().await?, "a new database is empty");
    let created = bootstrap(&db, &"platform".parse()?).await?;
    ensure!(created.admin_key.api_key.spec.scopes.iter().any(|s| *s == edgible::model::Scope::Platform));
    let again = bootstrap(&db, &"another".parse()?).await;
    ensure!(matches!(again, Err(BootstrapError::NotEmpty)), "a second bootstrap was not refused: {again:?}");

    // Opening the database again (a restart) keeps what is there and migrates nothing twice.
    let reopened = Db::connect(&url).await?;
    ensure!(!reopened.is_empty().await?);
    ensure!(reopened.current_revision().await? >= created.organization.revision);
    Ok(())
}

pub async fn whoami_describes_the_key(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let reader = app.key(&org, "reader", &["read"]).await?;
    let answer = app.get("/v1/whoami", &reader).await?.expect(200)?;
    let whoami: edgible::client::WhoAmI = answer.parse()?;
    ensure!(whoami.organization.id.to_string() == org.id && whoami.organization.spec.name.as_str() == "acme");
    ensure!(whoami.api_key.spec.name.as_str() == "reader", "{}", answer.text);
    ensure!(!answer.text.contains(&reader), "whoami must not echo the secret");
    let platform = app.get("/v1/whoami", &app.platform_key).await?.expect(200)?;
    ensure!(platform.body["organization"]["spec"]["name"] == "platform", "{}", platform.text);
    Ok(())
}

pub async fn openapi_describes_every_collection(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    // The document is public, like the shape of the API.
    let answer =
        app.send(crate::support::TestRequest::new(axum::http::Method::GET, "/v1/openapi.json")).await?.expect(200)?;
    let document = &answer.body;
    ensure!(document["openapi"].as_str().is_some_and(|v| v.starts_with("3.")), "{}", answer.text);
    let paths = document["paths"].as_object().context("paths")?;
    for collection in
        ["organizations", "members", "api-keys", "device-pools", "devices", "edges", "applications", "placements"]
    {
        let list = paths.get(&format!("/v1/{collection}")).with_context(|| format!("no /v1/{collection}"))?;
        ensure!(list.get("get").is_some() && list.get("post").is_some(), "/v1/{collection}: {list}");
        let item =
            paths.get(&format!("/v1/{collection}/{{id}}")).with_context(|| format!("no /v1/{collection}/{{id}}"))?;
        for method in ["get", "put", "delete"] {
            ensure!(item.get(method).is_some(), "/v1/{collection}/{{id}} lacks {method}");
        }
    }
    ensure!(paths.contains_key("/v1/whoami"));
    for path in [
        "/v1/agent/enroll",
        "/v1/agent/connect",
        "/v1/edge/enroll",
        "/v1/edge/connect",
        "/v1/ca.pem",
        "/v1/applications/{id}/status",
        "/v1/applications/{id}/logs",
        "/v1/events",
    ] {
        ensure!(paths.contains_key(path), "no {path}");
    }
    let schemas = document["components"]["schemas"].as_object().context("schemas")?;
    for schema in [
        "ApplicationSpec",
        "DeviceSpec",
        "PlacementSpec",
        "ErrorBody",
        "Hostname",
        "EnrollmentRequest",
        "Enrollment",
        "ApplicationStatus",
        "ApplicationLogs",
        "Event",
    ] {
        ensure!(schemas.contains_key(schema), "no schema {schema}; have {:?}", schemas.keys().collect::<Vec<_>>());
    }
    ensure!(document["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer", "bearer auth is declared");
    // Every reference points at a schema that exists.
    let mut references = Vec::new();
    collect_refs(document, &mut references);
    for reference in references {
        let name = reference.trim_start_matches("#/components/schemas/");
        ensure!(schemas.contains_key(name), "dangling reference {reference}");
    }
    Ok(())
}

fn collect_refs(value: &Value, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (key, value) in map {
                match (key.as_str(), value) {
                    ("$ref", Value::String(reference)) => out.push(reference.clone()),
                    _ => collect_refs(value, out),
                }
            }
        }
        Value::Array(items) => items.iter().for_each(|item| collect_refs(item, out)),
        _ => {}
    }
}

pub async fn health_and_metrics(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("acme").await?;
    let health = app.send(crate::support::TestRequest::new(axum::http::Method::GET, "/healthz")).await?.expect(200)?;
    ensure!(health.body["status"] == "ok", "{}", health.text);

    let device = app.get("/v1/devices/00000000-0000-7000-8000-000000000000", &org.admin_key).await?.expect(404)?;
    drop(device);
    let metrics = app.send(crate::support::TestRequest::new(axum::http::Method::GET, "/metrics")).await?.expect(200)?;
    let text = &metrics.text;
    ensure!(
        metrics.headers.get("content-type").is_some_and(|v| v.to_str().is_ok_and(|v| v.starts_with("text/plain"))),
        "metrics are Prometheus text"
    );
    // Requests are counted under their route template, not their concrete path.
    for line in [
        "edgible_http_requests_total{method=\"POST\",route=\"/v1/organizations\",status=\"201\"} 1",
        "edgible_http_requests_total{method=\"GET\",route=\"/v1/devices/{id}\",status=\"404\"} 1",
        "edgible_http_requests_total{method=\"GET\",route=\"/healthz\",status=\"200\"} 1",
        "edgible_objects{kind=\"organizations\"} 2",
        "edgible_objects{kind=\"api_keys\"} 2",
    ] {
        ensure!(text.contains(line), "missing {line:?} in:\n{text}");
    }
    ensure!(text.contains(
        "edgible_http_request_duration_seconds_bucket{method=\"GET\",route=\"/v1/devices/{id}\",le=\"+Inf\"} 1"
    ));
    ensure!(!text.contains("00000000-0000-7000"), "concrete ids must not become labels");
    Ok(())
}
