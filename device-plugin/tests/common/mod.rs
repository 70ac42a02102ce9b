//! Test fixtures: a fake host tree (the stand-in for hardware, which cannot
//! exist here), a test kubelet built from the same proto, and a test
//! PodResources server.
#![allow(dead_code, clippy::unwrap_used)]

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rm_device_plugin::api;
use rm_device_plugin::api::device_plugin_client::DevicePluginClient;
use rm_device_plugin::api::registration_server::{Registration, RegistrationServer};
use rm_device_plugin::config::{Config, FileConfig, FlagConfig};
use rm_device_plugin::podresources_api as pr;
use rm_device_plugin::transport::{bind_unix, connect_unix};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tonic::transport::Channel;

/// TEST DOUBLE of a host's sysfs, procfs and /dev, laid out as the vendors'
/// drivers do (see the discovery modules' headers for the sources). Device
/// nodes are plain files: existence is all the plugin checks.
pub struct FakeHost {
    pub dir: tempfile::TempDir,
}

impl FakeHost {
    pub fn new() -> Self {
        FakeHost {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, rel: &str, content: &str) {
        let p = self.root().join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, content).unwrap();
    }

    /// Replaces a file by renaming a complete copy over it, as sysfs
    /// attributes behave: a reader never sees it truncated. A plain `write`
    /// truncates first, and a health pass reading in between would see an
    /// empty heartbeat (Unhealthy) that real hardware never shows.
    pub fn write_atomic(&self, rel: &str, content: &str) {
        let p = self.root().join(rel);
        let tmp = p.with_file_name(format!(".{}.tmp", p.file_name().unwrap().to_str().unwrap()));
        std::fs::write(&tmp, content).unwrap();
        std::fs::rename(tmp, p).unwrap();
    }

    pub fn remove(&self, rel: &str) {
        std::fs::remove_file(self.root().join(rel)).unwrap();
    }

    pub fn pci(&self, addr: &str, vendor: u16, device: u16, class: u32, numa: i64) {
        let d = format!("sys/bus/pci/devices/{addr}");
        self.write(&format!("{d}/vendor"), &format!("{vendor:#06x}\n"));
        self.write(&format!("{d}/device"), &format!("{device:#06x}\n"));
        self.write(&format!("{d}/class"), &format!("{class:#08x}\n"));
        self.write(&format!("{d}/numa_node"), &format!("{numa}\n"));
    }

    /// An NVIDIA GPU with the driver's procfs `information` file.
    pub fn nvidia_gpu(&self, addr: &str, minor: u32, uuid: &str, numa: i64) {
        self.pci(addr, 0x10de, 0x2330, 0x030200, numa);
        self.write(
            &format!("proc/driver/nvidia/gpus/{addr}/information"),
            &format!(
                "Model: \t\t NVIDIA H100 80GB HBM3\nIRQ:   \t\t 150\nGPU UUID: \t {uuid}\n\
                 Video BIOS: \t 96.00.99.00.01\nBus Type: \t PCIe\nDMA Size: \t 52 bits\n\
                 DMA Mask: \t 0xfffffffffffff\nBus Location: \t {addr}\nDevice Minor: \t {minor}\n\
                 GPU Excluded:\t No\n"
            ),
        );
        self.write(&format!("dev/nvidia{minor}"), "");
        self.write("dev/nvidiactl", "");
        self.write("dev/nvidia-uvm", "");
        self.write("dev/nvidia-uvm-tools", "");
    }

    /// A Rebellions ATOM (RBLN-CA22, PCI id 0x1220) bound to the driver as
    /// `rbln{index}`.
    pub fn rbln(&self, addr: &str, index: u32, numa: i64) {
        self.pci(addr, 0x1eff, 0x1220, 0x120000, numa);
        let class = self
            .root()
            .join(format!("sys/class/rebellions/rbln{index}"));
        std::fs::create_dir_all(&class).unwrap();
        symlink(
            format!("../../../bus/pci/devices/{addr}"),
            class.join("device"),
        )
        .unwrap();
        self.write(&format!("dev/rbln{index}"), "");
        self.write("dev/rsd0", "");
    }

