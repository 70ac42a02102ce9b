//! The cpu engine: loads a compiled artifact and generates with a KV cache.
//! GGUF artifacts run on llama.cpp (`llama_cpp.rs`) when they carry
//! `tokenizer.ggml.model` (a vocabulary, or "none" in the agent's own
//! conversions, which are tokenized here), else on candle's
//! `quantized_llama`; safetensors on candle's `llama` or `qwen2`. Tokenizer,
//! sampling, EOS and streaming are shared by all of them. Blocking; the
//! backend runs it on blocking threads.

use std::collections::HashSet;
use std::fs;
use std::path::Path;
use std::sync::Arc;

use candle_core::quantized::gguf_file;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::generation::{LogitsProcessor, Sampling};
use candle_transformers::models::{llama, quantized_llama, qwen2};
use tokenizers::Tokenizer;

use super::compile::ArtifactManifest;
use super::hf_config::{self, ModelConfig};
use super::llama_cpp::{LlamaCppModel, LlamaCppSession};
use super::tokenizer::{self, IncrementalDecoder};
use crate::backend::{
    BackendError, Cancel, FinishReason, ForwardOutput, GenerationParams, kept_positions,
};

/// Tokens of a prompt fed to candle in one forward pass (see
/// `Session::prefill`): 512 keeps one head's attention scores under
/// 512 × context × 4 bytes (16 MiB at 8 192 tokens).
const PREFILL_CHUNK: usize = 512;
/// The most logits one forward answer may hold (f32): 256 MiB, about 1 300
/// positions of a 49 152-word vocabulary.
const MAX_LOGITS_BYTES: usize = 256 << 20;

/// Which engine runs GGUF artifacts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum GgufEngine {
    /// llama.cpp when the GGUF carries a vocabulary (llama.cpp needs one)
    /// and the CPU has the features llama.cpp was built for, else candle.
    #[default]
    Auto,
    LlamaCpp,
    Candle,
}

/// How the cpu backend runs models.
#[derive(Clone, Copy, Debug)]
pub struct EngineOptions {
    pub gguf_engine: GgufEngine,
    /// Threads of one generation (llama.cpp); candle uses its own pool.
    pub threads: usize,
    /// Sequences one llama.cpp model runs at once (continuous batching,
    /// `--cpu-max-batch`); candle runs one.
    pub max_batch: usize,
    /// Batched sequences get bit for bit the logits they get alone
    /// (`--cpu-exact-batching`): flash attention off, one prompt per step.
    pub exact_batching: bool,
}

/// Default of `--cpu-max-batch`.
pub const DEFAULT_MAX_BATCH: usize = 16;

impl Default for EngineOptions {
    fn default() -> Self {
        EngineOptions {
            gguf_engine: GgufEngine::Auto,
            threads: std::thread::available_parallelism()
                .map(|n| n.get())
                .unwrap_or(1),
            max_batch: DEFAULT_MAX_BATCH,
            exact_batching: false,
        }
    }
}

enum Weights {
    LlamaCpp(LlamaCppModel),
    Quantized(quantized_llama::ModelWeights),
    Full {
        model: Arc<llama::Llama>,
        config: llama::Config,
        dtype: DType,
    },
    /// Holds its KV cache inside; each session works on a clone (tensors
    /// are shared, caches are not).
    Qwen2(qwen2::ModelForCausalLM),
}

/// A model loaded in memory, shared by all requests for its cache entry.
pub struct LoadedModel {
    weights: Weights,
    pub tokenizer: Option<Tokenizer>,
    pub eos_token_ids: Vec<u32>,
    pub bos_token_id: Option<u32>,
    pub vocab_size: usize,
    pub max_seq_len: usize,
    pub max_batch: Option<usize>,
    pub bytes: u64,
}

/// One sequence's state: weights plus its own KV cache.
enum Session<'m> {
    LlamaCpp(LlamaCppSession<'m>),
    Quantized(quantized_llama::ModelWeights),
    Full {
        model: Arc<llama::Llama>,
        cache: llama::Cache,
    },
    Qwen2(qwen2::ModelForCausalLM),
}

