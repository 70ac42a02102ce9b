//! Allocation tokens: for every Allocate a random token is minted and its
//! record (`rm_crds::token`, the format the node agent reads) is written to
//! `<state dir>/tokens/<sha256(token)>.json`. Records are keyed by the token's
//! hash here too, so the token itself never touches the disk.
//!
//! Writes are atomic (temporary file, then rename in the same directory), so a
//! reader sees a whole record or none. They are not fsynced: after a crash of
//! the node the containers are created anew and Allocate mints new tokens, and
//! an fsync would cost Allocate milliseconds.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

pub use rm_crds::token::{
    RECORD_VERSION, TOKENS_DIR, TokenDevice, TokenOwner, TokenRecord, token_sha256,
};

use crate::discovery::Device;
use crate::error::{Error, Result};

/// The record of one allocation's physical devices.
pub fn token_device(d: &Device) -> TokenDevice {
    TokenDevice {
        id: d.id.clone(),
        device_type: d.device_type,
        index: d.index,
        pci_address: d.pci_address.clone(),
        nodes: d
            .nodes
            .iter()
            .map(|p| p.to_string_lossy().into_owned())
            .collect(),
    }
}

/// token hash → (resource name, device IDs) of the records on disk.
type Index = HashMap<String, (String, Vec<String>)>;

#[derive(Debug)]
pub struct TokenStore {
    dir: PathBuf,
    // An in-memory copy of who holds what, so Allocate does not re-read every
    // record; the mutex also serialises record + supersede so two concurrent
    // Allocates of the same device cannot both survive.
    index: Mutex<Index>,
}

impl TokenStore {
    /// Opens (creating, mode 0700) `<state_dir>/tokens`.
    pub fn open(state_dir: &Path) -> Result<Self> {
        let dir = state_dir.join(TOKENS_DIR);
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .map_err(|source| Error::State {
                path: dir.clone(),
                source,
            })?;
        let store = TokenStore {
            dir,
            index: Mutex::new(Index::new()),
        };
        let existing: Index = store
            .list()?
            .into_iter()
            .map(|r| (r.token_sha256, (r.resource_name, r.device_ids)))
            .collect();
        *store.lock_index() = existing;
        Ok(store)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A fresh token: 128 bits from the OS, hex.
    pub fn mint() -> Result<String> {
        let mut bytes = [0u8; 16];
        getrandom::fill(&mut bytes).map_err(|e| Error::State {
            path: PathBuf::from("getrandom"),
            source: std::io::Error::other(e.to_string()),
        })?;
        Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
    }

    pub fn now_ms() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }

    /// Writes the record and removes older tokens of the same resource that
    /// hold any of its devices: the kubelet never gives one device ID to two
    /// live containers, so an older holder is gone.
    pub fn record(&self, rec: &TokenRecord) -> Result<Vec<String>> {
        let mut index = self.lock_index();
        let superseded: Vec<String> = index
            .iter()
            .filter(|(token, (resource, ids))| {
                **token != rec.token_sha256
                    && *resource == rec.resource_name
                    && ids.iter().any(|id| rec.device_ids.contains(id))
            })
            .map(|(token, _)| token.clone())
            .collect();
        self.write(rec)?;
        index.insert(
            rec.token_sha256.clone(),
            (rec.resource_name.clone(), rec.device_ids.clone()),
        );
        for t in &superseded {
            remove_file(&self.path_of(t))?;
            index.remove(t);
        }
        Ok(superseded)
    }

