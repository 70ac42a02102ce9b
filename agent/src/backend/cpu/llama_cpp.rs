//! llama.cpp as the forward pass for GGUF artifacts (issue 9: candle's Q4_1
//! and Q8_0 paths run at a fraction of llama.cpp's speed on the same file).
//!
//! Only the forward pass moves here: tokenization, sampling, EOS handling and
//! streaming stay in `engine.rs`, so both engines answer a request the same
//! way and a seed samples the same on either. llama.cpp comes from the
//! `llama-cpp-2` crate, which builds its vendored source with cmake; the CPU
//! features it is compiled for are set in `.cargo/config.toml`.
//!
//! Each loaded model has one scheduler thread that owns the model and a
//! context (KV cache and compute buffers) and keeps that context between
//! requests: a context borrows its model, so owning both in one thread's
//! frame needs no self-reference, and reusing it avoids allocating and
//! freeing tens of MiB per request, which glibc's allocator answers with a
//! growing heap.
//!
//! Continuous batching (issue 19): the context holds up to `max_batch`
//! sequences (`n_seq_max`), each in a KV stream of its own
//! (`kv_unified = false`). Each request's session is one sequence; its
//! thread sends the tokens to feed and waits for logits, and samples on its
//! own (engine.rs, the same code as a lone request). The scheduler
//! alternates two kinds of `llama_decode` step: one that feeds the next
//! token of every generating sequence at once, and one that feeds the next
//! prompt chunk of every sequence reading a prompt (up to
//! `PROMPT_STEP_TOKENS`, in turn when more wait). So a long prompt delays
//! the others' next token by one chunk at a time, not by its whole length,
//! and a burst of new requests is read in one pass, as llama-server does.
//! Tokens go into a step in sequence id order and the lowest free id is
//! handed out first: with a stream per sequence llama.cpp runs a step in
//! one pass only over consecutive ids (`split_equal`, sequential).
//!
//! Two modes. By default, as llama-server runs: new prompts read together,
//! and flash attention on for contexts of short streams (up to 256 cells;
//! from 512 a lone decode splits its attention sums across threads and a
//! batched one does not, so longer streams run without it). With exact
//! batching (`--cpu-exact-batching`) a sequence's logits are bit for bit
//! those it gets alone, whatever runs beside it: flash attention off and
//! one prompt chunk per step (llama.cpp cuts the chunks of a shared step
//! into micro-batches of other sizes, and its flash attention kernel takes
//! another path at 64 query rows). Either way each sequence has a KV
//! stream of its own, so its cells sit where they would alone (a unified
//! cache interleaves them and the attention sums run in another order),
//! and a generation step is one token per stream, as alone. By default
//! tests/batching.rs finds the same equality (short prompts, and a
//! 600-token one); exact batching guarantees it.
//!
//! A sequence's cells are freed when its session ends. A session needs
//! room for its prompt and new tokens in one stream; one that does not fit
//! waits, in arrival order.

use std::collections::VecDeque;
use std::num::NonZeroU32;
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender, SyncSender, channel, sync_channel};
use std::time::{Duration, Instant};

use llama_cpp_2::context::LlamaContext;
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

use crate::backend::{BackendError, Cancel};

/// llama.cpp's version, as vendored by `llama-cpp-sys-2`.
pub const LLAMA_CPP_SYS_VERSION: &str = "0.1.161";

/// `LLAMA_FLASH_ATTN_TYPE_DISABLED` and `_ENABLED` of llama.h.
const FLASH_ATTENTION_DISABLED: i32 = 0;
const FLASH_ATTENTION_ENABLED: i32 = 1;
/// Flash attention is on for contexts whose streams hold up to this many
/// cells, off beyond (and always off with exact batching). Under 512 cells
/// llama.cpp's CPU kernel attends row by row, alone or batched: 1.0-1.4x
/// the tokens/s without it at 1-64 clients of short requests
/// (agent/bench-serving.sh). From 512 cells a lone decode splits its sums
/// across threads: measured slower on one long request (0.86-0.98x
/// llama.cpp's generation against 0.93-1.04x without it,
/// e2e/bench/cpu-engine.sh), and rounded differently from a batched one.
const FLASH_ATTENTION_MAX_CELLS: usize = 256;

