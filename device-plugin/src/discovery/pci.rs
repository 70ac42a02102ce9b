//! PCI devices from `sys/bus/pci/devices/*/{vendor,device,class,numa_node}`.

use std::path::Path;

use super::read_attr;

/// One PCI function as sysfs describes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PciDevice {
    /// Domain:bus:device.function, e.g. `0000:3b:00.0`.
    pub address: String,
    pub vendor: u16,
    pub device: u16,
    /// The 24-bit class code (`0x030200` = 3D controller), when readable.
    pub class: Option<u32>,
    /// `None` when the kernel reports -1 (no NUMA affinity) or nothing.
    pub numa_node: Option<i64>,
    /// Virtual functions enabled on this physical function.
    pub sriov_numvfs: u32,
    /// This is a virtual function (it has a `physfn` link).
    pub is_virtual_function: bool,
}

pub const DEVICES_DIR: &str = "sys/bus/pci/devices";

/// Lists PCI functions; entries without a readable vendor/device id are
/// skipped with a warning.
pub fn scan(root: &Path) -> (Vec<PciDevice>, Vec<String>) {
    let dir = root.join(DEVICES_DIR);
    let mut out = Vec::new();
    let mut warnings = Vec::new();
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return (out, warnings); // No PCI bus in this tree: nothing to find.
    };
    for entry in entries.filter_map(Result::ok) {
        let Ok(address) = entry.file_name().into_string() else {
            continue;
        };
        let path = entry.path();
        match read(&path, &address) {
            Ok(d) => out.push(d),
            Err(why) => warnings.push(format!("PCI device {address}: {why}; skipped")),
        }
    }
    out.sort_by(|a, b| a.address.cmp(&b.address));
    (out, warnings)
}

fn read(path: &Path, address: &str) -> Result<PciDevice, String> {
    let hex = |name: &str| -> Result<u32, String> {
        let raw = read_attr(&path.join(name)).ok_or_else(|| format!("no readable {name}"))?;
        parse_hex(&raw).ok_or_else(|| format!("{name} {raw:?} is not a hex number"))
    };
    let vendor = u16::try_from(hex("vendor")?).map_err(|_| "vendor id out of range".to_string())?;
    let device = u16::try_from(hex("device")?).map_err(|_| "device id out of range".to_string())?;
    let class = hex("class").ok();
    let numa_node = read_attr(&path.join("numa_node"))
        .and_then(|s| s.parse::<i64>().ok())
        .filter(|n| *n >= 0);
    let sriov_numvfs = read_attr(&path.join("sriov_numvfs"))
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let is_virtual_function = path.join("physfn").exists();
    Ok(PciDevice {
        address: address.to_string(),
        vendor,
        device,
        class,
        numa_node,
        sriov_numvfs,
        is_virtual_function,
    })
}

fn parse_hex(s: &str) -> Option<u32> {
    let s = s.trim();
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    u32::from_str_radix(digits, 16).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_ids_numa_and_sriov_and_skips_malformed() {
        let tmp = tempfile::tempdir().expect("tmp");
        let dev = |addr: &str, files: &[(&str, &str)]| {
            let d = tmp.path().join(DEVICES_DIR).join(addr);
            std::fs::create_dir_all(&d).expect("mkdir");
            for (n, v) in files {
                std::fs::write(d.join(n), v).expect("write");
            }
        };
        dev(
            "0000:01:00.0",
            &[
                ("vendor", "0x10de\n"),
                ("device", "0x2330\n"),
                ("class", "0x030200\n"),
                ("numa_node", "1\n"),
            ],
        );
        dev(
            "0000:02:00.0",
            &[
                ("vendor", "0x1eff\n"),
                ("device", "0x1220\n"),
                ("numa_node", "-1\n"),
                ("sriov_numvfs", "4\n"),
            ],
        );
        dev(
            "0000:03:00.0",
            &[("vendor", "garbage\n"), ("device", "0x1\n")],
        );
        dev("0000:04:00.0", &[("device", "0x1\n")]);
        let (devs, warnings) = scan(tmp.path());
        assert_eq!(devs.len(), 2, "{devs:?}");
        assert_eq!(devs[0].vendor, 0x10de);
        assert_eq!(devs[0].numa_node, Some(1));
        assert_eq!(devs[0].class, Some(0x030200));
        assert_eq!(devs[1].numa_node, None, "-1 means no affinity");
        assert_eq!(devs[1].sriov_numvfs, 4);
        assert_eq!(warnings.len(), 2, "{warnings:?}");
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("0000:03:00.0") && w.contains("hex"))
        );
    }
}
