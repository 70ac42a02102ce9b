//! rm-operator against the local control plane (e2e/cluster.sh): real
//! apiserver, kube-scheduler placing pods on kwok nodes, garbage collector of
//! the controller-manager.
//!
//! Each test runs its own operator process, watching its own namespace, with
//! device resources named for that test only (`<test>.e2e.rm-abstract.io/atom`
//! ...), so tests run in parallel and never share capacity.

mod common;

use std::time::{Duration, Instant};

use common::*;
use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, DeleteParams, ListParams, PostParams};
use rm_crds::{DeviceType, InferenceWorkload, Phase};
use rm_e2e_testkit::cluster;
use serde_json::json;

#[tokio::test]
async fn workloads_fill_rbln_then_furiosa_then_gpu_then_cpu() {
    let cluster = cluster();
    let test = "fill";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 1)]);
    cluster.add_node(&node_name(test, "rngd"), &[(&res.rngd, 2)]);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 2)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &[]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);

    let steps = [
        ("first", 1, DeviceType::Rbln),
        ("second", 2, DeviceType::Furiosa),
        ("third", 2, DeviceType::Gpu),
        ("fourth", 1, DeviceType::Cpu),
    ];
    for (name, replicas, want) in steps {
        api.create(
            &PostParams::default(),
            &workload(name, json!({"replicas": replicas})),
        )
        .await
        .unwrap();
        let iw = running_on(&api, name, want).await;
        let status = iw.status.unwrap();
        assert_eq!(status.ready_replicas, replicas);
        assert_eq!(
            status.ready.as_deref(),
            Some(format!("{replicas}/{replicas}").as_str())
        );
        let reason = condition_reason_from(&status.conditions, "DeviceSelected");
        let expected = if want == DeviceType::Cpu {
            "CpuFallback"
        } else {
            "Selected"
        };
        assert_eq!(reason, expected, "{name}");
        // The reason names the types considered with their free counts.
        assert!(
            status.device.unwrap().reason.contains("free: rbln"),
            "{name}"
        );
    }

    // The pods were placed by kube-scheduler on the node holding the resource.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for pod in pods
        .list(&ListParams::default().labels("rm-abstract.io/workload=second"))
        .await
        .unwrap()
    {
        assert_eq!(
            pod.spec.unwrap().node_name.unwrap(),
            node_name(test, "rngd")
        );
        let status = pod.status.unwrap();
        assert_eq!(status.phase.as_deref(), Some("Running"));
    }
    let dep: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let second = dep.get("second").await.unwrap();
    let c = &second.spec.template.spec.unwrap().containers[0];
    assert_eq!(
        c.resources.as_ref().unwrap().limits.as_ref().unwrap()[&res.rngd].0,
        "1"
    );
    let env = c.env.as_ref().unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "RM_DEVICE" && e.value.as_deref() == Some("furiosa"))
    );
    let events = events_for(client, &ns, "first").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "DeviceSelected" && m.contains("chose rbln")),
        "{events:?}"
    );
    for n in ["atom", "rngd", "gpu"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

fn condition_reason_from(
    conditions: &[k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition],
    type_: &str,
) -> String {
    conditions
        .iter()
        .find(|c| c.type_ == type_)
        .map(|c| c.reason.clone())
        .unwrap_or_default()
}

#[tokio::test]
async fn pending_without_cpu_proceeds_when_a_node_with_capacity_arrives() {
    let cluster = cluster();
    let test = "pending";
    let res = Resources::new(test);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &["--cpu-fallback=false"]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &workload("waits", json!({})))
        .await
        .unwrap();
    let iw = wait_iw(&api, "waits", "Pending", 30, |iw| {
        phase_of(iw) == Some(Phase::Pending)
    })
    .await;
    assert_eq!(
        condition_reason(&iw, "DeviceSelected").as_deref(),
        Some("NoCapacity")
    );
    assert_eq!(
        condition_reason(&iw, "Available").as_deref(),
        Some("NoDevice")
    );
    let dep: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    assert!(
        dep.get_opt("waits").await.unwrap().is_none(),
        "no Deployment while Pending"
    );
    let events = events_for(client.clone(), &ns, "waits").await;
    assert!(events.iter().any(|(r, _)| r == "NoCapacity"), "{events:?}");

    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 1)]);
    running_on(&api, "waits", DeviceType::Gpu).await;
    cluster.remove_node(&node_name(test, "gpu")).await;
}

