//! The on-disk cache: `entries/<key>/` holds finished artifacts with an
//! `entry.json` (inputs + per-file SHA-256), `tmp/` holds compiles in
//! progress. An entry appears under `entries/` only by an atomic rename after
//! its files were checksummed, so a compile that dies half-way leaves only a
//! `tmp/` directory, which is removed at the next start.

use std::collections::HashMap;
use std::fs;
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::key::{CacheKey, KeyInputs, hex};

const ENTRY_FILE: &str = "entry.json";
const LAST_USED_FILE: &str = ".last_used";

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("cache I/O error on {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("no cache entry {0}; list entries with GET /v1/cache")]
    NotFound(CacheKey),
    #[error("cache entry {0} is in use (a compile or generation holds it); retry when it is idle")]
    InUse(CacheKey),
    #[error("cache entry {key} failed verification: {reason}")]
    Corrupt { key: CacheKey, reason: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// One file of an entry and its checksum.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FileSum {
    pub path: String,
    pub size: u64,
    pub sha256: String,
}

/// What `entry.json` holds.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct EntryMeta {
    pub key: CacheKey,
    pub inputs: KeyInputs,
    pub created_unix_ms: u64,
    pub files: Vec<FileSum>,
}

impl EntryMeta {
    pub fn size(&self) -> u64 {
        self.files.iter().map(|f| f.size).sum()
    }
}

/// A cache entry as the API lists it.
#[derive(Clone, Debug, Serialize)]
pub struct EntryView {
    pub key: CacheKey,
    pub backend: String,
    pub compiler_version: String,
    pub device_type: rm_crds::DeviceType,
    pub model_digest: String,
    pub options: rm_crds::CompileOptions,
    pub size_bytes: u64,
    pub created_unix_ms: u64,
    pub last_used_unix_ms: u64,
    pub in_use: bool,
    #[serde(skip)]
    pub dir: PathBuf,
}

struct Record {
    meta: EntryMeta,
    last_used: u64,
    pins: usize,
}

struct Index {
    entries: HashMap<CacheKey, Record>,
}

/// The cache directory and its in-memory index.
pub struct CacheStore {
    root: PathBuf,
    max_bytes: u64,
    evictions: std::sync::atomic::AtomicU64,
    index: Mutex<Index>,
}

/// Keeps an entry from eviction and deletion while held.
pub struct Pin {
    store: Arc<CacheStore>,
    key: CacheKey,
}

impl Drop for Pin {
    fn drop(&mut self) {
        let mut idx = self.store.lock();
        if let Some(r) = idx.entries.get_mut(&self.key) {
            r.pins = r.pins.saturating_sub(1);
        }
    }
}

/// A directory where one compile writes its output.
pub struct Staging {
    pub dir: PathBuf,
}

impl Drop for Staging {
    fn drop(&mut self) {
        // Committed stagings were renamed away; this removes failed ones.
        if self.dir.exists() {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

fn touch(path: &Path) {
    let r = fs::File::options()
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .and_then(|f| f.set_modified(SystemTime::now()));
    if let Err(e) = r {
        tracing::debug!(path = %path.display(), error = %e, "could not record last use");
    }
}

/// SHA-256 and size of a file, streamed.
pub fn file_sha256(path: &Path) -> io::Result<(String, u64)> {
    read_sha256(fs::File::open(path)?)
}

/// The SHA-256 (hex) and length of everything `r` yields.
pub fn read_sha256(mut r: impl Read) -> io::Result<(String, u64)> {
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let got = r.read(&mut buf)?;
        if got == 0 {
            break;
        }
        h.update(&buf[..got]);
        n += got as u64;
    }
    Ok((hex(&h.finalize()), n))
}

/// Regular files under `dir`, relative paths with `/`, sorted.
pub fn list_files(dir: &Path) -> io::Result<Vec<String>> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) -> io::Result<()> {
        for e in fs::read_dir(dir)? {
            let e = e?;
            let p = e.path();
            let ft = e.file_type()?;
            if ft.is_dir() {
                walk(base, &p, out)?;
            } else if ft.is_file() || ft.is_symlink() {
                if let Ok(rel) = p.strip_prefix(base) {
                    out.push(rel.to_string_lossy().replace('\\', "/"));
                }
            }
        }
        Ok(())
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out)?;
    out.sort();
    Ok(out)
}

