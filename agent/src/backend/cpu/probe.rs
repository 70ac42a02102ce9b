//! Untrusted model files are opened in a child process first (issue 17).
//!
//! Any pod can upload bytes as a `.gguf`. llama.cpp's loader and kernels end
//! the process with `GGML_ASSERT`/`abort()` on some malformed files, which in
//! the agent would end every tenant's work. So before the cpu backend opens a
//! GGUF file in-process, the agent re-executes its own binary as
//! `rm-agent probe-model <path>`, which opens the file with the same code the
//! engine uses ([`engine::probe_gguf`]: candle's header reader, llama.cpp's
//! load and one token through a context, or candle's loader) and exits. A
//! signal or a refusal there becomes a 422 for that request; the agent keeps
//! serving.
//!
//! The in-process header walk ([`gguf_check`]) runs first and refuses the
//! common hostile files without a child. Verdicts are remembered per model
//! digest and per cache entry, so a file is checked once per agent process.
//!
//! The child is bounded: address space (the file, which llama.cpp maps, plus
//! [`MEMORY_HEADROOM`]), CPU time, no core dump, first in line for the OOM
//! killer, and a wall-clock timeout after which the agent kills it. It
//! prints its verdict as the last line of its stderr and exits with
//! [`EXIT_MALFORMED`] or [`EXIT_UNSUPPORTED`] when it refuses the file.

use std::collections::HashMap;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, ExitStatus, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;

use super::engine::{self, EngineOptions, GgufEngine};
use super::gguf_check::{self, GgufError};
use crate::backend::BackendError;

/// The hidden subcommand of `rm-agent` that checks one file.
pub const SUBCOMMAND: &str = "probe-model";
/// The child's exit code for a file that breaks the format or makes a
/// reader fail (sysexits' `EX_DATAERR`).
pub const EXIT_MALFORMED: i32 = 65;
/// The child's exit code for a well-formed file the engine cannot run (an
/// architecture llama.cpp does not know, tensors that do not match).
pub const EXIT_UNSUPPORTED: i32 = 66;
/// Address space the child may use beyond the file's size (llama.cpp maps the
/// whole file): vocabulary, KV cache and compute buffers of a 512-token
/// context for the largest vocabularies, with room to spare.
pub const MEMORY_HEADROOM: u64 = 4 << 30;
/// Wall-clock time the child gets, plus [`SECONDS_PER_BYTES`] per byte of
/// file: the one-token forward reads every weight, from disk when the file is
/// not in the page cache yet.
pub const BASE_TIMEOUT: Duration = Duration::from_secs(60);
/// One more second per this many bytes (64 MiB/s, a slow network disk).
const SECONDS_PER_BYTES: u64 = 64 << 20;
/// Checks running at once: each may hold a model's worth of page cache.
const CONCURRENT_CHECKS: usize = 2;
/// Verdicts kept; beyond this the memory starts over (a tenant uploading
/// file after file must not grow it without bound).
const MAX_VERDICTS: usize = 10_000;
/// The tail of the child's stderr that is kept (its last line is the reason).
const STDERR_TAIL: usize = 64 << 10;

/// How the agent runs the child check.
#[derive(Clone, Debug)]
pub struct ProbeConfig {
    /// The agent's own binary.
    pub program: PathBuf,
    pub base_timeout: Duration,
    pub memory_headroom: u64,
}

impl ProbeConfig {
    /// The running binary: `/proc/self/exe`, which execs the same file even
    /// when an upgrade has replaced or removed it on disk (a container's
    /// image layers keep it anyway), else `current_exe`.
    pub fn this_binary() -> std::io::Result<Self> {
        let proc_exe = Path::new("/proc/self/exe");
        let program = if proc_exe.exists() {
            proc_exe.to_path_buf()
        } else {
            std::env::current_exe()?
        };
        Ok(ProbeConfig {
            program,
            base_timeout: BASE_TIMEOUT,
            memory_headroom: MEMORY_HEADROOM,
        })
    }
}

/// A definite answer about a file.
#[derive(Clone, Debug, PartialEq)]
enum Verdict {
    Sound,
    Malformed(String),
    Unsupported(String),
}

