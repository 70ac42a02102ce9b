//! Placement under contention (issue 20), on the local control plane
//! (e2e/cluster.sh): real apiserver and kube-scheduler, kwok nodes.
//!
//! Each test runs its own operator on its own namespace and device
//! resource names (`Setup`), so tests run in parallel and never share
//! capacity.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::Dev::{Atom, Gpu};
use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams, PostParams};
use rm_crds::{DeviceType, InferenceWorkload, Phase};
use rm_operator::placement::ready_pods;
use serde_json::json;

fn placements_of(iw: &InferenceWorkload) -> Vec<(DeviceType, i32, i32)> {
    iw.status
        .as_ref()
        .map(|s| {
            s.placements
                .iter()
                .map(|p| (p.device_type, p.replicas, p.ready_replicas))
                .collect()
        })
        .unwrap_or_default()
}

/// Samples a workload's pods every 100 ms while it runs: the fewest ready
/// ones not being deleted (those serve) and the most not being deleted.
struct PodSampler {
    done: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(usize, usize)>,
}

impl PodSampler {
    fn start(pods: Api<Pod>, workload: &str) -> Self {
        let done = Arc::new(AtomicBool::new(false));
        let labels = format!("rm-abstract.io/workload={workload}");
        let task = tokio::spawn({
            let done = done.clone();
            async move {
                let (mut least_ready, mut most_live) = (usize::MAX, 0);
                while !done.load(Ordering::Relaxed) {
                    let live: Vec<Pod> = pods
                        .list(&ListParams::default().labels(&labels))
                        .await
                        .map(|l| l.items)
                        .unwrap_or_default()
                        .into_iter()
                        .filter(|p| p.metadata.deletion_timestamp.is_none())
                        .collect();
                    least_ready = least_ready.min(ready_pods(&live) as usize);
                    most_live = most_live.max(live.len());
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                (least_ready, most_live)
            }
        });
        PodSampler { done, task }
    }

    /// (fewest ready, most live) seen.
    async fn stop(self) -> (usize, usize) {
        self.done.store(true, Ordering::Relaxed);
        self.task
            .await
            .unwrap_or_else(|e| panic!("the pod sampler failed: {e}"))
    }
}

#[tokio::test]
async fn a_burst_of_20_fills_rbln_then_gpu_with_no_unschedulable_pod() {
    let s = Setup::new(
        "burst",
        &[
            ("atom-1", Atom, 4),
            ("atom-2", Atom, 4),
            ("gpu-1", Gpu, 8),
            ("gpu-2", Gpu, 8),
        ],
        &[],
    )
    .await;
    // All 20 at once: the reconciles run concurrently.
    let names: Vec<String> = (0..20).map(|i| format!("burst-{i:02}")).collect();
    futures::future::join_all(names.iter().map(|n| s.create(n, json!({})))).await;
    let mut on = std::collections::BTreeMap::<DeviceType, usize>::new();
    for n in &names {
        let iw = wait_iw(&s.api, n, "Running", 120, |iw| {
            phase_of(iw) == Some(Phase::Running)
        })
        .await;
        *on.entry(device_of(&iw).expect("a device")).or_default() += 1;
    }
    assert_eq!(
        on,
        [(DeviceType::Rbln, 8), (DeviceType::Gpu, 12)].into(),
        "exactly the free ATOMs, the rest on gpu"
    );
    s.assert_no_unschedulable_pod_and_no_move().await;
    let writes = s.op.settled_writes().await;
    eprintln!(
        "burst of 20: {writes} API writes ({:.1} per workload)",
        writes / 20.0
    );
    s.remove_nodes().await;
}

#[tokio::test]
async fn one_freed_device_goes_to_the_oldest_of_ten_waiters_only() {
    let s = Setup::new("tenwait", &[("atom", Atom, 1)], &["--cpu-fallback=false"]).await;
    let only_rbln = json!({"devicePriority": ["rbln"]});
    s.create("holder", only_rbln.clone()).await;
    running_on(&s.api, "holder", DeviceType::Rbln).await;
    let waiters: Vec<String> = (0..10).map(|i| format!("waiter-{i:02}")).collect();
    for w in &waiters {
        s.create(w, only_rbln.clone()).await;
    }
    for w in &waiters {
        wait_iw(&s.api, w, "Pending", 30, |iw| {
            phase_of(iw) == Some(Phase::Pending)
        })
        .await;
    }

    s.api.delete("holder", &Default::default()).await.unwrap();
    running_on(&s.api, "waiter-00", DeviceType::Rbln).await;
    // The others were not sent after the one device: no Deployment, still
    // Pending for want of capacity.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    for w in &waiters[1..] {
        let iw = s.api.get(w).await.unwrap();
        assert_eq!(phase_of(&iw), Some(Phase::Pending), "{w}");
        assert_eq!(
            condition_reason(&iw, "DeviceSelected").as_deref(),
            Some("NoCapacity"),
            "{w}"
        );
        assert!(
            deployments.get_opt(w).await.unwrap().is_none(),
            "{w} got a Deployment"
        );
    }
    s.assert_no_unschedulable_pod_and_no_move().await;
    s.remove_nodes().await;
}

