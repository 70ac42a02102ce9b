//! External backends: worker programs found in `--plugin-dir` by a
//! `manifest.json`, started and supervised by the agent (restart with
//! back-off). The protocol is JSON lines over the worker's stdin/stdout
//! (stderr is logged); agent/README.md documents it.
//!
//! Lifetime: a process serves one allocation (the device plugin's token) on
//! one device set, so it only ever sees that pod's devices and models. It is
//! released (a `shutdown` message, killed after [`STOP_GRACE`]) when the
//! allocation ends: the reaper finds its token record gone or lapsed
//! ([`Backend::release_ended`]), or a request arrives from an allocation the
//! kubelet has since given one of its devices ([`AllocationRef::replaced_by`];
//! the old process is then stopped, and waited for, before the new pod's
//! request starts a fresh one).
//!
//! Compiles and model runs never share a process: a compile gets a process
//! of its own (role `compile`, per device set and allocation, stopped once no
//! compile uses it), so a generate is not queued behind an hours-long
//! compile. Within a process, requests are sent one at a time (the workers
//! handle them one at a time anyway), and a request's timeout counts from
//! when it is sent: a timeout kills the process only for the request that is
//! running in it, and the requests queued behind it go to the restarted
//! process instead of failing.
//!
//! A request holds its admission slot (`--concurrent-requests`, handed over
//! by the agent in the job's [`Slot`]) until its process is done with it,
//! not until its caller leaves: a hang-up then admits nobody new while the
//! worker still works on the cancelled request, so nothing piles up in a
//! process's queue. A queued request whose caller left is dropped at once,
//! and at most [`MAX_WAITING`] wait per serving process whatever the
//! settings.
//!
//! Cancellation: a worker that says `"cancel": true` in its hello is sent a
//! `cancel` message when the caller of its running request goes away (the
//! client hung up, or the agent's `--request-timeout` passed) or the
//! request outlives its own timeout. The request then ends with an answer
//! (kind `cancelled`) and the process, with its loaded models, serves the
//! next one. A cancelled request that does not answer is killed as before,
//! at its timeout, but never sooner than the manifest's `cancel_grace_s`
//! after its cancel.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::future::BoxFuture;
use rm_crds::{CompileOptions, DeviceType, Priority};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStdin, Command};
use tokio::sync::{Notify, mpsc, watch};

use super::extra::{self, ExtraOptions};
use super::{
    AllocationRef, Availability, Backend, BackendError, BackendInfo, CompileJob, ForwardJob,
    ForwardOutput, GenerateJob, ModelRef, ProgressFn, SequenceOutput, Slot, SlotGuard, TokenFn,
    kept_positions,
};
use crate::cache::CacheKey;
use crate::source::ModelFormat;

pub const PROTOCOL_VERSION: u32 = 1;
/// Longest line a worker may write (a generate result with many tokens fits).
const MAX_LINE: usize = 16 << 20;
/// How long a stopped worker may take to exit after `shutdown` before it is
/// killed.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// Requests that may wait in a serving process's queue behind the one it
/// runs (it runs one at a time). Admission bounds them already (a request
/// keeps its slot until the worker is done with it), unless
/// `--concurrent-requests` is set higher; this bounds the memory they hold
/// (up to 8 MiB of JSON each) whatever the settings.
const MAX_WAITING: usize = 4;

/// `<plugin-dir>/<name>/manifest.json`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub display_name: String,
    pub version: String,
    pub vendor: String,
    pub priority: u32,
    pub device_types: Vec<DeviceType>,
    /// Program and arguments; a relative program is resolved against the
    /// manifest's directory, which is also the working directory.
    pub command: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default = "default_request_timeout")]
    pub request_timeout_s: u64,
    #[serde(default = "default_compile_timeout")]
    pub compile_timeout_s: u64,
    /// How long a cancelled request may take to answer before its process
    /// is killed (workers that support `cancel` only).
    #[serde(default = "default_cancel_grace")]
    pub cancel_grace_s: u64,
    /// Shown in `/v1/backends`: the path has not been run on real hardware.
    #[serde(default)]
    pub unverified_on_hardware: bool,
    /// The keys a request may set in `options.extra`, with their types; any
    /// other key is refused before a compile (see `backend::extra`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub extra_options: ExtraOptions,
    /// The model formats the worker compiles; absent: every format. Selection
    /// passes a model of another format on to the next backend.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model_formats: Option<Vec<ModelFormat>>,
}

/// The manifest command's program word that `--worker-python` replaces.
pub const PYTHON_WORD: &str = "python3";

/// The program a manifest command starts: `python` (`--worker-python`) for
/// a leading `python3`, so that a node's Python with the worker's packages
/// is used without editing manifests; a relative path with a `/` against the
/// worker's directory; anything else as it is (found on `PATH`).
pub fn program(command0: &str, dir: &Path, python: Option<&Path>) -> PathBuf {
    match python {
        Some(py) if command0 == PYTHON_WORD => py.to_path_buf(),
        _ if command0.contains('/') && !Path::new(command0).is_absolute() => dir.join(command0),
        _ => PathBuf::from(command0),
    }
}

fn default_request_timeout() -> u64 {
    600
}
fn default_compile_timeout() -> u64 {
    4 * 3600
}
fn default_cancel_grace() -> u64 {
    10
}

/// Reads every manifest under `plugin_dir`; bad ones are logged and skipped.
pub fn discover(plugin_dir: &Path) -> Vec<(PathBuf, Manifest)> {
    let mut found = Vec::new();
    let Ok(rd) = std::fs::read_dir(plugin_dir) else {
        tracing::warn!(dir = %plugin_dir.display(), "plugin directory cannot be read; no external backends");
        return found;
    };
    let mut dirs: Vec<PathBuf> = rd
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    for dir in dirs {
        let path = dir.join("manifest.json");
        let Ok(raw) = std::fs::read(&path) else {
            continue;
        };
        match serde_json::from_slice::<Manifest>(&raw) {
            Ok(m) if m.command.is_empty() => {
                tracing::warn!(manifest = %path.display(), "manifest has an empty command; skipped")
            }
            Ok(m) => match extra::check_declarations(&m.extra_options) {
                Ok(()) => found.push((dir, m)),
                Err(e) => {
                    tracing::warn!(manifest = %path.display(), error = %e, "bad manifest; skipped")
                }
            },
            Err(e) => {
                tracing::warn!(manifest = %path.display(), error = %e, "bad manifest; skipped")
            }
        }
    }
    found
}

/// What the worker answers to `hello`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
pub struct Hello {
    pub protocol: u32,
    pub compiler_version: String,
    pub available: bool,
    #[serde(default)]
    pub reason: Option<String>,
    /// The worker stops a running request on `cancel` and answers it (kind
    /// `cancelled`). Absent (older workers): requests are never cancelled
    /// once sent, they run to their end or their timeout.
    #[serde(default)]
    pub cancel: bool,
}

/// A message from a worker about one request.
#[derive(Debug)]
enum Incoming {
    Progress(f32, String),
    Token(usize, u32, Option<String>),
    Result(Value),
    Error(BackendError),
}

