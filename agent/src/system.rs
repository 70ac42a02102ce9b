//! What this node has, for `GET /v1/system` (the Python library's
//! `get_system_info()`): the node from `/proc` and the kernel's uname
//! fields, the CPU, and the accelerators of the caller's allocation. Facts
//! the agent cannot read are `None` (null), never guessed.

use std::path::Path;

use rm_crds::DeviceType;
use serde::Serialize;

use crate::auth::Caller;

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct NodeInfo {
    /// The kubelet's node name (`RM_NODE_NAME`, set by the chart from
    /// `spec.nodeName`); `None` outside a cluster.
    pub node_name: Option<String>,
    /// uname's nodename: in a pod, the agent pod's hostname.
    pub hostname: Option<String>,
    pub os: &'static str,
    /// uname's release.
    pub kernel: Option<String>,
    pub arch: &'static str,
    pub cpu_model: Option<String>,
    /// Logical CPUs of the node (the `processor` entries of /proc/cpuinfo).
    pub cpu_count: usize,
    pub memory_total_bytes: Option<u64>,
    pub memory_available_bytes: Option<u64>,
}

#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct DeviceEntry {
    pub device_type: DeviceType,
    /// The index a request names (`rbln:0` is the first device of the
    /// caller's allocation); 0 for the CPU.
    pub device_id: usize,
    /// How the vendor's runtime names the device on the host; `None` for the
    /// CPU.
    pub host_id: Option<String>,
    pub name: Option<String>,
    pub vendor: Option<String>,
    pub memory_total_bytes: Option<u64>,
    pub memory_available_bytes: Option<u64>,
}

/// What /proc/cpuinfo says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CpuInfo {
    pub model: Option<String>,
    pub vendor: Option<String>,
    pub count: usize,
}

/// Parses /proc/cpuinfo: `key : value` lines, one block per logical CPU.
/// x86 names the model `model name` and the vendor `vendor_id`; some arm
/// kernels write `Model name` or nothing (then `None`).
pub fn parse_cpuinfo(text: &str) -> CpuInfo {
    let mut info = CpuInfo::default();
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        match key {
            "processor" => info.count += 1,
            "model name" | "Model name" if info.model.is_none() && !value.is_empty() => {
                info.model = Some(value.to_string());
            }
            "vendor_id" if info.vendor.is_none() && !value.is_empty() => {
                info.vendor = Some(value.to_string());
            }
            _ => {}
        }
    }
    info
}

/// `MemTotal` and `MemAvailable` of /proc/meminfo, in bytes (the file
/// counts kB, meaning KiB).
pub fn parse_meminfo(text: &str) -> (Option<u64>, Option<u64>) {
    let field = |name: &str| {
        text.lines().find_map(|line| {
            let rest = line.strip_prefix(name)?.strip_prefix(':')?;
            let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
            kib.checked_mul(1024)
        })
    };
    (field("MemTotal"), field("MemAvailable"))
}