    fn lock_index(&self) -> std::sync::MutexGuard<'_, Index> {
        // A panic while holding the lock leaves the map usable: every change
        // to it is a single insert or remove.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self, rec: &TokenRecord) -> Result<()> {
        let json = serde_json::to_vec_pretty(rec).map_err(|source| Error::TokenRecord {
            path: self.path_of(&rec.token_sha256),
            source,
        })?;
        let tmp = self.dir.join(format!(".{}.tmp", rec.token_sha256));
        let state_err = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::State { path, source }
        };
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .map_err(state_err(&tmp))?;
        f.write_all(&json).map_err(state_err(&tmp))?;
        drop(f);
        let dest = self.path_of(&rec.token_sha256);
        std::fs::rename(&tmp, &dest).map_err(state_err(&dest))
    }

    /// The record file of a token hash.
    pub fn path_of(&self, token_sha256: &str) -> PathBuf {
        rm_crds::token::record_path(&self.dir, token_sha256)
    }

    /// All readable records; malformed files are skipped with a warning.
    pub fn list(&self) -> Result<Vec<TokenRecord>> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| Error::State {
            path: self.dir.clone(),
            source,
        })?;
        let mut out = Vec::new();
        for e in entries.filter_map(std::result::Result::ok) {
            let path = e.path();
            let name = e.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.starts_with('.') || !name.ends_with(".json") {
                continue;
            }
            let parsed = std::fs::read(&path)
                .ok()
                .map(|b| serde_json::from_slice::<TokenRecord>(&b));
            match parsed {
                Some(Ok(r)) => out.push(r),
                Some(Err(source)) => {
                    tracing::warn!(error = %Error::TokenRecord { path: path.clone(), source }, "skipping token record");
                }
                None => {} // Removed between listing and reading.
            }
        }
        out.sort_by_key(|a| a.created_unix_ms);
        Ok(out)
    }

    /// Rewrites a record that is still held (binding, lease); a record
    /// removed meanwhile (superseded, collected) stays removed.
    pub fn update(&self, rec: &TokenRecord) -> Result<()> {
        let index = self.lock_index();
        if !index.contains_key(&rec.token_sha256) {
            return Ok(());
        }
        self.write(rec)
    }

    /// The record of a token hash, if it is on disk and readable.
    pub fn get(&self, token_sha256: &str) -> Option<TokenRecord> {
        let raw = std::fs::read(self.path_of(token_sha256)).ok()?;
        serde_json::from_slice(&raw).ok()
    }

    /// Removes the record of a token hash.
    pub fn remove(&self, token_sha256: &str) -> Result<()> {
        let mut index = self.lock_index();
        remove_file(&self.path_of(token_sha256))?;
        index.remove(token_sha256);
        Ok(())
    }
}

fn remove_file(path: &Path) -> Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(Error::State {
            path: path.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(token: &str, ids: &[&str]) -> TokenRecord {
        TokenRecord {
            version: RECORD_VERSION,
            token_sha256: token.into(),
            resource_name: "nvidia.com/gpu".into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
            devices: vec![],
            created_unix_ms: TokenStore::now_ms(),
            expires_unix_ms: None,
            owner: None,
            agent_slot: false,
        }
    }

    #[test]
    fn records_are_written_whole_private_and_superseded_by_newer_holders() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = TokenStore::open(tmp.path()).expect("open");
        store.record(&rec("t1", &["a", "b"])).expect("t1");
        store.record(&rec("t2", &["c"])).expect("t2");
        let mode = std::fs::metadata(store.path_of("t1")).expect("meta");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(mode.permissions().mode() & 0o777, 0o600);
        let gone = store.record(&rec("t3", &["b"])).expect("t3");
        assert_eq!(gone, ["t1"]);
        let left: Vec<String> = store
            .list()
            .expect("list")
            .into_iter()
            .map(|r| r.token_sha256)
            .collect();
        assert_eq!(left.len(), 2);
        assert!(left.contains(&"t2".to_string()) && left.contains(&"t3".to_string()));
        assert!(!std::fs::read_dir(store.dir()).expect("dir").any(|e| {
            e.expect("entry")
                .file_name()
                .to_string_lossy()
                .ends_with(".tmp")
        }));
    }

    #[test]
    fn updates_never_resurrect_a_removed_record() {
        let tmp = tempfile::tempdir().expect("tmp");
        let store = TokenStore::open(tmp.path()).expect("open");
        let mut r = rec("t1", &["a"]);
        store.record(&r).expect("t1");
        r.expires_unix_ms = Some(5);
        store.update(&r).expect("update");
        assert_eq!(store.get("t1").and_then(|r| r.expires_unix_ms), Some(5));
        store.remove("t1").expect("remove");
        store.update(&r).expect("update after remove");
        assert!(store.get("t1").is_none());
    }

    #[test]
    fn a_reopened_store_still_supersedes_records_written_before() {
        let tmp = tempfile::tempdir().expect("tmp");
        TokenStore::open(tmp.path())
            .expect("open")
            .record(&rec("old", &["a"]))
            .expect("old");
        let store = TokenStore::open(tmp.path()).expect("reopen");
        assert_eq!(store.record(&rec("new", &["a"])).expect("new"), ["old"]);
    }

    #[test]
    fn minted_tokens_are_distinct_hex() {
        let a = TokenStore::mint().expect("a");
        let b = TokenStore::mint().expect("b");
        assert_eq!(a.len(), 32);
        assert!(a.bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
