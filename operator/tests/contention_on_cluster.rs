//! Placement under contention (issue 20), on the local control plane
//! (e2e/cluster.sh): real apiserver and kube-scheduler, kwok nodes.
//!
//! Each test runs its own operator on its own namespace and device
//! resource names, so tests run in parallel and never share capacity.

mod common;

use std::time::Duration;

use common::*;
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{Api, ListParams, PostParams};
use rm_crds::{DeviceType, InferenceWorkload, Phase};
use rm_e2e_testkit::{Cluster, cluster};
use serde_json::json;

/// Events of the namespace with this reason (the scheduler's
/// `FailedScheduling`, the operator's `Reselected`, ...).
async fn events_with_reason(client: kube::Client, ns: &str, reason: &str) -> Vec<String> {
    let events: Api<Event> = Api::namespaced(client, ns);
    events
        .list(&ListParams::default())
        .await
        .expect("events")
        .items
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

fn kubectl_ok(cluster: &Cluster, args: &[&str]) {
    let out = cluster.kubectl().args(args).output().expect("kubectl");
    assert!(
        out.status.success(),
        "kubectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn create(api: &Api<InferenceWorkload>, name: &str, spec: serde_json::Value) {
    api.create(&PostParams::default(), &workload(name, spec))
        .await
        .unwrap_or_else(|e| panic!("create {name}: {e}"));
}

#[tokio::test]
async fn a_burst_of_20_fills_rbln_then_gpu_with_no_unschedulable_pod() {
    let cluster = cluster();
    let test = "burst";
    let res = Resources::new(test);
    for n in ["atom-1", "atom-2"] {
        cluster.add_node(&node_name(test, n), &[(&res.atom, 4)]);
    }
    for n in ["gpu-1", "gpu-2"] {
        cluster.add_node(&node_name(test, n), &[(&res.gpu, 8)]);
    }
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let op = start_operator(cluster, &ns, &res, &[]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);

    // All 20 at once: the reconciles run concurrently.
    let names: Vec<String> = (0..20).map(|i| format!("burst-{i:02}")).collect();
    futures::future::join_all(names.iter().map(|n| create(&api, n, json!({})))).await;
    let mut on = std::collections::BTreeMap::<DeviceType, usize>::new();
    for n in &names {
        let iw = wait_iw(&api, n, "Running", 120, |iw| {
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
    let failed = events_with_reason(client.clone(), &ns, "FailedScheduling").await;
    assert!(failed.is_empty(), "pods were unschedulable: {failed:?}");
    let moved = events_with_reason(client.clone(), &ns, "Reselected").await;
    assert!(moved.is_empty(), "reselections: {moved:?}");
    let writes = op.settled_writes().await;
    eprintln!(
        "burst of 20: {writes} API writes ({:.1} per workload)",
        writes / 20.0
    );
    for n in ["atom-1", "atom-2", "gpu-1", "gpu-2"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

#[tokio::test]
async fn one_freed_device_goes_to_the_oldest_of_ten_waiters_only() {
    let cluster = cluster();
    let test = "tenwait";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 1)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &["--cpu-fallback=false"]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    let only_rbln = json!({"devicePriority": ["rbln"]});
    create(&api, "holder", only_rbln.clone()).await;
    running_on(&api, "holder", DeviceType::Rbln).await;
    let waiters: Vec<String> = (0..10).map(|i| format!("waiter-{i:02}")).collect();
    for w in &waiters {
        create(&api, w, only_rbln.clone()).await;
    }
    for w in &waiters {
        wait_iw(&api, w, "Pending", 30, |iw| {
            phase_of(iw) == Some(Phase::Pending)
        })
        .await;
    }

    api.delete("holder", &Default::default()).await.unwrap();
    running_on(&api, "waiter-00", DeviceType::Rbln).await;
    // The others were not sent after the one device: no Deployment, still
    // Pending for want of capacity.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &ns);
    for w in &waiters[1..] {
        let iw = api.get(w).await.unwrap();
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
    let failed = events_with_reason(client, &ns, "FailedScheduling").await;
    assert!(failed.is_empty(), "pods were unschedulable: {failed:?}");
    cluster.remove_node(&node_name(test, "atom")).await;
}

#[tokio::test]
async fn templates_pinned_by_node_selector_or_taint_get_a_type_their_nodes_have() {
    let cluster = cluster();
    let test = "pinned";
    let res = Resources::new(test);
    let atom = node_name(test, "atom");
    let gpu = node_name(test, "gpu");
    cluster.add_node(&atom, &[(&res.atom, 4)]);
    cluster.add_node(&gpu, &[(&res.gpu, 4)]);
    let pool = format!("gpu-{}", std::process::id());
    kubectl_ok(
        cluster,
        &[
            "taint",
            "node",
            &atom,
            "dedicated=batch:NoSchedule",
            "--overwrite",
        ],
    );
    kubectl_ok(
        cluster,
        &[
            "label",
            "node",
            &gpu,
            &format!("pool={pool}"),
            "--overwrite",
        ],
    );
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &["--cpu-fallback=false"]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    let template = |extra: serde_json::Value| {
        let mut spec = json!({"containers": [{"name": "app", "image": "python:3.12"}]});
        for (k, v) in extra.as_object().unwrap() {
            spec[k] = v.clone();
        }
        json!({"template": {"spec": spec}})
    };
    let toleration = json!([{"key": "dedicated", "operator": "Exists"}]);

    create(&api, "untolerant", template(json!({}))).await;
    create(
        &api,
        "tolerant",
        template(json!({"tolerations": toleration})),
    )
    .await;
    create(
        &api,
        "pinned",
        template(json!({"tolerations": toleration, "nodeSelector": {"pool": pool}})),
    )
    .await;
    running_on(&api, "untolerant", DeviceType::Gpu).await;
    running_on(&api, "tolerant", DeviceType::Rbln).await;
    running_on(&api, "pinned", DeviceType::Gpu).await;
    let failed = events_with_reason(client.clone(), &ns, "FailedScheduling").await;
    assert!(failed.is_empty(), "pods were unschedulable: {failed:?}");

    for n in [atom, gpu] {
        cluster.remove_node(&n).await;
    }
}

#[tokio::test]
async fn an_explicit_type_no_node_of_the_template_has_waits_without_a_timer() {
    let cluster = cluster();
    let test = "explicit";
    let res = Resources::new(test);
    let gpu = node_name(test, "gpu");
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 4)]);
    cluster.add_node(&gpu, &[(&res.gpu, 4)]);
    let pool = format!("gpu-{}", std::process::id());
    kubectl_ok(
        cluster,
        &[
            "label",
            "node",
            &gpu,
            &format!("pool={pool}"),
            "--overwrite",
        ],
    );
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    // A short grace period: before, once it was over the workload was
    // reconciled every second for as long as it waited.
    let op = start_operator(cluster, &ns, &res, &["--unschedulable-grace=1s"]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    // Asked for rbln explicitly, pinned to the gpu pool: taken as asked,
    // and the status says no node it may use has room.
    create(
        &api,
        "explicit",
        json!({"device": "rbln", "template": {"spec": {
            "containers": [{"name": "app", "image": "python:3.12"}],
            "nodeSelector": {"pool": pool}
        }}}),
    )
    .await;
    let iw = wait_iw(&api, "explicit", "on rbln", 30, |iw| {
        device_of(iw) == Some(DeviceType::Rbln)
    })
    .await;
    let reason = iw.status.unwrap().device.unwrap().reason;
    assert!(reason.contains("room for 0 of 1"), "{reason}");
    wait_iw(&api, "explicit", "Unschedulable", 30, |iw| {
        condition_reason(iw, "Available").as_deref() == Some("Unschedulable")
    })
    .await;
    // Past the grace period, with nothing else to move to.
    tokio::time::sleep(Duration::from_secs(3)).await;
    op.settled_writes().await;
    let before = op.counter("rm_operator_reconciles_total");
    tokio::time::sleep(Duration::from_secs(6)).await;
    let reconciles = op.counter("rm_operator_reconciles_total") - before;
    assert!(
        reconciles <= 2.0,
        "{reconciles} reconciles in 6 s while waiting"
    );
    for n in ["atom", "gpu"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

#[tokio::test]
async fn a_queued_pod_of_another_tenant_keeps_the_devices_it_asked_for() {
    let cluster = cluster();
    let test = "foreign";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 2)]);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 2)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &["--cpu-fallback=false"]);
    let client = cluster.client().await;
    // A training job's pod, queued for another scheduler: not bound, but it
    // will take both ATOMs.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let queued: Pod = serde_json::from_value(json!({
        "metadata": {"name": "training"},
        "spec": {
            "schedulerName": "batch-scheduler",
            "containers": [{"name": "t", "image": "python:3.12",
                "resources": {"limits": {res.atom.as_str(): "2"}}}]
        }
    }))
    .unwrap();
    pods.create(&PostParams::default(), &queued).await.unwrap();
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    // Wait until the operator's cache has the pod (it appears in the
    // DeviceSelected message as taken capacity).
    tokio::time::sleep(Duration::from_secs(1)).await;
    create(&api, "first", json!({})).await;
    let iw = running_on(&api, "first", DeviceType::Gpu).await;
    let reason = iw.status.unwrap().device.unwrap().reason;
    assert!(reason.contains("rbln 0"), "{reason}");
    // The queued pod goes: the ATOMs are free for the next workload.
    pods.delete("training", &Default::default()).await.unwrap();
    create(&api, "second", json!({})).await;
    running_on(&api, "second", DeviceType::Rbln).await;
    for n in ["atom", "gpu"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

#[tokio::test]
async fn eight_replicas_with_room_for_1_and_7_stay_on_the_7_without_moving() {
    let cluster = cluster();
    let test = "partial";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 1)]);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 7)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(
        cluster,
        &ns,
        &res,
        &["--cpu-fallback=false", "--unschedulable-grace=2s"],
    );
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    create(&api, "eight", json!({"replicas": 8})).await;
    let iw = wait_iw(&api, "eight", "7 ready on gpu", 60, |iw| {
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
    let iw = api.get("eight").await.unwrap();
    assert_eq!(device_of(&iw), Some(DeviceType::Gpu));
    assert_eq!(phase_of(&iw), Some(Phase::Degraded));
    assert_eq!(iw.status.as_ref().unwrap().ready_replicas, 7);
    let moved = events_with_reason(client, &ns, "Reselected").await;
    assert!(moved.is_empty(), "reselections: {moved:?}");
    for n in ["atom", "gpu"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

#[tokio::test]
async fn scaling_up_past_the_room_never_moves_ready_replicas() {
    let cluster = cluster();
    let test = "scaleup";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 4)]);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 8)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &["--unschedulable-grace=2s"]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    create(&api, "grows", json!({"replicas": 4})).await;
    running_on(&api, "grows", DeviceType::Rbln).await;
    kubectl_ok(cluster, &["scale", "iw/grows", "--replicas=5", "-n", &ns]);
    tokio::time::sleep(Duration::from_secs(8)).await;
    let iw = api.get("grows").await.unwrap();
    assert_eq!(
        device_of(&iw),
        Some(DeviceType::Rbln),
        "the 4 ready replicas stay"
    );
    assert_eq!(iw.status.as_ref().unwrap().ready_replicas, 4);
    assert_eq!(phase_of(&iw), Some(Phase::Degraded));
    let moved = events_with_reason(client, &ns, "Reselected").await;
    assert!(moved.is_empty(), "reselections: {moved:?}");
    for n in ["atom", "gpu"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

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

#[tokio::test]
async fn spread_places_8_replicas_1_on_rbln_and_7_on_gpu_without_moves() {
    let cluster = cluster();
    let test = "spread";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 1)]);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 7)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(
        cluster,
        &ns,
        &res,
        &["--cpu-fallback=false", "--unschedulable-grace=2s"],
    );
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    create(&api, "eight", json!({"replicas": 8, "placement": "spread"})).await;
    let iw = wait_iw(&api, "eight", "Running with 8 ready", 90, |iw| {
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
    let deployments: Api<k8s_openapi::api::apps::v1::Deployment> =
        Api::namespaced(client.clone(), &ns);
    for (d, n) in [("eight-rbln", 1), ("eight-gpu", 7)] {
        assert_eq!(deployments.get(d).await.unwrap().spec.replicas, Some(n));
    }
    assert!(deployments.get_opt("eight").await.unwrap().is_none());
    tokio::time::sleep(Duration::from_secs(5)).await;
    let iw = api.get("eight").await.unwrap();
    assert_eq!(phase_of(&iw), Some(Phase::Running), "stable");
    let failed = events_with_reason(client.clone(), &ns, "FailedScheduling").await;
    assert!(failed.is_empty(), "pods were unschedulable: {failed:?}");
    let moved = events_with_reason(client, &ns, "Reselected").await;
    assert!(moved.is_empty(), "reselections: {moved:?}");
    for n in ["atom", "gpu"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

#[tokio::test]
async fn spread_scale_up_places_the_new_replicas_and_moves_none() {
    let cluster = cluster();
    let test = "spreadup";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 4)]);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 8)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &[]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    create(&api, "grows", json!({"replicas": 4, "placement": "spread"})).await;
    let iw = running_on(&api, "grows", DeviceType::Rbln).await;
    assert_eq!(placements_of(&iw), [(DeviceType::Rbln, 4, 4)]);
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
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

    kubectl_ok(cluster, &["scale", "iw/grows", "--replicas=6", "-n", &ns]);
    let iw = wait_iw(&api, "grows", "Running with 6 ready", 90, |iw| {
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
    for n in ["atom", "gpu"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

/// Ready pods of the workload that are not being deleted (those serve).
async fn serving_pods(pods: &Api<Pod>, workload: &str) -> usize {
    pods.list(&ListParams::default().labels(&format!("rm-abstract.io/workload={workload}")))
        .await
        .map(|l| {
            l.items
                .iter()
                .filter(|p| p.metadata.deletion_timestamp.is_none())
                .filter(|p| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| {
                            cs.iter().any(|c| c.type_ == "Ready" && c.status == "True")
                        })
                })
                .count()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn move_up_by_policy_never_drops_the_ready_count() {
    let cluster = cluster();
    let test = "moveup";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 4)]);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 8)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &[]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    create(
        &api,
        "holder",
        json!({"replicas": 4, "devicePriority": ["rbln"]}),
    )
    .await;
    running_on(&api, "holder", DeviceType::Rbln).await;
    create(&api, "mover", json!({"replicas": 4, "moveUp": true})).await;
    create(&api, "stayer", json!({"replicas": 4})).await;
    running_on(&api, "mover", DeviceType::Gpu).await;
    running_on(&api, "stayer", DeviceType::Gpu).await;

    // Watch the serving pods of the mover through the move.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = {
        let (pods, done) = (pods.clone(), done.clone());
        tokio::spawn(async move {
            let mut least = usize::MAX;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                least = least.min(serving_pods(&pods, "mover").await);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            least
        })
    };
    api.delete("holder", &Default::default()).await.unwrap();
    let iw = wait_iw(
        &api,
        "mover",
        "moved up to rbln, 4 ready there",
        120,
        |iw| placements_of(iw) == [(DeviceType::Rbln, 4, 4)],
    )
    .await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let least = watcher.await.unwrap();
    assert!(
        least >= 4,
        "the ready count dropped to {least} during the move"
    );
    assert_eq!(phase_of(&iw), Some(Phase::Running));
    let events = events_for(client.clone(), &ns, "mover").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "MovedUp" && m.contains("from gpu to rbln")),
        "{events:?}"
    );
    // Without the policy a workload stays where it runs.
    let stayer = api.get("stayer").await.unwrap();
    assert_eq!(device_of(&stayer), Some(DeviceType::Gpu));
    for n in ["atom", "gpu"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}
