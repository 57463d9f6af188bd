//! Hostname ownership: platform zones handed out first come, first served, domains verified
//! with a TXT record that the server looks up with a real DNS query (to the test's own server
//! on loopback, `crate::dns`), takeover attempts by other organizations, and the errors that
//! name the field at fault.

use anyhow::ensure;
use edgible_server::domains::{DomainSettings, HostnamePolicy, TxtResolver};
use serde_json::json;

use crate::dns::DnsServer;
use crate::support::{TestApp, application};

const ZONE: &str = "apps.example.test";

fn settings(zones: &[&str], require_ownership: bool, dns: Option<&DnsServer>) -> anyhow::Result<DomainSettings> {
    Ok(DomainSettings {
        policy: HostnamePolicy {
            platform_zones: zones.iter().map(|zone| zone.parse()).collect::<Result<_, _>>()?,
            require_ownership,
        },
        resolver: TxtResolver { server: dns.map(DnsServer::address) },
    })
}

/// Creates a domain in the organization of `key` and returns its id and token.
async fn create_domain(app: &TestApp, key: &str, name: &str) -> anyhow::Result<(String, String)> {
    let created = app.post("/v1/domains", key, json!({"name": name})).await?.expect(201)?;
    ensure!(created.body["status"]["state"] == "pending", "{}", created.text);
    ensure!(created.body["status"]["txt_record_name"] == format!("_edgible-challenge.{name}"), "{}", created.text);
    Ok((created.str("/id")?, created.str("/status/txt_record_value")?))
}

pub async fn enforcement_is_off_without_zones_or_the_flag(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let org = app.org("free").await?;
    // Existing behaviour: any unique hostname goes.
    app.post("/v1/applications", &org.admin_key, application("web", &["web.anything.example"])).await?.expect(201)?;
    // Domains still work, so an operator can turn enforcement on later.
    let (id, _) = create_domain(&app, &org.admin_key, "anything.example").await?;
    app.get(&format!("/v1/domains/{id}"), &org.admin_key).await?.expect(200)?;
    Ok(())
}

pub async fn platform_zones_are_first_come_first_served(url: String) -> anyhow::Result<()> {
    let app = TestApp::with_domain_settings(&url, settings(&[ZONE], false, None)?).await?;
    let (first, second) = (app.org("first").await?, app.org("second").await?);

    let web = app
        .post("/v1/applications", &first.admin_key, application("web", &["web.apps.example.test"]))
        .await?
        .expect(201)?
        .str("/id")?;
    // The second organization cannot have the name, but any other name in the zone, however deep.
    app.post("/v1/applications", &second.admin_key, application("web", &["web.apps.example.test"]))
        .await?
        .expect_error(409, "conflict", Some("hostnames[0]"))?;
    app.post("/v1/applications", &second.admin_key, application("web", &["a.b.apps.example.test"]))
        .await?
        .expect(201)?;

    // Outside the zone, the zone itself and a wildcard over the whole zone need a domain.
    for (hostnames, field) in [
        (vec!["ok.apps.example.test", "web.elsewhere.test"], "hostnames[1]"),
        (vec!["apps.example.test"], "hostnames[0]"),
        (vec!["*.apps.example.test"], "hostnames[0]"),
        (vec!["webapps.example.test"], "hostnames[0]"),
    ] {
        let refused = app
            .post("/v1/applications", &second.admin_key, application("other", &hostnames))
            .await?
            .expect_error(422, "invalid", Some(field))?;
        ensure!(refused.text.contains(ZONE), "the message names the zone: {}", refused.text);
    }
    // Updates are checked too: an added name outside the zone is refused, naming its index.
    let update = application("web", &["web.apps.example.test", "web.elsewhere.test"]);
    app.put(&format!("/v1/applications/{web}"), &first.admin_key, update).await?.expect_error(
        422,
        "invalid",
        Some("hostnames[1]"),
    )?;
    // No domain can overlap the zone.
    for name in [ZONE, "x.apps.example.test", "example.test"] {
        app.post("/v1/domains", &first.admin_key, json!({"name": name})).await?.expect_error(
            422,
            "invalid",
            Some("name"),
        )?;
    }
    Ok(())
}