/// Counts a request in its instance's `in_flight` while it lives.
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    /// Counts one more; answers the guard and how many were in flight before.
    fn enter(count: &Arc<AtomicUsize>) -> (Self, usize) {
        let before = count.fetch_add(1, Ordering::SeqCst);
        (InFlight(count.clone()), before)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// What a request holds until the supervisor is done with it (its answer
/// came, or it was dropped unsent, or its process was killed), not merely
/// until its caller leaves: its admission slot and its place in the count.
#[derive(Default)]
struct Held {
    _slot: Option<SlotGuard>,
    _in_flight: Option<InFlight>,
}

struct Outgoing {
    method: &'static str,
    params: Value,
    /// Counted from when the request is sent to the worker, not from when it
    /// was queued: time spent behind other requests is not this one's fault.
    timeout: Duration,
    /// `None`: nobody waits for the answer (`cleanup`).
    reply: Option<mpsc::UnboundedSender<Incoming>>,
    held: Held,
}

impl Outgoing {
    /// The final answer of a request that was never sent.
    fn finish(self, msg: Incoming) {
        // The slot first: the caller may send its next request at once.
        drop(self.held);
        if let Some(r) = &self.reply {
            let _ = r.send(msg);
        }
    }

    /// The caller went away (its client disconnected) before the request
    /// was sent: the worker is spared the work.
    fn abandoned(&self) -> bool {
        self.reply.as_ref().is_some_and(|r| r.is_closed())
    }
}

/// What a worker process is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Role {
    /// `generate`, `forward`, `cleanup`: keeps the allocation's models loaded.
    Serve,
    /// `compile`: a process of its own, so that a compile of hours never
    /// holds up (or is killed with) the model runs on the same devices.
    Compile,
    /// `hello` at start, without devices.
    Probe,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Role::Serve => "serve",
            Role::Compile => "compile",
            Role::Probe => "probe",
        }
    }
}

/// Which process a request goes to.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct InstanceKey {
    role: Role,
    device_type: Option<DeviceType>,
    devices: Vec<String>,
    /// The allocation served: a process never serves two, so it can end
    /// with its allocation (and never holds two tenants' models).
    token_sha256: Option<String>,
}

impl InstanceKey {
    fn describe(&self) -> String {
        format!(
            "{}:{}",
            self.device_type.map(|t| t.as_str()).unwrap_or("-"),
            self.devices.join(",")
        )
    }
}

/// One supervised worker process (restarted when it dies).
struct Instance {
    key: InstanceKey,
    allocation: Option<AllocationRef>,
    tx: mpsc::UnboundedSender<Outgoing>,
    /// Requests sent to it and not yet done with: waiting, running, or
    /// cancelled but still running.
    in_flight: Arc<AtomicUsize>,
    stop: Arc<Notify>,
    /// True once the supervisor has ended and its process is reaped.
    exited: watch::Receiver<bool>,
    /// Set by the first [`Instance::release`].
    releasing: AtomicBool,
    /// Compiles running on it (role `compile`); changed under the backend's
    /// instance lock only.
    compiles: AtomicUsize,
}

impl Instance {
    /// Asks the supervisor to stop its process for good. True for the call
    /// that did so (the others find it stopping already).
    fn release(&self) -> bool {
        if self.releasing.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.stop.notify_one();
        true
    }

    fn is_releasing(&self) -> bool {
        self.releasing.load(Ordering::SeqCst)
    }

    /// Waits until the process is gone (reaped), e.g. before its devices go
    /// to another pod's process.
    async fn exited(&self) {
        let mut rx = self.exited.clone();
        // An error means the supervisor is gone without a word: also ended.
        let _ = rx.wait_for(|done| *done).await;
    }

    /// `namespace/pod` of the allocation, for logs.
    fn pod(&self) -> String {
        self.allocation
            .as_ref()
            .map(|a| format!("{}/{}", a.owner.namespace, a.owner.pod))
            .unwrap_or_else(|| "-".into())
    }
}

#[derive(Deserialize)]
struct Line {
    id: Option<u64>,
    #[serde(default)]
    result: Option<Value>,
    #[serde(default)]
    error: Option<WireError>,
    #[serde(default)]
    progress: Option<WireProgress>,
    #[serde(default)]
    token: Option<WireToken>,
}

#[derive(Deserialize)]
struct WireError {
    message: String,
    #[serde(default)]
    kind: Option<String>,
}

#[derive(Deserialize)]
struct WireProgress {
    fraction: f32,
    #[serde(default)]
    stage: String,
}

#[derive(Deserialize)]
struct WireToken {
    #[serde(default)]
    index: usize,
    token_id: u32,
    #[serde(default)]
    text: Option<String>,
}

/// Parses one line of worker output. Pure; the protocol's grammar lives here.
fn parse_line(line: &str) -> Result<(u64, Incoming), String> {
    let l: Line = serde_json::from_str(line)
        .map_err(|e| format!("not a JSON message ({e}): {:.200}", line))?;
    let id =
        l.id.ok_or_else(|| format!("message without \"id\": {:.200}", line))?;
    let msg = if let Some(r) = l.result {
        Incoming::Result(r)
    } else if let Some(e) = l.error {
        let err = match e.kind.as_deref() {
            Some("invalid_request") => BackendError::InvalidRequest(e.message),
            Some("unsupported") => BackendError::Unsupported(e.message),
            Some("unavailable") => BackendError::Unavailable(e.message),
            Some("cancelled") => BackendError::Cancelled,
            _ => BackendError::Worker(e.message),
        };
        Incoming::Error(err)
    } else if let Some(p) = l.progress {
        Incoming::Progress(p.fraction, p.stage)
    } else if let Some(t) = l.token {
        Incoming::Token(t.index, t.token_id, t.text)
    } else {
        return Err(format!(
            "message has none of result, error, progress, token: {:.200}",
            line
        ));
    };
    Ok((id, msg))
}

/// Back-off before restart number `n` (0-based): 200 ms doubling to 30 s.
pub fn restart_delay(consecutive_failures: u32) -> Duration {
    let ms = 200u64.saturating_mul(1u64 << consecutive_failures.min(10));
    Duration::from_millis(ms.min(30_000))
}

/// Environment that tells a worker its devices.
fn device_env(device_type: Option<DeviceType>, devices: &[String]) -> Vec<(String, String)> {
    let list = devices.join(",");
    let mut env = vec![("RM_DEVICES".to_string(), list.clone())];
    if let Some(t) = device_type {
        env.push(("RM_DEVICE_TYPE".into(), t.as_str().into()));
        match t {
            // The CUDA runtime reads this before the first CUDA call.
            DeviceType::Gpu => env.push(("CUDA_VISIBLE_DEVICES".into(), list)),
            DeviceType::Rbln => env.push(("RBLN_DEVICES".into(), list)),
            DeviceType::Furiosa => env.push(("FURIOSA_DEVICES".into(), list)),
            DeviceType::Cpu => {}
        }
    }
    env
}

/// The variable that tells a worker how many threads one computation may
/// use on the CPU (the agent's `--cpu-threads`), as the built-in backend does.
pub const CPU_THREADS_ENV: &str = "RM_CPU_THREADS";

/// A worker process's environment: its devices, whether the operator
/// allows `trust_remote_code` (the worker's own check in `rm_worker.py` reads
/// it), and the agent's CPU thread count. Set either way, so neither an
/// inherited value nor the manifest's `env` (applied before this) decides.
fn worker_env(
    device_type: Option<DeviceType>,
    devices: &[String],
    allow_trust_remote_code: bool,
    cpu_threads: Option<usize>,
) -> Vec<(String, String)> {
    let mut env = device_env(device_type, devices);
    env.push((
        extra::ALLOW_TRUST_REMOTE_CODE_ENV.into(),
        if allow_trust_remote_code { "1" } else { "0" }.into(),
    ));
    if let Some(n) = cpu_threads {
        env.push((CPU_THREADS_ENV.into(), n.to_string()));
    }
    env
}

struct Supervisor {
    /// `<backend>[<role> <device type>:<devices>]`, for logs.
    name: String,
    role: Role,
    /// `namespace/pod` of the allocation, for logs.
    pod: String,
    dir: PathBuf,
    manifest: Manifest,
    /// `--worker-python`, for a manifest command that starts with `python3`.
    python: Option<PathBuf>,
    env: Vec<(String, String)>,
    restarts: Arc<AtomicU64>,
    /// `Some(grace)`: the worker understands `cancel`, and a cancelled
    /// request has at least `grace` to answer before its process is killed.
    cancel_grace: Option<Duration>,
    /// `cancel` messages sent, for `GET /v1/backends`.
    cancels: Arc<AtomicU64>,
}

