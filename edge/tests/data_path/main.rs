//! The edge's data path over real sockets on 127.0.0.1: an in-process edge, device backends on
//! loopback addresses, captured ClientHellos and real rustls clients; and the real binary
//! (ready file, SIGHUP reload, SIGTERM drain).

#![allow(clippy::unwrap_used)]

mod binary;
mod end_to_end_tls;
mod http_port;
mod limits;
mod refusals;
mod resumption;
mod routing;
mod support;
