//! The desired state of this device: the applications placed on it, at a revision.
//!
//! Revisions only move forward. The server sends a full snapshot on every (re)connect and
//! deltas in between; an update older than what the agent holds (a delta that arrived late, a
//! replayed snapshot) is ignored, so a lost or reordered message can never roll a device back.

use std::collections::BTreeMap;

use edgible::model::{Application, ApplicationId, Revision};
use edgible::protocol::v1::ServerMessage;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct DesiredState {
    /// The revision of the last update taken, `None` before the first.
    pub revision: Option<Revision>,
    pub applications: BTreeMap<ApplicationId, Application>,
}

/// One `application_update` from the server.
#[derive(Debug, Clone, PartialEq)]
pub struct DesiredUpdate {
    pub revision: Revision,
    /// A full snapshot replaces everything; a delta upserts `applications` and drops `removed`.
    pub full: bool,
    pub applications: Vec<Application>,
    pub removed: Vec<ApplicationId>,
}

impl DesiredUpdate {
    /// A full snapshot.
    pub fn full(revision: Revision, applications: Vec<Application>) -> Self {
        Self { revision, full: true, applications, removed: Vec::new() }
    }

    /// The update a server message carries, if it is one.
    pub fn from_message(message: ServerMessage) -> Option<Self> {
        match message {
            ServerMessage::ApplicationUpdate { revision, full, applications, removed } => {
                Some(Self { revision, full, applications, removed })
            }
            _ => None,
        }
    }
}

/// What became of an update.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpdateOutcome {
    /// The desired state is now at `revision`.
    Taken { revision: Revision },
    /// The update is older than the desired state and was ignored.
    Stale { current: Revision, offered: Revision },
}

impl DesiredState {
    /// Takes an update unless it is stale: older than the current revision, or a delta at the
    /// current revision (already taken). A full snapshot at the current revision is taken, which
    /// is harmless since it must say the same. Within a delta, an application older than the one
    /// held is ignored too.
    pub fn apply(&mut self, update: DesiredUpdate) -> UpdateOutcome {
        if let Some(current) = self.revision
            && (update.revision < current || (update.revision == current && !update.full))
        {
            return UpdateOutcome::Stale { current, offered: update.revision };
        }
        if update.full {
            self.applications =
                update.applications.into_iter().map(|application| (application.id, application)).collect();
        } else {
            for application_id in &update.removed {
                self.applications.remove(application_id);
            }
            for application in update.applications {
                match self.applications.get(&application.id) {
                    Some(held) if held.revision > application.revision => {
                        tracing::debug!(application = %application.id, "ignoring an older version of an application");
                    }
                    _ => {
                        self.applications.insert(application.id, application);
                    }
                }
            }
        }
        self.revision = Some(update.revision);
        UpdateOutcome::Taken { revision: update.revision }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcile::plan::tests::application;

    fn ids(state: &DesiredState) -> Vec<(ApplicationId, Revision)> {
        state.applications.values().map(|application| (application.id, application.revision)).collect()
    }

    #[test]
    fn revisions_only_move_forward() {
        let web = application("web", 5, "echo web");
        let mut state = DesiredState::default();
        assert_eq!(state.apply(DesiredUpdate::full(10, vec![web.clone()])), UpdateOutcome::Taken { revision: 10 });

        let older = DesiredUpdate::full(9, vec![]);
        assert_eq!(state.apply(older), UpdateOutcome::Stale { current: 10, offered: 9 });
        assert_eq!(ids(&state), [(web.id, 5)]);

        let replayed_delta = DesiredUpdate { revision: 10, full: false, applications: vec![], removed: vec![web.id] };
        assert_eq!(state.apply(replayed_delta), UpdateOutcome::Stale { current: 10, offered: 10 });
        assert_eq!(state.applications.len(), 1);

        // A reconnect snapshot at the same revision is taken again, harmlessly.
        assert_eq!(state.apply(DesiredUpdate::full(10, vec![web.clone()])), UpdateOutcome::Taken { revision: 10 });
        assert_eq!(state.revision, Some(10));
    }

    #[test]
    fn deltas_upsert_and_remove() {
        let web = application("web", 5, "echo web");
        let api = application("api", 6, "echo api");
        let mut state = DesiredState::default();
        state.apply(DesiredUpdate::full(6, vec![web.clone(), api.clone()]));

        let mut web_v2 = web.clone();
        web_v2.revision = 7;
        let worker = application("worker", 7, "echo worker");
        let delta = DesiredUpdate {
            revision: 7,
            full: false,
            applications: vec![web_v2, worker.clone()],
            removed: vec![api.id],
        };
        assert_eq!(state.apply(delta), UpdateOutcome::Taken { revision: 7 });
        let mut expected = vec![(web.id, 7), (worker.id, 7)];
        expected.sort();
        assert_eq!(ids(&state), expected);
    }

    #[test]
    fn an_older_application_inside_a_newer_delta_is_ignored() {
        let mut web = application("web", 8, "echo new");
        let mut state = DesiredState::default();
        state.apply(DesiredUpdate::full(8, vec![web.clone()]));
        web.revision = 4;
        let delta = DesiredUpdate { revision: 9, full: false, applications: vec![web.clone()], removed: vec![] };
        assert_eq!(state.apply(delta), UpdateOutcome::Taken { revision: 9 });
        assert_eq!(ids(&state), [(web.id, 8)]);
    }

    #[test]
    fn a_full_snapshot_replaces_everything() {
        let web = application("web", 1, "echo web");
        let api = application("api", 2, "echo api");
        let mut state = DesiredState::default();
        state.apply(DesiredUpdate::full(2, vec![web, api.clone()]));
        state.apply(DesiredUpdate::full(3, vec![api.clone()]));
        assert_eq!(ids(&state), [(api.id, 2)]);
    }

    #[test]
    fn updates_come_from_server_messages() {
        let message =
            ServerMessage::ApplicationUpdate { revision: 4, full: true, applications: vec![], removed: vec![] };
        assert_eq!(DesiredUpdate::from_message(message), Some(DesiredUpdate::full(4, vec![])));
        assert_eq!(DesiredUpdate::from_message(ServerMessage::Ping { nonce: 1 }), None);
    }
}
