//! The agent's core operations (prepare, generate, cache management), over
//! the cache, the backends, the model registry and the token store. The HTTP
//! layer in `api` only decodes requests and encodes these results.

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rm_crds::{CompileOptions, DeviceRequest, DeviceType};
use serde::Serialize;
use tokio::sync::watch;

use crate::access::{AccessIndex, Kind, SHARED};
use crate::admission::{Admission, Bounds, Refused, Ticket};
use crate::auth::{self, AuthError, Caller, Target, TokenStore};
use crate::backend::{
    Backend, BackendError, Cancel, CompileJob, ForwardJob, ForwardOutput, GenerateJob,
    GenerationParams, ModelRef, Prompt, Registry, SelectError, SequenceOutput, Slot, TokenFn,
};
use crate::cache::{CacheKey, CacheStore, CompileState, InFlight, KeyInputs, Role, StoreError};
use crate::metrics::Metrics;
use crate::quota::{Limits, QuotaError, Usage};
use crate::source::{ModelRegistry, ModelSource, ResolvedModel, SourceError};

/// Any failure of an agent operation, with the HTTP status it maps to.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{0}")]
    BadRequest(String),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Source(#[from] SourceError),
    #[error(transparent)]
    Select(#[from] SelectError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("compile failed: {message}")]
    Compile { status: u16, message: String },
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error(transparent)]
    Busy(#[from] Refused),
    #[error(transparent)]
    Chat(#[from] crate::chat::ChatError),
    #[error(
        "the request did not finish within the agent's request timeout of {secs} s ({phase}); it was stopped. Ask for fewer tokens or a shorter prompt, or ask the cluster operator to raise --request-timeout"
    )]
    TimedOut { secs: u64, phase: &'static str },
}

impl AgentError {
    pub fn http_status(&self) -> u16 {
        match self {
            AgentError::BadRequest(_) => 400,
            AgentError::Auth(e) => e.http_status(),
            AgentError::Source(e) => e.http_status(),
            AgentError::Select(SelectError::UnknownBackend(_)) => 404,
            AgentError::Select(SelectError::WrongDevice { .. }) => 400,
            AgentError::Select(SelectError::NoneAvailable { .. }) => 503,
            AgentError::Select(SelectError::Refused { .. } | SelectError::NoneFits { .. }) => 422,
            AgentError::Backend(e) => e.http_status(),
            AgentError::Store(StoreError::NotFound(_)) => 404,
            AgentError::Store(StoreError::InUse(_)) => 409,
            AgentError::Store(StoreError::Corrupt { .. }) => 409,
            AgentError::Store(StoreError::Io { .. }) => 500,
            AgentError::Compile { status, .. } => *status,
            AgentError::Forbidden(_) => 403,
            AgentError::Quota(e) => e.http_status(),
            AgentError::Busy(e) => e.http_status(),
            AgentError::Chat(e) => e.http_status(),
            AgentError::TimedOut { .. } => 504,
        }
    }

    /// A short machine-readable code for clients.
    pub fn code(&self) -> &'static str {
        match self {
            AgentError::BadRequest(_) => "bad_request",
            AgentError::Auth(_) => "unauthorized",
            AgentError::Source(_) => "model_source",
            AgentError::Select(_) => "backend_selection",
            AgentError::Backend(_) => "backend",
            AgentError::Store(_) => "cache",
            AgentError::Compile { .. } => "compile_failed",
            AgentError::Forbidden(_) => "forbidden",
            AgentError::Quota(QuotaError::TooLarge { .. }) => "too_large",
            AgentError::Quota(QuotaError::Quota { .. }) => "quota_exceeded",
            AgentError::Quota(QuotaError::Disk { .. } | QuotaError::NodeUploads { .. }) => {
                "insufficient_storage"
            }
            AgentError::Busy(Refused::TenantQueueFull { .. }) => "too_many_requests",
            AgentError::Busy(Refused::QueueFull { .. }) => "busy",
            AgentError::Chat(_) => "chat_template",
            AgentError::TimedOut { .. } => "timeout",
        }
    }

    /// Seconds after which a retry may succeed, for answers that say "not
    /// now" rather than "no".
    pub fn retry_after(&self) -> Option<u32> {
        match self {
            AgentError::Auth(AuthError::NotBound) => Some(1),
            AgentError::Busy(_) => Some(2),
            _ => None,
        }
    }
}

/// What a prepare asks for.
#[derive(Clone, Debug, Default)]
pub struct PrepareRequest {
    /// A model registered before (`sha256:...`), or
    pub model: Option<String>,
    /// a source to register now.
    pub source: Option<ModelSource>,
    pub device: String,
    pub backend: Option<String>,
    pub options: CompileOptions,
}

/// The result of a prepare.
#[derive(Clone, Debug, Serialize)]
pub struct Prepared {
    pub key: CacheKey,
    pub model: String,
    pub backend: String,
    pub device_type: DeviceType,
    pub devices: Vec<String>,
    /// True when the entry was already in the cache.
    pub cached: bool,
}

/// A prepare under way: either done (`rx` is `None`) or following a compile.
pub struct PrepareTicket {
    pub prepared: Prepared,
    pub rx: Option<watch::Receiver<CompileState>>,
}

pub struct GenerateRequest {
    pub key: CacheKey,
    pub device: String,
    pub prompts: Vec<Prompt>,
    pub params: GenerationParams,
}

pub struct ForwardRequest {
    pub key: CacheKey,
    pub device: String,
    pub input_ids: Vec<Vec<u32>>,
    pub logits_to_keep: usize,
}

/// A cache entry ready to run (see [`Agent::runnable`]).
struct Runnable {
    backend: Arc<dyn Backend>,
    artifact_dir: std::path::PathBuf,
    devices: Vec<String>,
    device_type: DeviceType,
    _pin: crate::cache::Pin,
}

