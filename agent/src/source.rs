//! Model sources and their content digests.
//!
//! A model comes from a node path (a file or a directory), from files the
//! client uploaded as blobs (`PUT /v1/blobs/<sha256>`), or from a hub id. Its
//! digest is `sha256:` over the sorted list of (relative path, file SHA-256),
//! so the same files give the same digest whichever way they arrived. File
//! hashes are memoised by (path, size, mtime, inode): registering an unchanged
//! model again does not re-read it.
//!
//! Node paths are untrusted input: a path must lie inside a directory the
//! cluster operator allowed (`--model-path-allow`; none allowed means no node
//! paths at all), every file is opened beneath that directory without
//! following a link out of it (`openat2(RESOLVE_BENEATH)`), and only regular
//! files are read (a FIFO or `/dev/zero` would hang a thread). Files on the
//! node can change after registration, so a compile re-hashes them first and
//! checks afterwards that they were not replaced while it ran
//! ([`ModelRegistry::verify`], [`ModelRegistry::unchanged`]).

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Component, Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::cache::key::hex;
use crate::cache::store::{list_files, read_sha256};

/// Where a model comes from, as a request names it. Exactly one field is set.
#[derive(Clone, Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSource {
    /// Absolute path on the node: a `.gguf` file or a model directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// Files uploaded before with `PUT /v1/blobs/<sha256>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub files: Option<Vec<BlobFile>>,
    /// Hugging Face hub id (`org/name`), fetched by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hub: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BlobFile {
    /// Relative path inside the model directory, e.g. `config.json`.
    pub path: String,
    pub sha256: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ModelFormat {
    Gguf,
    Safetensors,
}

impl ModelFormat {
    /// The name on the wire and in manifests.
    pub fn as_str(self) -> &'static str {
        match self {
            ModelFormat::Gguf => "gguf",
            ModelFormat::Safetensors => "safetensors",
        }
    }
}

/// A model the agent can read, with its digest.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct ResolvedModel {
    /// `sha256:<hex>`.
    pub digest: String,
    /// The `.gguf` file, or the directory with `config.json` and safetensors.
    pub path: PathBuf,
    pub format: ModelFormat,
    pub files: usize,
    pub bytes: u64,
    /// The directory its files may not leave: an allowed node root, or the
    /// agent's own `models/` or `hub/`.
    #[serde(skip)]
    pub root: PathBuf,
    /// Its files are on the node (`source.path`), where others may change
    /// them: a compile re-hashes them first.
    #[serde(skip)]
    pub on_node: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("bad model source: {0}")]
    Invalid(String),
    #[error("model path {path} cannot be read: {reason}")]
    Unreadable { path: String, reason: String },
    #[error(
        "no model found at {0}: expected a .gguf file, or a directory with config.json and *.safetensors (or one .gguf)"
    )]
    NoModel(String),
    #[error("blob {0} was not uploaded; PUT its bytes to /v1/blobs/{0} first")]
    MissingBlob(String),
    #[error("unknown model {0}; register it with POST /v1/models first")]
    UnknownModel(String),
    #[error("path {0} is outside the directories this agent may read models from")]
    NotAllowed(String),
    #[error(
        "this agent reads no models from node paths: the cluster operator allows directories with --model-path-allow (chart value agent.modelPathAllow); or upload the files (\"files\") or name a hub model (\"hub\")"
    )]
    NoPathsAllowed,
    #[error(
        "model file {0} is not a regular file (a FIFO, device, socket or directory); model files must be regular files"
    )]
    NotRegular(String),
    #[error(
        "the model files at {path} changed since they were registered (now {now}); register the path again to use what it holds now"
    )]
    Changed { path: String, now: String },
    #[error("cannot fetch hub model {id}: {reason}")]
    Hub { id: String, reason: String },
    #[error("blob upload failed: {0}")]
    Upload(String),
    #[error(transparent)]
    Quota(#[from] crate::quota::QuotaError),
    #[error(
        "hub downloads on this node may take {budget} bytes (rm-agent --hub-max-bytes) and the ones in use leave no room for this one ({written} bytes written so far): retry later, or upload the files (\"files\")"
    )]
    HubFull { budget: u64, written: u64 },
}

/// Asked while a hub download runs, with the bytes it wrote so far: an error
/// stops the download (see `fetch_hub`).
pub type DownloadWatch = Box<dyn Fn(u64) -> Result<(), crate::quota::QuotaError> + Send + 'static>;

impl SourceError {
    pub fn http_status(&self) -> u16 {
        match self {
            SourceError::Invalid(_) | SourceError::NoModel(_) => 400,
            SourceError::Unreadable { .. } => 422,
            SourceError::MissingBlob(_) | SourceError::UnknownModel(_) => 404,
            SourceError::NotAllowed(_) | SourceError::NoPathsAllowed => 403,
            SourceError::NotRegular(_) => 422,
            SourceError::Changed { .. } => 409,
            SourceError::Hub { .. } => 502,
            SourceError::Upload(_) => 400,
            SourceError::Quota(e) => e.http_status(),
            SourceError::HubFull { .. } => 507,
        }
    }
}