#[tokio::test]
async fn devices_freed_by_a_deleted_workload_wake_a_pending_one() {
    let cluster = cluster();
    let test = "freed";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 1)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &["--cpu-fallback=false"]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    let only_rbln = json!({"devicePriority": ["rbln"]});
    api.create(
        &PostParams::default(),
        &workload("holder", only_rbln.clone()),
    )
    .await
    .unwrap();
    running_on(&api, "holder", DeviceType::Rbln).await;
    api.create(&PostParams::default(), &workload("waiter", only_rbln))
        .await
        .unwrap();
    wait_iw(&api, "waiter", "Pending", 30, |iw| {
        phase_of(iw) == Some(Phase::Pending)
    })
    .await;
    // The holder goes: its pod's deletion frees the ATOM, and the waiter
    // takes it at once (before, only the 300 s periodic requeue noticed).
    api.delete("holder", &Default::default()).await.unwrap();
    running_on(&api, "waiter", DeviceType::Rbln).await;
    cluster.remove_node(&node_name(test, "atom")).await;
}

#[tokio::test]
async fn override_explicit_scale_and_delete() {
    let cluster = cluster();
    let test = "override";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "all"), &[(&res.atom, 4), (&res.gpu, 4)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &[]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    let dep: Api<Deployment> = Api::namespaced(client.clone(), &ns);

    // The workload's own priority list beats the cluster's.
    api.create(
        &PostParams::default(),
        &workload("gpu-first", json!({"devicePriority": ["gpu", "rbln"]})),
    )
    .await
    .unwrap();
    running_on(&api, "gpu-first", DeviceType::Gpu).await;

    // An explicit device is taken as asked, even without capacity.
    api.create(
        &PostParams::default(),
        &workload("wants-rngd", json!({"device": "rngd:0"})),
    )
    .await
    .unwrap();
    let iw = wait_iw(&api, "wants-rngd", "Progressing on furiosa", 30, |iw| {
        device_of(iw) == Some(DeviceType::Furiosa)
    })
    .await;
    assert_eq!(
        condition_reason(&iw, "DeviceSelected").as_deref(),
        Some("Explicit")
    );
    let reason = iw.status.unwrap().device.unwrap().reason;
    assert!(reason.contains("room for 0 of 1"), "{reason}");
    let d = dep.get("wants-rngd").await.unwrap();
    let env = d.spec.template.spec.unwrap().containers[0]
        .env
        .clone()
        .unwrap();
    assert!(
        env.iter()
            .any(|e| e.name == "RM_DEVICE" && e.value.as_deref() == Some("furiosa:0"))
    );
    let iw = wait_iw(&api, "wants-rngd", "Unschedulable", 30, |iw| {
        condition_reason(iw, "Available").as_deref() == Some("Unschedulable")
    })
    .await;
    assert_eq!(phase_of(&iw), Some(Phase::Progressing));

    // kubectl scale goes through the scale subresource to the Deployment.
    let out = cluster
        .kubectl()
        .args(["scale", "iw/gpu-first", "--replicas=3", "-n", &ns])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let iw = wait_iw(&api, "gpu-first", "Running with 3 replicas", 60, |iw| {
        iw.status.as_ref().is_some_and(|s| s.ready_replicas == 3)
            && phase_of(iw) == Some(Phase::Running)
    })
    .await;
    assert_eq!(
        device_of(&iw),
        Some(DeviceType::Gpu),
        "scaling keeps the device"
    );
    assert_eq!(dep.get("gpu-first").await.unwrap().spec.replicas, Some(3));

    // Deleting the workload deletes its Deployment (garbage collector).
    api.delete("gpu-first", &DeleteParams::foreground())
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while dep.get_opt("gpu-first").await.unwrap().is_some() {
        assert!(
            Instant::now() < deadline,
            "Deployment not garbage-collected"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    cluster.remove_node(&node_name(test, "all")).await;
}

#[tokio::test]
async fn running_workloads_do_not_flap_and_steady_state_writes_nothing() {
    let cluster = cluster();
    let test = "flap";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 2)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let op = start_operator(cluster, &ns, &res, &[]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    api.create(&PostParams::default(), &workload("steady", json!({})))
        .await
        .unwrap();
    running_on(&api, "steady", DeviceType::Gpu).await;

    // Higher-priority capacity appears: the running workload stays.
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 8)]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    let iw = api.get("steady").await.unwrap();
    assert_eq!(device_of(&iw), Some(DeviceType::Gpu));

    // Steady state: events that trigger reconciles cause no writes.
    let writes = op.settled_writes().await;
    let reconciles = op.counter("rm_operator_reconciles_total");
    for i in 0..5 {
        let patch = json!({"metadata": {"annotations": {"touch": i.to_string()}}});
        api.patch(
            "steady",
            &Default::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
        cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 8 + i)]);
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert!(
        op.counter("rm_operator_reconciles_total") >= reconciles + 5.0,
        "the touches must have caused reconciles"
    );
    assert_eq!(
        op.counter("rm_operator_api_writes_total"),
        writes,
        "a steady-state reconcile must not write"
    );
    assert_eq!(
        device_of(&api.get("steady").await.unwrap()),
        Some(DeviceType::Gpu)
    );
    // One decision, one Event: reconciles that ran before our own status
    // write reached the cache must not announce it again.
    assert_eq!(
        op.counter("rm_operator_api_writes_total{kind=\"event\"}"),
        1.0,
        "{}",
        op.metrics()
    );
    for n in ["gpu", "atom"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

#[tokio::test]
async fn pods_unschedulable_past_the_grace_period_move_to_another_type() {
    let cluster = cluster();
    let test = "grace";
    let res = Resources::new(test);
    // The ATOM node has devices but almost no memory, and the workload asks
    // for 1Gi: the operator counts devices only (the scheduler's other
    // filters are its own), so it sees room the scheduler cannot use.
    let atom = node_name(test, "atom");
    cluster.add_node(&atom, &[(&res.atom, 2), ("memory", 1)]);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 2)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &["--unschedulable-grace=3s"]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    let needs_memory = json!({"template": {"spec": {"containers": [{
        "name": "app", "image": "python:3.12",
        "resources": {"requests": {"memory": "1Gi"}}
    }]}}});
    api.create(&PostParams::default(), &workload("stuck", needs_memory))
        .await
        .unwrap();
    wait_iw(&api, "stuck", "on rbln", 30, |iw| {
        device_of(iw) == Some(DeviceType::Rbln)
    })
    .await;
    let iw = running_on(&api, "stuck", DeviceType::Gpu).await;
    assert_eq!(
        condition_reason(&iw, "DeviceSelected").as_deref(),
        Some("Reselected")
    );
    let events = events_for(client, &ns, "stuck").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "Reselected" && m.contains("unschedulable on rbln")),
        "{events:?}"
    );
    for n in ["atom", "gpu"] {
        cluster.remove_node(&node_name(test, n)).await;
    }
}

