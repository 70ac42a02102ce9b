//! The Kubernetes client and the namespace scope, from the kubectl flags:
//! `--kubeconfig` (else `$KUBECONFIG`, else `~/.kube/config`, else in-cluster),
//! `--context`, `-n`, `-A`.

use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use crate::cli::GlobalArgs;
use crate::error::{Error, Result};

/// Which namespaces a command looks at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    All,
    Namespace(String),
}

impl Scope {
    /// The namespace of one named object (`-A` with a name makes no sense).
    pub fn single(&self) -> Result<&str> {
        match self {
            Scope::Namespace(ns) => Ok(ns),
            Scope::All => Err(Error::Usage(
                "-A/--all-namespaces cannot be combined with a workload name; use -n NAMESPACE"
                    .into(),
            )),
        }
    }

    pub fn is_all(&self) -> bool {
        matches!(self, Scope::All)
    }
}

/// A connected client and the scope the flags ask for.
pub struct Connection {
    pub client: Client,
    pub scope: Scope,
    /// Whether `-n` was given (some commands default to every namespace).
    pub namespace_given: bool,
}

pub async fn connect(global: &GlobalArgs) -> Result<Connection> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        cluster: None,
        user: None,
    };
    let config = match &global.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path).map_err(|source| Error::Kubeconfig {
                path: Some(path.clone()),
                source,
            })?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .map_err(|source| Error::Kubeconfig {
                    path: Some(path.clone()),
                    source,
                })?
        }
        None if global.context.is_some() => Config::from_kubeconfig(&options)
            .await
            .map_err(|source| Error::Kubeconfig { path: None, source })?,
        None => Config::infer()
            .await
            .map_err(|e| Error::ClientConfig(e.to_string()))?,
    };
    let scope = if global.all_namespaces {
        Scope::All
    } else {
        Scope::Namespace(
            global
                .namespace
                .clone()
                .unwrap_or_else(|| config.default_namespace.clone()),
        )
    };
    let client = Client::try_from(config).map_err(|e| Error::ClientConfig(e.to_string()))?;
    Ok(Connection {
        client,
        scope,
        namespace_given: global.namespace.is_some(),
    })
}
