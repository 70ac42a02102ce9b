//! What a container gets for its devices (pure): device nodes, shared vendor
//! nodes, the env that names the devices, mounts and CDI names; and the
//! preferred choice of devices (NUMA-local, `must_include`, least
//! fragmenting).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;

use rm_crds::device::DeviceType;

use crate::api;
use crate::discovery::Device;

/// Env var naming the allocated devices in rm-abstract's notation
/// (`gpu:0,gpu:3`), read by the in-pod init and the node agent.
pub const ENV_ALLOCATED_DEVICES: &str = "RM_ALLOCATED_DEVICES";
/// Env var carrying the token that lets the pod use its devices through the
/// node agent.
pub const ENV_AGENT_TOKEN: &str = "RM_AGENT_TOKEN";
/// Env var carrying the token of an `rm-abstract.io/agent` slot: the pod's
/// identity at the node agent when it holds no accelerator.
pub const ENV_AGENT_SLOT_TOKEN: &str = "RM_AGENT_SLOT_TOKEN";
/// Also set for Furiosa: Ray and some Furiosa tools read this spelling with
/// plain indices, while furiosa-llm reads `FURIOSA_DEVICES` as `npu:N`.
pub const ENV_FURIOSA_VISIBLE: &str = "FURIOSA_VISIBLE_DEVICES";

/// Settings that shape every allocation of one resource.
#[derive(Clone, Debug, Default)]
pub struct AllocateOptions {
    pub resource_name: String,
    /// Host directory of the node agent's socket; mounted at the same path.
    pub agent_socket_dir: Option<PathBuf>,
    pub cdi_enabled: bool,
}

/// The response for one container; `devices` are distinct physical devices.
pub fn container_response(
    devices: &[&Device],
    control_nodes: &[PathBuf],
    opts: &AllocateOptions,
    token: &str,
) -> api::ContainerAllocateResponse {
    let mut specs = Vec::new();
    let mut seen = BTreeSet::new();
    for path in devices
        .iter()
        .flat_map(|d| d.nodes.iter())
        .chain(control_nodes.iter())
    {
        if seen.insert(path.clone()) {
            let p = path.to_string_lossy().into_owned();
            specs.push(api::DeviceSpec {
                container_path: p.clone(),
                host_path: p,
                permissions: "rw".into(),
            });
        }
    }

    let mut envs = HashMap::new();
    if let Some(first) = devices.first() {
        let t = first.device_type;
        if let Some(var) = t.info().visible_devices_env {
            envs.insert(var.to_string(), visible_value(t, devices));
        }
        if t == DeviceType::Furiosa {
            let plain: Vec<String> = devices.iter().map(|d| d.index.to_string()).collect();
            envs.insert(ENV_FURIOSA_VISIBLE.to_string(), plain.join(","));
        }
    }
    let rm: Vec<String> = devices
        .iter()
        .map(|d| format!("{}:{}", d.device_type, d.index))
        .collect();
    envs.insert(ENV_ALLOCATED_DEVICES.to_string(), rm.join(","));
    envs.insert(ENV_AGENT_TOKEN.to_string(), token.to_string());

    let mut mounts: Vec<api::Mount> = Vec::new();
    let mut mounted = BTreeSet::new();
    for m in devices.iter().flat_map(|d| d.mounts.iter()) {
        if mounted.insert(m.clone()) {
            let p = m.to_string_lossy().into_owned();
            mounts.push(api::Mount {
                container_path: p.clone(),
                host_path: p,
                read_only: true,
            });
        }
    }
    mounts.extend(agent_socket_mount(opts));

    let cdi_devices = if opts.cdi_enabled {
        devices
            .iter()
            .map(|d| api::CdiDevice {
                name: format!("{}={}", opts.resource_name, d.id),
            })
            .collect()
    } else {
        Vec::new()
    };

    api::ContainerAllocateResponse {
        envs,
        mounts,
        devices: specs,
        annotations: HashMap::new(),
        cdi_devices,
    }
}