pub struct Agent {
    pub store: Arc<CacheStore>,
    pub flights: Arc<InFlight>,
    pub models: Arc<ModelRegistry>,
    pub backends: Registry,
    pub tokens: TokenStore,
    pub access: AccessIndex,
    pub metrics: Arc<Metrics>,
    /// What one tenant may store.
    pub limits: Limits,
    /// Bytes promised to uploads and compiles under way.
    pub promised: crate::quota::Ledger,
    /// Held while a write is measured and promised its bytes.
    deciding: Mutex<()>,
    /// Generate and forward requests: slots per backend and device set,
    /// served in turn between namespaces.
    pub requests: Admission,
    /// Compiles, all backends together.
    pub compiles: Admission,
    /// The longest a generate or forward may take, queueing included.
    pub request_timeout: std::time::Duration,
    /// SHA-256 of the cluster operator's admin token, if one is set.
    admin_sha256: Option<String>,
    verified: Mutex<HashSet<CacheKey>>,
    /// One verification at a time per entry (see [`Agent::runnable`]).
    verifying: Mutex<std::collections::HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
    /// Chat templates and tokenizers of entries, read once per entry.
    chats: Mutex<std::collections::HashMap<CacheKey, Arc<ChatModel>>>,
}

/// What rendering a chat for a cache entry needs: the model's template (if
/// it has one) and the tokenizer the entry's engine uses.
pub struct ChatModel {
    pub template: Option<crate::chat::ChatTemplate>,
    pub tokenizer: Option<tokenizers::Tokenizer>,
}

/// A rendered chat: the text and its token ids.
#[derive(Clone, Debug, Serialize)]
pub struct RenderedChat {
    pub prompt: String,
    pub input_ids: Vec<u32>,
}

/// Largest tokenizer or template file read for a chat (tokenizer.json of
/// large vocabularies is tens of MB).
const MAX_CHAT_FILE: u64 = 64 << 20;

/// How long a request waits for the device plugin to bind a fresh token to
/// its pod before it is answered 503 (the binding normally takes tens of
/// milliseconds, and happens before the container starts).
const BIND_WAIT: std::time::Duration = std::time::Duration::from_secs(3);

/// Defaults for `--concurrent-requests`, `--max-queued-per-namespace`,
/// `--max-queued`.
pub const REQUEST_BOUNDS: Bounds = Bounds {
    slots: 1,
    per_tenant_slots: 1,
    per_tenant_queue: 16,
    queue: 256,
};
/// Defaults for `--max-concurrent-compiles`, the share of one namespace,
/// and the compile queue.
pub const COMPILE_BOUNDS: Bounds = Bounds {
    slots: 2,
    per_tenant_slots: 1,
    per_tenant_queue: 4,
    queue: 64,
};

/// Cancels a request's work when the request is dropped before it finished
/// (its client went away), and counts it.
struct Abandoned<'a> {
    cancel: Cancel,
    metrics: &'a Metrics,
    finished: bool,
}

impl Drop for Abandoned<'_> {
    fn drop(&mut self) {
        if !self.finished {
            self.cancel.cancel();
            Metrics::inc(&self.metrics.requests_cancelled);
        }
    }
}

/// Who waits in turn with whom: a namespace, or the admin or trusted caller.
fn tenant_of(caller: &Caller) -> String {
    caller
        .namespace()
        .map_or_else(|| caller.describe(), str::to_string)
}

fn join_err(e: tokio::task::JoinError) -> AgentError {
    AgentError::Backend(BackendError::Internal(e.to_string()))
}

impl Agent {
    pub fn new(
        store: Arc<CacheStore>,
        models: Arc<ModelRegistry>,
        backends: Registry,
        tokens: TokenStore,
        access: AccessIndex,
        admin_token: Option<&str>,
    ) -> Self {
        Agent {
            store,
            flights: Arc::new(InFlight::default()),
            models,
            backends,
            tokens,
            access,
            metrics: Arc::new(Metrics::default()),
            limits: Limits::default(),
            promised: crate::quota::Ledger::default(),
            deciding: Mutex::new(()),
            requests: Admission::new(REQUEST_BOUNDS),
            compiles: Admission::new(COMPILE_BOUNDS),
            request_timeout: std::time::Duration::from_secs(600),
            admin_sha256: admin_token.map(rm_crds::token::token_sha256),
            verified: Mutex::new(HashSet::new()),
            verifying: Mutex::new(std::collections::HashMap::new()),
            chats: Mutex::new(std::collections::HashMap::new()),
        }
    }

    /// Renders `messages` with the entry's model's chat template and
    /// tokenizes the text without adding special tokens (the template writes
    /// them), as transformers' `apply_chat_template(tokenize=True)`.
    /// The ids a text prompt runs as (no special tokens added, as for a
    /// generate with `prompt`).
    pub async fn tokenize(
        &self,
        key: &CacheKey,
        text: &str,
        caller: &Caller,
    ) -> Result<Vec<u32>, AgentError> {
        let chat = self.chat_model(key, caller).await?;
        tokenize_with(&chat, text)
    }

