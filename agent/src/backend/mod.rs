//! Backends: the plugin interface (metadata, availability probe, compile,
//! generate, forward, cleanup), the registry, and selection by priority.
//!
//! The built-in `cpu` backend runs models in-process; external backends are
//! worker programs (see `worker`). Both look the same to the rest of the agent.
//! Vendor options (`options.extra`) are checked against each worker's typed
//! allow-list (see `extra`); the cpu backend takes none.

pub mod cpu;
pub mod extra;
pub mod worker;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::future::BoxFuture;
use rm_crds::{CompileOptions, DeviceType, Priority};
use serde::{Deserialize, Serialize};

use crate::cache::CacheKey;
use crate::source::ModelFormat;

/// What a backend says about itself.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct BackendInfo {
    pub name: String,
    pub display_name: String,
    pub version: String,
    pub vendor: String,
    pub priority: Priority,
    pub device_types: Vec<DeviceType>,
    /// Part of the cache key: a new compiler gives new entries.
    pub compiler_version: String,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct Availability {
    pub available: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

impl Availability {
    pub fn yes() -> Self {
        Availability {
            available: true,
            reason: None,
        }
    }
    pub fn no(reason: impl Into<String>) -> Self {
        Availability {
            available: false,
            reason: Some(reason.into()),
        }
    }
}

/// Progress callback: fraction 0..1 and a short stage name.
pub type ProgressFn = Arc<dyn Fn(f32, &str) + Send + Sync>;

/// Token callback for streaming: (sequence index, token id, text piece).
pub type TokenFn = Arc<dyn Fn(usize, u32, Option<&str>) + Send + Sync>;

/// Set when the request that started some work is gone (its client left,
/// or its deadline passed). Long work checks it between steps (prompt
/// chunks, tokens) and stops, so that it gives its slot back within one step
/// instead of running on for no one.
#[derive(Clone, Debug, Default)]
pub struct Cancel(Arc<std::sync::atomic::AtomicBool>);

impl Cancel {
    pub fn cancel(&self) {
        self.0.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// `Err(Cancelled)` once cancelled: for `?` between steps.
    pub fn check(&self) -> Result<(), BackendError> {
        if self.is_cancelled() {
            return Err(BackendError::Cancelled);
        }
        Ok(())
    }
}

/// The admission slot a request runs in (`--concurrent-requests`; see
/// `service::Agent::admitted`). The agent puts its permit here before the
/// work starts. A backend whose work goes on after the request's future is
/// dropped (a worker process still busy with a request whose client hung
/// up) takes the permit along with the work, so that the slot is freed when
/// the work has stopped, not when the client left: otherwise each hang-up
/// would admit one more request behind the busy one. Left here, it is freed
/// with the request.
#[derive(Clone, Default)]
pub struct Slot(Arc<std::sync::Mutex<Option<SlotGuard>>>);

/// A taken [`Slot`]: dropping it frees the slot for the next request.
pub struct SlotGuard {
    _permit: Box<dyn Send + Sync>,
}

impl Slot {
    pub fn put(&self, permit: impl Send + Sync + 'static) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(SlotGuard {
            _permit: Box::new(permit),
        });
    }

    /// The permit, once: `None` when there is none or it was taken.
    pub fn take(&self) -> Option<SlotGuard> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).take()
    }
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let held = self.0.lock().map(|s| s.is_some()).unwrap_or(false);
        f.debug_struct("Slot").field("held", &held).finish()
    }
}

/// The allocation (device plugin token) a job runs for. Worker backends tie
/// their processes to it: a process serves one allocation and is released
/// when the allocation ends (see `worker`). The cpu backend ignores it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllocationRef {
    /// The token's SHA-256: the allocation lives while its record does.
    pub token_sha256: String,
    /// The pod that holds it (for logs).
    pub owner: rm_crds::token::TokenOwner,
    /// The kubelet's resource name and device IDs (with `::N` for shared
    /// devices): the kubelet never gives one ID to two live containers, so an
    /// allocation that shares one with an older one has replaced it.
    pub resource_name: String,
    pub device_ids: Vec<String>,
}

impl AllocationRef {
    /// Whether `self` holds a device the kubelet has since given to `newer`
    /// (another token): then `self` has ended, whether or not its record is
    /// gone yet. The device plugin supersedes records by the same rule.
    pub fn replaced_by(&self, newer: &AllocationRef) -> bool {
        self.token_sha256 != newer.token_sha256
            && self.resource_name == newer.resource_name
            && self
                .device_ids
                .iter()
                .any(|id| newer.device_ids.contains(id))
    }
}

