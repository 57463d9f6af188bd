//! The pure half of reconciliation: from what should run and what runs, the changes to make.
//!
//! No IO and no clock: [`plan`] is a function of its two inputs, so every decision the agent
//! takes about workloads is unit tested here. Backoff is not a planning concern: the plan says
//! that an exited workload must start again, and `apply` decides when.

use std::collections::BTreeMap;
use std::fmt;

use edgible::model::{Application, ApplicationId, Revision};

use super::DesiredState;
use crate::driver::LaunchSpec;

/// What runs, as far as the agent knows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ActualState {
    pub workloads: BTreeMap<ApplicationId, ActualWorkload>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ActualWorkload {
    /// What the workload was started with.
    pub launch: LaunchSpec,
    /// The revision of the application the workload runs.
    pub revision: Revision,
    pub supervision: Supervision,
    pub state: RunState,
}

/// Whether the agent watches the workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Supervision {
    /// Started or adopted by this agent.
    Supervised,
    /// Found in the state directory after an agent restart, not adopted yet.
    Recorded,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunState {
    Running,
    /// It exited (supervised), or is no longer there (recorded).
    Exited,
}

/// One step towards the desired state.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Nothing runs for this application: start it.
    Start { application: Application },
    /// Stop what runs and start the desired version.
    Restart { application: Application, reasons: Vec<RestartReason> },
    /// A previous agent started exactly this: take it over instead of restarting it.
    Adopt { application: Application },
    /// What runs is right, but the application changed in ways that need no restart (its
    /// hostnames, access policy, health check): record the new revision.
    Refresh { application: Application },
    /// The application is no longer placed here.
    Stop { application_id: ApplicationId },
}

impl Change {
    pub fn application_id(&self) -> ApplicationId {
        match self {
            Change::Start { application }
            | Change::Restart { application, .. }
            | Change::Adopt { application }
            | Change::Refresh { application } => application.id,
            Change::Stop { application_id } => *application_id,
        }
    }
}

/// Why a workload is restarted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum RestartReason {
    /// Process, container or VM: a different driver runs it now.
    KindChanged,
    /// The command, arguments, working directory, image, published ports, resources or
    /// volumes changed.
    ProgramChanged,
    EnvChanged,
    PortChanged,
    /// The workload exited (or a recorded one was gone) and must run again.
    Exited,
}

impl RestartReason {
    /// Whether the restart is due to a failure, and is therefore subject to backoff.
    pub fn is_failure(self) -> bool {
        self == RestartReason::Exited
    }
}

impl fmt::Display for RestartReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RestartReason::KindChanged => "workload kind changed",
            RestartReason::ProgramChanged => "program changed",
            RestartReason::EnvChanged => "environment changed",
            RestartReason::PortChanged => "port changed",
            RestartReason::Exited => "workload exited",
        })
    }
}

/// The differences between two launch specs that call for a restart, in a stable order.
pub fn launch_differences(running: &LaunchSpec, desired: &LaunchSpec) -> Vec<RestartReason> {
    let mut reasons = Vec::new();
    if running.kind() != desired.kind() {
        reasons.push(RestartReason::KindChanged);
    } else if running.program != desired.program
        || running.resources != desired.resources
        || running.volumes != desired.volumes
    {
        // A VM's size is part of what runs: new limits need a new guest. New volumes are
        // provisioned (or grown) at the start.
        reasons.push(RestartReason::ProgramChanged);
    }
    if running.env != desired.env {
        reasons.push(RestartReason::EnvChanged);
    }
    if running.port != desired.port {
        reasons.push(RestartReason::PortChanged);
    }
    reasons
}

