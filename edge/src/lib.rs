//! The Edgible edge: routes incoming TLS connections by the server name of their ClientHello,
//! without decrypting them, to the device that serves that name.
//!
//! This crate holds, so far, the edge's pure protocol core: [`sni`] reads the requested server
//! name from the first bytes of a connection and [`routes`] maps server names to devices.
//! Neither does any IO, so both are tested with captured bytes and fuzzed (`edge/fuzz/`).

pub mod routes;
pub mod sni;

pub use routes::{Route, RouteTable, RouteTarget};
pub use sni::{ServerName, SniError, parse_client_hello};
