//! The device table: every accelerator type rm-abstract knows, its aliases,
//! default extended-resource name, PCI vendor and default priority, and the
//! grammar of device strings (`auto`, `npu:0`, `rbln:1`, `cpu`, ...).
//!
//! This is the one place these facts live. The operator, device plugin, agent,
//! kubectl plugin and the CRD's CEL rules are all derived from it.

use std::fmt;
use std::str::FromStr;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Extended resource of the node agent's socket, advertised by the device
/// plugin: a container that requests no accelerator requests one of it, and
/// its `Allocate` mounts the agent's socket directory.
pub const AGENT_RESOURCE: &str = "rm-abstract.io/agent";

/// Priority of a device type or backend. Higher wins. The named levels are the
/// seed library's plugin priorities.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Priority(pub u32);

impl Priority {
    pub const HIGHEST: Priority = Priority(100);
    pub const HIGH: Priority = Priority(75);
    pub const NORMAL: Priority = Priority(50);
    pub const LOW: Priority = Priority(25);
    pub const LOWEST: Priority = Priority(0);
}

impl fmt::Display for Priority {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// A kind of device a workload can run on.
///
/// The declaration order is the documented tie-break between equal priorities:
/// `rbln` before `furiosa` before `gpu` before `cpu`.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceType {
    /// Rebellions ATOM NPU.
    Rbln,
    /// FuriosaAI RNGD NPU.
    Furiosa,
    /// NVIDIA GPU.
    Gpu,
    /// Plain CPU, no extended resource.
    Cpu,
}

/// Static facts about one device type (one row of the design's device table).
#[derive(Debug)]
pub struct DeviceInfo {
    pub device_type: DeviceType,
    /// Canonical name, as used in device strings, CRD fields and labels.
    pub name: &'static str,
    /// Other accepted spellings, normalised to `name` when parsed.
    pub aliases: &'static [&'static str],
    /// Extended resource advertised by the device plugin (configurable).
    pub default_resource_name: Option<&'static str>,
    /// PCI vendor id of the hardware.
    pub pci_vendor: Option<u16>,
    pub default_priority: Priority,
    pub is_npu: bool,
    /// Human name for messages and tables.
    pub display_name: &'static str,
    /// Who makes the hardware (`None` for the CPU: it varies by node).
    pub vendor: Option<&'static str>,
    /// Alternative extended-resource name some clusters use for the same
    /// hardware (Rebellions' generic mode advertises `rebellions.ai/npu`).
    pub generic_resource_name: Option<&'static str>,
    /// Environment variable through which the vendor's runtime learns which
    /// devices a container may use (set by the device plugin on allocation).
    pub visible_devices_env: Option<&'static str>,
}

const TABLE: [DeviceInfo; 4] = [
    DeviceInfo {
        device_type: DeviceType::Rbln,
        name: "rbln",
        aliases: &["atom", "rebellions"],
        default_resource_name: Some("rebellions.ai/ATOM"),
        pci_vendor: Some(0x1eff),
        default_priority: Priority::HIGHEST,
        is_npu: true,
        display_name: "Rebellions ATOM",
        vendor: Some("Rebellions"),
        generic_resource_name: Some("rebellions.ai/npu"),
        visible_devices_env: Some("RBLN_DEVICES"),
    },
    DeviceInfo {
        device_type: DeviceType::Furiosa,
        name: "furiosa",
        aliases: &["rngd"],
        default_resource_name: Some("furiosa.ai/rngd"),
        pci_vendor: Some(0x1ed2),
        default_priority: Priority::HIGHEST,
        is_npu: true,
        display_name: "FuriosaAI RNGD",
        vendor: Some("FuriosaAI"),
        generic_resource_name: None,
        visible_devices_env: Some("FURIOSA_DEVICES"),
    },
    DeviceInfo {
        device_type: DeviceType::Gpu,
        name: "gpu",
        aliases: &["cuda", "nvidia"],
        default_resource_name: Some("nvidia.com/gpu"),
        pci_vendor: Some(0x10de),
        default_priority: Priority::HIGH,
        is_npu: false,
        display_name: "NVIDIA GPU",
        vendor: Some("NVIDIA"),
        generic_resource_name: None,
        visible_devices_env: Some("NVIDIA_VISIBLE_DEVICES"),
    },
    DeviceInfo {
        device_type: DeviceType::Cpu,
        name: "cpu",
        aliases: &[],
        default_resource_name: None,
        pci_vendor: None,
        default_priority: Priority::LOWEST,
        is_npu: false,
        display_name: "CPU",
        vendor: None,
        generic_resource_name: None,
        visible_devices_env: None,
    },
];

