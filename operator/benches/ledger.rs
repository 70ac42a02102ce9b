//! The cost of one placement decision (`Ledger::choose`, what a reconcile
//! does under the ledger's lock) and of one pod event, as the cluster
//! grows: 100, 1,000 and 5,000 nodes with 10 pods each. Prints the median
//! and p99 of 2,000 decisions per size besides criterion's estimates, the
//! first decision for a template's node constraints (it builds their
//! index), and a pod event with 1 and with 64 indexes kept.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use k8s_openapi::api::core::v1::{Node, Pod};
use rm_crds::InferenceWorkload;
use rm_operator::config::OperatorConfig;
use rm_operator::ledger::Ledger;
use rm_operator::selection::SpreadNow;
use serde_json::json;

const GPU: &str = "nvidia.com/gpu";
const ATOM: &str = "rebellions.ai/ATOM";

fn node(i: usize) -> Node {
    // A third of the nodes have ATOMs, the rest GPUs.
    let (resource, n) = if i % 3 == 0 { (ATOM, 16) } else { (GPU, 8) };
    serde_json::from_value(json!({
        "metadata": {"name": format!("node-{i:05}"), "labels": {"pool": if i % 3 == 0 { "npu" } else { "gpu" }}},
        "status": {
            "allocatable": {"cpu": "32", "pods": "110", resource: n.to_string()},
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    }))
    .unwrap()
}

/// Ten pods per node: two hold a device, the rest none.
fn pods(node_index: usize) -> Vec<Pod> {
    let resource = if node_index % 3 == 0 { ATOM } else { GPU };
    (0..10)
        .map(|j| {
            let limits = if j < 2 {
                json!({resource: "1"})
            } else {
                json!({})
            };
            serde_json::from_value(json!({
                "metadata": {"name": format!("p-{node_index}-{j}"), "namespace": "apps"},
                "spec": {"nodeName": format!("node-{node_index:05}"),
                    "containers": [{"name": "c", "resources": {"limits": limits}}]},
                "status": {"phase": "Running"}
            }))
            .unwrap()
        })
        .collect()
}

fn workload(name: &str, template: serde_json::Value) -> InferenceWorkload {
    serde_json::from_value(json!({
        "apiVersion": "rm-abstract.io/v1alpha1", "kind": "InferenceWorkload",
        "metadata": {"name": name, "namespace": "ml"},
        "spec": {"model": {"source": "org/m"}, "replicas": 2, "template": template}
    }))
    .unwrap()
}

fn cluster(nodes: usize) -> Ledger {
    let config = OperatorConfig::default();
    let ns: Vec<Node> = (0..nodes).map(node).collect();
    let ps: Vec<Pod> = (0..nodes).flat_map(pods).collect();
    Ledger::from_lists(&ns, &ps, &config)
}

fn percentiles(mut xs: Vec<f64>) -> (f64, f64) {
    xs.sort_by(|a, b| a.total_cmp(b));
    (xs[xs.len() / 2], xs[xs.len() * 99 / 100])
}

fn bench(c: &mut Criterion) {
    let config = OperatorConfig::default();
    let plain = workload("plain", json!({"spec": {"containers": [{"name": "app"}]}}));
    let pinned = workload(
        "pinned",
        json!({"spec": {"containers": [{"name": "app"}], "nodeSelector": {"pool": "gpu"}}}),
    );
    let none = SpreadNow::default();
    for nodes in [100, 1_000, 5_000] {
        let ledger = cluster(nodes);
        for (label, iw) in [("plain", &plain), ("nodeSelector", &pinned)] {
            let key = ("ml".to_string(), format!("{label}-{nodes}"));
            let t = Instant::now();
            std::hint::black_box(ledger.choose(&key, iw, &config, None, &none, 0));
            println!(
                "choose, {label}, {nodes} nodes: first decision {:.1} µs",
                t.elapsed().as_secs_f64() * 1e6
            );
            let mut times = Vec::with_capacity(2_000);
            for _ in 0..2_000 {
                let t = Instant::now();
                std::hint::black_box(ledger.choose(&key, iw, &config, None, &none, 0));
                times.push(t.elapsed().as_secs_f64() * 1e6);
            }
            let (p50, p99) = percentiles(times);
            println!(
                "choose, {label}, {nodes} nodes, {} pods: p50 {p50:.1} µs, p99 {p99:.1} µs",
                nodes * 10
            );
            c.bench_function(&format!("choose/{label}/{nodes}-nodes"), |b| {
                b.iter(|| ledger.choose(&key, iw, &config, None, &none, 0))
            });
        }
        // A pod event: bind and unbind one device pod.
        let mut pod = pods(1).remove(0);
        let bound = pod.clone();
        pod.spec.as_mut().unwrap().node_name = None;
        let unbound = pod;
        c.bench_function(&format!("pod-event/{nodes}-nodes/2-indexes"), |b| {
            b.iter(|| {
                ledger.apply_pod(&unbound);
                ledger.apply_pod(&bound);
            })
        });
        // 62 more templates, each with node constraints of its own.
        for i in 0..62 {
            let iw = workload(
                "own",
                json!({"spec": {"containers": [{"name": "app"}], "nodeSelector": {"pool": "gpu", "team": format!("t{i}")}}}),
            );
            ledger.choose(
                &("ml".to_string(), format!("own-{i}")),
                &iw,
                &config,
                None,
                &none,
                0,
            );
        }
        c.bench_function(&format!("pod-event/{nodes}-nodes/64-indexes"), |b| {
            b.iter(|| {
                ledger.apply_pod(&unbound);
                ledger.apply_pod(&bound);
            })
        });
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