impl Session<'_> {
    /// Logits (f32) after feeding `ids` at positions `pos..`.
    fn forward(&mut self, ids: &[u32], pos: usize) -> Result<Tensor, BackendError> {
        let candle = |r: candle_core::Result<Tensor>| r.map_err(engine_err("forward"));
        let input = || candle(Tensor::new(ids, &Device::Cpu).and_then(|t| t.unsqueeze(0)));
        let logits = match self {
            Session::LlamaCpp(s) => {
                let logits = s.forward(ids, pos, 1)?;
                let n = logits.len();
                return candle(Tensor::from_vec(logits, n, &Device::Cpu));
            }
            Session::Quantized(w) => candle(w.forward(&input()?, pos))?,
            Session::Full { model, cache } => candle(model.forward(&input()?, pos, cache))?,
            // (batch, 1, vocab): the last position only.
            Session::Qwen2(m) => candle(m.forward(&input()?, pos).and_then(|l| l.squeeze(0)))?,
        };
        candle(logits.squeeze(0).and_then(|l| l.to_dtype(DType::F32)))
    }

    /// Feeds a prompt from position `pos` and answers the logits after its
    /// last token. candle's attention over n new tokens holds an n × (pos+n)
    /// score matrix per head: fed whole, a long prompt needs memory growing
    /// with its square (gigabytes at a few thousand tokens), enough to get
    /// the agent, and every tenant's work in it, killed. Fed in chunks
    /// through the KV cache it stays linear. llama.cpp chunks by itself.
    fn prefill(
        &mut self,
        ids: &[u32],
        pos: usize,
        cancel: &Cancel,
    ) -> Result<Tensor, BackendError> {
        if matches!(self, Session::LlamaCpp(_)) {
            cancel.check()?;
            return self.forward(ids, pos);
        }
        let mut logits = None;
        for (c, chunk) in ids.chunks(PREFILL_CHUNK).enumerate() {
            cancel.check()?;
            logits = Some(self.forward(chunk, pos + c * PREFILL_CHUNK)?);
        }
        logits.ok_or_else(|| {
            BackendError::InvalidRequest("a prompt must have at least one token".into())
        })
    }

    /// The logits after each of the last `keep` tokens of `ids` (fed from
    /// position 0), row after row, and the row length.
    fn logits_rows(
        &mut self,
        ids: &[u32],
        keep: usize,
        cancel: &Cancel,
    ) -> Result<(Vec<f32>, usize), BackendError> {
        if let Session::LlamaCpp(s) = self {
            cancel.check()?;
            let rows = s.forward(ids, 0, keep)?;
            let vocab = rows.len() / keep.max(1);
            return Ok((rows, vocab));
        }
        // candle's models answer the last position only: the kept positions
        // are fed one at a time after the rest, through the KV cache.
        let first = ids.len().saturating_sub(keep);
        if first > 0 {
            self.prefill(&ids[..first], 0, cancel)?;
        }
        let mut rows = Vec::new();
        let mut vocab = 0;
        for (i, &id) in ids[first..].iter().enumerate() {
            cancel.check()?;
            let row = self
                .forward(&[id], first + i)?
                .to_vec1::<f32>()
                .map_err(engine_err("logits"))?;
            vocab = row.len();
            rows.extend_from_slice(&row);
        }
        Ok((rows, vocab))
    }
}

fn engine_err(what: &str) -> impl FnOnce(candle_core::Error) -> BackendError + '_ {
    move |e| BackendError::Internal(format!("{what}: {e}"))
}

/// Reads every `*.safetensors` in a directory into one map.
pub fn load_safetensors_dir(
    dir: &Path,
) -> Result<std::collections::HashMap<String, Tensor>, BackendError> {
    let mut all = std::collections::HashMap::new();
    for p in super::hf_config::safetensors_files(dir)? {
        let m = candle_core::safetensors::load(&p, &Device::Cpu).map_err(|e| {
            BackendError::Unsupported(format!(
                "{} is not a readable safetensors file: {e}",
                p.display()
            ))
        })?;
        all.extend(m);
    }
    Ok(all)
}

/// The safetensors of `dir` as a VarBuilder (after [`hf_config::check_dir`],
/// which checked every tensor candle reads is there in its shape).
fn weights(dir: &Path, dtype: DType) -> Result<VarBuilder<'static>, BackendError> {
    Ok(VarBuilder::from_tensors(
        load_safetensors_dir(dir)?,
        dtype,
        &Device::Cpu,
    ))
}

