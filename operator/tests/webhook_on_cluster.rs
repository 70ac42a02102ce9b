//! The admission webhook of rm-operator against the local control plane
//! (e2e/cluster.sh): the real kube-apiserver calls the webhook over TLS on
//! 127.0.0.1 (url clientConfig, CA bundle written by the operator).
//!
//! Isolation: every test runs its own operator with its own
//! MutatingWebhookConfiguration (`rm-e2e-wh-<test>-<pid>`) whose
//! namespaceSelector matches only a label that the test puts on its own
//! namespaces; the configuration is deleted when the test ends (also on
//! failure, by `Drop`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use rm_e2e_testkit::{Cluster, cluster};
use serde_json::{Value, json};

/// Label key that scopes a test's webhook to its namespaces.
const SCOPE_LABEL: &str = "rm-e2e-webhook";

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running operator serving the webhook; killed and its configuration
/// deleted when dropped.
struct Webhook {
    child: Option<Child>,
    config: String,
    scope: String,
    kubectl: Command,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        self.stop();
        let _ = self
            .kubectl
            .args([
                "delete",
                "mutatingwebhookconfiguration",
                &self.config,
                "--ignore-not-found",
                "--wait=false",
            ])
            .stdout(Stdio::null())
            .status();
    }
}

impl Webhook {
    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Starts rm-operator with the webhook for namespaces labelled
/// `rm-e2e-webhook=<test>-<pid>`; its Secret and Lease live in `ops_ns`.
async fn start_webhook(cluster: &Cluster, test: &str, ops_ns: &str, extra: &[&str]) -> Webhook {
    let scope = format!("{test}-{}", std::process::id());
    let config = format!("rm-e2e-wh-{scope}");
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_rm-operator"))
        .env("KUBECONFIG", &cluster.kubeconfig)
        // The benchmark sets RM_WEBHOOK_TEST_LOG=info: a debug line per
        // admission is not what a deployment runs with.
        .env(
            "RM_LOG",
            std::env::var("RM_WEBHOOK_TEST_LOG")
                .unwrap_or_else(|_| "info,rm_operator::webhook=debug".into()),
        )
        .arg(format!("--namespace={ops_ns}"))
        .arg(format!("--lease-namespace={ops_ns}"))
        .arg(format!("--lease-name=wh-{scope}"))
        .arg(format!("--metrics-addr=127.0.0.1:{}", free_port()))
        .arg(format!("--webhook-addr=127.0.0.1:{port}"))
        .arg(format!("--webhook-url=https://127.0.0.1:{port}"))
        .arg("--webhook-dns-names=127.0.0.1,localhost")
        .arg(format!("--webhook-config-name={config}"))
        .arg(format!(
            "--webhook-namespace-selector={SCOPE_LABEL}={scope}"
        ))
        .arg("--webhook-init-image=registry.invalid/rm-abstract/python-init:test")
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start rm-operator");
    let wh = Webhook {
        child: Some(child),
        config,
        scope,
        kubectl: cluster.kubectl(),
    };
    wait_for_configuration(cluster, &wh.config).await;
    wh
}

async fn wait_for_configuration(cluster: &Cluster, name: &str) {
    let api: Api<MutatingWebhookConfiguration> = Api::all(cluster.client().await);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(Some(c)) = api.get_opt(name).await {
            let has_ca = c
                .webhooks
                .iter()
                .flatten()
                .any(|w| w.client_config.ca_bundle.is_some());
            if has_ca {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the operator did not apply {name} with a caBundle within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A namespace in the webhook's scope, with Pod Security `level` enforced
/// (if any) and extra annotations.
async fn scoped_namespace(
    cluster: &Cluster,
    prefix: &str,
    wh: &Webhook,
    level: Option<&str>,
    annotations: Value,
) -> String {
    let ns = cluster.namespace(prefix).await;
    let mut labels = json!({ SCOPE_LABEL: wh.scope });
    if let Some(level) = level {
        labels["pod-security.kubernetes.io/enforce"] = json!(level);
        labels["pod-security.kubernetes.io/enforce-version"] = json!("latest");
    }
    let api: Api<Namespace> = Api::all(cluster.client().await);
    api.patch(
        &ns,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": labels, "annotations": annotations}})),
    )
    .await
    .unwrap();
    ns
}

/// A pod that Pod Security "restricted" admits.
fn restricted_pod(name: &str, annotations: Value) -> Pod {
    serde_json::from_value(json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "app", "image": "python:3.12-alpine", "command": ["python", "-c", "print(1)"],
                "securityContext": {"allowPrivilegeEscalation": false, "capabilities": {"drop": ["ALL"]}},
            }],
        }
    }))
    .unwrap()
}

