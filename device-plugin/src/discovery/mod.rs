//! Device discovery: pure functions from a host directory tree (sysfs, /dev,
//! procfs under a configurable root) to the devices this node has.
//!
//! Nothing here keeps state or talks to the kubelet; the health loop calls
//! [`discover`] again and again and compares the results.

pub mod furiosa;
pub mod nvidia;
pub mod pci;
pub mod rebellions;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rm_crds::device::DeviceType;

/// The kubelet's two health words (`deviceplugin/v1beta1/constants.go`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Health {
    Healthy,
    Unhealthy,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "Healthy",
            Health::Unhealthy => "Unhealthy",
        }
    }
}

/// One physical accelerator as found on the host.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Stable ID reported to the kubelet: vendor UUID when the host exposes
    /// one, else the PCI address. At most 63 characters (kubelet's limit).
    pub id: String,
    pub device_type: DeviceType,
    /// The vendor's device index (`/dev/nvidiaN`, `/dev/rblnN`, `npuN`).
    pub index: u32,
    pub pci_address: Option<String>,
    pub numa_node: Option<i64>,
    /// Device nodes of this device, as host paths (`/dev/nvidia0`).
    pub nodes: Vec<PathBuf>,
    /// Host paths to bind read-only (vendor sysfs the runtime reads).
    pub mounts: Vec<PathBuf>,
    pub health: Health,
    /// Why the device is Unhealthy; `None` when Healthy.
    pub reason: Option<String>,
    /// Vendor heartbeat counter, when the hardware has one (Furiosa).
    pub heartbeat: Option<u64>,
}

impl Device {
    /// A device on the PCI bus with one device node of its own, Healthy
    /// unless that node is missing under `root`.
    pub(crate) fn with_node(
        root: &Path,
        pci: &pci::PciDevice,
        device_type: DeviceType,
        index: u32,
        id: String,
        node: PathBuf,
    ) -> Self {
        let mut dev = Device {
            id,
            device_type,
            index,
            pci_address: Some(pci.address.clone()),
            numa_node: pci.numa_node,
            nodes: vec![node.clone()],
            mounts: Vec::new(),
            health: Health::Healthy,
            reason: None,
            heartbeat: None,
        };
        if !under(root, &node).exists() {
            dev.mark_unhealthy(format!("{} is missing", node.display()));
        }
        dev
    }

    pub(crate) fn mark_unhealthy(&mut self, reason: impl Into<String>) {
        if self.health == Health::Healthy {
            self.health = Health::Unhealthy;
            self.reason = Some(reason.into());
        }
    }
}

/// What one discovery pass found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Inventory {
    pub devices: Vec<Device>,
    /// Shared nodes each vendor's runtime needs besides the per-device ones
    /// (`/dev/nvidiactl`, `/dev/nvidia-uvm`, `/dev/rsd0`, ...), host paths.
    pub control_nodes: BTreeMap<DeviceType, Vec<PathBuf>>,
    /// Malformed or missing entries that were skipped, one line each.
    pub warnings: Vec<String>,
}

impl Inventory {
    pub fn of_type(&self, t: DeviceType) -> impl Iterator<Item = &Device> {
        self.devices.iter().filter(move |d| d.device_type == t)
    }
}

/// Discovers the devices of the given types under `root`.
pub fn discover(root: &Path, types: &[DeviceType]) -> Inventory {
    let mut inv = Inventory::default();
    let (pci, mut warnings) = pci::scan(root);
    inv.warnings.append(&mut warnings);
    for &t in types {
        let part = match t {
            DeviceType::Gpu => nvidia::discover(root, &pci),
            DeviceType::Rbln => rebellions::discover(root, &pci),
            DeviceType::Furiosa => furiosa::discover(root, &pci),
            DeviceType::Cpu => continue,
        };
        inv.devices.extend(part.devices);
        inv.control_nodes.insert(t, part.control_nodes);
        inv.warnings.extend(part.warnings);
    }
    inv.devices
        .sort_by(|a, b| (a.device_type, a.index, &a.id).cmp(&(b.device_type, b.index, &b.id)));
    inv
}

/// One vendor's share of an [`Inventory`].
#[derive(Debug, Default)]
pub(crate) struct VendorInventory {
    pub devices: Vec<Device>,
    pub control_nodes: Vec<PathBuf>,
    pub warnings: Vec<String>,
}

/// `root` + an absolute host path.
pub(crate) fn under(root: &Path, host_path: &Path) -> PathBuf {
    root.join(host_path.strip_prefix("/").unwrap_or(host_path))
}

/// Reads a one-line sysfs attribute, trimmed.
pub(crate) fn read_attr(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()
        .map(|s| s.trim().to_string())
}

/// The existing ones among candidate host paths.
pub(crate) fn existing(root: &Path, candidates: &[&str]) -> Vec<PathBuf> {
    candidates
        .iter()
        .map(PathBuf::from)
        .filter(|p| under(root, p).exists())
        .collect()
}

/// Host paths of the entries in `dir` (a host path) whose names satisfy `keep`,
/// sorted.
pub(crate) fn list_dir(root: &Path, dir: &str, keep: impl Fn(&str) -> bool) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(under(root, Path::new(dir))) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| keep(n))
        .map(|n| Path::new(dir).join(n))
        .collect();
    out.sort();
    out
}