pub async fn domains_are_verified_with_a_real_dns_query(url: String) -> anyhow::Result<()> {
    let dns = DnsServer::start().await?;
    let app = TestApp::with_domain_settings(&url, settings(&[ZONE], false, Some(&dns))?).await?;
    let org = app.org("owner").await?;
    let key = &org.admin_key;

    app.post("/v1/applications", key, application("web", &["www.owned.example"])).await?.expect_error(
        422,
        "invalid",
        Some("hostnames[0]"),
    )?;
    let (id, token) = create_domain(&app, key, "owned.example").await?;
    app.post("/v1/domains", key, json!({"name": "owned.example"})).await?.expect_error(
        409,
        "conflict",
        Some("name"),
    )?;
    // A pending domain grants nothing.
    app.post("/v1/applications", key, application("web", &["www.owned.example"])).await?.expect_error(
        422,
        "invalid",
        Some("hostnames[0]"),
    )?;

    let verify = format!("/v1/domains/{id}/verify");
    let missing = app.post(&verify, key, json!({})).await?.expect_error(422, "invalid", None)?;
    ensure!(missing.text.contains("no TXT record found at _edgible-challenge.owned.example"), "{}", missing.text);
    dns.set_txt("_edgible-challenge.owned.example", &["someone-elses-token"]);
    let wrong = app.post(&verify, key, json!({})).await?.expect_error(422, "invalid", None)?;
    ensure!(wrong.text.contains("someone-elses-token"), "the answer says what was found: {}", wrong.text);

    dns.set_txt("_edgible-challenge.owned.example", &["v=other", &token]);
    let verified = app.post(&verify, key, json!({})).await?.expect(200)?;
    ensure!(verified.body["status"]["state"] == "verified", "{}", verified.text);
    ensure!(verified.body["status"]["verified_at"].is_string(), "{}", verified.text);
    ensure!(dns.queries() >= 3, "the server asked the DNS server each time ({} queries)", dns.queries());
    // Verifying again changes nothing, even when the record is gone.
    dns.set_txt("_edgible-challenge.owned.example", &[]);
    let again = app.post(&verify, key, json!({})).await?.expect(200)?;
    ensure!(again.u64("/revision")? == verified.u64("/revision")?, "{}", again.text);

    // The domain and every name below it are the organization's now; other names still not.
    let web = app
        .post(
            "/v1/applications",
            key,
            application("web", &["owned.example", "www.owned.example", "*.eu.owned.example"]),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    app.post("/v1/applications", key, application("other", &["www.notowned.example"])).await?.expect_error(
        422,
        "invalid",
        Some("hostnames[0]"),
    )?;
    // A listing finds it by name.
    let listed = app.get("/v1/domains?name=owned.example", key).await?.expect(200)?;
    ensure!(listed.ids()? == vec![id.clone()], "{}", listed.text);

    // In use, it cannot be deleted; once the application is gone, it can.
    let refused = app.delete(&format!("/v1/domains/{id}"), key).await?.expect_error(409, "conflict", None)?;
    ensure!(refused.text.contains("owned.example"), "{}", refused.text);
    app.delete(&format!("/v1/applications/{web}"), key).await?.expect(204)?;
    app.delete(&format!("/v1/domains/{id}"), key).await?.expect(204)?;
    app.get(&format!("/v1/domains/{id}"), key).await?.expect_error(404, "not_found", None)?;
    Ok(())
}

pub async fn a_second_organization_never_takes_over_a_verified_domain(url: String) -> anyhow::Result<()> {
    let dns = DnsServer::start().await?;
    let app = TestApp::with_domain_settings(&url, settings(&[], true, Some(&dns))?).await?;
    let (owner, rival) = (app.org("owner").await?, app.org("rival").await?);

    let (owner_id, owner_token) = create_domain(&app, &owner.admin_key, "shared.example").await?;
    dns.set_txt("_edgible-challenge.shared.example", &[&owner_token]);
    app.post(&format!("/v1/domains/{owner_id}/verify"), &owner.admin_key, json!({})).await?.expect(200)?;
    app.post("/v1/applications", &owner.admin_key, application("web", &["www.shared.example"])).await?.expect(201)?;

    // The rival may claim the same name, a name below and a name above, but only as pending:
    // even with its own token published, verification is refused naming the field.
    for name in ["shared.example", "deep.shared.example", "example"] {
        if name == "example" {
            // A single label is not a domain at all.
            app.post("/v1/domains", &rival.admin_key, json!({"name": name})).await?.expect_error(
                422,
                "invalid",
                Some("name"),
            )?;
            continue;
        }
        let (id, token) = create_domain(&app, &rival.admin_key, name).await?;
        dns.set_txt(&format!("_edgible-challenge.{name}"), &[&owner_token, &token]);
        let refused = app.post(&format!("/v1/domains/{id}/verify"), &rival.admin_key, json!({})).await?.expect_error(
            409,
            "conflict",
            Some("name"),
        )?;
        ensure!(refused.text.contains("another organization"), "{}", refused.text);
        let state = app.get(&format!("/v1/domains/{id}"), &rival.admin_key).await?.expect(200)?;
        ensure!(state.body["status"]["state"] == "pending", "{}", state.text);
    }
    // Nor can it use names under the owner's domain.
    app.post("/v1/applications", &rival.admin_key, application("web", &["api.shared.example"])).await?.expect_error(
        422,
        "invalid",
        Some("hostnames[0]"),
    )?;
    // The owner's domain is invisible to the rival.
    app.get(&format!("/v1/domains/{owner_id}"), &rival.admin_key).await?.expect_error(404, "not_found", None)?;
    app.delete(&format!("/v1/domains/{owner_id}"), &rival.admin_key).await?.expect_error(404, "not_found", None)?;

    // A parent domain the rival verifies first blocks the owner's children the same way.
    let (parent_id, parent_token) = create_domain(&app, &rival.admin_key, "parent.example").await?;
    dns.set_txt("_edgible-challenge.parent.example", &[&parent_token]);
    app.post(&format!("/v1/domains/{parent_id}/verify"), &rival.admin_key, json!({})).await?.expect(200)?;
    let (child_id, child_token) = create_domain(&app, &owner.admin_key, "child.parent.example").await?;
    dns.set_txt("_edgible-challenge.child.parent.example", &[&child_token]);
    app.post(&format!("/v1/domains/{child_id}/verify"), &owner.admin_key, json!({})).await?.expect_error(
        409,
        "conflict",
        Some("name"),
    )?;
    Ok(())
}

pub async fn domain_requests_are_validated(url: String) -> anyhow::Result<()> {
    let app = TestApp::with_domain_settings(&url, settings(&[], true, None)?).await?;
    let org = app.org("checks").await?;
    let key = &org.admin_key;
    for (body, field) in [
        (json!({"name": "*.example.org"}), "name"),
        (json!({"name": "Example.org"}), "name"),
        (json!({"name": "example.org", "extra": 1}), "extra"),
        (json!({}), "name"),
    ] {
        app.post("/v1/domains", key, body).await?.expect_error(422, "invalid", Some(field))?;
    }
    let reader = app.key(&org, "reader", &["read"]).await?;
    app.post("/v1/domains", &reader, json!({"name": "example.org"})).await?.expect_error(403, "forbidden", None)?;
    let document =
        app.send(crate::support::TestRequest::new(axum::http::Method::GET, "/v1/openapi.json")).await?.expect(200)?;
    for path in ["/v1/domains", "/v1/domains/{id}", "/v1/domains/{id}/verify"] {
        ensure!(document.body["paths"].get(path).is_some(), "the OpenAPI document lacks {path}");
    }
    // Domains have nothing to update.
    let (id, _) = create_domain(&app, key, "example.org").await?;
    let put = app.put(&format!("/v1/domains/{id}"), key, json!({"name": "example.org"})).await?;
    ensure!(put.status.as_u16() == 405, "{}", put.text);
    Ok(())
}
