//! The built-in `cpu` backend: llama-family models in-process, on llama.cpp
//! (GGUF) and candle (safetensors, and GGUF without a vocabulary).

pub mod arch;
pub mod compile;
pub mod engine;
pub mod gguf_check;
pub mod hf_config;
pub mod llama_cpp;
pub mod probe;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use rm_crds::{CompileOptions, DeviceType, Priority};
use tokio::sync::Semaphore;

use super::{
    Availability, Backend, BackendError, BackendInfo, CompileJob, ForwardJob, ForwardOutput,
    GenerateJob, ModelRef, ProgressFn, Prompt, SequenceOutput, TokenFn,
};
use crate::cache::CacheKey;
use crate::source::ModelFormat;
pub use engine::{EngineOptions, GgufEngine, LoadedModel};
pub use probe::{ModelChecker, ProbeConfig};

/// candle's version, part of every cpu cache key.
pub const CANDLE_VERSION: &str = "0.11.1";
/// Loaded models kept in memory at once.
const MAX_LOADED: usize = 4;

type LoadedMap = Mutex<HashMap<CacheKey, (Arc<LoadedModel>, u64)>>;

pub struct CpuBackend {
    loaded: Arc<LoadedMap>,
    /// One candle generation at a time: it uses every core for one
    /// sequence, so running two at once only makes both slower. llama.cpp
    /// models take it only to load; their scheduler batches sequences.
    compute: Arc<Semaphore>,
    options: EngineOptions,
    /// Every GGUF file passes here before it is opened in-process.
    checker: ModelChecker,
}

impl Default for CpuBackend {
    fn default() -> Self {
        CpuBackend::new(EngineOptions::default())
    }
}

impl CpuBackend {
    pub fn new(options: EngineOptions) -> Self {
        CpuBackend {
            loaded: Arc::new(Mutex::new(HashMap::new())),
            compute: Arc::new(Semaphore::new(1)),
            options,
            checker: ModelChecker::new(None, options.gguf_engine),
        }
    }

    /// Checks each GGUF file in a child process (`probe`) before opening it,
    /// besides the in-process header walk every file gets. The agent's
    /// `main` sets it; library users (tests) whose binary is not the agent
    /// keep to the walk.
    pub fn with_probe(mut self, probe: ProbeConfig) -> Self {
        self.checker = ModelChecker::new(Some(probe), self.options.gguf_engine);
        self
    }
}

/// The checker's name for a model's source file.
fn source_id(model_digest: &str) -> String {
    format!("model:{model_digest}")
}

/// The checker's name for an entry's artifact.
fn entry_id(key: &CacheKey) -> String {
    format!("entry:{key}")
}

impl CpuBackend {
    /// Runs `work` on the entry's model (loaded on first use) on a blocking
    /// thread: one request at a time on candle; on llama.cpp the permit is
    /// let go once the model is loaded, and the model's scheduler batches.
    async fn with_model<T, F>(
        &self,
        key: CacheKey,
        dir: PathBuf,
        work: F,
    ) -> Result<T, BackendError>
    where
        T: Send + 'static,
        F: FnOnce(&LoadedModel) -> Result<T, BackendError> + Send + 'static,
    {
        let loaded_already = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(&key);
        let gguf = dir.join("model.gguf");
        // The entry was checked when it was compiled, but perhaps by an agent
        // before this one (restart, upgrade): once per process.
        if !loaded_already && gguf.is_file() {
            self.checker.check(&entry_id(&key), &gguf).await?;
        }
        let permit = self
            .compute
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| BackendError::Unavailable("the agent is shutting down".into()))?;
        let loaded = self.loaded.clone();
        let options = self.options;
        // The permit goes with the work, not with this future: a caller that
        // goes away (future dropped) must not free the slot while the
        // blocking work still runs (it stops at its next step, see `Cancel`).
        tokio::task::spawn_blocking(move || {
            let mut permit = Some(permit);
            let model = loaded_model(&loaded, &key, &dir, &options)?;
            if model.max_concurrent() > 1 {
                drop(permit.take());
            }
            let result = work(&model);
            drop(permit);
            result
        })
        .await
        .map_err(join_err)?
    }
}

