//! llama.cpp as the forward pass for GGUF artifacts (issue 9: candle's Q4_1
//! and Q8_0 paths run at a fraction of llama.cpp's speed on the same file).
//!
//! Only the forward pass moves here: tokenization, sampling, EOS handling and
//! streaming stay in `engine.rs`, so both engines answer a request the same
//! way and a seed samples the same on either. llama.cpp comes from the
//! `llama-cpp-2` crate, which builds its vendored source with cmake; the CPU
//! features it is compiled for are set in `.cargo/config.toml`.
//!
//! Each loaded model has one engine thread that owns the model and a context
//! (KV cache and compute buffers) and keeps that context between requests:
//! a context borrows its model, so owning both in one thread's frame needs no
//! self-reference, and reusing it avoids allocating and freeing tens of MiB
//! per request, which glibc's allocator answers with a growing heap.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::mpsc::{Receiver, Sender, SyncSender, channel, sync_channel};
use std::sync::{Mutex, MutexGuard, OnceLock};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

use crate::backend::BackendError;

/// llama.cpp's version, as vendored by `llama-cpp-sys-2`.
pub const LLAMA_CPP_SYS_VERSION: &str = "0.1.161";

/// `LLAMA_FLASH_ATTN_TYPE_DISABLED` of llama.h.
const FLASH_ATTENTION_DISABLED: i32 = 0;

/// Tokens per `llama_decode` call while reading a prompt.
const PROMPT_CHUNK: usize = 512;
/// Context sizes are rounded up to this, so nearby lengths share one.
const CONTEXT_STEP: usize = 512;

/// Whether this CPU has the features llama.cpp was compiled for (see
/// `.cargo/config.toml`). Checked at run time, so an older CPU falls back to
/// candle instead of dying on an illegal instruction.
pub fn cpu_supported() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
            && std::arch::is_x86_feature_detected!("bmi2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        true
    }
}

fn backend() -> Result<&'static LlamaBackend, BackendError> {
    static BACKEND: OnceLock<Result<LlamaBackend, String>> = OnceLock::new();
    BACKEND
        .get_or_init(|| {
            // llama.cpp's own log lines go to tracing (target `llama-cpp-2`),
            // filtered by RM_LOG like everything else.
            llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
            LlamaBackend::init().map_err(|e| e.to_string())
        })
        .as_ref()
        .map_err(|e| BackendError::Internal(format!("llama.cpp backend: {e}")))
}

type Reply<T> = SyncSender<Result<T, BackendError>>;

enum Job {
    /// Start a sequence of up to `n_ctx` tokens: an empty KV cache.
    Begin { n_ctx: usize, reply: Reply<()> },
    /// Feed `ids` at positions `pos..`; answer the logits after each of the
    /// last `keep` of them, row after row.
    Forward {
        ids: Vec<u32>,
        pos: usize,
        keep: usize,
        reply: Reply<Vec<f32>>,
    },
}

/// A GGUF model loaded by llama.cpp (memory-mapped), served by its own
/// engine thread.
pub struct LlamaCppModel {
    jobs: Sender<Job>,
    context_length: usize,
    // One sequence at a time: they share the engine thread's KV cache.
    sequence: Mutex<()>,
}

impl LlamaCppModel {
    pub fn load(path: &Path, threads: usize) -> Result<Self, BackendError> {
        if !cpu_supported() {
            return Err(BackendError::Unsupported(
                "llama.cpp in this agent needs a CPU with AVX2, FMA, F16C and BMI2 (x86-64-v3); run with --cpu-engine auto or candle".into(),
            ));
        }
        let backend = backend()?;
        let model = LlamaModel::load_from_file(backend, path, &LlamaModelParams::default())
            .map_err(|e| {
                BackendError::Unsupported(format!(
                    "llama.cpp cannot load {}: {e} (its log line above says why)",
                    path.display()
                ))
            })?;
        let context_length = model.n_ctx_train() as usize;
        let threads = i32::try_from(threads.max(1)).unwrap_or(1);
        let (jobs, rx) = channel();
        std::thread::Builder::new()
            .name("llama.cpp".into())
            .spawn(move || engine_thread(backend, model, threads, rx))
            .map_err(|e| {
                BackendError::Internal(format!("cannot start the llama.cpp thread: {e}"))
            })?;
        Ok(LlamaCppModel {
            jobs,
            context_length,
            sequence: Mutex::new(()),
        })
    }

    /// The model's training context length.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    fn ask<T>(&self, job: impl FnOnce(Reply<T>) -> Job) -> Result<T, BackendError> {
        let (reply, answer) = sync_channel(1);
        let gone = || BackendError::Internal("the llama.cpp thread has stopped".into());
        self.jobs.send(job(reply)).map_err(|_| gone())?;
        answer.recv().map_err(|_| gone())?
    }

    /// A fresh sequence with room for `n_ctx` tokens.
    pub fn session(&self, n_ctx: usize) -> Result<LlamaCppSession<'_>, BackendError> {
        let guard = self.sequence.lock().unwrap_or_else(|p| p.into_inner());
        self.ask(|reply| Job::Begin { n_ctx, reply })?;
        Ok(LlamaCppSession {
            model: self,
            _sequence: guard,
        })
    }
}

