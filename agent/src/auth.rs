//! Who calls, and where they may run. The device plugin writes one record
//! per allocation into `<state-dir>/tokens/` (`rm_crds::token`, named by the
//! SHA-256 of the token): an accelerator's devices, or a slot of the agent
//! resource (the CPU), bound to the pod that holds it. Every request carries
//! one of these tokens (or the cluster operator's admin token); the pod's
//! namespace is the tenant that models and cache entries are scoped by.
//! The decisions are the pure functions [`authorize`] and [`Caller`]'s
//! methods; [`TokenStore`] only reads records.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

pub use rm_crds::token::TokenOwner;
use rm_crds::token::{self, ReadError, TokenRecord};
use rm_crds::{DeviceRequest, DeviceType};

use crate::backend::AllocationRef;

/// What the agent needs of a token record.
#[derive(Clone, Debug, PartialEq)]
pub struct Allocation {
    pub device_type: DeviceType,
    /// The devices as the vendor's runtime names them on the host, in the
    /// order the container numbers them (`rbln:0` is the first).
    pub devices: Vec<String>,
    /// Unix milliseconds after which the token is refused.
    pub expires_unix_ms: Option<u64>,
    /// The pod holding the allocation, once the device plugin has bound it.
    pub owner: Option<TokenOwner>,
    /// The record's token SHA-256, resource name and kubelet device IDs:
    /// what worker processes are tied to (see [`Caller::allocation_ref`]).
    pub token_sha256: String,
    pub resource_name: String,
    pub device_ids: Vec<String>,
}

impl TryFrom<&TokenRecord> for Allocation {
    type Error = AuthError;

    fn try_from(rec: &TokenRecord) -> Result<Self, AuthError> {
        let device_type = rec.device_type().ok_or_else(|| {
            AuthError::BadTokenFile(format!(
                "the record of {} grants no devices",
                rec.resource_name
            ))
        })?;
        Ok(Allocation {
            device_type,
            devices: rec.visible_ids(),
            expires_unix_ms: rec.expires_unix_ms,
            owner: rec.owner.clone(),
            token_sha256: rec.token_sha256.clone(),
            resource_name: rec.resource_name.clone(),
            device_ids: rec.device_ids.clone(),
        })
    }
}

/// Where a request may run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub device_type: DeviceType,
    /// Host device ids; empty for the CPU.
    pub devices: Vec<String>,
}

/// Who is calling.
#[derive(Clone, Debug, PartialEq)]
pub enum Caller {
    /// The agent runs without a token store (`--state-dir` unset): one
    /// trusted tenant, for development on a workstation only.
    Trusted,
    /// The cluster operator (`--admin-token-file`): sees and deletes every
    /// tenant's entries; runs on the CPU only.
    Admin,
    /// A pod, by the token of its allocation.
    Pod {
        owner: TokenOwner,
        // Boxed: many times the size of the other variants.
        allocation: Box<Allocation>,
    },
}

impl Caller {
    /// The tenant whose models and entries the caller sees; `None` sees all.
    pub fn namespace(&self) -> Option<&str> {
        match self {
            Caller::Pod { owner, .. } => Some(&owner.namespace),
            Caller::Trusted | Caller::Admin => None,
        }
    }

    /// The devices the caller holds, for [`authorize`].
    pub fn allocation(&self) -> Option<&Allocation> {
        match self {
            Caller::Pod { allocation, .. } => Some(allocation.as_ref()),
            Caller::Trusted | Caller::Admin => None,
        }
    }

    /// The allocation a request runs for, for the backends that tie
    /// processes to it; `None` for the admin and a trusted caller.
    pub fn allocation_ref(&self) -> Option<AllocationRef> {
        match self {
            Caller::Pod { owner, allocation } => Some(AllocationRef {
                token_sha256: allocation.token_sha256.clone(),
                owner: owner.clone(),
                resource_name: allocation.resource_name.clone(),
                device_ids: allocation.device_ids.clone(),
            }),
            Caller::Trusted | Caller::Admin => None,
        }
    }