/// The request the worker is working on.
struct Running {
    id: u64,
    method: &'static str,
    timeout: Duration,
    /// Its timeout; once cancelled, at least the end of the cancel's grace.
    deadline: tokio::time::Instant,
    reply: Option<mpsc::UnboundedSender<Incoming>>,
    /// A `cancel` was sent: the answer is awaited only to know the worker
    /// is free again.
    cancelled: bool,
    /// Dropped when the worker is done with the request, even when its
    /// caller left long before.
    held: Held,
}

impl Running {
    /// Progress or tokens; or the timeout's early answer, while the work
    /// goes on until it stops.
    fn answer(&self, msg: Incoming) {
        if let Some(r) = &self.reply {
            let _ = r.send(msg);
        }
    }

    /// The final answer: the worker is done with the request.
    fn finish(self, msg: Incoming) {
        // The slot first: the caller may send its next request at once.
        drop(self.held);
        if let Some(r) = &self.reply {
            let _ = r.send(msg);
        }
    }
}

/// Completes when the caller of a request still queued has gone away; with
/// none queued, never. Such a request is dropped at once rather than when it
/// reaches the front, so that it holds no slot or memory for the time the
/// worker needs for the requests ahead of it.
async fn queued_caller_gone(queue: &VecDeque<Outgoing>) {
    let gone: Vec<_> = queue
        .iter()
        .filter_map(|o| o.reply.as_ref())
        .map(|r| Box::pin(r.closed()))
        .collect();
    if gone.is_empty() {
        std::future::pending::<()>().await;
    } else {
        futures::future::select_all(gone).await;
    }
}

/// Completes when the caller of `running` has gone away (its `call` was
/// dropped) while the request is in the worker and not yet cancelled; with
/// `None`, never.
async fn caller_gone(running: Option<&Running>) {
    match running {
        Some(Running {
            reply: Some(reply),
            cancelled: false,
            ..
        }) => reply.closed().await,
        _ => std::future::pending().await,
    }
}

/// Completes at `deadline`, or never.
async fn until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

impl Supervisor {
    fn spawn_child(&self) -> std::io::Result<Child> {
        let prog = program(&self.manifest.command[0], &self.dir, self.python.as_deref());
        let mut cmd = Command::new(prog);
        cmd.args(&self.manifest.command[1..])
            .current_dir(&self.dir)
            .envs(&self.manifest.env)
            .envs(self.env.iter().cloned())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        cmd.spawn()
    }

    /// Why requests fail once the instance is released.
    fn released_error(&self) -> BackendError {
        BackendError::Unavailable(format!(
            "worker {} was released (its allocation ended, or the agent is stopping)",
            self.name
        ))
    }

    /// Runs the worker until `stop` (or until the backend drops the
    /// instance), restarting it with back-off when it dies; then reports the
    /// process gone on `exited`.
    async fn run(
        self,
        rx: mpsc::UnboundedReceiver<Outgoing>,
        stop: Arc<Notify>,
        exited: watch::Sender<bool>,
    ) {
        self.supervise(rx, stop).await;
        let _ = exited.send(true);
    }