impl Verdict {
    fn result(self) -> Result<(), BackendError> {
        match self {
            Verdict::Sound => Ok(()),
            Verdict::Malformed(m) => Err(BackendError::Malformed(m)),
            Verdict::Unsupported(m) => Err(BackendError::Unsupported(m)),
        }
    }
}

/// Checks GGUF files before the cpu backend opens them, and remembers the
/// verdicts.
pub struct ModelChecker {
    probe: Option<ProbeConfig>,
    engine: GgufEngine,
    verdicts: Mutex<HashMap<String, Verdict>>,
    slots: Semaphore,
}

impl ModelChecker {
    /// `probe`: run the child check too; `None` keeps to the in-process walk
    /// (library use, where the running binary is not the agent).
    pub fn new(probe: Option<ProbeConfig>, engine: GgufEngine) -> Self {
        ModelChecker {
            probe,
            engine,
            verdicts: Mutex::new(HashMap::new()),
            slots: Semaphore::new(CONCURRENT_CHECKS),
        }
    }

    fn remembered(&self, id: &str) -> Option<Verdict> {
        self.verdicts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .cloned()
    }

    fn remember(&self, id: &str, v: Verdict) {
        let mut map = self.verdicts.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= MAX_VERDICTS {
            map.clear();
        }
        map.insert(id.to_string(), v);
    }

    /// Records that `id` holds the same bytes as a file found sound (a copy).
    pub fn vouch(&self, id: &str) {
        self.remember(id, Verdict::Sound);
    }

    /// Checks the GGUF file at `path`, known as `id` (a model digest or a
    /// cache entry: content-addressed, so one verdict per content). Ok when
    /// the engine may open it in-process.
    pub async fn check(&self, id: &str, path: &Path) -> Result<(), BackendError> {
        if let Some(v) = self.remembered(id) {
            return v.result();
        }
        let p = path.to_path_buf();
        let walked = tokio::task::spawn_blocking(move || gguf_check::check_file(&p))
            .await
            .map_err(|e| BackendError::Internal(format!("the model check failed: {e}")))?;
        let verdict = match walked {
            Ok(summary) => {
                tracing::debug!(path = %path.display(), ?summary, "GGUF header walked");
                match &self.probe {
                    Some(cfg) => {
                        let _slot = self.slots.acquire().await.map_err(|_| {
                            BackendError::Unavailable("the agent is shutting down".into())
                        })?;
                        run_child(cfg, path, self.engine).await?
                    }
                    None => Verdict::Sound,
                }
            }
            Err(GgufError::Io { path, source }) => {
                return Err(BackendError::Io(format!("{path}: {source}")));
            }
            Err(GgufError::Malformed(m)) => Verdict::Malformed(m),
            Err(e @ GgufError::UnsupportedType { .. }) => Verdict::Unsupported(e.to_string()),
        };
        if verdict != Verdict::Sound {
            tracing::warn!(model = %id, path = %path.display(), verdict = ?verdict, "model file refused");
        }
        self.remember(id, verdict.clone());
        verdict.result()
    }
}

