//! Waiting for deployed applications to run on their devices, showing their progress: what
//! `edgible stack deploy` does after writing, unless told `--no-wait`.
//!
//! Which applications are waited for and what a reported status means are pure functions
//! ([`targets`], [`verdict`]); [`wait`] polls the server until every application runs, one
//! fails (the agent's message is the error), or the timeout passes. Applications whose device
//! has no enrolled agent, or that are not placed on a device, are skipped with a note: nothing
//! would ever report on them.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::Context as _;
use edgible::Client;
use edgible::model::{Application, ApplicationPhase, ApplicationStatus, Device, DeviceState, Name, Placement};
use tokio::time::Instant;

use crate::reports::phase_name;

/// How often statuses are read while waiting.
const POLL_INTERVAL: Duration = Duration::from_millis(250);

/// An application to wait for, and where it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub application: Application,
    pub device: Device,
}

/// An application that is not waited for, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub name: Name,
    pub reason: String,
}

/// The applications named `names` that can be waited for, and the others with the reason.
pub fn targets(
    names: &[Name],
    applications: &[Application],
    placements: &[Placement],
    devices: &[Device],
) -> (Vec<Target>, Vec<Skipped>) {
    let mut targets = Vec::new();
    let mut skipped = Vec::new();
    for name in names {
        let skip = |reason: String| Skipped { name: name.clone(), reason };
        let Some(application) = applications.iter().find(|application| application.spec.name == *name) else {
            skipped.push(skip("it does not exist on the server".to_owned()));
            continue;
        };
        let placement = placements.iter().find(|placement| placement.spec.application_id() == application.id);
        let Some(placement) = placement else {
            skipped.push(skip("it is not placed anywhere".to_owned()));
            continue;
        };
        let Some(device_id) = placement.spec.device_id() else {
            skipped.push(skip("it is placed in the cloud, not on a device".to_owned()));
            continue;
        };
        let Some(device) = devices.iter().find(|device| device.id == device_id) else {
            skipped.push(skip(format!("its device {device_id} does not exist")));
            continue;
        };
        if device.status.public_key.is_none() {
            skipped.push(skip(format!("device {} has no enrolled agent to run it", device.spec.name)));
            continue;
        }
        targets.push(Target { application: application.clone(), device: device.clone() });
    }
    (targets, skipped)
}

/// What a reported status means to someone waiting for the application to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Running,
    /// The device failed to run the current revision: the agent's message.
    Failed(String),
    /// Not there yet: what is happening.
    Waiting(String),
}

pub fn verdict(status: &ApplicationStatus) -> Verdict {
    let current = status.application_revision;
    let with_message = |text: &str| match &status.message {
        Some(message) => format!("{text}: {message}"),
        None => text.to_owned(),
    };
    match status.revision {
        Some(revision) if revision == current => match status.phase {
            ApplicationPhase::Running => Verdict::Running,
            ApplicationPhase::Failed => Verdict::Failed(with_message("failed")),
            phase => Verdict::Waiting(with_message(phase_name(phase))),
        },
        Some(revision) => Verdict::Waiting(format!(
            "waiting for the device to apply revision {current} (it reports revision {revision}: {})",
            phase_name(status.phase)
        )),
        None => Verdict::Waiting(format!("waiting for the device to apply revision {current}")),
    }
}

/// Polls the statuses of `targets` until all run, one fails, or `timeout` passes; progress
/// goes to stderr, one line per change.
pub async fn wait(client: &Client, targets: &[Target], timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    let mut shown: BTreeMap<usize, Verdict> = BTreeMap::new();
    for target in targets {
        if target.device.status.state != DeviceState::Online {
            eprintln!(
                "{}: device {} is offline; waiting for its agent to connect",
                target.application.spec.name, target.device.spec.name
            );
        }
    }
    loop {
        let mut waiting = Vec::new();
        let mut failures = Vec::new();
        for (index, target) in targets.iter().enumerate() {
            if shown.get(&index) == Some(&Verdict::Running) {
                continue;
            }
            let name = &target.application.spec.name;
            let status = client
                .application_status(&target.application.id)
                .await
                .with_context(|| format!("reading the status of application {name}"))?;
            let verdict = verdict(&status);
            if shown.get(&index) != Some(&verdict) {
                let device = &target.device.spec.name;
                match &verdict {
                    Verdict::Running => {
                        eprintln!("{name}: running on {device} (revision {})", status.application_revision)
                    }
                    Verdict::Failed(message) | Verdict::Waiting(message) => eprintln!("{name}: {message}"),
                }
                shown.insert(index, verdict.clone());
            }
            match verdict {
                Verdict::Running => {}
                Verdict::Failed(message) => failures.push(format!("{name} on {}: {message}", target.device.spec.name)),
                Verdict::Waiting(message) => waiting.push(format!("{name} ({message})")),
            }
        }
        if !failures.is_empty() {
            anyhow::bail!("{} of {} applications failed: {}", failures.len(), targets.len(), failures.join("; "));
        }
        if waiting.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "timed out after {} waiting for {}; `edgible app status` and `edgible events` show more",
                describe(timeout),
                waiting.join(", ")
            );
        }
        tokio::time::sleep(POLL_INTERVAL.min(deadline.saturating_duration_since(Instant::now()))).await;
    }
}

