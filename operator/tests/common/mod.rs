//! Helpers of the on-cluster operator tests (e2e/cluster.sh): an operator
//! process per test, resource names private to each test, waiting on
//! workloads.
// Each test binary uses its own subset.
#![allow(dead_code)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::Event;
use kube::api::{Api, ListParams};
use kube::runtime::wait::await_condition;
use rm_crds::{DeviceType, InferenceWorkload, Phase};
use rm_e2e_testkit::Cluster;
use serde_json::{Value, json};

/// A running `rm-operator` process, killed when dropped.
pub struct Operator {
    pub child: Child,
    pub metrics_port: u16,
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Operator {
    pub fn metrics(&self) -> String {
        let out = Command::new("curl")
            .args([
                "-fsS",
                &format!("http://127.0.0.1:{}/metrics", self.metrics_port),
            ])
            .output()
            .expect("curl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    pub fn counter(&self, name: &str) -> f64 {
        self.metrics()
            .lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    /// The operator's API writes once they stop growing (a second without
    /// one, at most 20 s): the start of a steady state.
    pub async fn settled_writes(&self) -> f64 {
        let settle = Instant::now();
        let mut writes = self.counter("rm_operator_api_writes_total");
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = self.counter("rm_operator_api_writes_total");
            if now == writes || settle.elapsed() > Duration::from_secs(20) {
                return now;
            }
            writes = now;
        }
    }

    pub fn signal(&self, sig: &str) {
        let _ = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status();
    }
}

/// Resource names private to one test.
pub struct Resources {
    pub atom: String,
    pub rngd: String,
    pub gpu: String,
}

impl Resources {
    pub fn new(test: &str) -> Self {
        let domain = format!("{test}-{}.e2e.rm-abstract.io", std::process::id());
        Self {
            atom: format!("{domain}/atom"),
            rngd: format!("{domain}/rngd"),
            gpu: format!("{domain}/gpu"),
        }
    }

    pub fn args(&self) -> Vec<String> {
        vec![
            format!("--resource-name=rbln={}", self.atom),
            format!("--resource-name=furiosa={}", self.rngd),
            format!("--resource-name=gpu={}", self.gpu),
        ]
    }
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

pub fn start_operator(cluster: &Cluster, ns: &str, res: &Resources, extra: &[&str]) -> Operator {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_rm-operator"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env("RM_LOG", "info,rm_operator=debug,kube=warn")
        .arg(format!("--namespace={ns}"))
        .arg(format!("--metrics-addr=127.0.0.1:{port}"))
        .args(res.args())
        .args(extra)
        .stdout(Stdio::null())
        .spawn()
        .expect("start rm-operator");
    Operator {
        child,
        metrics_port: port,
    }
}

pub fn node_name(test: &str, n: &str) -> String {
    format!("{test}-{n}-{}", std::process::id())
}

/// A workload of SmolLM2 with one plain container, `spec` merged over it.
pub fn workload(name: &str, spec: Value) -> InferenceWorkload {
    workload_over(
        json!({
            "model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"},
            "template": {"spec": {"containers": [{"name": "app", "image": "python:3.12"}]}}
        }),
        name,
        spec,
    )
}

/// A workload of SmolLM2 with no template, `spec` merged over it (served
/// workloads bring `serve`).
pub fn served_workload(name: &str, spec: Value) -> InferenceWorkload {
    workload_over(
        json!({"model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"}}),
        name,
        spec,
    )
}

fn workload_over(mut full: Value, name: &str, spec: Value) -> InferenceWorkload {
    for (k, v) in spec.as_object().expect("object").iter() {
        full[k] = v.clone();
    }
    serde_json::from_value(json!({
        "apiVersion": "rm-abstract.io/v1alpha1",
        "kind": "InferenceWorkload",
        "metadata": {"name": name},
        "spec": full,
    }))
    .expect("workload")
}

pub async fn wait_iw(
    api: &Api<InferenceWorkload>,
    name: &str,
    what: &str,
    secs: u64,
    cond: impl Fn(&InferenceWorkload) -> bool,
) -> InferenceWorkload {
    let found = tokio::time::timeout(
        Duration::from_secs(secs),
        await_condition(api.clone(), name, move |iw: Option<&InferenceWorkload>| {
            iw.is_some_and(&cond)
        }),
    )
    .await;
    let current = api.get_opt(name).await.ok().flatten();
    match found {
        Ok(Ok(Some(iw))) => iw,
        _ => panic!(
            "{name}: not {what} within {secs}s; status: {}",
            serde_json::to_string_pretty(&current.and_then(|i| i.status)).unwrap_or_default()
        ),
    }
}

pub fn device_of(iw: &InferenceWorkload) -> Option<DeviceType> {
    iw.status.as_ref()?.device.as_ref().map(|d| d.device_type)
}

pub fn phase_of(iw: &InferenceWorkload) -> Option<Phase> {
    iw.status.as_ref()?.phase
}

pub fn condition_reason(iw: &InferenceWorkload, type_: &str) -> Option<String> {
    iw.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.clone())
}

