//! Device tokens: the device plugin writes one JSON file per allocation into
//! `<state-dir>/tokens/`, named by the SHA-256 of the token (so the directory
//! listing does not reveal tokens). A request for an accelerator must carry a
//! token, and may use only that allocation's devices. The decision is the pure
//! function [`authorize`]; [`TokenStore`] only reads files.

use std::path::{Path, PathBuf};

use rm_crds::{DeviceRequest, DeviceType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::key::hex;

/// One token file, as the device plugin writes it (see agent/README.md).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Allocation {
    /// Format version; this agent reads version 1.
    pub version: u32,
    pub device_type: DeviceType,
    /// Host device ids of the allocation, in the order the container numbers
    /// them (`rbln:0` is the first).
    pub devices: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<String>,
    /// Unix seconds after which the token is refused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_unix: Option<u64>,
}

/// Where a request may run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub device_type: DeviceType,
    /// Host device ids; empty for the CPU.
    pub devices: Vec<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error(
        "device {0} is an accelerator: send the token from RM_AGENT_TOKEN as 'Authorization: Bearer <token>'"
    )]
    MissingToken(String),
    #[error("the token is not known to this node's agent (expired or from another node)")]
    UnknownToken,
    #[error("the token has expired")]
    Expired,
    #[error(
        "the token allocates {allocated} devices, not {requested}; use device \"{allocated}:N\" or \"auto\""
    )]
    WrongType {
        allocated: DeviceType,
        requested: String,
    },
    #[error("device index {index} is outside the allocation ({count} device(s): use {allocated}:0..{last})", last = count.saturating_sub(1))]
    IndexOutOfRange {
        index: u32,
        count: usize,
        allocated: DeviceType,
    },
    #[error("the token file for this token is unreadable: {0}")]
    BadTokenFile(String),
}

impl AuthError {
    pub fn http_status(&self) -> u16 {
        match self {
            AuthError::MissingToken(_) | AuthError::UnknownToken | AuthError::Expired => 401,
            AuthError::WrongType { .. } | AuthError::IndexOutOfRange { .. } => 403,
            AuthError::BadTokenFile(_) => 500,
        }
    }
}

/// Decides where `request` may run, given the caller's allocation (if any).
/// The CPU needs no token; every accelerator does.
pub fn authorize(
    request: DeviceRequest,
    allocation: Option<&Allocation>,
    now_unix: u64,
) -> Result<Target, AuthError> {
    if let Some(a) = allocation {
        if a.expires_unix.is_some_and(|e| e <= now_unix) {
            return Err(AuthError::Expired);
        }
    }
    let cpu = Target {
        device_type: DeviceType::Cpu,
        devices: vec![],
    };
    let (allowed_types, index) = match request {
        DeviceRequest::Exact {
            device_type: DeviceType::Cpu,
            ..
        } => return Ok(cpu),
        DeviceRequest::Auto => match allocation {
            None => return Ok(cpu),
            Some(a) => (vec![a.device_type], None),
        },
        other => (other.candidate_types(), other.index()),
    };
    let Some(a) = allocation else {
        return Err(AuthError::MissingToken(request.to_string()));
    };
    if !allowed_types.contains(&a.device_type) {
        return Err(AuthError::WrongType {
            allocated: a.device_type,
            requested: request.to_string(),
        });
    }
    let devices = match index {
        None => a.devices.clone(),
        Some(i) => match a.devices.get(i as usize) {
            Some(d) => vec![d.clone()],
            None => {
                return Err(AuthError::IndexOutOfRange {
                    index: i,
                    count: a.devices.len(),
                    allocated: a.device_type,
                });
            }
        },
    };
    Ok(Target {
        device_type: a.device_type,
        devices,
    })
}

/// SHA-256 hex of a token: the name of its file without `.json`.
pub fn token_file_stem(token: &str) -> String {
    hex(&Sha256::digest(token.as_bytes()))
}

/// Reads token files from `<state-dir>/tokens/` on every lookup, so the
/// device plugin may add and remove them at any time.
#[derive(Clone, Debug)]
pub struct TokenStore {
    dir: Option<PathBuf>,
}

