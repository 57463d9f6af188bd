//! `edgible_placement`: where an application runs.
//!
//! Changing where (the device, or the strategy) is an in-place update: the server answers the
//! `PUT` with the placement and the id of the migration it started, and the apply waits for
//! that migration ([`wait_for_migration`], bounded by `migration_timeout_seconds`), then reads
//! the placement again, so the state shows where the application really runs. A failed migration is an error naming the phase and the reason;
//! the server has put the placement back, so the state keeps the old device and the next plan
//! proposes the move again.

use std::future::Future;
use std::sync::LazyLock;
use std::time::Duration;

use edgible::model::{
    ApplicationId, DeviceId, DevicePoolId, Migration, MigrationPhase, Placement, PlacementSpec, Region,
};
use edgible::{Client, ClientError};
use tokio::time::Instant;

use super::{Model, id_attribute, revision_attribute};
use crate::diagnostics::{AttributePath, Diagnostic, Diagnostics, client_error};
use crate::schema::{Attribute, Block, Check, Schema, invalid, parses};
use crate::value::{Type, Value};

/// How long an apply waits for a migration when `migration_timeout_seconds` is not set.
pub const DEFAULT_MIGRATION_TIMEOUT: Duration = Duration::from_secs(900);

/// The longest wait `migration_timeout_seconds` may ask for: a day.
const MAX_MIGRATION_TIMEOUT_SECONDS: i64 = 86_400;

/// How often a migration is read while waiting for it.
const MIGRATION_POLL: Duration = Duration::from_secs(1);

pub struct PlacementModel;

const SERVING_DEVICE: &str = "serving-device";
const CLOUD: &str = "cloud";

static SCHEMA: LazyLock<Schema> = LazyLock::new(|| {
    Schema::new(
        Block::new(
            "Where an application runs: on one of the organization's devices (`serving-device`) or on an operator \
             cloud host (`cloud`). Changing the device moves the application in place.",
        )
        .attribute(id_attribute())
        .attribute(revision_attribute())
        .attribute(
            Attribute::required(
                "application_id",
                Type::String,
                "The application to place. Changing it replaces the placement.",
            )
            .check(Check::Parse(parses::<ApplicationId>))
            .requires_replace(),
        )
        .attribute(
            Attribute::required("strategy", Type::String, "`serving-device` or `cloud`.")
                .check(Check::OneOf(&[SERVING_DEVICE, CLOUD])),
        )
        .attribute(
            Attribute::optional("device_id", Type::String, "The device to run on; required for `serving-device`.")
                .check(Check::Parse(parses::<DeviceId>)),
        )
        .attribute(
            Attribute::optional("pool_id", Type::String, "For `cloud`: the pool of cloud hosts to choose from.")
                .check(Check::Parse(parses::<DevicePoolId>)),
        )
        .attribute(
            Attribute::optional("region", Type::String, "For `cloud`: the region to choose a host in.")
                .check(Check::Parse(parses::<Region>)),
        )
        .attribute(
            Attribute::optional(
                "migration_timeout_seconds",
                Type::Number,
                "How long an apply that moves the application waits for the migration to end (seconds, 1 to \
                 86400; 900 when unset). A migration still running then is reported as an error and goes on \
                 on the server. A setting of the provider: never sent to the server.",
            )
            .check(Check::Range(1, MAX_MIGRATION_TIMEOUT_SECONDS))
            .local(),
        )
        .attribute(
            Attribute::computed(
                "host",
                Type::String,
                "The id of the device the application runs on: `device_id` for `serving-device`, the cloud host \
                 the scheduler chose for `cloud` (the host itself belongs to the operator and cannot be read).",
            )
            // Any change of the placement may move the application: the new host is known only
            // once the server chose it.
            .changes_on_write(),
        ),
    )
});

impl Model for PlacementModel {
    type Object = Placement;
    type Spec = PlacementSpec;
    const TYPE_NAME: &'static str = "edgible_placement";
    const NOUN: &'static str = "placement";