    /// An entry's template and tokenizer, read on first use.
    async fn chat_model(
        &self,
        key: &CacheKey,
        caller: &Caller,
    ) -> Result<Arc<ChatModel>, AgentError> {
        let entry = self
            .store
            .lookup(key)
            .filter(|e| self.may_use_model(&e.model_digest, caller))
            .ok_or_else(|| AgentError::Store(StoreError::NotFound(key.clone())))?;
        let cached = self
            .chats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
            .cloned();
        if let Some(c) = cached {
            return Ok(c);
        }
        let model = self.models.get(&entry.model_digest).ok();
        let models = self.models.clone();
        let dir = entry.dir.clone();
        let loaded =
            tokio::task::spawn_blocking(move || load_chat_model(&dir, model.as_ref(), &models))
                .await
                .map_err(join_err)??;
        let loaded = Arc::new(loaded);
        self.chats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone(), loaded.clone());
        Ok(loaded)
    }

    pub async fn render_chat(
        &self,
        key: &CacheKey,
        messages: &[serde_json::Value],
        add_generation_prompt: bool,
        caller: &Caller,
    ) -> Result<RenderedChat, AgentError> {
        crate::chat::check_messages(messages)?;
        let chat = self.chat_model(key, caller).await?;
        let template = chat
            .template
            .as_ref()
            .ok_or(crate::chat::ChatError::NoTemplate)?;
        let prompt = template.render(messages, add_generation_prompt)?;
        let input_ids = tokenize_with(&chat, &prompt)?;
        Ok(RenderedChat { prompt, input_ids })
    }

    /// Who sends `token`. A token the device plugin has not bound to its pod
    /// yet is read again for a moment before the caller is told to retry.
    pub async fn identify(&self, token: Option<&str>) -> Result<Caller, AgentError> {
        let is_admin = match (token, &self.admin_sha256) {
            (Some(t), Some(admin)) => rm_crds::token::token_sha256(t) == *admin,
            _ => false,
        };
        let deadline = tokio::time::Instant::now() + BIND_WAIT;
        loop {
            let allocation = match token {
                Some(t) if !is_admin && self.tokens.enforced() => Some(self.tokens.lookup(t)),
                _ => None,
            };
            let now = crate::cache::store::now_ms();
            match auth::identify(token, is_admin, self.tokens.enforced(), allocation, now) {
                Err(AuthError::NotBound) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
                Err(e) => {
                    Metrics::inc(&self.metrics.refused_requests);
                    return Err(AgentError::Auth(e));
                }
                Ok(caller) => return Ok(caller),
            }
        }
    }

    /// Where a request may run, from its device string and caller.
    pub fn target(&self, device: &str, caller: &Caller) -> Result<Target, AgentError> {
        let request: DeviceRequest = device
            .parse()
            .map_err(|e: rm_crds::DeviceStringError| AgentError::BadRequest(e.to_string()))?;
        auth::authorize(request, caller.allocation()).map_err(|e| {
            Metrics::inc(&self.metrics.refused_requests);
            AgentError::Auth(e)
        })
    }

    /// Records that `caller` holds `id`: its namespace, every namespace when
    /// the admin registers it, nothing for a trusted caller.
    fn grant(&self, kind: Kind, id: &str, caller: &Caller) -> Result<(), AgentError> {
        let owner = match caller {
            Caller::Pod { owner, .. } => owner.namespace.as_str(),
            Caller::Admin => SHARED,
            Caller::Trusted => return Ok(()),
        };
        self.access
            .grant(kind, id, owner)
            .map_err(|e| self.access_error(e))
    }

    fn access_error(&self, source: std::io::Error) -> AgentError {
        AgentError::Store(StoreError::Io {
            path: self.access.path().to_path_buf(),
            source,
        })
    }

    /// Whether `caller` may see the blob (and so may use it in a model).
    fn may_use_blob(&self, sha256: &str, caller: &Caller) -> bool {
        self.access.may_use(Kind::Blob, sha256, caller.namespace())
    }

    /// Whether the blob is on the node for `caller`: stored, and theirs.
    pub fn has_blob(&self, sha256: &str, caller: &Caller) -> Result<bool, AgentError> {
        let held = self.models.has_blob(sha256)? && self.may_use_blob(sha256, caller);
        if held {
            // Asked for, so in use: evicted last.
            self.models.touch_blob(sha256);
        }
        Ok(held)
    }

    /// Records an upload of the whole blob by `caller`.
    pub fn grant_blob(&self, sha256: &str, caller: &Caller) -> Result<(), AgentError> {
        self.grant(Kind::Blob, sha256, caller)
    }

    /// Bytes `namespace` holds on the node: the blobs it uploaded, the hub
    /// downloads of its models, and the compiled entries of its models.
    /// Content shared with other namespaces counts fully for each (as a
    /// ResourceQuota counts a pod's request whatever the node shares).
    pub fn namespace_bytes(&self, namespace: &str) -> u64 {
        let blobs: u64 = self
            .access
            .held_by(Kind::Blob, namespace)
            .iter()
            .filter_map(|sha| self.models.blob_path(sha).ok())
            .filter_map(|p| std::fs::metadata(p).ok())
            .map(|m| m.len())
            .sum();
        let models: HashSet<String> = self
            .access
            .held_by(Kind::Model, namespace)
            .into_iter()
            .collect();
        let hub: u64 = models
            .iter()
            .filter_map(|d| self.models.get(d).ok())
            .filter(|m| self.models.is_hub(m))
            .map(|m| m.bytes)
            .sum();
        let compiled: u64 = self
            .store
            .list()
            .iter()
            .filter(|e| models.contains(&e.model_digest))
            .map(|e| e.size_bytes)
            .sum();
        blobs + hub + compiled
    }

    /// What the quota decisions need now, for `caller`.
    fn usage(&self, caller: &Caller) -> Result<Usage, AgentError> {
        let disk = crate::quota::disk_space(self.models.blobs_dir()).map_err(|e| {
            AgentError::Store(StoreError::Io {
                path: self.models.blobs_dir().to_path_buf(),
                source: e,
            })
        })?;
        // Writes under way count as if done: what they were promised is
        // held, and no longer free.
        let (mine, node) = self.promised.promised(caller.namespace());
        Ok(Usage {
            namespace_bytes: caller
                .namespace()
                .map(|ns| self.namespace_bytes(ns).saturating_add(mine)),
            disk: crate::quota::DiskSpace {
                free: disk.free.saturating_sub(node),
                ..disk
            },
            uploads_bytes: self.models.blobs_bytes().saturating_add(node),
        })
    }

    fn refused(&self, caller: &Caller, what: &str, e: QuotaError) -> AgentError {
        Metrics::inc(&self.metrics.refused_requests);
        tracing::info!(caller = %caller.describe(), error = %e, "{what} refused");
        AgentError::Quota(e)
    }

    /// How many bytes an upload by `caller` may write (`declared`: its
    /// Content-Length, 0 when unknown), and a promise of them (the declared
    /// length, or with none all it may write) held until dropped. See
    /// [`crate::quota::allowance`].
    pub fn upload_allowance(
        &self,
        caller: &Caller,
        declared: u64,
    ) -> Result<(u64, crate::quota::Reservation), AgentError> {
        // One decision at a time: two uploads must not both be measured
        // before either is promised.
        let _one = self.deciding.lock().unwrap_or_else(|p| p.into_inner());
        // The node's uploads stay within their budget: the least recently
        // used go first (their holders upload them again when they need
        // them; entries compiled from them stay).
        let (_, promised) = self.promised.promised(None);
        for sha in self
            .models
            .evict_blobs(declared.saturating_add(promised), self.limits.uploads_max)
        {
            Metrics::inc(&self.metrics.uploads_evicted);
            if let Err(e) = self.access.revoke(Kind::Blob, &sha, None) {
                return Err(self.access_error(e));
            }
        }
        let usage = self.usage(caller)?;
        let allowed = crate::quota::allowance(&self.limits, &usage, caller.namespace(), declared)
            .map_err(|e| self.refused(caller, "upload", e))?;
        let promise = if declared > 0 { declared } else { allowed };
        Ok((allowed, self.promised.reserve(caller.namespace(), promise)))
    }

    /// A compile writes for `caller`'s namespace: it is queued only with
    /// room left in the namespace's quota and, above the disk's floor, room
    /// for an output as large as the model (the output's size is known only
    /// at the end; a quantized one is smaller). That much is promised to it
    /// until it ends, so compiles queued together are counted together.
    fn compile_room(
        &self,
        caller: &Caller,
        model: &ResolvedModel,
    ) -> Result<crate::quota::Reservation, AgentError> {
        let _one = self.deciding.lock().unwrap_or_else(|p| p.into_inner());
        let usage = self.usage(caller)?;
        crate::quota::room(&self.limits, &usage, caller.namespace(), 0)
            .and_then(|_| crate::quota::room(&self.limits, &usage, None, model.bytes))
            .map_err(|e| self.refused(caller, "compile", e))?;
        Ok(self.promised.reserve(caller.namespace(), model.bytes))
    }

    /// Watches a hub download for `caller`: answers an error once the bytes
    /// downloaded so far no longer fit the namespace's quota or the disk's
    /// floor (the download is then stopped and removed).
    fn download_watch(&self, caller: &Caller) -> Result<crate::source::DownloadWatch, AgentError> {
        let before = self.usage(caller)?;
        let limits = self.limits;
        let namespace = caller.namespace().map(str::to_string);
        let dir = self.models.blobs_dir().to_path_buf();
        Ok(Box::new(move |downloaded: u64| {
            let disk = crate::quota::disk_space(&dir).unwrap_or(before.disk);
            let usage = Usage {
                namespace_bytes: before.namespace_bytes.map(|b| b + downloaded),
                disk,
                ..before
            };
            crate::quota::room(&limits, &usage, namespace.as_deref(), 0).map(|_| ())
        }))
    }

    /// Takes a blob from `caller` (the admin: from everyone); the file goes
    /// when nobody holds it any more (models built from it keep their own
    /// copy). Others' blobs are as absent (404).
    pub fn delete_blob(&self, sha256: &str, caller: &Caller) -> Result<bool, AgentError> {
        if !self.has_blob(sha256, caller)? {
            return Err(SourceError::MissingBlob(sha256.to_string()).into());
        }
        let path = self.models.blob_path(sha256)?;
        let namespace = caller.namespace();
        let still_held = self
            .access
            .revoke(Kind::Blob, sha256, namespace)
            .map_err(|e| self.access_error(e))?;
        // A trusted caller records no grants: the file is its to remove.
        if still_held {
            return Ok(false);
        }
        match std::fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
            Err(e) => Err(AgentError::Store(StoreError::Io { path, source: e })),
        }
    }

    /// Whether `caller` may use the model (and its cache entries).
    pub fn may_use_model(&self, digest: &str, caller: &Caller) -> bool {
        self.access.may_use(Kind::Model, digest, caller.namespace())
    }

    /// Registers a model source (hashing it once) for `caller`.
    pub async fn register(
        &self,
        source: ModelSource,
        caller: &Caller,
    ) -> Result<ResolvedModel, AgentError> {
        // Uploaded files count only when this tenant uploaded them: knowing a
        // blob's digest is no proof of holding it.
        for f in source.files.iter().flatten() {
            if !self.may_use_blob(&f.sha256, caller) {
                return Err(SourceError::MissingBlob(f.sha256.clone()).into());
            }
        }
        let models = self.models.clone();
        let watch = self.download_watch(caller)?;
        let m = tokio::task::spawn_blocking(move || models.register(&source, watch))
            .await
            .map_err(join_err)??;
        self.grant(Kind::Model, &m.digest, caller)?;
        tracing::debug!(model = %m.digest, caller = %caller.describe(), "model registered");
        Ok(m)
    }

    /// A registered model `caller` may use; others' are as unknown.
    fn model_for(&self, digest: &str, caller: &Caller) -> Result<ResolvedModel, AgentError> {
        if !self.may_use_model(digest, caller) {
            return Err(SourceError::UnknownModel(digest.to_string()).into());
        }
        Ok(self.models.get(digest)?)
    }

    /// The cache entries `caller` may see.
    pub fn visible_entries(&self, caller: &Caller) -> Vec<crate::cache::EntryView> {
        self.store
            .list()
            .into_iter()
            .filter(|e| self.may_use_model(&e.model_digest, caller))
            .collect()
    }

    /// The compiles under way that `caller` may see.
    pub fn visible_compiles(&self, caller: &Caller) -> Vec<crate::cache::FlightView> {
        self.flights
            .list()
            .into_iter()
            .filter(|f| self.may_use_model(&f.model, caller))
            .collect()
    }

    /// Finds the entry for a model and options, or starts (or joins) its
    /// compile.
    pub async fn start_prepare(
        &self,
        req: PrepareRequest,
        caller: &Caller,
    ) -> Result<PrepareTicket, AgentError> {
        Metrics::inc(&self.metrics.prepare_requests);
        let target = self.target(&req.device, caller)?;
        let model = match (&req.model, req.source) {
            (Some(id), None) => self.model_for(id, caller)?,
            (None, Some(src)) => self.register(src, caller).await?,
            _ => {
                return Err(AgentError::BadRequest(
                    "give exactly one of \"model\" (a registered sha256:... id) or \"source\""
                        .into(),
                ));
            }
        };
        let backend = self.backends.select(
            target.device_type,
            req.backend.as_deref(),
            &ModelRef {
                path: &model.path,
                format: model.format,
            },
        )?;
        let info = backend.info();
        backend.validate(&req.options, model.format)?;
        let inputs = KeyInputs {
            model_digest: model.digest.clone(),
            backend: info.name.clone(),
            compiler_version: info.compiler_version.clone(),
            device_type: target.device_type,
            options: req.options.clone(),
        };
        let key = CacheKey::derive(&inputs);
        let mut prepared = Prepared {
            key: key.clone(),
            model: model.digest.clone(),
            backend: info.name.clone(),
            device_type: target.device_type,
            devices: target.devices.clone(),
            cached: true,
        };
        if self.store.lookup(&key).is_some() {
            Metrics::inc(&self.metrics.cache_hits);
            return Ok(PrepareTicket { prepared, rx: None });
        }
        Metrics::inc(&self.metrics.cache_misses);
        prepared.cached = false;
        // Joining a compile under way costs nothing. A new one writes its
        // output for this namespace (its quota and the disk's floor must
        // have room) and takes a place in the compile queue (429/503 when
        // the namespace or the node has too many waiting).
        let ticket = match self.flights.get(&key) {
            Some(_) => None,
            None => {
                let promise = self.compile_room(caller, &model)?;
                let ticket = self
                    .compiles
                    .enqueue("compile", &tenant_of(caller))
                    .inspect_err(|_| Metrics::inc(&self.metrics.refused_busy))?;
                Some((ticket, promise))
            }
        };
        let rx = match self.flights.join(&key, &info.name, &model.digest) {
            Role::Follower(rx) => rx,
            Role::Leader(leader, rx) => {
                // (A compile that ended between the look and the join leaves
                // this one without a place yet.)
                let place = match ticket {
                    Some(t) => Ok(t),
                    None => self.compile_room(caller, &model).and_then(|promise| {
                        self.compiles
                            .enqueue("compile", &tenant_of(caller))
                            .map(|t| (t, promise))
                            .map_err(AgentError::from)
                    }),
                };
                let (ticket, promise) = match place {
                    Ok(t) => t,
                    Err(e) => {
                        leader.finish(CompileState::Failed {
                            status: e.http_status(),
                            message: e.to_string(),
                        });
                        return Err(e);
                    }
                };
                let job = CompileJob {
                    key: key.clone(),
                    model_digest: model.digest.clone(),
                    model_path: model.path.clone(),
                    model_format: model.format,
                    device_type: target.device_type,
                    devices: target.devices.clone(),
                    options: req.options.clone(),
                    output_dir: Default::default(),
                    allocation: caller.allocation_ref(),
                };
                let ctx = CompileContext {
                    store: self.store.clone(),
                    models: self.models.clone(),
                    metrics: self.metrics.clone(),
                    backend,
                    model,
                    promise,
                };
                // Detached: the compile finishes even if every caller leaves.
                tokio::spawn(run_compile(ctx, leader, ticket, job, inputs));
                rx
            }
        };
        Ok(PrepareTicket {
            prepared,
            rx: Some(rx),
        })
    }

    /// Waits for a ticket's compile to end.
    pub async fn finish_prepare(&self, ticket: PrepareTicket) -> Result<Prepared, AgentError> {
        let Some(mut rx) = ticket.rx else {
            return Ok(ticket.prepared);
        };
        loop {
            let state = rx.borrow_and_update().clone();
            match state {
                CompileState::Ready => return Ok(ticket.prepared),
                CompileState::Failed { status, message } => {
                    return Err(AgentError::Compile { status, message });
                }
                CompileState::Running { .. } => {}
            }
            if rx.changed().await.is_err() {
                // The sender is gone; its last value is final.
                let last = rx.borrow().clone();
                return match last {
                    CompileState::Ready => Ok(ticket.prepared),
                    CompileState::Failed { status, message } => {
                        Err(AgentError::Compile { status, message })
                    }
                    CompileState::Running { .. } => Err(AgentError::Compile {
                        status: 500,
                        message: "the compile ended without a result; retry".into(),
                    }),
                };
            }
        }
    }

    pub async fn prepare(
        &self,
        req: PrepareRequest,
        caller: &Caller,
    ) -> Result<Prepared, AgentError> {
        let t = self.start_prepare(req, caller).await?;
        self.finish_prepare(t).await
    }

    /// Counts a model file refused as malformed when an entry is loaded (a
    /// compile counts its own in `run_compile`).
    fn count_malformed(&self, e: &AgentError) {
        if matches!(e, AgentError::Backend(BackendError::Malformed(_))) {
            Metrics::inc(&self.metrics.models_malformed);
        }
    }

    /// Runs a generation on a prepared entry.
    pub async fn generate(
        &self,
        req: GenerateRequest,
        caller: &Caller,
        on_token: Option<TokenFn>,
    ) -> Result<Vec<SequenceOutput>, AgentError> {
        Metrics::inc(&self.metrics.generate_requests);
        let result = self.generate_inner(req, caller, on_token).await;
        match &result {
            Ok(outs) => {
                let n: usize = outs.iter().map(|o| o.token_ids.len()).sum();
                self.metrics
                    .generated_tokens
                    .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
            }
            Err(e) => {
                Metrics::inc(&self.metrics.generate_errors);
                self.count_malformed(e);
            }
        }
        result
    }

    async fn generate_inner(
        &self,
        req: GenerateRequest,
        caller: &Caller,
        on_token: Option<TokenFn>,
    ) -> Result<Vec<SequenceOutput>, AgentError> {
        let run = self.runnable(&req.key, &req.device, caller).await?;
        let job = GenerateJob {
            key: req.key,
            artifact_dir: run.artifact_dir.clone(),
            devices: run.devices.clone(),
            prompts: req.prompts,
            params: req.params,
            cancel: Cancel::default(),
            slot: Slot::default(),
            allocation: caller.allocation_ref(),
        };
        let (cancel, slot) = (job.cancel.clone(), job.slot.clone());
        let key = job.key.clone();
        self.admitted(
            &key,
            &run,
            caller,
            cancel,
            slot,
            run.backend.generate(job, on_token),
        )
        .await
    }

    /// Runs `work` on `run`'s backend and devices once a slot is free there
    /// (in turn between namespaces), within the request timeout. When the
    /// caller goes away (this future dropped) or the time is up, `cancel`
    /// stops the work at its next step. The slot is put in `slot`, the
    /// job's: a backend whose work outlives this future takes it along.
    async fn admitted<T>(
        &self,
        key: &CacheKey,
        run: &Runnable,
        caller: &Caller,
        cancel: Cancel,
        slot: Slot,
        work: futures::future::BoxFuture<'_, Result<T, BackendError>>,
    ) -> Result<T, AgentError> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let secs = self.request_timeout.as_secs();
        // What requests share: the node's CPU is one for every pod; an
        // accelerator is the pod's own (its indices are within its
        // allocation), so pods never wait for each other's devices.
        let resource = match (run.device_type, caller.allocation_ref()) {
            (DeviceType::Cpu, _) | (_, None) => {
                format!("{}[{}]", run.backend.info().name, run.devices.join(","))
            }
            (_, Some(a)) => format!(
                "{}[{}]@{}",
                run.backend.info().name,
                run.devices.join(","),
                a.token_sha256
            ),
        };
        // The CPU engine batches requests of one model (llama.cpp): that
        // many of the same entry run at once; other entries wait their turn.
        let ticket = match run.device_type {
            DeviceType::Cpu => self.requests.enqueue_in(
                &resource,
                &tenant_of(caller),
                key.as_str(),
                run.backend.concurrent_requests(key, &run.artifact_dir),
            ),
            _ => self.requests.enqueue(&resource, &tenant_of(caller)),
        }
        .inspect_err(|_| Metrics::inc(&self.metrics.refused_busy))?;
        let permit = match tokio::time::timeout_at(deadline, ticket.wait()).await {
            Ok(Some(permit)) => permit,
            Ok(None) => {
                return Err(BackendError::Unavailable("the agent is shutting down".into()).into());
            }
            Err(_) => {
                Metrics::inc(&self.metrics.request_timeouts);
                return Err(AgentError::TimedOut {
                    secs,
                    phase: "waiting for a free slot",
                });
            }
        };
        // Before the work is first polled: a worker backend moves the permit
        // into its request, which a hang-up does not end at once (a worker
        // busy with a cancelled request keeps the slot until it answers).
        slot.put(permit);
        // Dropped with this future: when the caller goes away before the end
        // (its client hung up), the work is told to stop and it is counted.
        let mut abandoned = Abandoned {
            cancel: cancel.clone(),
            metrics: &self.metrics,
            finished: false,
        };
        let result = tokio::time::timeout_at(deadline, work).await;
        // Freed here unless the backend took it.
        drop(slot.take());
        abandoned.finished = true;
        match result {
            Ok(r) => {
                // A worker request past the manifest's request_timeout_s:
                // stopped (cancelled in the worker) like one past ours.
                if let Err(BackendError::Timeout(_)) = &r {
                    Metrics::inc(&self.metrics.request_timeouts);
                }
                Ok(r?)
            }
            Err(_) => {
                cancel.cancel();
                Metrics::inc(&self.metrics.request_timeouts);
                Err(AgentError::TimedOut {
                    secs,
                    phase: "running",
                })
            }
        }
    }

    /// Logits for whole sequences, on the entry's backend.
    pub async fn forward(
        &self,
        req: ForwardRequest,
        caller: &Caller,
    ) -> Result<Vec<ForwardOutput>, AgentError> {
        Metrics::inc(&self.metrics.forward_requests);
        let run = self.runnable(&req.key, &req.device, caller).await;
        let result = match run {
            Ok(run) => {
                let job = ForwardJob {
                    key: req.key,
                    artifact_dir: run.artifact_dir.clone(),
                    devices: run.devices.clone(),
                    input_ids: req.input_ids,
                    logits_to_keep: req.logits_to_keep,
                    cancel: Cancel::default(),
                    slot: Slot::default(),
                    allocation: caller.allocation_ref(),
                };
                let (cancel, slot) = (job.cancel.clone(), job.slot.clone());
                let key = job.key.clone();
                self.admitted(&key, &run, caller, cancel, slot, run.backend.forward(job))
                    .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = &result {
            Metrics::inc(&self.metrics.forward_errors);
            self.count_malformed(e);
        }
        result
    }

    /// What running a cache entry needs: the caller may use the device, the
    /// entry was compiled for it, its files are verified (first use), and it
    /// is pinned against eviction while the returned value lives.
    async fn runnable(
        &self,
        key: &CacheKey,
        device: &str,
        caller: &Caller,
    ) -> Result<Runnable, AgentError> {
        let target = self.target(device, caller)?;
        let entry = self
            .store
            .lookup(key)
            .filter(|e| self.may_use_model(&e.model_digest, caller))
            .ok_or_else(|| AgentError::Store(StoreError::NotFound(key.clone())))?;
        if entry.device_type != target.device_type {
            Metrics::inc(&self.metrics.refused_requests);
            return Err(AgentError::Forbidden(format!(
                "cache entry {} was compiled for {}, but this request runs on {}; prepare the model for this device",
                key, entry.device_type, target.device_type
            )));
        }
        let backend: Arc<dyn Backend> = self.backends.by_name(&entry.backend).ok_or_else(|| {
            AgentError::Select(SelectError::UnknownBackend(entry.backend.clone()))
        })?;
        let pin = self.store.pin(key)?;
        let pin = self.verified_once(key, pin, &backend).await?;
        Ok(Runnable {
            backend,
            artifact_dir: entry.dir.clone(),
            devices: target.devices,
            device_type: target.device_type,
            _pin: pin,
        })
    }

    /// Checks an entry's files against its record on its first use in this
    /// process; an entry that fails is removed. One check per entry:
    /// requests arriving together (after a restart, or right after the
    /// compile) wait for the first's instead of each re-reading the entry.
    async fn verified_once(
        &self,
        key: &CacheKey,
        pin: crate::cache::Pin,
        backend: &Arc<dyn Backend>,
    ) -> Result<crate::cache::Pin, AgentError> {
        let is_verified = || {
            self.verified
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(key)
        };
        if is_verified() {
            return Ok(pin);
        }
        let gate = self
            .verifying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(key.clone())
            .or_default()
            .clone();
        let _turn = gate.lock().await;
        if is_verified() {
            return Ok(pin);
        }
        let store = self.store.clone();
        let k = key.clone();
        let verdict = tokio::task::spawn_blocking(move || store.verify(&k))
            .await
            .map_err(join_err)?;
        if let Err(e) = verdict {
            tracing::error!(key = %key, error = %e, "cache entry failed verification; removed");
            drop(pin);
            self.store.quarantine(key);
            backend.cleanup(key);
            self.verifying
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(key);
            return Err(AgentError::Store(StoreError::Corrupt {
                key: key.clone(),
                reason: format!("{e}; it was removed, prepare the model again"),
            }));
        }
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.clone());
        self.verifying
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        Ok(pin)
    }

    /// One pass of the worker reaper: the backends stop every process tied
    /// to an allocation whose token record is gone or lapsed (the device
    /// plugin removes it when the pod is gone), so that its models and
    /// device memory do not stay behind for the device's next pod. Answers
    /// how many processes were released.
    pub async fn release_ended_workers(&self) -> usize {
        let now = crate::cache::store::now_ms();
        let live = match self.tokens.live_tokens(now) {
            Ok(Some(live)) => live,
            // No state dir: no allocations, nothing is tied to one.
            Ok(None) => return 0,
            Err(e) => {
                // Deciding on a partial view could stop a live pod's worker.
                tracing::warn!(error = %e, "token records cannot be listed; no worker released this time");
                return 0;
            }
        };
        let mut released = 0;
        for b in self.backends.all() {
            released += b.release_ended(&live).await;
        }
        released
    }

    /// Deletes an entry and lets its backend free what it holds. A pod may
    /// delete only entries of models no other namespace holds (the compile
    /// may have taken hours, and it is theirs too); the admin may delete any.
    pub fn delete(&self, key: &CacheKey, caller: &Caller) -> Result<u64, AgentError> {
        let entry = self
            .store
            .lookup(key)
            .filter(|e| self.may_use_model(&e.model_digest, caller))
            .ok_or_else(|| AgentError::Store(StoreError::NotFound(key.clone())))?;
        if let Some(ns) = caller.namespace() {
            let others = self.access.others(Kind::Model, &entry.model_digest, ns);
            if !others.is_empty() {
                Metrics::inc(&self.metrics.refused_requests);
                return Err(AgentError::Forbidden(format!(
                    "cache entry {key} is also used by {} other namespace(s) or shared by the cluster operator; only the operator may delete it (kubectl inference cache --delete, with the agent's admin token)",
                    others.len()
                )));
            }
        }
        let entry = Some(entry);
        let size = self.store.delete(key)?;
        self.verified
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
        if let Some(b) = entry.and_then(|e| self.backends.by_name(&e.backend)) {
            b.cleanup(key);
        }
        Ok(size)
    }
}