/// The changes that take `actual` to `desired`: stops first (they free ports), then restarts,
/// starts, adoptions and refreshes, each group in application order.
///
/// An application whose desired revision is older than the one that runs is stale: what runs
/// is kept as it is (adopted or restarted if it is not running, never changed).
pub fn plan(desired: &DesiredState, actual: &ActualState) -> Vec<Change> {
    let mut stops = Vec::new();
    let mut restarts = Vec::new();
    let mut starts = Vec::new();
    let mut adoptions = Vec::new();
    let mut refreshes = Vec::new();

    for application_id in actual.workloads.keys() {
        if !desired.applications.contains_key(application_id) {
            stops.push(Change::Stop { application_id: *application_id });
        }
    }

    for (application_id, application) in &desired.applications {
        let Some(workload) = actual.workloads.get(application_id) else {
            starts.push(Change::Start { application: application.clone() });
            continue;
        };
        let stale = application.revision < workload.revision;
        let mut reasons = if stale {
            Vec::new()
        } else {
            launch_differences(&workload.launch, &LaunchSpec::from_application(application))
        };
        match (workload.supervision, workload.state) {
            (Supervision::Recorded, RunState::Running) if reasons.is_empty() => {
                adoptions.push(Change::Adopt { application: application.clone() });
            }
            (Supervision::Recorded, RunState::Exited) => {
                starts.push(Change::Start { application: application.clone() });
            }
            (_, RunState::Running) if !reasons.is_empty() => {
                restarts.push(Change::Restart { application: application.clone(), reasons });
            }
            (Supervision::Supervised, RunState::Exited) => {
                reasons.push(RestartReason::Exited);
                restarts.push(Change::Restart { application: application.clone(), reasons });
            }
            _ if !stale && application.revision > workload.revision => {
                refreshes.push(Change::Refresh { application: application.clone() });
            }
            _ => {}
        }
    }

    let mut changes = stops;
    changes.extend(restarts);
    changes.extend(starts);
    changes.extend(adoptions);
    changes.extend(refreshes);
    changes
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::reconcile::DesiredUpdate;
    use serde_json::json;

    /// An application running `sh -c script`, with a fixed id per name so that tests can
    /// build several versions of the same application.
    pub(crate) fn application(name: &str, revision: Revision, script: &str) -> Application {
        let id = uuid_for(name);
        serde_json::from_value(json!({
            "id": id,
            "organization_id": "00000000-0000-7000-8000-000000000001",
            "revision": revision,
            "created_at": "2025-01-01T00:00:00Z",
            "updated_at": "2025-01-01T00:00:00Z",
            "spec": {
                "name": name,
                "hostnames": [format!("{name}.example.test")],
                "port": 8080,
                "workload": {"process": {"command": "/bin/sh", "args": ["-c", script]}},
            },
        }))
        .expect("a valid application")
    }

    fn uuid_for(name: &str) -> String {
        let sum = name.bytes().fold(0u64, |sum, byte| sum.wrapping_mul(31).wrapping_add(u64::from(byte)));
        format!("00000000-0000-7000-8000-{:012x}", sum & 0xffff_ffff_ffff)
    }

    fn desired(revision: Revision, applications: Vec<Application>) -> DesiredState {
        let mut state = DesiredState::default();
        state.apply(DesiredUpdate::full(revision, applications));
        state
    }

    fn running(application: &Application, supervision: Supervision, state: RunState) -> ActualWorkload {
        ActualWorkload {
            launch: LaunchSpec::from_application(application),
            revision: application.revision,
            supervision,
            state,
        }
    }

    fn actual(workloads: Vec<(&Application, Supervision, RunState)>) -> ActualState {
        ActualState {
            workloads: workloads
                .into_iter()
                .map(|(application, supervision, state)| (application.id, running(application, supervision, state)))
                .collect(),
        }
    }

    fn with_env(mut application: Application, revision: Revision, name: &str, value: &str) -> Application {
        application.revision = revision;
        application.spec.env.insert(name.parse().expect("a valid name"), value.to_owned());
        application
    }

    #[test]
    fn nothing_to_do_when_everything_runs_as_desired() {
        let web = application("web", 3, "serve");
        let changes =
            plan(&desired(3, vec![web.clone()]), &actual(vec![(&web, Supervision::Supervised, RunState::Running)]));
        assert_eq!(changes, []);
    }

    #[test]
    fn new_applications_start_and_removed_ones_stop() {
        let web = application("web", 3, "serve");
        let old = application("old", 1, "serve");
        let changes =
            plan(&desired(3, vec![web.clone()]), &actual(vec![(&old, Supervision::Supervised, RunState::Running)]));
        assert_eq!(changes, [Change::Stop { application_id: old.id }, Change::Start { application: web }]);
    }

    #[test]
    fn an_env_change_restarts_with_the_reason() {
        let web = application("web", 3, "serve");
        let updated = with_env(web.clone(), 4, "GREETING", "hello");
        let changes =
            plan(&desired(4, vec![updated.clone()]), &actual(vec![(&web, Supervision::Supervised, RunState::Running)]));
        assert_eq!(changes, [Change::Restart { application: updated, reasons: vec![RestartReason::EnvChanged] }]);
    }

    #[test]
    fn program_port_and_kind_changes_are_told_apart() {
        let web = application("web", 3, "serve");
        let mut updated = application("web", 4, "serve --fast");
        updated.spec.port = 9090;
        let changes =
            plan(&desired(4, vec![updated.clone()]), &actual(vec![(&web, Supervision::Supervised, RunState::Running)]));
        assert_eq!(
            changes,
            [Change::Restart {
                application: updated,
                reasons: vec![RestartReason::ProgramChanged, RestartReason::EnvChanged, RestartReason::PortChanged],
            }]
        );

        let mut container = application("web", 5, "serve");
        container.spec.workload = serde_json::from_value(json!({"container": {"image": "web:1"}})).expect("valid");
        let reasons =
            launch_differences(&LaunchSpec::from_application(&web), &LaunchSpec::from_application(&container));
        assert_eq!(reasons, [RestartReason::KindChanged]);
    }

    #[test]
    fn changes_that_need_no_restart_only_refresh() {
        let web = application("web", 3, "serve");
        let mut updated = web.clone();
        updated.revision = 4;
        updated.spec.hostnames.push("www.example.test".parse().expect("valid"));
        let changes =
            plan(&desired(4, vec![updated.clone()]), &actual(vec![(&web, Supervision::Supervised, RunState::Running)]));
        assert_eq!(changes, [Change::Refresh { application: updated }]);
    }

    #[test]
    fn an_exited_workload_restarts() {
        let web = application("web", 3, "serve");
        let changes =
            plan(&desired(3, vec![web.clone()]), &actual(vec![(&web, Supervision::Supervised, RunState::Exited)]));
        assert_eq!(changes, [Change::Restart { application: web.clone(), reasons: vec![RestartReason::Exited] }]);
        assert!(RestartReason::Exited.is_failure());
        assert!(!RestartReason::EnvChanged.is_failure());

        let updated = with_env(web.clone(), 4, "A", "b");
        let changes =
            plan(&desired(4, vec![updated.clone()]), &actual(vec![(&web, Supervision::Supervised, RunState::Exited)]));
        assert_eq!(
            changes,
            [Change::Restart { application: updated, reasons: vec![RestartReason::EnvChanged, RestartReason::Exited] }]
        );
    }

    #[test]
    fn a_recorded_workload_is_adopted_when_it_still_runs_as_desired() {
        let web = application("web", 3, "serve");
        let changes =
            plan(&desired(3, vec![web.clone()]), &actual(vec![(&web, Supervision::Recorded, RunState::Running)]));
        assert_eq!(changes, [Change::Adopt { application: web.clone() }]);

        let changes =
            plan(&desired(3, vec![web.clone()]), &actual(vec![(&web, Supervision::Recorded, RunState::Exited)]));
        assert_eq!(changes, [Change::Start { application: web.clone() }]);

        let updated = with_env(web.clone(), 4, "A", "b");
        let changes =
            plan(&desired(4, vec![updated.clone()]), &actual(vec![(&web, Supervision::Recorded, RunState::Running)]));
        assert_eq!(changes, [Change::Restart { application: updated, reasons: vec![RestartReason::EnvChanged] }]);

        let changes = plan(&desired(4, vec![]), &actual(vec![(&web, Supervision::Recorded, RunState::Running)]));
        assert_eq!(changes, [Change::Stop { application_id: web.id }]);
    }

    #[test]
    fn a_stale_application_never_changes_what_runs() {
        let newer = with_env(application("web", 3, "serve"), 9, "VERSION", "new");
        let stale = with_env(application("web", 3, "serve"), 5, "VERSION", "old");
        let state = desired(10, vec![stale.clone()]);
        assert_eq!(plan(&state, &actual(vec![(&newer, Supervision::Supervised, RunState::Running)])), []);
        assert_eq!(
            plan(&state, &actual(vec![(&newer, Supervision::Recorded, RunState::Running)])),
            [Change::Adopt { application: stale.clone() }]
        );
        assert_eq!(
            plan(&state, &actual(vec![(&newer, Supervision::Supervised, RunState::Exited)])),
            [Change::Restart { application: stale, reasons: vec![RestartReason::Exited] }]
        );
    }

    #[test]
    fn changes_come_in_a_stable_order() {
        let a = application("a", 2, "serve");
        let b = application("b", 2, "serve");
        let c = application("c", 2, "serve");
        let gone = application("gone", 1, "serve");
        let changed = with_env(b.clone(), 3, "X", "y");
        let state = desired(3, vec![a.clone(), changed.clone(), c.clone()]);
        let now = actual(vec![
            (&gone, Supervision::Supervised, RunState::Running),
            (&b, Supervision::Supervised, RunState::Running),
            (&c, Supervision::Recorded, RunState::Running),
        ]);
        let kinds: Vec<(ApplicationId, &str)> = plan(&state, &now)
            .iter()
            .map(|change| {
                let kind = match change {
                    Change::Start { .. } => "start",
                    Change::Restart { .. } => "restart",
                    Change::Adopt { .. } => "adopt",
                    Change::Refresh { .. } => "refresh",
                    Change::Stop { .. } => "stop",
                };
                (change.application_id(), kind)
            })
            .collect();
        assert_eq!(kinds, [(gone.id, "stop"), (b.id, "restart"), (a.id, "start"), (c.id, "adopt")]);
    }
}