/// One compile: read `model_path`, write the artifact into `output_dir`.
#[derive(Clone, Debug)]
pub struct CompileJob {
    pub key: CacheKey,
    /// The model's content digest (`sha256:...`).
    pub model_digest: String,
    pub model_path: PathBuf,
    pub model_format: ModelFormat,
    pub device_type: DeviceType,
    pub devices: Vec<String>,
    pub options: CompileOptions,
    pub output_dir: PathBuf,
    /// The caller's allocation (`None`: a caller without a token).
    pub allocation: Option<AllocationRef>,
}

/// One prompt: token ids, or text the backend tokenizes.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Prompt {
    Ids(Vec<u32>),
    Text(String),
}

/// Sampling and stopping, with transformers' meanings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GenerationParams {
    pub max_new_tokens: usize,
    pub do_sample: bool,
    pub temperature: f64,
    pub top_p: Option<f64>,
    pub top_k: Option<usize>,
    pub seed: u64,
    /// Stop tokens; empty means the model's own EOS.
    pub eos_token_ids: Vec<u32>,
    /// Stop at EOS at all (false: always generate `max_new_tokens`).
    pub stop_at_eos: bool,
    /// transformers' `repetition_penalty`: every token id already in the
    /// prompt or the output has its logit divided (positive) or multiplied
    /// (negative) by it before sampling or argmax. 1.0 is off. Defaulted, so
    /// that a message from before these fields still reads.
    #[serde(default = "no_penalty")]
    pub repetition_penalty: f64,
    /// transformers' `min_new_tokens`: until this many tokens were generated
    /// the EOS ids cannot be chosen.
    #[serde(default)]
    pub min_new_tokens: usize,
}

fn no_penalty() -> f64 {
    1.0
}

#[derive(Clone, Debug)]
pub struct GenerateJob {
    pub key: CacheKey,
    pub artifact_dir: PathBuf,
    pub devices: Vec<String>,
    pub prompts: Vec<Prompt>,
    pub params: GenerationParams,
    pub cancel: Cancel,
    /// The request's admission slot, for work that outlives its future.
    pub slot: Slot,
    /// The caller's allocation (`None`: a caller without a token).
    pub allocation: Option<AllocationRef>,
}

/// One forward pass: the logits after each position of each sequence,
/// transformers' `model(input_ids).logits`.
#[derive(Clone, Debug)]
pub struct ForwardJob {
    pub key: CacheKey,
    pub artifact_dir: PathBuf,
    pub devices: Vec<String>,
    pub input_ids: Vec<Vec<u32>>,
    /// transformers' `logits_to_keep`: 0 keeps every position, k the last k.
    pub logits_to_keep: usize,
    pub cancel: Cancel,
    /// The request's admission slot, for work that outlives its future.
    pub slot: Slot,
    /// The caller's allocation (`None`: a caller without a token).
    pub allocation: Option<AllocationRef>,
}

/// The logits of one sequence: `positions` rows of `vocab_size`, row-major.
/// On the wire (API and worker protocol) `logits` is base64 of little-endian
/// f32: a 49 152-word vocabulary makes 262 KB per position, not the ~1 MB of
/// JSON numbers, and numpy reads it without parsing.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ForwardOutput {
    pub positions: usize,
    pub vocab_size: usize,
    #[serde(with = "f32le_base64")]
    pub logits: Vec<f32>,
}

mod f32le_base64 {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    use serde::{Deserialize, Deserializer, Serializer, de::Error};