    fn schema() -> &'static Schema {
        &SCHEMA
    }

    /// Which attributes go with which strategy. Unknown values count as set: they will be.
    fn check(config: &Value) -> Diagnostics {
        let mut diagnostics = Diagnostics::new();
        let set = |name: &str| !config.get(name).is_null();
        match config.get("strategy").as_str() {
            Some(SERVING_DEVICE) => {
                if !set("device_id") {
                    diagnostics.push(invalid(
                        &AttributePath::attribute("device_id"),
                        "required with strategy \"serving-device\"",
                    ));
                }
                for name in ["pool_id", "region"] {
                    if set(name) {
                        diagnostics.push(invalid(
                            &AttributePath::attribute(name),
                            "only for strategy \"cloud\"; a serving-device placement runs on `device_id`",
                        ));
                    }
                }
            }
            Some(CLOUD) => {
                if set("device_id") {
                    diagnostics.push(invalid(
                        &AttributePath::attribute("device_id"),
                        "only for strategy \"serving-device\"; a cloud placement chooses a host by `pool_id` or `region`",
                    ));
                }
                if !set("pool_id") && !set("region") {
                    diagnostics.push(invalid(
                        &AttributePath::attribute("pool_id"),
                        "a cloud placement needs `pool_id` or `region`",
                    ));
                }
            }
            _ => {}
        }
        diagnostics
    }

    /// The spec's fields, `id`, `revision` and the platform's choice of `host`.
    fn state_json(object: &Placement) -> serde_json::Value {
        let mut state = super::flattened_state_json(object);
        if let (serde_json::Value::Object(state), Some(host)) = (&mut state, object.host) {
            state.insert("host".into(), serde_json::Value::String(host.to_string()));
        }
        state
    }

    fn created(created: Placement) -> (Placement, Vec<(&'static str, Value)>) {
        (created, Vec::new())
    }

    /// Waits for the migration the update started, if it started one, and reads the placement
    /// again: after a completed migration `host` is the target, after a failed one the server
    /// has put the placement back where the application stayed.
    fn after_update(
        client: &Client,
        object: Placement,
        planned: &Value,
    ) -> impl Future<Output = Result<Placement, (Option<Placement>, Diagnostics)>> + Send {
        let timeout = migration_timeout(planned);
        async move {
            let Some(migration_id) = object.migration_id else { return Ok(object) };
            let waited = wait_for_migration(|| client.migration(&migration_id), timeout, MIGRATION_POLL).await;
            let outcome = outcome(waited, &object.spec, timeout);
            let now = client.get::<Placement>(&object.id).await;
            match (outcome, now) {
                (Ok(_), Ok(placement)) => Ok(placement),
                // The migration completed, so the application runs at its target even if the
                // placement cannot be read right now.
                (Ok(migration), Err(_)) => Ok(Placement { host: Some(migration.target), migration_id: None, ..object }),
                (Err(diagnostic), Ok(placement)) => Err((Some(placement), diagnostic.into())),
                (Err(diagnostic), Err(_)) => Err((None, diagnostic.into())),
            }
        }
    }
}

/// `migration_timeout_seconds` of a planned state, or the default.
fn migration_timeout(planned: &Value) -> Duration {
    planned
        .get("migration_timeout_seconds")
        .as_i64()
        .and_then(|seconds| u64::try_from(seconds).ok())
        .map_or(DEFAULT_MIGRATION_TIMEOUT, Duration::from_secs)
}

/// How waiting for a migration ended.
#[derive(Debug)]
pub enum Waited {
    /// Completed or failed.
    Ended(Migration),
    /// Still running at the deadline: the last reading, if any succeeded.
    TimedOut(Option<Migration>),
    /// Reading it failed in a way retrying would not mend.
    Unreadable(ClientError),
}

/// Reads a migration with `read` every `poll` until it ends or `timeout` passes. Errors the
/// server may recover from (it restarts; a migration survives that) are retried until the
/// deadline.
pub async fn wait_for_migration<F, Fut>(mut read: F, timeout: Duration, poll: Duration) -> Waited
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Migration, ClientError>>,
{
    let deadline = Instant::now() + timeout;
    let mut last = None;
    loop {
        match read().await {
            Ok(migration) if migration.phase.is_final() => return Waited::Ended(migration),
            Ok(migration) => last = Some(migration),
            Err(error) if error.is_retryable() => {}
            Err(error) => return Waited::Unreadable(error),
        }
        let now = Instant::now();
        if now >= deadline {
            return Waited::TimedOut(last);
        }
        tokio::time::sleep(poll.min(deadline - now)).await;
    }
}