/// What a detached compile needs of the agent.
struct CompileContext {
    store: Arc<CacheStore>,
    models: Arc<ModelRegistry>,
    metrics: Arc<Metrics>,
    backend: Arc<dyn Backend>,
    model: ResolvedModel,
    /// The bytes promised to the compile's output, until it ends.
    promise: crate::quota::Reservation,
}

async fn run_compile(
    ctx: CompileContext,
    leader: crate::cache::Leader,
    ticket: Ticket,
    mut job: CompileJob,
    inputs: KeyInputs,
) {
    let CompileContext {
        store,
        models,
        metrics,
        backend,
        model,
        promise: _promise,
    } = ctx;
    let key = leader.key().clone();
    let fail = |leader: crate::cache::Leader, status: u16, message: String| {
        Metrics::inc(&metrics.compiles_failed);
        tracing::warn!(key = %key, status, error = %message, "compile failed");
        leader.finish(CompileState::Failed { status, message });
    };
    // The previous leader may have committed between our lookup and join.
    if store.lookup(&key).is_some() {
        leader.finish(CompileState::Ready);
        return;
    }
    let progress = leader.progress_fn();
    // The model's files stay while the compile (and its wait) lasts: a hub
    // download is never evicted from under it.
    let _reading = models.hold(&model.digest);
    if let Ticket::Queued { ahead, .. } = &ticket {
        progress(
            0.0,
            &format!("queued: {ahead} compile(s) ahead on this node"),
        );
    }
    // Held until the compile ends: at most --max-concurrent-compiles run.
    let Some(_slot) = ticket.wait().await else {
        return fail(leader, 503, "the agent is shutting down".into());
    };
    Metrics::inc(&metrics.compiles_started);
    let started = std::time::Instant::now();
    tracing::info!(key = %key, backend = %inputs.backend, model = %inputs.model_digest, "compile started");
    // Files on the node may have changed since they were registered: what a
    // compile reads must still be what its key names, or every namespace
    // sharing the model would get an entry built from other weights.
    progress(0.0, "verify model files");
    let verified = {
        let (models, model) = (models.clone(), model.clone());
        tokio::task::spawn_blocking(move || models.verify(&model)).await
    };
    let stamps = match verified {
        Ok(Ok(stamps)) => stamps,
        Ok(Err(e)) => return fail(leader, e.http_status(), e.to_string()),
        Err(e) => return fail(leader, 500, e.to_string()),
    };
    let staging = match store.stage(&key) {
        Ok(s) => s,
        Err(e) => return fail(leader, 500, e.to_string()),
    };
    job.output_dir = staging.dir.clone();
    if let Err(e) = backend.compile(job, progress.clone()).await {
        if matches!(e, BackendError::Malformed(_)) {
            Metrics::inc(&metrics.models_malformed);
        }
        return fail(leader, e.http_status(), e.to_string());
    }
    if let Err(e) = models.unchanged(&model, &stamps) {
        return fail(leader, e.http_status(), e.to_string());
    }
    progress(1.0, "verify");
    let committed = tokio::task::spawn_blocking(move || store.commit(staging, inputs)).await;
    match committed {
        Ok(Ok(entry)) => {
            tracing::info!(key = %key, bytes = entry.size_bytes, ms = started.elapsed().as_millis() as u64, "compile committed");
            leader.finish(CompileState::Ready);
        }
        Ok(Err(e)) => fail(leader, 500, e.to_string()),
        Err(e) => fail(leader, 500, e.to_string()),
    }
}