    pub fn serialize<S: Serializer>(v: &[f32], s: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
        s.serialize_str(&STANDARD.encode(bytes))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<f32>, D::Error> {
        let text = String::deserialize(d)?;
        let bytes = STANDARD
            .decode(text.as_bytes())
            .map_err(|e| D::Error::custom(format!("logits are not base64: {e}")))?;
        if bytes.len() % 4 != 0 {
            return Err(D::Error::custom(
                "logits are not a whole number of f32 values",
            ));
        }
        Ok(bytes
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect())
    }
}

impl ForwardOutput {
    /// Checks the shape a backend answered against what was asked.
    pub fn checked(self, want_positions: usize) -> Result<Self, BackendError> {
        if self.positions != want_positions
            || self.vocab_size == 0
            || self.logits.len() != self.positions * self.vocab_size
        {
            return Err(BackendError::Internal(format!(
                "forward answered {} values for {} positions x {} vocabulary, expected {want_positions} positions",
                self.logits.len(),
                self.positions,
                self.vocab_size
            )));
        }
        Ok(self)
    }
}

/// How many positions a forward keeps: transformers' rule (0 = all).
pub fn kept_positions(len: usize, logits_to_keep: usize) -> usize {
    if logits_to_keep == 0 {
        len
    } else {
        logits_to_keep.min(len)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Eos,
    Length,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SequenceOutput {
    pub prompt_tokens: usize,
    pub token_ids: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
    pub finish_reason: FinishReason,
}

#[derive(Clone, Debug, thiserror::Error)]
pub enum BackendError {
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Unsupported(String),
    /// The model file breaks its format, or crashed a reader in the isolated
    /// check (`cpu::probe`).
    #[error("the model file is malformed: {0}")]
    Malformed(String),
    #[error("backend unavailable: {0}")]
    Unavailable(String),
    #[error("worker failed: {0}")]
    Worker(String),
    #[error("worker did not answer within {0} s; the request was stopped")]
    Timeout(u64),
    #[error("{0}")]
    Io(String),
    #[error("internal error: {0}")]
    Internal(String),
    /// The request was withdrawn (client gone or deadline passed); nobody
    /// reads this answer but the logs and metrics.
    #[error("cancelled: the request's client went away or its deadline passed")]
    Cancelled,
}

impl BackendError {
    pub fn http_status(&self) -> u16 {
        match self {
            BackendError::InvalidRequest(_) => 400,
            BackendError::Unsupported(_) | BackendError::Malformed(_) => 422,
            BackendError::Unavailable(_) => 503,
            BackendError::Worker(_) => 502,
            BackendError::Timeout(_) => 504,
            BackendError::Io(_) | BackendError::Internal(_) => 500,
            // nginx's "client closed request": the client is gone.
            BackendError::Cancelled => 499,
        }
    }
}

/// The model a prepare is about, as selection sees it: where it is and in
/// which format. Nothing is loaded to look at it.
#[derive(Clone, Copy, Debug)]
pub struct ModelRef<'a> {
    /// The `.gguf` file, or the directory with `config.json`.
    pub path: &'a Path,
    pub format: ModelFormat,
}

/// The plugin interface. Every method must fail with an error, never panic,
/// whatever the request holds.
pub trait Backend: Send + Sync {
    fn info(&self) -> BackendInfo;
    fn probe(&self) -> Availability;
    /// Whether this backend can serve `model` at all (its format, its
    /// architecture), judged from metadata only. `Err` says why not, in one
    /// line; selection then passes on to the next backend. A malformed model
    /// is not refused here: the compile says what is wrong with it.
    fn accepts(&self, model: &ModelRef<'_>) -> Result<(), String> {
        let _ = model;
        Ok(())
    }
    /// Extra facts for `GET /v1/backends` (worker restarts, loaded models).
    fn status(&self) -> serde_json::Value {
        serde_json::Value::Null
    }
    /// Checks options before a compile is started, so bad options get a 400
    /// and never a cache entry.
    fn validate(&self, options: &CompileOptions, format: ModelFormat) -> Result<(), BackendError>;
    fn compile(
        &self,
        job: CompileJob,
        progress: ProgressFn,
    ) -> BoxFuture<'_, Result<(), BackendError>>;
    fn generate(
        &self,
        job: GenerateJob,
        on_token: Option<TokenFn>,
    ) -> BoxFuture<'_, Result<Vec<SequenceOutput>, BackendError>>;
    /// Logits for whole sequences (`POST /v1/forward`). Optional: a backend
    /// whose device SDK only generates says so with a 422.
    fn forward(&self, job: ForwardJob) -> BoxFuture<'_, Result<Vec<ForwardOutput>, BackendError>> {
        let name = self.info().name;
        drop(job);
        Box::pin(async move {
            Err(BackendError::Unsupported(format!(
                "backend {name} does not return logits; use generate"
            )))
        })
    }
    /// Requests of one entry that may run at once on one device set
    /// (admission lets that many in; see `admission::Admission::enqueue_in`).
    /// One, unless the backend batches them.
    fn concurrent_requests(&self, key: &CacheKey, artifact_dir: &Path) -> usize {
        let _ = (key, artifact_dir);
        1
    }
    /// Frees what the backend holds for an entry (deleted or evicted).
    fn cleanup(&self, key: &CacheKey);
    /// Stops what runs for allocations that ended: every process tied to a
    /// token whose SHA-256 is not in `live`. Answers how many were released.
    /// In-process backends hold nothing per allocation.
    fn release_ended(&self, live: &HashSet<String>) -> BoxFuture<'_, usize> {
        let _ = live;
        Box::pin(async { 0 })
    }
    /// Stops worker processes; called at shutdown.
    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
}

