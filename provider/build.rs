//! Compiles the project's own protocol definitions (`proto/`) with protox, a protobuf compiler
//! written in Rust, so building the provider never needs a system `protoc`.

use std::error::Error;

const PROTOS: &[&str] = &["proto/tfplugin6.proto", "proto/go_plugin.proto"];

fn main() -> Result<(), Box<dyn Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(descriptors)?;
    Ok(())
}
