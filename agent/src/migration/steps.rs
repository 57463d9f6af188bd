//! The steps this device was given, so that a step the server repeats (same `step_id`, after a
//! reconnect or a server restart) is never run twice: a running one is ignored, an ended one is
//! answered again with its outcome.
//!
//! Ended steps are persisted (`<state_dir>/migrations/steps.json`, the newest
//! [`MAX_ENDED`]); running ones are not, because a step that an agent restart interrupted is no
//! longer running and must run again when repeated (every step is safe to redo).

use std::collections::VecDeque;

use edgible::model::MigrationId;
use edgible::protocol::v1::StepOutcome;
use serde::{Deserialize, Serialize};

/// How many ended steps are remembered.
pub const MAX_ENDED: usize = 256;

/// What to do with a step that arrived.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begin {
    /// New: run it.
    Run,
    /// It runs already: its result will be sent when it ends.
    Running,
    /// It ended: answer again with this.
    Ended(StepOutcome),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndedStep {
    pub migration_id: MigrationId,
    pub step_id: u64,
    pub outcome: StepOutcome,
}

/// See the module documentation. Pure: the caller persists [`StepLog::ended`].
#[derive(Debug, Default)]
pub struct StepLog {
    running: Vec<(MigrationId, u64)>,
    ended: VecDeque<EndedStep>,
}

impl StepLog {
    /// A log that remembers `ended` (as persisted).
    pub fn new(ended: Vec<EndedStep>) -> Self {
        let mut ended: VecDeque<EndedStep> = ended.into();
        while ended.len() > MAX_ENDED {
            ended.pop_front();
        }
        Self { running: Vec::new(), ended }
    }

    /// Records the step as running unless it is known.
    pub fn begin(&mut self, migration_id: MigrationId, step_id: u64) -> Begin {
        if let Some(step) = self.ended.iter().find(|step| step.migration_id == migration_id && step.step_id == step_id)
        {
            return Begin::Ended(step.outcome.clone());
        }
        if self.running.contains(&(migration_id, step_id)) {
            return Begin::Running;
        }
        self.running.push((migration_id, step_id));
        Begin::Run
    }

    /// Records how a running step ended.
    pub fn end(&mut self, migration_id: MigrationId, step_id: u64, outcome: StepOutcome) {
        self.running.retain(|running| *running != (migration_id, step_id));
        self.ended.push_back(EndedStep { migration_id, step_id, outcome });
        while self.ended.len() > MAX_ENDED {
            self.ended.pop_front();
        }
    }

    pub fn ended(&self) -> Vec<EndedStep> {
        self.ended.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_step_runs_once_and_is_answered_again_after_it_ended_even_after_a_restart() {
        let migration = MigrationId::new();
        let mut log = StepLog::default();
        assert_eq!(log.begin(migration, 1), Begin::Run);
        assert_eq!(log.begin(migration, 1), Begin::Running, "a repeat while it runs is ignored");
        assert_eq!(log.begin(migration, 2), Begin::Run, "another step of the migration runs");
        let outcome = StepOutcome::Failed { reason: "no".to_owned() };
        log.end(migration, 1, outcome.clone());
        assert_eq!(log.begin(migration, 1), Begin::Ended(outcome.clone()));

        // A restart: ended steps come back from disk, the running one is forgotten.
        let mut restarted = StepLog::new(log.ended());
        assert_eq!(restarted.begin(migration, 1), Begin::Ended(outcome));
        assert_eq!(restarted.begin(migration, 2), Begin::Run, "interrupted steps run again");
        assert_eq!(restarted.begin(MigrationId::new(), 1), Begin::Run, "step ids are per migration");
    }

    #[test]
    fn only_the_newest_ended_steps_are_kept() {
        let migration = MigrationId::new();
        let mut log = StepLog::default();
        for step_id in 0..(MAX_ENDED as u64 + 10) {
            assert_eq!(log.begin(migration, step_id), Begin::Run);
            log.end(migration, step_id, StepOutcome::Done { manifest: None });
        }
        assert_eq!(log.ended().len(), MAX_ENDED);
        assert_eq!(log.begin(migration, 0), Begin::Run, "the oldest was forgotten");
        assert!(matches!(log.begin(migration, MAX_ENDED as u64 + 9), Begin::Ended(_)));
    }
}