/// All backends of this agent.
#[derive(Default, Clone)]
pub struct Registry {
    backends: Vec<Arc<dyn Backend>>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SelectError {
    #[error("no backend named {0:?}; GET /v1/backends lists them")]
    UnknownBackend(String),
    #[error("backend {backend:?} does not run on {device}; it supports {supported}")]
    WrongDevice {
        backend: String,
        device: DeviceType,
        supported: String,
    },
    #[error("backend {backend:?} cannot run this model: {reason}")]
    Refused { backend: String, reason: String },
    /// No backend for the device is up, or those that are refuse the model
    /// while another one that might take it is down: installing or fixing
    /// a backend helps (503).
    #[error("no available backend for device {device}{why}")]
    NoneAvailable { device: DeviceType, why: String },
    /// Every backend for the device is up and refuses the model (422).
    #[error("no backend for device {device} can run this model:{why}")]
    NoneFits { device: DeviceType, why: String },
}

/// A candidate for selection: what the pure chooser needs to know.
#[derive(Clone, Debug)]
pub struct Candidate {
    pub info: BackendInfo,
    pub availability: Availability,
    /// [`Backend::accepts`] for the model being prepared.
    pub fit: Result<(), String>,
}

/// One line per backend, for the errors that list them.
fn reason_lines(reasons: &[String]) -> String {
    reasons.iter().map(|r| format!("\n  {r}")).collect()
}

/// Picks the backend: the named one if given (it must support the device,
/// be available and accept the model), else the highest-priority available
/// backend for the device type that accepts the model; ties go to the
/// earlier registered (built-in first, then plugins by name). So a worker of
/// the same priority as the built-in `cpu` serves only what `cpu` refuses.
pub fn select(
    candidates: &[Candidate],
    device: DeviceType,
    name: Option<&str>,
) -> Result<usize, SelectError> {
    if let Some(name) = name.filter(|n| *n != "auto") {
        let i = candidates
            .iter()
            .position(|c| c.info.name == name)
            .ok_or_else(|| SelectError::UnknownBackend(name.to_string()))?;
        let c = &candidates[i];
        if !c.info.device_types.contains(&device) {
            return Err(SelectError::WrongDevice {
                backend: name.to_string(),
                device,
                supported: c
                    .info
                    .device_types
                    .iter()
                    .map(|d| d.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
            });
        }
        if !c.availability.available {
            return Err(SelectError::NoneAvailable {
                device,
                why: format!(
                    ": {name} is unavailable ({})",
                    c.availability.reason.clone().unwrap_or_default()
                ),
            });
        }
        if let Err(reason) = &c.fit {
            return Err(SelectError::Refused {
                backend: name.to_string(),
                reason: reason.clone(),
            });
        }
        return Ok(i);
    }
    let mut best: Option<usize> = None;
    let mut reasons = Vec::new();
    let mut any_unavailable = false;
    for (i, c) in candidates.iter().enumerate() {
        if !c.info.device_types.contains(&device) {
            continue;
        }
        if !c.availability.available {
            any_unavailable = true;
            reasons.push(format!(
                "{}: unavailable ({})",
                c.info.name,
                c.availability.reason.clone().unwrap_or_default()
            ));
            continue;
        }
        if let Err(reason) = &c.fit {
            reasons.push(format!("{}: {reason}", c.info.name));
            continue;
        }
        if best.is_none_or(|b| c.info.priority > candidates[b].info.priority) {
            best = Some(i);
        }
    }
    best.ok_or_else(|| {
        if reasons.is_empty() {
            SelectError::NoneAvailable {
                device,
                why: "; install a worker plugin for it in --plugin-dir".into(),
            }
        } else if any_unavailable {
            SelectError::NoneAvailable {
                device,
                why: format!(" that takes this model:{}", reason_lines(&reasons)),
            }
        } else {
            SelectError::NoneFits {
                device,
                why: reason_lines(&reasons),
            }
        }
    })
}

impl Registry {
    pub fn new(backends: Vec<Arc<dyn Backend>>) -> Self {
        Registry { backends }
    }

    pub fn all(&self) -> &[Arc<dyn Backend>] {
        &self.backends
    }

    /// Every backend as a candidate for `model` on `device`; only those of
    /// that device are asked whether they accept it.
    pub fn candidates(&self, device: DeviceType, model: &ModelRef<'_>) -> Vec<Candidate> {
        self.backends
            .iter()
            .map(|b| {
                let info = b.info();
                let fit = if info.device_types.contains(&device) {
                    b.accepts(model)
                } else {
                    Ok(())
                };
                Candidate {
                    info,
                    availability: b.probe(),
                    fit,
                }
            })
            .collect()
    }

    pub fn by_name(&self, name: &str) -> Option<Arc<dyn Backend>> {
        self.backends
            .iter()
            .find(|b| b.info().name == name)
            .cloned()
    }

    pub fn select(
        &self,
        device: DeviceType,
        name: Option<&str>,
        model: &ModelRef<'_>,
    ) -> Result<Arc<dyn Backend>, SelectError> {
        let i = select(&self.candidates(device, model), device, name)?;
        Ok(self.backends[i].clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cand(name: &str, prio: u32, types: &[DeviceType], avail: bool) -> Candidate {
        Candidate {
            info: BackendInfo {
                name: name.into(),
                display_name: name.into(),
                version: "1".into(),
                vendor: "v".into(),
                priority: Priority(prio),
                device_types: types.to_vec(),
                compiler_version: "c".into(),
            },
            availability: if avail {
                Availability::yes()
            } else {
                Availability::no("no SDK")
            },
            fit: Ok(()),
        }
    }

    fn refusing(mut c: Candidate, why: &str) -> Candidate {
        c.fit = Err(why.into());
        c
    }

    #[test]
    fn logits_travel_as_base64_f32_and_shapes_are_checked() {
        let out = ForwardOutput {
            positions: 2,
            vocab_size: 3,
            logits: vec![0.5, -1.25, 3.0, f32::MIN, 0.0, 1e-7],
        };
        let wire = serde_json::to_value(&out).expect("serializes");
        assert!(wire["logits"].is_string());
        let back: ForwardOutput = serde_json::from_value(wire).expect("parses");
        assert_eq!(back, out);
        assert!(back.clone().checked(2).is_ok());
        assert!(back.checked(1).is_err());
        let bad = serde_json::json!({"positions": 1, "vocab_size": 1, "logits": "AAA="});
        assert!(serde_json::from_value::<ForwardOutput>(bad).is_err());
        assert_eq!(kept_positions(5, 0), 5);
        assert_eq!(kept_positions(5, 1), 1);
        assert_eq!(kept_positions(5, 9), 5);
    }

    fn alloc(token: &str, resource: &str, ids: &[&str]) -> AllocationRef {
        AllocationRef {
            token_sha256: token.into(),
            owner: rm_crds::token::TokenOwner {
                namespace: "ns".into(),
                pod: token.into(),
            },
            resource_name: resource.into(),
            device_ids: ids.iter().map(|s| s.to_string()).collect(),
        }
    }

    #[test]
    fn an_allocation_ends_when_the_kubelet_gives_one_of_its_ids_to_another() {
        let old = alloc("a", "nvidia.com/gpu", &["GPU-1", "GPU-2"]);
        assert!(old.replaced_by(&alloc("b", "nvidia.com/gpu", &["GPU-2"])));
        assert!(!old.replaced_by(&old.clone()), "its own requests");
        assert!(!old.replaced_by(&alloc("b", "nvidia.com/gpu", &["GPU-3"])));
        assert!(!old.replaced_by(&alloc("b", "other.io/gpu", &["GPU-1"])));
        // Shared devices: replicas of one GPU are distinct IDs, held by live
        // pods side by side.
        let shared = alloc("a", "nvidia.com/gpu", &["GPU-1::0"]);
        assert!(!shared.replaced_by(&alloc("b", "nvidia.com/gpu", &["GPU-1::1"])));
    }

    #[test]
    fn highest_available_priority_wins() {
        let c = vec![
            cand("a", 50, &[DeviceType::Gpu], true),
            cand("b", 75, &[DeviceType::Gpu], true),
            cand("c", 100, &[DeviceType::Gpu], false),
        ];
        assert_eq!(select(&c, DeviceType::Gpu, None), Ok(1));
        assert_eq!(select(&c, DeviceType::Gpu, Some("auto")), Ok(1));
    }

    #[test]
    fn ties_go_to_the_first_registered() {
        let c = vec![
            cand("a", 75, &[DeviceType::Gpu], true),
            cand("b", 75, &[DeviceType::Gpu], true),
        ];
        assert_eq!(select(&c, DeviceType::Gpu, None), Ok(0));
    }

    #[test]
    fn named_backend_must_fit_the_device() {
        let c = vec![cand("cpu", 0, &[DeviceType::Cpu], true)];
        assert!(matches!(
            select(&c, DeviceType::Gpu, Some("cpu")),
            Err(SelectError::WrongDevice { .. })
        ));
        assert!(matches!(
            select(&c, DeviceType::Cpu, Some("nope")),
            Err(SelectError::UnknownBackend(_))
        ));
        assert!(matches!(
            select(&c, DeviceType::Rbln, None),
            Err(SelectError::NoneAvailable { .. })
        ));
    }

    #[test]
    fn the_first_backend_that_accepts_the_model_wins_a_tie() {
        let builtin = cand("cpu", 0, &[DeviceType::Cpu], true);
        let worker = cand("cpu-transformers", 0, &[DeviceType::Cpu], true);
        // Both take it: the built-in, registered first.
        let c = vec![builtin.clone(), worker.clone()];
        assert_eq!(select(&c, DeviceType::Cpu, None), Ok(0));
        // The built-in refuses the architecture: the worker serves it.
        let c = vec![
            refusing(builtin.clone(), "model_type \"gpt2\" is not supported"),
            worker.clone(),
        ];
        assert_eq!(select(&c, DeviceType::Cpu, None), Ok(1));
        // A higher priority that refuses loses to a lower one that accepts.
        let c = vec![
            refusing(cand("gpu-a", 90, &[DeviceType::Gpu], true), "GGUF"),
            cand("gpu-b", 10, &[DeviceType::Gpu], true),
        ];
        assert_eq!(select(&c, DeviceType::Gpu, None), Ok(1));
    }

    #[test]
    fn when_none_accepts_each_backend_says_why_on_its_own_line() {
        let c = vec![
            refusing(
                cand("cpu", 0, &[DeviceType::Cpu], true),
                "model_type \"gpt2\" is not supported by the cpu backend",
            ),
            cand("cpu-transformers", 0, &[DeviceType::Cpu], false),
            // Another device's backend is neither asked nor listed.
            refusing(cand("gpu", 75, &[DeviceType::Gpu], true), "not listed"),
        ];
        let err = select(&c, DeviceType::Cpu, None).expect_err("none fits");
        assert!(matches!(err, SelectError::NoneAvailable { .. }), "{err:?}");
        let msg = err.to_string();
        let lines: Vec<&str> = msg.lines().collect();
        assert_eq!(lines.len(), 3, "{msg}");
        assert_eq!(
            lines[1].trim(),
            "cpu: model_type \"gpt2\" is not supported by the cpu backend"
        );
        assert_eq!(lines[2].trim(), "cpu-transformers: unavailable (no SDK)");
        // All up and all refusing: the model is the problem (422), not the node.
        let c = vec![refusing(cand("cpu", 0, &[DeviceType::Cpu], true), "no")];
        assert!(matches!(
            select(&c, DeviceType::Cpu, None),
            Err(SelectError::NoneFits { .. })
        ));
    }

    #[test]
    fn a_named_backend_that_refuses_the_model_says_why() {
        let c = vec![
            refusing(
                cand("cpu", 0, &[DeviceType::Cpu], true),
                "model_type \"gpt2\"",
            ),
            cand("cpu-transformers", 0, &[DeviceType::Cpu], true),
        ];
        assert_eq!(
            select(&c, DeviceType::Cpu, Some("cpu")),
            Err(SelectError::Refused {
                backend: "cpu".into(),
                reason: "model_type \"gpt2\"".into()
            })
        );
        assert_eq!(select(&c, DeviceType::Cpu, Some("cpu-transformers")), Ok(1));
    }
}