/// Prompt tokens of one sequence per step, alone or beside others (the same
/// chunks either way, so that the results are the same).
const PROMPT_CHUNK: usize = 128;
/// Prompt tokens of all sequences together per step (llama-server's
/// micro-batch): 16 chat prompts of up to 32 tokens are read in one pass,
/// and the others' next token waits for at most this much.
const PROMPT_STEP_TOKENS: usize = 512;
/// A stream's size is a multiple of this (llama.cpp pads its attention to
/// 256 cells), so nearby lengths share one.
const CONTEXT_STEP: usize = 256;
/// The most sequences one context runs at once (`--cpu-max-batch`;
/// llama.cpp's `LLAMA_MAX_SEQ`).
pub const MAX_BATCH_LIMIT: usize = 256;
/// KV cache memory one model's context may grow to, all sequences together
/// (f16 keys and values). It always holds at least one sequence of the
/// model's full training context.
const KV_BUDGET_BYTES: u64 = 1 << 30;
/// How long a step waits for sequences that were just answered: they
/// sample and send their next token within microseconds, unless their
/// thread waits for a CPU (on a busy node); stepping without them would
/// split the batch in two halves that alternate. Only a session held idle
/// costs the others this wait.
const OWED_WAIT: Duration = Duration::from_millis(20);
/// How often a session waiting for room or logits looks at its `Cancel`.
const CANCEL_POLL: Duration = Duration::from_millis(50);

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

enum Msg {
    /// Admit a sequence that needs `need` KV cells (prompt + new tokens).
    Begin {
        id: u64,
        need: usize,
        cancel: Cancel,
        reply: Reply<()>,
    },
    /// Feed `ids` at positions `pos..`; answer the logits after each of the
    /// last `keep` of them, row after row.
    Feed {
        id: u64,
        ids: Vec<u32>,
        pos: usize,
        keep: usize,
        cancel: Cancel,
        reply: Reply<Vec<f32>>,
    },
    /// The session ended: free its sequence and KV cells.
    End { id: u64 },
}

/// A GGUF model loaded by llama.cpp (memory-mapped), served by its own
/// scheduler thread.
pub struct LlamaCppModel {
    jobs: Sender<Msg>,
    context_length: usize,
    max_batch: usize,
    next_id: AtomicU64,
}

impl LlamaCppModel {
    /// Loads `path`; its context runs up to `max_batch` sequences at once
    /// on `threads` threads; `exact`: each gets the logits it gets alone
    /// (see the module's comment).
    pub fn load(
        path: &Path,
        threads: usize,
        max_batch: usize,
        exact: bool,
    ) -> Result<Self, BackendError> {
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
        let max_batch = max_batch.clamp(1, MAX_BATCH_LIMIT);
        let (jobs, rx) = channel();
        std::thread::Builder::new()
            .name("llama.cpp".into())
            .spawn(move || {
                let mut s = Scheduler::new(backend, &model, threads, max_batch, exact);
                s.run(rx);
            })
            .map_err(|e| {
                BackendError::Internal(format!("cannot start the llama.cpp thread: {e}"))
            })?;
        Ok(LlamaCppModel {
            jobs,
            context_length,
            max_batch,
            next_id: AtomicU64::new(0),
        })
    }

    /// The model's training context length.
    pub fn context_length(&self) -> usize {
        self.context_length
    }

    /// Sequences its context runs at once.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// Sends `msg` and waits for its answer, looking at `cancel` meanwhile:
    /// a cancelled wait is answered `Cancelled` (the scheduler drops the
    /// request at its next step, as it sees the same flag).
    fn ask<T>(
        &self,
        cancel: &Cancel,
        msg: impl FnOnce(Reply<T>) -> Msg,
    ) -> Result<T, BackendError> {
        let (reply, answer) = sync_channel(1);
        let gone = || BackendError::Internal("the llama.cpp thread has stopped".into());
        self.jobs.send(msg(reply)).map_err(|_| gone())?;
        loop {
            match answer.recv_timeout(CANCEL_POLL) {
                Ok(r) => return r,
                Err(RecvTimeoutError::Timeout) => {
                    if cancel.is_cancelled() {
                        return Err(BackendError::Cancelled);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => return Err(gone()),
            }
        }
    }

    /// A fresh sequence with room for `need` tokens; waits while the
    /// context is full.
    pub fn session(
        &self,
        need: usize,
        cancel: &Cancel,
    ) -> Result<LlamaCppSession<'_>, BackendError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Made first: if the wait is cancelled, its drop tells the scheduler
        // to forget the request (admitted or not).
        let session = LlamaCppSession {
            model: self,
            id,
            cancel: cancel.clone(),
        };
        self.ask(cancel, |reply| Msg::Begin {
            id,
            need: need.max(1),
            cancel: cancel.clone(),
            reply,
        })?;
        Ok(session)
    }
}

/// One sequence on a model's scheduler thread; ended when dropped.
pub struct LlamaCppSession<'m> {
    model: &'m LlamaCppModel,
    id: u64,
    cancel: Cancel,
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
        let (id, cancel) = (self.id, self.cancel.clone());
        self.model.ask(&self.cancel, |reply| Msg::Feed {
            id,
            ids,
            pos,
            keep,
            cancel,
            reply,
        })
    }
}