    /// For logs: `namespace/pod`, `admin` or `trusted`.
    pub fn describe(&self) -> String {
        match self {
            Caller::Pod { owner, .. } => format!("{}/{}", owner.namespace, owner.pod),
            Caller::Admin => "admin".into(),
            Caller::Trusted => "trusted".into(),
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AuthError {
    #[error(
        "this agent serves pods by their token: send RM_AGENT_TOKEN (pods with an accelerator) or RM_AGENT_SLOT_TOKEN (pods with rm-abstract.io/agent: 1, which the webhook adds) as 'Authorization: Bearer <token>'"
    )]
    NoIdentity,
    #[error(
        "the token is not yet bound to its pod (the device plugin does so as soon as the kubelet reports the pod); retry in a second"
    )]
    NotBound,
    #[error(
        "device {0} is an accelerator: send the token from RM_AGENT_TOKEN as 'Authorization: Bearer <token>'"
    )]
    MissingToken(String),
    #[error("the token is not known to this node's agent (expired or from another node)")]
    UnknownToken,
    #[error("the token has expired")]
    Expired,
    #[error(
        "device {0} needs an accelerator, and this pod holds no accelerator (its token is an rm-abstract.io/agent slot, for the CPU): request the device in the pod's resources (an InferenceWorkload's pods get it from the operator), or use device \"cpu\""
    )]
    NoAccelerator(String),
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
            AuthError::NoIdentity
            | AuthError::MissingToken(_)
            | AuthError::UnknownToken
            | AuthError::Expired => 401,
            AuthError::NotBound => 503,
            AuthError::NoAccelerator(_)
            | AuthError::WrongType { .. }
            | AuthError::IndexOutOfRange { .. } => 403,
            AuthError::BadTokenFile(_) => 500,
        }
    }
}

/// Who a token names, given its allocation (if the store knows it) and
/// whether it is the admin token. Pure: [`crate::service::Agent::identify`]
/// reads the store and retries a token not yet bound.
pub fn identify(
    token: Option<&str>,
    is_admin: bool,
    enforced: bool,
    allocation: Option<Result<Allocation, AuthError>>,
    now_unix_ms: u64,
) -> Result<Caller, AuthError> {
    if is_admin {
        return Ok(Caller::Admin);
    }
    let Some(allocation) = allocation else {
        return match (token, enforced) {
            (_, true) => Err(AuthError::NoIdentity),
            (None, false) => Ok(Caller::Trusted),
            (Some(_), false) => Err(AuthError::UnknownToken),
        };
    };
    let allocation = allocation?;
    if allocation.expires_unix_ms.is_some_and(|e| e <= now_unix_ms) {
        return Err(AuthError::Expired);
    }
    match allocation.owner.clone() {
        Some(owner) => Ok(Caller::Pod {
            owner,
            allocation: Box::new(allocation),
        }),
        None => Err(AuthError::NotBound),
    }
}

/// Decides where `request` may run, given the caller's allocation (if any).
/// The CPU needs no token; every accelerator does.
/// (The allocation's lease was checked when the caller was identified.)
pub fn authorize(
    request: DeviceRequest,
    allocation: Option<&Allocation>,
) -> Result<Target, AuthError> {
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
        if a.device_type == DeviceType::Cpu {
            return Err(AuthError::NoAccelerator(request.to_string()));
        }
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

/// Reads token records from `<state-dir>/tokens/` on every lookup, so the
/// device plugin may add and remove them at any time.
#[derive(Clone, Debug)]
pub struct TokenStore {
    dir: Option<PathBuf>,
}

impl TokenStore {
    pub fn new(state_dir: Option<&Path>) -> Self {
        TokenStore {
            dir: state_dir.map(|d| d.join(token::TOKENS_DIR)),
        }
    }

    /// Whether every request must carry a token (a state dir is set).
    pub fn enforced(&self) -> bool {
        self.dir.is_some()
    }

    pub fn lookup(&self, token: &str) -> Result<Allocation, AuthError> {
        let Some(dir) = &self.dir else {
            return Err(AuthError::UnknownToken);
        };
        if token.is_empty() || token.len() > 4096 {
            return Err(AuthError::UnknownToken);
        }
        match token::read(dir, token) {
            Ok(rec) => Allocation::try_from(&rec),
            Err(ReadError::NotFound) => Err(AuthError::UnknownToken),
            Err(e) => Err(AuthError::BadTokenFile(e.to_string())),
        }
    }

    /// The SHA-256s of the tokens whose allocation is live at `now_unix_ms`:
    /// the record is on disk and its lease has not lapsed. `None` without a
    /// state dir (no allocations at all). An error (the directory cannot be
    /// read) tells the caller to decide nothing this time.
    pub fn live_tokens(&self, now_unix_ms: u64) -> std::io::Result<Option<HashSet<String>>> {
        let Some(dir) = &self.dir else {
            return Ok(None);
        };
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e,
            // No directory, no record: the device plugin has granted nothing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Some(HashSet::new())),
            Err(e) => return Err(e),
        };
        let mut live = HashSet::new();
        for e in entries {
            let path = e?.path();
            let Some(sha) = record_sha(&path) else {
                continue;
            };
            let rec = match std::fs::read(&path) {
                Ok(raw) => serde_json::from_slice::<TokenRecord>(&raw).ok(),
                // Removed between the listing and the read.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(_) => None,
            };
            if record_is_live(rec.as_ref(), now_unix_ms) {
                live.insert(sha);
            }
        }
        Ok(Some(live))
    }
}