/// Runs `rm-agent probe-model` on `path` and reads its verdict. `Err` is not
/// remembered: the agent's own trouble (cannot start the child, killed from
/// outside) or a timeout.
async fn run_child(
    cfg: &ProbeConfig,
    path: &Path,
    engine: GgufEngine,
) -> Result<Verdict, BackendError> {
    let size = std::fs::metadata(path)
        .map_err(|e| BackendError::Io(format!("{}: {e}", path.display())))?
        .len();
    let timeout = cfg.base_timeout + Duration::from_secs(size / SECONDS_PER_BYTES);
    let engine_arg = match engine {
        GgufEngine::Auto => "auto",
        GgufEngine::LlamaCpp => "llama-cpp",
        GgufEngine::Candle => "candle",
    };
    let mut cmd = tokio::process::Command::new(&cfg.program);
    cmd.arg(SUBCOMMAND)
        .arg(path)
        .args(["--format", "gguf", "--engine", engine_arg])
        .arg("--max-memory")
        .arg(size.saturating_add(cfg.memory_headroom).to_string())
        .arg("--max-cpu-seconds")
        .arg((timeout.as_secs() + 1).to_string())
        // ggml would attach gdb for a backtrace before aborting: slow, and
        // its output would bury the assertion.
        .env("GGML_NO_BACKTRACE", "1")
        // candle appends a backtrace to its errors when these are set.
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let started = Instant::now();
    let mut child = cmd.spawn().map_err(|e| {
        BackendError::Internal(format!(
            "cannot run the model check ({} {SUBCOMMAND}): {e}",
            cfg.program.display()
        ))
    })?;
    let stderr = child.stderr.take();
    let run = async {
        let (status, tail) = tokio::join!(child.wait(), read_tail(stderr));
        (status, tail)
    };
    let (status, tail) = match tokio::time::timeout(timeout, run).await {
        Ok((status, tail)) => (
            status.map_err(|e| BackendError::Internal(format!("the model check: {e}")))?,
            tail,
        ),
        Err(_) => {
            let _ = child.kill().await;
            tracing::warn!(path = %path.display(), seconds = timeout.as_secs(), "model check timed out; killed");
            // Refused, but not remembered: a slow disk may be to blame.
            return Err(BackendError::Malformed(format!(
                "checking it took longer than {} s (the check was stopped)",
                timeout.as_secs()
            )));
        }
    };
    let ms = started.elapsed().as_millis() as u64;
    tracing::debug!(path = %path.display(), output = %tail, "model check output");
    let verdict = verdict_of(status, &tail)?;
    tracing::info!(path = %path.display(), ms, bytes = size, sound = (verdict == Verdict::Sound), "model file checked in a child process");
    Ok(verdict)
}

/// The last `STDERR_TAIL` bytes the child writes.
async fn read_tail(stderr: Option<tokio::process::ChildStderr>) -> String {
    let Some(mut r) = stderr else {
        return String::new();
    };
    let mut kept: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > STDERR_TAIL {
                    kept.drain(..kept.len() - STDERR_TAIL);
                }
            }
        }
    }
    String::from_utf8_lossy(&kept).into_owned()
}

fn signal_name(s: i32) -> &'static str {
    match s {
        4 => "SIGILL",
        5 => "SIGTRAP",
        6 => "SIGABRT",
        7 => "SIGBUS",
        8 => "SIGFPE",
        9 => "SIGKILL",
        11 => "SIGSEGV",
        15 => "SIGTERM",
        24 => "SIGXCPU",
        31 => "SIGSYS",
        _ => "signal",
    }
}

/// The reason the child gave: the last line it printed, shortened. Rust's
/// "note: run with RUST_BACKTRACE" hint after a failed allocation is not a
/// reason; ggml's assertions name their source file by its build path, of
/// which the file name is enough.
pub fn last_line(output: &str) -> String {
    let line = output
        .lines()
        .rev()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("note: "))
        .unwrap_or("");
    let line = match line.split_once(": ") {
        Some((place, rest)) if place.starts_with('/') => {
            let file = place.rsplit('/').next().unwrap_or(place);
            format!("{file}: {rest}")
        }
        _ => line.to_string(),
    };
    if line.is_empty() {
        return "it printed nothing".into();
    }
    match line.char_indices().nth(400) {
        Some((cut, _)) => format!("{}…", &line[..cut]),
        None => line,
    }
}

/// What the child's exit says about the file. `Err` when it says nothing
/// about the file (killed from outside, a usage error).
fn verdict_of(status: ExitStatus, output: &str) -> Result<Verdict, BackendError> {
    let reason = last_line(output);
    if status.success() {
        return Ok(Verdict::Sound);
    }
    match (status.code(), status.signal()) {
        (Some(EXIT_MALFORMED), _) | (Some(101), _) => Ok(Verdict::Malformed(reason)),
        (Some(EXIT_UNSUPPORTED), _) => Ok(Verdict::Unsupported(reason)),
        // A reader crashed on the file: that is the file's doing (the
        // child's own code is the agent's, which runs these files daily).
        (None, Some(s @ (4 | 5 | 6 | 7 | 8 | 11 | 24 | 31))) => Ok(Verdict::Malformed(format!(
            "{reason} (the GGUF loader aborted with signal {s}, {})",
            signal_name(s)
        ))),
        (None, Some(s)) => Err(BackendError::Internal(format!(
            "the model check was stopped by signal {s} ({}; out of memory on the node?); retry: {reason}",
            signal_name(s)
        ))),
        (code, _) => Err(BackendError::Internal(format!(
            "the model check exited with {code:?}: {reason}"
        ))),
    }
}

