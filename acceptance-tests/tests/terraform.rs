//! The Terraform provider driven by the real `terraform` against a real `edgible-server`.
//!
//! Every resource goes through apply → empty plan → import into a fresh state (same
//! attributes) → update in place → empty plan → destroy → gone in the API. Around that:
//! invalid values fail at plan with their attribute path and create nothing, drift made through
//! the API shows in the plan, a hostname claimed twice fails clearly, fifty applications apply
//! in one go, and the examples validate and apply. Application keys (replaced on any change,
//! imported as `APPLICATION_ID/KEY_ID`) and short codes have their own scenario.
//!
//! All tests share one server (one per process under nextest) and isolate themselves with an
//! organization each. Gated by EDGIBLE_ACC=1.

use std::path::Path;

use anyhow::Context;
use edgible::client::Resource;
use edgible::model::{ApiKey, Application, ApplicationId, ApplicationKeyId, Device, DevicePool, Placement};
use edgible_acceptance_tests::heavy_tier;
use edgible_acceptance_tests::terraform::{Terraform, TestOrganization};
use serde_json::Value as Json;

/// One resource's trip through its whole life.
struct Lifecycle<'a> {
    address: &'a str,
    /// Other resources the configuration needs.
    setup: &'a str,
    first: &'a str,
    /// The same resource with changes that must apply in place.
    second: &'a str,
    /// Attributes only the creating run knows (secrets), absent after an import.
    write_once: &'a [&'a str],
}

/// The resource's state after the first and after the second apply.
struct Outcome {
    id: String,
    created: Json,
    updated: Json,
}

impl Lifecycle<'_> {
    async fn run(&self, org: &TestOrganization) -> anyhow::Result<Outcome> {
        let terraform = org.terraform("main")?;
        terraform.write_config(&format!("{}\n{}", self.setup, self.first))?;
        terraform.apply().await?;
        terraform.expect_no_changes().await.context("right after the first apply")?;
        let created = terraform.values(self.address).await?;
        let id = terraform.id(self.address).await?;

        // A fresh state that imports the object must hold the same attributes.
        let fresh = org.terraform("import")?;
        fresh.write_config(&format!("{}\n{}", self.setup, self.first))?;
        fresh.import(self.address, &id).await?;
        let imported = fresh.values(self.address).await?;
        compare_imported(&created, &imported, self.write_once)?;

        terraform.write_config(&format!("{}\n{}", self.setup, self.second))?;
        let plan = terraform.plan().await?.expect_code(2)?;
        anyhow::ensure!(
            plan.stdout.contains(&format!("{} will be updated in-place", self.address)),
            "the change should be an in-place update: {plan}"
        );
        anyhow::ensure!(!plan.stdout.contains("must be replaced"), "nothing should be replaced: {plan}");
        terraform.apply().await?;
        let updated = terraform.values(self.address).await?;
        anyhow::ensure!(updated["id"] == created["id"], "an in-place update kept the id");
        terraform.expect_no_changes().await.context("right after the update")?;

        terraform.destroy().await?;
        Ok(Outcome { id, created, updated })
    }
}

/// Every attribute of the created object equals the imported one, but for the write-once
/// ones, which an import cannot know.
fn compare_imported(created: &Json, imported: &Json, write_once: &[&str]) -> anyhow::Result<()> {
    let created = created.as_object().context("state values are an object")?;
    for (name, value) in created {
        let imported_value = imported.get(name).unwrap_or(&Json::Null);
        if write_once.contains(&name.as_str()) {
            anyhow::ensure!(imported_value.is_null(), "{name} cannot be known to an import, got {imported_value}");
        } else {
            anyhow::ensure!(imported_value == value, "imported {name} is {imported_value}, created was {value}");
        }
    }
    Ok(())
}

