//! The plugin over real gRPC on unix sockets, driven by a test kubelet, on
//! fake host trees for each vendor, mixed, empty and broken.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use rm_device_plugin::api;
use rm_device_plugin::config::FileConfig;

const GPU0: &str = "GPU-11111111-2222-3333-4444-000000000000";
const GPU1: &str = "GPU-11111111-2222-3333-4444-000000000001";
const SEC: Duration = Duration::from_secs(1);

fn alloc_req(ids: &[&str]) -> api::AllocateRequest {
    api::AllocateRequest {
        container_requests: vec![api::ContainerAllocateRequest {
            devices_ids: ids.iter().map(|s| s.to_string()).collect(),
        }],
    }
}

fn paths(r: &api::ContainerAllocateResponse) -> Vec<&str> {
    r.devices.iter().map(|d| d.host_path.as_str()).collect()
}

#[tokio::test]
async fn gpu_node_registers_lists_with_numa_and_allocates_with_a_token() {
    let host = FakeHost::new();
    host.nvidia_gpu("0000:3b:00.0", 0, GPU0, 0);
    host.nvidia_gpu("0000:af:00.0", 1, GPU1, 1);
    host.pci("0000:3b:00.1", 0x10de, 0x22a3, 0x040300, 0); // the GPU's audio function
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(
        &host,
        &dirs,
        FileConfig {
            agent_socket_dir: Some("/run/rm-abstract".into()),
            ..Default::default()
        },
    ));

    // The agent resource registers beside it (see the CPU node's test).
    let reg = kubelet.registration_of("nvidia.com/gpu", 2 * SEC).await;
    assert_eq!(reg.version, "v1beta1");
    assert_eq!(reg.endpoint, "rm-gpu.sock");
    assert!(reg.options.unwrap().get_preferred_allocation_available);

    let mut client = kubelet.client(&reg).await;
    let mut lw = Watch::open(&mut client).await;
    let devs = lw.until(SEC, |d| d.len() == 2).await;
    assert_eq!(devs[0].id, GPU0);
    assert_eq!(devs[0].health, "Healthy");
    assert_eq!(devs[0].topology.as_ref().unwrap().nodes[0].id, 0);
    assert_eq!(devs[1].topology.as_ref().unwrap().nodes[0].id, 1);

    let resp = client
        .allocate(alloc_req(&[GPU1]))
        .await
        .unwrap()
        .into_inner();
    let c = &resp.container_responses[0];
    assert_eq!(
        paths(c),
        [
            "/dev/nvidia1",
            "/dev/nvidiactl",
            "/dev/nvidia-uvm",
            "/dev/nvidia-uvm-tools"
        ]
    );
    assert!(
        c.devices
            .iter()
            .all(|d| d.permissions == "rw" && d.container_path == d.host_path)
    );
    assert_eq!(c.envs["NVIDIA_VISIBLE_DEVICES"], GPU1);
    assert_eq!(c.envs["RM_ALLOCATED_DEVICES"], "gpu:1");
    assert_eq!(c.mounts[0].host_path, "/run/rm-abstract");
    let token = &c.envs["RM_AGENT_TOKEN"];
    // Read back with the function the node agent uses: the two agree on the
    // record format by construction.
    let rec = rm_crds::token::read(&dirs.tokens_dir(), token).expect("token record");
    assert_eq!(rec.device_ids, [GPU1]);
    assert_eq!(rec.devices[0].index, 1);
    assert_eq!(rec.device_type(), Some(rm_crds::DeviceType::Gpu));
    assert_eq!(rec.visible_ids(), [GPU1]);
    assert!(
        !std::fs::read_to_string(rm_crds::token::record_path(
            &dirs.tokens_dir(),
            &rec.token_sha256
        ))
        .unwrap()
        .contains(token.as_str()),
        "the token itself is not on disk"
    );

    let err = client.allocate(alloc_req(&["GPU-nope"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("GPU-nope"), "{}", err.message());
    plugin.stop().await;
    assert!(
        !dirs.kubelet.path().join("rm-gpu.sock").exists(),
        "socket removed on stop"
    );
}

#[tokio::test]
async fn rebellions_node_allocates_rbln_nodes_and_skips_unknown_products_and_pfs_with_vfs() {
    let host = FakeHost::new();
    host.rbln("0000:01:00.0", 0, 0);
    host.rbln("0000:02:00.0", 1, 1);
    host.pci("0000:03:00.0", 0x1eff, 0x9999, 0x120000, 0); // unknown product
    host.write("sys/bus/pci/devices/0000:02:00.0/sriov_numvfs", "2\n"); // its VFs are the units
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(&host, &dirs, FileConfig::default()));
    let reg = kubelet.next_registration(2 * SEC).await;
    assert_eq!(reg.resource_name, "rebellions.ai/ATOM");
    let mut client = kubelet.client(&reg).await;
    let devs = Watch::open(&mut client)
        .await
        .until(SEC, |d| !d.is_empty())
        .await;
    let ids: Vec<&str> = devs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(ids, ["0000:01:00.0"]);
    let resp = client
        .allocate(alloc_req(&["0000:01:00.0"]))
        .await
        .unwrap()
        .into_inner();
    let c = &resp.container_responses[0];
    assert_eq!(paths(c), ["/dev/rbln0", "/dev/rsd0"]);
    assert_eq!(c.envs["RBLN_DEVICES"], "0");
    assert_eq!(c.envs["RM_ALLOCATED_DEVICES"], "rbln:0");
    plugin.stop().await;
}