    async fn supervise(&self, mut rx: mpsc::UnboundedReceiver<Outgoing>, stop: Arc<Notify>) {
        // Requests not yet sent. They outlive a process: a restart caused by
        // another request does not fail them.
        let mut queue: VecDeque<Outgoing> = VecDeque::new();
        let mut consecutive = 0u32;
        let mut first = true;
        loop {
            if !first {
                let delay = restart_delay(consecutive);
                tracing::warn!(worker = %self.name, role = self.role.as_str(), pod = %self.pod, delay_ms = delay.as_millis() as u64, "restarting worker after back-off");
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.notified() => {
                        self.fail_all(&mut queue, &mut rx);
                        return;
                    }
                }
                self.restarts.fetch_add(1, Ordering::Relaxed);
                consecutive += 1;
            }
            first = false;
            let started = Instant::now();
            let mut child = match self.spawn_child() {
                Ok(c) => c,
                Err(e) => {
                    tracing::error!(worker = %self.name, error = %e, "cannot start worker");
                    // Fail what is queued so callers do not wait for a
                    // program that cannot start.
                    while let Ok(o) = rx.try_recv() {
                        queue.push_back(o);
                    }
                    for o in queue.drain(..) {
                        o.finish(Incoming::Error(BackendError::Unavailable(format!(
                            "worker {} cannot be started: {e}",
                            self.name
                        ))));
                    }
                    continue;
                }
            };
            let pid = child.id().unwrap_or(0);
            tracing::info!(worker = %self.name, role = self.role.as_str(), pod = %self.pod, pid, "worker started");
            let (Some(mut stdin), Some(stdout), Some(stderr)) =
                (child.stdin.take(), child.stdout.take(), child.stderr.take())
            else {
                continue;
            };
            let name = self.name.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(l)) = lines.next_line().await {
                    tracing::info!(worker = %name, pid, "{l}");
                }
            });
            let mut out = BufReader::with_capacity(1 << 16, stdout);
            let mut running: Option<Running> = None;
            let mut next_id = 1u64;
            let mut buf = Vec::new();
            let why: String = loop {
                // The next request goes out when the worker is idle, so its
                // timeout measures its own work only.
                let mut write_failed: Option<String> = None;
                while running.is_none() {
                    let Some(o) = queue.pop_front() else { break };
                    if o.abandoned() {
                        continue;
                    }
                    let id = next_id;
                    next_id += 1;
                    let deadline = tokio::time::Instant::now() + o.timeout;
                    let line = json!({"id": id, "method": o.method, "params": o.params})
                        .to_string()
                        + "\n";
                    let r = Running {
                        id,
                        method: o.method,
                        timeout: o.timeout,
                        deadline,
                        reply: o.reply,
                        cancelled: false,
                        held: o.held,
                    };
                    // Bounded too: a worker that stops reading its stdin
                    // would otherwise hold up the whole instance.
                    let sent = tokio::time::timeout_at(deadline, async {
                        stdin.write_all(line.as_bytes()).await?;
                        stdin.flush().await
                    })
                    .await;
                    match sent {
                        Ok(Ok(())) => running = Some(r),
                        Ok(Err(e)) => {
                            r.finish(Incoming::Error(BackendError::Worker(format!(
                                "cannot write to worker {}: {e}",
                                self.name
                            ))));
                            write_failed = Some(format!("stdin closed: {e}"));
                            break;
                        }
                        // Out of time with part of the line perhaps in the
                        // pipe: whatever is written next (a `cancel`, the
                        // next request) would be read as the rest of it, so
                        // the process is restarted, not sent a cancel. The
                        // request never reached the worker: it runs nobody
                        // else's work.
                        Err(_) => {
                            let secs = r.timeout.as_secs();
                            let why = format!(
                                "the worker did not read a {} request within its timeout of {secs} s",
                                r.method
                            );
                            r.finish(Incoming::Error(BackendError::Timeout(secs)));
                            write_failed = Some(why);
                            break;
                        }
                    }
                }
                if let Some(why) = write_failed {
                    break why;
                }
                tokio::select! {
                    msg = rx.recv() => {
                        let Some(o) = msg else {
                            // The backend dropped the instance: stop for good.
                            self.shut_down(&mut child, stdin, pid).await;
                            return;
                        };
                        queue.push_back(o);
                    }
                    read = read_line(&mut out, &mut buf) => {
                        match read {
                            Ok(None) => break "worker closed its stdout".to_string(),
                            Err(e) => break e,
                            Ok(Some(text)) => match parse_line(&text) {
                                Ok((id, msg)) => match running.take() {
                                    Some(r) if r.id == id => {
                                        if matches!(msg, Incoming::Result(_) | Incoming::Error(_)) {
                                            r.finish(msg);
                                        } else {
                                            r.answer(msg);
                                            running = Some(r);
                                        }
                                    }
                                    // An id sent before: an answer to a
                                    // `cancel` (none is due, but an older
                                    // worker may say "unknown method").
                                    other => {
                                        running = other;
                                        if id < next_id {
                                            tracing::debug!(worker = %self.name, id, "message for a request already answered; ignored");
                                        } else {
                                            tracing::warn!(worker = %self.name, id, "message for an unknown request id; ignored");
                                        }
                                    }
                                },
                                Err(e) => break format!("protocol error: {e}"),
                            }
                        }
                    }
                    _ = caller_gone(running.as_ref()) => {
                        // The client hung up, or the agent's deadline for the
                        // request passed: stop the work, keep the process.
                        let Some(r) = running.as_mut() else { continue };
                        if let Err(e) = self.cancel(&mut stdin, r, &mut next_id, "its caller went away (client hung up, or --request-timeout passed)").await {
                            break e;
                        }
                    }
                    _ = until(running.as_ref().map(|r| r.deadline)) => {
                        let Some(mut r) = running.take() else { continue };
                        if r.cancelled {
                            // Last resort: the worker ignored the cancel.
                            let why = format!("{} request {} was cancelled and did not stop by its timeout of {} s (and a grace of {} s)", r.method, r.id, r.timeout.as_secs(), self.cancel_grace.unwrap_or_default().as_secs());
                            // Kept, with its slot, until the process is gone.
                            running = Some(r);
                            break why;
                        }
                        r.answer(Incoming::Error(BackendError::Timeout(r.timeout.as_secs())));
                        if self.cancel_grace.is_some() {
                            let sent = self.cancel(&mut stdin, &mut r, &mut next_id, "it outlived its timeout").await;
                            running = Some(r);
                            if let Err(e) = sent {
                                break e;
                            }
                            continue;
                        }
                        // Only the request that outlived its time is in the
                        // worker: killing the process takes nobody else's work.
                        let why = format!("{} request {} outlived its timeout of {} s", r.method, r.id, r.timeout.as_secs());
                        // Answered; kept, with its slot, until the process is gone.
                        r.reply = None;
                        running = Some(r);
                        break why;
                    }
                    _ = queued_caller_gone(&queue) => {
                        queue.retain(|o| !o.abandoned());
                    }
                    _ = stop.notified() => {
                        let last = running.take();
                        if let Some(r) = &last {
                            r.answer(Incoming::Error(self.released_error()));
                        }
                        self.fail_all(&mut queue, &mut rx);
                        self.shut_down(&mut child, stdin, pid).await;
                        // Its slot, once the process is gone.
                        drop(last);
                        return;
                    }
                }
            };
            let _ = child.start_kill();
            let status = child
                .wait()
                .await
                .map(|s| s.to_string())
                .unwrap_or_default();
            tracing::warn!(worker = %self.name, role = self.role.as_str(), pod = %self.pod, pid, reason = %why, %status, "worker stopped");
            if let Some(r) = running.take() {
                r.finish(Incoming::Error(BackendError::Worker(format!(
                    "worker {} stopped ({why}; {status}); it is being restarted, retry the request",
                    self.name
                ))));
            }
            if started.elapsed() > Duration::from_secs(60) {
                consecutive = 0;
            }
        }
    }

    /// Sends `cancel` for the running request `r` (when the worker
    /// understands it) and gives it the grace to answer. An error when
    /// stdin cannot be written: the process is then restarted.
    async fn cancel(
        &self,
        stdin: &mut ChildStdin,
        r: &mut Running,
        next_id: &mut u64,
        why: &str,
    ) -> Result<(), String> {
        // Without `cancel` the request runs on as before: to its end, or to
        // its timeout, which kills the process.
        let Some(grace) = self.cancel_grace else {
            r.reply = None;
            return Ok(());
        };
        let id = *next_id;
        *next_id += 1;
        r.cancelled = true;
        r.reply = None;
        // A worker that cannot stop at once (an SDK call that runs a whole
        // generation) keeps at least the time it had: the process, and its
        // loaded models, are not lost for a client that merely hung up.
        r.deadline = r.deadline.max(tokio::time::Instant::now() + grace);
        self.cancels.fetch_add(1, Ordering::Relaxed);
        tracing::info!(worker = %self.name, pod = %self.pod, request = r.id, method = r.method, reason = why, "cancelling the request in the worker");
        let line = json!({"id": id, "method": "cancel", "params": {"id": r.id}}).to_string() + "\n";
        // Bounded: the supervisor reads nothing while it writes, and a
        // worker that says it takes `cancel` reads its stdin while it works.
        match tokio::time::timeout(grace, async {
            stdin.write_all(line.as_bytes()).await?;
            stdin.flush().await
        })
        .await
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(format!("stdin closed: {e}")),
            Err(_) => Err(format!(
                "the worker did not read a cancel within {} s",
                grace.as_secs()
            )),
        }
    }

    /// Answers every request not yet sent: the instance is released.
    fn fail_all(&self, queue: &mut VecDeque<Outgoing>, rx: &mut mpsc::UnboundedReceiver<Outgoing>) {
        rx.close();
        while let Ok(o) = rx.try_recv() {
            queue.push_back(o);
        }
        for o in queue.drain(..) {
            o.finish(Incoming::Error(self.released_error()));
        }
    }

    /// `shutdown`, then a kill after [`STOP_GRACE`]; returns once the
    /// process is reaped.
    async fn shut_down(&self, child: &mut Child, mut stdin: ChildStdin, pid: u32) {
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        let line = json!({"id": 0, "method": "shutdown", "params": {}}).to_string() + "\n";
        let _ = tokio::time::timeout_at(deadline, stdin.write_all(line.as_bytes())).await;
        // Closing stdin also ends a worker that reads it in a loop.
        drop(stdin);
        let graceful = tokio::time::timeout_at(deadline, child.wait())
            .await
            .is_ok();
        if !graceful {
            let _ = child.start_kill();
            let _ = child.wait().await;
        }
        tracing::info!(worker = %self.name, role = self.role.as_str(), pod = %self.pod, pid, graceful, "worker stopped for good");
    }
}

/// Reads one `\n`-terminated line, refusing lines over [`MAX_LINE`].
/// Cancel-safe: the supervisor's `select!` drops it whenever a request
/// arrives, so the part of a line read so far stays in `buf` for the next
/// call (`buf` is emptied only when a whole line is returned).
async fn read_line<R: tokio::io::AsyncBufRead + Unpin>(
    r: &mut R,
    buf: &mut Vec<u8>,
) -> Result<Option<String>, String> {
    loop {
        let chunk = r.fill_buf().await.map_err(|e| e.to_string())?;
        if chunk.is_empty() {
            return Ok(None);
        }
        if let Some(pos) = chunk.iter().position(|b| *b == b'\n') {
            buf.extend_from_slice(&chunk[..pos]);
            r.consume(pos + 1);
            break;
        }
        let n = chunk.len();
        buf.extend_from_slice(chunk);
        r.consume(n);
        if buf.len() > MAX_LINE {
            return Err(format!(
                "protocol error: a line longer than {MAX_LINE} bytes"
            ));
        }
    }
    String::from_utf8(std::mem::take(buf))
        .map(Some)
        .map_err(|_| "protocol error: a line that is not UTF-8".to_string())
}

/// A backend served by an external worker program.
pub struct WorkerBackend {
    dir: PathBuf,
    manifest: Manifest,
    hello: Mutex<Option<Hello>>,
    availability: Mutex<Availability>,
    instances: Mutex<HashMap<InstanceKey, Arc<Instance>>>,
    restarts: Arc<AtomicU64>,
    /// `cancel` messages sent to its processes.
    cancels: Arc<AtomicU64>,
    /// Processes stopped because their allocation ended.
    released: AtomicU64,
    /// `--allow-trust-remote-code`: the cluster operator lets requests set
    /// `trust_remote_code` (where the manifest lists it).
    allow_trust_remote_code: bool,
    /// `--worker-python`.
    python: Option<PathBuf>,
    /// `--cpu-threads`, passed on in `RM_CPU_THREADS`.
    cpu_threads: Option<usize>,
}

/// Holds a compile instance in use; the last one out stops the process, so
/// an idle compiler holds no memory (a compile is rare next to its runs).
struct CompileUse<'a> {
    backend: &'a WorkerBackend,
    instance: Arc<Instance>,
}