/// Runs a candle loader, turning its panics (some loaders index shapes
/// without checking) and errors into one message.
fn load_catching<M>(load: impl FnOnce() -> candle_core::Result<M>) -> Result<M, BackendError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(load))
        .map_err(|_| {
            BackendError::Unsupported("the weights do not match config.json (tensor shapes)".into())
        })?
        .map_err(|e| {
            BackendError::Unsupported(format!("the weights do not match config.json: {e}"))
        })
}

/// candle's GGUF header reader over a buffer: unbuffered, it makes a few
/// system calls per field, which for a 49 152-token vocabulary took 160 ms of
/// 200. Tensors are read later at absolute offsets, so the buffer's read-ahead
/// does no harm.
pub fn read_gguf_header(f: &mut fs::File) -> candle_core::Result<gguf_file::Content> {
    gguf_file::Content::read(&mut std::io::BufReader::with_capacity(1 << 16, f))
}

/// Loads a GGUF file on the engine `opts` choose for it: the weights, the
/// vocabulary size and the context length. Fills `tokenizer` from the GGUF's
/// vocabulary when given and still empty.
fn load_gguf(
    path: &Path,
    opts: &EngineOptions,
    tokenizer: Option<&mut Option<Tokenizer>>,
) -> Result<(Weights, usize, usize), BackendError> {
    let mut f =
        fs::File::open(path).map_err(|e| BackendError::Io(format!("{}: {e}", path.display())))?;
    let content = read_gguf_header(&mut f)
        .map_err(|e| BackendError::Unsupported(format!("model.gguf: {e}")))?;
    if let Some(tokenizer) = tokenizer.filter(|t| t.is_none()) {
        match tokenizer::from_gguf(&content) {
            Ok(t) => *tokenizer = Some(t),
            Err(why) => tracing::info!(%why, "no tokenizer: text prompts will be refused"),
        }
    }
    let vocab = content
        .tensor_infos
        .get("token_embd.weight")
        .and_then(|t| t.shape.dims().first().copied())
        .unwrap_or(0);
    let ctx = content
        .metadata
        .get("llama.context_length")
        .and_then(|v| v.to_u32().ok())
        .map(|v| v as usize)
        .unwrap_or(quantized_llama::MAX_SEQ_LEN);
    // llama.cpp needs `tokenizer.ggml.model` (a vocabulary, or "none" in the
    // agent's own conversions).
    let has_vocab = content.metadata.contains_key("tokenizer.ggml.model");
    let llama_cpp = match opts.gguf_engine {
        GgufEngine::Auto => has_vocab && super::llama_cpp::cpu_supported(),
        GgufEngine::LlamaCpp => true,
        GgufEngine::Candle => false,
    };
    let gguf_arch = content
        .metadata
        .get("general.architecture")
        .and_then(|v| v.to_string().ok())
        .map_or("llama", String::as_str);
    if !llama_cpp && gguf_arch != "llama" {
        let why = if !has_vocab {
            "the GGUF has no tokenizer.ggml.model, which llama.cpp needs"
        } else if opts.gguf_engine == GgufEngine::Candle {
            "the agent runs with --cpu-engine candle"
        } else {
            "this CPU lacks the features llama.cpp was built for (AVX2, FMA, F16C, BMI2)"
        };
        return Err(BackendError::Unsupported(format!(
            "GGUF architecture {gguf_arch:?} runs only on llama.cpp (candle runs llama only), and {why}"
        )));
    }
    if llama_cpp {
        drop(content);
        let m = LlamaCppModel::load(path, opts.threads, opts.max_batch, opts.exact_batching)?;
        let ctx = m.context_length();
        Ok((Weights::LlamaCpp(m), vocab, ctx))
    } else {
        let w = quantized_llama::ModelWeights::from_gguf(content, &mut f, &Device::Cpu)
            .map_err(|e| BackendError::Unsupported(format!("model.gguf: {e}")))?;
        Ok((
            Weights::Quantized(w),
            vocab,
            ctx.min(quantized_llama::MAX_SEQ_LEN),
        ))
    }
}

/// Opens a GGUF file the way [`LoadedModel::load`] does (candle's reader,
/// then llama.cpp or candle's loader) and, on llama.cpp, runs one token
/// through a fresh context: its graph and kernels check hyper-parameters (an
/// RMS epsilon, say) that loading alone does not. Returns the engine. This is
/// the work of `rm-agent probe-model`, in a child process, because llama.cpp
/// aborts the process on some malformed files. The tokenizer is left out: it
/// is Rust whose panics the agent catches, its allocations are bounded by
/// the header walk, and building it is a fifth of the check's time.
pub fn probe_gguf(path: &Path, opts: &EngineOptions) -> Result<&'static str, BackendError> {
    let (weights, _, _) = load_gguf(path, opts, None)?;
    if let Weights::LlamaCpp(m) = &weights {
        m.session(1, &Cancel::default())?.forward(&[0], 0, 1)?;
        return Ok("llama.cpp");
    }
    Ok("candle")
}

