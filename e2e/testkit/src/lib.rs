//! Integration-test access to the local control plane of `e2e/cluster.sh`.
//!
//! The first call to [`cluster`] in a test process runs `e2e/cluster.sh up`,
//! which builds the binaries once (cached), starts the control plane or
//! reuses a running one, and prints the kubeconfig path. Every test then works
//! in a namespace of its own ([`Cluster::namespace`]) so tests run in parallel
//! and never see each other's objects.
#![allow(clippy::unwrap_used, clippy::expect_used)] // test support: fail loudly

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use k8s_openapi::api::core::v1::{Namespace, Node};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::wait::{await_condition, conditions};
use kube::{Client, Config};

/// Field manager the tests write with.
pub const FIELD_MANAGER: &str = "rm-e2e-tests";

/// The running local control plane.
#[derive(Debug, Clone)]
pub struct Cluster {
    pub kubeconfig: PathBuf,
    pub bin_dir: PathBuf,
}

/// Root of the repository (the workspace).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .ancestors()
        .nth(2)
        .expect("e2e/testkit sits two levels below the repository root")
        .to_path_buf()
}

/// Starts the local control plane, or reuses the running one.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| {
        let script = repo_root().join("e2e/cluster.sh");
        let out = Command::new(&script)
            .arg("up")
            .stderr(std::process::Stdio::inherit())
            .output()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "`e2e/cluster.sh up` failed ({}); its messages above say which component and where its log is",
            out.status
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let kubeconfig = PathBuf::from(
            stdout
                .lines()
                .last()
                .expect("cluster.sh up prints the kubeconfig path last")
                .trim(),
        );
        let bin = Command::new(&script).arg("bin-dir").output().unwrap();
        let bin_dir = PathBuf::from(String::from_utf8_lossy(&bin.stdout).trim());
        Cluster {
            kubeconfig,
            bin_dir,
        }
    })
}

impl Cluster {
    /// A client with the cluster's admin credentials.
    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig readable");
        let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .expect("kubeconfig valid");
        Client::try_from(config).expect("client")
    }

    /// `kubectl` of the cluster's release, pointed at the cluster.
    pub fn kubectl(&self) -> Command {
        let mut cmd = Command::new(self.bin_dir.join("kubectl"));
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        cmd
    }

    /// Adds (or updates) a kwok node with extended resources, e.g.
    /// `[("rebellions.ai/ATOM", 4)]`, and waits until it is Ready.
    pub fn add_node(&self, name: &str, resources: &[(&str, u32)]) {
        let status = Command::new(repo_root().join("e2e/cluster.sh"))
            .arg("node")
            .arg(name)
            .args(resources.iter().map(|(r, n)| format!("{r}={n}")))
            .status()
            .expect("run cluster.sh node");
        assert!(status.success(), "cluster.sh node {name} failed");
    }

    /// Removes a node (pods bound to it are left to the garbage collector).
    pub async fn remove_node(&self, name: &str) {
        let nodes: Api<Node> = Api::all(self.client().await);
        let _ = nodes.delete(name, &DeleteParams::default()).await;
    }

    /// A fresh namespace named `PREFIX-N-PID`, labelled for clean-up.
    pub async fn namespace(&self, prefix: &str) -> String {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "{prefix}-{}-{}",
            COUNTER.fetch_add(1, Ordering::Relaxed),
            std::process::id()
        );
        let ns: Namespace = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"rm-abstract.io/e2e": "true"}}
        }))
        .unwrap();
        Api::<Namespace>::all(self.client().await)
            .create(&PostParams::default(), &ns)
            .await
            .unwrap_or_else(|e| panic!("create namespace {name}: {e}"));
        name
    }

    /// Installs the committed InferenceWorkload CRD and waits until it is Established.
    pub async fn install_crds(&self) {
        let path = repo_root().join("crds/inferenceworkload.yaml");
        let text = std::fs::read_to_string(&path).expect("CRD YAML");
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).expect("CRD YAML parses");
        let name = crd.metadata.name.clone().expect("CRD has a name");
        let api: Api<CustomResourceDefinition> = Api::all(self.client().await);
        api.patch(
            &name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap_or_else(|e| panic!("apply CRD {name}: {e}"));
        tokio::time::timeout(
            Duration::from_secs(30),
            await_condition(api, &name, conditions::is_crd_established()),
        )
        .await
        .expect("CRD Established within 30 s")
        .expect("watch CRD");
    }
}