#[tokio::test]
async fn furiosa_node_allocates_all_nodes_of_the_npu_and_mounts_its_mgmt_sysfs() {
    let host = FakeHost::new();
    host.rngd("0000:4e:00.0", 0, "A0000000-0000-0000-0000-000000000000", 0);
    host.rngd("0000:4f:00.0", 1, "A1111111-0000-0000-0000-000000000000", 0);
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(&host, &dirs, FileConfig::default()));
    let reg = kubelet.next_registration(2 * SEC).await;
    assert_eq!(reg.resource_name, "furiosa.ai/rngd");
    let mut client = kubelet.client(&reg).await;
    let devs = Watch::open(&mut client)
        .await
        .until(SEC, |d| d.len() == 2)
        .await;
    assert!(devs.iter().all(|d| d.health == "Healthy"), "{devs:?}");
    let resp = client
        .allocate(alloc_req(&["A1111111-0000-0000-0000-000000000000"]))
        .await
        .unwrap()
        .into_inner();
    let c = &resp.container_responses[0];
    let p = paths(c);
    assert!(p.contains(&"/dev/rngd/npu1pe0") && p.contains(&"/dev/rngd/npu1pe0-3"));
    assert!(p.contains(&"/dev/rngd/npu1ch7") && p.contains(&"/dev/rngd/npu1mgmt"));
    assert!(!p.iter().any(|x| x.contains("npu0")), "{p:?}");
    assert_eq!(c.envs["FURIOSA_DEVICES"], "npu:1");
    assert_eq!(c.mounts[0].host_path, "/sys/class/rngd_mgmt/rngd!npu1mgmt");
    assert!(c.mounts[0].read_only);
    plugin.stop().await;
}

#[tokio::test]
async fn mixed_node_registers_one_endpoint_per_vendor() {
    let host = FakeHost::new();
    host.nvidia_gpu("0000:3b:00.0", 0, GPU0, 0);
    host.rbln("0000:01:00.0", 0, 0);
    host.rngd("0000:4e:00.0", 0, "A0000000-0000-0000-0000-000000000000", 1);
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(&host, &dirs, FileConfig::default()));
    let mut seen = Vec::new();
    for _ in 0..3 {
        let r = kubelet.next_registration(2 * SEC).await;
        seen.push((r.resource_name, r.endpoint));
    }
    seen.sort();
    assert_eq!(
        seen,
        [
            ("furiosa.ai/rngd".to_string(), "rm-furiosa.sock".to_string()),
            ("nvidia.com/gpu".to_string(), "rm-gpu.sock".to_string()),
            ("rebellions.ai/ATOM".to_string(), "rm-rbln.sock".to_string()),
        ]
    );
    plugin.stop().await;
}