/// What identifies a file's version without reading it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct FileStamp {
    path: PathBuf,
    size: u64,
    mtime_ns: i128,
    ino: u64,
}

/// Resolves sources to digested models and keeps the ones registered.
pub struct ModelRegistry {
    blobs_dir: PathBuf,
    models_dir: PathBuf,
    hub_dir: PathBuf,
    allowed_roots: Vec<PathBuf>,
    hashes: Mutex<HashMap<FileStamp, String>>,
    models: Mutex<HashMap<String, ResolvedModel>>,
    /// Bytes all hub downloads together may take (`--hub-max-bytes`):
    /// beyond, the least recently registered ones not in use are removed.
    hub_max: u64,
    /// Models a compile is reading (digest → count): never evicted.
    reading: Mutex<HashMap<String, usize>>,
    hub_evictions: std::sync::atomic::AtomicU64,
}

/// Keeps a model's files from eviction while it lives (see
/// [`ModelRegistry::hold`]).
pub struct ModelHold {
    registry: std::sync::Arc<ModelRegistry>,
    digest: String,
}

impl Drop for ModelHold {
    fn drop(&mut self) {
        let mut r = self
            .registry
            .reading
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = r.get_mut(&self.digest) {
            *n -= 1;
            if *n == 0 {
                r.remove(&self.digest);
            }
        }
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// A relative path without `..`, absolute parts or hidden components.
fn safe_relative(p: &str) -> Option<PathBuf> {
    let path = Path::new(p);
    if p.is_empty() || p.len() > 1024 {
        return None;
    }
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::Normal(s) if !s.to_string_lossy().starts_with('.') => out.push(s),
            _ => return None,
        }
    }
    Some(out)
}

/// Opens `file` for reading without leaving `root` on the way, links
/// included, and only if it is a regular file. Opened non-blocking, so a FIFO
/// planted under a model's name is refused instead of waiting for a writer.
fn open_beneath(root: &Path, file: &Path) -> Result<(fs::File, fs::Metadata), SourceError> {
    use rustix::fs::{Mode, OFlags, ResolveFlags};
    let shown = file.display().to_string();
    let unreadable = |e: std::io::Error| SourceError::Unreadable {
        path: shown.clone(),
        reason: e.to_string(),
    };
    let rel = file
        .strip_prefix(root)
        .map_err(|_| SourceError::NotAllowed(shown.clone()))?;
    let dir = fs::File::open(root).map_err(unreadable)?;
    let flags = OFlags::RDONLY | OFlags::NONBLOCK | OFlags::CLOEXEC | OFlags::NOCTTY;
    let resolve = ResolveFlags::BENEATH | ResolveFlags::NO_MAGICLINKS;
    let mut tries = 0;
    let f = loop {
        match rustix::fs::openat2(&dir, rel, flags, Mode::empty(), resolve) {
            Ok(fd) => break fs::File::from(fd),
            // A rename elsewhere raced the lookup: the kernel asks to retry.
            Err(rustix::io::Errno::AGAIN) if tries < 8 => tries += 1,
            Err(rustix::io::Errno::XDEV) => {
                return Err(SourceError::NotAllowed(format!(
                    "{shown} (a symbolic link leads out of {})",
                    root.display()
                )));
            }
            // Kernels before 5.6: resolve the links ourselves, then refuse a
            // link in the last component (the check and the open race only
            // against a writer inside the allowed root).
            Err(rustix::io::Errno::NOSYS) => {
                let canon = fs::canonicalize(file).map_err(unreadable)?;
                if !canon.starts_with(root) {
                    return Err(SourceError::NotAllowed(format!(
                        "{shown} (a symbolic link leads out of {})",
                        root.display()
                    )));
                }
                break fs::OpenOptions::new()
                    .read(true)
                    .custom_flags(libc_flags())
                    .open(&canon)
                    .map_err(unreadable)?;
            }
            Err(e) => return Err(unreadable(e.into())),
        }
    };
    let meta = f.metadata().map_err(unreadable)?;
    if !meta.is_file() {
        return Err(SourceError::NotRegular(shown));
    }
    Ok((f, meta))
}

/// `O_NOFOLLOW | O_NONBLOCK` for the fallback open.
fn libc_flags() -> i32 {
    (rustix::fs::OFlags::NOFOLLOW | rustix::fs::OFlags::NONBLOCK).bits() as i32
}

fn stamp_of(path: &Path, m: &fs::Metadata) -> FileStamp {
    FileStamp {
        path: path.to_path_buf(),
        size: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
        ino: m.ino(),
    }
}

/// The model digest over (relative path, sha256) pairs.
pub fn digest_of(files: &[(String, String)]) -> String {
    let mut sorted: Vec<&(String, String)> = files.iter().collect();
    sorted.sort();
    let mut h = Sha256::new();
    for (p, s) in sorted {
        h.update(p.as_bytes());
        h.update([0]);
        h.update(s.as_bytes());
        h.update([b'\n']);
    }
    format!("sha256:{}", hex(&h.finalize()))
}