impl TokenStore {
    pub fn new(state_dir: Option<&Path>) -> Self {
        TokenStore {
            dir: state_dir.map(|d| d.join("tokens")),
        }
    }

    pub fn lookup(&self, token: &str) -> Result<Allocation, AuthError> {
        let Some(dir) = &self.dir else {
            return Err(AuthError::UnknownToken);
        };
        if token.is_empty() || token.len() > 4096 {
            return Err(AuthError::UnknownToken);
        }
        let path = dir.join(format!("{}.json", token_file_stem(token)));
        let raw = match std::fs::read(&path) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(AuthError::UnknownToken);
            }
            Err(e) => return Err(AuthError::BadTokenFile(e.to_string())),
        };
        let a: Allocation = serde_json::from_slice(&raw)
            .map_err(|e| AuthError::BadTokenFile(format!("{}: {e}", path.display())))?;
        if a.version != 1 {
            return Err(AuthError::BadTokenFile(format!(
                "{}: version {} is not supported (expected 1)",
                path.display(),
                a.version
            )));
        }
        Ok(a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(t: DeviceType, n: usize) -> Allocation {
        Allocation {
            version: 1,
            device_type: t,
            devices: (0..n).map(|i| format!("{}", i + 4)).collect(),
            resource_name: None,
            expires_unix: None,
        }
    }

    fn req(s: &str) -> DeviceRequest {
        s.parse().expect("valid device string")
    }

    #[test]
    fn cpu_needs_no_token() {
        let t = authorize(req("cpu"), None, 0).expect("cpu allowed");
        assert_eq!(t.device_type, DeviceType::Cpu);
        assert_eq!(
            authorize(req("auto"), None, 0).map(|t| t.device_type),
            Ok(DeviceType::Cpu)
        );
    }

    #[test]
    fn accelerator_without_token_is_refused() {
        assert!(matches!(
            authorize(req("gpu:0"), None, 0),
            Err(AuthError::MissingToken(_))
        ));
        assert!(matches!(
            authorize(req("npu"), None, 0),
            Err(AuthError::MissingToken(_))
        ));
    }

    #[test]
    fn only_the_allocated_type_and_indices() {
        let a = alloc(DeviceType::Rbln, 2);
        assert_eq!(
            authorize(req("rbln:1"), Some(&a), 0).map(|t| t.devices),
            Ok(vec!["5".to_string()])
        );
        assert_eq!(
            authorize(req("npu:0"), Some(&a), 0).map(|t| t.devices),
            Ok(vec!["4".to_string()])
        );
        assert_eq!(
            authorize(req("auto"), Some(&a), 0).map(|t| t.devices.len()),
            Ok(2)
        );
        assert!(matches!(
            authorize(req("gpu:0"), Some(&a), 0),
            Err(AuthError::WrongType { .. })
        ));
        assert!(matches!(
            authorize(req("rbln:2"), Some(&a), 0),
            Err(AuthError::IndexOutOfRange { .. })
        ));
        let g = alloc(DeviceType::Gpu, 1);
        assert!(matches!(
            authorize(req("npu"), Some(&g), 0),
            Err(AuthError::WrongType { .. })
        ));
    }

    #[test]
    fn expired_token_is_refused() {
        let mut a = alloc(DeviceType::Gpu, 1);
        a.expires_unix = Some(10);
        assert_eq!(authorize(req("gpu"), Some(&a), 11), Err(AuthError::Expired));
    }

    #[test]
    fn token_files_are_named_by_hash() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join("tokens");
        std::fs::create_dir_all(&tokens).expect("mkdir");
        let a = alloc(DeviceType::Furiosa, 1);
        std::fs::write(
            tokens.join(format!("{}.json", token_file_stem("s3cret"))),
            serde_json::to_vec(&a).expect("json"),
        )
        .expect("write");
        let store = TokenStore::new(Some(dir.path()));
        assert_eq!(store.lookup("s3cret"), Ok(a));
        assert_eq!(store.lookup("other"), Err(AuthError::UnknownToken));
    }
}
