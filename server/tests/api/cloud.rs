//! Cloud hosts and cloud placements (issue 9): operator organizations, hosts declaring their
//! capacity in hello, the scheduler's choice through the API, moving applications between a
//! tenant's device and the cloud, and rescheduling off hosts that stay offline.

use std::time::Duration;

use anyhow::ensure;
use edgible::model::{ApplicationId, DeviceId, HostCapacity};
use edgible::protocol::close;
use edgible::protocol::v1::{ErrorCode, ServerMessage};
use edgible_server::db::Rescheduled;
use edgible_server::hub::agent::SessionConfig;
use edgible_server::rescheduler::Rescheduler;
use serde_json::{Value, json};

use crate::agents::{Enrolled, TestAgent, enrolled_device, pool};
use crate::support::{Org, Served, TestApp, application, eventually};

/// Each host offers 2 vCPUs, 1 GiB of memory and 1 GiB of disk.
const HOST: HostCapacity = HostCapacity { vcpus: 2, memory_mib: 1024, disk_mib: 1024 };

/// An operator organization with a cloud pool in region `eu`.
struct Operator {
    org: Org,
    pool: String,
}

async fn operator(app: &TestApp) -> anyhow::Result<Operator> {
    let answer = app
        .post("/v1/organizations", &app.platform_key, json!({"name": "ops", "operator": true}))
        .await?
        .expect(201)?;
    ensure!(answer.body["organization"]["spec"]["operator"] == true, "{}", answer.text);
    let org =
        Org { id: answer.str("/organization/id")?, name: "ops".into(), admin_key: answer.str("/admin_key/secret")? };
    let pool = app
        .post(
            "/v1/device-pools",
            &org.admin_key,
            json!({"name": "eu-cloud", "tunnel_cidr": "100.97.0.0/24", "kind": "cloud", "region": "eu"}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    Ok(Operator { org, pool })
}

/// Enrolls a cloud host in the operator's pool and connects it, declaring [`HOST`].
async fn host(served: &Served, operator: &Operator, name: &str, seed: u8) -> anyhow::Result<(Enrolled, TestAgent)> {
    let enrolled = enrolled_device(&served.app, &operator.org, &operator.pool, name, seed).await?;
    let mut agent = TestAgent::connect(served, &enrolled).await?.cloud_host(HOST);
    agent.hello(None).await?;
    Ok((enrolled, agent))
}

/// The next port for a cloud application: every test application gets its own, so that moving
/// one onto another's port on the same host is a change the test can make.
fn next_port() -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(9000);
    NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// An application needing `vcpus` and `memory_mib`, with `volume_mib` of storage if not 0, on a
/// port of its own.
async fn cloud_application(
    app: &TestApp,
    org: &Org,
    name: &str,
    vcpus: u32,
    memory_mib: u32,
    volume_mib: u64,
) -> anyhow::Result<ApplicationId> {
    let mut spec = application(name, &[&format!("{name}.{}.example.com", org.name)]);
    spec["resources"] = json!({"vcpus": vcpus, "memory_mib": memory_mib});
    spec["port"] = json!(next_port());
    if volume_mib > 0 {
        spec["storage"] = json!([{"name": "data", "size_mib": volume_mib, "mount_path": "/data"}]);
    }
    Ok(app.post("/v1/applications", &org.admin_key, spec).await?.expect(201)?.str("/id")?.parse()?)
}

/// Places `application` in region `eu`; answers the placement.
async fn place_in_region(app: &TestApp, org: &Org, application: ApplicationId) -> anyhow::Result<Value> {
    let body = json!({"strategy": "cloud", "application_id": application, "region": "eu"});
    Ok(app.post("/v1/placements", &org.admin_key, body).await?.expect(201)?.body)
}

fn host_of(placement: &Value) -> anyhow::Result<DeviceId> {
    let host = placement["host"].as_str().ok_or_else(|| anyhow::anyhow!("no host in {placement}"))?;
    Ok(host.parse()?)
}

/// The ids of the applications an update carries.
fn ids(changed: &[(ApplicationId, u64)]) -> Vec<ApplicationId> {
    changed.iter().map(|(id, _)| *id).collect()
}

pub async fn operators_are_made_by_platform_keys_only(url: String) -> anyhow::Result<()> {
    let app = TestApp::new(&url).await?;
    let tenant = app.org("tenant").await?;
    let ops = operator(&app).await?;
    let path = |org: &Org| format!("/v1/organizations/{}", org.id);

    let got = app.get(&path(&ops.org), &ops.org.admin_key).await?.expect(200)?;
    ensure!(got.body["spec"]["operator"] == true, "{}", got.text);
    let got = app.get(&path(&tenant), &tenant.admin_key).await?.expect(200)?;
    ensure!(got.body["spec"].get("operator").is_none(), "false is not shown: {}", got.text);

    // An admin can neither make its organization an operator nor change an operator one.
    let answer = app.put(&path(&tenant), &tenant.admin_key, json!({"name": "tenant", "operator": true})).await?;
    let answer = answer.expect_error(403, "forbidden", None)?;
    ensure!(answer.str("/error/message")?.contains("operator"), "{}", answer.text);
    let answer = app.put(&path(&ops.org), &ops.org.admin_key, json!({"name": "ops2", "operator": true})).await?;
    answer.expect_error(403, "forbidden", None)?;
    let answer = app.put(&path(&ops.org), &ops.org.admin_key, json!({"name": "ops"})).await?;
    answer.expect_error(403, "forbidden", None)?;
    // The admin may still rename its own ordinary organization.
    app.put(&path(&tenant), &tenant.admin_key, json!({"name": "tenant2"})).await?.expect(200)?;

    // A platform key may.
    let made = app.put(&path(&tenant), &app.platform_key, json!({"name": "tenant2", "operator": true})).await?;
    ensure!(made.expect(200)?.body["spec"]["operator"] == true);
    let unmade = app.put(&path(&tenant), &app.platform_key, json!({"name": "tenant2"})).await?.expect(200)?;
    ensure!(unmade.body["spec"].get("operator").is_none(), "{}", unmade.text);
    Ok(())
}

pub async fn only_operators_cloud_pools_run_cloud_hosts(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let ops = operator(app).await?;
    let tenant = app.org("tenant").await?;

    // A tenant's own cloud pool does not make it an operator.
    let tenant_cloud = app
        .post(
            "/v1/device-pools",
            &tenant.admin_key,
            json!({"name": "mine", "tunnel_cidr": "100.98.0.0/24", "kind": "cloud", "region": "eu"}),
        )
        .await?
        .expect(201)?
        .str("/id")?;
    let tenant_host = enrolled_device(app, &tenant, &tenant_cloud, "box", 1).await?;
    let mut agent = TestAgent::connect(&served, &tenant_host).await?.cloud_host(HOST);
    agent.send_hello(None).await?;
    let (code, message) = agent.error().await?;
    ensure!(code == ErrorCode::Unexpected && message.contains("operator"), "{code:?}: {message}");
    ensure!(agent.closed().await? == Some(close::POLICY_VIOLATION));

    // An operator's device outside a cloud pool is no cloud host either.
    let devices_pool = pool(app, &ops.org).await?;
    let plain = enrolled_device(app, &ops.org, &devices_pool, "plain", 2).await?;
    let mut agent = TestAgent::connect(&served, &plain).await?.cloud_host(HOST);
    agent.send_hello(None).await?;
    let (_, message) = agent.error().await?;
    ensure!(message.contains("cloud_host") && message.contains("not a cloud pool"), "{message}");

    // The same agents without `cloud_host` are ordinary devices.
    TestAgent::connect(&served, &tenant_host).await?.hello(None).await?;

    // A host in an operator's cloud pool is accepted, and its capacity shown; a hello without
    // it clears it.
    let (enrolled, agent) = host(&served, &ops, "host-a", 3).await?;
    let path = format!("/v1/devices/{}", enrolled.device_id);
    let device = app.get(&path, &ops.org.admin_key).await?.expect(200)?;
    ensure!(device.body["status"]["cloud_host"] == json!({"vcpus": 2, "memory_mib": 1024, "disk_mib": 1024}));
    drop(agent);
    let mut agent = TestAgent::connect(&served, &enrolled).await?;
    agent.hello(None).await?;
    let device = app.get(&path, &ops.org.admin_key).await?.expect(200)?;
    ensure!(device.body["status"].get("cloud_host").is_none(), "{}", device.text);
    Ok(())
}

pub async fn cloud_placements_spread_and_refuse_when_full(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let ops = operator(app).await?;
    let tenant = app.org("tenant").await?;
    let (a, mut a_agent) = host(&served, &ops, "host-a", 1).await?;
    let (b, mut b_agent) = host(&served, &ops, "host-b", 2).await?;
    let agent_of = |id: DeviceId| if id == a.device_id { 0 } else { 1 };

    // Equal hosts: the lowest id wins.
    let big = cloud_application(app, &tenant, "big", 1, 768, 0).await?;
    let first = host_of(&place_in_region(app, &tenant, big).await?)?;
    ensure!(first == a.device_id.min(b.device_id), "ties go to the lowest id");
    // The next one goes to the emptier host.
    let small = cloud_application(app, &tenant, "small", 1, 256, 0).await?;
    let second = host_of(&place_in_region(app, &tenant, small).await?)?;
    ensure!(second != first, "two applications spread across two hosts");
    // Now the second host has 768 MiB free, the first 256 MiB: the emptier is the second.
    let third = cloud_application(app, &tenant, "third", 1, 256, 0).await?;
    let third_placement = place_in_region(app, &tenant, third).await?;
    ensure!(host_of(&third_placement)? == second, "the host with most free memory wins");

    // The hosts' agents run what was placed on them.
    let mut agents = [&mut a_agent, &mut b_agent];
    ensure!(ids(&agents[agent_of(first)].update().await?.2) == [big]);
    ensure!(ids(&agents[agent_of(second)].update().await?.2) == [small]);
    ensure!(ids(&agents[agent_of(second)].update().await?.2) == [third]);

    // Nothing fits: 409 naming what was needed and what the best host had.
    let huge = cloud_application(app, &tenant, "huge", 2, 512, 0).await?;
    let body = json!({"strategy": "cloud", "application_id": huge, "region": "eu"});
    let refused =
        app.post("/v1/placements", &tenant.admin_key, body).await?.expect_error(409, "conflict", Some("region"))?;
    let message = refused.str("/error/message")?;
    ensure!(message.contains("2 vCPU, 512 MiB memory, 0 MiB disk"), "{message}");
    ensure!(message.contains(&format!("({second}) has 0 vCPU, 512 MiB memory, 1024 MiB disk free")), "{message}");
    // No operator cloud pool in the region: 409 too.
    let body = json!({"strategy": "cloud", "application_id": huge, "region": "us"});
    app.post("/v1/placements", &tenant.admin_key, body).await?.expect_error(409, "conflict", Some("region"))?;

    // `host` is shown when read back; the tenant cannot read the host.
    let placement_id = third_placement["id"].as_str().unwrap_or_default();
    let read = app.get(&format!("/v1/placements/{placement_id}"), &tenant.admin_key).await?.expect(200)?;
    ensure!(read.str("/host")? == second.to_string(), "{}", read.text);
    app.get(&format!("/v1/devices/{second}"), &tenant.admin_key).await?.expect(404)?;
    let devices = app.get("/v1/devices", &tenant.admin_key).await?.expect(200)?;
    ensure!(devices.ids()?.is_empty(), "the tenant lists no devices: {}", devices.text);

    // A tenant may name the operator's pool, but not one that is no operator's cloud pool.
    let by_pool = cloud_application(app, &tenant, "bypool", 1, 128, 0).await?;
    let body = json!({"strategy": "cloud", "application_id": by_pool, "pool_id": ops.pool});
    let placed = app.post("/v1/placements", &tenant.admin_key, body).await?.expect(201)?;
    ensure!(host_of(&placed.body)? == first, "{}", placed.text);
    let own_pool = pool(app, &tenant).await?;
    let other = cloud_application(app, &tenant, "other", 1, 128, 0).await?;
    let body = json!({"strategy": "cloud", "application_id": other, "pool_id": own_pool});
    app.post("/v1/placements", &tenant.admin_key, body).await?.expect_error(422, "invalid", Some("pool_id"))?;

    // The host's statuses and events about a tenant's application reach the tenant.
    let path = format!("/v1/applications/{big}/status");
    let status = app.get(&path, &tenant.admin_key).await?.expect(200)?;
    ensure!(status.str("/device_id")? == first.to_string(), "{}", status.text);

    // The host gets a certificate for the tenant's hostnames.
    let host_agent = &mut agents[agent_of(first)];
    ensure!(ids(&host_agent.update().await?.2) == [by_pool], "the placement by pool reached the host");
    let hostname = "big.tenant.example.com";
    let answer = crate::edges::request_certificate(host_agent, big, crate::edges::csr(&[hostname])?).await?;
    ensure!(matches!(answer, ServerMessage::Certificate { application_id, .. } if application_id == big), "{answer:?}");

    // The cloud pool's edges route the tenant's hostnames to the host.
    let edge = crate::edges::create_edge(app, &ops.org, &ops.pool, "edge").await?.str("/edge/id")?;
    let inputs = served.db.edge_inputs(edge.parse()?).await?.ok_or_else(|| anyhow::anyhow!("no edge"))?;
    ensure!(
        inputs.placed.iter().any(|(device, application)| *device == first && application.id == big),
        "the edge routes the tenant's application to its host"
    );

    // An application cannot outgrow its host; growing within it is fine.
    let path = format!("/v1/applications/{big}");
    let mut spec = app.get(&path, &tenant.admin_key).await?.expect(200)?.body["spec"].clone();
    spec["resources"] = json!({"vcpus": 2, "memory_mib": 768});
    let refused = app.put(&path, &tenant.admin_key, spec.clone()).await?;
    let refused = refused.expect_error(409, "conflict", Some("resources"))?;
    ensure!(refused.str("/error/message")?.contains("has 1 vCPU, 896 MiB memory"), "{}", refused.text);
    spec["resources"] = json!({"vcpus": 1, "memory_mib": 896});
    app.put(&path, &tenant.admin_key, spec.clone()).await?.expect(200)?;
    // Ports are no host resource (the agent reaches each guest at its own address): `third`
    // may take the port of `small`, which runs on the same host, and stays there.
    let key = &tenant.admin_key;
    let mut third_spec = app.get(&format!("/v1/applications/{third}"), key).await?.expect(200)?.body["spec"].clone();
    let small_spec = app.get(&format!("/v1/applications/{small}"), key).await?.expect(200)?.body["spec"].clone();
    ensure!(third_spec["port"] != small_spec["port"], "distinct ports before the change");
    third_spec["port"] = small_spec["port"].clone();
    let path = format!("/v1/applications/{third}");
    app.put(&path, &tenant.admin_key, third_spec).await?.expect(200)?;
    let id = third_placement["id"].as_str().ok_or_else(|| anyhow::anyhow!("no id in {third_placement}"))?;
    let placement = format!("/v1/placements/{id}");
    let placement = app.get(&placement, key).await?.expect(200)?;
    ensure!(host_of(&placement.body)? == second, "the same host, the same port: {}", placement.text);

    // The operator cannot stop being one while tenants run on its hosts.
    let path = format!("/v1/organizations/{}", ops.org.id);
    app.put(&path, &app.platform_key, json!({"name": "ops"})).await?.expect_error(409, "conflict", Some("operator"))?;
    Ok(())
}

pub async fn placements_move_between_a_device_and_the_cloud(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let ops = operator(app).await?;
    let tenant = app.org("tenant").await?;
    let (cloud, cloud_agent) = host(&served, &ops, "host-a", 1).await?;
    let home = pool(app, &tenant).await?;
    let laptop = enrolled_device(app, &tenant, &home, "laptop", 2).await?;
    let mut laptop_agent = TestAgent::connect(&served, &laptop).await?;
    laptop_agent.hello(None).await?;

    let web = cloud_application(app, &tenant, "web", 1, 256, 0).await?;
    let on_device = json!({"strategy": "serving-device", "application_id": web, "device_id": laptop.device_id});
    let placement = app.post("/v1/placements", &tenant.admin_key, on_device.clone()).await?.expect(201)?;
    ensure!(placement.str("/host")? == laptop.device_id.to_string(), "{}", placement.text);
    let path = format!("/v1/placements/{}", placement.str("/id")?);
    ensure!(ids(&laptop_agent.update().await?.2) == [web]);

    // To the cloud, a migration (the scheduler picks the host): the laptop loses it, the host
    // gains it.
    let revision =
        app.get(&format!("/v1/applications/{web}"), &tenant.admin_key).await?.expect(200)?.u64("/revision")?;
    let mut laptop_agent = crate::migrations::Agent::wrap(laptop_agent, &laptop, &[web]);
    let mut cloud_agent = crate::migrations::Agent::wrap(cloud_agent, &cloud, &[]);
    let to_cloud = json!({"strategy": "cloud", "application_id": web, "region": "eu"});
    let moved = app.put(&path, &tenant.admin_key, to_cloud.clone()).await?.expect(200)?;
    ensure!(moved.str("/host")? == laptop.device_id.to_string(), "routed to the source until cutover: {}", moved.text);
    let migration = moved.str("/migration_id")?.parse()?;
    crate::migrations::migrate_stateless(
        &served,
        &tenant,
        migration,
        web,
        revision,
        &mut laptop_agent,
        &mut cloud_agent,
    )
    .await?;
    let placed = app.get(&path, &tenant.admin_key).await?.expect(200)?;
    ensure!(placed.str("/host")? == cloud.device_id.to_string(), "{}", placed.text);

    // And back.
    let back = app.put(&path, &tenant.admin_key, on_device).await?.expect(200)?;
    let migration = back.str("/migration_id")?.parse()?;
    crate::migrations::migrate_stateless(
        &served,
        &tenant,
        migration,
        web,
        revision,
        &mut cloud_agent,
        &mut laptop_agent,
    )
    .await?;
    ensure!(app.get(&path, &tenant.admin_key).await?.expect(200)?.str("/host")? == laptop.device_id.to_string());

    // A tenant that goes away leaves nothing running on the operator's host.
    let moved = app.put(&path, &tenant.admin_key, to_cloud).await?.expect(200)?;
    let migration = moved.str("/migration_id")?.parse()?;
    crate::migrations::migrate_stateless(
        &served,
        &tenant,
        migration,
        web,
        revision,
        &mut laptop_agent,
        &mut cloud_agent,
    )
    .await?;
    app.delete(&format!("/v1/organizations/{}", tenant.id), &app.platform_key).await?.expect(204)?;
    cloud_agent.until_runs(web, false).await?;
    Ok(())
}

pub async fn applications_leave_hosts_that_stay_offline(url: String) -> anyhow::Result<()> {
    let served = TestApp::serve(&url, SessionConfig::default()).await?;
    let app = &served.app;
    let ops = operator(app).await?;
    let tenant = app.org("tenant").await?;
    let (a, a_agent) = host(&served, &ops, "host-a", 1).await?;
    let stateless = cloud_application(app, &tenant, "stateless", 1, 256, 0).await?;
    let stateful = cloud_application(app, &tenant, "stateful", 1, 256, 100).await?;
    for application in [stateless, stateful] {
        ensure!(host_of(&place_in_region(app, &tenant, application).await?)? == a.device_id);
    }
    let (b, mut b_agent) = host(&served, &ops, "host-b", 2).await?;

    // Not yet offline long enough: nothing moves.
    let mut rescheduler = Rescheduler::default();
    ensure!(rescheduler.pass(&served.db, Duration::from_secs(3600)).await?.is_empty());
    drop(a_agent);
    let device = format!("/v1/devices/{}", a.device_id);
    eventually("host a is offline", || async {
        Ok(app.get(&device, &ops.org.admin_key).await?.expect(200)?.str("/status/state")? == "offline")
    })
    .await?;
    ensure!(rescheduler.pass(&served.db, Duration::from_secs(3600)).await?.is_empty());

    // After the (short) period, the stateless application moves; the one with a volume stays.
    tokio::time::sleep(Duration::from_millis(50)).await;
    let outcomes = rescheduler.pass(&served.db, Duration::from_millis(20)).await?;
    let moved = outcomes.iter().find(|outcome| outcome.application_id == stateless);
    ensure!(matches!(moved.map(|o| &o.result), Some(Rescheduled::Moved { to }) if *to == b.device_id), "{outcomes:?}");
    let kept = outcomes.iter().find(|outcome| outcome.application_id == stateful);
    ensure!(matches!(kept.map(|o| &o.result), Some(Rescheduled::NoFit(_))), "{outcomes:?}");
    ensure!(ids(&b_agent.update().await?.2) == [stateless]);
    let placements = app.get("/v1/placements", &tenant.admin_key).await?.expect(200)?;
    let hosts: Vec<(String, String)> = placements.body["items"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (p["spec"]["application_id"].as_str().unwrap_or("").to_owned(), p["host"].as_str().unwrap_or("").to_owned())
        })
        .collect();
    ensure!(hosts.contains(&(stateless.to_string(), b.device_id.to_string())), "{hosts:?}");
    ensure!(hosts.contains(&(stateful.to_string(), a.device_id.to_string())), "{hosts:?}");

    // Both became events on the applications, for the tenant; each is told once.
    for (application, words) in [(stateless, "moved to cloud host"), (stateful, "volumes")] {
        let events = app.get(&format!("/v1/events?application_id={application}"), &tenant.admin_key).await?;
        let events = events.expect(200)?;
        let messages: Vec<&str> =
            events.body["items"].as_array().into_iter().flatten().filter_map(|e| e["message"].as_str()).collect();
        ensure!(messages.len() == 1 && messages[0].contains(words), "{messages:?}");
    }
    ensure!(rescheduler.pass(&served.db, Duration::from_millis(20)).await?.is_empty(), "reported once");

    // With no other host left online, a stateless application stays and says why.
    let again = cloud_application(app, &tenant, "again", 1, 256, 0).await?;
    ensure!(host_of(&place_in_region(app, &tenant, again).await?)? == b.device_id);
    drop(b_agent);
    let device = format!("/v1/devices/{}", b.device_id);
    eventually("host b is offline", || async {
        Ok(app.get(&device, &ops.org.admin_key).await?.expect(200)?.str("/status/state")? == "offline")
    })
    .await?;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let outcomes = rescheduler.pass(&served.db, Duration::from_millis(20)).await?;
    ensure!(
        outcomes
            .iter()
            .filter(|o| o.from == b.device_id)
            .all(|o| matches!(&o.result, Rescheduled::NoFit(why) if why.contains("online"))),
        "{outcomes:?}"
    );
    ensure!(outcomes.iter().filter(|o| o.from == b.device_id).count() == 2, "{outcomes:?}");
    Ok(())
}