impl DeviceType {
    /// Every device type, in tie-break order.
    pub const ALL: [DeviceType; 4] = [
        DeviceType::Rbln,
        DeviceType::Furiosa,
        DeviceType::Gpu,
        DeviceType::Cpu,
    ];

    pub fn info(self) -> &'static DeviceInfo {
        // TABLE is declared in the same order as the enum.
        &TABLE[self as usize]
    }

    pub fn as_str(self) -> &'static str {
        self.info().name
    }

    /// Whether the device type is requested through an extended resource.
    pub fn is_accelerator(self) -> bool {
        self.info().default_resource_name.is_some()
    }

    /// The device types sorted by their default priority, highest first,
    /// ties broken by declaration order.
    pub fn by_default_priority() -> Vec<DeviceType> {
        let mut all = Self::ALL.to_vec();
        all.sort_by_key(|t| std::cmp::Reverse(t.info().default_priority));
        all
    }
}

impl fmt::Display for DeviceType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for DeviceType {
    type Err = DeviceStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let lower = s.trim().to_ascii_lowercase();
        TABLE
            .iter()
            .find(|d| d.name == lower || d.aliases.contains(&lower.as_str()))
            .map(|d| d.device_type)
            .ok_or_else(|| DeviceStringError::UnknownType(s.to_string()))
    }
}

/// What a device string asks for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeviceRequest {
    /// `auto`: the best type with free capacity, by priority.
    Auto,
    /// `npu` / `npu:N`: the highest-priority NPU type present.
    Npu { index: Option<u32> },
    /// A named type, optionally a device index inside the allocation.
    Exact {
        device_type: DeviceType,
        index: Option<u32>,
    },
}

/// A device string that could not be parsed.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DeviceStringError {
    #[error("unknown device type {0:?}; expected one of {words}", words = accepted_device_words())]
    UnknownType(String),
    #[error("device index in {0:?} is not a non-negative integer; write e.g. \"gpu:0\"")]
    BadIndex(String),
    #[error("device {0:?} takes no index; write it without \":N\"")]
    IndexNotAllowed(String),
}

impl DeviceRequest {
    /// Device types this request may be satisfied by, in tie-break order.
    pub fn candidate_types(self) -> Vec<DeviceType> {
        match self {
            DeviceRequest::Auto => DeviceType::ALL.to_vec(),
            DeviceRequest::Npu { .. } => DeviceType::ALL
                .into_iter()
                .filter(|t| t.info().is_npu)
                .collect(),
            DeviceRequest::Exact { device_type, .. } => vec![device_type],
        }
    }

    pub fn index(self) -> Option<u32> {
        match self {
            DeviceRequest::Auto => None,
            DeviceRequest::Npu { index } | DeviceRequest::Exact { index, .. } => index,
        }
    }
}

impl FromStr for DeviceRequest {
    type Err = DeviceStringError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let trimmed = s.trim();
        let (word, index) = match trimmed.split_once(':') {
            Some((word, idx)) => {
                let idx = idx
                    .parse::<u32>()
                    .map_err(|_| DeviceStringError::BadIndex(s.to_string()))?;
                (word, Some(idx))
            }
            None => (trimmed, None),
        };
        let word_lower = word.to_ascii_lowercase();
        match word_lower.as_str() {
            "auto" if index.is_some() => Err(DeviceStringError::IndexNotAllowed(s.to_string())),
            "auto" => Ok(DeviceRequest::Auto),
            "npu" => Ok(DeviceRequest::Npu { index }),
            _ => {
                let device_type = word.parse::<DeviceType>()?;
                if device_type == DeviceType::Cpu && index.is_some() {
                    return Err(DeviceStringError::IndexNotAllowed(s.to_string()));
                }
                Ok(DeviceRequest::Exact { device_type, index })
            }
        }
    }
}