impl LoadedModel {
    pub fn load(dir: &Path, opts: &EngineOptions) -> Result<LoadedModel, BackendError> {
        let manifest = ArtifactManifest::read(dir)?;
        let bytes = crate::cache::store::list_files(dir)
            .map(|fs_| {
                fs_.iter()
                    .filter_map(|f| fs::metadata(dir.join(f)).ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0);
        let tokenizer_json = dir.join("tokenizer.json");
        let mut tokenizer = if tokenizer_json.is_file() {
            Some(Tokenizer::from_file(&tokenizer_json).map_err(|e| {
                BackendError::Unsupported(format!("tokenizer.json cannot be read: {e}"))
            })?)
        } else {
            None
        };
        let cap = |n: usize| match manifest.max_seq_len {
            Some(m) => n.min(m as usize),
            None => n,
        };
        let (weights, vocab_size, max_seq_len) = if manifest.format == "gguf" {
            let (weights, vocab, ctx) =
                load_gguf(&dir.join("model.gguf"), opts, Some(&mut tokenizer))?;
            (weights, vocab, cap(ctx))
        } else {
            let dtype = match manifest.dtype.as_str() {
                "bf16" => DType::BF16,
                "f16" => DType::F16,
                _ => DType::F32,
            };
            // Before candle sizes anything from config.json: its numbers
            // bounded and matching the weights' shapes.
            let checked = hf_config::check_dir(dir)?;
            match checked.config {
                ModelConfig::Llama(c) => {
                    let cfg = c.into_config(false);
                    let vb = weights(dir, dtype)?;
                    let model = load_catching(|| llama::Llama::load(vb, &cfg))?;
                    let (vocab, ctx) = (cfg.vocab_size, cfg.max_position_embeddings);
                    (
                        Weights::Full {
                            model: Arc::new(model),
                            config: cfg,
                            dtype,
                        },
                        vocab,
                        cap(ctx),
                    )
                }
                ModelConfig::Qwen2(cfg) => {
                    // candle's qwen2 takes lm_head when present, else the
                    // embedding.
                    let vb = weights(dir, dtype)?;
                    let model = load_catching(|| qwen2::ModelForCausalLM::new(&cfg, vb))?;
                    (
                        Weights::Qwen2(model),
                        cfg.vocab_size,
                        cap(cfg.max_position_embeddings),
                    )
                }
            }
        };
        Ok(LoadedModel {
            weights,
            tokenizer,
            eos_token_ids: manifest.eos_token_ids.clone(),
            bos_token_id: manifest.bos_token_id,
            vocab_size,
            max_seq_len,
            max_batch: manifest.batch_size.map(|b| b as usize),
            bytes,
        })
    }

    /// Which engine runs this model: `llama.cpp` or `candle`.
    pub fn engine(&self) -> &'static str {
        match self.weights {
            Weights::LlamaCpp(_) => "llama.cpp",
            _ => "candle",
        }
    }

    /// Sequences this model runs at once: llama.cpp batches them, candle
    /// runs one.
    pub fn max_concurrent(&self) -> usize {
        match &self.weights {
            Weights::LlamaCpp(m) => m.max_batch(),
            _ => 1,
        }
    }

    /// A fresh sequence with room for `n_ctx` tokens (on llama.cpp, waits
    /// for room in the shared KV cache).
    fn session(&self, n_ctx: usize, cancel: &Cancel) -> Result<Session<'_>, BackendError> {
        Ok(match &self.weights {
            Weights::LlamaCpp(m) => Session::LlamaCpp(m.session(n_ctx, cancel)?),
            Weights::Quantized(w) => {
                let mut w = w.clone();
                w.clear_kv_cache();
                Session::Quantized(w)
            }
            Weights::Full {
                model,
                config,
                dtype,
            } => Session::Full {
                model: model.clone(),
                cache: llama::Cache::new(true, *dtype, config, &Device::Cpu)
                    .map_err(engine_err("KV cache"))?,
            },
            Weights::Qwen2(m) => {
                let mut m = m.clone();
                m.clear_kv_cache();
                Session::Qwen2(m)
            }
        })
    }

