//! What each device should run, and what to tell its agent about it: pure functions, no IO.
//!
//! A device's desired state is the set of applications placed on it, at the device's desired
//! revision: the revision of the last write that changed that set or one of its applications.
//! A session remembers what it has [`Offered`] the agent; when woken it reads the desired state
//! again and sends only the difference, labelled with the newer revision. Nothing is sent for
//! a state that is not newer than what was offered, so revisions only move forward even if
//! reads and wake-ups race.

use std::collections::BTreeMap;

use edgible::model::{Application, ApplicationId, DeviceId, Revision};
use edgible::protocol::v1::ServerMessage;

/// The applications a device should run, at a revision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredState {
    pub revision: Revision,
    pub applications: Vec<Application>,
}

/// What a session has sent its agent: the revision and each application's revision.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Offered {
    pub revision: Revision,
    pub applications: BTreeMap<ApplicationId, Revision>,
}

impl Offered {
    /// The full snapshot of `state` that starts every session; afterwards, `self` is `state`.
    pub fn snapshot(&mut self, state: &DesiredState) -> ServerMessage {
        *self = Offered::of(state);
        ServerMessage::ApplicationUpdate {
            revision: state.revision,
            full: true,
            applications: state.applications.clone(),
            removed: Vec::new(),
        }
    }

    /// The delta from what was offered to `state`, or `None` if `state` is not newer. A newer
    /// state with no change to the applications still yields an (empty) delta, so that the
    /// agent acknowledges the newer revision.
    pub fn delta_to(&mut self, state: &DesiredState) -> Option<ServerMessage> {
        if state.revision <= self.revision {
            return None;
        }
        let changed: Vec<Application> = state
            .applications
            .iter()
            .filter(|application| self.applications.get(&application.id) != Some(&application.revision))
            .cloned()
            .collect();
        let mut removed: Vec<ApplicationId> = self
            .applications
            .keys()
            .filter(|id| !state.applications.iter().any(|application| application.id == **id))
            .copied()
            .collect();
        removed.sort();
        *self = Offered::of(state);
        Some(ServerMessage::ApplicationUpdate { revision: state.revision, full: false, applications: changed, removed })
    }

    fn of(state: &DesiredState) -> Offered {
        Offered {
            revision: state.revision,
            applications: state.applications.iter().map(|application| (application.id, application.revision)).collect(),
        }
    }
}

/// The devices whose desired state a placement change touches: the host it leaves and the
/// host it comes to (once each). A placement's host is the device of a `serving-device`
/// placement or the cloud host the scheduler chose for a `cloud` one.
pub fn placement_devices(before: Option<DeviceId>, after: Option<DeviceId>) -> Vec<DeviceId> {
    match (before, after) {
        (Some(old), Some(new)) if old == new => vec![old],
        (old, new) => old.into_iter().chain(new).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn application(name: &str, revision: Revision) -> Application {
        let spec = serde_json::json!({
            "name": name,
            "hostnames": [format!("{name}.example.test")],
            "workload": {"process": {"command": "/bin/true"}},
            "port": 8080
        });
        Application {
            id: ApplicationId::new(),
            organization_id: edgible::model::OrganizationId::new(),
            revision,
            created_at: chrono::Utc::now(),
            updated_at: chrono::Utc::now(),
            spec: edgible::model::parse_json(spec.to_string().as_bytes()).expect("a valid test application"),
        }
    }

    fn update(message: Option<ServerMessage>) -> (Revision, bool, Vec<(ApplicationId, Revision)>, Vec<ApplicationId>) {
        match message {
            Some(ServerMessage::ApplicationUpdate { revision, full, applications, removed }) => {
                (revision, full, applications.iter().map(|a| (a.id, a.revision)).collect(), removed)
            }
            other => panic!("expected an application update, got {other:?}"),
        }
    }

    #[test]
    fn a_snapshot_offers_everything() {
        let web = application("web", 3);
        let state = DesiredState { revision: 5, applications: vec![web.clone()] };
        let mut offered = Offered::default();
        assert_eq!(update(Some(offered.snapshot(&state))), (5, true, vec![(web.id, 3)], vec![]));
        assert_eq!(offered.revision, 5);
        assert_eq!(offered.delta_to(&state), None, "the same state again is nothing new");
    }

    #[test]
    fn deltas_carry_changed_added_and_removed_applications() {
        let web = application("web", 3);
        let api = application("api", 4);
        let mut offered = Offered::default();
        offered.snapshot(&DesiredState { revision: 4, applications: vec![web.clone(), api.clone()] });

        let mut web_v2 = web.clone();
        web_v2.revision = 6;
        let worker = application("worker", 5);
        let state = DesiredState { revision: 7, applications: vec![web_v2.clone(), worker.clone()] };
        let (revision, full, changed, removed) = update(offered.delta_to(&state));
        assert_eq!((revision, full), (7, false));
        assert_eq!(changed, vec![(web.id, 6), (worker.id, 5)]);
        assert_eq!(removed, vec![api.id]);
    }

    #[test]
    fn older_or_equal_states_are_never_offered() {
        let web = application("web", 3);
        let mut offered = Offered::default();
        offered.snapshot(&DesiredState { revision: 9, applications: vec![web.clone()] });
        assert_eq!(offered.delta_to(&DesiredState { revision: 8, applications: vec![] }), None);
        assert_eq!(offered.delta_to(&DesiredState { revision: 9, applications: vec![] }), None);
        assert_eq!(offered.applications.len(), 1, "a stale read changes nothing");
    }

    #[test]
    fn a_newer_revision_without_changes_is_an_empty_delta() {
        let web = application("web", 3);
        let mut offered = Offered::default();
        offered.snapshot(&DesiredState { revision: 4, applications: vec![web.clone()] });
        // The application moved away and back between two reads.
        let (revision, full, changed, removed) =
            update(offered.delta_to(&DesiredState { revision: 6, applications: vec![web] }));
        assert_eq!((revision, full, changed.len(), removed.len()), (6, false, 0, 0));
    }

    #[test]
    fn placement_changes_touch_the_old_and_the_new_device() {
        let (first, second) = (DeviceId::new(), DeviceId::new());
        assert_eq!(placement_devices(None, Some(first)), vec![first]);
        assert_eq!(placement_devices(Some(first), Some(second)), vec![first, second]);
        assert_eq!(placement_devices(Some(first), Some(first)), vec![first]);
        assert_eq!(placement_devices(Some(first), None), vec![first]);
        assert_eq!(placement_devices(None, None), Vec::<DeviceId>::new());
    }
}
