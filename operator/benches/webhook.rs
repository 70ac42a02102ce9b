//! Handler time per pod: one AdmissionReview in, the JSON patch out
//! (parsing, decision, patch, serialization), without TLS or HTTP.
//! Prints p50/p99 over 20 000 calls besides criterion's estimate.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Instant;

use criterion::{Criterion, criterion_group, criterion_main};
use rm_operator::webhook::inject::InjectConfig;
use rm_operator::webhook::server::{WebhookState, review};
use serde_json::json;

fn body(containers: usize) -> Vec<u8> {
    let containers: Vec<_> = (0..containers)
        .map(|i| {
            json!({"name": format!("c{i}"), "image": "python:3.12-slim",
                "env": [{"name": "PYTHONPATH", "value": "/app"}, {"name": "HF_HOME", "value": "/cache"}],
                "resources": {"limits": {"memory": "8Gi"}, "requests": {"cpu": "2"}},
                "volumeMounts": [{"name": "cache", "mountPath": "/cache"}]})
        })
        .collect();
    serde_json::to_vec(&json!({
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "0d9b7e0c-1111-2222-3333-444455556666",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ns", "operation": "CREATE", "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": {"apiVersion": "v1", "kind": "Pod",
                "metadata": {"generateName": "llama-7d9f-", "namespace": "ns",
                    "labels": {"rm-abstract.io/inject": "true", "rm-abstract.io/workload": "llama", "pod-template-hash": "7d9f"},
                    "annotations": {"rm-abstract.io/compile-options": "{\"precision\":\"bf16\"}"}},
                "spec": {"containers": containers, "volumes": [{"name": "cache", "emptyDir": {}}],
                    "restartPolicy": "Always", "dnsPolicy": "ClusterFirst"}}
        }
    }))
    .unwrap()
}

fn percentiles(state: &WebhookState, body: &[u8]) -> (f64, f64) {
    let mut t: Vec<f64> = (0..20_000)
        .map(|_| {
            let s = Instant::now();
            let (status, out) = review(state, body);
            assert!(status.is_success() && !out.is_empty());
            s.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    t.sort_by(|a, b| a.total_cmp(b));
    (t[t.len() / 2], t[t.len() * 99 / 100])
}

fn bench(c: &mut Criterion) {
    let state = WebhookState {
        inject: Arc::new(InjectConfig::default()),
        namespaces: None,
    };
    for n in [1usize, 4] {
        let b = body(n);
        let (p50, p99) = percentiles(&state, &b);
        println!("webhook handler, {n} container(s): p50 {p50:.1} µs, p99 {p99:.1} µs per pod");
        c.bench_function(&format!("mutate_pod_{n}_containers"), |bench| {
            bench.iter(|| review(&state, std::hint::black_box(&b)))
        });
    }
}

criterion_group!(benches, bench);
criterion_main!(benches);
