//! The Edgible device agent: a local core that runs workloads on a device without needing the
//! server, and the push session that keeps it in step with the server.
//!
//! - [`enroll`]: the device's key pair and credential, and the identity it keeps.
//! - [`control`]: the push session (WebSocket) with reconnects, acks and reports.
//! - [`datapath`]: the tunnel to the pool's edges, the proxy on the tunnel address, and the
//!   applications' certificates, fed by the push session and the desired state.
//! - [`proxy`]: the device proxy (PROXY v2, TLS by SNI, HTTP or raw TCP to the workload).
//! - [`service`]: `edgible-agent run`, wiring the reconciler, drivers and session together.
//! - [`config`]: the binary's command line.
//! - [`reconcile`]: desired state with revision ordering, the pure plan, and the apply loop.
//! - [`driver`]: the [`driver::Driver`] trait, the `process` and `container` drivers.
//! - [`health`]: HTTP and TCP health checks and the phases they lead to.
//! - [`backoff`]: exponential backoff with full jitter.
//! - [`state`]: the state directory (desired state, what runs, secrets), written atomically.
//! - [`sleep`]: idle detection, wake coalescing and the usage counters of sleeping applications.
//! - [`usage`]: the ledger of usage records (persisted until the server acknowledges them).
//! - [`logs`], [`events`]: bounded buffers of workload output and lifecycle events.
//! - [`volumes`]: the ext4 images of applications' volumes, mounted for their workloads.
//! - [`migration`]: the migration steps the server asks of this device (quiesce, snapshot,
//!   ship, restore, drain, resume, release) and the holds that keep quiesced workloads stopped.

pub mod backoff;
pub mod config;
pub mod control;
pub mod datapath;
pub mod driver;
pub mod enroll;
pub mod events;
pub mod health;
pub mod logs;
pub mod migration;
pub mod proxy;
pub mod reconcile;
pub mod service;
pub mod sleep;
pub mod state;
mod tasks;
pub mod usage;
pub mod volumes;