#[tokio::test]
async fn agent_socket_slots_mount_the_socket_dir_and_carry_a_token_bound_to_their_pod() {
    // A CPU node: no accelerator, only the node agent.
    let host = FakeHost::new();
    let dirs = Dirs::new();
    let podres = TestPodResources::default();
    podres.serve(&dirs.pod_resources_socket());
    // The kubelet records the slot of the pod right after Allocate.
    podres.set_pod(
        "team-a",
        "chat-0",
        rm_crds::device::AGENT_RESOURCE,
        &[&["agent::3"]],
    );
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(
        &host,
        &dirs,
        FileConfig {
            agent_socket_dir: Some("/var/run/rm-abstract".into()),
            agent_slots: Some(5),
            ..Default::default()
        },
    ));
    let reg = kubelet.next_registration(2 * SEC).await;
    assert_eq!(reg.resource_name, rm_crds::device::AGENT_RESOURCE);
    assert_eq!(reg.endpoint, "rm-agent.sock");
    let mut client = kubelet.client(&reg).await;
    let devs = Watch::open(&mut client)
        .await
        .until(SEC, |d| d.len() == 5)
        .await;
    let ids: Vec<&str> = devs.iter().map(|d| d.id.as_str()).collect();
    assert_eq!(
        ids,
        ["agent::0", "agent::1", "agent::2", "agent::3", "agent::4"]
    );
    assert!(
        devs.iter()
            .all(|d| d.health == "Healthy" && d.topology.is_none())
    );

    let resp = client
        .allocate(alloc_req(&["agent::3"]))
        .await
        .unwrap()
        .into_inner();
    let c = &resp.container_responses[0];
    assert_eq!(c.mounts.len(), 1);
    assert_eq!(c.mounts[0].host_path, "/var/run/rm-abstract");
    assert_eq!(c.mounts[0].container_path, "/var/run/rm-abstract");
    assert!(c.mounts[0].read_only);
    assert!(c.devices.is_empty(), "{:?}", c.devices);
    assert_eq!(c.envs.len(), 1, "only the slot's token: {:?}", c.envs);
    assert!(
        !c.envs.contains_key("RM_AGENT_TOKEN"),
        "an accelerator's token is never shadowed"
    );
    let token = &c.envs["RM_AGENT_SLOT_TOKEN"];
    let rec = rm_crds::token::read(&dirs.tokens_dir(), token).expect("slot record");
    assert!(rec.agent_slot && rec.devices.is_empty());
    assert_eq!(rec.device_type(), Some(rm_crds::DeviceType::Cpu));
    assert_eq!(rec.device_ids, ["agent::3"]);
    let lease_left = rec.expires_unix_ms.expect("a lease") - rec.created_unix_ms;
    assert_eq!(lease_left, 600_000, "the default lease");
    // Bound to the pod the kubelet reports, without waiting for the
    // periodic pass (30 s).
    let deadline = Instant::now() + 2 * SEC;
    let owner = loop {
        let rec = rm_crds::token::read(&dirs.tokens_dir(), token).expect("slot record");
        if let Some(o) = rec.owner {
            break o;
        }
        assert!(Instant::now() < deadline, "token not bound within 2 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(
        (owner.namespace.as_str(), owner.pod.as_str()),
        ("team-a", "chat-0")
    );

    let err = client.allocate(alloc_req(&["agent::5"])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("agent::5"), "{}", err.message());
    plugin.stop().await;
    assert!(!dirs.kubelet.path().join("rm-agent.sock").exists());
}