fn join_err(e: tokio::task::JoinError) -> BackendError {
    BackendError::Internal(format!("the cpu task failed: {e}"))
}

static TICK: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The loaded model for an entry, loading it on first use. Blocking.
fn loaded_model(
    loaded: &LoadedMap,
    key: &CacheKey,
    dir: &std::path::Path,
    options: &EngineOptions,
) -> Result<Arc<LoadedModel>, BackendError> {
    {
        let tick = TICK.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        {
            let mut map = loaded.lock().unwrap_or_else(|p| p.into_inner());
            if let Some((m, t)) = map.get_mut(key) {
                *t = tick;
                return Ok(m.clone());
            }
        }
        let started = std::time::Instant::now();
        let m = Arc::new(LoadedModel::load(dir, options)?);
        tracing::info!(key = %key, engine = m.engine(), ms = started.elapsed().as_millis() as u64, bytes = m.bytes, "model loaded");
        let mut map = loaded.lock().unwrap_or_else(|p| p.into_inner());
        while map.len() >= MAX_LOADED {
            let oldest = map
                .iter()
                .min_by_key(|(_, (_, t))| *t)
                .map(|(k, _)| k.clone());
            match oldest {
                Some(k) => map.remove(&k),
                None => break,
            };
        }
        map.insert(key.clone(), (m.clone(), tick));
        Ok(m)
    }
}

impl Backend for CpuBackend {
    fn info(&self) -> BackendInfo {
        BackendInfo {
            name: "cpu".into(),
            display_name: "CPU (llama.cpp and candle, in-process)".into(),
            version: crate::VERSION.into(),
            vendor: "rm-abstract".into(),
            priority: Priority::LOWEST,
            device_types: vec![DeviceType::Cpu],
            compiler_version: format!("candle-{CANDLE_VERSION}+rm-agent-{}", crate::VERSION),
        }
    }

    fn probe(&self) -> Availability {
        Availability::yes()
    }

    /// Safetensors by `model_type` (`arch`); every GGUF, as before: its
    /// architecture is checked in the isolated probe at compile, not read
    /// in-process here.
    fn accepts(&self, model: &ModelRef<'_>) -> Result<(), String> {
        match model.format {
            ModelFormat::Safetensors => arch::accepts_dir(model.path),
            ModelFormat::Gguf => Ok(()),
        }
    }

    fn status(&self) -> serde_json::Value {
        let map = self.loaded.lock().unwrap_or_else(|p| p.into_inner());
        serde_json::json!({
            "loaded_models": map
                .iter()
                .map(|(k, (m, _))| serde_json::json!({"key": k.as_str(), "engine": m.engine()}))
                .collect::<Vec<_>>(),
            "threads": self.options.threads,
            "max_batch": self.options.max_batch,
            "gguf_engine": format!("{:?}", self.options.gguf_engine),
            "llama_cpp": format!("llama-cpp-sys-2 {}", llama_cpp::LLAMA_CPP_SYS_VERSION),
        })
    }

    fn validate(&self, options: &CompileOptions, format: ModelFormat) -> Result<(), BackendError> {
        compile::validate(options, format)
    }

