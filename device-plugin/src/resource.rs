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
    /// Everything known about the devices, for Allocate and the health loop.
    state: watch::Sender<Arc<ResourceState>>,
    /// What ListAndWatch sends: the kubelet's projection of `state` (IDs,
    /// health, topology). A channel of its own because `state` also changes
    /// in ways the kubelet cannot see (a Furiosa heartbeat advances on every
    /// health pass, an Unhealthy reason's wording, device nodes), and every
    /// list we send makes the kubelet's device manager rewrite its
    /// checkpoint.
    advertised: watch::Sender<Arc<Vec<api::Device>>>,
}

impl ResourceManager {
    pub fn new(
        resource_name: impl Into<String>,
        device_type: DeviceType,
        replicas: u32,
        initial: ResourceState,
    ) -> Self {
        let replicas = replicas.max(1);
        let (advertised, _) = watch::channel(Arc::new(advertise(&initial, replicas)));
        let (state, _) = watch::channel(Arc::new(initial));
        ResourceManager {
            resource_name: resource_name.into(),
            device_type,
            kind: ResourceKind::Devices,
            replicas,
            state,
            advertised,
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

    /// Stores a new state, and publishes the kubelet's view of it to
    /// ListAndWatch only if that view differs from the last one published.
    /// Returns whether it did.
    pub fn update(&self, new: ResourceState) -> bool {
        let wire = advertise(&new, self.replicas);
        // State first: a kubelet that sees a new device in ListAndWatch may
        // call Allocate for it at once, and Allocate reads the state.
        self.state.send_if_modified(|cur| {
            if **cur == new {
                false
            } else {
                *cur = Arc::new(new);
                true
            }
        });
        self.advertised.send_if_modified(|cur| {
            if **cur == wire {
                false
            } else {
                *cur = Arc::new(wire);
                true
            }
        })
    }

    pub fn snapshot(&self) -> Arc<ResourceState> {
        self.state.borrow().clone()
    }

    /// The device list as ListAndWatch sends it; changes only when the
    /// kubelet's view does.
    pub fn watch_advertised(&self) -> watch::Receiver<Arc<Vec<api::Device>>> {
        self.advertised.subscribe()
    }

    pub fn advertised_id(&self, device_id: &str, replica: u32) -> String {
        advertised_id(self.replicas, device_id, replica)
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

/// Every device of `state`, `replicas` times, with only what the kubelet
/// reads: ID, health and NUMA node.
fn advertise(state: &ResourceState, replicas: u32) -> Vec<api::Device> {
    let mut out = Vec::with_capacity(state.devices.len() * replicas as usize);
    for d in &state.devices {
        for r in 0..replicas {
            out.push(api::Device {
                id: advertised_id(replicas, &d.id, r),
                health: d.health.as_str().to_string(),
                topology: d.numa_node.map(|n| api::TopologyInfo {
                    nodes: vec![api::NumaNode { id: n }],
                }),
            });
        }
    }
    out
}

fn advertised_id(replicas: u32, device_id: &str, replica: u32) -> String {
    if replicas > 1 {
        format!("{device_id}{REPLICA_SEPARATOR}{replica}")
    } else {
        device_id.to_string()
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
        let ads = m.watch_advertised().borrow().clone();
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
        let mut lw = m.watch_advertised();
        assert!(!m.update(state.clone()));
        let mut sick = state;
        sick.devices[0].health = Health::Unhealthy;
        assert!(m.update(sick));
        assert!(lw.has_changed().unwrap());
        lw.mark_unchanged();
        assert_eq!(m.snapshot().devices[0].health, Health::Unhealthy);
        assert_eq!(lw.borrow()[0].health, "Unhealthy");
    }

    #[test]
    fn changes_the_kubelet_cannot_see_are_stored_but_not_advertised() {
        let mut rngd = dev("A0000000-0000-0000-0000-000000000000", 0);
        rngd.device_type = DeviceType::Furiosa;
        rngd.heartbeat = Some(1);
        let state = ResourceState {
            devices: vec![rngd],
            control_nodes: vec![],
        };
        let m = ResourceManager::new("furiosa.ai/rngd", DeviceType::Furiosa, 1, state.clone());
        let mut lw = m.watch_advertised();
        let mut next = state.clone();
        next.devices[0].heartbeat = Some(2);
        next.devices[0].nodes = vec![PathBuf::from("/dev/rngd/npu0pe0")];
        next.control_nodes = vec![PathBuf::from("/dev/rngd/mgmt")];
        assert!(!m.update(next), "heartbeat and nodes are not on the wire");
        assert!(!lw.has_changed().unwrap());
        // Allocate and the health loop still see the new state.
        assert_eq!(m.snapshot().devices[0].heartbeat, Some(2));
        assert_eq!(m.snapshot().control_nodes.len(), 1);

        let mut sick = (*m.snapshot()).clone();
        sick.devices[0].mark_unhealthy("heartbeat stuck at 2 for 5s");
        assert!(m.update(sick.clone()));
        assert!(lw.has_changed().unwrap());
        // Only the reason's wording moves while it stays stuck.
        let mut later = sick;
        later.devices[0].reason = Some("heartbeat stuck at 2 for 6s".into());
        lw.mark_unchanged();
        assert!(!m.update(later));
        assert!(!lw.has_changed().unwrap());
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