#[tokio::test]
async fn node_without_devices_registers_nothing_and_stops_cleanly() {
    let host = FakeHost::new();
    host.pci("0000:00:02.0", 0x8086, 0x1234, 0x030000, 0); // an Intel iGPU
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(&host, &dirs, FileConfig::default()));
    // Absence can only be observed over a window: one second is five
    // registration polls' worth.
    let got = tokio::time::timeout(SEC, kubelet.registrations.recv()).await;
    assert!(got.is_err(), "unexpected registration: {got:?}");
    plugin.stop().await;
}

#[tokio::test]
async fn broken_entries_are_skipped_or_unhealthy_never_fatal() {
    let host = FakeHost::new();
    host.nvidia_gpu("0000:3b:00.0", 0, GPU0, 0);
    host.nvidia_gpu("0000:5e:00.0", 1, GPU1, 0);
    host.remove("dev/nvidia1"); // driver info present, node missing
    host.nvidia_gpu("0000:86:00.0", 2, "GPU-bad-minor", 0);
    host.write(
        "proc/driver/nvidia/gpus/0000:86:00.0/information",
        "GPU UUID: \t GPU-bad-minor\nDevice Minor: \t two\n",
    );
    host.write("sys/bus/pci/devices/0000:99:00.0/vendor", "not hex\n");
    host.write("sys/bus/pci/devices/0000:9a:00.0/device", "0x1\n"); // no vendor file
    host.rngd("0000:4e:00.0", 0, "A0000000-0000-0000-0000-000000000000", 0);
    host.write("sys/class/rngd_mgmt/rngd!npu0mgmt/heartbeat", "garbage\n");
    host.write("dev/rngd/npu5pe0", ""); // a node whose mgmt sysfs is missing
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(&host, &dirs, FileConfig::default()));
    let mut regs = [
        kubelet.next_registration(2 * SEC).await,
        kubelet.next_registration(2 * SEC).await,
    ];
    regs.sort_by(|a, b| a.resource_name.cmp(&b.resource_name));
    let mut gpu = kubelet.client(&regs[1]).await;
    let devs = Watch::open(&mut gpu)
        .await
        .until(SEC, |d| d.len() == 2)
        .await;
    assert_eq!(health_of(&devs, GPU0).as_deref(), Some("Healthy"));
    assert_eq!(health_of(&devs, GPU1).as_deref(), Some("Unhealthy"));
    let err = gpu.allocate(alloc_req(&[GPU1])).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(
        err.message().contains("/dev/nvidia1 is missing"),
        "{}",
        err.message()
    );

    let mut rngd = kubelet.client(&regs[0]).await;
    let devs = Watch::open(&mut rngd)
        .await
        .until(SEC, |d| d.len() == 1)
        .await;
    assert_eq!(devs[0].health, "Unhealthy", "unreadable heartbeat");
    plugin.stop().await;
}

#[tokio::test]
async fn kubelet_restart_leads_to_reregistration_within_2s() {
    let host = FakeHost::new();
    host.nvidia_gpu("0000:3b:00.0", 0, GPU0, 0);
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(&host, &dirs, FileConfig::default()));
    kubelet.next_registration(2 * SEC).await;

    for round in 0..2 {
        kubelet.stop_and_wipe().await;
        assert!(!dirs.kubelet.path().join("rm-gpu.sock").exists());
        let restarted = Instant::now();
        kubelet = TestKubelet::start(dirs.kubelet.path());
        let reg = kubelet.next_registration(2 * SEC).await;
        let took = restarted.elapsed();
        assert!(
            took < 2 * SEC,
            "round {round}: re-registered after {took:?}"
        );
        // The new socket serves: the kubelet can list devices again.
        let mut client = kubelet.client(&reg).await;
        let devs = Watch::open(&mut client)
            .await
            .until(SEC, |d| d.len() == 1)
            .await;
        assert_eq!(devs[0].id, GPU0);
    }
    plugin.stop().await;
}