/// What the child is asked.
#[derive(clap::Parser, Debug)]
#[command(
    name = "rm-agent probe-model",
    bin_name = "rm-agent probe-model",
    about = "Opens one model file with the cpu engine's readers and exits: 0 when they accept it. \
             Run by the agent in a child process before it opens an untrusted file itself."
)]
pub struct ProbeArgs {
    /// The model file.
    pub path: PathBuf,
    #[arg(long, value_enum, default_value_t = ProbeFormat::Gguf)]
    pub format: ProbeFormat,
    /// The engine the agent would choose (its --cpu-engine).
    #[arg(long, value_enum, default_value_t = GgufEngine::Auto)]
    pub engine: GgufEngine,
    /// Address-space limit in bytes (RLIMIT_AS).
    #[arg(long)]
    pub max_memory: Option<u64>,
    /// CPU-time limit in seconds (RLIMIT_CPU), a backstop to the agent's
    /// wall-clock timeout.
    #[arg(long)]
    pub max_cpu_seconds: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProbeFormat {
    Gguf,
}

/// Lowers a resource limit (never raises it: the hard limit may be lower).
fn limit(resource: rustix::process::Resource, soft: u64, hard: u64) {
    let old = rustix::process::getrlimit(resource);
    let cap = |v: u64| Some(old.maximum.map_or(v, |m| m.min(v)));
    let new = rustix::process::Rlimit {
        current: cap(soft),
        maximum: cap(hard),
    };
    if let Err(e) = rustix::process::setrlimit(resource, new) {
        eprintln!("warning: cannot set {resource:?} to {soft}: {e}");
    }
}

/// Records llama.cpp's error lines (it says why a load failed only in its
/// log) and echoes warnings and errors to stderr.
struct LogCapture;

static LLAMA_ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());

struct MessageField(String);

impl tracing::field::Visit for MessageField {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "message" {
            self.0 = value.trim().to_string();
        }
    }
    fn record_debug(&mut self, field: &tracing::field::Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}").trim().to_string();
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogCapture {
    fn on_event(&self, event: &tracing::Event<'_>, _: tracing_subscriber::layer::Context<'_, S>) {
        let level = *event.metadata().level();
        if level > tracing::Level::WARN {
            return;
        }
        let mut m = MessageField(String::new());
        event.record(&mut m);
        eprintln!("{level}: {}", m.0);
        if level == tracing::Level::ERROR {
            let mut errors = LLAMA_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
            if errors.len() < 32 {
                errors.push(m.0);
            }
        }
    }
}

/// Why llama.cpp refused the file, from its log: the line after "error
/// loading model:", else its first error.
fn llama_cpp_reason() -> Option<String> {
    let errors = LLAMA_ERRORS.lock().unwrap_or_else(|p| p.into_inner());
    errors
        .iter()
        .find_map(|l| {
            l.split_once("error loading model: ")
                .map(|(_, r)| r.to_string())
        })
        .or_else(|| errors.first().cloned())
}

