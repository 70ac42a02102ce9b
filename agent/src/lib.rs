//! rm-agent: the rm-abstract node agent.
//!
//! It discovers backends (the built-in `cpu` engine and external worker
//! programs), compiles models into a content-addressed cache once per node,
//! executes generation, and serves all of it to pods as HTTP/JSON on a unix
//! socket. `main.rs` only wires these modules together.

pub mod access;
pub mod admission;
pub mod api;
pub mod auth;
pub mod backend;
pub mod cache;
pub mod chat;
pub mod metrics;
pub mod quota;
pub mod service;
pub mod source;
pub mod system;

/// Version of this agent, reported by `/healthz` and `/v1/backends`.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
