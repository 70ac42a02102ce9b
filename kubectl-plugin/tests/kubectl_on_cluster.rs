//! `kubectl inference ...` against the local control plane (e2e/cluster.sh),
//! run through the cluster's real `kubectl`, which finds the plugin on PATH.
//!
//! Each test works in its own namespace with device resources named for that
//! test only (`<test>-<pid>.kinf.e2e.rm-abstract.io/gpu`), so tests run in
//! parallel with each other and with other crates' tests. The operator's
//! controller runs in-process (the library's `controller::run`, the code the
//! `rm-operator` binary wires up), watching only the test's namespace.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{IpAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::runtime::events::Reporter;
use kube::runtime::wait::await_condition;
use rm_crds::{DeviceType, InferenceWorkload, Phase};
use rm_e2e_testkit::{Cluster, FIELD_MANAGER, cluster};
use rm_operator::config::{OperatorConfig, Overrides};
use rm_operator::controller::{self, Scope};
use rm_operator::metrics::Metrics;
use serde_json::{Value, json};

fn pid() -> String {
    std::process::id().to_string()
}

/// Resource names and node names private to one test.
struct Private {
    test: &'static str,
}

impl Private {
    fn resource(&self, kind: &str) -> String {
        format!("{}-{}.kinf.e2e.rm-abstract.io/{kind}", self.test, pid())
    }
    fn node(&self, n: &str) -> String {
        format!("kinf-{}-{n}-{}", self.test, pid())
    }
    fn flags(&self) -> Vec<String> {
        vec![
            format!("--resource-name=rbln={}", self.resource("atom")),
            format!("--resource-name=furiosa={}", self.resource("rngd")),
            format!("--resource-name=gpu={}", self.resource("gpu")),
        ]
    }
    fn config(&self) -> OperatorConfig {
        OperatorConfig::load(&Overrides {
            resource_names: vec![
                (DeviceType::Rbln, self.resource("atom")),
                (DeviceType::Furiosa, self.resource("rngd")),
                (DeviceType::Gpu, self.resource("gpu")),
            ],
            ..Default::default()
        })
        .expect("config")
    }
}