    /// Tokenizes a text prompt (no special tokens added: the chat template or
    /// BOS, if the model wants one, is the client's to include).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, BackendError> {
        let tok = self.tokenizer.as_ref().ok_or_else(|| {
            BackendError::InvalidRequest(
                "this model has no tokenizer in the agent; send \"input_ids\" instead of text"
                    .into(),
            )
        })?;
        let enc = tok.encode(text, false).map_err(|e| {
            BackendError::InvalidRequest(format!("cannot tokenize the prompt: {e}"))
        })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn decode(&self, ids: &[u32]) -> Option<String> {
        self.tokenizer
            .as_ref()
            .and_then(|t| t.decode(ids, true).ok())
    }

    /// Checks a prompt against the model's limits.
    pub fn check_prompt(&self, ids: &[u32], max_new_tokens: usize) -> Result<(), BackendError> {
        if ids.is_empty() {
            return Err(BackendError::InvalidRequest(
                "a prompt must have at least one token".into(),
            ));
        }
        if let Some(bad) = ids.iter().find(|&&t| t as usize >= self.vocab_size) {
            return Err(BackendError::InvalidRequest(format!(
                "token id {bad} is outside the vocabulary (size {})",
                self.vocab_size
            )));
        }
        if ids.len() + max_new_tokens > self.max_seq_len {
            return Err(BackendError::InvalidRequest(format!(
                "prompt ({} tokens) + max_new_tokens ({max_new_tokens}) exceeds the maximum sequence length {}; shorten the prompt, lower max_new_tokens, or compile with a larger maxSeqLen",
                ids.len(),
                self.max_seq_len
            )));
        }
        Ok(())
    }

    /// transformers' `model(ids).logits` for one sequence: the rows of the
    /// last `keep` positions (0 keeps all).
    pub fn forward(
        &self,
        ids: &[u32],
        keep: usize,
        cancel: &Cancel,
    ) -> Result<ForwardOutput, BackendError> {
        self.check_prompt(ids, 0)?;
        let keep = kept_positions(ids.len(), keep);
        let rows_bytes = keep.saturating_mul(self.vocab_size).saturating_mul(4);
        if rows_bytes > MAX_LOGITS_BYTES {
            return Err(BackendError::InvalidRequest(format!(
                "the logits of {keep} positions x {} vocabulary entries would be {} MiB, more than the {} MiB one answer may hold; ask for fewer positions with logits_to_keep",
                self.vocab_size,
                rows_bytes >> 20,
                MAX_LOGITS_BYTES >> 20
            )));
        }
        let mut session = self.session(ids.len(), cancel)?;
        let (logits, vocab_size) = session.logits_rows(ids, keep, cancel)?;
        ForwardOutput {
            positions: keep,
            vocab_size,
            logits,
        }
        .checked(keep)
    }

    /// Generates for one prompt. `on_token` gets each new token and, when a
    /// tokenizer exists, the text it completes.
    pub fn generate(
        &self,
        prompt: &[u32],
        params: &GenerationParams,
        cancel: &Cancel,
        mut on_token: impl FnMut(u32, Option<&str>),
    ) -> Result<(Vec<u32>, FinishReason), BackendError> {
        self.check_prompt(prompt, params.max_new_tokens)?;
        let eos: &[u32] = if params.eos_token_ids.is_empty() {
            &self.eos_token_ids
        } else {
            &params.eos_token_ids
        };
        let sampling = sampling_of(params);
        let mut lp = LogitsProcessor::from_sampling(params.seed, sampling);
        if params.max_new_tokens == 0 {
            return Ok((Vec::new(), FinishReason::Length));
        }
        let mut session = self.session(prompt.len() + params.max_new_tokens, cancel)?;
        let mut decoder = self.tokenizer.as_ref().map(IncrementalDecoder::new);
        let mut out = Vec::with_capacity(params.max_new_tokens);
        let penalty = params.repetition_penalty as f32;
        let penalise = penalty != 1.0;
        // The ids of the sequence so far, each once: transformers penalises
        // an id once however often it occurs.
        let mut seen: HashSet<u32> = if penalise {
            prompt.iter().copied().collect()
        } else {
            HashSet::new()
        };
        let mut logits = session.prefill(prompt, 0, cancel)?;
        loop {
            cancel.check()?;
            let forbid_eos = out.len() < params.min_new_tokens;
            if penalise || forbid_eos {
                let mut row = logits.to_vec1::<f32>().map_err(engine_err("logits"))?;
                if penalise {
                    apply_repetition_penalty(&mut row, &seen, penalty);
                }
                if forbid_eos {
                    forbid_tokens(&mut row, eos);
                }
                let n = row.len();
                logits = Tensor::from_vec(row, n, &Device::Cpu).map_err(engine_err("logits"))?;
            }
            let next = lp.sample(&logits).map_err(engine_err("sampling"))?;
            if penalise {
                seen.insert(next);
            }
            out.push(next);
            let piece = decoder.as_mut().map(|d| d.push(next));
            on_token(next, piece.as_deref());
            if params.stop_at_eos && eos.contains(&next) {
                return Ok((out, FinishReason::Eos));
            }
            if out.len() >= params.max_new_tokens {
                return Ok((out, FinishReason::Length));
            }
            let pos = prompt.len() + out.len() - 1;
            logits = session.forward(&[next], pos)?;
        }
    }
}