/// (relative name in the digest, file to read).
type DigestFiles = Vec<(String, PathBuf)>;

/// What a file or directory holds, and the files that make up its digest.
fn detect(path: &Path) -> Result<(ModelFormat, PathBuf, DigestFiles), SourceError> {
    let shown = path.display().to_string();
    let meta = fs::metadata(path).map_err(|e| SourceError::Unreadable {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    if meta.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok((
                ModelFormat::Gguf,
                path.to_path_buf(),
                vec![("model.gguf".into(), path.to_path_buf())],
            ));
        }
        return Err(SourceError::NoModel(shown));
    }
    let files: Vec<String> = list_files(path)
        .map_err(|e| SourceError::Unreadable {
            path: shown.clone(),
            reason: e.to_string(),
        })?
        .into_iter()
        .filter(|f| !f.split('/').any(|c| c.starts_with('.')))
        .collect();
    let with_paths = |keep: &dyn Fn(&str) -> bool| {
        files
            .iter()
            .filter(|f| keep(f))
            .map(|f| (f.clone(), path.join(f)))
            .collect::<Vec<_>>()
    };
    let has_config = files.iter().any(|f| f == "config.json");
    let has_st = files.iter().any(|f| f.ends_with(".safetensors"));
    if has_config && has_st {
        // Weights in other formats (.bin, .gguf) are not read; leave them out
        // of the digest so that adding one does not change the key.
        let keep = |f: &str| !(f.ends_with(".bin") || f.ends_with(".gguf") || f.ends_with(".pt"));
        return Ok((
            ModelFormat::Safetensors,
            path.to_path_buf(),
            with_paths(&keep),
        ));
    }
    let ggufs: Vec<&String> = files.iter().filter(|f| f.ends_with(".gguf")).collect();
    match ggufs.as_slice() {
        [one] => {
            let file = path.join(one);
            Ok((
                ModelFormat::Gguf,
                file.clone(),
                vec![("model.gguf".into(), file)],
            ))
        }
        [] => Err(SourceError::NoModel(shown)),
        _ => Err(SourceError::Invalid(format!(
            "{shown} holds several .gguf files; name the one to use in \"path\""
        ))),
    }
}