/// The completed migration, or the error to show: the phase and reason of a failure, or how
/// far a migration got before the wait ended.
fn outcome(waited: Waited, spec: &PlacementSpec, timeout: Duration) -> Result<Migration, Diagnostic> {
    // The attribute that asked for the move, for Terraform to point at.
    let path = match spec {
        PlacementSpec::ServingDevice { .. } => AttributePath::attribute("device_id"),
        PlacementSpec::Cloud { pool_id: Some(_), .. } => AttributePath::attribute("pool_id"),
        PlacementSpec::Cloud { .. } => AttributePath::attribute("region"),
    };
    match waited {
        Waited::Ended(migration) if migration.phase == MigrationPhase::Completed => Ok(migration),
        Waited::Ended(migration) => {
            let phase = migration.failed_phase.map_or("an unknown phase", MigrationPhase::as_str);
            let reason = migration.failure.as_deref().unwrap_or("no reason given");
            // The server's reason may name the phase itself (`failed in ship: ...`).
            let reason = reason.strip_prefix("failed ").unwrap_or(reason);
            let reason = reason.strip_prefix(&format!("in {phase}: ")).unwrap_or(reason);
            let source = if migration.rolled_back {
                "runs on its device as before"
            } else {
                "stays on its device, which resumes it as soon as it is online"
            };
            Err(Diagnostic::error_at(
                path,
                format!("Migration failed in {phase}"),
                format!(
                    "Migration {} of the application failed in {phase}: {reason}.\n\nNothing moved: the \
                     application {source} ({}). The state keeps that device, so the next plan proposes the move \
                     again.",
                    migration.id, migration.source
                ),
            ))
        }
        Waited::TimedOut(last) => {
            let progress = match &last {
                Some(migration) => format!("Migration {} is still in {}", migration.id, migration.phase.as_str()),
                None => "The migration could not be read".to_owned(),
            };
            let follow = match &last {
                Some(migration) => format!("`edgible migration get {}` shows how it ends; ", migration.id),
                None => String::new(),
            };
            Err(Diagnostic::error_at(
                path,
                "Migration did not finish in time",
                format!(
                    "{progress} after {} seconds (`migration_timeout_seconds`). It goes on on the server: {follow}\
                     the next refresh shows where the application runs.",
                    timeout.as_secs()
                ),
            ))
        }
        Waited::Unreadable(error) => Err(client_error("follow the migration", &error, |_| AttributePath::root())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::{Managed, ManagedResource};

    fn config(json: serde_json::Value) -> Value {
        Value::from_json(&json, &SCHEMA.value_type()).unwrap()
    }

    #[test]
    fn strategies_take_their_own_attributes() {
        let resource = Managed::<PlacementModel>::new();
        let application_id = ApplicationId::new().to_string();
        let device_id = DeviceId::new().to_string();
        let good = config(
            serde_json::json!({"application_id": application_id, "strategy": "serving-device", "device_id": device_id}),
        );
        assert!(resource.validate(&good).is_empty(), "{}", resource.validate(&good));
        let spec = Managed::<PlacementModel>::spec(&good).unwrap();
        assert_eq!(spec.strategy(), "serving-device");

        let missing = config(serde_json::json!({"application_id": application_id, "strategy": "serving-device"}));
        let diagnostics = resource.validate(&missing);
        assert_eq!(diagnostics.0[0].path, Some(AttributePath::attribute("device_id")));

        let mixed = config(
            serde_json::json!({"application_id": application_id, "strategy": "cloud", "device_id": device_id, "region": "eu-west"}),
        );
        let diagnostics = resource.validate(&mixed);
        assert_eq!(diagnostics.0.len(), 1);
        assert_eq!(diagnostics.0[0].path, Some(AttributePath::attribute("device_id")));

        let mut unknown = missing.clone();
        unknown.set("device_id", Value::unknown());
        assert!(resource.validate(&unknown).is_empty());
    }

    #[test]
    fn placement_state_is_flat() {
        let placement = Placement {
            id: edgible::model::PlacementId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            revision: 2,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            host: None,
            migration_id: None,
            spec: PlacementSpec::Cloud {
                application_id: ApplicationId::new(),
                pool_id: None,
                region: Some("eu-west".parse().unwrap()),
            },
        };
        let state = Managed::<PlacementModel>::state(&placement).unwrap();
        assert_eq!(state.get("strategy"), &Value::string("cloud"));
        assert_eq!(state.get("region"), &Value::string("eu-west"));
        assert_eq!(state.get("device_id"), &Value::Null);
        assert_eq!(state.get("host"), &Value::Null, "not scheduled");
        assert_eq!(Managed::<PlacementModel>::spec(&state).unwrap(), placement.spec);
    }

    #[test]
    fn the_chosen_host_is_computed_state_not_spec() {
        let host = DeviceId::new();
        let application_id = ApplicationId::new();
        let spec = PlacementSpec::Cloud { application_id, pool_id: None, region: Some("eu-west".parse().unwrap()) };
        let placement = Placement {
            id: edgible::model::PlacementId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            revision: 2,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            host: Some(host),
            migration_id: None,
            spec: spec.clone(),
        };
        let state = Managed::<PlacementModel>::state(&placement).unwrap();
        assert_eq!(state.get("host"), &Value::string(host.to_string()));
        assert_eq!(Managed::<PlacementModel>::spec(&state).unwrap(), spec, "host is not sent back");
        let attribute = SCHEMA.block.attributes.iter().find(|a| a.name == "host").unwrap();
        assert!(attribute.is_computed_only(), "users cannot set it");
        assert!(attribute.changes_on_write, "a changed placement may move: its host is unknown until applied");
    }

    fn state(json: serde_json::Value) -> Value {
        Value::from_json(&json, &SCHEMA.value_type()).unwrap()
    }

    /// The plan of `config` over `prior`, with Terraform's proposal (configuration plus the
    /// prior computed values).
    fn plan(prior: &Value, config: &Value) -> crate::planning::Plan {
        let mut proposed = config.clone();
        for name in ["id", "revision", "host"] {
            proposed.set(name, prior.get(name).clone());
        }
        crate::planning::plan(&SCHEMA.block, prior, &proposed, config)
    }

    #[test]
    fn moving_the_application_is_an_update_in_place() {
        let (application_id, dev1, dev2) = (ApplicationId::new(), DeviceId::new(), DeviceId::new());
        let prior = state(serde_json::json!({
            "id": edgible::model::PlacementId::new(), "revision": 4, "application_id": application_id,
            "strategy": "serving-device", "device_id": dev1, "host": dev1,
        }));
        let to_dev2 = state(serde_json::json!({
            "application_id": application_id, "strategy": "serving-device", "device_id": dev2,
        }));
        let outcome = plan(&prior, &to_dev2);
        assert!(outcome.requires_replace.is_empty(), "a move must never destroy the placement");
        assert_eq!(outcome.planned.get("device_id"), &Value::string(dev2.to_string()));
        assert_eq!(outcome.planned.get("id"), prior.get("id"), "the same placement");
        assert!(outcome.planned.get("host").is_unknown(), "where it ends up is known after the migration");
        assert!(outcome.planned.get("revision").is_unknown());

        let to_cloud = state(serde_json::json!({
            "application_id": application_id, "strategy": "cloud", "region": "eu-west",
        }));
        assert!(plan(&prior, &to_cloud).requires_replace.is_empty(), "to the cloud too");

        let other_application = state(serde_json::json!({
            "application_id": ApplicationId::new(), "strategy": "serving-device", "device_id": dev1,
        }));
        assert_eq!(plan(&prior, &other_application).requires_replace, [AttributePath::attribute("application_id")]);
    }

    #[test]
    fn the_migration_timeout_is_a_provider_setting() {
        let (application_id, dev1) = (ApplicationId::new(), DeviceId::new());
        let config = state(serde_json::json!({
            "application_id": application_id, "strategy": "serving-device", "device_id": dev1,
            "migration_timeout_seconds": 60,
        }));
        let resource = Managed::<PlacementModel>::new();
        assert!(resource.validate(&config).is_empty(), "{}", resource.validate(&config));
        let spec = Managed::<PlacementModel>::spec(&config).expect("not sent to the server");
        assert_eq!(spec, PlacementSpec::ServingDevice { application_id, device_id: dev1 });
        assert_eq!(migration_timeout(&config), Duration::from_secs(60));
        let mut unset = config.clone();
        unset.set("migration_timeout_seconds", Value::Null);
        assert_eq!(migration_timeout(&unset), DEFAULT_MIGRATION_TIMEOUT);
        let mut zero = config.clone();
        zero.set("migration_timeout_seconds", Value::int(0));
        let diagnostics = resource.validate(&zero);
        assert_eq!(diagnostics.0[0].path, Some(AttributePath::attribute("migration_timeout_seconds")));

        // Changing only the timeout writes nothing: the placement and its revision stay.
        let prior = state(serde_json::json!({
            "id": edgible::model::PlacementId::new(), "revision": 4, "application_id": application_id,
            "strategy": "serving-device", "device_id": dev1, "host": dev1,
        }));
        let outcome = plan(&prior, &config);
        assert_eq!(outcome.planned.get("revision"), &Value::int(4));
        assert_eq!(outcome.planned.get("migration_timeout_seconds"), &Value::int(60));
        assert!(crate::planning::only_local_changes(&SCHEMA.block, &prior, &outcome.planned));
    }

    fn migration(phase: MigrationPhase) -> Migration {
        let application_id = ApplicationId::new();
        let target = DeviceId::new();
        let now = chrono::Utc::now();
        Migration {
            id: edgible::model::MigrationId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            application_id,
            placement_id: edgible::model::PlacementId::new(),
            source: DeviceId::new(),
            target,
            to: PlacementSpec::ServingDevice { application_id, device_id: target },
            stateful: true,
            phase,
            phases: Vec::new(),
            failure: None,
            failed_phase: None,
            rolled_back: false,
            bytes_total: 0,
            bytes_shipped: 0,
            downtime_ms: None,
            created_at: now,
            updated_at: now,
        }
    }

    fn api_error(status: u16) -> ClientError {
        ClientError::Api { status: http::StatusCode::from_u16(status).unwrap(), body: None, raw: "answer".into() }
    }

    /// Answers the readings in order, then the last one again.
    fn script(
        answers: Vec<Result<Migration, ClientError>>,
    ) -> (impl FnMut() -> std::future::Ready<Result<Migration, ClientError>>, std::rc::Rc<std::cell::Cell<usize>>) {
        let reads = std::rc::Rc::new(std::cell::Cell::new(0));
        let counter = reads.clone();
        let mut answers: std::collections::VecDeque<_> = answers.into();
        let read = move || {
            counter.set(counter.get() + 1);
            let answer = if answers.len() > 1 {
                answers.pop_front().unwrap()
            } else {
                match answers.front().unwrap() {
                    Ok(migration) => Ok(migration.clone()),
                    Err(_) => Err(api_error(500)),
                }
            };
            std::future::ready(answer)
        };
        (read, reads)
    }

    const POLL: Duration = Duration::from_millis(2);
    const LONG: Duration = Duration::from_secs(10);

    #[tokio::test]
    async fn waiting_ends_with_the_migration() {
        let (read, reads) = script(vec![
            Ok(migration(MigrationPhase::Preflight)),
            Err(api_error(503)),
            Ok(migration(MigrationPhase::Ship)),
            Ok(migration(MigrationPhase::Completed)),
        ]);
        let Waited::Ended(ended) = wait_for_migration(read, LONG, POLL).await else { panic!("it ended") };
        assert_eq!(ended.phase, MigrationPhase::Completed);
        assert_eq!(reads.get(), 4, "a 503 is retried");

        let mut failed = migration(MigrationPhase::Failed);
        failed.failed_phase = Some(MigrationPhase::Ship);
        let (read, _) = script(vec![Ok(migration(MigrationPhase::Quiesce)), Ok(failed)]);
        assert!(
            matches!(wait_for_migration(read, LONG, POLL).await, Waited::Ended(m) if m.phase == MigrationPhase::Failed)
        );

        let (read, reads) = script(vec![Err(api_error(404)), Ok(migration(MigrationPhase::Completed))]);
        assert!(
            matches!(wait_for_migration(read, LONG, POLL).await, Waited::Unreadable(error) if error.is_not_found())
        );
        assert_eq!(reads.get(), 1, "a 404 is final");
    }

    #[tokio::test]
    async fn waiting_is_bounded_by_the_timeout() {
        let (read, reads) = script(vec![Ok(migration(MigrationPhase::Ship))]);
        let started = std::time::Instant::now();
        let Waited::TimedOut(Some(last)) = wait_for_migration(read, Duration::from_millis(50), POLL).await else {
            panic!("it timed out")
        };
        assert_eq!(last.phase, MigrationPhase::Ship);
        assert!(started.elapsed() < Duration::from_secs(5));
        assert!(reads.get() >= 2, "read until the deadline");
        let (read, _) = script(vec![Err(api_error(502))]);
        assert!(matches!(wait_for_migration(read, Duration::from_millis(20), POLL).await, Waited::TimedOut(None)));
    }

    #[test]
    fn a_failed_migration_is_an_error_naming_the_phase_and_the_reason() {
        let spec = PlacementSpec::ServingDevice { application_id: ApplicationId::new(), device_id: DeviceId::new() };
        let completed = migration(MigrationPhase::Completed);
        assert_eq!(outcome(Waited::Ended(completed.clone()), &spec, LONG).map(|m| m.id), Ok(completed.id));

        let mut failed = migration(MigrationPhase::Failed);
        failed.failed_phase = Some(MigrationPhase::Restore);
        failed.failure = Some("the health check failed on the target".into());
        let diagnostic = outcome(Waited::Ended(failed.clone()), &spec, LONG).unwrap_err();
        assert_eq!(diagnostic.summary, "Migration failed in restore");
        assert!(
            diagnostic.detail.contains("failed in restore: the health check failed on the target."),
            "{diagnostic}"
        );
        assert!(diagnostic.detail.contains(&failed.source.to_string()), "names where it still runs: {diagnostic}");
        assert!(diagnostic.detail.contains("next plan proposes the move again"), "{diagnostic}");
        failed.failure = Some("failed in restore: restore on device d2: unhealthy".into());
        let diagnostic = outcome(Waited::Ended(failed.clone()), &spec, LONG).unwrap_err();
        assert!(diagnostic.detail.contains("failed in restore: restore on device d2: unhealthy."), "{diagnostic}");
        assert_eq!(diagnostic.path, Some(AttributePath::attribute("device_id")));

        let cloud = PlacementSpec::Cloud {
            application_id: ApplicationId::new(),
            pool_id: None,
            region: Some("eu".parse().unwrap()),
        };
        let running = migration(MigrationPhase::Ship);
        let diagnostic = outcome(Waited::TimedOut(Some(running.clone())), &cloud, Duration::from_secs(60)).unwrap_err();
        assert_eq!(diagnostic.summary, "Migration did not finish in time");
        assert!(
            diagnostic.detail.contains(&format!("Migration {} is still in ship after 60 seconds", running.id)),
            "{diagnostic}"
        );
        assert_eq!(diagnostic.path, Some(AttributePath::attribute("region")));

        let diagnostic = outcome(Waited::Unreadable(api_error(403)), &spec, LONG).unwrap_err();
        assert!(diagnostic.detail.contains("follow the migration"), "{diagnostic}");
    }

    #[tokio::test]
    async fn an_update_without_a_migration_ends_at_once() {
        // Nothing is read: the client points nowhere.
        let client = Client::new("http://127.0.0.1:9", "edg_unused").unwrap();
        let placement = Placement {
            id: edgible::model::PlacementId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            revision: 2,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            host: None,
            migration_id: None,
            spec: PlacementSpec::Cloud {
                application_id: ApplicationId::new(),
                pool_id: None,
                region: Some("eu".parse().unwrap()),
            },
        };
        let after = PlacementModel::after_update(&client, placement.clone(), &Value::Null).await;
        assert_eq!(after.ok(), Some(placement));
    }
}