#[tokio::test]
async fn removed_device_turns_unhealthy_and_returns_healthy_within_1s() {
    let host = FakeHost::new();
    host.nvidia_gpu("0000:3b:00.0", 0, GPU0, 0);
    host.nvidia_gpu("0000:af:00.0", 1, GPU1, 1);
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(&host, &dirs, FileConfig::default()));
    let reg = kubelet.next_registration(2 * SEC).await;
    let mut client = kubelet.client(&reg).await;
    let mut lw = Watch::open(&mut client).await;
    lw.until(SEC, |d| {
        d.len() == 2 && d.iter().all(|x| x.health == "Healthy")
    })
    .await;

    host.remove("dev/nvidia1");
    lw.until(SEC, |d| health_of(d, GPU1).as_deref() == Some("Unhealthy"))
        .await;
    assert_eq!(health_of(&lw.last, GPU0).as_deref(), Some("Healthy"));

    host.write("dev/nvidia1", "");
    lw.until(SEC, |d| health_of(d, GPU1).as_deref() == Some("Healthy"))
        .await;

    // The whole PCI function vanishing (hot unplug) keeps it listed, Unhealthy.
    std::fs::remove_dir_all(host.root().join("sys/bus/pci/devices/0000:af:00.0")).unwrap();
    let devs = lw
        .until(SEC, |d| health_of(d, GPU1).as_deref() == Some("Unhealthy"))
        .await;
    assert_eq!(devs.len(), 2);
    plugin.stop().await;
}

#[tokio::test]
async fn stuck_furiosa_heartbeat_turns_unhealthy_and_recovers() {
    let host = FakeHost::new();
    let uuid = "A0000000-0000-0000-0000-000000000000";
    host.rngd("0000:4e:00.0", 0, uuid, 0);
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(
        &host,
        &dirs,
        FileConfig {
            heartbeat_timeout_ms: Some(300),
            ..Default::default()
        },
    ));
    let reg = kubelet.next_registration(2 * SEC).await;
    let mut client = kubelet.client(&reg).await;
    let mut lw = Watch::open(&mut client).await;
    // The fake heartbeat never moves: Unhealthy after the 300 ms timeout.
    lw.until(2 * SEC, |d| {
        health_of(d, uuid).as_deref() == Some("Unhealthy")
    })
    .await;
    host.write("sys/class/rngd_mgmt/rngd!npu0mgmt/heartbeat", "2\n");
    lw.until(SEC, |d| health_of(d, uuid).as_deref() == Some("Healthy"))
        .await;
    plugin.stop().await;
}

/// Reads ListAndWatch messages for `window`, writing the next heartbeat of
/// `npu0` before each wait of `step`, as a live RNGD advances it; returns
/// the messages that arrived.
async fn beat_and_collect(
    host: &FakeHost,
    lw: &mut Watch,
    first_beat: u64,
    window: Duration,
) -> Vec<api::ListAndWatchResponse> {
    let step = Duration::from_millis(40);
    let mut got = Vec::new();
    let mut beat = first_beat;
    let deadline = Instant::now() + window;
    while Instant::now() < deadline {
        host.write_atomic(
            "sys/class/rngd_mgmt/rngd!npu0mgmt/heartbeat",
            &format!("{beat}\n"),
        );
        beat += 1;
        if let Ok(msg) = tokio::time::timeout(step, lw.stream.message()).await {
            got.push(msg.unwrap().expect("stream stays open"));
        }
    }
    got
}