    fn compile(
        &self,
        job: CompileJob,
        progress: ProgressFn,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            if job.model_format == ModelFormat::Gguf {
                self.checker
                    .check(&source_id(&job.model_digest), &job.model_path)
                    .await?;
            }
            let (key, out) = (job.key.clone(), job.output_dir.clone());
            let same_bytes = tokio::task::spawn_blocking(move || {
                compile::compile(&job, &progress)?;
                // A GGUF copied as it came is the file just checked.
                let manifest = compile::ArtifactManifest::read(&job.output_dir)?;
                Ok::<_, BackendError>(
                    job.model_format == ModelFormat::Gguf && manifest.dtype == "source",
                )
            })
            .await
            .map_err(join_err)??;
            let gguf = out.join("model.gguf");
            if same_bytes {
                self.checker.vouch(&entry_id(&key));
            } else if gguf.is_file() {
                // Written by the agent, but from the source's metadata (or a
                // config.json's numbers): llama.cpp may still abort on it.
                self.checker.check(&entry_id(&key), &gguf).await?;
            }
            Ok(())
        })
    }

    fn generate(
        &self,
        job: GenerateJob,
        on_token: Option<TokenFn>,
    ) -> BoxFuture<'_, Result<Vec<SequenceOutput>, BackendError>> {
        let (key, dir) = (job.key.clone(), job.artifact_dir.clone());
        Box::pin(self.with_model(key, dir, move |model| {
            run_batch(model, &job, on_token.as_ref())
        }))
    }

    fn forward(&self, job: ForwardJob) -> BoxFuture<'_, Result<Vec<ForwardOutput>, BackendError>> {
        let (key, dir) = (job.key.clone(), job.artifact_dir.clone());
        Box::pin(self.with_model(key, dir, move |model| {
            job.input_ids
                .iter()
                .map(|ids| model.forward(ids, job.logits_to_keep, &job.cancel))
                .collect()
        }))
    }

    /// `--cpu-max-batch` for GGUF entries llama.cpp runs (known once
    /// loaded; before, what the engine option makes likely), else one.
    fn concurrent_requests(&self, key: &CacheKey, artifact_dir: &std::path::Path) -> usize {
        if let Some((m, _)) = self
            .loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return m.max_concurrent();
        }
        let gguf = artifact_dir.join("model.gguf").is_file();
        if gguf && self.options.gguf_engine != GgufEngine::Candle && llama_cpp::cpu_supported() {
            self.options.max_batch.max(1)
        } else {
            1
        }
    }

    fn cleanup(&self, key: &CacheKey) {
        self.loaded
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

/// Runs every prompt of a batch, one after the other (each has its own KV
/// cache; candle's llama has no padding mask for mixed lengths).
pub fn run_batch(
    model: &LoadedModel,
    job: &GenerateJob,
    on_token: Option<&TokenFn>,
) -> Result<Vec<SequenceOutput>, BackendError> {
    if let Some(max) = model.max_batch.filter(|m| job.prompts.len() > *m) {
        return Err(BackendError::InvalidRequest(format!(
            "{} prompts exceed the batch size {max} this artifact was compiled for",
            job.prompts.len()
        )));
    }
    let ids: Vec<Vec<u32>> = job
        .prompts
        .iter()
        .map(|p| match p {
            Prompt::Ids(ids) => Ok(ids.clone()),
            Prompt::Text(t) => model.encode(t),
        })
        .collect::<Result<_, _>>()?;
    for p in &ids {
        model.check_prompt(p, job.params.max_new_tokens)?;
    }
    let mut outputs = Vec::with_capacity(ids.len());
    for (index, prompt) in ids.iter().enumerate() {
        let (tokens, finish_reason) =
            model.generate(prompt, &job.params, &job.cancel, |id, piece| {
                if let Some(f) = on_token {
                    f(index, id, piece);
                }
            })?;
        outputs.push(SequenceOutput {
            prompt_tokens: prompt.len(),
            text: model.decode(&tokens),
            token_ids: tokens,
            finish_reason,
        });
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cpu_backend_refuses_every_extra_option() {
        let cpu = CpuBackend::default();
        let mut o = CompileOptions::default();
        assert!(cpu.validate(&o, ModelFormat::Safetensors).is_ok());
        for key in ["trust_remote_code", "max_prompt_len", "x"] {
            o.extra.clear();
            o.extra.insert(key.into(), "true".into());
            match cpu.validate(&o, ModelFormat::Safetensors) {
                Err(BackendError::InvalidRequest(m)) => {
                    assert!(m.contains(&format!("{key:?}")), "{m}");
                    assert!(m.contains("takes no extra options"), "{m}");
                    assert!(m.contains("allowed keys: none"), "{m}");
                }
                other => panic!("{key}: expected an InvalidRequest, got {other:?}"),
            }
        }
    }
}