pub async fn running_on(
    api: &Api<InferenceWorkload>,
    name: &str,
    device: DeviceType,
) -> InferenceWorkload {
    wait_iw(api, name, &format!("Running on {device}"), 60, |iw| {
        device_of(iw) == Some(device) && phase_of(iw) == Some(Phase::Running)
    })
    .await
}

async fn namespace_events(client: kube::Client, ns: &str) -> Vec<Event> {
    let events: Api<Event> = Api::namespaced(client, ns);
    events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
}

/// (reason, message) of the Events about one object.
pub async fn events_for(client: kube::Client, ns: &str, name: &str) -> Vec<(String, String)> {
    namespace_events(client, ns)
        .await
        .into_iter()
        .filter(|e| e.involved_object.name.as_deref() == Some(name))
        .map(|e| (e.reason.unwrap_or_default(), e.message.unwrap_or_default()))
        .collect()
}

/// "object: message" of the namespace's Events with this reason (the
/// scheduler's `FailedScheduling`, the operator's `Reselected`, ...).
pub async fn events_with_reason(client: kube::Client, ns: &str, reason: &str) -> Vec<String> {
    namespace_events(client, ns)
        .await
        .into_iter()
        .filter(|e| e.reason.as_deref() == Some(reason))
        .map(|e| {
            format!(
                "{}: {}",
                e.involved_object.name.unwrap_or_default(),
                e.message.unwrap_or_default()
            )
        })
        .collect()
}

/// Which of a test's device resources a node offers.
#[derive(Clone, Copy)]
pub enum Dev {
    Atom,
    Rngd,
    Gpu,
}

/// One test's slice of the cluster: kwok nodes with its own device
/// resources, its namespace (CRDs installed) and its operator.
pub struct Setup {
    pub cluster: &'static Cluster,
    pub test: &'static str,
    pub res: Resources,
    pub ns: String,
    pub op: Operator,
    pub client: kube::Client,
    pub api: Api<InferenceWorkload>,
    nodes: Vec<String>,
}

impl Setup {
    /// `nodes`: (short name, device, count); the operator gets `args`.
    pub async fn new(test: &'static str, nodes: &[(&str, Dev, u32)], args: &[&str]) -> Setup {
        let cluster = rm_e2e_testkit::cluster();
        let res = Resources::new(test);
        let mut names = vec![];
        for (n, dev, count) in nodes {
            let resource = match dev {
                Dev::Atom => &res.atom,
                Dev::Rngd => &res.rngd,
                Dev::Gpu => &res.gpu,
            };
            let name = node_name(test, n);
            cluster.add_node(&name, &[(resource, *count)]);
            names.push(name);
        }
        let ns = cluster.namespace(test).await;
        cluster.install_crds().await;
        let op = start_operator(cluster, &ns, &res, args);
        let client = cluster.client().await;
        let api = Api::namespaced(client.clone(), &ns);
        Setup {
            cluster,
            test,
            res,
            ns,
            op,
            client,
            api,
            nodes: names,
        }
    }

    /// The full name of one of the test's nodes.
    pub fn node(&self, short: &str) -> String {
        node_name(self.test, short)
    }

    pub fn kubectl(&self, args: &[&str]) {
        let out = self.cluster.kubectl().args(args).output().expect("kubectl");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Creates a workload (the default SmolLM2 model and container, with
    /// `spec` merged over them).
    pub async fn create(&self, name: &str, spec: Value) {
        self.api
            .create(&kube::api::PostParams::default(), &workload(name, spec))
            .await
            .unwrap_or_else(|e| panic!("create {name}: {e}"));
    }

    pub async fn events_with_reason(&self, reason: &str) -> Vec<String> {
        events_with_reason(self.client.clone(), &self.ns, reason).await
    }

    /// No pod was ever unschedulable, no workload was moved.
    pub async fn assert_no_unschedulable_pod_and_no_move(&self) {
        let failed = self.events_with_reason("FailedScheduling").await;
        assert!(failed.is_empty(), "pods were unschedulable: {failed:?}");
        let moved = self.events_with_reason("Reselected").await;
        assert!(moved.is_empty(), "reselections: {moved:?}");
    }

    /// Removes the test's nodes (the namespace is left to the clean-up).
    pub async fn remove_nodes(&self) {
        for n in &self.nodes {
            self.cluster.remove_node(n).await;
        }
    }
}