/// Parses `300`, `90s`, `5m` or `1h` into a duration.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(index) => text.split_at(index),
        None => (text, "s"),
    };
    let number: u64 = number.parse().map_err(|_| format!("{text:?} is not a duration such as 90s, 5m or 1h"))?;
    let seconds = match unit {
        "s" => number,
        "m" => number.saturating_mul(60),
        "h" => number.saturating_mul(3600),
        _ => return Err(format!("{text:?} is not a duration such as 90s, 5m or 1h")),
    };
    Ok(Duration::from_secs(seconds))
}

fn describe(duration: Duration) -> String {
    format!("{}s", duration.as_secs())
}

#[cfg(test)]
mod tests {
    use edgible::model::{ApplicationId, DeviceId};
    use serde_json::json;

    use super::*;

    fn status(phase: ApplicationPhase, revision: Option<u64>, message: Option<&str>) -> ApplicationStatus {
        ApplicationStatus {
            application_id: ApplicationId::new(),
            application_revision: 5,
            device_id: Some(DeviceId::new()),
            phase,
            message: message.map(str::to_owned),
            revision,
            reported_at: None,
            certificate_expires_at: None,
            certificate_status: None,
        }
    }

    #[test]
    fn only_the_current_revision_running_or_failing_ends_the_wait() {
        assert_eq!(verdict(&status(ApplicationPhase::Running, Some(5), None)), Verdict::Running);
        assert_eq!(
            verdict(&status(ApplicationPhase::Failed, Some(5), Some("exited with status 1"))),
            Verdict::Failed("failed: exited with status 1".into())
        );
        assert_eq!(
            verdict(&status(ApplicationPhase::Starting, Some(5), Some("connection refused"))),
            Verdict::Waiting("starting: connection refused".into())
        );
        // The old version running (or failing) says nothing about the new one.
        assert_eq!(
            verdict(&status(ApplicationPhase::Running, Some(4), None)),
            Verdict::Waiting("waiting for the device to apply revision 5 (it reports revision 4: running)".into())
        );
        assert!(matches!(verdict(&status(ApplicationPhase::Failed, Some(4), None)), Verdict::Waiting(_)));
        assert_eq!(
            verdict(&status(ApplicationPhase::Pending, None, None)),
            Verdict::Waiting("waiting for the device to apply revision 5".into())
        );
    }

    fn object<T: serde::de::DeserializeOwned>(value: serde_json::Value) -> T {
        serde_json::from_value(value).expect("a valid object")
    }

    fn device(name: &str, public_key: Option<&str>) -> Device {
        object(json!({
            "id": DeviceId::new(), "organization_id": edgible::model::OrganizationId::new(), "revision": 1,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z",
            "spec": {"name": name, "pool_id": edgible::model::DevicePoolId::new()},
            "status": {"tunnel_address": "100.96.0.2", "public_key": public_key, "state": "online",
                       "applied_revision": null, "last_seen_at": null},
        }))
    }

    fn application(name: &str) -> Application {
        object(json!({
            "id": ApplicationId::new(), "organization_id": edgible::model::OrganizationId::new(), "revision": 1,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z",
            "spec": {"name": name, "hostnames": [format!("{name}.example.test")], "port": 80,
                     "workload": {"process": {"command": "x"}}},
        }))
    }

    fn placement(application: &Application, spec: serde_json::Value) -> Placement {
        let mut spec = spec;
        spec["application_id"] = json!(application.id);
        object(json!({
            "id": edgible::model::PlacementId::new(), "organization_id": application.organization_id, "revision": 1,
            "created_at": "2025-01-01T00:00:00Z", "updated_at": "2025-01-01T00:00:00Z", "spec": spec,
        }))
    }

    #[test]
    fn applications_nothing_would_report_on_are_skipped_with_a_reason() {
        let enrolled = device("pi", Some("k"));
        let bare = device("nuc", None);
        let (web, api, cron, lost) = (application("web"), application("api"), application("cron"), application("lost"));
        let placements = [
            placement(&web, json!({"strategy": "serving-device", "device_id": enrolled.id})),
            placement(&api, json!({"strategy": "serving-device", "device_id": bare.id})),
            placement(&cron, json!({"strategy": "cloud", "region": "eu-west"})),
        ];
        let names: Vec<Name> = ["web", "api", "cron", "lost", "ghost"].iter().map(|n| n.parse().unwrap()).collect();
        let (targets, skipped) =
            targets(&names, &[web.clone(), api, cron, lost], &placements, &[enrolled.clone(), bare]);
        assert_eq!(targets, [Target { application: web, device: enrolled }]);
        let reasons: Vec<(&str, &str)> =
            skipped.iter().map(|skip| (skip.name.as_str(), skip.reason.as_str())).collect();
        assert_eq!(
            reasons,
            [
                ("api", "device nuc has no enrolled agent to run it"),
                ("cron", "it is placed in the cloud, not on a device"),
                ("lost", "it is not placed anywhere"),
                ("ghost", "it does not exist on the server"),
            ]
        );
    }

    #[test]
    fn durations_take_a_unit() {
        assert_eq!(parse_duration("300"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5 minutes").is_err());
        assert!(parse_duration("").is_err());
    }
}
