//! llama.cpp as the forward pass for GGUF artifacts (issue 9: candle's Q4_1
//! and Q8_0 paths run at about half of llama.cpp's speed on the same file).
//!
//! Only the forward pass moves here: tokenization, sampling, EOS handling and
//! streaming stay in `engine.rs`, so both engines answer a request the same
//! way and a seed samples the same on either. llama.cpp comes from the
//! `llama-cpp-2` crate, which builds its vendored source with cmake; the CPU
//! features it is compiled for are set in `.cargo/config.toml`.

use std::num::NonZeroU32;
use std::path::Path;
use std::sync::{Mutex, OnceLock};

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

/// Tokens per `llama_decode` call while reading a prompt.
const PROMPT_CHUNK: usize = 512;

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

/// A GGUF model loaded by llama.cpp (memory-mapped).
pub struct LlamaCppModel {
    model: LlamaModel,
    threads: i32,
    // llama.cpp's context constructor mutates the model; one at a time.
    new_context: Mutex<()>,
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
        Ok(LlamaCppModel {
            model,
            threads: i32::try_from(threads.max(1)).unwrap_or(1),
            new_context: Mutex::new(()),
        })
    }

    /// The model's training context length.
    pub fn context_length(&self) -> usize {
        self.model.n_ctx_train() as usize
    }

    /// A fresh sequence with room for `n_ctx` tokens.
    pub fn session(&self, n_ctx: usize) -> Result<LlamaCppSession<'_>, BackendError> {
        let backend = backend()?;
        // Rounded up so that nearby lengths share llama.cpp's buffer sizes.
        let n_ctx = n_ctx.max(1).div_ceil(256) * 256;
        let n_ctx_u32 = u32::try_from(n_ctx).unwrap_or(u32::MAX);
        let params = LlamaContextParams::default()
            .with_n_ctx(NonZeroU32::new(n_ctx_u32))
            .with_n_batch(PROMPT_CHUNK as u32)
            .with_n_ubatch(PROMPT_CHUNK as u32)
            .with_n_threads(self.threads)
            .with_n_threads_batch(self.threads);
        let ctx = {
            let _one = self.new_context.lock().unwrap_or_else(|p| p.into_inner());
            self.model.new_context(backend, params).map_err(|e| {
                BackendError::Internal(format!(
                    "llama.cpp context for {n_ctx} tokens: {e} (out of memory?)"
                ))
            })?
        };
        Ok(LlamaCppSession {
            ctx,
            batch: LlamaBatch::new(PROMPT_CHUNK, 1),
            n_vocab: usize::try_from(self.model.n_vocab()).unwrap_or(0),
        })
    }
}

/// One sequence: a llama.cpp context (its KV cache) and a reusable batch.
pub struct LlamaCppSession<'m> {
    ctx: LlamaContext<'m>,
    batch: LlamaBatch<'static>,
    n_vocab: usize,
}

impl LlamaCppSession<'_> {
    /// Feeds `ids` at positions `pos..` and returns the logits after the
    /// last one.
    pub fn forward(&mut self, ids: &[u32], pos: usize) -> Result<&[f32], BackendError> {
        let err = |what: &str, e: &dyn std::fmt::Display| {
            BackendError::Internal(format!("llama.cpp {what}: {e}"))
        };
        for (c, chunk) in ids.chunks(PROMPT_CHUNK).enumerate() {
            self.batch.clear();
            let last_chunk = (c + 1) * PROMPT_CHUNK >= ids.len();
            for (i, &id) in chunk.iter().enumerate() {
                let p = pos + c * PROMPT_CHUNK + i;
                let logits = last_chunk && i + 1 == chunk.len();
                self.batch
                    .add(
                        LlamaToken(id as i32),
                        i32::try_from(p).unwrap_or(i32::MAX),
                        &[0],
                        logits,
                    )
                    .map_err(|e| err("batch", &e))?;
            }
            self.ctx
                .decode(&mut self.batch)
                .map_err(|e| err("decode", &e))?;
        }
        let logits = self.ctx.get_logits_ith(self.batch.n_tokens() - 1);
        if logits.len() < self.n_vocab {
            return Err(BackendError::Internal(format!(
                "llama.cpp returned {} logits for a vocabulary of {}",
                logits.len(),
                self.n_vocab
            )));
        }
        Ok(&logits[..self.n_vocab])
    }
}