/// The response for one container of the agent resource: the mount of the
/// agent's socket directory and the slot's token in its own variable
/// (`RM_AGENT_SLOT_TOKEN`): an accelerator's `RM_AGENT_TOKEN` must not be
/// shadowed (the webhook never asks for both, but a user might), and the
/// in-pod client prefers it when both are set.
pub fn agent_socket_response(
    opts: &AllocateOptions,
    token: &str,
) -> api::ContainerAllocateResponse {
    api::ContainerAllocateResponse {
        mounts: agent_socket_mount(opts).into_iter().collect(),
        envs: HashMap::from([(ENV_AGENT_SLOT_TOKEN.to_string(), token.to_string())]),
        ..Default::default()
    }
}

/// The agent's socket directory, mounted at the same path.
fn agent_socket_mount(opts: &AllocateOptions) -> Option<api::Mount> {
    let p = opts
        .agent_socket_dir
        .as_ref()?
        .to_string_lossy()
        .into_owned();
    // Read-only is enough: connect(2) on a unix socket is not a write to the
    // filesystem, and the pod must not plant files there.
    Some(api::Mount {
        container_path: p.clone(),
        host_path: p,
        read_only: true,
    })
}

/// The value of the vendor's visible-devices variable.
fn visible_value(t: DeviceType, devices: &[&Device]) -> String {
    let parts: Vec<String> = devices
        .iter()
        .map(|d| rm_crds::token::visible_id(t, &d.id, d.index))
        .collect();
    parts.join(",")
}

/// One candidate for [`preferred`]: an advertised ID, the physical device it
/// belongs to and that device's NUMA node.
#[derive(Clone, Debug)]
pub struct Candidate<'a> {
    pub advertised_id: &'a str,
    pub physical_id: &'a str,
    pub numa_node: Option<i64>,
}