/// transformers' `RepetitionPenaltyLogitsProcessor`, run before temperature,
/// top-k/top-p and argmax: the logit of every id in `seen` is divided by
/// `penalty` when positive, else multiplied, so that a penalty > 1 always
/// makes a seen token less likely. Ids outside the row are skipped.
pub fn apply_repetition_penalty(logits: &mut [f32], seen: &HashSet<u32>, penalty: f32) {
    for &id in seen {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
        }
    }
}

/// transformers' `MinNewTokensLengthLogitsProcessor`: the ids get -inf, so
/// neither argmax nor sampling can choose them.
pub fn forbid_tokens(logits: &mut [f32], ids: &[u32]) {
    for &id in ids {
        if let Some(l) = logits.get_mut(id as usize) {
            *l = f32::NEG_INFINITY;
        }
    }
}

/// transformers' meaning: greedy unless `do_sample`; temperature 0 is greedy.
pub fn sampling_of(p: &GenerationParams) -> Sampling {
    if !p.do_sample || p.temperature <= 0.0 {
        return Sampling::ArgMax;
    }
    let temperature = p.temperature;
    match (p.top_k.filter(|k| *k > 0), p.top_p.filter(|p| *p < 1.0)) {
        (None, None) => Sampling::All { temperature },
        (Some(k), None) => Sampling::TopK { k, temperature },
        (None, Some(p)) => Sampling::TopP { p, temperature },
        (Some(k), Some(p)) => Sampling::TopKThenTopP { k, p, temperature },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_penalty_divides_positive_and_multiplies_negative_logits_once() {
        let mut row = vec![2.0, -2.0, 0.0, 4.0, -1.0];
        // A repeated id appears once in the set: penalised once.
        let seen: HashSet<u32> = [0, 1, 2, 0, 99].into_iter().collect();
        apply_repetition_penalty(&mut row, &seen, 2.0);
        assert_eq!(row, vec![1.0, -4.0, 0.0, 4.0, -1.0]);
        // Below 1 it favours the seen ids instead.
        let mut row = vec![2.0, -2.0];
        apply_repetition_penalty(&mut row, &[0, 1].into_iter().collect(), 0.5);
        assert_eq!(row, vec![4.0, -1.0]);
    }

    #[test]
    fn a_penalty_can_move_the_argmax_to_an_unseen_token() {
        let mut row = vec![3.0, 2.0, -0.5];
        apply_repetition_penalty(&mut row, &[0].into_iter().collect(), 1.6);
        let best = row.iter().enumerate().fold(
            (0, f32::MIN),
            |b, (i, x)| if *x > b.1 { (i, *x) } else { b },
        );
        assert_eq!(best.0, 1);
    }

    #[test]
    fn forbidden_tokens_get_minus_infinity_and_others_stay() {
        let mut row = vec![5.0, 1.0, 3.0];
        forbid_tokens(&mut row, &[0, 7]);
        assert_eq!(row, vec![f32::NEG_INFINITY, 1.0, 3.0]);
        let mut lp = LogitsProcessor::from_sampling(0, Sampling::ArgMax);
        let t = Tensor::from_vec(row, 3, &Device::Cpu).expect("tensor");
        assert_eq!(lp.sample(&t).expect("sample"), 2);
    }
}
