//! rm-operator: reconciles `InferenceWorkload`s into Deployments on the
//! device type picked by priority and free capacity.
//!
//! The decisions are pure functions (`capacity`, `selection`, `render`,
//! `status`) tested without a cluster; `controller` is the thin shell that
//! feeds them from watch caches and writes their results.

pub mod capacity;
pub mod config;
pub mod constraints;
pub mod controller;
pub mod leader;
pub mod ledger;
pub mod metrics;
pub mod own_writes;
pub mod placement;
pub mod render;
pub mod selection;
pub mod serve;
pub mod server;
pub mod status;
pub mod webhook;
pub mod workload_pods;
