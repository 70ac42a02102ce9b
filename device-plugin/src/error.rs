//! Errors of the device plugin, one variant per thing that can fail, each
//! naming its input.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    ConfigRead {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid YAML for the device plugin: {source}")]
    ConfigParse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("invalid configuration: {0}")]
    ConfigInvalid(String),
    #[error("environment variable {name}={value:?} is invalid: {reason}")]
    EnvInvalid {
        name: &'static str,
        value: String,
        reason: String,
    },
    #[error("cannot bind the plugin socket {path}: {source}")]
    Bind {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot connect to {path}: {source}")]
    Connect {
        path: PathBuf,
        source: tonic::transport::Error,
    },
    #[error("kubelet refused registration of {resource}: {status}")]
    Register {
        resource: String,
        status: Box<tonic::Status>,
    },
    #[error("state directory {path}: {source}")]
    State {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token record {path} is malformed: {source}")]
    TokenRecord {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("pod resources API at {path}: {status}")]
    PodResources {
        path: PathBuf,
        status: Box<tonic::Status>,
    },
    #[error("gRPC server for {resource} failed: {source}")]
    Serve {
        resource: String,
        source: tonic::transport::Error,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
