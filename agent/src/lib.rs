//! The Edgible device agent's local core: everything that runs workloads on a device without
//! needing the server. The push session (`control`) and the binary build on it.
//!
//! - [`reconcile`]: desired state with revision ordering, the pure plan, and the apply loop.
//! - [`driver`]: the [`driver::Driver`] trait, the `process` and `container` drivers.
//! - [`health`]: HTTP and TCP health checks and the phases they lead to.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`state`]: the state directory (desired state, what runs, secrets), written atomically.
//! - [`logs`], [`events`]: bounded buffers of workload output and lifecycle events.

pub mod backoff;
pub mod driver;
pub mod events;
pub mod health;
pub mod logs;
pub mod reconcile;
pub mod state;
mod tasks;
