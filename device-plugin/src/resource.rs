//! The resource manager: what one extended resource (`nvidia.com/gpu`, ...)
//! currently offers. It knows devices and their health and publishes every
//! change; the gRPC server only reads from it (as in NVIDIA's plugin, the
//! manager is separate from the server).

use std::path::PathBuf;
use std::sync::Arc;

use rm_crds::device::DeviceType;
use tokio::sync::watch;

use crate::api;
use crate::discovery::{Device, Health};

/// Separator between a device ID and its replica number when a device is
/// shared (`GPU-…::2`). `::` cannot occur in UUIDs or PCI addresses' tails.
pub const REPLICA_SEPARATOR: &str = "::";

/// Devices of one resource at one moment.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResourceState {
    /// Physical devices, sorted by index.
    pub devices: Vec<Device>,
    /// Shared vendor nodes (host paths) every allocation needs.
    pub control_nodes: Vec<PathBuf>,
}

/// What a resource hands out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ResourceKind {
    /// Discovered accelerators, health-checked; `Allocate` gives device
    /// nodes, the vendor's env and a token for the node agent.
    Devices,
    /// Shareable slots of the node agent: `Allocate` only mounts the agent's
    /// socket directory, so that containers without an accelerator reach
    /// the agent without a hostPath volume (which Pod Security "baseline"
    /// refuses). No token: the agent serves CPU requests without one.
    AgentSocket,
}

/// ID of the one virtual device behind the agent resource's slots.
pub const AGENT_DEVICE_ID: &str = "agent";

#[derive(Debug)]
pub struct ResourceManager {
    pub resource_name: String,
    pub device_type: DeviceType,
    pub kind: ResourceKind,
    /// Each device is advertised this many times.
    pub replicas: u32,
    state: watch::Sender<Arc<ResourceState>>,
}

impl ResourceManager {
    pub fn new(
        resource_name: impl Into<String>,
        device_type: DeviceType,
        replicas: u32,
        initial: ResourceState,
    ) -> Self {
        let (state, _) = watch::channel(Arc::new(initial));
        ResourceManager {
            resource_name: resource_name.into(),
            device_type,
            kind: ResourceKind::Devices,
            replicas: replicas.max(1),
            state,
        }
    }

    /// The agent resource: `slots` always-healthy slots of one virtual
    /// device (`agent::0` ... `agent::<slots-1>`), without NUMA affinity.
    pub fn agent_socket(resource_name: impl Into<String>, slots: u32) -> Self {
        let agent = Device {
            id: AGENT_DEVICE_ID.into(),
            device_type: DeviceType::Cpu,
            index: 0,
            pci_address: None,
            numa_node: None,
            nodes: vec![],
            mounts: vec![],
            health: Health::Healthy,
            reason: None,
            heartbeat: None,
        };
        let initial = ResourceState {
            devices: vec![agent],
            control_nodes: vec![],
        };
        let mut m = ResourceManager::new(resource_name, DeviceType::Cpu, slots, initial);
        m.kind = ResourceKind::AgentSocket;
        m
    }

    /// The socket file name in the kubelet's device-plugin directory.
    pub fn endpoint_name(&self) -> String {
        match self.kind {
            ResourceKind::Devices => format!("rm-{}.sock", self.device_type),
            ResourceKind::AgentSocket => "rm-agent.sock".into(),
        }
    }

    /// Publishes a new state if it differs; returns whether it did.
    pub fn update(&self, new: ResourceState) -> bool {
        self.state.send_if_modified(|cur| {
            if **cur == new {
                false
            } else {
                *cur = Arc::new(new);
                true
            }
        })
    }

