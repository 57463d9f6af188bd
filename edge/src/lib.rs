//! The Edgible edge: routes incoming TLS connections by the server name of their ClientHello,
//! without decrypting them, to the device that serves that name.
//!
//! The pure protocol core does no IO and is tested with captured bytes and fuzzed
//! (`edge/fuzz/`): [`sni`] reads the requested server name from the first bytes of a
//! connection, [`routes`] maps server names to devices, and [`alert`] builds the TLS alerts
//! that refuse a connection. The PROXY protocol v2 header the edge writes before a client's
//! bytes is encoded by [`edgible::proxy_protocol`], the codec the device's proxy decodes with.
//!
//! Around it, the data path (the default `runtime` feature): [`listener`] accepts connections under the caps of [`limits`],
//! [`splice`] peeks the ClientHello, routes it and splices the encrypted stream to the device,
//! [`acme_http`] serves the HTTP port (ACME HTTP-01 challenges, redirects to https), and
//! [`metrics`] counts it all for the admin port. [`server`] assembles the three ports and
//! drains them at shutdown.
//!
//! The route table comes in through [`route_source::SharedRoutes`], the seam for whatever
//! decides the routes: a static file ([`route_file`], reloaded on SIGHUP), or the server's hub.
//! An enrolled edge ([`enroll`], [`state`]) runs [`hub_client`]: a WebSocket session that
//! receives pushed configurations, gives their peers to the WireGuard [`tunnel`] and their
//! routes to the route table, and reconnects with [`backoff`]. The edge never holds a TLS
//! private key (its only key is its WireGuard key): it cannot read the traffic it forwards,
//! only the ClientHello, which is plaintext.

pub mod alert;
pub mod routes;
pub mod sni;

#[cfg(feature = "runtime")]
pub mod acme_http;
#[cfg(feature = "runtime")]
pub mod backoff;
#[cfg(feature = "runtime")]
pub mod config;
#[cfg(feature = "runtime")]
pub mod enroll;
#[cfg(feature = "runtime")]
pub mod hub_client;
#[cfg(feature = "runtime")]
pub mod limits;
#[cfg(feature = "runtime")]
pub mod listener;
#[cfg(feature = "runtime")]
pub mod metrics;
#[cfg(feature = "runtime")]
pub mod route_file;
#[cfg(feature = "runtime")]
pub mod route_source;
#[cfg(feature = "runtime")]
pub mod server;
#[cfg(feature = "runtime")]
pub mod splice;
#[cfg(feature = "runtime")]
pub mod state;
#[cfg(feature = "runtime")]
pub mod tunnel;

pub use routes::{Route, RouteTable, RouteTarget};
pub use sni::{ServerName, SniError, parse_client_hello};