/// Chooses `size` IDs from `available`, all of `must_include` first. Keeps
/// the request on one NUMA node when one can hold it (the fullest such node,
/// so larger free groups stay whole); otherwise spans as few nodes as
/// possible. With shared devices, replicas of already-used devices go first.
pub fn preferred(available: &[Candidate<'_>], must_include: &[&str], size: usize) -> Vec<String> {
    let mut chosen: Vec<String> = Vec::new();
    for id in must_include {
        if !chosen.iter().any(|c| c == id) {
            chosen.push((*id).to_string());
        }
    }
    if chosen.len() >= size {
        // The kubelet never asks for fewer than it must include; if it did,
        // dropping a must-include device would break its contract worse.
        return chosen;
    }
    let need = size - chosen.len();
    let pool: Vec<&Candidate<'_>> = available
        .iter()
        .filter(|c| !chosen.iter().any(|x| x == c.advertised_id))
        .collect();
    // How many replicas of each physical device are still free: fewer free
    // means the device is already partly used, so packing onto it fragments
    // less.
    let mut free_per_physical: HashMap<&str, usize> = HashMap::new();
    for c in &pool {
        *free_per_physical.entry(c.physical_id).or_default() += 1;
    }
    let mut by_numa: BTreeMap<Option<i64>, Vec<&Candidate<'_>>> = BTreeMap::new();
    for c in &pool {
        by_numa.entry(c.numa_node).or_default().push(c);
    }
    for group in by_numa.values_mut() {
        group.sort_by(|a, b| {
            (
                free_per_physical[a.physical_id],
                a.physical_id,
                a.advertised_id,
            )
                .cmp(&(
                    free_per_physical[b.physical_id],
                    b.physical_id,
                    b.advertised_id,
                ))
        });
    }
    let must_numa: BTreeSet<Option<i64>> = available
        .iter()
        .filter(|c| must_include.contains(&c.advertised_id))
        .map(|c| c.numa_node)
        .collect();

    // Order NUMA groups: the must_include node first when there is one; then
    // groups that can hold the rest alone, smallest first (best fit); then
    // the others, largest first (fewest nodes spanned).
    let mut order: Vec<Option<i64>> = by_numa.keys().copied().collect();
    let home = (must_numa.len() == 1)
        .then(|| must_numa.iter().next().copied())
        .flatten();
    order.sort_by_key(|n| {
        let len = by_numa[n].len();
        let is_home = home == Some(*n) && len >= need;
        let fits = len >= need;
        (
            !is_home,
            !fits,
            if fits { len as i64 } else { -(len as i64) },
            *n,
        )
    });
    for n in order {
        for c in &by_numa[&n] {
            if chosen.len() >= size {
                break;
            }
            chosen.push(c.advertised_id.to_string());
        }
    }
    chosen
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::Health;

    fn cand<'a>(id: &'a str, phys: &'a str, numa: i64) -> Candidate<'a> {
        Candidate {
            advertised_id: id,
            physical_id: phys,
            numa_node: Some(numa),
        }
    }

    #[test]
    fn keeps_a_request_on_one_numa_node_preferring_the_fullest_that_fits() {
        // NUMA 0 has 3 free, NUMA 1 has 2 free: a request for 2 goes to NUMA 1
        // and leaves NUMA 0's three together.
        let avail = [
            cand("a", "a", 0),
            cand("b", "b", 0),
            cand("c", "c", 0),
            cand("d", "d", 1),
            cand("e", "e", 1),
        ];
        assert_eq!(preferred(&avail, &[], 2), ["d", "e"]);
        // Three only fit on NUMA 0.
        assert_eq!(preferred(&avail, &[], 3), ["a", "b", "c"]);
        // Four span two nodes, largest first.
        assert_eq!(preferred(&avail, &[], 4), ["a", "b", "c", "d"]);
    }

    #[test]
    fn honours_must_include_and_stays_on_its_node() {
        let avail = [
            cand("a", "a", 0),
            cand("b", "b", 0),
            cand("c", "c", 0),
            cand("d", "d", 1),
            cand("e", "e", 1),
        ];
        let got = preferred(&avail, &["b"], 2);
        assert_eq!(got[0], "b");
        assert!(got[1] == "a" || got[1] == "c", "{got:?}");
        assert_eq!(preferred(&avail, &["d", "a"], 2), ["d", "a"]);
    }

    #[test]
    fn packs_replicas_onto_partly_used_devices() {
        // Device x has one free replica left, y has two: take x's first.
        let avail = [
            cand("y::0", "y", 0),
            cand("y::1", "y", 0),
            cand("x::1", "x", 0),
        ];
        assert_eq!(preferred(&avail, &[], 1), ["x::1"]);
    }

    #[test]
    fn response_names_devices_nodes_env_and_token() {
        let d = |idx: u32| Device {
            id: format!("GPU-{idx}"),
            device_type: DeviceType::Gpu,
            index: idx,
            pci_address: None,
            numa_node: None,
            nodes: vec![PathBuf::from(format!("/dev/nvidia{idx}"))],
            mounts: vec![],
            health: Health::Healthy,
            reason: None,
            heartbeat: None,
        };
        let (d0, d3) = (d(0), d(3));
        let opts = AllocateOptions {
            resource_name: "nvidia.com/gpu".into(),
            agent_socket_dir: Some("/run/rm-abstract".into()),
            cdi_enabled: true,
        };
        let r = container_response(
            &[&d0, &d3],
            &[PathBuf::from("/dev/nvidiactl")],
            &opts,
            "tok",
        );
        let paths: Vec<&str> = r.devices.iter().map(|s| s.host_path.as_str()).collect();
        assert_eq!(paths, ["/dev/nvidia0", "/dev/nvidia3", "/dev/nvidiactl"]);
        assert!(r.devices.iter().all(|s| s.permissions == "rw"));
        assert_eq!(r.envs["NVIDIA_VISIBLE_DEVICES"], "GPU-0,GPU-3");
        assert_eq!(r.envs[ENV_ALLOCATED_DEVICES], "gpu:0,gpu:3");
        assert_eq!(r.envs[ENV_AGENT_TOKEN], "tok");
        assert_eq!(r.mounts[0].host_path, "/run/rm-abstract");
        assert_eq!(r.cdi_devices[1].name, "nvidia.com/gpu=GPU-3");
    }
}