#[tokio::test]
async fn sigkill_while_reconciling_100_workloads_then_restart_converges() {
    let cluster = cluster();
    let test = "kill";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "gpu"), &[(&res.gpu, 200)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    let op = start_operator(cluster, &ns, &res, &[]);
    for i in 0..100 {
        api.create(
            &PostParams::default(),
            &workload(&format!("w{i}"), json!({})),
        )
        .await
        .unwrap();
    }
    let dep: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    // Kill it mid-way: once some, not all, Deployments exist.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = dep.list(&ListParams::default()).await.unwrap().items.len();
        if n >= 10 {
            break;
        }
        assert!(Instant::now() < deadline, "operator made no progress");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    op.signal("-KILL");
    drop(op);
    let _op = start_operator(cluster, &ns, &res, &[]);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let iws = api.list(&ListParams::default()).await.unwrap();
        let running = iws
            .items
            .iter()
            .filter(|iw| {
                phase_of(iw) == Some(Phase::Running) && device_of(iw) == Some(DeviceType::Gpu)
            })
            .count();
        if running == 100 {
            break;
        }
        assert!(Instant::now() < deadline, "only {running}/100 converged");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let deployments = dep.list(&ListParams::default()).await.unwrap().items;
    assert_eq!(
        deployments.len(),
        100,
        "exactly one Deployment per workload"
    );
    cluster.remove_node(&node_name(test, "gpu")).await;
}

