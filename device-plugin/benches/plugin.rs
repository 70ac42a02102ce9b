//! Benchmark of the real `rm-device-plugin` binary on a fake 8-GPU host tree
//! (a TEST DOUBLE of NVIDIA's sysfs/procfs/dev layout): Allocate latency
//! p50/p99 over its unix socket, time from a health change on disk to the
//! ListAndWatch update, and the process's resident memory. Prints figures.
//!
//! `cargo bench -p rm-device-plugin --bench plugin`
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::{Duration, Instant};

use rm_device_plugin::api;
use rm_device_plugin::api::device_plugin_client::DevicePluginClient;
use rm_device_plugin::transport::connect_unix;

const GPUS: u32 = 8;
const ALLOCATIONS: usize = 5000;
const HEALTH_FLIPS: usize = 20;

fn write(root: &Path, rel: &str, content: &str) {
    let p = root.join(rel);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(p, content).unwrap();
}

fn fake_host(root: &Path) {
    for i in 0..GPUS {
        let addr = format!("0000:{:02x}:00.0", 0x10 + i);
        let d = format!("sys/bus/pci/devices/{addr}");
        write(root, &format!("{d}/vendor"), "0x10de\n");
        write(root, &format!("{d}/device"), "0x2330\n");
        write(root, &format!("{d}/class"), "0x030200\n");
        write(root, &format!("{d}/numa_node"), &format!("{}\n", i / 4));
        write(
            root,
            &format!("proc/driver/nvidia/gpus/{addr}/information"),
            &format!("GPU UUID: \t {}\nDevice Minor: \t {i}\n", uuid(i)),
        );
        write(root, &format!("dev/nvidia{i}"), "");
    }
    write(root, "dev/nvidiactl", "");
    write(root, "dev/nvidia-uvm", "");
}

fn uuid(i: u32) -> String {
    format!("GPU-00000000-0000-0000-0000-{i:012}")
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx]
}

fn rss_kib(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[tokio::main]
async fn main() {
    let host = tempfile::tempdir().unwrap();
    let kubelet = tempfile::tempdir().unwrap();
    let state = tempfile::tempdir().unwrap();
    fake_host(host.path());
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_rm-device-plugin"))
        .arg("--host-root")
        .arg(host.path())
        .arg("--kubelet-dir")
        .arg(kubelet.path())
        .arg("--state-dir")
        .arg(state.path())
        .env("RM_LOG", "warn")
        .env("RM_DP_POD_RESOURCES_SOCKET", state.path().join("none.sock"))
        .spawn()
        .unwrap();
    let pid = child.id().unwrap();
    let socket = kubelet.path().join("rm-gpu.sock");
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "plugin did not serve"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut client = DevicePluginClient::new(connect_unix(&socket).await.unwrap());
    let rss_idle = rss_kib(pid, "VmRSS:");

    // Allocate latency, one GPU per container, cycling over the GPUs.
    let mut lat = Vec::with_capacity(ALLOCATIONS);
    for n in 0..ALLOCATIONS {
        let req = api::AllocateRequest {
            container_requests: vec![api::ContainerAllocateRequest {
                devices_ids: vec![uuid(n as u32 % GPUS)],
            }],
        };
        let t = Instant::now();
        client.allocate(req).await.unwrap();
        lat.push(t.elapsed());
    }
    lat.sort();

    // Health change on disk → ListAndWatch update.
    let mut stream = client
        .list_and_watch(api::Empty {})
        .await
        .unwrap()
        .into_inner();
    stream.message().await.unwrap(); // the initial list
    let node = host.path().join("dev/nvidia3");
    let mut health_lat = Vec::new();
    for flip in 0..HEALTH_FLIPS {
        let want = if flip % 2 == 0 {
            "Unhealthy"
        } else {
            "Healthy"
        };
        let t = Instant::now();
        if flip % 2 == 0 {
            std::fs::remove_file(&node).unwrap();
        } else {
            std::fs::write(&node, "").unwrap();
        }
        loop {
            let msg = tokio::time::timeout(Duration::from_secs(3), stream.message())
                .await
                .expect("update within 3 s")
                .unwrap()
                .unwrap();
            if msg
                .devices
                .iter()
                .any(|d| d.id == uuid(3) && d.health == want)
            {
                break;
            }
        }
        health_lat.push(t.elapsed());
        // Desynchronise from the health ticker so the samples spread over it.
        tokio::time::sleep(Duration::from_millis(37)).await;
    }
    health_lat.sort();
    let rss_after = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");

    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
    let _ = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;

    println!("rm-device-plugin benchmark ({GPUS} fake GPUs, default 250 ms health interval)");
    println!(
        "Allocate latency over {ALLOCATIONS} calls: p50 {:?}  p99 {:?}  max {:?}",
        percentile(&lat, 0.50),
        percentile(&lat, 0.99),
        lat[lat.len() - 1]
    );
    println!(
        "health change on disk -> ListAndWatch over {HEALTH_FLIPS} flips: p50 {:?}  max {:?}",
        percentile(&health_lat, 0.50),
        health_lat[health_lat.len() - 1]
    );
    println!(
        "resident memory: idle {:.1} MiB, after load {:.1} MiB, peak {:.1} MiB",
        rss_idle as f64 / 1024.0,
        rss_after as f64 / 1024.0,
        hwm as f64 / 1024.0
    );
}