impl Drop for LlamaCppSession<'_> {
    fn drop(&mut self) {
        // The thread is gone only when the model is, and then so is the
        // sequence.
        let _ = self.model.jobs.send(Msg::End { id: self.id });
    }
}

/// Tokens a sequence was given and has not yet fed.
struct Feed {
    ids: Vec<u32>,
    /// Of `ids`, how many are in the cache.
    fed: usize,
    keep: usize,
    rows: Vec<f32>,
    cancel: Cancel,
    reply: Reply<Vec<f32>>,
}

struct Seq {
    id: u64,
    /// llama.cpp's sequence id.
    seq: i32,
    need: usize,
    /// The next position to feed.
    pos: usize,
    feed: Option<Feed>,
    /// Answered (admitted, or given its logits) and not yet heard from: its
    /// next feed comes within microseconds (sampling), so a step waits for
    /// it rather than leave it out of the batch.
    owed: bool,
}

struct Waiting {
    id: u64,
    need: usize,
    cancel: Cancel,
    reply: Reply<()>,
}

struct Scheduler<'m> {
    backend: &'m LlamaBackend,
    model: &'m LlamaModel,
    threads: i32,
    max_batch: usize,
    /// Bit-identical batching: flash attention off, one prompt per step.
    exact: bool,
    n_vocab: usize,
    /// KV cells all streams together may grow to.
    kv_limit: usize,
    /// The context and its cells per stream.
    context: Option<(LlamaContext<'m>, usize)>,
    batch: LlamaBatch<'m>,
    active: Vec<Seq>,
    waiting: VecDeque<Waiting>,
    free_seqs: Vec<i32>,
    /// Sessions that ended while still waiting: their `Begin` is skipped.
    ended_early: Vec<u64>,
    /// The sequence whose prompt is fed next is the first reading one at
    /// or after this index (round-robin).
    turn: usize,
    /// Whether the last step fed a prompt chunk (steps alternate).
    fed_prompt: bool,
}

impl<'m> Scheduler<'m> {
    fn new(
        backend: &'m LlamaBackend,
        model: &'m LlamaModel,
        threads: i32,
        max_batch: usize,
        exact: bool,
    ) -> Self {
        let n_ctx_train = (model.n_ctx_train() as usize).max(1);
        // f16 keys and values of every layer.
        let heads = u64::from(model.n_head().max(1));
        let kv_dim = u64::try_from(model.n_embd().max(1)).unwrap_or(1) / heads
            * u64::from(model.n_head_kv().max(1));
        let per_token = (u64::from(model.n_layer().max(1)) * 2 * kv_dim * 2).max(1);
        let budget = usize::try_from(KV_BUDGET_BYTES / per_token).unwrap_or(usize::MAX);
        let kv_limit = budget.max(n_ctx_train).div_ceil(CONTEXT_STEP) * CONTEXT_STEP;
        Scheduler {
            backend,
            model,
            threads,
            max_batch,
            exact,
            n_vocab: usize::try_from(model.n_vocab()).unwrap_or(0),
            kv_limit,
            context: None,
            batch: LlamaBatch::new(PROMPT_STEP_TOKENS.max(max_batch), 1),
            active: Vec::new(),
            waiting: VecDeque::new(),
            free_seqs: Vec::new(),
            ended_early: Vec::new(),
            turn: 0,
            fed_prompt: false,
        }
    }

