//! Rebellions ATOM NPUs: PCI vendor 0x1eff with the product ids of the
//! RBLN-CA12/CA22/CA25 cards (as listed by Rebellions' NPU operator), mapped
//! to `/dev/rblnN` through the driver's class `sys/class/rebellions/rblnN`
//! (whose `device` link names the PCI function). Physical functions that have
//! SR-IOV virtual functions enabled are skipped: their VFs are the units.
//! `/dev/rsdN` (the RSD group nodes used for multi-device runs) are shared.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rm_crds::device::DeviceType;

use super::pci::PciDevice;
use super::{Device, VendorInventory, list_dir};

/// PCI device ids per product card (Rebellions' `DeviceMapping`).
pub const PRODUCT_IDS: [(u16, &str); 6] = [
    (0x1120, "RBLN-CA12"),
    (0x1121, "RBLN-CA12"),
    (0x1220, "RBLN-CA22"),
    (0x1221, "RBLN-CA22"),
    (0x1250, "RBLN-CA25"),
    (0x1251, "RBLN-CA25"),
];

pub const CLASS_DIR: &str = "sys/class/rebellions";

pub fn product_name(device_id: u16) -> Option<&'static str> {
    PRODUCT_IDS
        .iter()
        .find(|(id, _)| *id == device_id)
        .map(|(_, n)| *n)
}

pub(crate) fn discover(root: &Path, pci: &[PciDevice]) -> VendorInventory {
    let mut inv = VendorInventory::default();
    let vendor = DeviceType::Rbln.info().pci_vendor;
    let candidates: Vec<&PciDevice> = pci.iter().filter(|p| Some(p.vendor) == vendor).collect();
    if candidates.is_empty() {
        return inv;
    }
    let by_address = class_entries(root);
    inv.control_nodes = list_dir(root, "/dev", |n| {
        n.strip_prefix("rsd")
            .is_some_and(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
    });
    for p in candidates {
        if product_name(p.device).is_none() {
            inv.warnings.push(format!(
                "Rebellions PCI device {} has unknown product id {:#06x}; skipped",
                p.address, p.device
            ));
            continue;
        }
        if p.sriov_numvfs > 0 {
            continue; // Its virtual functions are advertised instead.
        }
        let Some(&index) = by_address.get(&p.address) else {
            inv.warnings.push(format!(
                "Rebellions PCI device {} has no {CLASS_DIR}/rblnN entry (driver not bound?); skipped",
                p.address
            ));
            continue;
        };
        let node = PathBuf::from(format!("/dev/rbln{index}"));
        let dev = Device::with_node(root, p, DeviceType::Rbln, index, p.address.clone(), node);
        inv.devices.push(dev);
    }
    inv
}

/// PCI address → N for every `sys/class/rebellions/rblnN` whose `device` link
/// resolves.
fn class_entries(root: &Path) -> BTreeMap<String, u32> {
    let mut out = BTreeMap::new();
    let Ok(entries) = std::fs::read_dir(root.join(CLASS_DIR)) else {
        return out;
    };
    for e in entries.filter_map(Result::ok) {
        let Some(index) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("rbln"))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(target) = std::fs::read_link(e.path().join("device")) else {
            continue;
        };
        if let Some(addr) = target.file_name().and_then(|n| n.to_str()) {
            out.insert(addr.to_string(), index);
        }
    }
    out
}