impl Drop for CompileUse<'_> {
    fn drop(&mut self) {
        let mut map = self.backend.lock_instances();
        if self.instance.compiles.fetch_sub(1, Ordering::SeqCst) == 1 {
            let key = &self.instance.key;
            if map.get(key).is_some_and(|i| Arc::ptr_eq(i, &self.instance)) {
                map.remove(key);
            }
            self.instance.release();
        }
    }
}

impl WorkerBackend {
    pub fn new(dir: PathBuf, manifest: Manifest) -> Self {
        WorkerBackend {
            dir,
            manifest,
            hello: Mutex::new(None),
            availability: Mutex::new(Availability::no("not probed yet")),
            instances: Mutex::new(HashMap::new()),
            restarts: Arc::new(AtomicU64::new(0)),
            cancels: Arc::new(AtomicU64::new(0)),
            released: AtomicU64::new(0),
            allow_trust_remote_code: false,
            python: None,
            cpu_threads: None,
        }
    }

    /// Runs a manifest command's leading `python3` with this program
    /// instead (`--worker-python`; `None`: as the manifest says).
    pub fn worker_python(mut self, python: Option<PathBuf>) -> Self {
        self.python = python;
        self
    }

    /// The threads one CPU computation may use, told to the worker in
    /// `RM_CPU_THREADS` (`None`: the worker decides).
    pub fn cpu_threads(mut self, threads: Option<usize>) -> Self {
        self.cpu_threads = threads;
        self
    }

    /// Lets requests set `trust_remote_code` when the manifest lists it
    /// (`--allow-trust-remote-code`; off unless called).
    pub fn allow_trust_remote_code(mut self, allow: bool) -> Self {
        self.allow_trust_remote_code = allow;
        self
    }

    /// Checks `options.extra` against the manifest's `extra_options`.
    fn check_extra(&self, options: &CompileOptions) -> Result<(), BackendError> {
        extra::validate_extra(
            &self.manifest.name,
            &self.manifest.extra_options,
            &options.extra,
            self.allow_trust_remote_code,
        )
        .map_err(BackendError::InvalidRequest)
    }

    pub fn restarts(&self) -> u64 {
        self.restarts.load(Ordering::Relaxed)
    }

    /// Whether the worker said in its hello that it understands `cancel`.
    fn supports_cancel(&self) -> bool {
        self.hello
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .is_some_and(|h| h.cancel)
    }

    /// Worker processes stopped because their allocation ended.
    pub fn released(&self) -> u64 {
        self.released.load(Ordering::Relaxed)
    }

    fn lock_instances(&self) -> MutexGuard<'_, HashMap<InstanceKey, Arc<Instance>>> {
        // Every change to the map is a single insert or remove: a panic while
        // it is held leaves it usable.
        self.instances.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts the supervisor of a new process (not entered in the map).
    fn start(&self, key: InstanceKey, allocation: Option<AllocationRef>) -> Arc<Instance> {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = Arc::new(Notify::new());
        let (exited_tx, exited) = watch::channel(false);
        let inst = Arc::new(Instance {
            key,
            allocation,
            tx,
            in_flight: Arc::new(AtomicUsize::new(0)),
            stop: stop.clone(),
            exited,
            releasing: AtomicBool::new(false),
            compiles: AtomicUsize::new(0),
        });
        let sup = Supervisor {
            name: format!(
                "{}[{} {}]",
                self.manifest.name,
                inst.key.role.as_str(),
                inst.key.describe()
            ),
            role: inst.key.role,
            pod: inst.pod(),
            dir: self.dir.clone(),
            manifest: self.manifest.clone(),
            python: self.python.clone(),
            env: worker_env(
                inst.key.device_type,
                &inst.key.devices,
                self.allow_trust_remote_code,
                self.cpu_threads,
            ),
            restarts: self.restarts.clone(),
            cancel_grace: self
                .supports_cancel()
                .then(|| Duration::from_secs(self.manifest.cancel_grace_s)),
            cancels: self.cancels.clone(),
        };
        tokio::spawn(sup.run(rx, stop, exited_tx));
        inst
    }

    /// Stops an instance whose allocation ended, once, with a log line and
    /// the metric. True for the call that stopped it.
    fn release_ended_instance(&self, inst: &Instance, why: &str) -> bool {
        if !inst.release() {
            return false;
        }
        self.released.fetch_add(1, Ordering::Relaxed);
        tracing::info!(
            backend = %self.manifest.name,
            role = inst.key.role.as_str(),
            devices = %inst.key.describe(),
            pod = %inst.pod(),
            reason = why,
            "worker released: its allocation ended"
        );
        true
    }

    /// Drops a stopped instance from the map (unless replaced already).
    fn forget(&self, inst: &Arc<Instance>) {
        let mut map = self.lock_instances();
        if map.get(&inst.key).is_some_and(|i| Arc::ptr_eq(i, inst)) {
            map.remove(&inst.key);
        }
    }

    /// The process for `role` on `devices` for `allocation`, started when
    /// there is none. Processes of allocations that `allocation` replaced
    /// (the kubelet gave it one of their devices) are stopped first, and
    /// waited for: the old pod's models leave the device before the new
    /// pod's process loads any.
    async fn acquire(
        &self,
        role: Role,
        device_type: Option<DeviceType>,
        devices: &[String],
        allocation: Option<&AllocationRef>,
    ) -> Arc<Instance> {
        let key = InstanceKey {
            role,
            device_type,
            devices: devices.to_vec(),
            token_sha256: allocation.map(|a| a.token_sha256.clone()),
        };
        loop {
            let in_the_way: Vec<Arc<Instance>> = {
                let mut map = self.lock_instances();
                let mut wait = Vec::new();
                for inst in map.values() {
                    let replaced = match (&inst.allocation, allocation) {
                        (Some(old), Some(new)) => old.replaced_by(new),
                        _ => false,
                    };
                    if replaced {
                        let why = allocation
                            .map(|a| {
                                format!(
                                    "its devices were given to pod {}/{}",
                                    a.owner.namespace, a.owner.pod
                                )
                            })
                            .unwrap_or_default();
                        let _ = self.release_ended_instance(inst, &why);
                        wait.push(inst.clone());
                    } else if inst.key == key && inst.is_releasing() {
                        wait.push(inst.clone());
                    }
                }
                if wait.is_empty() {
                    let inst = map
                        .entry(key.clone())
                        .or_insert_with(|| self.start(key.clone(), allocation.cloned()))
                        .clone();
                    if role == Role::Compile {
                        inst.compiles.fetch_add(1, Ordering::SeqCst);
                    }
                    return inst;
                }
                wait
            };
            for inst in in_the_way {
                inst.exited().await;
                self.forget(&inst);
            }
        }
    }

    /// Sends one request and waits for its result, passing progress and
    /// tokens on. The supervisor enforces `timeout` from when the worker is
    /// sent the request, and always answers (or drops the request). `slot`
    /// (the request's admission slot) stays with the request until the
    /// worker is done with it, also when this future is dropped first.
    #[allow(clippy::too_many_arguments)]
    async fn call(
        &self,
        inst: &Instance,
        method: &'static str,
        params: Value,
        timeout: Duration,
        progress: Option<ProgressFn>,
        on_token: Option<TokenFn>,
        slot: Option<SlotGuard>,
    ) -> Result<Value, BackendError> {
        let (in_flight, before) = InFlight::enter(&inst.in_flight);
        if inst.key.role == Role::Serve && before > MAX_WAITING {
            return Err(BackendError::Unavailable(format!(
                "worker {} for these devices already has {MAX_WAITING} requests waiting behind the one it runs (it runs one at a time); retry later",
                self.manifest.name
            )));
        }
        let (reply, mut rx) = mpsc::unbounded_channel();
        inst.tx
            .send(Outgoing {
                method,
                params,
                timeout,
                reply: Some(reply),
                held: Held {
                    _slot: slot,
                    _in_flight: Some(in_flight),
                },
            })
            .map_err(|_| {
                BackendError::Unavailable(format!(
                    "worker {} was released; retry the request",
                    self.manifest.name
                ))
            })?;
        loop {
            match rx.recv().await {
                None => {
                    return Err(BackendError::Worker(
                        "the worker dropped the request".into(),
                    ));
                }
                Some(Incoming::Result(v)) => return Ok(v),
                Some(Incoming::Error(e)) => return Err(e),
                Some(Incoming::Progress(f, s)) => {
                    if let Some(p) = &progress {
                        p(f, &s);
                    }
                }
                Some(Incoming::Token(i, t, text)) => {
                    if let Some(cb) = &on_token {
                        cb(i, t, text.as_deref());
                    }
                }
            }
        }
    }