    fn run(&mut self, jobs: Receiver<Msg>) {
        loop {
            // Block while there is nothing to feed. While a sequence just
            // answered is about to send its next token (it samples), wait
            // for it a little so that it joins this step; a session whose
            // thread is slow (descheduled, or holding its session idle)
            // does not stall the others past `OWED_WAIT`.
            let mut owed_since: Option<Instant> = None;
            loop {
                let owed = self.active.iter().any(|s| s.owed);
                let msg = if !self.has_feed() {
                    match jobs.recv() {
                        Ok(msg) => msg,
                        // The model was dropped: every session is gone too.
                        Err(_) => return,
                    }
                } else if owed {
                    let since = *owed_since.get_or_insert_with(Instant::now);
                    let left = OWED_WAIT.saturating_sub(since.elapsed());
                    match jobs.recv_timeout(left) {
                        Ok(msg) => msg,
                        Err(RecvTimeoutError::Timeout) => break,
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                } else {
                    break;
                };
                self.handle(msg);
                self.admit();
            }
            while let Ok(msg) = jobs.try_recv() {
                self.handle(msg);
            }
            self.admit();
            self.step();
        }
    }

    fn has_feed(&self) -> bool {
        self.active.iter().any(|s| s.feed.is_some())
    }

    fn handle(&mut self, msg: Msg) {
        match msg {
            Msg::Begin {
                id,
                need,
                cancel,
                reply,
            } => {
                if let Some(i) = self.ended_early.iter().position(|e| *e == id) {
                    self.ended_early.swap_remove(i);
                    return;
                }
                if need > self.kv_limit {
                    let _ = reply.send(Err(BackendError::InvalidRequest(format!(
                        "{need} tokens exceed the {} KV cells llama.cpp may hold for this model",
                        self.kv_limit
                    ))));
                    return;
                }
                self.waiting.push_back(Waiting {
                    id,
                    need,
                    cancel,
                    reply,
                });
            }
            Msg::Feed {
                id,
                ids,
                pos,
                keep,
                cancel,
                reply,
            } => {
                let Some(s) = self.active.iter_mut().find(|s| s.id == id) else {
                    let _ = reply.send(Err(BackendError::Internal(
                        "llama.cpp: feed for a sequence that is not running".into(),
                    )));
                    return;
                };
                s.owed = false;
                if ids.is_empty() || keep == 0 || keep > ids.len() || pos != s.pos {
                    let _ = reply.send(Err(BackendError::Internal(format!(
                        "llama.cpp: {keep} logits rows asked for {} tokens at {pos} (sequence at {})",
                        ids.len(),
                        s.pos
                    ))));
                    return;
                }
                if pos + ids.len() > s.need {
                    let _ = reply.send(Err(BackendError::Internal(format!(
                        "llama.cpp: the sequence was given room for {} tokens, fed up to {}",
                        s.need,
                        pos + ids.len()
                    ))));
                    return;
                }
                s.feed = Some(Feed {
                    rows: Vec::with_capacity(keep * self.n_vocab),
                    ids,
                    fed: 0,
                    keep,
                    cancel,
                    reply,
                });
            }
            Msg::End { id } => {
                if let Some(i) = self.active.iter().position(|s| s.id == id) {
                    let s = self.active.remove(i);
                    self.free(s.seq);
                } else if let Some(i) = self.waiting.iter().position(|w| w.id == id) {
                    self.waiting.remove(i);
                } else {
                    // Its Begin is still in the channel.
                    self.ended_early.push(id);
                }
            }
        }
    }

    /// Frees a sequence's KV cells and id.
    fn free(&mut self, seq: i32) {
        if let Some((ctx, _)) = self.context.as_mut() {
            if let Err(e) = ctx.clear_kv_cache_seq(u32::try_from(seq).ok(), None, None) {
                tracing::warn!(seq, error = %e, "llama.cpp: cannot free a sequence's KV cells");
            }
        }
        self.release_seq(seq);
    }

    /// Puts a sequence id back so that the lowest free one goes next: the
    /// running ids stay packed from 0, and a step over consecutive ids is
    /// one pass of llama.cpp (with a stream per sequence it splits a batch
    /// wherever the ids, in batch order, skip one).
    fn release_seq(&mut self, seq: i32) {
        let at = self.free_seqs.partition_point(|s| *s > seq);
        self.free_seqs.insert(at, seq);
    }

    /// Admits waiting sessions in arrival order while a stream is free and
    /// big enough. A context is made (or remade with bigger streams) only
    /// while no sequence runs, since a new context starts with an empty
    /// cache: a session longer than the streams waits for the others to end.
    fn admit(&mut self) {
        while let Some(w) = self.waiting.front() {
            if w.cancel.is_cancelled() {
                if let Some(w) = self.waiting.pop_front() {
                    let _ = w.reply.send(Err(BackendError::Cancelled));
                }
                continue;
            }
            let need = w.need;
            let per_seq = self.context.as_ref().map_or(0, |(_, p)| *p);
            if need > per_seq {
                if !self.active.is_empty() {
                    break;
                }
                // At least double, so that slowly growing lengths do not
                // remake the context each time; as many streams as the
                // budget holds, up to the batch.
                let per_seq = need
                    .max(per_seq.saturating_mul(2))
                    .min(self.kv_limit)
                    .max(need)
                    .div_ceil(CONTEXT_STEP)
                    * CONTEXT_STEP;
                let streams = (self.kv_limit / per_seq).clamp(1, self.max_batch);
                self.context = None;
                self.free_seqs.clear();
                match new_context(
                    self.backend,
                    self.model,
                    per_seq,
                    streams,
                    self.threads,
                    // Only streams where a lone decode never splits its
                    // attention (see `FLASH_ATTENTION_MAX_CELLS`).
                    !self.exact && per_seq <= FLASH_ATTENTION_MAX_CELLS,
                ) {
                    Ok(ctx) => {
                        tracing::debug!(
                            kv_cells_per_sequence = per_seq,
                            sequences = streams,
                            "llama.cpp context made"
                        );
                        self.context = Some((ctx, per_seq));
                        self.free_seqs = (0..i32::try_from(streams).unwrap_or(1)).rev().collect();
                    }
                    Err(e) => {
                        if let Some(w) = self.waiting.pop_front() {
                            let _ = w.reply.send(Err(e));
                        }
                    }
                }
                continue;
            }
            let Some(seq) = self.free_seqs.pop() else {
                break;
            };
            let Some(w) = self.waiting.pop_front() else {
                break;
            };
            if w.reply.send(Ok(())).is_err() {
                // The session is gone; its End frees nothing.
                self.release_seq(seq);
                continue;
            }
            self.active.push(Seq {
                id: w.id,
                seq,
                need: w.need,
                pos: 0,
                feed: None,
                owed: true,
            });
        }
    }

    /// One `llama_decode`: the next token of every generating sequence, or
    /// one prompt chunk of one sequence (in turn, alternating with the
    /// former while both wait); answers the sequences whose feed is done.
    fn step(&mut self) {
        // Cancelled feeds are answered now and dropped; the session ends.
        for s in &mut self.active {
            if s.feed.as_ref().is_some_and(|f| f.cancel.is_cancelled()) {
                if let Some(f) = s.feed.take() {
                    let _ = f.reply.send(Err(BackendError::Cancelled));
                    s.owed = true;
                }
            }
        }
        let Some((ctx, _)) = self.context.as_mut() else {
            return;
        };
        let remaining = |s: &Seq| s.feed.as_ref().map_or(0, |f| f.ids.len() - f.fed);
        let n = self.active.len();
        // In sequence id order: llama.cpp runs consecutive ids in one pass.
        let mut generating: Vec<usize> = (0..n)
            .filter(|&i| remaining(&self.active[i]) == 1)
            .collect();
        generating.sort_unstable_by_key(|&i| self.active[i].seq);
        // The next chunk of every sequence reading its prompt (chunks start
        // at the same offsets as alone), from the one whose turn it is, as
        // many as one step holds.
        let turn = self.turn % n.max(1);
        let mut reading: Vec<(usize, usize)> = Vec::new();
        let mut tokens = 0;
        for i in (turn..n).chain(0..turn) {
            let left = remaining(&self.active[i]);
            if left <= 1 {
                continue;
            }
            let fed = self.active[i].feed.as_ref().map_or(0, |f| f.fed);
            let take = left.min(PROMPT_CHUNK - fed % PROMPT_CHUNK);
            if tokens + take > PROMPT_STEP_TOKENS || self.exact && !reading.is_empty() {
                break;
            }
            tokens += take;
            reading.push((i, take));
        }
        // (index in active, tokens) fed this step.
        let added: Vec<(usize, usize)> =
            if !reading.is_empty() && (generating.is_empty() || !self.fed_prompt) {
                self.fed_prompt = true;
                self.turn = reading.last().map_or(0, |(i, _)| i + 1);
                reading.sort_unstable_by_key(|&(i, _)| self.active[i].seq);
                reading
            } else {
                self.fed_prompt = false;
                generating.into_iter().map(|i| (i, 1)).collect()
            };
        if added.is_empty() {
            return;
        }
        self.batch.clear();
        // (index in active, batch row) of every logits row asked for.
        let mut rows: Vec<(usize, i32)> = Vec::new();
        let mut failed: Option<BackendError> = None;
        for &(i, take) in &added {
            let s = &self.active[i];
            let Some(f) = s.feed.as_ref() else { continue };
            let first_kept = f.ids.len() - f.keep;
            for k in f.fed..f.fed + take {
                let logits = k >= first_kept;
                if logits {
                    rows.push((i, self.batch.n_tokens()));
                }
                if let Err(e) = self.batch.add(
                    LlamaToken(f.ids[k] as i32),
                    i32::try_from(s.pos + k - f.fed).unwrap_or(i32::MAX),
                    &[s.seq],
                    logits,
                ) {
                    failed = Some(BackendError::Internal(format!("llama.cpp batch: {e}")));
                }
            }
        }
        let result = match failed.take() {
            Some(e) => Err(e),
            None => ctx
                .decode(&mut self.batch)
                .map_err(|e| BackendError::Internal(format!("llama.cpp decode: {e}"))),
        };
        if let Err(e) = result {
            // The cache may hold part of this step: every sequence in it
            // fails (its session ends and frees it), the others go on.
            tracing::warn!(error = %e, sequences = added.len(), "llama.cpp step failed");
            for (i, _) in added {
                if let Some(f) = self.active[i].feed.take() {
                    let _ = f.reply.send(Err(e.clone()));
                    self.active[i].owed = true;
                }
            }
            return;
        }
        for (i, row) in rows {
            let logits = ctx.get_logits_ith(row);
            if let Some(f) = self.active[i].feed.as_mut() {
                if logits.len() < self.n_vocab {
                    failed = Some(BackendError::Internal(format!(
                        "llama.cpp returned {} logits for a vocabulary of {}",
                        logits.len(),
                        self.n_vocab
                    )));
                    break;
                }
                f.rows.extend_from_slice(&logits[..self.n_vocab]);
            }
        }
        for (i, take) in added {
            let s = &mut self.active[i];
            s.pos += take;
            let done = s.feed.as_mut().is_some_and(|f| {
                f.fed += take;
                f.fed == f.ids.len()
            });
            if done || failed.is_some() {
                if let Some(f) = s.feed.take() {
                    let answer = match &failed {
                        Some(e) => Err(e.clone()),
                        None => Ok(f.rows),
                    };
                    let _ = f.reply.send(answer);
                    s.owed = true;
                }
            }
        }
    }
}

/// A context of `streams` sequences, each in a KV stream of `per_seq`
/// cells.
fn new_context<'m>(
    backend: &LlamaBackend,
    model: &'m LlamaModel,
    per_seq: usize,
    streams: usize,
    threads: i32,
    flash_attention: bool,
) -> Result<LlamaContext<'m>, BackendError> {
    let n_ctx = per_seq.saturating_mul(streams);
    let n_batch = u32::try_from(PROMPT_STEP_TOKENS.max(streams)).unwrap_or(u32::MAX);
    // Micro-batches of one prompt chunk: a step's prompt tokens run in
    // passes of this size. 512, llama-server's, measured no faster in the
    // serving benchmark, and llama.cpp sizes its compute buffers by it.
    let n_ubatch = u32::try_from(PROMPT_CHUNK.max(streams)).unwrap_or(u32::MAX);
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(u32::try_from(n_ctx).unwrap_or(u32::MAX)))
        .with_n_batch(n_batch)
        .with_n_ubatch(n_ubatch)
        .with_n_seq_max(u32::try_from(streams).unwrap_or(1))
        // A stream per sequence (n_ctx / n_seq_max cells each): see the
        // module's comment on identical results.
        .with_kv_unified(false)
        .with_n_threads(threads)
        .with_n_threads_batch(threads)
        .with_flash_attention_policy(if flash_attention {
            FLASH_ATTENTION_ENABLED
        } else {
            FLASH_ATTENTION_DISABLED
        });
    model.new_context(backend, params).map_err(|e| {
        BackendError::Internal(format!(
            "llama.cpp context for {streams} sequences of {per_seq} tokens: {e} (out of memory?)"
        ))
    })
}