#[tokio::test]
async fn only_the_leader_reconciles_and_a_standby_takes_over() {
    let cluster = cluster();
    let test = "leader";
    let res = Resources::new(test);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    let first = start_operator(cluster, &ns, &res, &["--identity=first"]);
    api.create(&PostParams::default(), &workload("a", json!({})))
        .await
        .unwrap();
    running_on(&api, "a", DeviceType::Cpu).await;
    let second = start_operator(cluster, &ns, &res, &["--identity=second"]);
    tokio::time::sleep(Duration::from_secs(3)).await;
    api.create(&PostParams::default(), &workload("b", json!({})))
        .await
        .unwrap();
    running_on(&api, "b", DeviceType::Cpu).await;
    assert_eq!(
        second.counter("rm_operator_reconciles_total"),
        0.0,
        "the standby reconciled"
    );
    assert!(first.counter("rm_operator_reconciles_total") > 0.0);

    first.signal("-KILL");
    let killed = Instant::now();
    drop(first);
    // Fail-over: the standby holds the Lease within 20 s of the leader dying.
    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(client.clone(), &ns);
    loop {
        let holder = leases
            .get("rm-operator")
            .await
            .ok()
            .and_then(|l| l.spec?.holder_identity);
        if holder.as_deref() == Some("second") {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "no take-over within 20 s (holder {holder:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    api.create(&PostParams::default(), &workload("c", json!({})))
        .await
        .unwrap();
    running_on(&api, "c", DeviceType::Cpu).await;
    assert!(second.counter("rm_operator_reconciles_total") > 0.0);
}

fn env_value<'a>(c: &'a k8s_openapi::api::core::v1::Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

#[tokio::test]
async fn a_served_workload_without_a_template_gets_the_server_a_service_and_an_endpoint() {
    let cluster = cluster();
    let test = "serve";
    let res = Resources::new(test);
    cluster.add_node(&node_name(test, "atom"), &[(&res.atom, 2)]);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let op = start_operator(
        cluster,
        &ns,
        &res,
        &[
            "--serve-image=localhost/rm-abstract/serve:test",
            "--serve-image-pull-policy=Never",
        ],
    );
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    api.create(
        &PostParams::default(),
        &served_workload(
            "chat",
            json!({"serve": {}, "compile": {"precision": "bf16"}}),
        ),
    )
    .await
    .unwrap();
    let endpoint = format!("http://chat.{ns}.svc:8000/v1");
    let iw = wait_iw(&api, "chat", "served with an endpoint", 60, |iw| {
        iw.status.as_ref().and_then(|s| s.endpoint.as_deref()) == Some(endpoint.as_str())
    })
    .await;
    assert_eq!(device_of(&iw), Some(DeviceType::Rbln));
    assert_eq!(
        condition_reason(&iw, "Serving").as_deref(),
        Some("EndpointReady")
    );

    // The Deployment's pod is the serving container alone, holding the device.
    let dep: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let d = dep.get("chat").await.unwrap();
    let template = d.spec.template;
    let annotations = template.metadata.unwrap().annotations.unwrap();
    assert_eq!(annotations["rm-abstract.io/container-names"], "rm-serve");
    let pod = template.spec.unwrap();
    assert_eq!(pod.containers.len(), 1);
    let c = &pod.containers[0];
    assert_eq!(c.name, "rm-serve");
    assert_eq!(c.image.as_deref(), Some("localhost/rm-abstract/serve:test"));
    assert_eq!(c.image_pull_policy.as_deref(), Some("Never"));
    let resources = c.resources.as_ref().unwrap();
    assert_eq!(resources.limits.as_ref().unwrap()[&res.atom].0, "1");
    assert_eq!(resources.requests.as_ref().unwrap()[&res.atom].0, "1");
    for (name, want) in [
        ("RM_DEVICE", "rbln"),
        (
            "RM_SERVE_MODEL_SOURCE",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
        ),
        ("RM_SERVE_MODEL_NAME", "chat"),
        ("RM_SERVE_PORT", "8000"),
        ("RM_WORKLOAD_NAME", "chat"),
        ("RM_COMPILE_OPTIONS", r#"{"precision":"bf16"}"#),
    ] {
        assert_eq!(env_value(c, name), Some(want), "{name}");
    }
    let port = &c.ports.as_ref().unwrap()[0];
    assert_eq!(
        (port.name.as_deref(), port.container_port),
        (Some("http"), 8000)
    );
    let probe_path = |p: &Option<k8s_openapi::api::core::v1::Probe>| {
        p.as_ref()
            .and_then(|p| p.http_get.as_ref())
            .and_then(|h| h.path.clone())
    };
    assert_eq!(probe_path(&c.readiness_probe).as_deref(), Some("/ready"));
    assert_eq!(probe_path(&c.liveness_probe).as_deref(), Some("/health"));
    let sc = c.security_context.as_ref().unwrap();
    assert_eq!(sc.allow_privilege_escalation, Some(false));
    assert_eq!(sc.run_as_non_root, Some(true));

    // The Service selects the workload's pods on port http, owned by it.
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), &ns);
    let svc = services.get("chat").await.unwrap();
    let owner = &svc.metadata.owner_references.as_ref().unwrap()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("InferenceWorkload", "chat")
    );
    let spec = svc.spec.unwrap();
    assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
    assert_eq!(spec.selector.unwrap()["rm-abstract.io/workload"], "chat");
    let sp = &spec.ports.unwrap()[0];
    assert_eq!((sp.name.as_deref(), sp.port), (Some("http"), 8000));
    // The Service's endpoints are the workload's ready pod.
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    let running = pods
        .list(&ListParams::default().labels("rm-abstract.io/workload=chat"))
        .await
        .unwrap();
    assert_eq!(running.items.len(), 1);
    let events = events_for(client.clone(), &ns, "chat").await;
    assert!(
        events
            .iter()
            .any(|(r, m)| r == "EndpointReady" && m.contains(&endpoint)),
        "{events:?}"
    );

    // `kubectl get iw` shows the endpoint.
    let out = cluster
        .kubectl()
        .args(["get", "iw", "chat", "-n", &ns])
        .output()
        .unwrap();
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(
        table.contains("ENDPOINT") && table.contains(&endpoint),
        "{table}"
    );

    // Steady state: reconciles of a served workload write nothing either
    // (the Service is compared by its rendered hash, like the Deployment).
    let writes = op.settled_writes().await;
    let reconciles = op.counter("rm_operator_reconciles_total");
    for i in 0..3 {
        let patch = json!({"metadata": {"annotations": {"touch": i.to_string()}}});
        api.patch(
            "chat",
            &Default::default(),
            &kube::api::Patch::Merge(&patch),
        )
        .await
        .unwrap();
        // Spaced, so that the controller does not merge them into one.
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        op.counter("rm_operator_reconciles_total") > reconciles,
        "the touches must have caused reconciles"
    );
    assert_eq!(
        op.counter("rm_operator_api_writes_total"),
        writes,
        "a steady-state reconcile of a served workload must not write"
    );
    cluster.remove_node(&node_name(test, "atom")).await;
}

