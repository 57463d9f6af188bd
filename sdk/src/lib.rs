//! The Edgible platform as a library: the one model of every platform object, the REST client,
//! the push protocol spoken between the server and agents/edges, and the stack file format.
//!
//! The [`model`] module does no IO; everything that talks to the network lives in [`client`].

pub mod client;
pub mod model;
pub mod protocol;
pub mod stack;
#[cfg(feature = "tunnel")]
pub mod tunnel;

pub use client::{Client, ClientError};