#[tokio::test]
async fn advancing_furiosa_heartbeat_sends_no_update_but_a_health_change_does() {
    let host = FakeHost::new();
    let uuid = "A0000000-0000-0000-0000-000000000000";
    host.rngd("0000:4e:00.0", 0, uuid, 0);
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(
        &host,
        &dirs,
        FileConfig {
            health_interval_ms: Some(50),
            ..Default::default()
        },
    ));
    let reg = kubelet.next_registration(2 * SEC).await;
    let mut client = kubelet.client(&reg).await;
    let mut lw = Watch::open(&mut client).await;
    lw.until(SEC, |d| health_of(d, uuid).as_deref() == Some("Healthy"))
        .await;

    // About 20 health passes, each seeing a new heartbeat: the kubelet's
    // view does not change, so nothing is sent (each send would make the
    // kubelet rewrite its checkpoint).
    let extra = beat_and_collect(&host, &mut lw, 2, SEC).await;
    assert!(
        extra.is_empty(),
        "{} ListAndWatch messages while only the heartbeat moved: {extra:?}",
        extra.len()
    );

    // A real health change is sent, once, while the heartbeat keeps moving
    // (two seconds: room for a slow machine, and 40 more health passes that
    // must not send it again).
    host.write_atomic("sys/class/rngd_mgmt/rngd!npu0mgmt/device_state", "error\n");
    let got = beat_and_collect(&host, &mut lw, 100, 2 * SEC).await;
    assert_eq!(got.len(), 1, "one message for the health change: {got:?}");
    assert_eq!(
        health_of(&got[0].devices, uuid).as_deref(),
        Some("Unhealthy")
    );

    host.write_atomic("sys/class/rngd_mgmt/rngd!npu0mgmt/device_state", "0\n");
    let got = beat_and_collect(&host, &mut lw, 200, 2 * SEC).await;
    assert_eq!(got.len(), 1, "one message for the recovery: {got:?}");
    assert_eq!(health_of(&got[0].devices, uuid).as_deref(), Some("Healthy"));
    plugin.stop().await;
}

#[tokio::test]
async fn preferred_allocation_is_numa_local_honours_must_include_and_packs() {
    let host = FakeHost::new();
    let ids: Vec<String> = (0..5)
        .map(|i| format!("GPU-11111111-2222-3333-4444-00000000000{i}"))
        .collect();
    for (i, id) in ids.iter().enumerate() {
        let numa = if i < 2 { 0 } else { 1 };
        host.nvidia_gpu(&format!("0000:{:02x}:00.0", 0x10 + i), i as u32, id, numa);
    }
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(&host, &dirs, FileConfig::default()));
    let reg = kubelet.next_registration(2 * SEC).await;
    let mut client = kubelet.client(&reg).await;
    let ask = |must: Vec<String>, size| api::PreferredAllocationRequest {
        container_requests: vec![api::ContainerPreferredAllocationRequest {
            available_device_i_ds: ids.clone(),
            must_include_device_i_ds: must,
            allocation_size: size,
        }],
    };
    let pick = |r: api::PreferredAllocationResponse| r.container_responses[0].device_i_ds.clone();
    // NUMA 0 holds 2 free, NUMA 1 holds 3: a pair fits best on NUMA 0.
    let got = pick(
        client
            .get_preferred_allocation(ask(vec![], 2))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(got, [ids[0].clone(), ids[1].clone()]);
    // Three fit only on NUMA 1.
    let got = pick(
        client
            .get_preferred_allocation(ask(vec![], 3))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(got, [ids[2].clone(), ids[3].clone(), ids[4].clone()]);
    // must_include on NUMA 1 keeps the rest there.
    let got = pick(
        client
            .get_preferred_allocation(ask(vec![ids[4].clone()], 2))
            .await
            .unwrap()
            .into_inner(),
    );
    assert_eq!(got[0], ids[4]);
    assert!(got[1] == ids[2] || got[1] == ids[3], "{got:?}");
    plugin.stop().await;
}

#[tokio::test]
async fn shared_devices_are_advertised_as_replicas() {
    let host = FakeHost::new();
    host.nvidia_gpu("0000:3b:00.0", 0, GPU0, 0);
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(
        &host,
        &dirs,
        FileConfig {
            replicas: Some(3),
            ..Default::default()
        },
    ));
    let reg = kubelet.next_registration(2 * SEC).await;
    let mut client = kubelet.client(&reg).await;
    let devs = Watch::open(&mut client)
        .await
        .until(SEC, |d| d.len() == 3)
        .await;
    assert_eq!(devs[2].id, format!("{GPU0}::2"));
    let resp = client
        .allocate(alloc_req(&[&format!("{GPU0}::1")]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        resp.container_responses[0].envs["NVIDIA_VISIBLE_DEVICES"],
        GPU0
    );
    plugin.stop().await;
}

#[tokio::test]
async fn tokens_of_vanished_containers_are_collected() {
    let host = FakeHost::new();
    host.nvidia_gpu("0000:3b:00.0", 0, GPU0, 0);
    host.nvidia_gpu("0000:af:00.0", 1, GPU1, 1);
    let dirs = Dirs::new();
    let podres = TestPodResources::default();
    podres.serve(&dirs.pod_resources_socket());
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(
        &host,
        &dirs,
        FileConfig {
            token_gc_interval_ms: Some(100),
            token_grace_ms: Some(0),
            ..Default::default()
        },
    ));
    let reg = kubelet.next_registration(2 * SEC).await;
    let mut client = kubelet.client(&reg).await;
    // Both containers are live before their tokens exist, so no pass of the
    // collector can race the allocation.
    podres.set("nvidia.com/gpu", &[&[GPU0], &[GPU1]]);
    let token_of =
        |r: api::AllocateResponse| r.container_responses[0].envs["RM_AGENT_TOKEN"].clone();
    let t0 = token_of(
        client
            .allocate(alloc_req(&[GPU0]))
            .await
            .unwrap()
            .into_inner(),
    );
    let t1 = token_of(
        client
            .allocate(alloc_req(&[GPU1]))
            .await
            .unwrap()
            .into_inner(),
    );
    let file =
        |t: &str| rm_crds::token::record_path(&dirs.tokens_dir(), &rm_crds::token::token_sha256(t));
    assert!(file(&t0).exists() && file(&t1).exists());

    // The second container goes away.
    podres.set("nvidia.com/gpu", &[&[GPU0]]);
    wait_until(2 * SEC, "token of the vanished container removed", || {
        !file(&t1).exists()
    })
    .await;
    assert!(file(&t0).exists(), "live container's token kept");

    // A new allocation of GPU0 supersedes the old holder at once.
    let t2 = token_of(
        client
            .allocate(alloc_req(&[GPU0]))
            .await
            .unwrap()
            .into_inner(),
    );
    assert!(file(&t2).exists());
    assert!(!file(&t0).exists(), "superseded token removed");
    plugin.stop().await;
}