impl ModelRegistry {
    pub fn new(cache_dir: &Path, allowed_roots: Vec<PathBuf>) -> std::io::Result<Self> {
        // Compared with canonical paths: a root given through a link must
        // still match what it resolves to.
        let allowed_roots = allowed_roots
            .into_iter()
            .filter_map(|r| match fs::canonicalize(&r) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::warn!(root = %r.display(), error = %e, "--model-path-allow directory cannot be read; ignored");
                    None
                }
            })
            .collect();
        let reg = ModelRegistry {
            blobs_dir: cache_dir.join("blobs"),
            models_dir: cache_dir.join("models"),
            hub_dir: cache_dir.join("hub"),
            allowed_roots,
            hashes: Mutex::new(HashMap::new()),
            models: Mutex::new(HashMap::new()),
            hub_max: u64::MAX,
            reading: Mutex::new(HashMap::new()),
            hub_evictions: std::sync::atomic::AtomicU64::new(0),
        };
        fs::create_dir_all(&reg.blobs_dir)?;
        fs::create_dir_all(&reg.models_dir)?;
        // Models assembled from uploads survive restarts: re-register them.
        for e in fs::read_dir(&reg.models_dir)?.flatten() {
            if let Ok(m) = reg.resolve_path(&reg.models_dir, &e.path(), false) {
                reg.remember(m);
            }
        }
        Ok(reg)
    }

    fn remember(&self, m: ResolvedModel) {
        self.models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(m.digest.clone(), m);
    }

    /// A small file of a model directory (a tokenizer or its config), read
    /// beneath the model's root like the weights; `None` when the model is a
    /// single file or has no such file.
    pub fn read_model_file(
        &self,
        m: &ResolvedModel,
        name: &str,
        max_bytes: u64,
    ) -> Result<Option<Vec<u8>>, SourceError> {
        use std::io::Read;
        if m.format != ModelFormat::Safetensors {
            return Ok(None);
        }
        let path = m.path.join(name);
        if !path.is_file() {
            return Ok(None);
        }
        let (f, meta) = open_beneath(&m.root, &path)?;
        if meta.len() > max_bytes {
            return Err(SourceError::Invalid(format!(
                "{} is {} bytes, more than the {max_bytes} read for it",
                path.display(),
                meta.len()
            )));
        }
        let mut out = Vec::with_capacity(meta.len() as usize);
        f.take(max_bytes)
            .read_to_end(&mut out)
            .map_err(|e| SourceError::Unreadable {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(Some(out))
    }

    /// A model registered earlier, by `sha256:<hex>`.
    pub fn get(&self, digest: &str) -> Result<ResolvedModel, SourceError> {
        self.models
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
            .cloned()
            .ok_or_else(|| SourceError::UnknownModel(digest.to_string()))
    }

    /// The SHA-256 and size of one model file under `root`; `memo` lets an
    /// unchanged file (same stamp) skip the read.
    fn hash_file(
        &self,
        root: &Path,
        path: &Path,
        memo: bool,
    ) -> Result<(String, u64, FileStamp), SourceError> {
        let (f, meta) = open_beneath(root, path)?;
        let stamp = stamp_of(path, &meta);
        let hashes = || self.hashes.lock().unwrap_or_else(|p| p.into_inner());
        if memo && let Some(h) = hashes().get(&stamp) {
            return Ok((h.clone(), stamp.size, stamp));
        }
        let (h, n) = read_sha256(f).map_err(|e| SourceError::Unreadable {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        hashes().insert(stamp.clone(), h.clone());
        Ok((h, n, stamp))
    }

    /// Digests a model directory or file under `root` (blocking: may read
    /// the files once).
    fn resolve_path(
        &self,
        root: &Path,
        path: &Path,
        on_node: bool,
    ) -> Result<ResolvedModel, SourceError> {
        Ok(self.hash_model(root, path, on_node, true)?.0)
    }

    fn hash_model(
        &self,
        root: &Path,
        path: &Path,
        on_node: bool,
        memo: bool,
    ) -> Result<(ResolvedModel, Vec<FileStamp>), SourceError> {
        let (format, model_path, files) = detect(path)?;
        let mut sums = Vec::with_capacity(files.len());
        let mut stamps = Vec::with_capacity(files.len());
        let mut bytes = 0;
        for (rel, abs) in &files {
            let (h, n, stamp) = self.hash_file(root, abs, memo)?;
            bytes += n;
            sums.push((rel.clone(), h));
            stamps.push(stamp);
        }
        let m = ResolvedModel {
            digest: digest_of(&sums),
            path: model_path,
            format,
            files: files.len(),
            bytes,
            root: root.to_path_buf(),
            on_node,
        };
        Ok((m, stamps))
    }

    /// Re-reads a node model's files before a compile uses them: answers
    /// their stamps when they still hold the registered digest. Files in the
    /// agent's own store are answered without a read (only the agent writes
    /// there, and only verified bytes).
    pub fn verify(&self, m: &ResolvedModel) -> Result<Vec<FileStamp>, SourceError> {
        if !m.on_node {
            return Ok(Vec::new());
        }
        let (now, stamps) = self.hash_model(&m.root, &m.path, true, false)?;
        if now.digest != m.digest {
            return Err(SourceError::Changed {
                path: m.path.display().to_string(),
                now: now.digest,
            });
        }
        Ok(stamps)
    }

    /// After a compile: the files `verify` read are still those (same inode,
    /// size and modification time), so the compile read what was verified.
    pub fn unchanged(&self, m: &ResolvedModel, stamps: &[FileStamp]) -> Result<(), SourceError> {
        for s in stamps {
            let same = open_beneath(&m.root, &s.path)
                .is_ok_and(|(_, meta)| stamp_of(&s.path, &meta) == *s);
            if !same {
                return Err(SourceError::Changed {
                    path: s.path.display().to_string(),
                    now: "files replaced while the compile read them".into(),
                });
            }
        }
        Ok(())
    }

    /// The allowed root a node path lies in (canonical), with the path.
    fn check_allowed(&self, path: &Path) -> Result<(PathBuf, PathBuf), SourceError> {
        let shown = path.display().to_string();
        if !path.is_absolute() {
            return Err(SourceError::Invalid(format!(
                "model path {shown:?} must be absolute"
            )));
        }
        if self.allowed_roots.is_empty() {
            return Err(SourceError::NoPathsAllowed);
        }
        let canon = fs::canonicalize(path).map_err(|e| SourceError::Unreadable {
            path: shown.clone(),
            reason: e.to_string(),
        })?;
        let root = self
            .allowed_roots
            .iter()
            .find(|r| canon.starts_with(r))
            .ok_or(SourceError::NotAllowed(shown))?;
        Ok((root.clone(), canon))
    }

    /// Sets the hub downloads' budget (`--hub-max-bytes`).
    pub fn with_hub_budget(mut self, bytes: u64) -> Self {
        self.hub_max = bytes;
        self
    }

    /// Hub downloads removed to make room since start.
    pub fn hub_evictions(&self) -> u64 {
        self.hub_evictions
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Keeps `digest`'s files while a compile reads them.
    pub fn hold(self: &std::sync::Arc<Self>, digest: &str) -> ModelHold {
        *self
            .reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(digest.to_string())
            .or_default() += 1;
        ModelHold {
            registry: self.clone(),
            digest: digest.to_string(),
        }
    }

    /// Hub downloads other than `except`: (dir, when last registered, or
    /// `None` while still downloading, bytes), least recently registered
    /// first.
    #[allow(clippy::type_complexity)]
    fn hub_downloads(&self, except: &Path) -> Vec<(PathBuf, Option<std::time::SystemTime>, u64)> {
        let Ok(entries) = fs::read_dir(&self.hub_dir) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .flatten()
            .map(|e| e.path())
            .filter(|p| p.is_dir() && p != except)
            .map(|p| {
                let used = fs::metadata(p.join(".complete"))
                    .and_then(|m| m.modified())
                    .ok();
                let bytes = dir_bytes(&p);
                (p, used, bytes)
            })
            .collect();
        out.sort_by_key(|(_, used, _)| *used);
        out
    }

    /// Makes room for a download that has written `written` bytes into
    /// `dir`: removes the least recently registered hub downloads that no
    /// compile reads until all (downloads under way included) fit the
    /// budget. Their models are forgotten (registering them again downloads
    /// them again); entries compiled from them stay.
    /// Bytes of the hub downloads other than `except`.
    fn hub_bytes(&self, except: &Path) -> u64 {
        self.hub_downloads(except).iter().map(|(_, _, b)| b).sum()
    }

    fn hub_room(&self, dir: &Path, written: u64) -> Result<(), SourceError> {
        let downloads = self.hub_downloads(dir);
        let mut total: u64 = downloads.iter().map(|(_, _, b)| b).sum::<u64>() + written;
        if total <= self.hub_max {
            return Ok(());
        }
        let reading = self.models_being_read();
        let mut doomed = Vec::new();
        {
            let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
            for (old, used, bytes) in downloads {
                if total <= self.hub_max {
                    break;
                }
                if used.is_none() {
                    continue; // another download under way
                }
                let Some((trash, _)) = retire(&mut models, std::slice::from_ref(&old), &reading)
                else {
                    continue;
                };
                if trash.is_empty() {
                    continue;
                }
                total = total.saturating_sub(bytes);
                self.hub_evictions
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::info!(dir = %old.display(), bytes, "hub download evicted to make room");
                doomed.extend(trash);
            }
        }
        drop(doomed);
        if total > self.hub_max {
            return Err(SourceError::HubFull {
                budget: self.hub_max,
                written,
            });
        }
        Ok(())
    }

    /// Uploaded blobs: (sha256, bytes, last used), least recently used
    /// first. Temporary files of uploads under way are not listed (their
    /// bytes are promised in the agent's ledger).
    fn blobs(&self) -> Vec<(String, u64, std::time::SystemTime)> {
        let Ok(entries) = fs::read_dir(&self.blobs_dir) else {
            return Vec::new();
        };
        let mut out: Vec<_> = entries
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().to_string_lossy().to_string();
                let m = e.metadata().ok()?;
                (is_sha256_hex(&name) && m.is_file())
                    .then(|| (name, m.len(), m.modified().unwrap_or(std::time::UNIX_EPOCH)))
            })
            .collect();
        out.sort_by_key(|(_, _, used)| *used);
        out
    }

    /// Bytes of all uploaded blobs.
    pub fn blobs_bytes(&self) -> u64 {
        self.blobs().iter().map(|(_, b, _)| b).sum()
    }

    /// Marks a blob used now (it is evicted last).
    pub fn touch_blob(&self, sha256: &str) {
        if let Ok(p) = self.blob_path(sha256) {
            let _ = fs::File::options()
                .write(true)
                .open(p)
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
        }
    }

    /// Makes room for `need` more bytes of uploads within `budget`: removes
    /// the least recently used blobs, with the models assembled from them
    /// (their files are links to the blob: both must go to free the space),
    /// that no compile reads. Answers the blobs removed; their holders'
    /// grants are the caller's to revoke. Entries compiled from them stay.
    pub fn evict_blobs(&self, need: u64, budget: u64) -> Vec<String> {
        use std::os::unix::fs::MetadataExt;
        let blobs = self.blobs();
        let mut total: u64 = blobs.iter().map(|(_, b, _)| b).sum();
        if total.saturating_add(need) <= budget {
            return Vec::new();
        }
        let reading = self.models_being_read();
        // Which assembled models link each file (by inode).
        let mut linked: HashMap<u64, Vec<PathBuf>> = HashMap::new();
        for dir in fs::read_dir(&self.models_dir)
            .into_iter()
            .flatten()
            .flatten()
        {
            for rel in list_files(&dir.path()).unwrap_or_default() {
                if let Ok(m) = fs::metadata(dir.path().join(&rel)) {
                    linked.entry(m.ino()).or_default().push(dir.path());
                }
            }
        }
        let mut evicted = Vec::new();
        let mut doomed = Vec::new();
        {
            let mut models = self.models.lock().unwrap_or_else(|p| p.into_inner());
            for (sha, bytes, _) in blobs {
                if total.saturating_add(need) <= budget {
                    break;
                }
                let Ok(path) = self.blob_path(&sha) else {
                    continue;
                };
                let Ok(ino) = fs::metadata(&path).map(|m| m.ino()) else {
                    continue;
                };
                let dirs = linked.get(&ino).cloned().unwrap_or_default();
                let Some((trash, forgotten)) = retire(&mut models, &dirs, &reading) else {
                    continue;
                };
                doomed.extend(trash);
                if fs::remove_file(&path).is_ok() {
                    total = total.saturating_sub(bytes);
                    tracing::info!(sha256 = %sha, bytes, models = forgotten, "upload evicted to make room");
                    evicted.push(sha);
                }
            }
        }
        drop(doomed);
        evicted
    }

    /// The digests a compile is reading now (never evicted).
    fn models_being_read(&self) -> HashSet<String> {
        self.reading
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .cloned()
            .collect()
    }

    /// Whether the agent downloaded this model from the hub (its files are
    /// the agent's, counted against the namespaces holding it).
    pub fn is_hub(&self, m: &ResolvedModel) -> bool {
        m.root == self.hub_dir
    }

    /// Resolves and registers a source. Blocking (hashing, copying, hub
    /// downloads, which `watch` may stop).
    pub fn register(
        &self,
        source: &ModelSource,
        watch: DownloadWatch,
    ) -> Result<ResolvedModel, SourceError> {
        let set = [
            source.path.is_some(),
            source.files.is_some(),
            source.hub.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if set != 1 {
            return Err(SourceError::Invalid(
                "give exactly one of \"path\", \"files\" or \"hub\"".into(),
            ));
        }
        let m = if let Some(p) = &source.path {
            let (root, canon) = self.check_allowed(Path::new(p))?;
            self.resolve_path(&root, &canon, true)?
        } else if let Some(files) = &source.files {
            self.assemble(files)?
        } else {
            let id = source.hub.clone().unwrap_or_default();
            let dir = self.fetch_hub(&id, source.revision.as_deref(), &watch)?;
            self.resolve_path(&self.hub_dir, &dir, false)?
        };
        self.remember(m.clone());
        Ok(m)
    }

    pub fn blob_path(&self, sha256: &str) -> Result<PathBuf, SourceError> {
        if !is_sha256_hex(sha256) {
            return Err(SourceError::Invalid(format!(
                "{sha256:?} is not a SHA-256 (64 lowercase hex digits)"
            )));
        }
        Ok(self.blobs_dir.join(sha256))
    }

    /// Where uploaded blobs are kept.
    pub fn blobs_dir(&self) -> &Path {
        &self.blobs_dir
    }

    pub fn has_blob(&self, sha256: &str) -> Result<bool, SourceError> {
        Ok(self.blob_path(sha256)?.is_file())
    }

    /// A temporary file for one upload, a name no other upload shares
    /// (created exclusively), removed when dropped unless `finish_blob`
    /// renamed it: an upload that fails or whose client goes away leaves
    /// nothing, and two uploads of one blob never write into one file.
    pub fn blob_temp(&self, sha256: &str) -> Result<(TempPath, fs::File), SourceError> {
        let tmp = TempPath::unique(&self.blob_path(sha256)?, "part");
        let f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(tmp.path())
            .map_err(|e| SourceError::Upload(e.to_string()))?;
        Ok((tmp, f))
    }

    /// Stores an upload under its SHA-256 if `got`, the digest of what was
    /// written, is that SHA-256: only verified bytes ever appear under a
    /// blob's name.
    pub fn finish_blob(
        &self,
        sha256: &str,
        tmp: TempPath,
        mut file: fs::File,
        got: &str,
    ) -> Result<(), SourceError> {
        let dest = self.blob_path(sha256)?;
        let upload = |e: std::io::Error| SourceError::Upload(e.to_string());
        if got != sha256 {
            return Err(SourceError::Upload(format!(
                "the body's SHA-256 is {got}, not {sha256}: the upload was corrupted or the URL names the wrong blob"
            )));
        }
        // `got` is the digest of every byte written into a file that only
        // this upload opened: it is the file's content.
        file.flush().and_then(|_| file.sync_all()).map_err(upload)?;
        fs::rename(tmp.path(), &dest).map_err(upload)?;
        tmp.keep();
        Ok(())
    }

    fn assemble(&self, files: &[BlobFile]) -> Result<ResolvedModel, SourceError> {
        if files.is_empty() || files.len() > 10_000 {
            return Err(SourceError::Invalid(
                "\"files\" must list 1 to 10000 files".into(),
            ));
        }
        let mut sums = Vec::new();
        for f in files {
            if safe_relative(&f.path).is_none() {
                return Err(SourceError::Invalid(format!(
                    "file path {:?} must be relative, without '..' or hidden parts",
                    f.path
                )));
            }
            if !self.has_blob(&f.sha256)? {
                return Err(SourceError::MissingBlob(f.sha256.clone()));
            }
            self.touch_blob(&f.sha256);
            sums.push((f.path.clone(), f.sha256.clone()));
        }
        let digest = digest_of(&sums);
        let dir = self.models_dir.join(digest.trim_start_matches("sha256:"));
        if !dir.is_dir() {
            // A directory of this assembly's own: concurrent assemblies of
            // one model never share one, and the first rename wins.
            let tmp = TempPath::unique(&dir, "tmp");
            let io = |e: std::io::Error| SourceError::Upload(e.to_string());
            fs::create_dir(tmp.path()).map_err(io)?;
            for f in files {
                let rel = safe_relative(&f.path).unwrap_or_default();
                let dest = tmp.path().join(&rel);
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent).map_err(io)?;
                }
                let blob = self.blob_path(&f.sha256)?;
                if fs::hard_link(&blob, &dest).is_err() {
                    fs::copy(&blob, &dest).map_err(io)?;
                }
            }
            match fs::rename(tmp.path(), &dir) {
                Ok(()) => tmp.keep(),
                // Another assembly of the same files finished first.
                Err(_) if dir.is_dir() => {}
                Err(e) => return Err(io(e)),
            }
        }
        let m = self.resolve_path(&self.models_dir, &dir, false)?;
        if m.digest != digest {
            return Err(SourceError::Invalid(format!(
                "the uploaded files do not form a model: the usable files give digest {} (uploaded set {digest}); upload config.json and the *.safetensors, or one .gguf",
                m.digest
            )));
        }
        Ok(m)
    }

    fn fetch_hub(
        &self,
        id: &str,
        revision: Option<&str>,
        watch: &DownloadWatch,
    ) -> Result<PathBuf, SourceError> {
        let valid = |s: &str| {
            !s.is_empty()
                && s.len() <= 200
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
                && !s.contains("..")
        };
        if !valid(id) || !id.contains('/') {
            return Err(SourceError::Invalid(format!(
                "hub id {id:?} must look like org/name"
            )));
        }
        let rev = revision.unwrap_or("main");
        if !valid(rev) {
            return Err(SourceError::Invalid(format!(
                "revision {rev:?} is not valid"
            )));
        }
        let dir = self.hub_dir.join(format!(
            "{}--{}",
            id.replace('/', "--"),
            rev.replace('/', "--")
        ));
        if dir.join(".complete").is_file() {
            // Registered again: the last to be evicted.
            let _ = fs::File::options()
                .write(true)
                .open(dir.join(".complete"))
                .and_then(|f| f.set_modified(std::time::SystemTime::now()));
            return Ok(dir);
        }
        // The agent has no HTTP client of its own: the hub CLI (huggingface_hub)
        // handles auth, mirrors and resumable downloads where it is installed.
        let cli = ["hf", "huggingface-cli"]
            .into_iter()
            .find(|c| which(c).is_some())
            .ok_or_else(|| SourceError::Hub {
                id: id.into(),
                reason: "neither `hf` nor `huggingface-cli` is installed on the node; mount the model and use \"path\", or upload it with \"files\"".into(),
            })?;
        let hub = |reason: String| SourceError::Hub {
            id: id.into(),
            reason,
        };
        fs::create_dir_all(&self.hub_dir).map_err(|e| hub(e.to_string()))?;
        // Into a directory of this download's own, renamed into place when
        // complete: two registrations of one model never write into (or
        // remove) each other's files.
        let part = TempPath::unique(&dir, "part");
        // stderr into a file: a pipe nobody reads while we watch could fill
        // and stall the download.
        let log_path = PathBuf::from(format!("{}.log", part.path().display()));
        let log = fs::File::create(&log_path).map_err(|e| hub(e.to_string()))?;
        let mut child = std::process::Command::new(cli)
            .arg("download")
            .arg(id)
            .arg("--revision")
            .arg(rev)
            .arg("--local-dir")
            .arg(part.path())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| hub(e.to_string()))?;
        // Watched while it runs: a download that would pass the namespace's
        // quota, the disk's floor or the hub budget is stopped and removed,
        // not left to fill the node. Checked once more when it ended (a fast
        // one may end between two looks).
        // The other downloads' bytes are summed once (walking every hub
        // tree each 200 ms would cost more than the download), and again only
        // when this one may no longer fit; a download under way beside this
        // one is bounded by its own watch.
        let mut others: Option<u64> = None;
        let status = loop {
            let ended = match child.try_wait() {
                Ok(ended) => ended,
                Err(e) => return Err(hub(e.to_string())),
            };
            let written = dir_bytes(part.path());
            let fits = |others: u64| others.saturating_add(written) <= self.hub_max;
            let verdict = watch(written).map_err(SourceError::from).and_then(|()| {
                let known = *others.get_or_insert_with(|| self.hub_bytes(part.path()));
                if fits(known) {
                    return Ok(());
                }
                others = None;
                self.hub_room(part.path(), written)
            });
            if let Err(e) = verdict {
                let _ = child.kill();
                let _ = child.wait();
                let _ = fs::remove_file(&log_path);
                tracing::info!(hub = id, written, error = %e, "hub download stopped");
                return Err(e);
            }
            if let Some(status) = ended {
                break status;
            }
            std::thread::sleep(std::time::Duration::from_millis(200));
        };
        let stderr = fs::read_to_string(&log_path).unwrap_or_default();
        let _ = fs::remove_file(&log_path);
        if !status.success() {
            return Err(hub(stderr.lines().last().unwrap_or("").to_string()));
        }
        fs::write(part.path().join(".complete"), b"").map_err(|e| hub(e.to_string()))?;
        match fs::rename(part.path(), &dir) {
            Ok(()) => part.keep(),
            // Another download of the same model finished first: use it.
            Err(_) if dir.join(".complete").is_file() => {}
            Err(e) => return Err(hub(e.to_string())),
        }
        Ok(dir)
    }
}