/// One sequence on a model's engine thread.
pub struct LlamaCppSession<'m> {
    model: &'m LlamaCppModel,
    _sequence: MutexGuard<'m, ()>,
}

impl LlamaCppSession<'_> {
    /// Feeds `ids` at positions `pos..` and returns the logits after each
    /// of the last `keep` (1 ≤ keep ≤ ids.len()), row after row.
    pub fn forward(
        &mut self,
        ids: &[u32],
        pos: usize,
        keep: usize,
    ) -> Result<Vec<f32>, BackendError> {
        let ids = ids.to_vec();
        self.model.ask(|reply| Job::Forward {
            ids,
            pos,
            keep,
            reply,
        })
    }
}

fn engine_thread(backend: &LlamaBackend, model: LlamaModel, threads: i32, jobs: Receiver<Job>) {
    let n_vocab = usize::try_from(model.n_vocab()).unwrap_or(0);
    let mut batch = LlamaBatch::new(PROMPT_CHUNK, 1);
    // Declared after `model`, so it is dropped first.
    let mut context: Option<(LlamaContext<'_>, usize)> = None;
    for job in jobs {
        match job {
            Job::Begin { n_ctx, reply } => {
                let want = n_ctx.max(1).div_ceil(CONTEXT_STEP) * CONTEXT_STEP;
                // Keep the context if it is big enough and not far bigger
                // (a long request once should not hold its buffers forever).
                let keep = context
                    .as_ref()
                    .is_some_and(|(_, have)| *have >= want && *have <= want * 4);
                let result = if keep {
                    if let Some((ctx, _)) = context.as_mut() {
                        ctx.clear_kv_cache();
                    }
                    Ok(())
                } else {
                    context = None;
                    new_context(backend, &model, want, threads).map(|ctx| {
                        context = Some((ctx, want));
                    })
                };
                let _ = reply.send(result);
            }
            Job::Forward {
                ids,
                pos,
                keep,
                reply,
            } => {
                let result = match context.as_mut() {
                    Some((ctx, _)) => forward(ctx, &mut batch, &ids, pos, keep, n_vocab),
                    None => Err(BackendError::Internal(
                        "llama.cpp: forward before a sequence began".into(),
                    )),
                };
                let _ = reply.send(result);
            }
        }
    }
}

fn new_context<'m>(
    backend: &LlamaBackend,
    model: &'m LlamaModel,
    n_ctx: usize,
    threads: i32,
) -> Result<LlamaContext<'m>, BackendError> {
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(u32::try_from(n_ctx).unwrap_or(u32::MAX)))
        .with_n_batch(PROMPT_CHUNK as u32)
        .with_n_ubatch(PROMPT_CHUNK as u32)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        // Flash attention off, as llama-cpp-python has it: llama.cpp's
        // default ("auto") turns it on for CPU, which measured 4-14 % slower
        // per generated token on SmolLM2 (e2e/bench/cpu-engine.sh, 2 threads).
        .with_flash_attention_policy(FLASH_ATTENTION_DISABLED);
    model.new_context(backend, params).map_err(|e| {
        BackendError::Internal(format!(
            "llama.cpp context for {n_ctx} tokens: {e} (out of memory?)"
        ))
    })
}

fn forward(
    ctx: &mut LlamaContext<'_>,
    batch: &mut LlamaBatch<'_>,
    ids: &[u32],
    pos: usize,
    keep: usize,
    n_vocab: usize,
) -> Result<Vec<f32>, BackendError> {
    let err = |what: &str, e: &dyn std::fmt::Display| {
        BackendError::Internal(format!("llama.cpp {what}: {e}"))
    };
    if ids.is_empty() || keep == 0 || keep > ids.len() {
        return Err(BackendError::Internal(format!(
            "llama.cpp: {keep} logits rows asked for {} tokens",
            ids.len()
        )));
    }
    // Only the kept positions ask llama.cpp for logits: for generation that
    // is the last one, and the output buffer stays one row.
    let first_kept = ids.len() - keep;
    let mut out = Vec::with_capacity(keep * n_vocab);
    for (c, chunk) in ids.chunks(PROMPT_CHUNK).enumerate() {
        batch.clear();
        let mut rows = Vec::new();
        for (i, &id) in chunk.iter().enumerate() {
            let at = c * PROMPT_CHUNK + i;
            let logits = at >= first_kept;
            if logits {
                rows.push(i32::try_from(i).unwrap_or(i32::MAX));
            }
            batch
                .add(
                    LlamaToken(id as i32),
                    i32::try_from(pos + at).unwrap_or(i32::MAX),
                    &[0],
                    logits,
                )
                .map_err(|e| err("batch", &e))?;
        }
        ctx.decode(batch).map_err(|e| err("decode", &e))?;
        for row in rows {
            let logits = ctx.get_logits_ith(row);
            if logits.len() < n_vocab {
                return Err(BackendError::Internal(format!(
                    "llama.cpp returned {} logits for a vocabulary of {n_vocab}",
                    logits.len()
                )));
            }
            out.extend_from_slice(&logits[..n_vocab]);
        }
    }
    Ok(out)
}