/// How the server answered a request stream.
#[derive(Debug, PartialEq)]
enum H2Answer {
    /// A HEADERS frame on the stream: the request reached the service.
    Headers,
    /// RST_STREAM with this error code (1 = PROTOCOL_ERROR).
    Reset(u32),
}

/// HPACK integer with an `n`-bit prefix (RFC 7541 §5.1); `first` holds the
/// bits above the prefix.
fn hpack_int(out: &mut Vec<u8>, first: u8, n: u32, mut v: usize) {
    let max = (1usize << n) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len();
    let mut f = vec![(len >> 16) as u8, (len >> 8) as u8, len as u8, kind, flags];
    f.extend_from_slice(&stream.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A minimal HTTP/2 client, by hand: a client library would not let us put
/// a malformed `:authority` on the wire, which is what grpcio (C core, since
/// 1.57) does for `unix:` targets. Sends one GetDevicePluginOptions call with
/// `authority` and reports how the server answered stream 1.
async fn raw_h2_call(socket: &std::path::Path, authority: &str) -> H2Answer {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut io = tokio::net::UnixStream::connect(socket).await.unwrap();
    let mut block = Vec::new();
    for (name, value) in [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", "/v1beta1.DevicePlugin/GetDevicePluginOptions"),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ] {
        // Literal without indexing, new name, no Huffman (RFC 7541 §6.2.2).
        block.push(0x00);
        hpack_int(&mut block, 0, 7, name.len());
        block.extend_from_slice(name.as_bytes());
        hpack_int(&mut block, 0, 7, value.len());
        block.extend_from_slice(value.as_bytes());
    }
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    out.extend(h2_frame(0x4, 0, 0, &[])); // SETTINGS
    out.extend(h2_frame(0x1, 0x4, 1, &block)); // HEADERS, END_HEADERS
    // DATA, END_STREAM: one uncompressed gRPC message of 0 bytes (Empty).
    out.extend(h2_frame(0x0, 0x1, 1, &[0, 0, 0, 0, 0]));
    io.write_all(&out).await.unwrap();
    let read = async {
        loop {
            let mut head = [0u8; 9];
            io.read_exact(&mut head).await.unwrap();
            let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
            let (kind, flags) = (head[3], head[4]);
            let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
            let mut payload = vec![0u8; len];
            io.read_exact(&mut payload).await.unwrap();
            match (kind, stream) {
                (0x4, 0) if flags & 0x1 == 0 => {
                    io.write_all(&h2_frame(0x4, 0x1, 0, &[])).await.unwrap(); // SETTINGS ACK
                }
                (0x1, 1) => return H2Answer::Headers,
                (0x3, 1) => {
                    return H2Answer::Reset(u32::from_be_bytes([
                        payload[0], payload[1], payload[2], payload[3],
                    ]));
                }
                (0x7, _) => panic!("GOAWAY: {payload:?}"),
                _ => {}
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(2), read)
        .await
        .expect("an answer on stream 1 within 2 s")
}

/// grpc-go (the kubelet) sends `:authority: localhost` and is served. grpcio
/// sends the socket path percent-encoded, and h2 refuses that while parsing
/// the request head (`http::uri::Authority` allows `%` only in userinfo),
/// before any code of ours runs: see "gRPC clients other than the kubelet"
/// in the README. Should h2 ever accept it, this fails and the README
/// section can go.
#[tokio::test]
async fn localhost_authority_is_served_and_a_percent_encoded_socket_path_is_refused_by_h2() {
    let host = FakeHost::new();
    host.nvidia_gpu("0000:3b:00.0", 0, GPU0, 0);
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let plugin = RunningPlugin::start(test_config(&host, &dirs, FileConfig::default()));
    let reg = kubelet.next_registration(2 * SEC).await;
    let socket = dirs.kubelet.path().join(&reg.endpoint);
    assert_eq!(raw_h2_call(&socket, "localhost").await, H2Answer::Headers);
    // What grpcio sends for unix:///var/lib/kubelet/device-plugins/rm-gpu.sock.
    let encoded = "%2Fvar%2Flib%2Fkubelet%2Fdevice-plugins%2Frm-gpu.sock";
    assert_eq!(raw_h2_call(&socket, encoded).await, H2Answer::Reset(0x1));
    // Only that stream was refused: the plugin keeps serving.
    assert_eq!(raw_h2_call(&socket, "localhost").await, H2Answer::Headers);
    plugin.stop().await;
}

#[tokio::test]
async fn sigterm_stops_the_binary_and_removes_its_socket() {
    let host = FakeHost::new();
    host.nvidia_gpu("0000:3b:00.0", 0, GPU0, 0);
    let dirs = Dirs::new();
    let mut kubelet = TestKubelet::start(dirs.kubelet.path());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rm-device-plugin"))
        .arg("--host-root")
        .arg(host.root())
        .arg("--kubelet-dir")
        .arg(dirs.kubelet.path())
        .arg("--state-dir")
        .arg(dirs.state.path())
        .env("RM_LOG_FORMAT", "json")
        .env("RM_DP_POD_RESOURCES_SOCKET", dirs.pod_resources_socket())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let reg = kubelet.next_registration(5 * SEC).await;
    assert_eq!(reg.endpoint, "rm-gpu.sock");
    let socket = dirs.kubelet.path().join("rm-gpu.sock");
    assert!(socket.exists());
    // Keep a ListAndWatch stream open: shutdown must not wait on it.
    let mut client = kubelet.client(&reg).await;
    let mut lw = Watch::open(&mut client).await;
    lw.until(SEC, |d| d.len() == 1).await;
    let pid = child.id().unwrap().to_string();
    let status = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::time::timeout(5 * SEC, child.wait())
        .await
        .expect("exits within 5 s")
        .unwrap();
    assert!(exit.success(), "{exit:?}");
    assert!(!socket.exists(), "socket removed");
}
