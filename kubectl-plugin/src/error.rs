//! Errors of the plugin and the exit code each one maps to.
//!
//! Exit codes follow kubectl: 0 success, 1 an error (including "not found"),
//! 2 a usage error (clap exits with 2 on its own for bad flags).

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read kubeconfig {}: {source}; pass --kubeconfig or set KUBECONFIG", path.as_ref().map_or("(default)".into(), |p| p.display().to_string()))]
    Kubeconfig {
        path: Option<PathBuf>,
        source: kube::config::KubeconfigError,
    },
    #[error("cannot configure a Kubernetes client: {0}")]
    ClientConfig(String),
    #[error(
        "{kind} {name:?} not found in namespace {namespace:?}; list them with `kubectl inference status -A`"
    )]
    NotFound {
        kind: &'static str,
        name: String,
        namespace: String,
    },
    #[error(
        "the InferenceWorkload CRD (inferenceworkloads.rm-abstract.io) is not installed in this cluster; install the rm-abstract chart or `kubectl apply -f crds/inferenceworkload.yaml`"
    )]
    CrdMissing,
    #[error("request to the apiserver failed ({what}): {source}")]
    Kube { what: String, source: kube::Error },
    #[error("watching inferenceworkloads failed: {0}")]
    Watch(String),
    #[error("invalid operator configuration: {0}")]
    Config(#[from] rm_operator::config::ConfigError),
    #[error("{0}")]
    Usage(String),
    #[error("cannot encode the output as {format}: {message}")]
    Encode {
        format: &'static str,
        message: String,
    },
    #[error(
        "{failed} of {total} node agent(s) could not be reached through the apiserver proxy (see above)"
    )]
    AgentsUnreachable { failed: usize, total: usize },
    #[error("cannot write the output: {0}")]
    Output(#[from] std::io::Error),
}

impl Error {
    pub fn exit_code(&self) -> u8 {
        match self {
            Error::Usage(_) => 2,
            _ => 1,
        }
    }

    /// Wraps an apiserver error, naming the request.
    pub fn kube(what: impl Into<String>) -> impl FnOnce(kube::Error) -> Error {
        let what = what.into();
        move |source| {
            if is_crd_missing(&source, &what) {
                Error::CrdMissing
            } else {
                Error::Kube { what, source }
            }
        }
    }
}

/// A 404 on a list of workloads means the resource type itself is unknown.
fn is_crd_missing(e: &kube::Error, what: &str) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404 && what.contains("inferenceworkloads"))
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