/// A temporary file or directory beside its final path, named uniquely
/// (process id and a per-process sequence number) and removed on drop unless
/// kept: what a failed, cancelled or concurrent request leaves is nothing.
#[derive(Debug)]
pub struct TempPath {
    path: PathBuf,
    keep: bool,
}

impl TempPath {
    fn unique(dest: &Path, kind: &str) -> Self {
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut name = dest.file_name().unwrap_or_default().to_os_string();
        name.push(format!(".{kind}.{}.{n}", std::process::id()));
        TempPath {
            path: dest.with_file_name(name),
            keep: false,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// It was renamed into place: nothing to remove.
    fn keep(mut self) {
        self.keep = true;
    }
}

impl Drop for TempPath {
    fn drop(&mut self) {
        if !self.keep {
            let _ = fs::remove_file(&self.path).or_else(|_| fs::remove_dir_all(&self.path));
        }
    }
}

/// Takes model directories out of use to free their space: renames them
/// away (instant, so it is done under the registry's lock; the returned
/// paths delete them when dropped, after it) and forgets the models in
/// them. `None`, touching nothing, when a compile reads one of those
/// models. Answers what to drop and how many models were forgotten.
fn retire(
    models: &mut HashMap<String, ResolvedModel>,
    dirs: &[PathBuf],
    reading: &HashSet<String>,
) -> Option<(Vec<TempPath>, usize)> {
    let inside = |m: &ResolvedModel| dirs.iter().any(|d| m.path.starts_with(d));
    if models.iter().any(|(d, m)| inside(m) && reading.contains(d)) {
        return None;
    }
    let mut trash = Vec::new();
    let mut moved = Vec::new();
    for d in dirs {
        let t = TempPath::unique(d, "evicted");
        if fs::rename(d, t.path()).is_ok() {
            trash.push(t);
            moved.push(d);
        }
    }
    // Only the models whose files really went are forgotten.
    let before = models.len();
    models.retain(|_, m| !moved.iter().any(|d| m.path.starts_with(d)));
    Some((trash, before - models.len()))
}

/// Bytes of the regular files under `dir` (0 when it cannot be read).
fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_bytes(&e.path()),
            Ok(t) if t.is_file() => e.metadata().map_or(0, |m| m.len()),
            _ => 0,
        })
        .sum()
}

