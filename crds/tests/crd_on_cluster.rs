//! The InferenceWorkload CRD on a real apiserver (e2e/cluster.sh): it is
//! Established, accepts the examples, rejects invalid specs with messages that
//! name the field, and serves the status and scale subresources. Also proves
//! that kube-scheduler places a pod asking for an extended resource only on a
//! kwok node that has it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{Api, ApiResource, DynamicObject, Patch, PatchParams, PostParams};
use kube::runtime::wait::await_condition;
use rm_crds::{InferenceWorkload, Phase};
use rm_e2e_testkit::{Cluster, FIELD_MANAGER, cluster, repo_root};
use serde_json::{Value, json};

async fn workloads(cluster: &Cluster, ns: &str) -> Api<DynamicObject> {
    cluster.install_crds().await;
    Api::namespaced_with(
        cluster.client().await,
        ns,
        &ApiResource::erase::<InferenceWorkload>(&()),
    )
}

fn workload(name: &str, spec: Value) -> DynamicObject {
    serde_json::from_value(json!({
        "apiVersion": "rm-abstract.io/v1alpha1",
        "kind": "InferenceWorkload",
        "metadata": {"name": name},
        "spec": spec,
    }))
    .unwrap()
}

/// A valid spec to derive invalid ones from.
fn valid_spec() -> Value {
    json!({
        "model": {"source": "HuggingFaceTB/SmolLM2-135M-Instruct"},
        "template": {"spec": {"containers": [{"name": "app", "image": "python:3.12"}]}}
    })
}

fn with(mut spec: Value, path: &[&str], value: Value) -> Value {
    let mut at = &mut spec;
    for key in &path[..path.len() - 1] {
        at = at
            .as_object_mut()
            .unwrap()
            .entry(key.to_string())
            .or_insert_with(|| json!({}));
    }
    at[path[path.len() - 1]] = value;
    spec
}

#[tokio::test]
async fn crd_is_established_and_every_example_is_accepted() {
    let cluster = cluster();
    let ns = cluster.namespace("crd-examples").await;
    let api = workloads(cluster, &ns).await;
    let mut seen = 0;
    for entry in std::fs::read_dir(repo_root().join("examples")).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let obj: DynamicObject = serde_yaml::from_str(&text).unwrap();
        api.create(&PostParams::default(), &obj)
            .await
            .unwrap_or_else(|e| panic!("{} rejected: {e}", path.display()));
        seen += 1;
    }
    assert!(
        seen >= 5,
        "expected the five documented examples, found {seen}"
    );

    // Defaults applied by the apiserver, and the typed view parses them.
    let typed: Api<InferenceWorkload> = Api::namespaced(cluster.client().await, &ns);
    let auto = typed.get("smollm2-auto").await.unwrap();
    assert_eq!(auto.spec.devices_per_replica, 1);
    let rbln = typed.get("llama-rbln").await.unwrap();
    assert_eq!(rbln.spec.device, "rbln");
    assert_eq!(rbln.spec.replicas, 1, "replicas defaults to 1");
    let served = typed.get("smollm2-served").await.unwrap();
    assert!(served.spec.template.is_none());
    assert_eq!(
        served.spec.serve.map(|s| s.port),
        Some(8000),
        "port defaults to 8000"
    );
}

#[tokio::test]
async fn invalid_workloads_are_rejected_with_messages_that_name_the_field() {
    let cluster = cluster();
    let ns = cluster.namespace("crd-invalid").await;
    let api = workloads(cluster, &ns).await;
    let base = valid_spec;
    let cases: Vec<(&str, Value, &[&str])> = vec![
        (
            "unknown-device",
            with(base(), &["device"], json!("tpu")),
            &["spec.device", "must be auto, npu, or one of rbln"],
        ),
        (
            "bad-index",
            with(base(), &["device"], json!("gpu:x")),
            &["spec.device", "optionally followed by :N"],
        ),
        (
            "auto-with-index",
            with(base(), &["device"], json!("auto:1")),
            &["spec.device"],
        ),
        (
            "duplicate-priority",
            with(base(), &["devicePriority"], json!(["gpu", "rbln", "gpu"])),
            &["spec.devicePriority", "must not list a device type twice"],
        ),
        (
            "unknown-priority",
            with(base(), &["devicePriority"], json!(["gpu", "tpu"])),
            &[
                "spec.devicePriority[1]",
                "Unsupported value: \"tpu\"",
                "\"rbln\"",
            ],
        ),
        (
            "empty-priority",
            with(base(), &["devicePriority"], json!([])),
            &["spec.devicePriority", "at least 1"],
        ),
        (
            "zero-devices",
            with(base(), &["devicesPerReplica"], json!(0)),
            &["spec.devicesPerReplica", "greater than or equal to 1"],
        ),
        (
            "negative-replicas",
            with(base(), &["replicas"], json!(-1)),
            &["spec.replicas", "greater than or equal to 0"],
        ),
        (
            "opt-level",
            with(base(), &["compile", "optimizationLevel"], json!(4)),
            &["spec.compile.optimizationLevel", "less than or equal to 3"],
        ),
        (
            "precision",
            with(base(), &["compile", "precision"], json!("fp8")),
            &[
                "spec.compile.precision",
                "Unsupported value: \"fp8\"",
                "\"q8_0\"",
            ],
        ),
        (
            "empty-source",
            with(base(), &["model", "source"], json!("")),
            &["spec.model.source", "must not be empty"],
        ),
        (
            "bad-source",
            with(
                base(),
                &["model", "source"],
                json!("http://example.com/model"),
            ),
            &["spec.model.source", "pvc://CLAIM/PATH"],
        ),
        (
            "container-name",
            with(base(), &["containerName"], json!("missing")),
            &["spec.containerName", "must be the name of one of"],
        ),
        (
            "tensor-parallel",
            with(
                with(base(), &["compile", "tensorParallelSize"], json!(4)),
                &["devicesPerReplica"],
                json!(2),
            ),
            &[
                "spec.compile.tensorParallelSize",
                "cannot exceed spec.devicesPerReplica",
            ],
        ),
        (
            "no-containers",
            with(base(), &["template", "spec", "containers"], json!([])),
            &["spec.template.spec.containers", "at least 1"],
        ),
    ];
    assert!(cases.len() >= 10);
    for (name, spec, wanted) in cases {
        let err = api
            .create(&PostParams::default(), &workload(name, spec))
            .await
            .expect_err(&format!("{name} must be rejected"));
        let msg = err.to_string();
        for w in wanted {
            assert!(msg.contains(w), "{name}: message lacks {w:?}:\n  {msg}");
        }
    }
}