#[tokio::test]
async fn a_pvc_source_is_mounted_and_removing_serve_deletes_the_service() {
    let cluster = cluster();
    let test = "serve-pvc";
    let res = Resources::new(test);
    let ns = cluster.namespace(test).await;
    cluster.install_crds().await;
    let _op = start_operator(cluster, &ns, &res, &[]);
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client.clone(), &ns);
    let dep: Api<Deployment> = Api::namespaced(client.clone(), &ns);
    let services: Api<k8s_openapi::api::core::v1::Service> = Api::namespaced(client.clone(), &ns);

    // A claim bound to a PersistentVolume, so that the scheduler places the
    // pod (kwok mounts nothing).
    let pv_name = format!("weights-{}", std::process::id());
    let pvs: Api<k8s_openapi::api::core::v1::PersistentVolume> = Api::all(client.clone());
    let pv = serde_json::from_value(json!({
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadOnlyMany"],
            "storageClassName": "", "hostPath": {"path": "/tmp/rm-abstract-weights"},
            "claimRef": {"namespace": ns, "name": "weights"}
        }
    }))
    .unwrap();
    pvs.create(&PostParams::default(), &pv).await.unwrap();
    let pvcs: Api<k8s_openapi::api::core::v1::PersistentVolumeClaim> =
        Api::namespaced(client.clone(), &ns);
    let pvc = serde_json::from_value(json!({
        "metadata": {"name": "weights"},
        "spec": {
            "accessModes": ["ReadOnlyMany"], "storageClassName": "", "volumeName": pv_name,
            "resources": {"requests": {"storage": "1Gi"}}
        }
    }))
    .unwrap();
    pvcs.create(&PostParams::default(), &pvc).await.unwrap();

    // A template and serve: the serving container joins the user's pod.
    api.create(
        &PostParams::default(),
        &workload(
            "both",
            json!({
                "model": {"source": "pvc://weights/smollm2"},
                "device": "cpu",
                "serve": {"port": 9000, "modelName": "smol"}
            }),
        ),
    )
    .await
    .unwrap();
    let endpoint = format!("http://both.{ns}.svc:9000/v1");
    wait_iw(&api, "both", "served", 60, |iw| {
        iw.status.as_ref().and_then(|s| s.endpoint.as_deref()) == Some(endpoint.as_str())
    })
    .await;
    let pod = dep.get("both").await.unwrap().spec.template.spec.unwrap();
    let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["app", "rm-serve"]);
    let serve = &pod.containers[1];
    assert_eq!(
        env_value(serve, "RM_SERVE_MODEL_SOURCE"),
        Some("/rm-serve/model/smollm2")
    );
    assert_eq!(env_value(serve, "RM_SERVE_MODEL_NAME"), Some("smol"));
    assert_eq!(env_value(serve, "RM_DEVICE"), Some("cpu"));
    let mount = serve
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| m.mount_path == "/rm-serve/model")
        .expect("the claim is mounted");
    assert_eq!(mount.read_only, Some(true));
    let claim = pod
        .volumes
        .iter()
        .flatten()
        .find(|v| v.name == mount.name)
        .and_then(|v| v.persistent_volume_claim.clone())
        .unwrap();
    assert_eq!(
        (claim.claim_name.as_str(), claim.read_only),
        ("weights", Some(true))
    );
    assert_eq!(
        services
            .get("both")
            .await
            .unwrap()
            .spec
            .unwrap()
            .ports
            .unwrap()[0]
            .port,
        9000
    );

    // Without serve: the Service goes, the endpoint and the condition too.
    let patch = json!({"spec": {"serve": null}});
    api.patch(
        "both",
        &Default::default(),
        &kube::api::Patch::Merge(&patch),
    )
    .await
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while services.get_opt("both").await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "Service not deleted");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let iw = wait_iw(&api, "both", "no longer served", 30, |iw| {
        iw.status.as_ref().is_some_and(|s| s.endpoint.is_none())
            && condition_reason(iw, "Serving").is_none()
    })
    .await;
    assert!(iw.spec.serve.is_none());
    let pod = dep.get("both").await.unwrap().spec.template.spec.unwrap();
    assert_eq!(pod.containers.len(), 1, "the serving container is gone");

    // A Service of that name that is not the workload's is never taken over.
    let theirs: k8s_openapi::api::core::v1::Service = serde_json::from_value(json!({
        "metadata": {"name": "taken"},
        "spec": {"selector": {"app": "other"}, "ports": [{"port": 80}]}
    }))
    .unwrap();
    services
        .create(&PostParams::default(), &theirs)
        .await
        .unwrap();
    api.create(
        &PostParams::default(),
        &served_workload("taken", json!({"device": "cpu", "serve": {}})),
    )
    .await
    .unwrap();
    wait_iw(&api, "taken", "ServiceConflict", 30, |iw| {
        condition_reason(iw, "Serving").as_deref() == Some("ServiceConflict")
    })
    .await;
    let svc = services.get("taken").await.unwrap();
    assert!(svc.metadata.owner_references.is_none(), "left alone");
    assert_eq!(svc.spec.unwrap().ports.unwrap()[0].port, 80);
    let _ = pvs.delete(&pv_name, &DeleteParams::default()).await;
}