    /// A request that runs a model (`generate`, `forward`) on the serving
    /// process of the allocation's device set, which sees only those
    /// devices; answers the result's `"outputs"`.
    async fn run_outputs<T: serde::de::DeserializeOwned>(
        &self,
        method: &'static str,
        devices: &[String],
        allocation: Option<&AllocationRef>,
        params: Value,
        on_token: Option<TokenFn>,
        slot: &Slot,
    ) -> Result<Vec<T>, BackendError> {
        let device_type = self.manifest.device_types.first().copied();
        let inst = self
            .acquire(Role::Serve, device_type, devices, allocation)
            .await;
        let timeout = Duration::from_secs(self.manifest.request_timeout_s);
        let v = self
            .call(&inst, method, params, timeout, None, on_token, slot.take())
            .await?;
        let outputs = v.get("outputs").cloned().unwrap_or(Value::Null);
        serde_json::from_value(outputs).map_err(|e| {
            BackendError::Worker(format!(
                "protocol error: {method} result without valid \"outputs\": {e}"
            ))
        })
    }

    /// Starts a device-less process, asks `hello`, records the answer and
    /// stops the process again.
    pub async fn probe_now(&self) {
        let inst = self.start(
            InstanceKey {
                role: Role::Probe,
                device_type: None,
                devices: vec![],
                token_sha256: None,
            },
            None,
        );
        let res = self
            .call(
                &inst,
                "hello",
                json!({"protocol": PROTOCOL_VERSION}),
                Duration::from_secs(60),
                None,
                None,
                None,
            )
            .await;
        inst.release();
        let avail = match res.and_then(|v| {
            serde_json::from_value::<Hello>(v)
                .map_err(|e| BackendError::Worker(format!("bad hello answer: {e}")))
        }) {
            Ok(h) if h.protocol != PROTOCOL_VERSION => Availability::no(format!(
                "worker speaks protocol {}, the agent {PROTOCOL_VERSION}",
                h.protocol
            )),
            Ok(h) => {
                let a = if h.available {
                    Availability::yes()
                } else {
                    Availability::no(
                        h.reason
                            .clone()
                            .unwrap_or_else(|| "the worker says it is unavailable".into()),
                    )
                };
                *self.hello.lock().unwrap_or_else(|p| p.into_inner()) = Some(h);
                a
            }
            Err(e) => Availability::no(e.to_string()),
        };
        tracing::info!(backend = %self.manifest.name, available = avail.available, reason = ?avail.reason, "worker probed");
        *self.availability.lock().unwrap_or_else(|p| p.into_inner()) = avail;
        inst.exited().await;
    }
}

impl Backend for WorkerBackend {
    fn info(&self) -> BackendInfo {
        let compiler_version = self
            .hello
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map(|h| h.compiler_version.clone())
            .unwrap_or_else(|| "unknown".into());
        BackendInfo {
            name: self.manifest.name.clone(),
            display_name: self.manifest.display_name.clone(),
            version: self.manifest.version.clone(),
            vendor: self.manifest.vendor.clone(),
            priority: Priority(self.manifest.priority),
            device_types: self.manifest.device_types.clone(),
            compiler_version,
        }
    }

    fn probe(&self) -> Availability {
        self.availability
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn accepts(&self, model: &ModelRef<'_>) -> Result<(), String> {
        match &self.manifest.model_formats {
            Some(formats) if !formats.contains(&model.format) => Err(format!(
                "takes {} models, not {}",
                formats
                    .iter()
                    .map(|f| f.as_str())
                    .collect::<Vec<_>>()
                    .join(", "),
                model.format.as_str()
            )),
            _ => Ok(()),
        }
    }

    fn status(&self) -> Value {
        // The keys a request may set in options.extra, with their types.
        let extra_options: serde_json::Map<String, Value> = self
            .manifest
            .extra_options
            .iter()
            .filter(|(k, _)| k.as_str() != extra::TRUST_REMOTE_CODE || self.allow_trust_remote_code)
            .map(|(k, d)| (k.clone(), Value::String(d.describe())))
            .collect();
        let (processes, in_flight) = {
            let map = self.lock_instances();
            // Requests in the processes: waiting, running, or cancelled and
            // not yet stopped.
            let in_flight: usize = map
                .values()
                .map(|i| i.in_flight.load(Ordering::SeqCst))
                .sum();
            (map.len(), in_flight)
        };
        // Counts only: which pods run here is not every caller's business.
        json!({
            "kind": "worker",
            "restarts": self.restarts(),
            "released": self.released(),
            "cancelled": self.cancels.load(Ordering::Relaxed),
            "processes": processes,
            "in_flight": in_flight,
            "unverified_on_hardware": self.manifest.unverified_on_hardware,
            "extra_options": extra_options,
            "model_formats": self.manifest.model_formats,
        })
    }

    fn validate(&self, options: &CompileOptions, _format: ModelFormat) -> Result<(), BackendError> {
        if options.tensor_parallel_size.is_some_and(|t| t == 0) {
            return Err(BackendError::InvalidRequest(
                "tensorParallelSize must be at least 1".into(),
            ));
        }
        self.check_extra(options)
    }

    fn compile(
        &self,
        job: CompileJob,
        progress: ProgressFn,
    ) -> BoxFuture<'_, Result<(), BackendError>> {
        Box::pin(async move {
            // Checked again here: nothing reaches a worker unchecked, even
            // from a caller that skipped `validate`.
            self.check_extra(&job.options)?;
            let instance = self
                .acquire(
                    Role::Compile,
                    Some(job.device_type),
                    &job.devices,
                    job.allocation.as_ref(),
                )
                .await;
            let compiling = CompileUse {
                backend: self,
                instance,
            };
            let params = json!({
                "key": job.key,
                "model_path": job.model_path,
                "model_format": job.model_format,
                "output_dir": job.output_dir,
                "device_type": job.device_type,
                "devices": job.devices,
                "options": job.options,
            });
            let timeout = Duration::from_secs(self.manifest.compile_timeout_s);
            self.call(
                &compiling.instance,
                "compile",
                params,
                timeout,
                Some(progress),
                None,
                None,
            )
            .await
            .map(|_| ())
        })
    }