#[tokio::test]
async fn status_and_scale_subresources_work() {
    let cluster = cluster();
    let ns = cluster.namespace("crd-subresources").await;
    let dynamic = workloads(cluster, &ns).await;
    dynamic
        .create(&PostParams::default(), &workload("scaled", valid_spec()))
        .await
        .unwrap();
    let api: Api<InferenceWorkload> = Api::namespaced(cluster.client().await, &ns);

    // Status is written only through the status subresource.
    let status = json!({
        "apiVersion": "rm-abstract.io/v1alpha1",
        "kind": "InferenceWorkload",
        "status": {
            "phase": "Running", "replicas": 1, "readyReplicas": 1, "ready": "1/1",
            "selector": "rm-abstract.io/workload=scaled",
            "device": {"type": "cpu", "count": 1, "reason": "test"}
        }
    });
    api.patch_status(
        "scaled",
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&status),
    )
    .await
    .unwrap();
    let spec_with_status = json!({
        "apiVersion": "rm-abstract.io/v1alpha1",
        "kind": "InferenceWorkload",
        "status": {"phase": "Failed"}
    });
    api.patch(
        "scaled",
        &PatchParams::default(),
        &Patch::Merge(&spec_with_status),
    )
    .await
    .unwrap();
    let got = api.get("scaled").await.unwrap();
    assert_eq!(
        got.status.as_ref().and_then(|s| s.phase),
        Some(Phase::Running),
        "a write to the main resource must not change status"
    );

    // kubectl scale goes through the scale subresource.
    let out = cluster
        .kubectl()
        .args(["scale", "iw/scaled", "--replicas=3", "-n", &ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "kubectl scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let scale = api.get_scale("scaled").await.unwrap();
    assert_eq!(scale.spec.and_then(|s| s.replicas), Some(3));
    let scale_status = scale.status.unwrap();
    assert_eq!(scale_status.replicas, 1);
    assert_eq!(
        scale_status.selector.as_deref(),
        Some("rm-abstract.io/workload=scaled")
    );
    assert_eq!(api.get("scaled").await.unwrap().spec.replicas, 3);

    // The printer columns show device, ready and phase.
    let out = cluster
        .kubectl()
        .args(["get", "iw", "scaled", "-n", &ns, "-o", "wide"])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    let header: Vec<&str> = table.lines().next().unwrap().split_whitespace().collect();
    assert_eq!(
        header,
        [
            "NAME", "DEVICE", "READY", "PHASE", "ENDPOINT", "AGE", "RESOURCE", "MODEL"
        ]
    );
    let row: Vec<&str> = table.lines().nth(1).unwrap().split_whitespace().collect();
    assert_eq!(row[..4], ["scaled", "cpu", "1/1", "Running"]);
    // RESOURCE is empty for cpu, so the model is the last field.
    assert_eq!(row.last(), Some(&"HuggingFaceTB/SmolLM2-135M-Instruct"));
}

#[tokio::test]
async fn a_pod_asking_for_atom_lands_only_on_a_node_that_has_it() {
    let cluster = cluster();
    let pid = std::process::id();
    let with_atom = format!("atom-node-{pid}");
    let without = format!("plain-node-{pid}");
    cluster.add_node(&with_atom, &[("rebellions.ai/ATOM", 2)]);
    cluster.add_node(&without, &[("nvidia.com/gpu", 8)]);
    let ns = cluster.namespace("sched").await;
    let client = cluster.client().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": "wants-atom"},
        "spec": {
            "containers": [{
                "name": "app", "image": "python:3.12",
                "resources": {"limits": {"rebellions.ai/ATOM": "1"}}
            }]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    let running = tokio::time::timeout(
        Duration::from_secs(60),
        await_condition(pods.clone(), "wants-atom", |p: Option<&Pod>| {
            p.and_then(|p| p.status.as_ref())
                .and_then(|s| s.phase.as_deref())
                == Some("Running")
        }),
    )
    .await
    .expect("pod Running within 60 s")
    .unwrap()
    .unwrap();
    let node_name = running.spec.unwrap().node_name.unwrap();
    assert_ne!(node_name, without, "scheduled onto a node without ATOM");
    let node = Api::<Node>::all(client).get(&node_name).await.unwrap();
    let atoms = node
        .status
        .and_then(|s| s.allocatable)
        .and_then(|a| a.get("rebellions.ai/ATOM").cloned());
    assert!(
        atoms.is_some_and(|q| q.0 != "0"),
        "pod landed on {node_name}, which has no rebellions.ai/ATOM"
    );
    pods.delete("wants-atom", &Default::default())
        .await
        .unwrap();
    cluster.remove_node(&with_atom).await;
    cluster.remove_node(&without).await;
}