impl CacheStore {
    /// Opens the cache at `root`, removing leftovers of interrupted compiles
    /// and rebuilding the index from `entries/`. Entries whose files do not
    /// match their `entry.json` sizes are removed.
    pub fn open(root: &Path, max_bytes: u64) -> Result<Arc<CacheStore>, StoreError> {
        let entries_dir = root.join("entries");
        let tmp_dir = root.join("tmp");
        fs::create_dir_all(&entries_dir).map_err(io_err(&entries_dir))?;
        if tmp_dir.exists() {
            fs::remove_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        }
        fs::create_dir_all(&tmp_dir).map_err(io_err(&tmp_dir))?;
        let mut entries = HashMap::new();
        for e in fs::read_dir(&entries_dir).map_err(io_err(&entries_dir))? {
            let e = e.map_err(io_err(&entries_dir))?;
            let dir = e.path();
            match load_entry(&dir) {
                Ok((meta, last_used)) => {
                    entries.insert(
                        meta.key.clone(),
                        Record {
                            meta,
                            last_used,
                            pins: 0,
                        },
                    );
                }
                Err(reason) => {
                    tracing::warn!(dir = %dir.display(), %reason, "removing invalid cache entry");
                    let _ = fs::remove_dir_all(&dir);
                }
            }
        }
        tracing::info!(entries = entries.len(), root = %root.display(), "cache index rebuilt");
        let store = Arc::new(CacheStore {
            root: root.to_path_buf(),
            max_bytes,
            evictions: Default::default(),
            index: Mutex::new(Index { entries }),
        });
        store.evict_to_fit(None);
        Ok(store)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic while holding the lock cannot leave the map inconsistent
        // (every update is a single insert/remove), so recover the guard.
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Entries evicted since start.
    pub fn evictions(&self) -> u64 {
        self.evictions.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn max_bytes(&self) -> u64 {
        self.max_bytes
    }

    fn entry_dir(&self, key: &CacheKey) -> PathBuf {
        self.root.join("entries").join(key.as_str())
    }

    /// The entry for `key`, marked as used now.
    pub fn lookup(&self, key: &CacheKey) -> Option<EntryView> {
        let mut idx = self.lock();
        let r = idx.entries.get_mut(key)?;
        let now = now_ms();
        let dir = self.root.join("entries").join(key.as_str());
        if r.last_used != now {
            r.last_used = now;
            // Persist LRU order cheaply: the marker's mtime is the last use.
            touch(&dir.join(LAST_USED_FILE));
        }
        Some(view(r, dir))
    }

    /// Pins an entry so it is neither evicted nor deleted.
    pub fn pin(self: &Arc<Self>, key: &CacheKey) -> Result<Pin, StoreError> {
        let mut idx = self.lock();
        let r = idx
            .entries
            .get_mut(key)
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        r.pins += 1;
        Ok(Pin {
            store: self.clone(),
            key: key.clone(),
        })
    }

    pub fn list(&self) -> Vec<EntryView> {
        let idx = self.lock();
        let mut v: Vec<EntryView> = idx
            .entries
            .values()
            .map(|r| view(r, self.entry_dir(&r.meta.key)))
            .collect();
        v.sort_by(|a, b| {
            b.last_used_unix_ms
                .cmp(&a.last_used_unix_ms)
                .then(a.key.cmp(&b.key))
        });
        v
    }

    pub fn total_bytes(&self) -> u64 {
        self.lock().entries.values().map(|r| r.meta.size()).sum()
    }

    /// A fresh staging directory for a compile of `key`.
    pub fn stage(&self, key: &CacheKey) -> Result<Staging, StoreError> {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let dir = self
            .root
            .join("tmp")
            .join(format!("{key}.{}.{nanos}", std::process::id()));
        fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(Staging { dir })
    }

    /// Checksums the staged files, writes `entry.json`, syncs, and renames the
    /// staging directory into place. Blocking: call from a blocking thread.
    pub fn commit(&self, staging: Staging, inputs: KeyInputs) -> Result<EntryView, StoreError> {
        let key = CacheKey::derive(&inputs);
        let mut files = Vec::new();
        for rel in list_files(&staging.dir).map_err(io_err(&staging.dir))? {
            if rel == ENTRY_FILE || rel == LAST_USED_FILE {
                continue;
            }
            let p = staging.dir.join(&rel);
            let (sha256, size) = file_sha256(&p).map_err(io_err(&p))?;
            fs::File::open(&p)
                .and_then(|f| f.sync_all())
                .map_err(io_err(&p))?;
            files.push(FileSum {
                path: rel,
                size,
                sha256,
            });
        }
        if files.is_empty() {
            return Err(StoreError::Corrupt {
                key,
                reason: "the compile produced no files".into(),
            });
        }
        let meta = EntryMeta {
            key: key.clone(),
            inputs,
            created_unix_ms: now_ms(),
            files,
        };
        let meta_path = staging.dir.join(ENTRY_FILE);
        let json = serde_json::to_vec_pretty(&meta).unwrap_or_default();
        let mut f = fs::File::create(&meta_path).map_err(io_err(&meta_path))?;
        f.write_all(&json)
            .and_then(|_| f.sync_all())
            .map_err(io_err(&meta_path))?;
        touch(&staging.dir.join(LAST_USED_FILE));
        let dest = self.entry_dir(&key);
        {
            let mut idx = self.lock();
            if let Some(r) = idx.entries.get(&key) {
                // Someone else committed the same key first; theirs stands.
                return Ok(view(r, dest));
            }
            if dest.exists() {
                fs::remove_dir_all(&dest).map_err(io_err(&dest))?;
            }
            fs::rename(&staging.dir, &dest).map_err(io_err(&dest))?;
            if let Some(parent) = dest.parent() {
                let _ = fs::File::open(parent).and_then(|d| d.sync_all());
            }
            idx.entries.insert(
                key.clone(),
                Record {
                    meta,
                    last_used: now_ms(),
                    pins: 0,
                },
            );
        }
        self.evict_to_fit(Some(&key));
        let idx = self.lock();
        match idx.entries.get(&key) {
            Some(r) => Ok(view(r, dest)),
            None => Err(StoreError::NotFound(key)),
        }
    }

    /// Recomputes every file's checksum against `entry.json`. Blocking.
    pub fn verify(&self, key: &CacheKey) -> Result<(), StoreError> {
        let meta = {
            let idx = self.lock();
            idx.entries
                .get(key)
                .map(|r| r.meta.clone())
                .ok_or_else(|| StoreError::NotFound(key.clone()))?
        };
        let dir = self.entry_dir(key);
        for f in &meta.files {
            let p = dir.join(&f.path);
            let (sha, size) = file_sha256(&p).map_err(|e| StoreError::Corrupt {
                key: key.clone(),
                reason: format!("{}: {e}", f.path),
            })?;
            if sha != f.sha256 || size != f.size {
                return Err(StoreError::Corrupt {
                    key: key.clone(),
                    reason: format!("{} does not match its recorded checksum", f.path),
                });
            }
        }
        Ok(())
    }

    /// Deletes an entry that is not in use.
    pub fn delete(&self, key: &CacheKey) -> Result<u64, StoreError> {
        let mut idx = self.lock();
        let r = idx
            .entries
            .get(key)
            .ok_or_else(|| StoreError::NotFound(key.clone()))?;
        if r.pins > 0 {
            return Err(StoreError::InUse(key.clone()));
        }
        let size = r.meta.size();
        idx.entries.remove(key);
        drop(idx);
        let dir = self.entry_dir(key);
        fs::remove_dir_all(&dir).map_err(io_err(&dir))?;
        Ok(size)
    }

    /// Removes an entry found corrupt, whatever its pins.
    pub fn quarantine(&self, key: &CacheKey) {
        self.lock().entries.remove(key);
        let _ = fs::remove_dir_all(self.entry_dir(key));
    }

    /// Evicts least-recently-used, unpinned entries until the total fits the
    /// limit. `keep` (the entry just committed) is evicted last of all.
    pub fn evict_to_fit(&self, keep: Option<&CacheKey>) -> Vec<CacheKey> {
        let mut evicted = Vec::new();
        loop {
            let mut idx = self.lock();
            let total: u64 = idx.entries.values().map(|r| r.meta.size()).sum();
            if total <= self.max_bytes {
                break;
            }
            let victim = idx
                .entries
                .values()
                .filter(|r| r.pins == 0 && Some(&r.meta.key) != keep)
                .min_by(|a, b| {
                    a.last_used
                        .cmp(&b.last_used)
                        .then(a.meta.created_unix_ms.cmp(&b.meta.created_unix_ms))
                })
                .map(|r| r.meta.key.clone());
            let Some(victim) = victim else {
                tracing::warn!(
                    total,
                    max = self.max_bytes,
                    "cache over its size limit but every other entry is in use"
                );
                break;
            };
            idx.entries.remove(&victim);
            drop(idx);
            let dir = self.entry_dir(&victim);
            if let Err(e) = fs::remove_dir_all(&dir) {
                tracing::warn!(key = %victim, error = %e, "could not remove evicted entry");
            }
            tracing::info!(key = %victim, "evicted cache entry (least recently used)");
            self.evictions
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            evicted.push(victim);
        }
        evicted
    }
}

fn view(r: &Record, dir: PathBuf) -> EntryView {
    EntryView {
        key: r.meta.key.clone(),
        backend: r.meta.inputs.backend.clone(),
        compiler_version: r.meta.inputs.compiler_version.clone(),
        device_type: r.meta.inputs.device_type,
        model_digest: r.meta.inputs.model_digest.clone(),
        options: r.meta.inputs.options.clone(),
        size_bytes: r.meta.size(),
        created_unix_ms: r.meta.created_unix_ms,
        last_used_unix_ms: r.last_used,
        in_use: r.pins > 0,
        dir,
    }
}

/// Reads and checks an entry directory at start-up: `entry.json` parses, its
/// key matches the directory name and its inputs, every file has its size.
fn load_entry(dir: &Path) -> Result<(EntryMeta, u64), String> {
    let name = dir
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    let raw = fs::read(dir.join(ENTRY_FILE)).map_err(|e| format!("no {ENTRY_FILE}: {e}"))?;
    let meta: EntryMeta =
        serde_json::from_slice(&raw).map_err(|e| format!("bad {ENTRY_FILE}: {e}"))?;
    if meta.key.as_str() != name || CacheKey::derive(&meta.inputs) != meta.key {
        return Err("key does not match the directory name or the recorded inputs".into());
    }
    for f in &meta.files {
        let len = fs::metadata(dir.join(&f.path))
            .map_err(|e| format!("{}: {e}", f.path))?
            .len();
        if len != f.size {
            return Err(format!("{} has {len} bytes, expected {}", f.path, f.size));
        }
    }
    let last_used = fs::metadata(dir.join(LAST_USED_FILE))
        .or_else(|_| fs::metadata(dir.join(ENTRY_FILE)))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    Ok((meta, last_used))
}
