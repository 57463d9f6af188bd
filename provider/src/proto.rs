//! Code generated from `proto/` at build time: the Terraform plugin protocol 6 and go-plugin's
//! controller and stdio services.

#[allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
pub mod tfplugin6 {
    tonic::include_proto!("tfplugin6");
}

#[allow(clippy::all, clippy::pedantic, missing_docs, rust_2018_idioms)]
pub mod plugin {
    tonic::include_proto!("plugin");
}
