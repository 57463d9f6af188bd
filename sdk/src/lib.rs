//! The Edgible platform as a library: the one model of every platform object, the REST client,
//! the push protocol spoken between the server and agents/edges, the stack file format, and the
//! PROXY protocol v2 codec the edge and the device's proxy share.
//!
//! The [`model`], [`access`] and [`proxy_protocol`] modules do no IO; everything that talks to the network
//! lives in [`client`].

pub mod access;
pub mod client;
pub mod model;
pub mod protocol;
pub mod proxy_protocol;
pub mod stack;
#[cfg(feature = "tunnel")]
pub mod tunnel;

pub use client::{Client, ClientError};