/// `kubectl inference ARGS` through the real kubectl, with the plugin's
/// directory first on PATH and the cluster in KUBECONFIG.
fn kubectl_inference(cluster: &Cluster, args: &[&str]) -> Output {
    let plugin_dir = PathBuf::from(env!("CARGO_BIN_EXE_kubectl-inference"))
        .parent()
        .expect("binary directory")
        .to_path_buf();
    let path = std::env::join_paths([plugin_dir, cluster.bin_dir.clone()].into_iter().chain(
        std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()),
    ))
    .expect("PATH");
    Command::new(cluster.bin_dir.join("kubectl"))
        .arg("inference")
        .args(args)
        .env("PATH", path)
        .env("KUBECONFIG", &cluster.kubeconfig)
        .env_remove("NO_COLOR")
        .output()
        .expect("run kubectl")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn ok(out: Output) -> String {
    assert!(
        out.status.success(),
        "kubectl inference failed ({}):\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Golden-output normalisation: the pid in names, ages and times.
fn normalise(text: &str) -> String {
    let text = text.replace(&pid(), "PID");
    let mut out = String::new();
    for line in text.lines() {
        // Nodes of other tests vary; the count of accelerator-less nodes too.
        if line.ends_with("node(s) without accelerators (cpu only).") {
            continue;
        }
        let words: Vec<String> = line
            .split(' ')
            .map(|w| {
                if is_age(w) {
                    "AGE".into()
                } else {
                    w.to_string()
                }
            })
            .collect();
        out.push_str(&words.join(" "));
        out.push('\n');
    }
    // Column widths follow the widest cell; ages change widths. Compare
    // with runs of spaces collapsed.
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("\n")
        .trim_end()
        .to_string()
        + "\n"
}

fn is_age(w: &str) -> bool {
    let units = |c: char| matches!(c, 's' | 'm' | 'h' | 'd' | 'y');
    !w.is_empty()
        && w.chars().next().is_some_and(|c| c.is_ascii_digit())
        && w.chars().last().is_some_and(units)
        && w.chars().all(|c| c.is_ascii_digit() || units(c))
}

fn workload(name: &str, spec: Value) -> InferenceWorkload {
    let mut full = json!({
        "model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "template": {"spec": {"containers": [{"name": "app", "image": "python:3.12"}]}}
    });
    for (k, v) in spec.as_object().expect("object") {
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

/// The operator's controller for one namespace, stopped when dropped.
struct InProcessOperator {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Drop for InProcessOperator {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start_operator(cluster: &Cluster, ns: &str, config: OperatorConfig) -> InProcessOperator {
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let client = cluster.client().await;
    let scope = Scope {
        namespace: Some(ns.to_string()),
    };
    tokio::spawn(controller::run(
        client,
        config,
        scope,
        Arc::new(Metrics::default()),
        Reporter {
            controller: "rm-operator".into(),
            instance: Some(format!("kinf-test-{}", pid())),
        },
        async move {
            let _ = rx.await;
        },
        Arc::new(AtomicBool::new(false)),
    ));
    InProcessOperator { stop: Some(tx) }
}

async fn wait_running(api: &Api<InferenceWorkload>, name: &str, device: DeviceType) {
    let found = tokio::time::timeout(
        Duration::from_secs(90),
        await_condition(api.clone(), name, move |iw: Option<&InferenceWorkload>| {
            iw.and_then(|iw| iw.status.as_ref()).is_some_and(|s| {
                s.phase == Some(Phase::Running)
                    && s.device.as_ref().map(|d| d.device_type) == Some(device)
            })
        }),
    )
    .await;
    if !matches!(found, Ok(Ok(Some(_)))) {
        let now = api.get_opt(name).await.ok().flatten();
        panic!(
            "{name} not Running on {device} within 90s; status: {:?}",
            now.and_then(|i| i.status)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_explain_show_where_a_workload_runs_and_why() {
    let cluster = cluster();
    cluster.install_crds().await;
    let p = Private { test: "why" };
    cluster.add_node(&p.node("atom"), &[(&p.resource("atom"), 1)]);
    cluster.add_node(&p.node("gpu"), &[(&p.resource("gpu"), 4)]);
    let ns = cluster.namespace("kinf-why").await;
    let _operator = start_operator(cluster, &ns, p.config()).await;
    let api: Api<InferenceWorkload> = Api::namespaced(cluster.client().await, &ns);
    api.create(
        &PostParams::default(),
        &workload("llama", json!({"replicas": 2})),
    )
    .await
    .expect("create workload");
    wait_running(&api, "llama", DeviceType::Gpu).await;

    let table = ok(kubectl_inference(cluster, &["status", "-n", &ns]));
    assert_eq!(
        normalise(&table),
        "\
NAME DEVICE RESOURCE READY PHASE REASON ENDPOINT AGE
llama gpu why-PID.kinf.e2e.rm-abstract.io/gpu=1 2/2 Running Selected - AGE
",
        "{table}"
    );

    let detail = ok(kubectl_inference(cluster, &["status", "llama", "-n", &ns]));
    let gpu_node = p.node("gpu");
    let pod_lines: Vec<&str> = detail
        .lines()
        .filter(|l| l.trim_start().starts_with("llama-"))
        .collect();
    assert_eq!(pod_lines.len(), 2, "{detail}");
    for l in &pod_lines {
        assert!(l.contains(&gpu_node), "{detail}");
        assert!(l.contains(&format!("{}=1", p.resource("gpu"))), "{detail}");
        assert!(l.contains("Running"), "{detail}");
    }

    let mut args = vec!["explain", "llama", "-n", &ns];
    let flags = p.flags();
    args.extend(flags.iter().map(String::as_str));
    let explain = ok(kubectl_inference(cluster, &args));
    let want = format!(
        "\
Workload {ns}/llama: device auto, 2 replica(s) of 1 device(s) each
Priority: rbln 100 > furiosa 100 > gpu 75 > cpu 0 (cluster; cpu is the fallback; ties keep the order rbln, furiosa, gpu, cpu)
Candidates:
TYPE PRIORITY RESOURCE NODES FREE REPLICAS THAT FIT
1. rbln 100 why-PID.kinf.e2e.rm-abstract.io/atom 1 1 1 (need 2)
2. furiosa 100 why-PID.kinf.e2e.rm-abstract.io/rngd 0 0 0 (need 2)
-> 3. gpu 75 why-PID.kinf.e2e.rm-abstract.io/gpu 1 4 4 (need 2)
4. cpu 0 - - - unbounded
Decision: gpu (Selected)
chose gpu: first in [rbln, furiosa, gpu, cpu] with room for all 2 replicas; free: rbln 1 (1 replica(s) of 1 fit), furiosa 0 (0 replica(s) of 1 fit), gpu 4 (4 replica(s) of 1 fit), cpu unbounded
Status: the operator reports gpu too.
What would change it:
- nothing while the replicas run: they stay on gpu as long as spec.device, spec.devicePriority and spec.devicesPerReplica are unchanged (no flapping), even when a higher-priority type gets room
- changing one of those fields makes the operator choose again: with today's capacity (this workload's own devices counted as free) it would choose gpu (Selected)
- pods unschedulable on gpu for longer than AGE (the grace period) also make it choose again, without gpu
- for a new choice: 1 more free rbln device(s) (1 more replica(s) of 1 on a node) would make it rbln
- for a new choice: 2 more free furiosa device(s) (2 more replica(s) of 1 on a node) would make it furiosa
- for a new choice: with no free gpu device the choice would be rbln (PartialCapacity)
"
    )
    .replace(&pid(), "PID");
    assert_eq!(normalise(&explain), want, "{explain}");

    // Machine-readable output.
    let json_out = ok(kubectl_inference(
        cluster,
        &["status", "llama", "-n", &ns, "-o", "json"],
    ));
    let v: Value = serde_json::from_str(&json_out).expect("json");
    assert_eq!(v["kind"], "InferenceWorkload");
    assert_eq!(v["status"]["device"]["type"], "gpu");
    assert!(v["metadata"].get("managedFields").is_none());
    let yaml_out = ok(kubectl_inference(
        cluster,
        &["status", "-n", &ns, "-o", "yaml"],
    ));
    let v: Value = serde_yaml::from_str(&yaml_out).expect("yaml");
    assert_eq!(v["kind"], "List");
    assert_eq!(v["items"][0]["metadata"]["name"], "llama");
    let wide = ok(kubectl_inference(
        cluster,
        &[
            "status",
            "-o",
            "wide",
            "--kubeconfig",
            &cluster.kubeconfig.to_string_lossy(),
            "-n",
            &ns,
        ],
    ));
    assert!(
        wide.lines().next().unwrap_or_default().contains("MODEL"),
        "{wide}"
    );
    assert!(
        wide.contains("HuggingFaceTB/SmolLM2-135M-Instruct"),
        "{wide}"
    );
    let all = ok(kubectl_inference(cluster, &["status", "-A"]));
    assert!(
        all.lines()
            .any(|l| l.starts_with(&ns) && l.contains("llama")),
        "{all}"
    );
    assert!(
        !table.contains('\x1b'),
        "no colour when stdout is not a terminal"
    );

    cluster.remove_node(&p.node("atom")).await;
    cluster.remove_node(&p.node("gpu")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn devices_counts_capacity_in_use_and_free_per_node() {
    let cluster = cluster();
    let p = Private { test: "dvc" };
    let (a, b) = (p.node("a"), p.node("b"));
    cluster.add_node(&a, &[(&p.resource("gpu"), 4), (&p.resource("atom"), 2)]);
    cluster.add_node(&b, &[(&p.resource("gpu"), 8)]);
    let client = cluster.client().await;
    // Cordon b: its devices are free but not schedulable.
    Api::<Node>::all(client.clone())
        .patch(
            &b,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Merge(json!({"spec": {"unschedulable": true}})),
        )
        .await
        .expect("cordon");
    let ns = cluster.namespace("kinf-dev").await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "user"},
        "spec": {
            "nodeName": a,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "c", "image": "x",
                "resources": {"limits": {p.resource("gpu"): "3"}}}]
        }
    }))
    .expect("pod");
    pods.create(&PostParams::default(), &pod)
        .await
        .expect("create pod");

    let mut args = vec!["devices"];
    let flags = p.flags();
    args.extend(flags.iter().map(String::as_str));
    let out = ok(kubectl_inference(cluster, &args));
    assert_eq!(
        normalise(&out).replace(&p.test.to_string(), "T"),
        "\
NODE HEALTH TYPE RESOURCE CAPACITY ALLOCATABLE IN USE FREE
kinf-T-a-PID Ready rbln T-PID.kinf.e2e.rm-abstract.io/atom 2 2 0 2
kinf-T-a-PID Ready gpu T-PID.kinf.e2e.rm-abstract.io/gpu 4 4 3 1
kinf-T-b-PID Ready,SchedulingDisabled gpu T-PID.kinf.e2e.rm-abstract.io/gpu 8 8 0 8

TYPE RESOURCE NODES CAPACITY ALLOCATABLE IN USE FREE SCHEDULABLE FREE
rbln T-PID.kinf.e2e.rm-abstract.io/atom 1 2 2 0 2 2
gpu T-PID.kinf.e2e.rm-abstract.io/gpu 2 12 12 3 9 1
",
        "{out}"
    );
    args.extend(["-o", "json"]);
    let v: Value = serde_json::from_str(&ok(kubectl_inference(cluster, &args))).expect("json");
    assert_eq!(v["totals"][1]["schedulableFree"], 1);

    cluster.remove_node(&a).await;
    cluster.remove_node(&b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_have_kubectl_exit_codes_and_say_what_to_do() {
    let cluster = cluster();
    cluster.install_crds().await;
    let ns = cluster.namespace("kinf-err").await;
    let out = kubectl_inference(cluster, &["status", "nope", "-n", &ns]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains(&format!(
            "InferenceWorkload \"nope\" not found in namespace \"{ns}\""
        )),
        "{}",
        stderr(&out)
    );
    let out = kubectl_inference(cluster, &["explain", "nope", "-n", &ns]);
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let out = kubectl_inference(cluster, &["status", "--bogus"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = kubectl_inference(cluster, &["status", "x", "-A"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = kubectl_inference(cluster, &["explain", "x", "--priority=tpu=3"]);
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let out = kubectl_inference(cluster, &["-h"]);
    assert_eq!(out.status.code(), Some(0));
    for cmd in ["status", "devices", "explain", "cache"] {
        assert!(stdout(&out).contains(cmd), "{}", stdout(&out));
    }
    let out = kubectl_inference(cluster, &["status", "-n", &ns]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        stderr(&out).contains("No InferenceWorkloads found"),
        "{}",
        stderr(&out)
    );
    let out = kubectl_inference(
        cluster,
        &["status", "--kubeconfig", "/nonexistent/kubeconfig"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("/nonexistent/kubeconfig"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_prints_a_line_when_a_workload_changes() {
    let cluster = cluster();
    cluster.install_crds().await;
    let ns = cluster.namespace("kinf-watch").await;
    let plugin = PathBuf::from(env!("CARGO_BIN_EXE_kubectl-inference"));
    let mut child = Command::new(&plugin)
        .args(["status", "-w", "-n", &ns])
        .env("KUBECONFIG", &cluster.kubeconfig)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start watch");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let out = child.stdout.take().expect("stdout");
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let next_line = |what: &str| {
        rx.recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("no line for {what} within 30s"))
    };
    let api: Api<InferenceWorkload> = Api::namespaced(cluster.client().await, &ns);
    // Give the watch a moment to start, then create.
    tokio::time::sleep(Duration::from_millis(500)).await;
    api.create(&PostParams::default(), &workload("w", json!({})))
        .await
        .expect("create");
    let header = next_line("the header");
    assert!(header.starts_with("NAME "), "{header}");
    let created = next_line("the new workload");
    assert!(created.starts_with("w "), "{created}");
    assert!(created.contains("<none>"), "{created}");
    api.patch_status(
        "w",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"phase": "Running", "readyReplicas": 1, "replicas": 1,
            "device": {"type": "cpu", "count": 1, "reason": "test"}}}),
        ),
    )
    .await
    .expect("patch status");
    let changed = next_line("the status change");
    assert!(
        changed.contains("Running") && changed.contains("1/1") && changed.contains("cpu"),
        "{changed}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

/// An address the apiserver may proxy to (its pod proxy refuses loopback
/// and link-local addresses): the host end of a test-only veth pair on a
/// private test network made here, so that no traffic leaves the machine or
/// touches its real network.
fn proxyable_host_ip() -> IpAddr {
    const IFACE: &str = "rm-kinf0";
    const ADDR: &str = "10.203.0.1";
    let ip = |args: &[&str]| Command::new("ip").args(args).output();
    let exists = ip(&["addr", "show", "dev", IFACE])
        .map(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(ADDR))
        .unwrap_or(false);
    if !exists {
        // A veth pair whose far end lives in a network namespace of its own:
        // the project's own test network, nothing else on it.
        let _ = ip(&["netns", "add", "rm-kinf"]);
        let _ = ip(&[
            "link", "add", IFACE, "type", "veth", "peer", "name", "rm-kinf1",
        ]);
        let _ = ip(&["link", "set", "rm-kinf1", "netns", "rm-kinf"]);
        let _ = ip(&[
            "netns", "exec", "rm-kinf", "ip", "link", "set", "rm-kinf1", "up",
        ]);
        let _ = ip(&["addr", "add", &format!("{ADDR}/30"), "dev", IFACE]);
        let up = ip(&["link", "set", IFACE, "up"]).expect("the `ip` command (iproute2)");
        assert!(
            up.status.success(),
            "cannot create the test interface {IFACE}: {}",
            String::from_utf8_lossy(&up.stderr)
        );
    }
    ADDR.parse().expect("address")
}

/// A stand-in for the agent's TCP port that answers `GET /v1/cache` with the
/// body shape of the real agent (agent/src/api/mod.rs `cache_list`), and,
/// like it, only to the admin token (401 otherwise).
fn serve_agent_cache(listener: TcpListener, body: String, admin_token: &'static str) {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { break };
            let mut buf = [0u8; 4096];
            let n = s.read(&mut buf).unwrap_or(0);
            let req = String::from_utf8_lossy(&buf[..n]).to_string();
            let authorized = req
                .lines()
                .any(|l| l.eq_ignore_ascii_case(&format!("x-rm-token: {admin_token}")));
            let (status, text) = if req.starts_with("GET /v1/cache ") && !authorized {
                (
                    "401 Unauthorized",
                    r#"{"error":{"status":401}}"#.to_string(),
                )
            } else if req.starts_with("GET /v1/cache ") {
                ("200 OK", body.clone())
            } else {
                ("404 Not Found", "{}".to_string())
            };
            let _ = write!(
                s,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                text.len()
            );
        }
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cache_reads_each_agent_through_the_apiserver_pod_proxy() {
    let cluster = cluster();
    let p = Private { test: "agt" };
    let ns = cluster.namespace("kinf-cache").await;

    // No agents: a friendly message and success.
    let out = kubectl_inference(cluster, &["cache", "-n", &ns]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("No node agents found"),
        "{}",
        stderr(&out)
    );

    let ip = proxyable_host_ip();
    let listener = TcpListener::bind((ip, 0)).expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let now_ms = jiff::Timestamp::now().as_millisecond();
    serve_agent_cache(
        listener,
        json!({
            "entries": [{
                "key": "3f1c0a9e5b7d2c4e6f8a0b1c2d3e4f5a6b7c8d9e0f1a2b3c4d5e6f7a8b9c0d1e",
                "backend": "cpu", "compiler_version": "candle-0.11.1", "device_type": "cpu",
                "model_digest": "sha256:abc", "options": {}, "size_bytes": 283_115_520,
                "created_unix_ms": now_ms - 600_000, "last_used_unix_ms": now_ms - 120_000,
                "in_use": false
            }],
            "total_bytes": 283_115_520, "max_bytes": 10_737_418_240_u64, "compiles": [], "stats": {}
        })
        .to_string(),
        "admin-token-of-the-test-agent",
    );
    // The admin token's Secret, as the chart makes it.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> =
        Api::namespaced(cluster.client().await, &ns);
    secrets
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({
                "metadata": {"name": "rm-agent-admin"},
                "stringData": {"token": "admin-token-of-the-test-agent"}
            }))
            .expect("secret"),
        )
        .await
        .expect("create admin secret");

    let node = p.node("n");
    cluster.add_node(&node, &[]);
    let client = cluster.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let agent = |name: &str| -> Pod {
        serde_json::from_value(json!({
            "metadata": {"name": name, "labels": {"app.kubernetes.io/name": "rm-agent"}},
            "spec": {"nodeName": node, "tolerations": [{"operator": "Exists"}],
                "volumes": [{"name": "admin-token", "secret": {"secretName": "rm-agent-admin"}}],
                "containers": [{"name": "agent", "image": "rm-agent",
                    "ports": [{"name": "metrics", "containerPort": 9464}, {"name": "http", "containerPort": port}]}]}
        }))
        .expect("pod")
    };
    pods.create(&PostParams::default(), &agent("rm-agent-up"))
        .await
        .expect("create agent pod");
    // kwok runs the pod with an IP from its range; point the pod at the
    // stand-in server instead, so the apiserver's pod proxy reaches it.
    tokio::time::timeout(
        Duration::from_secs(30),
        await_condition(pods.clone(), "rm-agent-up", |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref()?.phase.clone()).as_deref() == Some("Running")
        }),
    )
    .await
    .expect("agent pod Running within 30s")
    .expect("watch");
    pods.patch_status(
        "rm-agent-up",
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"podIP": ip.to_string(), "podIPs": [{"ip": ip.to_string()}]}}),
        ),
    )
    .await
    .expect("patch pod IP");

    let out = kubectl_inference(cluster, &["cache", "-n", &ns]);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}{}",
        stdout(&out),
        stderr(&out)
    );
    assert_eq!(
        normalise(&stdout(&out)).replace(&p.test.to_string(), "T"),
        "\
NODE KEY BACKEND DEVICE SIZE HITS LAST USED
kinf-T-n-PID 3f1c0a9e5b7d cpu cpu 270.0MiB - AGE ago

1 cache entry (270.0MiB) on 1 of 1 agent(s).
",
        "{}",
        stdout(&out)
    );
    let v: Value = serde_json::from_str(&ok(kubectl_inference(
        cluster,
        &["cache", "-n", &ns, "-o", "json"],
    )))
    .expect("json");
    assert_eq!(v[0]["entries"][0]["size_bytes"], 283_115_520);

    // An agent that is not reachable: listed apart, exit code 1.
    let mut down = agent("rm-agent-down");
    if let Some(spec) = down.spec.as_mut() {
        spec.node_name = None;
        spec.node_selector = Some([("no-such-node".to_string(), "x".to_string())].into());
    }
    pods.create(&PostParams::default(), &down)
        .await
        .expect("create");
    let out = kubectl_inference(cluster, &["cache", "-n", &ns]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stdout(&out).contains("on 1 of 2 agent(s)"),
        "{}",
        stdout(&out)
    );
    assert!(
        stderr(&out).contains("rm-agent-down on node <none>: not running (phase Pending)"),
        "{}",
        stderr(&out)
    );
    // Leave no agent pods behind for other runs of `cache` to find.
    for name in ["rm-agent-up", "rm-agent-down"] {
        let _ = pods
            .delete(name, &kube::api::DeleteParams::default().grace_period(0))
            .await;
    }
    cluster.remove_node(&node).await;
}