#[tokio::test]
async fn the_apiserver_refuses_a_workload_with_neither_template_nor_serve() {
    let cluster = cluster();
    let ns = cluster.namespace("serve-cel").await;
    cluster.install_crds().await;
    let client = cluster.client().await;
    let api: Api<InferenceWorkload> = Api::namespaced(client, &ns);
    let err = api
        .create(
            &PostParams::default(),
            &served_workload("nothing", json!({})),
        )
        .await
        .expect_err("neither template nor serve must be refused");
    let msg = err.to_string();
    assert!(
        msg.contains("spec needs a template") && msg.contains("serve"),
        "{msg}"
    );
    let clash = workload(
        "clash",
        json!({
            "serve": {},
            "template": {"spec": {"containers": [{"name": "rm-serve", "image": "x"}]}}
        }),
    );
    let err = api
        .create(&PostParams::default(), &clash)
        .await
        .expect_err("a template container named rm-serve must be refused");
    assert!(err.to_string().contains("rm-serve"), "{err}");
    // Beside serve, a template may hold only pod settings; alone, it may not.
    let settings = json!({"spec": {
        "nodeSelector": {"pool": "gpu"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]
    }});
    api.create(
        &PostParams::default(),
        &served_workload("pinned", json!({"serve": {}, "template": settings.clone()})),
    )
    .await
    .expect("a container-less template beside serve is accepted");
    let err = api
        .create(
            &PostParams::default(),
            &served_workload("empty", json!({"template": settings})),
        )
        .await
        .expect_err("a container-less template without serve must be refused");
    assert!(
        err.to_string()
            .contains("spec.template.spec.containers must have at least 1 container"),
        "{err}"
    );
    let low_port = served_workload("low", json!({"serve": {"port": 80}}));
    let err = api
        .create(&PostParams::default(), &low_port)
        .await
        .expect_err("a port below 1024 must be refused");
    assert!(err.to_string().contains("spec.serve.port"), "{err}");
}