/// Reads an entry's chat template and tokenizer (blocking). The template
/// comes from the entry's GGUF (`tokenizer.chat_template`), else from the
/// model's HuggingFace files (compiles keep only what the engine reads); the
/// tokenizer is the engine's: `tokenizer.json` beside the artifact (or the
/// model's), else the GGUF's vocabulary.
fn load_chat_model(
    dir: &std::path::Path,
    model: Option<&ResolvedModel>,
    models: &ModelRegistry,
) -> Result<ChatModel, AgentError> {
    use candle_core::quantized::gguf_file::Content;
    let gguf_path = dir.join("model.gguf");
    let gguf = if gguf_path.is_file() {
        let mut f = std::fs::File::open(&gguf_path)
            .map_err(|e| AgentError::BadRequest(format!("cannot read the entry's GGUF: {e}")))?;
        Content::read(&mut f).ok()
    } else {
        None
    };
    let model_file = |name: &str| -> Result<Option<Vec<u8>>, AgentError> {
        match model {
            Some(m) => Ok(models.read_model_file(m, name, MAX_CHAT_FILE)?),
            None => Ok(None),
        }
    };
    let as_json =
        |b: Option<Vec<u8>>| b.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    let mut template = None;
    if let Some(c) = &gguf {
        let md = &c.metadata;
        if let Some(src) = md
            .get("tokenizer.chat_template")
            .and_then(|v| v.to_string().ok())
        {
            let tokens = md
                .get("tokenizer.ggml.tokens")
                .and_then(|v| v.to_vec().ok());
            let token = |name: &str| -> Option<String> {
                let id = md.get(name)?.to_u32().ok()? as usize;
                tokens.as_ref()?.get(id)?.to_string().ok().cloned()
            };
            template = Some(crate::chat::ChatTemplate {
                source: src.clone(),
                bos_token: token("tokenizer.ggml.bos_token_id"),
                eos_token: token("tokenizer.ggml.eos_token_id"),
                unk_token: token("tokenizer.ggml.unknown_token_id"),
                pad_token: token("tokenizer.ggml.padding_token_id"),
            });
        }
    }
    if template.is_none() {
        let config = as_json(model_file("tokenizer_config.json")?);
        let jinja =
            model_file("chat_template.jinja")?.map(|b| String::from_utf8_lossy(&b).into_owned());
        let ct_json = as_json(model_file("chat_template.json")?);
        template =
            crate::chat::ChatTemplate::from_hf_files(config.as_ref(), jinja, ct_json.as_ref())?;
    }
    let from_bytes = |b: Vec<u8>| {
        tokenizers::Tokenizer::from_bytes(b)
            .map_err(|e| AgentError::BadRequest(format!("tokenizer.json cannot be read: {e}")))
    };
    let artifact_tok = dir.join("tokenizer.json");
    let tokenizer = if artifact_tok.is_file() {
        let b = std::fs::read(&artifact_tok)
            .map_err(|e| AgentError::BadRequest(format!("tokenizer.json cannot be read: {e}")))?;
        Some(from_bytes(b)?)
    } else if let Some(b) = model_file("tokenizer.json")? {
        Some(from_bytes(b)?)
    } else {
        gguf.as_ref()
            .and_then(|c| crate::backend::cpu::tokenizer::from_gguf(c).ok())
    };
    Ok(ChatModel {
        template,
        tokenizer,
    })
}

fn tokenize_with(chat: &ChatModel, text: &str) -> Result<Vec<u32>, AgentError> {
    let tokenizer = chat.tokenizer.as_ref().ok_or_else(|| {
        AgentError::BadRequest(
            "this model has no tokenizer in the agent, so text cannot be tokenized; send \"input_ids\"".into(),
        )
    })?;
    Ok(tokenizer
        .encode(text, false)
        .map_err(|e| AgentError::BadRequest(format!("the text cannot be tokenized: {e}")))?
        .get_ids()
        .to_vec())
}