/// Fails unless the object with this id is gone from the API.
async fn expect_gone<R: Resource>(org: &TestOrganization, id: &str) -> anyhow::Result<()>
where
    R::Id: std::str::FromStr,
    <R::Id as std::str::FromStr>::Err: std::error::Error + Send + Sync + 'static,
{
    let id: R::Id = id.parse()?;
    match org.client.get::<R>(&id).await {
        Err(error) if error.is_not_found() => Ok(()),
        Ok(_) => anyhow::bail!("the {} {id} still exists after destroy", R::KIND),
        Err(error) => Err(error.into()),
    }
}

/// The number of the line of `main.tf` that contains `needle` (1-based), for checking where a
/// diagnostic points.
fn line_of(terraform: &Terraform, needle: &str) -> anyhow::Result<usize> {
    let text = std::fs::read_to_string(terraform.dir.join("main.tf"))?;
    text.lines()
        .position(|line| line.contains(needle))
        .map(|index| index + 1)
        .with_context(|| format!("{needle:?} is not in main.tf"))
}

/// Text with every run of whitespace made one space: Terraform wraps long messages.
fn squash(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

const POOL: &str = r#"
resource "edgible_device_pool" "pool" {
  name        = "pool"
  tunnel_cidr = "100.70.0.0/24"
}
"#;

#[tokio::test]
async fn device_pool_lifecycle() -> anyhow::Result<()> {
    if !heavy_tier("device_pool_lifecycle") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-pool").await?;
    let result = async {
        let lifecycle = Lifecycle {
            address: "edgible_device_pool.home",
            setup: "",
            first: r#"
resource "edgible_device_pool" "home" {
  name        = "home"
  tunnel_cidr = "100.96.0.0/24"
  region      = "eu-west-1"
}
"#,
            second: r#"
resource "edgible_device_pool" "home" {
  name        = "home-renamed"
  tunnel_cidr = "100.96.0.0/24"
  region      = "eu-west-2"
}
"#,
            write_once: &[],
        };
        let outcome = lifecycle.run(&org).await?;
        anyhow::ensure!(outcome.created["kind"] == "devices", "kind defaults to devices: {}", outcome.created);
        anyhow::ensure!(outcome.updated["name"] == "home-renamed");
        expect_gone::<DevicePool>(&org, &outcome.id).await?;

        // The tunnel network cannot change in place: the plan says so.
        let terraform = org.terraform("replace")?;
        terraform.write_config(lifecycle.first)?;
        terraform.apply().await?;
        terraform.write_config(&lifecycle.first.replace("100.96.0.0/24", "100.96.1.0/24"))?;
        let plan = terraform.plan().await?.expect_code(2)?;
        anyhow::ensure!(plan.stdout.contains("must be replaced"), "{plan}");
        anyhow::ensure!(plan.stdout.contains("# forces replacement"), "{plan}");
        terraform.write_config(lifecycle.first)?;
        terraform.destroy().await?;
        Ok(())
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn device_lifecycle() -> anyhow::Result<()> {
    if !heavy_tier("device_lifecycle") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-device").await?;
    let result = async {
        let outcome = Lifecycle {
            address: "edgible_device.laptop",
            setup: POOL,
            first: r#"
resource "edgible_device" "laptop" {
  name    = "laptop"
  pool_id = edgible_device_pool.pool.id
  labels  = { site = "home" }
}
"#,
            second: r#"
resource "edgible_device" "laptop" {
  name    = "laptop-2"
  pool_id = edgible_device_pool.pool.id
  labels  = { site = "office", "edgible.io/hw" = "nuc" }
}
"#,
            write_once: &["enrollment_token", "enrollment_expires_at"],
        }
        .run(&org)
        .await?;
        let created = &outcome.created;
        anyhow::ensure!(created["tunnel_address"] == "100.70.0.1", "the first address of the pool: {created}");
        anyhow::ensure!(created["status"] == "pending", "{created}");
        anyhow::ensure!(
            created["enrollment_token"].as_str().is_some_and(|token| !token.is_empty()),
            "the creating run gets the enrollment token"
        );
        anyhow::ensure!(outcome.updated["enrollment_token"] == created["enrollment_token"], "the token stays in state");
        anyhow::ensure!(outcome.updated["labels"]["edgible.io/hw"] == "nuc");
        expect_gone::<Device>(&org, &outcome.id).await
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn application_lifecycle() -> anyhow::Result<()> {
    if !heavy_tier("application_lifecycle") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-application").await?;
    let result = async {
        let outcome = Lifecycle {
            address: "edgible_application.web",
            setup: "",
            first: r#"
resource "edgible_application" "web" {
  name      = "web"
  hostnames = ["web.lifecycle.example.test", "*.apps.lifecycle.example.test"]
  port      = 8080
  env       = { MODE = "prod" }

  workload {
    process {
      command = "/usr/bin/python3"
      args    = ["-m", "http.server", "8080"]
      env     = { PYTHONUNBUFFERED = "1" }
    }
  }

  health_check {
    protocol = "http"
    path     = "/healthz"
  }

  access {
    short_code {}
  }

  storage {
    name       = "data"
    size_mib   = 100
    mount_path = "/data"
  }

  sleep {
    idle_timeout_seconds = 600
    mode                 = "stop"
  }
}
"#,
            second: r#"
resource "edgible_application" "web" {
  name      = "web"
  hostnames = ["web.lifecycle.example.test"]
  port      = 9090

  workload {
    container {
      image = "registry.example.test/web:2"
      ports = [9090]
    }
  }

  health_check {
    protocol         = "tcp"
    interval_seconds = 20
  }

  access {
    organization {
      roles = ["admin", "owner"]
    }
    api_key {}
  }

  storage {
    name       = "data"
    size_mib   = 200
    mount_path = "/data"
    movable    = true
  }

  resources {
    vcpus      = 2
    memory_mib = 512
  }
}
"#,
            write_once: &[],
        }
        .run(&org)
        .await?;
        let created = &outcome.created;
        anyhow::ensure!(
            created["short_code"].as_str().is_some_and(|code| code.len() >= 6),
            "the server generated a short code: {created}"
        );
        anyhow::ensure!(created["health_check"]["interval_seconds"] == 10, "defaults are in the state: {created}");
        let updated = &outcome.updated;
        anyhow::ensure!(updated["workload"]["container"]["image"] == "registry.example.test/web:2", "{updated}");
        anyhow::ensure!(updated["workload"]["process"].is_null(), "{updated}");
        expect_gone::<Application>(&org, &outcome.id).await
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn placement_lifecycle_moves_between_devices_in_place() -> anyhow::Result<()> {
    if !heavy_tier("placement_lifecycle_moves_between_devices_in_place") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-placement").await?;
    let result = async {
        let setup = format!(
            r#"{POOL}
resource "edgible_device" "a" {{
  name    = "device-a"
  pool_id = edgible_device_pool.pool.id
}}

resource "edgible_device" "b" {{
  name    = "device-b"
  pool_id = edgible_device_pool.pool.id
}}

resource "edgible_application" "app" {{
  name      = "app"
  hostnames = ["app.placement.lifecycle.example.test"]
  port      = 8080
  workload {{
    process {{
      command = "/srv/app"
    }}
  }}
}}
"#
        );
        let outcome = Lifecycle {
            address: "edgible_placement.app",
            setup: &setup,
            first: r#"
resource "edgible_placement" "app" {
  application_id = edgible_application.app.id
  strategy       = "serving-device"
  device_id      = edgible_device.a.id
}
"#,
            second: r#"
resource "edgible_placement" "app" {
  application_id = edgible_application.app.id
  strategy       = "serving-device"
  device_id      = edgible_device.b.id
}
"#,
            write_once: &[],
        }
        .run(&org)
        .await?;
        anyhow::ensure!(outcome.created["device_id"] != outcome.updated["device_id"], "the placement moved");
        expect_gone::<Placement>(&org, &outcome.id).await
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn api_key_lifecycle() -> anyhow::Result<()> {
    if !heavy_tier("api_key_lifecycle") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-api-key").await?;
    let result = async {
        let outcome = Lifecycle {
            address: "edgible_api_key.ci",
            setup: "",
            first: r#"
resource "edgible_api_key" "ci" {
  name   = "ci"
  scopes = ["read"]
}
"#,
            second: r#"
resource "edgible_api_key" "ci" {
  name       = "ci-writer"
  scopes     = ["write", "read"]
  expires_at = "2031-06-01T12:00:00+02:00"
}
"#,
            write_once: &["secret"],
        }
        .run(&org)
        .await?;
        let secret = outcome.created["secret"].as_str().context("the creating run gets the secret")?;
        anyhow::ensure!(outcome.updated["secret"] == secret, "the secret stays in state");
        anyhow::ensure!(
            outcome.updated["expires_at"] == "2031-06-01T12:00:00+02:00",
            "the timestamp stays as written: {}",
            outcome.updated
        );
        // The key was destroyed with the rest, so it no longer works.
        let client = edgible::Client::new(&org.server.server.url, secret)?;
        anyhow::ensure!(client.whoami().await.is_err(), "a destroyed key must stop working");
        expect_gone::<ApiKey>(&org, &outcome.id).await
    }
    .await;
    org.finish(result)
}

const ACCESS_APPLICATIONS: &str = r#"
resource "edgible_application" "wiki" {
  name      = "wiki"
  hostnames = ["wiki.access.example.test"]
  port      = 3000

  workload {
    process {
      command = "/usr/bin/wiki"
    }
  }

  access {
    organization {}
    api_key {}
  }
}

resource "edgible_application" "preview" {
  name      = "preview"
  hostnames = ["preview.access.example.test"]
  port      = 8080

  workload {
    process {
      command = "/usr/bin/preview"
    }
  }

  access {
    short_code {}
  }
}

resource "edgible_api_key" "robots" {
  name   = "robots"
  scopes = ["access"]
}
"#;

const APPLICATION_KEY: &str = r#"
resource "edgible_application_key" "ci" {
  application_id = edgible_application.wiki.id
  name           = "ci"
}
"#;

/// Fails unless the application's key is gone from the API.
async fn expect_key_gone(org: &TestOrganization, application: &ApplicationId, key: &str) -> anyhow::Result<()> {
    let key: ApplicationKeyId = key.parse()?;
    match org.client.application_key(application, &key).await {
        Err(error) if error.is_not_found() => Ok(()),
        Ok(_) => anyhow::bail!("the application key {key} still exists"),
        Err(error) => Err(error.into()),
    }
}

#[tokio::test]
async fn application_keys_and_short_codes() -> anyhow::Result<()> {
    if !heavy_tier("application_keys_and_short_codes") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-access").await?;
    let result = async {
        let terraform = org.terraform("main")?;
        terraform.write_config(&format!("{ACCESS_APPLICATIONS}\n{APPLICATION_KEY}"))?;
        terraform.apply().await?;
        terraform.expect_no_changes().await.context("right after the first apply")?;

        // The key's secret is in state; the API knows the key by the same id and prefix.
        let key = terraform.values("edgible_application_key.ci").await?;
        let wiki: ApplicationId = terraform.id("edgible_application.wiki").await?.parse()?;
        let secret = key["secret"].as_str().context("the creating run gets the secret")?.to_owned();
        let prefix = key["prefix"].as_str().context("a prefix")?;
        anyhow::ensure!(secret.starts_with(prefix), "the secret {secret:?} starts with its prefix {prefix:?}");
        let keys = org.client.list_all_application_keys(&wiki).await?;
        anyhow::ensure!(keys.len() == 1, "one key: {keys:?}");
        anyhow::ensure!(keys[0].id.to_string() == key["id"] && keys[0].prefix == prefix, "{keys:?} vs {key}");
        anyhow::ensure!(keys[0].application_id == wiki && key["application_id"] == wiki.to_string());
        let robots = terraform.values("edgible_api_key.robots").await?;
        anyhow::ensure!(robots["scopes"] == serde_json::json!(["access"]), "{robots}");

        // The generated short code is in state, equal to the API's, and never printed.
        let preview = terraform.values("edgible_application.preview").await?;
        let preview_id: ApplicationId = terraform.id("edgible_application.preview").await?.parse()?;
        let code = org.client.short_code(&preview_id).await?;
        anyhow::ensure!(
            preview["short_code"] == code.code.as_str(),
            "state {} vs API {}",
            preview["short_code"],
            code.code
        );
        anyhow::ensure!(terraform.values("edgible_application.wiki").await?["short_code"].is_null());
        let shown = terraform.run(&["show", "-no-color"]).await?.expect_success()?;
        anyhow::ensure!(!shown.stdout.contains(&code.code) && !shown.stdout.contains(&secret), "{shown}");

        // An import (by APPLICATION_ID/KEY_ID) holds the same attributes but the secret.
        let id = key["id"].as_str().context("an id")?.to_owned();
        let fresh = org.terraform("import")?;
        fresh.write_config(&format!("{ACCESS_APPLICATIONS}\n{APPLICATION_KEY}"))?;
        fresh.import("edgible_application_key.ci", &format!("{wiki}/{id}")).await?;
        compare_imported(&key, &fresh.values("edgible_application_key.ci").await?, &["secret"])?;

        // A rotation through the API plans nothing and shows after a refresh.
        let rotated = org.client.rotate_short_code(&preview_id).await?;
        anyhow::ensure!(rotated.code != code.code && rotated.version > code.version);
        terraform.expect_no_changes().await.context("after a rotation")?;
        terraform
            .run(&["apply", "-refresh-only", "-auto-approve", "-input=false", "-no-color"])
            .await?
            .expect_success()?;
        let refreshed = terraform.values("edgible_application.preview").await?;
        anyhow::ensure!(refreshed["short_code"] == rotated.code.as_str(), "{}", refreshed["short_code"]);

        // Any change replaces the key: a new id and secret, the old key revoked.
        terraform.write_config(&format!(
            "{ACCESS_APPLICATIONS}\n{}",
            APPLICATION_KEY.replace("= \"ci\"", "= \"ci-next\"")
        ))?;
        let plan = terraform.plan().await?.expect_code(2)?;
        anyhow::ensure!(plan.stdout.contains("edgible_application_key.ci must be replaced"), "{plan}");
        terraform.apply().await?;
        let replaced = terraform.values("edgible_application_key.ci").await?;
        anyhow::ensure!(replaced["id"] != key["id"] && replaced["secret"] != key["secret"], "{replaced}");
        anyhow::ensure!(replaced["name"] == "ci-next");
        expect_key_gone(&org, &wiki, &id).await?;
        terraform.expect_no_changes().await.context("after the replacement")?;

        terraform.destroy().await?;
        expect_key_gone(&org, &wiki, replaced["id"].as_str().unwrap_or_default()).await?;
        anyhow::ensure!(org.client.list_all::<Application>().await?.is_empty());
        expect_gone::<ApiKey>(&org, robots["id"].as_str().unwrap_or_default()).await
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn data_sources_read_existing_objects() -> anyhow::Result<()> {
    if !heavy_tier("data_sources_read_existing_objects") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-data").await?;
    let result = async {
        let terraform = org.terraform("main")?;
        terraform.write_config(&format!(
            r#"{POOL}
resource "edgible_device" "laptop" {{
  name    = "laptop"
  pool_id = edgible_device_pool.pool.id
  labels  = {{ site = "home" }}
}}

data "edgible_organization" "current" {{}}

data "edgible_device_pool" "by_name" {{
  name       = "pool"
  depends_on = [edgible_device_pool.pool]
}}

data "edgible_device" "by_id" {{
  id = edgible_device.laptop.id
}}

output "organization" {{
  value = data.edgible_organization.current.name
}}

output "pool_cidr" {{
  value = data.edgible_device_pool.by_name.tunnel_cidr
}}

output "device" {{
  value = data.edgible_device.by_id
}}
"#
        ))?;
        terraform.apply().await?;
        terraform.expect_no_changes().await?;
        let outputs = terraform.run(&["output", "-json"]).await?.expect_success()?;
        let outputs: Json = serde_json::from_str(&outputs.stdout)?;
        anyhow::ensure!(outputs["organization"]["value"] == "tf-data", "{outputs}");
        anyhow::ensure!(outputs["pool_cidr"]["value"] == "100.70.0.0/24", "{outputs}");
        let device = &outputs["device"]["value"];
        anyhow::ensure!(device["name"] == "laptop" && device["labels"]["site"] == "home", "{device}");
        anyhow::ensure!(device["tunnel_address"] == "100.70.0.1", "{device}");

        // A lookup that finds nothing is an error at the attribute.
        terraform.write_config(
            r#"
data "edgible_device" "missing" {
  name = "no-such-device"
}
"#,
        )?;
        let plan = terraform.plan().await?.expect_code(1)?;
        anyhow::ensure!(plan.stderr.contains("No such device"), "{plan}");
        terraform.write_config("")?;
        terraform.destroy().await?;
        Ok(())
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn invalid_values_fail_at_plan_with_their_path_and_create_nothing() -> anyhow::Result<()> {
    if !heavy_tier("invalid_values_fail_at_plan_with_their_path_and_create_nothing") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-invalid").await?;
    let result = async {
        let terraform = org.terraform("main")?;
        terraform.write_config(&format!(
            r#"{POOL}
resource "edgible_application" "bad" {{
  name = "bad"
  hostnames = [
    "ok.invalid.example.test",
    "Not_A.Hostname",
  ]
  port = 8080
  workload {{
    process {{
      command = "/srv/bad"
      env     = {{ "9LIVES" = "x" }}
    }}
  }}
  storage {{
    name       = "one"
    size_mib   = 10
    mount_path = "/one"
  }}
  storage {{
    name       = "two"
    size_mib   = 10
    mount_path = "relative/path"
  }}
}}

# Independent of the invalid application: Terraform skips validating resources whose
# dependencies failed.
resource "edgible_placement" "bad" {{
  application_id = "01939c4e-0000-7000-8000-000000000000"
  strategy       = "cloud"
}}

resource "edgible_device_pool" "cloud" {{
  name        = "cloud"
  tunnel_cidr = "100.71.0.0/24"
  kind        = "cloud"
}}
"#
        ))?;
        let output = terraform.try_apply().await?.expect_failure()?;
        let stderr = &output.stderr;
        for summary in [
            "Invalid value for hostnames[1]",
            "Invalid value for workload.process.env[\"9LIVES\"]",
            "Invalid value for storage[1].mount_path",
            "Invalid value for pool_id",
            "Invalid value for region",
        ] {
            anyhow::ensure!(stderr.contains(summary), "missing {summary:?}: {output}");
        }
        let hostname_line = line_of(&terraform, "\"Not_A.Hostname\"")?;
        let mount_line = line_of(&terraform, "relative/path")?;
        for line in [hostname_line, mount_line] {
            anyhow::ensure!(
                stderr.contains(&format!("on main.tf line {line}")),
                "no diagnostic points at line {line}: {output}"
            );
        }
        anyhow::ensure!(!stderr.contains("backtrace") && !stderr.contains("panicked"), "{output}");
        anyhow::ensure!(!output.stdout.contains("Creating..."), "nothing may be created: {output}");
        anyhow::ensure!(
            org.client.list_all::<DevicePool>().await?.is_empty(),
            "the valid pool must not be created either"
        );
        anyhow::ensure!(org.client.list_all::<Application>().await?.is_empty());
        Ok(())
    }
    .await;
    org.finish(result)
}

const DRIFT_APP: &str = r#"
resource "edgible_application" "drift" {
  name      = "drift"
  hostnames = ["drift.example.test"]
  port      = 8080
  workload {
    process {
      command = "/srv/drift"
    }
  }
}
"#;

#[tokio::test]
async fn drift_made_through_the_api_shows_in_the_plan() -> anyhow::Result<()> {
    if !heavy_tier("drift_made_through_the_api_shows_in_the_plan") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-drift").await?;
    let result = async {
        let terraform = org.terraform("main")?;
        terraform.write_config(DRIFT_APP)?;
        terraform.apply().await?;
        let id: edgible::model::ApplicationId = terraform.id("edgible_application.drift").await?.parse()?;

        // Changed outside Terraform: the plan changes it back.
        let mut application = org.client.get::<Application>(&id).await?;
        application.spec.port = 9999;
        org.client.update::<Application>(&id, Some(application.revision), &application.spec).await?;
        let plan = terraform.plan().await?.expect_code(2)?;
        anyhow::ensure!(plan.stdout.contains("9999 -> 8080"), "the plan should restore the port: {plan}");
        anyhow::ensure!(plan.stdout.contains("updated in-place"), "{plan}");
        terraform.apply().await?;
        terraform.expect_no_changes().await?;
        anyhow::ensure!(org.client.get::<Application>(&id).await?.spec.port == 8080);

        // Deleted outside Terraform: the plan creates it again, without an error.
        org.client.delete::<Application>(&id).await?;
        let plan = terraform.plan().await?.expect_code(2)?;
        anyhow::ensure!(plan.stdout.contains("edgible_application.drift will be created"), "{plan}");
        anyhow::ensure!(!plan.stderr.contains("Error"), "{plan}");
        terraform.apply().await?;
        terraform.expect_no_changes().await?;
        terraform.destroy().await?;
        Ok(())
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn a_hostname_claimed_twice_fails_with_a_clear_message() -> anyhow::Result<()> {
    if !heavy_tier("a_hostname_claimed_twice_fails_with_a_clear_message") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-duplicate").await?;
    let result = async {
        let terraform = org.terraform("main")?;
        let application = |name: &str| {
            format!(
                r#"
resource "edgible_application" "{name}" {{
  name      = "{name}"
  hostnames = ["same.duplicate.example.test"]
  port      = 8080
  workload {{
    process {{
      command = "/srv/{name}"
    }}
  }}
}}
"#
            )
        };
        terraform.write_config(&format!("{}{}", application("first"), application("second")))?;
        let output = terraform.try_apply().await?.expect_failure()?;
        anyhow::ensure!(output.stderr.contains("Conflict on hostnames[0]"), "{output}");
        anyhow::ensure!(
            squash(&output.stderr).contains("same.duplicate.example.test is already used by another application"),
            "{output}"
        );
        anyhow::ensure!(
            output.stderr.contains("hostnames = [\"same.duplicate.example.test\"]"),
            "the snippet shows the line: {output}"
        );
        let applications = org.client.list_all::<Application>().await?;
        anyhow::ensure!(applications.len() == 1, "exactly one application got the name: {applications:?}");
        terraform.destroy().await?;
        Ok(())
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn fifty_applications_apply_in_one_go_and_replan_empty() -> anyhow::Result<()> {
    if !heavy_tier("fifty_applications_apply_in_one_go_and_replan_empty") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-fifty").await?;
    let result = async {
        let terraform = org.terraform("main")?;
        terraform.write_config(
            r#"
resource "edgible_application" "many" {
  count     = 50
  name      = "app-${count.index}"
  hostnames = ["app-${count.index}.fifty.example.test"]
  port      = 8000 + count.index
  env       = { INDEX = tostring(count.index) }
  workload {
    process {
      command = "/srv/app"
      args    = ["--index", tostring(count.index)]
    }
  }
}
"#,
        )?;
        let apply = terraform.apply().await?;
        anyhow::ensure!(apply.stdout.contains("50 added"), "{apply}");
        terraform.expect_no_changes().await?;
        anyhow::ensure!(org.client.list_all::<Application>().await?.len() == 50);
        terraform.destroy().await?;
        anyhow::ensure!(org.client.list_all::<Application>().await?.is_empty());
        Ok(())
    }
    .await;
    org.finish(result)
}

fn examples_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/terraform")
}

#[tokio::test]
async fn quickstart_applies_replans_empty_and_destroys() -> anyhow::Result<()> {
    if !heavy_tier("quickstart_applies_replans_empty_and_destroys") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-quickstart").await?;
    let result = async {
        let terraform = org.terraform("quickstart")?;
        terraform.copy_config_from(&examples_dir().join("quickstart"))?;
        terraform.apply().await?;
        terraform.expect_no_changes().await?;
        let token = terraform.run(&["output", "-raw", "enrollment_token"]).await?.expect_success()?;
        anyhow::ensure!(token.stdout.starts_with("edg"), "an enrollment token: {token}");
        terraform.destroy().await?;
        anyhow::ensure!(org.client.list_all::<Application>().await?.is_empty());
        anyhow::ensure!(org.client.list_all::<DevicePool>().await?.is_empty());
        Ok(())
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn every_example_validates_and_the_resource_examples_apply() -> anyhow::Result<()> {
    if !heavy_tier("every_example_validates_and_the_resource_examples_apply") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-examples").await?;
    let result = async {
        let mut names: Vec<String> = std::fs::read_dir(examples_dir())?
            .map(|entry| Ok(entry?.file_name().to_string_lossy().into_owned()))
            .collect::<anyhow::Result<_>>()?;
        names.sort();
        anyhow::ensure!(names.len() >= 8, "the examples are missing: {names:?}");
        for name in &names {
            let terraform = org.terraform(name)?;
            terraform.copy_config_from(&examples_dir().join(name))?;
            terraform
                .run(&["validate", "-no-color"])
                .await?
                .expect_success()
                .with_context(|| format!("example {name}"))?;
            terraform
                .run(&["fmt", "-check", "-diff"])
                .await?
                .expect_success()
                .with_context(|| format!("example {name}"))?;
        }
        // The examples of single resources apply and re-plan empty (the quickstart has its own
        // test, the others need existing objects).
        for name in
            ["device_pool", "device", "application", "placement", "api_key", "edge", "domain", "application_key"]
        {
            let terraform = org.terraform(name)?;
            terraform.apply().await.with_context(|| format!("example {name}"))?;
            terraform.expect_no_changes().await.with_context(|| format!("example {name}"))?;
            if name == "placement" {
                // Moving the application to the other rack is an in-place update.
                let plan = terraform
                    .run(&["plan", "-detailed-exitcode", "-no-color", "-var", "device=example-rack-b"])
                    .await?;
                let plan = plan.expect_code(2)?;
                anyhow::ensure!(plan.stdout.contains("edgible_placement.api will be updated in-place"), "{plan}");
            }
            terraform.destroy().await.with_context(|| format!("example {name}"))?;
        }
        Ok(())
    }
    .await;
    org.finish(result)
}

#[tokio::test]
async fn provider_configuration_problems_are_clear_errors() -> anyhow::Result<()> {
    if !heavy_tier("provider_configuration_problems_are_clear_errors") {
        return Ok(());
    }
    let org = TestOrganization::create("tf-provider-config").await?;
    let result = async {
        let terraform = org.terraform("main")?;
        let data = "data \"edgible_organization\" \"current\" {}\n";

        // The configuration wins over EDGIBLE_API_KEY, which the harness sets.
        terraform.write_config(&format!("provider \"edgible\" {{\n  api_key = \"edg_not_a_key\"\n}}\n{data}"))?;
        let plan = terraform.plan().await?.expect_code(1)?;
        anyhow::ensure!(plan.stderr.contains("The Edgible server refused the API key"), "{plan}");
        // Terraform quotes the configuration line; the provider's own message must not repeat it.
        anyhow::ensure!(plan.all().matches("edg_not_a_key").count() == 1, "the key must not be printed: {plan}");

        // A port that was free a moment ago: nothing listens there.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        terraform
            .write_config(&format!("provider \"edgible\" {{\n  endpoint = \"http://127.0.0.1:{port}\"\n}}\n{data}"))?;
        let plan = terraform.plan().await?.expect_code(1)?;
        anyhow::ensure!(plan.stderr.contains("Cannot reach the Edgible server"), "{plan}");
        anyhow::ensure!(plan.stderr.contains(&format!("127.0.0.1:{port}")), "{plan}");
        anyhow::ensure!(!plan.stderr.contains("backtrace"), "{plan}");
        Ok(())
    }
    .await;
    org.finish(result)
}