    fn generate(
        &self,
        job: GenerateJob,
        on_token: Option<TokenFn>,
    ) -> BoxFuture<'_, Result<Vec<SequenceOutput>, BackendError>> {
        Box::pin(async move {
            let params = json!({
                "key": job.key,
                "artifact_dir": job.artifact_dir,
                "devices": job.devices,
                "prompts": job.prompts,
                "params": job.params,
                "stream": on_token.is_some(),
            });
            self.run_outputs(
                "generate",
                &job.devices,
                job.allocation.as_ref(),
                params,
                on_token,
                &job.slot,
            )
            .await
        })
    }

    fn forward(&self, job: ForwardJob) -> BoxFuture<'_, Result<Vec<ForwardOutput>, BackendError>> {
        Box::pin(async move {
            let params = json!({
                "key": job.key,
                "artifact_dir": job.artifact_dir,
                "devices": job.devices,
                "input_ids": job.input_ids,
                "logits_to_keep": job.logits_to_keep,
            });
            let outputs: Vec<ForwardOutput> = self
                .run_outputs(
                    "forward",
                    &job.devices,
                    job.allocation.as_ref(),
                    params,
                    None,
                    &job.slot,
                )
                .await?;
            if outputs.len() != job.input_ids.len() {
                return Err(BackendError::Worker(format!(
                    "protocol error: forward answered {} outputs for {} sequences",
                    outputs.len(),
                    job.input_ids.len()
                )));
            }
            outputs
                .into_iter()
                .zip(&job.input_ids)
                .map(|(o, ids)| {
                    o.checked(kept_positions(ids.len(), job.logits_to_keep))
                        .map_err(|e| BackendError::Worker(format!("protocol error: {e}")))
                })
                .collect()
        })
    }

    fn cleanup(&self, key: &CacheKey) {
        // Only serving processes load models.
        let serving: Vec<Arc<Instance>> = self
            .lock_instances()
            .values()
            .filter(|i| i.key.role == Role::Serve && !i.is_releasing())
            .cloned()
            .collect();
        for inst in serving {
            let _ = inst.tx.send(Outgoing {
                method: "cleanup",
                params: json!({"key": key}),
                timeout: Duration::from_secs(self.manifest.request_timeout_s),
                reply: None,
                held: Held::default(),
            });
        }
    }

    fn release_ended(&self, live: &HashSet<String>) -> BoxFuture<'_, usize> {
        let ended: Vec<Arc<Instance>> = self
            .lock_instances()
            .values()
            .filter(|i| {
                i.allocation
                    .as_ref()
                    .is_some_and(|a| !live.contains(&a.token_sha256))
            })
            .cloned()
            .collect();
        Box::pin(async move {
            let mut released = 0;
            for inst in &ended {
                if self.release_ended_instance(
                    inst,
                    "its token record is gone or its lease lapsed (the pod is gone)",
                ) {
                    released += 1;
                }
            }
            for inst in ended {
                inst.exited().await;
                self.forget(&inst);
            }
            released
        })
    }

    fn shutdown(&self) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let all: Vec<Arc<Instance>> = self.lock_instances().drain().map(|(_, i)| i).collect();
            for i in &all {
                i.release();
            }
            for i in all {
                i.exited().await;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocol_lines_parse() {
        assert!(matches!(
            parse_line(r#"{"id":3,"result":{}}"#),
            Ok((3, Incoming::Result(_)))
        ));
        assert!(matches!(
            parse_line(r#"{"id":3,"error":{"message":"x","kind":"invalid_request"}}"#),
            Ok((3, Incoming::Error(BackendError::InvalidRequest(_))))
        ));
        assert!(matches!(
            parse_line(r#"{"id":3,"error":{"message":"x","kind":"cancelled"}}"#),
            Ok((3, Incoming::Error(BackendError::Cancelled)))
        ));
        assert!(matches!(
            parse_line(r#"{"id":1,"progress":{"fraction":0.5,"stage":"s"}}"#),
            Ok((1, Incoming::Progress(_, _)))
        ));
        assert!(matches!(
            parse_line(r#"{"id":1,"token":{"index":0,"token_id":7}}"#),
            Ok((1, Incoming::Token(0, 7, None)))
        ));
        assert!(parse_line("hello").is_err());
        assert!(parse_line(r#"{"result":{}}"#).is_err());
        assert!(parse_line(r#"{"id":1}"#).is_err());
    }

    #[test]
    fn only_workers_that_say_so_are_sent_cancel() {
        let hello = |raw: &str| serde_json::from_str::<Hello>(raw).expect("hello parses");
        let old = r#"{"protocol":1,"compiler_version":"x","available":true}"#;
        assert!(!hello(old).cancel, "protocol 1 without the field");
        let new = r#"{"protocol":1,"compiler_version":"x","available":true,"cancel":true}"#;
        assert!(hello(new).cancel);
    }

    #[tokio::test]
    async fn a_line_read_in_parts_survives_a_cancelled_read() {
        let (mut w, r) = tokio::io::duplex(64);
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        w.write_all(br#"{"id":1,"#).await.expect("write");
        // Cancelled (as `select!` does when a request arrives) mid-line.
        let cut =
            tokio::time::timeout(Duration::from_millis(50), read_line(&mut r, &mut buf)).await;
        assert!(cut.is_err(), "no whole line yet");
        w.write_all(b"\"result\":{}}\n{\"id\":2")
            .await
            .expect("write");
        let line = read_line(&mut r, &mut buf).await.expect("read");
        assert_eq!(line.as_deref(), Some(r#"{"id":1,"result":{}}"#));
        assert!(parse_line(line.as_deref().unwrap_or("")).is_ok());
    }

    #[tokio::test]
    async fn a_request_not_wholly_written_restarts_the_worker_instead_of_a_cancel() {
        let dir = tempfile::tempdir().expect("tempdir");
        let prefix = dir.path().join("stdin");
        // Reads nothing for a second (its pipe fills up), then records its
        // stdin, in a file per process (sh keeps its stdout open).
        let manifest: Manifest = serde_json::from_value(json!({
            "name": "sh", "display_name": "sh", "version": "0", "vendor": "tests",
            "priority": 1, "device_types": ["gpu"],
            "command": ["sh", "-c", "sleep 1; cat > \"$0.$$\"", prefix],
        }))
        .expect("manifest");
        let restarts = Arc::new(AtomicU64::new(0));
        let cancels = Arc::new(AtomicU64::new(0));
        let sup = Supervisor {
            name: "sh".into(),
            role: Role::Serve,
            pod: "-".into(),
            dir: dir.path().to_path_buf(),
            manifest,
            python: None,
            env: vec![],
            restarts: restarts.clone(),
            cancel_grace: Some(Duration::from_secs(5)),
            cancels: cancels.clone(),
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = Arc::new(Notify::new());
        let (exited_tx, mut exited) = watch::channel(false);
        tokio::spawn(sup.run(rx, stop.clone(), exited_tx));
        let (reply, mut answers) = mpsc::unbounded_channel();
        // Far more than a pipe holds: the write cannot end in time.
        let sent = tx.send(Outgoing {
            method: "generate",
            params: json!({"prompts": ["x".repeat(1 << 20)]}),
            timeout: Duration::from_millis(300),
            reply: Some(reply),
            held: Held::default(),
        });
        assert!(sent.is_ok());
        let answer = answers.recv().await;
        assert!(
            matches!(answer, Some(Incoming::Error(BackendError::Timeout(_)))),
            "{answer:?}"
        );
        // Time for the first process to read what it was sent, had it lived.
        tokio::time::sleep(Duration::from_millis(1800)).await;
        for f in std::fs::read_dir(dir.path()).expect("dir").flatten() {
            let text = std::fs::read_to_string(f.path()).unwrap_or_default();
            for line in text.lines() {
                assert!(
                    serde_json::from_str::<Value>(line).is_ok(),
                    "the worker read a garbled line: {:.60}…{}",
                    line,
                    &line[line.len().saturating_sub(60)..]
                );
            }
        }
        assert_eq!(
            cancels.load(Ordering::Relaxed),
            0,
            "a cancel followed a request cut short"
        );
        assert_eq!(restarts.load(Ordering::Relaxed), 1, "not restarted");
        stop.notify_one();
        assert!(exited.wait_for(|done| *done).await.is_ok());
    }

    #[test]
    fn back_off_grows_and_caps() {
        assert_eq!(restart_delay(0), Duration::from_millis(200));
        assert_eq!(restart_delay(1), Duration::from_millis(400));
        assert_eq!(restart_delay(20), Duration::from_secs(30));
    }

    #[test]
    fn workers_see_only_their_devices() {
        let env = device_env(Some(DeviceType::Gpu), &["2".into(), "3".into()]);
        assert!(env.contains(&("CUDA_VISIBLE_DEVICES".into(), "2,3".into())));
        assert!(env.contains(&("RM_DEVICES".into(), "2,3".into())));
    }

    #[test]
    fn workers_are_told_the_trust_remote_code_decision() {
        let off = worker_env(Some(DeviceType::Furiosa), &["npu:0".into()], false, None);
        assert!(off.contains(&("RM_ALLOW_TRUST_REMOTE_CODE".into(), "0".into())));
        assert!(off.contains(&("FURIOSA_DEVICES".into(), "npu:0".into())));
        assert!(!off.iter().any(|(k, _)| k == CPU_THREADS_ENV));
        let on = worker_env(None, &[], true, Some(3));
        assert!(on.contains(&("RM_ALLOW_TRUST_REMOTE_CODE".into(), "1".into())));
        assert!(on.contains(&(CPU_THREADS_ENV.into(), "3".into())));
    }

    #[test]
    fn worker_python_replaces_only_a_leading_python3() {
        let dir = Path::new("/plugins/w");
        let py = Path::new("/opt/torch/bin/python");
        assert_eq!(program("python3", dir, Some(py)), py);
        assert_eq!(program("python3", dir, None), Path::new("python3"));
        assert_eq!(program("python", dir, Some(py)), Path::new("python"));
        assert_eq!(program("./run.sh", dir, Some(py)), dir.join("./run.sh"));
        assert_eq!(program("/bin/sh", dir, Some(py)), Path::new("/bin/sh"));
    }

    #[test]
    fn a_worker_takes_the_model_formats_its_manifest_lists() {
        let model = |format| ModelRef {
            path: Path::new("/m"),
            format,
        };
        let cpu = shipped("cpu-transformers");
        assert!(cpu.accepts(&model(ModelFormat::Safetensors)).is_ok());
        assert_eq!(
            cpu.accepts(&model(ModelFormat::Gguf)),
            Err("takes safetensors models, not gguf".into())
        );
        let double = WorkerBackend::new(
            PathBuf::from("/d"),
            manifest_at(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/test-double")),
        );
        assert!(
            double.accepts(&model(ModelFormat::Gguf)).is_ok(),
            "no list: any format"
        );
    }

    fn manifest_at(dir: &Path) -> Manifest {
        let raw = std::fs::read(dir.join("manifest.json")).expect("manifest is readable");
        serde_json::from_slice(&raw).expect("manifest parses")
    }

    /// The backend of a shipped worker (`agent/workers/<name>`).
    fn shipped(name: &str) -> WorkerBackend {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("workers")
            .join(name);
        WorkerBackend::new(dir.clone(), manifest_at(&dir))
    }

    fn extras(pairs: &[(&str, &str)]) -> CompileOptions {
        CompileOptions {
            extra: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    fn accepts(b: &WorkerBackend, pairs: &[(&str, &str)]) -> bool {
        b.validate(&extras(pairs), ModelFormat::Safetensors).is_ok()
    }

    /// The message of an InvalidRequest refusal (anything else fails).
    fn refusal(b: &WorkerBackend, pairs: &[(&str, &str)]) -> String {
        match b.validate(&extras(pairs), ModelFormat::Safetensors) {
            Err(BackendError::InvalidRequest(m)) => m,
            other => panic!("{pairs:?}: expected an InvalidRequest, got {other:?}"),
        }
    }

    #[test]
    fn shipped_manifests_declare_valid_extra_options() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let found: Vec<String> = discover(&root.join("workers"))
            .into_iter()
            .map(|(_, m)| m.name)
            .collect();
        assert_eq!(found, ["cpu-transformers", "furiosa", "gpu-vllm", "rbln"]);
        let double = manifest_at(&root.join("tests/workers/test-double"));
        assert!(extra::check_declarations(&double.extra_options).is_ok());
        // A manifest whose declarations are inconsistent is skipped.
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(dir.path().join("bad")).expect("mkdir");
        std::fs::write(
            dir.path().join("bad/manifest.json"),
            r#"{"name": "bad", "display_name": "d", "version": "1", "vendor": "v", "priority": 1,
                "device_types": ["gpu"], "command": ["true"],
                "extra_options": {"trust_remote_code": {"type": "string"}}}"#,
        )
        .expect("write");
        assert!(discover(dir.path()).is_empty());
    }

    #[test]
    fn unknown_extra_keys_are_refused_with_the_allowed_ones() {
        let furiosa = shipped("furiosa");
        let m = refusal(&furiosa, &[("num_hidden_layers", "1")]);
        assert!(m.contains("\"num_hidden_layers\""), "{m}");
        assert!(m.contains("not an option of backend furiosa"), "{m}");
        assert!(m.contains("max_prompt_len (int 1..=1048576)"), "{m}");
        // Options the agent maps itself are not extras either.
        assert!(refusal(&furiosa, &[("tensor_parallel_size", "2")]).contains("not an option"));
        let rbln = shipped("rbln");
        // The agent picks the devices; a request must not.
        let m = refusal(&rbln, &[("rbln_device", "3")]);
        assert!(m.contains("rbln_npu (one of "), "{m}");
        assert!(refusal(&rbln, &[("rbln_compile_dir", "/etc")]).contains("not an option"));
        let m = refusal(&shipped("gpu-vllm"), &[("x", "y")]);
        assert!(
            m.contains("none (this backend takes no extra options)"),
            "{m}"
        );
    }

    #[test]
    fn extra_values_must_parse_as_their_type_within_range() {
        let furiosa = shipped("furiosa");
        assert!(accepts(
            &furiosa,
            &[
                ("max_prompt_len", "1024"),
                ("calculate_logit_only_for_last_token", "true"),
            ]
        ));
        let m = refusal(&furiosa, &[("max_prompt_len", "lots")]);
        assert!(m.contains("\"max_prompt_len\""), "{m}");
        assert!(m.contains("is not an integer"), "{m}");
        assert!(m.contains("allowed keys of backend furiosa"), "{m}");
        let m = refusal(&furiosa, &[("max_prompt_len", "0")]);
        assert!(m.contains("below the minimum 1"), "{m}");
        let m = refusal(&furiosa, &[("pipeline_parallel_size", "65")]);
        assert!(m.contains("above the maximum 64"), "{m}");
        let m = refusal(&furiosa, &[("calculate_logit_only_for_last_token", "1")]);
        assert!(m.contains("not true or false"), "{m}");
        let rbln = shipped("rbln");
        // examples/rbln.yaml
        assert!(accepts(&rbln, &[("rbln_npu", "RBLN-CA25")]));
        let m = refusal(&rbln, &[("rbln_npu", "../../x")]);
        assert!(m.contains("is not one of RBLN-CA02"), "{m}");
        assert!(accepts(
            &rbln,
            &[
                ("rbln_attn_impl", "flash_attn"),
                ("rbln_kvcache_partition_len", "16384")
            ]
        ));
        // The test double takes what the integration tests send.
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/workers/test-double");
        let double = WorkerBackend::new(root.clone(), manifest_at(&root));
        assert!(accepts(
            &double,
            &[
                ("test.compile_seconds", "0.5"),
                ("v", "3"),
                ("test.fail", "1")
            ]
        ));
        assert!(refusal(&double, &[("test.compile_seconds", "-1")]).contains("minimum"));
    }

    #[test]
    fn trust_remote_code_is_off_unless_the_operator_allows_it() {
        let trc = [("trust_remote_code", "true")];
        let m = refusal(&shipped("furiosa"), &trc);
        assert!(m.contains("\"trust_remote_code\" is refused"), "{m}");
        assert!(m.contains("--allow-trust-remote-code"), "{m}");
        assert!(m.contains("RM_ALLOW_TRUST_REMOTE_CODE=true"), "{m}");
        assert!(m.contains("agent.allowTrustRemoteCode"), "{m}");
        assert!(m.contains("Python code from the model repository"), "{m}");
        assert!(
            !m.contains("trust_remote_code (bool)"),
            "not offered while off: {m}"
        );
        let allowed = shipped("furiosa").allow_trust_remote_code(true);
        assert!(accepts(&allowed, &trc));
        assert!(accepts(&allowed, &[("trust_remote_code", "false")]));
        let m = refusal(&allowed, &[("trust_remote_code", "yes")]);
        assert!(m.contains("not true or false"), "{m}");
        // Allowed on the node, but the rbln manifest does not list it.
        let rbln = shipped("rbln").allow_trust_remote_code(true);
        assert!(refusal(&rbln, &trc).contains("not an option of backend rbln"));
    }
}