    /// A FuriosaAI RNGD as `npu{index}`: 8 PE nodes, fused PE nodes, DMA
    /// channels and the mgmt node, plus `rngd!npu{index}mgmt` in sysfs.
    pub fn rngd(&self, addr: &str, index: u32, uuid: &str, numa: i64) {
        self.pci(addr, 0x1ed2, 0x0001, 0x120000, numa);
        for pe in 0..8 {
            self.write(&format!("dev/rngd/npu{index}pe{pe}"), "");
            self.write(&format!("dev/rngd/npu{index}ch{pe}"), "");
        }
        self.write(&format!("dev/rngd/npu{index}pe0-1"), "");
        self.write(&format!("dev/rngd/npu{index}pe0-3"), "");
        self.write(&format!("dev/rngd/npu{index}mgmt"), "");
        let m = format!("sys/class/rngd_mgmt/rngd!npu{index}mgmt");
        self.write(&format!("{m}/busname"), &format!("{addr}\n"));
        self.write(&format!("{m}/device_uuid"), &format!("{uuid}\n"));
        self.write(&format!("{m}/device_state"), "0\n");
        self.write(&format!("{m}/heartbeat"), "1\n");
        self.write(&format!("{m}/platform_type"), "FuriosaAI\n");
    }
}

/// Directories of one plugin run.
pub struct Dirs {
    pub kubelet: tempfile::TempDir,
    pub state: tempfile::TempDir,
}

impl Dirs {
    pub fn new() -> Self {
        Dirs {
            kubelet: tempfile::tempdir().unwrap(),
            state: tempfile::tempdir().unwrap(),
        }
    }
    pub fn pod_resources_socket(&self) -> PathBuf {
        self.state.path().join("pod-resources.sock")
    }
    pub fn tokens_dir(&self) -> PathBuf {
        self.state.path().join("tokens")
    }
}

pub fn test_config(host: &FakeHost, dirs: &Dirs, file: FileConfig) -> Config {
    let flags = FlagConfig {
        host_root: Some(host.root().to_owned()),
        kubelet_dir: Some(dirs.kubelet.path().to_owned()),
        state_dir: Some(dirs.state.path().to_owned()),
        config_file: None,
    };
    let file = FileConfig {
        health_interval_ms: file.health_interval_ms.or(Some(100)),
        pod_resources_socket: file
            .pod_resources_socket
            .clone()
            .or_else(|| Some(dirs.pod_resources_socket())),
        ..file
    };
    Config::resolve(&flags, &|_| None, &file).unwrap()
}

pub struct RunningPlugin {
    stop: watch::Sender<bool>,
    task: JoinHandle<rm_device_plugin::error::Result<()>>,
}

impl RunningPlugin {
    pub fn start(cfg: Config) -> Self {
        let (stop, rx) = watch::channel(false);
        let task = tokio::spawn(rm_device_plugin::app::run(cfg, rx));
        RunningPlugin { stop, task }
    }
    pub async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("plugin stops within 5 s")
            .unwrap()
            .unwrap();
    }
}

/// The kubelet's Registration service, from the same proto, recording every
/// request.
struct Recorder(mpsc::UnboundedSender<api::RegisterRequest>);

#[tonic::async_trait]
impl Registration for Recorder {
    async fn register(
        &self,
        request: tonic::Request<api::RegisterRequest>,
    ) -> Result<tonic::Response<api::Empty>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(api::Empty {}))
    }
}

pub struct TestKubelet {
    pub dir: PathBuf,
    pub registrations: mpsc::UnboundedReceiver<api::RegisterRequest>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl TestKubelet {
    pub fn start(dir: &Path) -> Self {
        let (tx, registrations) = mpsc::unbounded_channel();
        let listener = bind_unix(&dir.join("kubelet.sock")).unwrap();
        let (stop, mut rx) = watch::channel(false);
        let task = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(RegistrationServer::new(Recorder(tx)))
                .serve_with_incoming_shutdown(
                    tokio_stream::wrappers::UnixListenerStream::new(listener),
                    async move {
                        let _ = rx.wait_for(|s| *s).await;
                    },
                )
                .await
                .unwrap();
        });
        TestKubelet {
            dir: dir.to_owned(),
            registrations,
            stop,
            task,
        }
    }

    pub async fn next_registration(&mut self, within: Duration) -> api::RegisterRequest {
        tokio::time::timeout(within, self.registrations.recv())
            .await
            .expect("registration in time")
            .expect("channel open")
    }

    /// The next registration of `resource`; others seen before it are dropped
    /// (endpoints of one plugin register concurrently, in no fixed order).
    pub async fn registration_of(
        &mut self,
        resource: &str,
        within: Duration,
    ) -> api::RegisterRequest {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            let reg = self.next_registration(left).await;
            if reg.resource_name == resource {
                return reg;
            }
        }
    }

    /// What the kubelet does on restart: stop serving and wipe the directory.
    pub async fn stop_and_wipe(self) {
        self.stop.send(true).unwrap();
        let _ = self.task.await;
        for e in std::fs::read_dir(&self.dir).unwrap() {
            let _ = std::fs::remove_file(e.unwrap().path());
        }
    }

    /// Dials the plugin's socket named in a registration, as the kubelet does.
    pub async fn client(&self, reg: &api::RegisterRequest) -> DevicePluginClient<Channel> {
        DevicePluginClient::new(connect_unix(&self.dir.join(&reg.endpoint)).await.unwrap())
    }
}

