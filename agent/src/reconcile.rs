//! Reconciliation: making what runs on this device match what the server says should.
//!
//! - [`desired`]: the desired state and its revision ordering (stale updates are ignored).
//! - [`plan`]: the pure decision, `plan(desired, actual) -> Vec<Change>`.
//! - [`apply`]: the loop that observes, plans, executes through the drivers, backs off,
//!   persists and reports.

pub mod apply;
pub mod desired;
pub mod plan;

pub use apply::{AgentReport, Drivers, ReconcileError, Reconciler, ReconcilerConfig, ReconcilerHandle, Shutdown};
pub use desired::{DesiredState, DesiredUpdate, UpdateOutcome};
pub use plan::{ActualState, ActualWorkload, Change, RestartReason, RunState, Supervision, plan};