/// The token SHA-256 a record file is named by (`<sha256>.json`); `None`
/// for anything else in the directory (the device plugin's temp files).
fn record_sha(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let sha = name.strip_suffix(".json")?;
    (sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit())).then(|| sha.to_string())
}

/// Whether a record on disk keeps its allocation alive. One that cannot be
/// read or parsed counts as live: its file is still there, and releasing a
/// pod's worker on a doubt would cost it its loaded models.
fn record_is_live(rec: Option<&TokenRecord>, now_unix_ms: u64) -> bool {
    rec.is_none_or(|r| r.expires_unix_ms.is_none_or(|e| e > now_unix_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(t: DeviceType, n: usize) -> Allocation {
        Allocation {
            device_type: t,
            devices: (0..n).map(|i| format!("{}", i + 4)).collect(),
            expires_unix_ms: None,
            owner: Some(TokenOwner {
                namespace: "team-a".into(),
                pod: "p".into(),
            }),
            token_sha256: "ab".repeat(32),
            resource_name: "r".into(),
            device_ids: vec![],
        }
    }

    fn req(s: &str) -> DeviceRequest {
        s.parse().expect("valid device string")
    }

    #[test]
    fn cpu_needs_no_token() {
        let t = authorize(req("cpu"), None).expect("cpu allowed");
        assert_eq!(t.device_type, DeviceType::Cpu);
        assert_eq!(
            authorize(req("auto"), None).map(|t| t.device_type),
            Ok(DeviceType::Cpu)
        );
    }

    #[test]
    fn accelerator_without_token_is_refused() {
        assert!(matches!(
            authorize(req("gpu:0"), None),
            Err(AuthError::MissingToken(_))
        ));
        assert!(matches!(
            authorize(req("npu"), None),
            Err(AuthError::MissingToken(_))
        ));
    }

    #[test]
    fn only_the_allocated_type_and_indices() {
        let a = alloc(DeviceType::Rbln, 2);
        assert_eq!(
            authorize(req("rbln:1"), Some(&a)).map(|t| t.devices),
            Ok(vec!["5".to_string()])
        );
        assert_eq!(
            authorize(req("npu:0"), Some(&a)).map(|t| t.devices),
            Ok(vec!["4".to_string()])
        );
        assert_eq!(
            authorize(req("auto"), Some(&a)).map(|t| t.devices.len()),
            Ok(2)
        );
        assert!(matches!(
            authorize(req("gpu:0"), Some(&a)),
            Err(AuthError::WrongType { .. })
        ));
        assert!(matches!(
            authorize(req("rbln:2"), Some(&a)),
            Err(AuthError::IndexOutOfRange { .. })
        ));
        let g = alloc(DeviceType::Gpu, 1);
        assert!(matches!(
            authorize(req("npu"), Some(&g)),
            Err(AuthError::WrongType { .. })
        ));
    }

    #[test]
    fn every_request_names_a_pod_unless_the_agent_runs_without_tokens() {
        let a = alloc(DeviceType::Cpu, 0);
        let id = |t: Option<&str>, admin, enforced, al: Option<Allocation>| {
            identify(t, admin, enforced, al.map(Ok), 100)
        };
        assert_eq!(id(None, false, true, None), Err(AuthError::NoIdentity));
        assert_eq!(id(Some("x"), false, true, None), Err(AuthError::NoIdentity));
        assert_eq!(id(None, false, false, None), Ok(Caller::Trusted));
        assert_eq!(
            id(Some("x"), false, false, None),
            Err(AuthError::UnknownToken)
        );
        assert_eq!(id(Some("adm"), true, true, None), Ok(Caller::Admin));
        let pod = id(Some("t"), false, true, Some(a.clone())).expect("a pod");
        assert_eq!(pod.namespace(), Some("team-a"));
        assert_eq!(pod.describe(), "team-a/p");
        let unbound = Allocation {
            owner: None,
            ..a.clone()
        };
        assert_eq!(
            id(Some("t"), false, true, Some(unbound)),
            Err(AuthError::NotBound)
        );
        let lapsed = Allocation {
            expires_unix_ms: Some(100),
            ..a
        };
        assert_eq!(
            id(Some("t"), false, true, Some(lapsed)),
            Err(AuthError::Expired)
        );
        assert_eq!(Caller::Admin.namespace(), None);
        assert_eq!(Caller::Trusted.allocation(), None);
    }

    #[test]
    fn a_cpu_slot_runs_on_the_cpu_only() {
        let slot = alloc(DeviceType::Cpu, 0);
        for d in ["auto", "cpu"] {
            assert_eq!(
                authorize(req(d), Some(&slot)).map(|t| t.device_type),
                Ok(DeviceType::Cpu)
            );
        }
        assert!(matches!(
            authorize(req("gpu:0"), Some(&slot)),
            Err(AuthError::NoAccelerator(_))
        ));
    }

    #[test]
    fn expired_token_is_refused() {
        let mut a = alloc(DeviceType::Gpu, 1);
        a.expires_unix_ms = Some(10);
        assert_eq!(
            identify(Some("t"), false, true, Some(Ok(a)), 11),
            Err(AuthError::Expired)
        );
    }

    #[test]
    fn records_are_found_by_the_hash_of_their_token() {
        let dir = tempfile::tempdir().expect("tempdir");
        let tokens = dir.path().join(token::TOKENS_DIR);
        std::fs::create_dir_all(&tokens).expect("mkdir");
        let mut rec = TokenRecord {
            version: token::RECORD_VERSION,
            token_sha256: token::token_sha256("s3cret"),
            resource_name: "furiosa.ai/rngd".into(),
            device_ids: vec!["u-1".into()],
            devices: vec![rm_crds::token::TokenDevice {
                id: "u-1".into(),
                device_type: DeviceType::Furiosa,
                index: 1,
                pci_address: None,
                nodes: vec![],
            }],
            created_unix_ms: 0,
            expires_unix_ms: None,
            owner: None,
            agent_slot: false,
        };
        let path = token::record_path(&tokens, &rec.token_sha256);
        std::fs::write(&path, serde_json::to_vec(&rec).expect("json")).expect("write");
        let store = TokenStore::new(Some(dir.path()));
        assert_eq!(
            store.lookup("s3cret"),
            Ok(Allocation {
                device_type: DeviceType::Furiosa,
                devices: vec!["npu:1".into()],
                expires_unix_ms: None,
                owner: None,
                token_sha256: token::token_sha256("s3cret"),
                resource_name: "furiosa.ai/rngd".into(),
                device_ids: vec!["u-1".into()],
            })
        );
        assert_eq!(store.lookup("other"), Err(AuthError::UnknownToken));
        rec.devices.clear();
        std::fs::write(&path, serde_json::to_vec(&rec).expect("json")).expect("write");
        assert!(matches!(
            store.lookup("s3cret"),
            Err(AuthError::BadTokenFile(m)) if m.contains("grants no devices")
        ));
    }

    #[test]
    fn live_tokens_are_the_records_on_disk_whose_lease_holds() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = TokenStore::new(Some(dir.path()));
        assert_eq!(
            store.live_tokens(100).expect("no dir yet"),
            Some(HashSet::new())
        );
        let tokens = dir.path().join(token::TOKENS_DIR);
        std::fs::create_dir_all(&tokens).expect("mkdir");
        let write = |name: &str, expires: Option<u64>| {
            let sha = token::token_sha256(name);
            let rec = TokenRecord {
                version: token::RECORD_VERSION,
                token_sha256: sha.clone(),
                resource_name: "nvidia.com/gpu".into(),
                device_ids: vec![],
                devices: vec![],
                created_unix_ms: 0,
                expires_unix_ms: expires,
                owner: None,
                agent_slot: false,
            };
            let path = token::record_path(&tokens, &sha);
            std::fs::write(path, serde_json::to_vec(&rec).expect("json")).expect("write");
            sha
        };
        let no_lease = write("a", None);
        let leased = write("b", Some(101));
        write("c", Some(100));
        // Unreadable: no proof the allocation ended.
        let garbled = token::token_sha256("d");
        std::fs::write(token::record_path(&tokens, &garbled), b"{").expect("write");
        // The device plugin's temp files are not records.
        std::fs::write(tokens.join(format!(".{no_lease}.tmp")), b"{}").expect("write");
        let live = store.live_tokens(100).expect("listed").expect("enforced");
        assert_eq!(live, HashSet::from([no_lease, leased, garbled]));
        assert_eq!(TokenStore::new(None).live_tokens(100).expect("ok"), None);
    }
}
