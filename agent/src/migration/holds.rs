//! Holds: applications whose workload must stay stopped because a migration quiesced them.
//!
//! A hold is taken by `quiesce` and lifted by `resume` or `release`. It is persisted
//! (`<state_dir>/migrations/holds.json`) before it takes effect, so an agent restarted in the
//! middle of a migration does not start the workload again and let it take writes that the
//! snapshot would miss. The reconciler leaves held applications out of its plan (stopping
//! what runs) and reports them `stopped`.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard, PoisonError};

use edgible::model::ApplicationId;

use crate::driver::Wake;
use crate::state::{StateDir, StateError};

/// The subdirectory of the state directory for migrations.
pub const MIGRATIONS_DIR: &str = "migrations";
const HOLDS_FILE: &str = "holds.json";

/// See the module documentation.
#[derive(Debug)]
pub struct Holds {
    state_dir: StateDir,
    held: Mutex<BTreeSet<ApplicationId>>,
    /// Wakes the reconciler when a hold changes.
    wake: Mutex<Option<Wake>>,
}

impl Holds {
    /// The holds persisted in `state_dir` (none if there is no file yet).
    pub fn open(state_dir: StateDir) -> Result<Self, StateError> {
        let held = match state_dir.read_in(MIGRATIONS_DIR, HOLDS_FILE)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt {
                path: state_dir.root().join(MIGRATIONS_DIR).join(HOLDS_FILE),
                source,
            })?,
            None => BTreeSet::new(),
        };
        Ok(Self { state_dir, held: Mutex::new(held), wake: Mutex::new(None) })
    }

    fn held(&self) -> MutexGuard<'_, BTreeSet<ApplicationId>> {
        // Every critical section leaves the set coherent, so a poisoned lock is still usable.
        self.held.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Wakes `wake` (the reconciler's) whenever a hold is taken or lifted.
    pub fn set_wake(&self, wake: Wake) {
        *self.wake.lock().unwrap_or_else(PoisonError::into_inner) = Some(wake);
    }

    pub fn is_held(&self, application_id: ApplicationId) -> bool {
        self.held().contains(&application_id)
    }

    pub fn all(&self) -> BTreeSet<ApplicationId> {
        self.held().clone()
    }

    /// Holds the application's workload stopped; persisted before it takes effect.
    pub fn hold(&self, application_id: ApplicationId) -> Result<(), StateError> {
        self.change(|held| held.insert(application_id))
    }

    /// Lets the application's workload run again.
    pub fn lift(&self, application_id: ApplicationId) -> Result<(), StateError> {
        self.change(|held| held.remove(&application_id))
    }

    fn change(&self, change: impl FnOnce(&mut BTreeSet<ApplicationId>) -> bool) -> Result<(), StateError> {
        {
            let mut held = self.held();
            let mut next = held.clone();
            if !change(&mut next) {
                return Ok(());
            }
            // Serializing a set of ids cannot fail.
            let bytes = serde_json::to_vec_pretty(&next).unwrap_or_default();
            self.state_dir.write_in(MIGRATIONS_DIR, HOLDS_FILE, &bytes)?;
            *held = next;
        }
        if let Some(wake) = self.wake.lock().unwrap_or_else(PoisonError::into_inner).as_ref() {
            wake.wake();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_survive_a_restart_and_lift() {
        let temp = tempfile::tempdir().expect("a temp dir");
        let id = ApplicationId::new();
        let holds = Holds::open(StateDir::open(temp.path()).expect("state dir")).expect("holds");
        assert!(!holds.is_held(id));
        holds.hold(id).expect("held");
        let again = Holds::open(StateDir::open(temp.path()).expect("state dir")).expect("holds");
        assert!(again.is_held(id), "persisted");
        again.lift(id).expect("lifted");
        let third = Holds::open(StateDir::open(temp.path()).expect("state dir")).expect("holds");
        assert!(!third.is_held(id));
    }
}