    pub fn snapshot(&self) -> Arc<ResourceState> {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<ResourceState>> {
        self.state.subscribe()
    }

    /// The kubelet's view: every device (times replicas) with health and NUMA.
    pub fn advertised(&self, state: &ResourceState) -> Vec<api::Device> {
        let mut out = Vec::with_capacity(state.devices.len() * self.replicas as usize);
        for d in &state.devices {
            for r in 0..self.replicas {
                out.push(api::Device {
                    id: self.advertised_id(&d.id, r),
                    health: d.health.as_str().to_string(),
                    topology: d.numa_node.map(|n| api::TopologyInfo {
                        nodes: vec![api::NumaNode { id: n }],
                    }),
                });
            }
        }
        out
    }

    pub fn advertised_id(&self, device_id: &str, replica: u32) -> String {
        if self.replicas > 1 {
            format!("{device_id}{REPLICA_SEPARATOR}{replica}")
        } else {
            device_id.to_string()
        }
    }

    /// The physical device behind an advertised ID, if the ID is well-formed
    /// and known.
    pub fn resolve<'a>(&self, state: &'a ResourceState, advertised: &str) -> Option<&'a Device> {
        let physical = if self.replicas > 1 {
            let (id, replica) = advertised.rsplit_once(REPLICA_SEPARATOR)?;
            let r: u32 = replica.parse().ok()?;
            if r >= self.replicas {
                return None;
            }
            id
        } else {
            advertised
        };
        state.devices.iter().find(|d| d.id == physical)
    }
}

/// Folds a fresh discovery into the previous device list: a device that is
/// gone stays listed as Unhealthy (so the kubelet stops handing it out and
/// the pods that hold it see it fail), one that came back is taken as found.
pub fn merge(previous: &[Device], found: Vec<Device>) -> Vec<Device> {
    let mut out = found;
    for old in previous {
        if !out.iter().any(|d| d.id == old.id) {
            let mut gone = old.clone();
            gone.health = Health::Unhealthy;
            gone.reason = Some("no longer present on the host".into());
            out.push(gone);
        }
    }
    out.sort_by(|a, b| (a.index, &a.id).cmp(&(b.index, &b.id)));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str, index: u32) -> Device {
        Device {
            id: id.into(),
            device_type: DeviceType::Gpu,
            index,
            pci_address: None,
            numa_node: Some(1),
            nodes: vec![],
            mounts: vec![],
            health: Health::Healthy,
            reason: None,
            heartbeat: None,
        }
    }

    #[test]
    fn replicas_are_advertised_and_resolved() {
        let state = ResourceState {
            devices: vec![dev("GPU-a", 0), dev("GPU-b", 1)],
            control_nodes: vec![],
        };
        let m = ResourceManager::new("nvidia.com/gpu", DeviceType::Gpu, 2, state.clone());
        let ads = m.advertised(&state);
        let ids: Vec<&str> = ads.iter().map(|d| d.id.as_str()).collect();
        assert_eq!(ids, ["GPU-a::0", "GPU-a::1", "GPU-b::0", "GPU-b::1"]);
        assert_eq!(ads[0].topology.as_ref().map(|t| t.nodes[0].id), Some(1));
        assert_eq!(m.resolve(&state, "GPU-b::1").map(|d| d.index), Some(1));
        assert!(
            m.resolve(&state, "GPU-b::2").is_none(),
            "replica out of range"
        );
        assert!(
            m.resolve(&state, "GPU-b").is_none(),
            "missing replica suffix"
        );
        assert!(m.resolve(&state, "GPU-c::0").is_none());
    }

    #[test]
    fn update_publishes_only_changes() {
        let state = ResourceState {
            devices: vec![dev("GPU-a", 0)],
            control_nodes: vec![],
        };
        let m = ResourceManager::new("nvidia.com/gpu", DeviceType::Gpu, 1, state.clone());
        assert!(!m.update(state.clone()));
        let mut sick = state;
        sick.devices[0].health = Health::Unhealthy;
        assert!(m.update(sick));
        assert_eq!(m.snapshot().devices[0].health, Health::Unhealthy);
    }

    #[test]
    fn vanished_devices_stay_listed_as_unhealthy() {
        let merged = merge(&[dev("GPU-a", 0), dev("GPU-b", 1)], vec![dev("GPU-a", 0)]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[1].id, "GPU-b");
        assert_eq!(merged[1].health, Health::Unhealthy);
        let back = merge(&merged, vec![dev("GPU-a", 0), dev("GPU-b", 1)]);
        assert!(back.iter().all(|d| d.health == Health::Healthy));
    }
}