/// `rm-agent probe-model`: the child's side. Its last line on stderr is the
/// verdict.
pub fn run(args: ProbeArgs) -> ExitCode {
    use rustix::process::Resource;
    // First, before the file is opened. No core dump of a crash on a
    // hostile file: RLIMIT_CORE for plain files, not dumpable for a piped
    // core_pattern (systemd-coredump, apport), which ignores the limit.
    limit(Resource::Core, 0, 0);
    if let Err(e) =
        rustix::process::set_dumpable_behavior(rustix::process::DumpableBehavior::NotDumpable)
    {
        eprintln!("warning: cannot turn core dumps off: {e}");
    }
    if let Some(bytes) = args.max_memory {
        limit(Resource::As, bytes, bytes);
    }
    // Under memory pressure (the agent's cgroup limit), the kernel should end
    // this check, not the agent beside it that serves every tenant.
    if let Err(e) = std::fs::write("/proc/self/oom_score_adj", "1000") {
        eprintln!("warning: cannot raise oom_score_adj: {e}");
    }
    if let Some(secs) = args.max_cpu_seconds {
        // SIGXCPU at the soft limit, SIGKILL five seconds of CPU later.
        limit(Resource::Cpu, secs, secs.saturating_add(5));
    }
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        let _ = tracing_subscriber::registry().with(LogCapture).try_init();
    }
    // A panic in a reader is the file's doing too: reported as one line.
    std::panic::set_hook(Box::new(|_| {}));
    let ProbeFormat::Gguf = args.format;
    let opts = EngineOptions {
        gguf_engine: args.engine,
        // One thread: the probe runs beside tenants' generations.
        threads: 1,
        // One probe sequence: a context of one.
        max_batch: 1,
        exact_batching: false,
    };
    let path = args.path;
    let outcome = std::panic::catch_unwind(move || probe(&path, &opts));
    let first_line = |s: &str| s.lines().next().unwrap_or("").to_string();
    match outcome {
        Ok(Ok(engine)) => {
            eprintln!("ok: the file opens on {engine}");
            ExitCode::SUCCESS
        }
        Ok(Err(BackendError::Malformed(m))) => {
            eprintln!("{}", first_line(&m));
            ExitCode::from(EXIT_MALFORMED as u8)
        }
        Ok(Err(e)) => {
            let why = match (&e, llama_cpp_reason()) {
                (BackendError::Unsupported(_), Some(r)) => {
                    format!("llama.cpp cannot load the model: {r}")
                }
                _ => first_line(&e.to_string()),
            };
            eprintln!("{why}");
            ExitCode::from(EXIT_UNSUPPORTED as u8)
        }
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "a panic".into());
            eprintln!("a reader failed on the file: {}", first_line(&what));
            ExitCode::from(EXIT_MALFORMED as u8)
        }
    }
}

fn probe(path: &Path, opts: &EngineOptions) -> Result<&'static str, BackendError> {
    match gguf_check::check_file(path) {
        Ok(_) => {}
        Err(GgufError::Malformed(m)) => return Err(BackendError::Malformed(m)),
        Err(e) => return Err(BackendError::Unsupported(e.to_string())),
    }
    engine::probe_gguf(path, opts)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reason_is_the_last_line_without_the_build_path() {
        let out = "warning: x\n/root/.cargo/registry/src/llama.cpp/src/llama-vocab.cpp:2578: GGML_ASSERT(a == b) failed\n\n";
        assert_eq!(
            last_line(out),
            "llama-vocab.cpp:2578: GGML_ASSERT(a == b) failed"
        );
        assert_eq!(last_line("error: bad alignment\n"), "error: bad alignment");
        assert_eq!(
            last_line(
                "memory allocation of 4294967296 bytes failed\nnote: run with `RUST_BACKTRACE=1` environment variable to display a backtrace\n"
            ),
            "memory allocation of 4294967296 bytes failed"
        );
        assert_eq!(last_line(""), "it printed nothing");
        assert_eq!(last_line(&"x".repeat(1000)).chars().count(), 401);
    }

    #[test]
    fn exits_and_signals_become_verdicts() {
        let exit = |code: i32| ExitStatus::from_raw(code << 8);
        let signal = ExitStatus::from_raw;
        assert_eq!(verdict_of(exit(0), "ok").ok(), Some(Verdict::Sound));
        assert_eq!(
            verdict_of(exit(EXIT_MALFORMED), "bad\n").ok(),
            Some(Verdict::Malformed("bad".into()))
        );
        assert_eq!(
            verdict_of(exit(EXIT_UNSUPPORTED), "arch\n").ok(),
            Some(Verdict::Unsupported("arch".into()))
        );
        match verdict_of(signal(6), "x.cpp:1: GGML_ASSERT(y) failed\n") {
            Ok(Verdict::Malformed(m)) => assert_eq!(
                m,
                "x.cpp:1: GGML_ASSERT(y) failed (the GGUF loader aborted with signal 6, SIGABRT)"
            ),
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            verdict_of(signal(11), "").ok(),
            Some(Verdict::Malformed(_))
        ));
        // Killed from outside, or a usage error: nothing about the file.
        assert!(verdict_of(signal(9), "").is_err());
        assert!(verdict_of(exit(2), "usage").is_err());
    }
}
