//! The Terraform provider for Edgible, speaking Terraform's plugin protocol 6 over gRPC.
//!
//! - [`plugin`]: go-plugin's handshake, mutual TLS and shutdown; IO lives here and in
//!   [`provider`].
//! - [`provider`]: the `tfplugin6.Provider` service, dispatching to [`resources`] and
//!   [`data_sources`].
//! - [`schema`], [`value`], [`planning`] and [`diagnostics`]: the schema-driven, IO-free core
//!   (wire values, plan semantics, attribute paths).

pub mod config;
pub mod data_sources;
pub mod diagnostics;
pub mod planning;
pub mod plugin;
pub mod proto;
pub mod provider;
pub mod resources;
pub mod schema;
pub mod value;

pub use provider::EdgibleProvider;