#[tokio::test]
async fn templates_pinned_by_node_selector_or_taint_get_a_type_their_nodes_have() {
    let s = Setup::new(
        "pinned",
        &[("atom", Atom, 4), ("gpu", Gpu, 4)],
        &["--cpu-fallback=false"],
    )
    .await;
    let pool = format!("gpu-{}", std::process::id());
    let (atom, gpu) = (s.node("atom"), s.node("gpu"));
    s.kubectl(&[
        "taint",
        "node",
        &atom,
        "dedicated=batch:NoSchedule",
        "--overwrite",
    ]);
    s.kubectl(&[
        "label",
        "node",
        &gpu,
        &format!("pool={pool}"),
        "--overwrite",
    ]);
    let template = |extra: serde_json::Value| {
        let mut spec = json!({"containers": [{"name": "app", "image": "python:3.12"}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"template": {"spec": spec}})
    };
    let toleration = json!([{"key": "dedicated", "operator": "Exists"}]);

    s.create("untolerant", template(json!({}))).await;
    s.create("tolerant", template(json!({"tolerations": toleration})))
        .await;
    s.create(
        "pinned",
        template(json!({"tolerations": toleration, "nodeSelector": {"pool": pool}})),
    )
    .await;
    running_on(&s.api, "untolerant", DeviceType::Gpu).await;
    running_on(&s.api, "tolerant", DeviceType::Rbln).await;
    running_on(&s.api, "pinned", DeviceType::Gpu).await;
    s.assert_no_unschedulable_pod_and_no_move().await;
    s.remove_nodes().await;
}

#[tokio::test]
async fn an_explicit_type_no_node_of_the_template_has_waits_without_a_timer() {
    // A short grace period: before, once it was over the workload was
    // reconciled every second for as long as it waited.
    let s = Setup::new(
        "explicit",
        &[("atom", Atom, 4), ("gpu", Gpu, 4)],
        &["--unschedulable-grace=1s"],
    )
    .await;
    let pool = format!("gpu-{}", std::process::id());
    s.kubectl(&[
        "label",
        "node",
        &s.node("gpu"),
        &format!("pool={pool}"),
        "--overwrite",
    ]);
    // Asked for rbln explicitly, pinned to the gpu pool: taken as asked,
    // and the status says no node it may use has room.
    s.create(
        "explicit",
        json!({"device": "rbln", "template": {"spec": {
            "containers": [{"name": "app", "image": "python:3.12"}],
            "nodeSelector": {"pool": pool}
        }}}),
    )
    .await;
    let iw = wait_iw(&s.api, "explicit", "on rbln", 30, |iw| {
        device_of(iw) == Some(DeviceType::Rbln)
    })
    .await;
    let reason = iw.status.unwrap().device.unwrap().reason;
    assert!(reason.contains("room for 0 of 1"), "{reason}");
    wait_iw(&s.api, "explicit", "Unschedulable", 30, |iw| {
        condition_reason(iw, "Available").as_deref() == Some("Unschedulable")
    })
    .await;
    // Past the grace period, with nothing else to move to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    s.op.settled_writes().await;
    let before = s.op.counter("rm_operator_reconciles_total");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let reconciles = s.op.counter("rm_operator_reconciles_total") - before;
    assert!(
        reconciles <= 2.0,
        "{reconciles} reconciles in 6 s while waiting"
    );
    s.remove_nodes().await;
}

#[tokio::test]
async fn a_queued_pod_of_another_tenant_keeps_the_devices_it_asked_for() {
    let s = Setup::new(
        "foreign",
        &[("atom", Atom, 2), ("gpu", Gpu, 2)],
        &["--cpu-fallback=false"],
    )
    .await;
    // A training job's pod, queued for another scheduler: not bound, but it
    // will take both ATOMs.
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let queued: Pod = serde_json::from_value(json!({
        "metadata": {"name": "training"},
        "spec": {
            "schedulerName": "batch-scheduler",
            "containers": [{"name": "t", "image": "python:3.12",
                "resources": {"limits": {s.res.atom.as_str(): "2"}}}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &queued).await.unwrap();
    // The operator's watch delivers the pod in well under a second.
    tokio::time::sleep(Duration::from_secs(1)).await;
    s.create("first", json!({})).await;
    let iw = running_on(&s.api, "first", DeviceType::Gpu).await;
    let reason = iw.status.unwrap().device.unwrap().reason;
    assert!(reason.contains("rbln 0"), "{reason}");
    // The queued pod goes: the ATOMs are free for the next workload.
    pods.delete("training", &Default::default()).await.unwrap();
    s.create("second", json!({})).await;
    running_on(&s.api, "second", DeviceType::Rbln).await;
    s.remove_nodes().await;
}

#[tokio::test]
async fn eight_replicas_with_room_for_1_and_7_stay_on_the_7_without_moving() {
    let s = Setup::new(
        "partial",
        &[("atom", Atom, 1), ("gpu", Gpu, 7)],
        &["--cpu-fallback=false", "--unschedulable-grace=2s"],
    )
    .await;
    s.create("eight", json!({"replicas": 8})).await;
    let iw = wait_iw(&s.api, "eight", "7 ready on gpu", 60, |iw| {
        device_of(iw) == Some(DeviceType::Gpu)
            && iw.status.as_ref().is_some_and(|s| s.ready_replicas == 7)
    })
    .await;
    assert_eq!(
        condition_reason(&iw, "DeviceSelected").as_deref(),
        Some("PartialCapacity")
    );
    // Well past the grace period: the 8th pod waits, nothing moves.
    tokio::time::sleep(Duration::from_secs(8)).await;
    let iw = s.api.get("eight").await.unwrap();
    assert_eq!(device_of(&iw), Some(DeviceType::Gpu));
    assert_eq!(phase_of(&iw), Some(Phase::Degraded));
    assert_eq!(iw.status.as_ref().unwrap().ready_replicas, 7);
    let moved = s.events_with_reason("Reselected").await;
    assert!(moved.is_empty(), "reselections: {moved:?}");
    s.remove_nodes().await;
}

#[tokio::test]
async fn scaling_up_past_the_room_never_moves_ready_replicas() {
    let s = Setup::new(
        "scaleup",
        &[("atom", Atom, 4), ("gpu", Gpu, 8)],
        &["--unschedulable-grace=2s"],
    )
    .await;
    s.create("grows", json!({"replicas": 4})).await;
    running_on(&s.api, "grows", DeviceType::Rbln).await;
    s.kubectl(&["scale", "iw/grows", "--replicas=5", "-n", &s.ns]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let iw = s.api.get("grows").await.unwrap();
    assert_eq!(
        device_of(&iw),
        Some(DeviceType::Rbln),
        "the 4 ready replicas stay"
    );
    assert_eq!(iw.status.as_ref().unwrap().ready_replicas, 4);
    assert_eq!(phase_of(&iw), Some(Phase::Degraded));
    let moved = s.events_with_reason("Reselected").await;
    assert!(moved.is_empty(), "reselections: {moved:?}");
    s.remove_nodes().await;
}

#[tokio::test]
async fn spread_places_8_replicas_1_on_rbln_and_7_on_gpu_without_moves() {
    let s = Setup::new(
        "spread",
        &[("atom", Atom, 1), ("gpu", Gpu, 7)],
        &["--cpu-fallback=false", "--unschedulable-grace=2s"],
    )
    .await;
    s.create("eight", json!({"replicas": 8, "placement": "spread"}))
        .await;
    let iw = wait_iw(&s.api, "eight", "Running with 8 ready", 90, |iw| {
        phase_of(iw) == Some(Phase::Running)
    })
    .await;
    assert_eq!(
        placements_of(&iw),
        [(DeviceType::Rbln, 1, 1), (DeviceType::Gpu, 7, 7)]
    );
    assert_eq!(device_of(&iw), Some(DeviceType::Rbln), "the first type");
    assert_eq!(
        condition_reason(&iw, "DeviceSelected").as_deref(),
        Some("Spread")
    );
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    for (d, n) in [("eight-rbln", 1), ("eight-gpu", 7)] {
        assert_eq!(deployments.get(d).await.unwrap().spec.replicas, Some(n));
    }
    assert!(deployments.get_opt("eight").await.unwrap().is_none());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let iw = s.api.get("eight").await.unwrap();
    assert_eq!(phase_of(&iw), Some(Phase::Running), "stable");
    s.assert_no_unschedulable_pod_and_no_move().await;
    s.remove_nodes().await;
}

#[tokio::test]
async fn spread_scale_up_places_the_new_replicas_and_moves_none() {
    let s = Setup::new("spreadup", &[("atom", Atom, 4), ("gpu", Gpu, 8)], &[]).await;
    s.create("grows", json!({"replicas": 4, "placement": "spread"}))
        .await;
    let iw = running_on(&s.api, "grows", DeviceType::Rbln).await;
    assert_eq!(placements_of(&iw), [(DeviceType::Rbln, 4, 4)]);
    let pods: Api<Pod> = Api::namespaced(s.client.clone(), &s.ns);
    let uids = |list: kube::core::ObjectList<Pod>| {
        let mut u: Vec<String> = list
            .items
            .into_iter()
            .filter_map(|p| p.metadata.uid)
            .collect();
        u.sort();
        u
    };
    let rbln_pods = ListParams::default().labels("rm-abstract.io/device-type=rbln");
    let before = uids(pods.list(&rbln_pods).await.unwrap());
    assert_eq!(before.len(), 4);

    s.kubectl(&["scale", "iw/grows", "--replicas=6", "-n", &s.ns]);
    let iw = wait_iw(&s.api, "grows", "Running with 6 ready", 90, |iw| {
        phase_of(iw) == Some(Phase::Running)
            && iw.status.as_ref().is_some_and(|s| s.ready_replicas == 6)
    })
    .await;
    assert_eq!(
        placements_of(&iw),
        [(DeviceType::Rbln, 4, 4), (DeviceType::Gpu, 2, 2)]
    );
    assert_eq!(
        uids(pods.list(&rbln_pods).await.unwrap()),
        before,
        "the 4 running rbln pods were not touched"
    );
    s.remove_nodes().await;
}

#[tokio::test]
async fn move_up_by_policy_never_drops_the_ready_count() {
    let s = Setup::new("moveup", &[("atom", Atom, 4), ("gpu", Gpu, 8)], &[]).await;
    s.create("holder", json!({"replicas": 4, "devicePriority": ["rbln"]}))
        .await;
    running_on(&s.api, "holder", DeviceType::Rbln).await;
    s.create("mover", json!({"replicas": 4, "moveUp": true}))
        .await;
    s.create("stayer", json!({"replicas": 4})).await;
    running_on(&s.api, "mover", DeviceType::Gpu).await;
    running_on(&s.api, "stayer", DeviceType::Gpu).await;

    // Watch the serving pods of the mover through the move.
    let sampler = PodSampler::start(Api::namespaced(s.client.clone(), &s.ns), "mover");
    s.api.delete("holder", &Default::default()).await.unwrap();
    let iw = wait_iw(
        &s.api,
        "mover",
        "moved up to rbln, 4 ready there",
        120,
        |iw| placements_of(iw) == [(DeviceType::Rbln, 4, 4)],
    )
    .await;
    let (least, _) = sampler.stop().await;
    assert!(
        least >= 4,
        "the ready count dropped to {least} during the move"
    );
    assert_eq!(phase_of(&iw), Some(Phase::Running));
    let events = events_for(s.client.clone(), &s.ns, "mover").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "MovedUp" && m.contains("from gpu to rbln")),
        "{events:?}"
    );
    // Without the policy a workload stays where it runs.
    let stayer = s.api.get("stayer").await.unwrap();
    assert_eq!(device_of(&stayer), Some(DeviceType::Gpu));
    s.remove_nodes().await;
}

#[tokio::test]
async fn spread_moves_up_one_replica_at_a_time_never_dropping_the_ready_count() {
    let s = Setup::new("spreadmove", &[("atom", Atom, 4), ("gpu", Gpu, 8)], &[]).await;
    s.create("holder", json!({"replicas": 2, "devicePriority": ["rbln"]}))
        .await;
    running_on(&s.api, "holder", DeviceType::Rbln).await;
    s.create(
        "mover",
        json!({"replicas": 4, "placement": "spread", "moveUp": true}),
    )
    .await;
    let iw = wait_iw(&s.api, "mover", "rbln 2 + gpu 2, all ready", 90, |iw| {
        placements_of(iw) == [(DeviceType::Rbln, 2, 2), (DeviceType::Gpu, 2, 2)]
    })
    .await;
    assert_eq!(
        condition_reason(&iw, "DeviceSelected").as_deref(),
        Some("Spread"),
        "no room above: no move"
    );

    let sampler = PodSampler::start(Api::namespaced(s.client.clone(), &s.ns), "mover");
    s.api.delete("holder", &Default::default()).await.unwrap();
    let iw = wait_iw(&s.api, "mover", "all 4 on rbln, ready", 120, |iw| {
        placements_of(iw) == [(DeviceType::Rbln, 4, 4)]
    })
    .await;
    let (least_ready, most_live) = sampler.stop().await;
    assert!(least_ready >= 4, "the ready count dropped to {least_ready}");
    assert!(
        most_live <= 5,
        "{most_live} pods at once: more than one replica moved at a time"
    );
    assert_eq!(phase_of(&iw), Some(Phase::Running));
    let deployments: Api<Deployment> = Api::namespaced(s.client.clone(), &s.ns);
    assert!(
        deployments.get_opt("mover-gpu").await.unwrap().is_none(),
        "the emptied type's Deployment is gone"
    );
    let events = events_for(s.client.clone(), &s.ns, "mover").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "MovedUp" && m.contains("from gpu to rbln")),
        "{events:?}"
    );
    s.remove_nodes().await;
}

#[tokio::test]
async fn a_freed_device_goes_to_the_waiter_of_the_higher_priority_class() {
    let s = Setup::new("prioclass", &[("atom", Atom, 1)], &["--cpu-fallback=false"]).await;
    let class_name = format!("urgent-{}", std::process::id());
    let classes: Api<k8s_openapi::api::scheduling::v1::PriorityClass> = Api::all(s.client.clone());
    let class = serde_json::from_value(json!({
        "metadata": {"name": class_name}, "value": 100000
    }))
    .unwrap();
    classes
        .create(&PostParams::default(), &class)
        .await
        .unwrap();
    let only_rbln = json!({"devicePriority": ["rbln"]});
    s.create("holder", only_rbln.clone()).await;
    running_on(&s.api, "holder", DeviceType::Rbln).await;
    // The older waiter has no class; the newer one has the urgent class.
    s.create("older", only_rbln.clone()).await;
    wait_iw(&s.api, "older", "Pending", 30, |iw| {
        phase_of(iw) == Some(Phase::Pending)
    })
    .await;
    s.create(
        "urgent",
        json!({"devicePriority": ["rbln"], "template": {"spec": {
            "containers": [{"name": "app", "image": "python:3.12"}],
            "priorityClassName": class_name
        }}}),
    )
    .await;
    wait_iw(&s.api, "urgent", "Pending", 30, |iw| {
        phase_of(iw) == Some(Phase::Pending)
    })
    .await;

    s.api.delete("holder", &Default::default()).await.unwrap();
    running_on(&s.api, "urgent", DeviceType::Rbln).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let older = s.api.get("older").await.unwrap();
    assert_eq!(phase_of(&older), Some(Phase::Pending), "it waits on");
    let _ = classes.delete(&class_name, &Default::default()).await;
    s.remove_nodes().await;
}