fn which(cmd: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join(cmd))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digest_ignores_listing_order() {
        let a = digest_of(&[("a".into(), "1".into()), ("b".into(), "2".into())]);
        let b = digest_of(&[("b".into(), "2".into()), ("a".into(), "1".into())]);
        assert_eq!(a, b);
        assert_ne!(a, digest_of(&[("a".into(), "1".into())]));
    }

    #[test]
    fn unsafe_relative_paths_are_refused() {
        assert!(safe_relative("config.json").is_some());
        assert!(safe_relative("sub/x.safetensors").is_some());
        assert!(safe_relative("../x").is_none());
        assert!(safe_relative("/etc/passwd").is_none());
        assert!(safe_relative(".git/config").is_none());
    }

    #[test]
    fn uploaded_and_node_copies_share_a_digest() {
        let tmp = tempfile::tempdir().expect("tempdir");
        let model = tmp.path().join("m");
        fs::create_dir_all(&model).expect("mkdir");
        fs::write(model.join("config.json"), b"{}").expect("write");
        fs::write(model.join("model.safetensors"), b"weights").expect("write");
        let reg = ModelRegistry::new(&tmp.path().join("cache"), vec![tmp.path().into()])
            .expect("registry");
        let from_path = reg
            .register(
                &ModelSource {
                    path: Some(model.display().to_string()),
                    ..Default::default()
                },
                Box::new(|_| Ok(())),
            )
            .expect("path source");
        let mut files = vec![];
        for name in ["config.json", "model.safetensors"] {
            let (h, _) = crate::cache::store::file_sha256(&model.join(name)).expect("hash");
            let (tmpf, f) = reg.blob_temp(&h).expect("temp");
            drop(f);
            fs::copy(model.join(name), tmpf.path()).expect("copy");
            let f = fs::File::options()
                .write(true)
                .open(tmpf.path())
                .expect("open");
            reg.finish_blob(&h, tmpf, f, &h).expect("finish");
            files.push(BlobFile {
                path: name.into(),
                sha256: h,
            });
        }
        let uploaded = reg
            .register(
                &ModelSource {
                    files: Some(files),
                    ..Default::default()
                },
                Box::new(|_| Ok(())),
            )
            .expect("blob source");
        assert_eq!(from_path.digest, uploaded.digest);
        assert_eq!(uploaded.format, ModelFormat::Safetensors);
    }
}