fn is_injected(p: &Pod) -> bool {
    p.metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("rm-abstract.io/injected"))
}

/// Waits until the apiserver calls the webhook for `ns` (its configuration
/// cache follows the apply within a moment): dry-run creates until injected.
async fn wait_until_injecting(client: &Client, ns: &str) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let deadline = Instant::now() + Duration::from_secs(60);
    let probe = restricted_pod("probe", json!({"rm-abstract.io/inject": "true"}));
    loop {
        if let Ok(p) = pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &probe,
            )
            .await
        {
            if is_injected(&p) {
                return;
            }
        }
        assert!(
            Instant::now() < deadline,
            "the apiserver did not call the webhook for {ns} within 60 s"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The spec of a created pod, ready to be created again under another name.
fn recreate(p: &Pod, name: &str) -> Pod {
    let mut copy = p.clone();
    copy.metadata = kube::api::ObjectMeta {
        name: Some(name.into()),
        annotations: p.metadata.annotations.clone(),
        ..Default::default()
    };
    copy.status = None;
    copy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pods_are_injected_once_and_admitted_under_baseline_and_restricted() {
    let cluster = cluster();
    cluster.install_crds().await;
    let client = cluster.client().await;
    let ops = cluster.namespace("wh-ops").await;
    let wh = start_webhook(cluster, "inject", &ops, &[]).await;

    for level in ["baseline", "restricted"] {
        let ns =
            scoped_namespace(cluster, &format!("wh-{level}"), &wh, Some(level), json!({})).await;
        wait_until_injecting(&client, &ns).await;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);

        let created = pods
            .create(
                &PostParams::default(),
                &restricted_pod("model", json!({"rm-abstract.io/inject": "true"})),
            )
            .await
            .unwrap_or_else(|e| panic!("Pod Security {level} refused the injected pod: {e}"));
        assert!(is_injected(&created), "{level}: not injected");
        let spec = created.spec.as_ref().unwrap();
        let inits = spec.init_containers.as_ref().unwrap();
        assert_eq!(inits.len(), 1);
        assert_eq!(inits[0].name, "rm-abstract-init");
        assert!(
            spec.volumes.iter().flatten().all(|v| v.host_path.is_none()),
            "no hostPath volume"
        );
        let app = &spec.containers[0];
        let env: Vec<_> = app.env.iter().flatten().map(|e| e.name.as_str()).collect();
        for name in [
            "PYTHONPATH",
            "RM_DEVICE",
            "RM_AGENT_SOCKET",
            "RM_CACHE_DIR",
            "RM_INJECTED",
            "RM_POD_UID",
        ] {
            assert!(env.contains(&name), "{level}: {name} missing in {env:?}");
        }
        let limits = app.resources.as_ref().unwrap().limits.as_ref().unwrap();
        assert!(limits.contains_key("rm-abstract.io/agent"));

        // The same spec again (with the injection in it): not injected twice.
        let again = pods
            .create(&PostParams::default(), &recreate(&created, "model-again"))
            .await
            .unwrap();
        let spec2 = again.spec.as_ref().unwrap();
        assert_eq!(
            spec2.init_containers.as_ref().unwrap().len(),
            1,
            "{level}: injected twice"
        );
        assert_eq!(
            spec2
                .volumes
                .iter()
                .flatten()
                .filter(|v| v.name.starts_with("rm-abstract"))
                .count(),
            1
        );
        let env2 = spec2.containers[0]
            .env
            .iter()
            .flatten()
            .filter(|e| e.name == "PYTHONPATH")
            .count();
        assert_eq!(env2, 1);

        // Not selected → unchanged; opted out → unchanged.
        let plain = pods
            .create(&PostParams::default(), &restricted_pod("plain", json!({})))
            .await
            .unwrap();
        assert!(!is_injected(&plain) && plain.spec.unwrap().init_containers.is_none());
        let out = pods
            .create(
                &PostParams::default(),
                &restricted_pod("out", json!({"rm-abstract.io/inject": "false"})),
            )
            .await
            .unwrap();
        assert!(!is_injected(&out));
    }

    // Namespace opt-in by annotation.
    let ns = scoped_namespace(
        cluster,
        "wh-optin",
        &wh,
        None,
        json!({"rm-abstract.io/inject": "true"}),
    )
    .await;
    wait_until_injecting(&client, &ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        // The namespace cache of the webhook follows the annotation shortly.
        let p = pods
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &restricted_pod("ns-opt-in", json!({})),
            )
            .await
            .unwrap();
        if is_injected(&p) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "namespace annotation did not trigger injection"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    drop(wh);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_down_ignore_admits_unmodified_and_fail_rejects_clearly() {
    let cluster = cluster();
    cluster.install_crds().await;
    let client = cluster.client().await;

    for policy in ["Ignore", "Fail"] {
        let ops = cluster.namespace("wh-ops").await;
        let test = format!("down-{}", policy.to_lowercase());
        let mut wh = start_webhook(
            cluster,
            &test,
            &ops,
            &[&format!("--webhook-failure-policy={policy}")],
        )
        .await;
        let ns = scoped_namespace(cluster, &format!("wh-{}", test), &wh, None, json!({})).await;
        wait_until_injecting(&client, &ns).await;
        wh.stop();
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let result = pods
            .create(
                &PostParams::default(),
                &restricted_pod("while-down", json!({"rm-abstract.io/inject": "true"})),
            )
            .await;
        match policy {
            "Ignore" => {
                let p = result.expect("Ignore: the pod is created while the webhook is down");
                assert!(!is_injected(&p));
                assert!(p.spec.unwrap().init_containers.is_none());
            }
            _ => {
                let err = result
                    .expect_err("Fail: the pod is refused while the webhook is down")
                    .to_string();
                assert!(
                    err.contains("pods.inject.rm-abstract.io")
                        && err.contains("failed calling webhook"),
                    "rejection names the webhook: {err}"
                );
            }
        }
        drop(wh);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn certificate_rotation_while_creating_pods_fails_no_admission() {
    let cluster = cluster();
    cluster.install_crds().await;
    let client = cluster.client().await;
    let ops = cluster.namespace("wh-ops").await;
    // A serving certificate of 8 s, renewed 5 s before its end: a new one
    // about every 3 s. failurePolicy Fail, so a failed call fails the create.
    let wh = start_webhook(
        cluster,
        "rotate",
        &ops,
        &[
            "--webhook-failure-policy=Fail",
            "--webhook-cert-validity=8s",
            "--webhook-cert-renew-before=5s",
            &format!("--webhook-secret-namespace={ops}"),
        ],
    )
    .await;
    let ns = scoped_namespace(cluster, "wh-rotate", &wh, None, json!({})).await;
    wait_until_injecting(&client, &ns).await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &ops);

    let mut certs = std::collections::BTreeSet::new();
    let start = Instant::now();
    let mut created = 0;
    let mut i = 0;
    while start.elapsed() < Duration::from_secs(16) {
        let p = pods
            .create(
                &PostParams::default(),
                &restricted_pod(&format!("r-{i}"), json!({"rm-abstract.io/inject": "true"})),
            )
            .await
            .unwrap_or_else(|e| {
                panic!("admission failed during rotation after {created} pods: {e}")
            });
        assert!(is_injected(&p));
        created += 1;
        i += 1;
        if i % 5 == 0 {
            if let Ok(s) = secrets.get("rm-operator-webhook-tls").await {
                certs.insert(s.data.unwrap()["tls.crt"].0.clone());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        certs.len() >= 3,
        "expected at least 3 serving certificates in 16 s, saw {}",
        certs.len()
    );
    eprintln!(
        "rotation: {created} pods admitted across {} certificates",
        certs.len()
    );
    let _ = pods
        .delete_collection(&DeleteParams::default(), &Default::default())
        .await;
    drop(wh);
}

/// Pod creation through the apiserver with and without the webhook, 500
/// each, interleaved: median added latency. Run by e2e/bench/webhook.sh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark: e2e/bench/webhook.sh"]
async fn bench_pod_creation_latency_with_and_without_webhook() {
    let n: usize = std::env::var("RM_BENCH_PODS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(500);
    let cluster = cluster();
    cluster.install_crds().await;
    let client = cluster.client().await;
    let ops = cluster.namespace("wh-ops").await;
    let wh = start_webhook(cluster, "bench", &ops, &[]).await;
    let with_ns = scoped_namespace(cluster, "wh-bench-on", &wh, None, json!({})).await;
    let without_ns = cluster.namespace("wh-bench-off").await;
    wait_until_injecting(&client, &with_ns).await;
    let with: Api<Pod> = Api::namespaced(client.clone(), &with_ns);
    let without: Api<Pod> = Api::namespaced(client.clone(), &without_ns);
    // The pod as the webhook returns it, created where no webhook runs:
    // separates the cost of the call from that of the larger object.
    let shaped = {
        let mut p = with
            .create(
                &PostParams {
                    dry_run: true,
                    ..Default::default()
                },
                &restricted_pod("shape", json!({"rm-abstract.io/inject": "true"})),
            )
            .await
            .unwrap();
        assert!(is_injected(&p));
        p.metadata = Default::default();
        p.status = None;
        p
    };
    let mut t_with = Vec::with_capacity(n);
    let mut t_without = Vec::with_capacity(n);
    let mut t_shaped = Vec::with_capacity(n);
    for i in 0..n {
        let pod = restricted_pod(&format!("b-{i}"), json!({"rm-abstract.io/inject": "true"}));
        for (api, times) in [(&without, &mut t_without), (&with, &mut t_with)] {
            let s = Instant::now();
            let p = api.create(&PostParams::default(), &pod).await.unwrap();
            times.push(s.elapsed().as_secs_f64() * 1e3);
            assert_eq!(is_injected(&p), std::ptr::eq(api, &with));
        }
        let mut pod = shaped.clone();
        pod.metadata.name = Some(format!("s-{i}"));
        let s = Instant::now();
        without.create(&PostParams::default(), &pod).await.unwrap();
        t_shaped.push(s.elapsed().as_secs_f64() * 1e3);
    }
    let stats = |t: &mut Vec<f64>| {
        t.sort_by(|a, b| a.total_cmp(b));
        (t[t.len() / 2], t[t.len() * 99 / 100])
    };
    let (m_with, p99_with) = stats(&mut t_with);
    let (m_without, p99_without) = stats(&mut t_without);
    let (m_shaped, p99_shaped) = stats(&mut t_shaped);
    println!(
        "pod create, {n} pods each: without webhook median {m_without:.2} ms (p99 {p99_without:.2}), \
         with webhook median {m_with:.2} ms (p99 {p99_with:.2}); median added {:.2} ms",
        m_with - m_without
    );
    println!(
        "pod create, the injected pod without webhook: median {m_shaped:.2} ms (p99 {p99_shaped:.2}); \
         of the added time, the larger object {:.2} ms, the webhook call {:.2} ms",
        m_shaped - m_without,
        m_with - m_shaped
    );
    for ns in [&with_ns, &without_ns, &ops] {
        let _ = Api::<Namespace>::all(client.clone())
            .delete(ns, &DeleteParams::default())
            .await;
    }
    drop(wh);
}
