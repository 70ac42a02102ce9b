//! FuriosaAI RNGD NPUs, found the way furiosa-smi does: the device files
//! `/dev/rngd/npu{N}pe{S}[-{E}]` give the node indices, and the management
//! class `sys/class/rngd_mgmt/rngd!npu{N}mgmt/` gives `busname` (PCI address),
//! `device_uuid`, `device_state` and `heartbeat`. Every `/dev/rngd/npu{N}*`
//! node (PE, PE-fusion, DMA channel `ch*`, `mgmt`) goes to the container, and
//! the mgmt sysfs directory is bind-mounted read-only, as Furiosa's own
//! device plugin does.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use rm_crds::device::DeviceType;

use super::pci::PciDevice;
use super::{Device, Health, VendorInventory, list_dir, read_attr};

pub const DEV_DIR: &str = "/dev/rngd";
pub const MGMT_CLASS_DIR: &str = "sys/class/rngd_mgmt";

/// Words in `device_state` that mean the device cannot take work. The
/// attribute's full vocabulary is not public; anything else counts as usable.
const BAD_STATES: [&str; 5] = ["fail", "error", "reset", "dead", "down"];

pub(crate) fn discover(root: &Path, pci: &[PciDevice]) -> VendorInventory {
    let mut inv = VendorInventory::default();
    let all_nodes = list_dir(root, DEV_DIR, |n| n.starts_with("npu"));
    let indices: BTreeSet<u32> = all_nodes
        .iter()
        .filter_map(|p| p.file_name()?.to_str())
        .filter_map(node_index)
        .collect();
    let vendor = DeviceType::Furiosa.info().pci_vendor;
    for index in indices {
        let mgmt_rel = format!("{MGMT_CLASS_DIR}/rngd!npu{index}mgmt");
        let mgmt = root.join(&mgmt_rel);
        let nodes: Vec<PathBuf> = all_nodes
            .iter()
            .filter(|p| p.file_name().and_then(|n| n.to_str()).and_then(node_index) == Some(index))
            .cloned()
            .collect();
        if !nodes.iter().any(|p| is_pe_node(p)) {
            continue; // Only ch*/mgmt nodes left: no PE, nothing to run on.
        }
        if !mgmt.is_dir() {
            inv.warnings
                .push(format!("RNGD npu{index}: no {mgmt_rel}; skipped"));
            continue;
        }
        let busname = read_attr(&mgmt.join("busname")).filter(|s| !s.is_empty());
        let pci_dev = busname
            .as_deref()
            .and_then(|b| pci.iter().find(|p| p.address == b));
        if let Some(p) = pci_dev
            && Some(p.vendor) != vendor
        {
            inv.warnings.push(format!(
                "RNGD npu{index}: PCI device {} has vendor {:#06x}, not FuriosaAI; skipped",
                p.address, p.vendor
            ));
            continue;
        }
        let uuid = read_attr(&mgmt.join("device_uuid")).filter(|u| !u.is_empty() && u.len() <= 63);
        let id = uuid
            .or_else(|| busname.clone())
            .unwrap_or_else(|| format!("rngd-npu{index}"));
        let mut dev = Device {
            id,
            device_type: DeviceType::Furiosa,
            index,
            pci_address: busname.clone(),
            numa_node: pci_dev.and_then(|p| p.numa_node),
            nodes,
            mounts: vec![PathBuf::from("/").join(&mgmt_rel)],
            health: Health::Healthy,
            reason: None,
            heartbeat: None,
        };
        match read_attr(&mgmt.join("device_state")) {
            None => dev.mark_unhealthy("device_state is unreadable"),
            Some(state) => {
                let lower = state.to_ascii_lowercase();
                if BAD_STATES.iter().any(|b| lower.contains(b)) {
                    dev.mark_unhealthy(format!("device_state is {state:?}"));
                }
            }
        }
        match read_attr(&mgmt.join("heartbeat")).map(|h| h.parse::<u64>()) {
            Some(Ok(h)) => dev.heartbeat = Some(h),
            Some(Err(_)) => dev.mark_unhealthy("heartbeat is not a number"),
            None => dev.mark_unhealthy("heartbeat is unreadable"),
        }
        if busname.is_none() {
            inv.warnings
                .push(format!("RNGD npu{index}: no busname; NUMA node unknown"));
        }
        inv.devices.push(dev);
    }
    inv
}

/// `npu3pe0-1` → 3, `npu12ch7` → 12, `npu0mgmt` → 0; `npux` → None.
pub fn node_index(name: &str) -> Option<u32> {
    let rest = name.strip_prefix("npu")?;
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    if digits.is_empty() {
        return None;
    }
    digits.parse().ok()
}

fn is_pe_node(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("npu"))
        .map(|r| r.trim_start_matches(|c: char| c.is_ascii_digit()))
        .is_some_and(|r| r.starts_with("pe"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_names_give_their_index() {
        assert_eq!(node_index("npu0pe0"), Some(0));
        assert_eq!(node_index("npu12pe0-3"), Some(12));
        assert_eq!(node_index("npu1ch7"), Some(1));
        assert_eq!(node_index("npu"), None);
        assert_eq!(node_index("npux"), None);
        assert!(is_pe_node(Path::new("/dev/rngd/npu1pe4-7")));
        assert!(!is_pe_node(Path::new("/dev/rngd/npu1ch0")));
        assert!(!is_pe_node(Path::new("/dev/rngd/npu1mgmt")));
    }
}
