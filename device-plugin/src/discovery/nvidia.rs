//! NVIDIA GPUs: PCI vendor 0x10de display-class functions, mapped to
//! `/dev/nvidiaN` through the driver's procfs file
//! `/proc/driver/nvidia/gpus/<pci address>/information` (fields `GPU UUID:`
//! and `Device Minor:`), with the shared nodes `/dev/nvidiactl` and
//! `/dev/nvidia-uvm*` that CUDA needs.

use std::path::{Path, PathBuf};

use rm_crds::device::DeviceType;

use super::pci::PciDevice;
use super::{Device, VendorInventory, existing, under};

const CONTROL_NODES: [&str; 4] = [
    "/dev/nvidiactl",
    "/dev/nvidia-uvm",
    "/dev/nvidia-uvm-tools",
    "/dev/nvidia-modeset",
];

/// PCI class 0x03: display controller (VGA 0x0300 or 3D 0x0302). The GPU's
/// audio or USB functions share the vendor id and are not GPUs.
const DISPLAY_CLASS: u32 = 0x03;

pub(crate) fn discover(root: &Path, pci: &[PciDevice]) -> VendorInventory {
    let mut inv = VendorInventory::default();
    let vendor = DeviceType::Gpu.info().pci_vendor;
    let gpus: Vec<&PciDevice> = pci
        .iter()
        .filter(|p| Some(p.vendor) == vendor)
        .filter(|p| p.class.is_none_or(|c| c >> 16 == DISPLAY_CLASS))
        .collect();
    if gpus.is_empty() {
        return inv;
    }
    inv.control_nodes = existing(root, &CONTROL_NODES);
    let ctl_missing = !under(root, Path::new("/dev/nvidiactl")).exists();
    for (position, p) in gpus.iter().enumerate() {
        let info_path = root
            .join("proc/driver/nvidia/gpus")
            .join(&p.address)
            .join("information");
        let info = std::fs::read_to_string(&info_path).ok();
        let field = |key: &str| info.as_deref().and_then(|t| parse_field(t, key));
        let minor = match field("Device Minor").map(|m| m.parse::<u32>()) {
            Some(Ok(m)) => m,
            Some(Err(_)) => {
                inv.warnings.push(format!(
                    "NVIDIA GPU {}: malformed Device Minor in {}; skipped",
                    p.address,
                    info_path.display()
                ));
                continue;
            }
            // Without the driver's procfs the minor is unknown; the driver
            // numbers GPUs in PCI order, so that order is the best guess.
            None => {
                inv.warnings.push(format!(
                    "NVIDIA GPU {}: no {}; assuming /dev/nvidia{position} from PCI order",
                    p.address,
                    info_path.display()
                ));
                position as u32
            }
        };
        let uuid = field("GPU UUID").filter(|u| u.starts_with("GPU-") && u.len() <= 63);
        let node = PathBuf::from(format!("/dev/nvidia{minor}"));
        let id = uuid.unwrap_or_else(|| p.address.clone());
        let mut dev = Device::with_node(root, p, DeviceType::Gpu, minor, id, node);
        if ctl_missing {
            dev.mark_unhealthy("/dev/nvidiactl is missing (driver not loaded?)");
        }
        if field("GPU Excluded").is_some_and(|v| v.eq_ignore_ascii_case("yes")) {
            dev.mark_unhealthy("the driver reports the GPU as excluded");
        }
        inv.devices.push(dev);
    }
    // Two GPUs claiming one minor would hand one container another's GPU.
    let mut minors: Vec<u32> = inv.devices.iter().map(|d| d.index).collect();
    minors.sort_unstable();
    minors.dedup();
    if minors.len() != inv.devices.len() {
        inv.warnings
            .push("NVIDIA GPUs with duplicate device minors; all marked Unhealthy".into());
        for d in &mut inv.devices {
            d.mark_unhealthy("duplicate device minor");
        }
    }
    inv
}

/// Value of `Key:  value` in the driver's `information` file.
fn parse_field(text: &str, key: &str) -> Option<String> {
    text.lines().find_map(|line| {
        let (k, v) = line.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_drivers_information_file() {
        let text = "Model: \t\t NVIDIA H100 80GB HBM3\nGPU UUID: \t GPU-0b4f7c4a-1111-2222-3333-444455556666\n\
                    Bus Location: \t 0000:3b:00.0\nDevice Minor: \t 3\nGPU Excluded:\t No\n";
        assert_eq!(parse_field(text, "Device Minor").as_deref(), Some("3"));
        assert_eq!(
            parse_field(text, "GPU UUID").as_deref(),
            Some("GPU-0b4f7c4a-1111-2222-3333-444455556666")
        );
        // "Bus Location" value itself contains colons.
        assert_eq!(
            parse_field(text, "Bus Location").as_deref(),
            Some("0000:3b:00.0")
        );
        assert_eq!(parse_field(text, "IRQ"), None);
    }
}
