//! Allocation token records: the one file format between the device plugin,
//! which writes a record for every `Allocate`, and the node agent, which reads
//! it to let a pod use only the devices the kubelet gave it.
//!
//! `<state dir>/tokens/<sha256(token)>.json`, camelCase JSON. The file name
//! and the record carry only the token's SHA-256, so neither a directory
//! listing nor a record reveals a token; the token itself lives only in the
//! container's `RM_AGENT_TOKEN`.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::device::DeviceType;

/// The directory under the state dir that holds the records.
pub const TOKENS_DIR: &str = "tokens";
/// The record format this release writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// One allocation's grant.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRecord {
    pub version: u32,
    /// SHA-256 (lower-case hex) of the token; also the file's stem.
    pub token_sha256: String,
    pub resource_name: String,
    /// The IDs the kubelet allocated (with `::N` replica suffixes if shared).
    pub device_ids: Vec<String>,
    /// The distinct physical devices, in the order the container numbers
    /// them (`rbln:0` is the first).
    pub devices: Vec<TokenDevice>,
    pub created_unix_ms: u64,
    /// After this instant the agent refuses the token. The device plugin
    /// writes a lease and renews it while the kubelet reports the holder
    /// alive, so a token lapses even when PodResources cannot be asked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix_ms: Option<u64>,
    /// The pod that holds the allocation, as the kubelet's PodResources API
    /// reports it: the identity the agent scopes models and cache entries
    /// by. `None` until the device plugin has seen the pod.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub owner: Option<TokenOwner>,
    /// A slot of the agent resource (`rm-abstract.io/agent`): use of the
    /// agent on the CPU, no devices.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub agent_slot: bool,
}

/// Who holds an allocation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenOwner {
    pub namespace: String,
    pub pod: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenDevice {
    /// Stable device ID (UUID, serial or PCI address).
    pub id: String,
    pub device_type: DeviceType,
    /// The vendor's device number on the host (`/dev/rbln3` is 3).
    pub index: u32,
    pub pci_address: Option<String>,
    /// Device nodes the container was given.
    pub nodes: Vec<String>,
}

impl TokenDevice {
    /// How the vendor's runtime names this device in its visible-devices
    /// variable on the host.
    pub fn visible_id(&self) -> String {
        visible_id(self.device_type, &self.id, self.index)
    }
}

/// How a vendor's runtime names one device in its visible-devices variable:
/// NVIDIA takes the UUID (or the minor number), FuriosaAI `npu:N`, Rebellions
/// the index.
pub fn visible_id(device_type: DeviceType, id: &str, index: u32) -> String {
    match device_type {
        DeviceType::Gpu if id.starts_with("GPU-") => id.to_string(),
        DeviceType::Furiosa => format!("npu:{index}"),
        _ => index.to_string(),
    }
}

impl TokenRecord {
    /// The device type of the grant: the devices' type, or the CPU for a
    /// slot of the agent resource. `None` for a record that grants nothing.
    pub fn device_type(&self) -> Option<DeviceType> {
        match self.devices.first() {
            Some(d) => Some(d.device_type),
            None if self.agent_slot => Some(DeviceType::Cpu),
            None => None,
        }
    }

    /// The devices as the vendor's runtime names them on the host.
    pub fn visible_ids(&self) -> Vec<String> {
        self.devices.iter().map(TokenDevice::visible_id).collect()
    }
}

/// SHA-256 (lower-case hex) of a token.
pub fn token_sha256(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `<tokens dir>/<sha256>.json`.
pub fn record_path(tokens_dir: &Path, token_sha256: &str) -> PathBuf {
    tokens_dir.join(format!("{token_sha256}.json"))
}

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error("no record for this token")]
    NotFound,
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not a token record: {source}")]
    Malformed {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error(
        "{path}: record version {found} is not supported (this release reads {RECORD_VERSION})"
    )]
    Version { path: PathBuf, found: u32 },
}

/// Reads the record of `token` from `tokens_dir`.
pub fn read(tokens_dir: &Path, token: &str) -> Result<TokenRecord, ReadError> {
    let path = record_path(tokens_dir, &token_sha256(token));
    let raw = match std::fs::read(&path) {
        Ok(r) => r,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(ReadError::NotFound),
        Err(source) => return Err(ReadError::Io { path, source }),
    };
    let rec: TokenRecord = serde_json::from_slice(&raw).map_err(|source| ReadError::Malformed {
        path: path.clone(),
        source,
    })?;
    if rec.version != RECORD_VERSION {
        return Err(ReadError::Version {
            path,
            found: rec.version,
        });
    }
    Ok(rec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_under_the_hash_of_their_token() {
        let dir = std::env::temp_dir().join(format!("rm-token-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("mkdir");
        let rec = TokenRecord {
            version: RECORD_VERSION,
            token_sha256: token_sha256("s3cret"),
            resource_name: "furiosa.ai/rngd".into(),
            device_ids: vec!["uuid-a".into()],
            devices: vec![TokenDevice {
                id: "uuid-a".into(),
                device_type: DeviceType::Furiosa,
                index: 2,
                pci_address: None,
                nodes: vec!["/dev/rngd/npu2".into()],
            }],
            created_unix_ms: 1,
            expires_unix_ms: None,
            owner: None,
            agent_slot: false,
        };
        let path = record_path(&dir, &rec.token_sha256);
        std::fs::write(&path, serde_json::to_vec(&rec).expect("json")).expect("write");
        let raw = std::fs::read_to_string(&path).expect("read");
        assert!(!raw.contains("s3cret"), "the token itself is never stored");
        let back = read(&dir, "s3cret").expect("record");
        assert_eq!(back, rec);
        assert_eq!(back.device_type(), Some(DeviceType::Furiosa));
        assert_eq!(back.visible_ids(), ["npu:2"]);
        assert!(matches!(read(&dir, "other"), Err(ReadError::NotFound)));
        let newer = TokenRecord { version: 2, ..rec };
        std::fs::write(&path, serde_json::to_vec(&newer).expect("json")).expect("write");
        assert!(matches!(
            read(&dir, "s3cret"),
            Err(ReadError::Version { found: 2, .. })
        ));
        std::fs::write(&path, br#"{"version":1}"#).expect("write");
        assert!(matches!(
            read(&dir, "s3cret"),
            Err(ReadError::Malformed { .. })
        ));
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }

    #[test]
    fn visible_ids_follow_each_vendor() {
        assert_eq!(visible_id(DeviceType::Gpu, "GPU-1a", 3), "GPU-1a");
        assert_eq!(visible_id(DeviceType::Gpu, "0000:3b:00.0", 3), "3");
        assert_eq!(visible_id(DeviceType::Rbln, "RBLN-x", 1), "1");
        assert_eq!(visible_id(DeviceType::Furiosa, "u", 0), "npu:0");
    }
}
