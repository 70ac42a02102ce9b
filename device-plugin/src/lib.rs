//! rm-device-plugin: the kubelet device plugin (API v1beta1) of rm-abstract.
//! It advertises NVIDIA GPUs, Rebellions ATOM and FuriosaAI RNGD NPUs found
//! under a host root, keeps their health current in ListAndWatch, and on
//! Allocate hands out device nodes, env and a per-allocation token for the
//! node agent.

pub mod allocation;
pub mod app;
pub mod config;
pub mod discovery;
pub mod error;
pub mod health;
pub mod podresources;
pub mod registration;
pub mod resource;
pub mod server;
pub mod tokens;
pub mod transport;

pub mod api {
    //! Generated bindings of the kubelet's device-plugin API (v1beta1).
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("v1beta1");
}
pub mod podresources_api {
    //! Generated bindings of the kubelet's PodResources API (v1).
    #![allow(clippy::all, clippy::pedantic, missing_docs)]
    tonic::include_proto!("v1");
}