impl fmt::Display for DeviceRequest {
    /// The normalised spelling: canonical names, no aliases.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (word, index) = match self {
            DeviceRequest::Auto => ("auto", None),
            DeviceRequest::Npu { index } => ("npu", *index),
            DeviceRequest::Exact { device_type, index } => (device_type.as_str(), *index),
        };
        match index {
            Some(i) => write!(f, "{word}:{i}"),
            None => f.write_str(word),
        }
    }
}

/// All words a device string may start with, for error messages.
pub fn accepted_device_words() -> String {
    let mut words = vec!["auto", "npu"];
    for d in &TABLE {
        words.push(d.name);
        words.extend(d.aliases.iter().copied());
    }
    words.join(", ")
}

/// The regular expression the CRD uses to validate device strings; generated
/// from the table so that the apiserver and [`DeviceRequest::from_str`] agree.
pub fn device_string_regex() -> String {
    let mut indexed: Vec<&str> = vec!["npu"];
    for d in TABLE.iter().filter(|d| d.device_type != DeviceType::Cpu) {
        indexed.push(d.name);
        indexed.extend(d.aliases.iter().copied());
    }
    format!("^(auto|cpu|({})(:[0-9]+)?)$", indexed.join("|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aliases_normalise_to_canonical_names() {
        for (input, want) in [
            ("atom", "rbln"),
            ("rebellions:2", "rbln:2"),
            ("RNGD", "furiosa"),
            ("cuda:0", "gpu:0"),
            ("nvidia", "gpu"),
            ("npu:1", "npu:1"),
            ("auto", "auto"),
            (" cpu ", "cpu"),
        ] {
            let parsed: DeviceRequest = input.parse().expect(input);
            assert_eq!(parsed.to_string(), want, "{input}");
        }
    }

    #[test]
    fn malformed_device_strings_are_rejected_with_a_reason() {
        assert!(matches!(
            "tpu".parse::<DeviceRequest>(),
            Err(DeviceStringError::UnknownType(_))
        ));
        assert!(matches!(
            "gpu:x".parse::<DeviceRequest>(),
            Err(DeviceStringError::BadIndex(_))
        ));
        assert!(matches!(
            "gpu:-1".parse::<DeviceRequest>(),
            Err(DeviceStringError::BadIndex(_))
        ));
        assert!(matches!(
            "auto:0".parse::<DeviceRequest>(),
            Err(DeviceStringError::IndexNotAllowed(_))
        ));
        assert!(matches!(
            "cpu:0".parse::<DeviceRequest>(),
            Err(DeviceStringError::IndexNotAllowed(_))
        ));
        let msg = "tpu".parse::<DeviceRequest>().unwrap_err().to_string();
        assert!(msg.contains("rbln") && msg.contains("npu"), "{msg}");
    }

    #[test]
    fn npu_means_the_npu_types_only() {
        let npu: DeviceRequest = "npu".parse().unwrap();
        assert_eq!(
            npu.candidate_types(),
            vec![DeviceType::Rbln, DeviceType::Furiosa]
        );
    }

    #[test]
    fn default_priority_order_breaks_ties_by_declaration() {
        assert_eq!(
            DeviceType::by_default_priority(),
            vec![
                DeviceType::Rbln,
                DeviceType::Furiosa,
                DeviceType::Gpu,
                DeviceType::Cpu
            ]
        );
    }

    #[test]
    fn table_rows_match_their_enum_variant() {
        for t in DeviceType::ALL {
            assert_eq!(t.info().device_type, t);
            assert_eq!(t.as_str().parse::<DeviceType>().unwrap(), t);
        }
    }

    /// The CRD's regex and the Rust parser accept the same strings (the CRD is
    /// stricter only in that it wants lower case without spaces).
    #[test]
    fn crd_regex_agrees_with_parser() {
        let re = regex::Regex::new(&device_string_regex()).unwrap();
        let samples = [
            "auto",
            "auto:0",
            "npu",
            "npu:3",
            "gpu",
            "gpu:0",
            "cuda:12",
            "rbln",
            "atom:1",
            "rngd",
            "furiosa:0",
            "rebellions",
            "nvidia:1",
            "cpu",
            "cpu:0",
            "tpu",
            "gpu:",
            "gpu:a",
            ":0",
            "",
            "npu:1:2",
        ];
        for s in samples {
            assert_eq!(
                s.parse::<DeviceRequest>().is_ok(),
                re.is_match(s),
                "{s:?} against {re}"
            );
        }
    }
}