fn read_trimmed(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// The node, read now (memory changes between calls).
pub fn node() -> (NodeInfo, CpuInfo) {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .map(|t| parse_cpuinfo(&t))
        .unwrap_or_default();
    let (total, available) = std::fs::read_to_string("/proc/meminfo")
        .map(|t| parse_meminfo(&t))
        .unwrap_or((None, None));
    // A kernel that hides cpuinfo's entries: what this process may use.
    let cpu_count = if cpu.count > 0 {
        cpu.count
    } else {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    };
    let node = NodeInfo {
        node_name: std::env::var("RM_NODE_NAME").ok().filter(|s| !s.is_empty()),
        hostname: read_trimmed(Path::new("/proc/sys/kernel/hostname")),
        os: std::env::consts::OS,
        kernel: read_trimmed(Path::new("/proc/sys/kernel/osrelease")),
        arch: std::env::consts::ARCH,
        cpu_model: cpu.model.clone(),
        cpu_count,
        memory_total_bytes: total,
        memory_available_bytes: available,
    };
    (node, cpu)
}

/// The CPU, then each accelerator of the caller's allocation in the order
/// its requests number them. The device table names the accelerators; their
/// memory is not known to the agent (the vendor's SDK is in the worker).
pub fn devices(node: &NodeInfo, cpu: &CpuInfo, caller: &Caller) -> Vec<DeviceEntry> {
    let mut list = vec![DeviceEntry {
        device_type: DeviceType::Cpu,
        device_id: 0,
        host_id: None,
        name: node.cpu_model.clone(),
        vendor: cpu.vendor.clone(),
        memory_total_bytes: node.memory_total_bytes,
        memory_available_bytes: node.memory_available_bytes,
    }];
    if let Some(a) = caller
        .allocation()
        .filter(|a| a.device_type != DeviceType::Cpu)
    {
        let info = a.device_type.info();
        list.extend(a.devices.iter().enumerate().map(|(i, host)| DeviceEntry {
            device_type: a.device_type,
            device_id: i,
            host_id: Some(host.clone()),
            name: Some(info.display_name.to_string()),
            vendor: info.vendor.map(str::to_string),
            memory_total_bytes: None,
            memory_available_bytes: None,
        }));
    }
    list
}

#[cfg(test)]
mod tests {
    use super::*;

    const X86: &str = "processor\t: 0\nvendor_id\t: GenuineIntel\ncpu family\t: 6\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\nflags\t\t: fpu vme\n\nprocessor\t: 1\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) CPU @ 2.20GHz\n";
    const ARM: &str = "processor\t: 0\nBogoMIPS\t: 50.00\nCPU implementer\t: 0x41\n\nprocessor\t: 1\nBogoMIPS\t: 50.00\n";

    #[test]
    fn cpuinfo_gives_model_vendor_and_count() {
        let c = parse_cpuinfo(X86);
        assert_eq!(c.model.as_deref(), Some("Intel(R) Xeon(R) CPU @ 2.20GHz"));
        assert_eq!(c.vendor.as_deref(), Some("GenuineIntel"));
        assert_eq!(c.count, 2);
        // What the kernel does not say stays unknown.
        assert_eq!(
            parse_cpuinfo(ARM),
            CpuInfo {
                model: None,
                vendor: None,
                count: 2
            }
        );
    }

    #[test]
    fn meminfo_is_read_in_bytes() {
        let text = "MemTotal:       16314060 kB\nMemFree:  1 kB\nMemAvailable:   9000000 kB\n";
        assert_eq!(
            parse_meminfo(text),
            (Some(16_314_060 * 1024), Some(9_000_000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: lots\n"), (None, None));
    }

    #[test]
    fn devices_are_the_cpu_and_the_callers_accelerators() {
        let (node, cpu) = node();
        assert_eq!(devices(&node, &cpu, &Caller::Trusted).len(), 1);
        let alloc = |device_type, devices: &[&str]| Caller::Pod {
            owner: rm_crds::token::TokenOwner {
                namespace: "ns".into(),
                pod: "p".into(),
            },
            allocation: Box::new(crate::auth::Allocation {
                device_type,
                devices: devices.iter().map(|s| s.to_string()).collect(),
                expires_unix_ms: None,
                owner: None,
                token_sha256: "t".into(),
                resource_name: "r".into(),
                device_ids: vec![],
            }),
        };
        let list = devices(&node, &cpu, &alloc(DeviceType::Rbln, &["3", "5"]));
        assert_eq!(list.len(), 3);
        assert_eq!(list[0].device_type, DeviceType::Cpu);
        assert_eq!(list[0].memory_total_bytes, node.memory_total_bytes);
        assert_eq!(
            (list[2].device_id, list[2].host_id.as_deref()),
            (1, Some("5"))
        );
        assert_eq!(list[2].name.as_deref(), Some("Rebellions ATOM"));
        assert_eq!(list[2].vendor.as_deref(), Some("Rebellions"));
        assert_eq!(list[2].memory_total_bytes, None);
        // A slot of the agent resource holds no accelerator.
        assert_eq!(devices(&node, &cpu, &alloc(DeviceType::Cpu, &[])).len(), 1);
    }
}