/// An open ListAndWatch stream with a wait-until helper.
pub struct Watch {
    pub stream: tonic::Streaming<api::ListAndWatchResponse>,
    pub last: Vec<api::Device>,
}

impl Watch {
    pub async fn open(client: &mut DevicePluginClient<Channel>) -> Self {
        let stream = client
            .list_and_watch(api::Empty {})
            .await
            .unwrap()
            .into_inner();
        Watch {
            stream,
            last: Vec::new(),
        }
    }

    /// Reads updates until `pred` holds; panics after `within`.
    pub async fn until(
        &mut self,
        within: Duration,
        pred: impl Fn(&[api::Device]) -> bool,
    ) -> Vec<api::Device> {
        let deadline = Instant::now() + within;
        loop {
            if pred(&self.last) && !self.last.is_empty() {
                return self.last.clone();
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.message()).await {
                Ok(Ok(Some(msg))) => self.last = msg.devices,
                other => panic!(
                    "no matching ListAndWatch update in {within:?}: {other:?}; last {:?}",
                    self.last
                ),
            }
        }
    }
}

pub fn health_of(devices: &[api::Device], id: &str) -> Option<String> {
    devices
        .iter()
        .find(|d| d.id == id)
        .map(|d| d.health.clone())
}

/// The kubelet's PodResources service, answering from a list the test sets.
#[derive(Clone, Default)]
pub struct TestPodResources {
    pub pods: Arc<Mutex<Vec<pr::PodResources>>>,
}

#[tonic::async_trait]
impl pr::pod_resources_lister_server::PodResourcesLister for TestPodResources {
    async fn list(
        &self,
        _r: tonic::Request<pr::ListPodResourcesRequest>,
    ) -> Result<tonic::Response<pr::ListPodResourcesResponse>, tonic::Status> {
        Ok(tonic::Response::new(pr::ListPodResourcesResponse {
            pod_resources: self.pods.lock().unwrap().clone(),
        }))
    }
    async fn get_allocatable_resources(
        &self,
        _r: tonic::Request<pr::AllocatableResourcesRequest>,
    ) -> Result<tonic::Response<pr::AllocatableResourcesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not needed"))
    }
    async fn get(
        &self,
        _r: tonic::Request<pr::GetPodResourcesRequest>,
    ) -> Result<tonic::Response<pr::GetPodResourcesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("not needed"))
    }
}

impl TestPodResources {
    pub fn serve(&self, socket: &Path) {
        let listener = bind_unix(socket).unwrap();
        let svc = pr::pod_resources_lister_server::PodResourcesListerServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::UnixListenerStream::new(listener))
                .await
                .unwrap();
        });
    }

    pub fn set(&self, resource: &str, containers: &[&[&str]]) {
        self.set_pod("default", "p", resource, containers);
    }

    /// One pod `namespace/name` whose containers hold `containers`' IDs.
    pub fn set_pod(&self, namespace: &str, name: &str, resource: &str, containers: &[&[&str]]) {
        let pod = pr::PodResources {
            name: name.into(),
            namespace: namespace.into(),
            containers: containers
                .iter()
                .enumerate()
                .map(|(i, ids)| pr::ContainerResources {
                    name: format!("c{i}"),
                    devices: vec![pr::ContainerDevices {
                        resource_name: resource.into(),
                        device_ids: ids.iter().map(|s| s.to_string()).collect(),
                        topology: None,
                    }],
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        *self.pods.lock().unwrap() = vec![pod];
    }
}

pub async fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
