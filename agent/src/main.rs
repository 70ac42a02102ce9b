//! `rm-agent`: wiring only. Parses flags, opens the cache, discovers
//! backends, serves the API on the unix socket (and metrics on TCP), and
//! shuts down cleanly on SIGTERM.
//!
//! `rm-agent probe-model <file>` (hidden) is the agent checking an untrusted
//! model file in a child process of its own; see `backend::cpu::probe`.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use rm_agent::api;
use rm_agent::auth::TokenStore;
use rm_agent::backend::cpu::{CpuBackend, EngineOptions, GgufEngine, ProbeConfig, probe};
use rm_agent::backend::worker::{WorkerBackend, discover};
use rm_agent::backend::{Backend, Registry};
use rm_agent::cache::CacheStore;
use rm_agent::quota::FreeFloor;
use rm_agent::service::Agent;
use rm_agent::source::ModelRegistry;

#[derive(Parser, Debug)]
#[command(
    name = "rm-agent",
    version,
    about = "rm-abstract node agent: compile cache and execution for pods"
)]
struct Cli {
    /// Unix socket for the pods' API (created with mode 0660).
    #[arg(long, env = "RM_AGENT_SOCKET")]
    socket: PathBuf,
    /// Group (GID) given the socket, so that non-root pods holding it as a
    /// supplemental group (the webhook adds it) can connect. Unset: the
    /// agent's own group. Connecting grants nothing by itself: every request
    /// is still checked against the device plugin's tokens.
    #[arg(long, env = "RM_AGENT_SOCKET_GROUP", value_parser = rm_runtime::parse_socket_group)]
    socket_group: Option<u32>,
    /// Compile cache directory.
    #[arg(long, env = "RM_CACHE_DIR")]
    cache_dir: PathBuf,
    /// Directory of external backend workers (`<name>/manifest.json`).
    #[arg(long, env = "RM_PLUGIN_DIR")]
    plugin_dir: Option<PathBuf>,
    /// Directory where the device plugin writes `tokens/<sha256>.json`.
    /// Set, every request must carry a pod's token (or the admin token);
    /// unset, every caller is trusted: for a workstation only.
    #[arg(long, env = "RM_STATE_DIR")]
    state_dir: Option<PathBuf>,
    /// File holding the cluster operator's admin token (the chart mounts a
    /// Secret): its bearer sees and may delete every namespace's entries,
    /// and models it registers are shared with every namespace.
    #[arg(long, env = "RM_ADMIN_TOKEN_FILE")]
    admin_token_file: Option<PathBuf>,
    /// TCP address for `/metrics` and `/healthz`, e.g. 0.0.0.0:9464.
    #[arg(long, env = "RM_METRICS_ADDR")]
    metrics_addr: Option<String>,
    /// Cache size limit; least-recently-used entries beyond it are evicted.
    /// Accepts bytes or K/M/G/T suffixes.
    #[arg(long, env = "RM_CACHE_MAX_BYTES", default_value = "100G", value_parser = parse_size)]
    cache_max_bytes: u64,
    /// Bytes all hub downloads together may take on this node; beyond, the
    /// least recently registered ones that no compile reads are removed.
    #[arg(long, env = "RM_HUB_MAX_BYTES", default_value = "200G", value_parser = parse_size)]
    hub_max_bytes: u64,
    /// Bytes all namespaces' uploads together may take on this node; beyond,
    /// the least recently used blobs (and the models assembled from them)
    /// that no compile reads are removed.
    #[arg(long, env = "RM_UPLOADS_MAX_BYTES", default_value = "500G", value_parser = parse_size)]
    uploads_max_bytes: u64,
    /// Largest file one upload (`PUT /v1/blobs/*`) may store.
    #[arg(long, env = "RM_MAX_UPLOAD_BYTES", default_value = "64G", value_parser = parse_size)]
    max_upload_bytes: u64,
    /// Bytes one namespace may hold on this node: its uploads, its hub
    /// downloads and the compiled entries of its models (403 beyond).
    #[arg(long, alias = "namespace-upload-quota", env = "RM_NAMESPACE_QUOTA", default_value = "200G", value_parser = parse_size)]
    namespace_quota: u64,
    /// Free space the cache's filesystem keeps, in bytes (10G) or as a share
    /// of it (5%): uploads, hub downloads and compiles that would leave less
    /// are refused (507), so the node stays out of DiskPressure.
    #[arg(long, env = "RM_MIN_FREE_DISK", default_value = "10G", value_parser = parse_floor)]
    min_free_disk: FreeFloor,
    /// Node directories models may be read from (`source.path`); repeatable.
    /// Unset: no node path is read (models come by upload or from the hub).
    /// Links inside may not lead out of them.
    #[arg(
        long = "model-path-allow",
        env = "RM_MODEL_PATH_ALLOW",
        value_delimiter = ','
    )]
    model_path_allow: Vec<PathBuf>,
    /// Engine for GGUF artifacts on the cpu backend: llama.cpp when the file
    /// carries a vocabulary (auto), or always one of the two.
    #[arg(long, env = "RM_CPU_ENGINE", value_enum, default_value_t = GgufEngine::Auto)]
    cpu_engine: GgufEngine,
    /// Threads of one CPU generation. Default: the CPUs this process may use.
    /// Passed on to workers in `RM_CPU_THREADS`.
    #[arg(long, env = "RM_CPU_THREADS")]
    cpu_threads: Option<usize>,
    /// Sequences one llama.cpp model runs at once on the CPU (continuous
    /// batching: one decode per step for all of them). Requests of the same
    /// model up to this many are admitted together; more wait. 1 serves
    /// them one after another.
    #[arg(long, env = "RM_CPU_MAX_BATCH", default_value_t = rm_agent::backend::cpu::engine::DEFAULT_MAX_BATCH as u64,
          value_parser = clap::value_parser!(u64).range(1..=rm_agent::backend::cpu::llama_cpp::MAX_BATCH_LIMIT as u64))]
    cpu_max_batch: u64,
    /// Batched llama.cpp sequences get bit for bit the logits each gets
    /// alone, whatever runs beside it: flash attention off and one prompt
    /// read per step, at some cost in throughput. Off (the default), as in
    /// llama-server: new prompts read together, and flash attention on for
    /// short streams; then a sequence's logits may differ in the last bits
    /// from a lone run.
    #[arg(long, env = "RM_CPU_EXACT_BATCHING")]
    cpu_exact_batching: bool,
    /// The Python that runs worker plugins: replaces a leading `python3` of
    /// each manifest's command (a venv with torch for `cpu-transformers`,
    /// say). Default: `python3` from `PATH`.
    #[arg(long, env = "RM_WORKER_PYTHON")]
    worker_python: Option<PathBuf>,
    /// Generate and forward requests that run at once on one backend and
    /// device set (the CPU is one); the others wait in turn between
    /// namespaces. On the CPU, llama.cpp models admit `--cpu-max-batch`
    /// requests of one model at once (batched); candle runs one.
    #[arg(long, env = "RM_CONCURRENT_REQUESTS", default_value_t = rm_agent::service::REQUEST_BOUNDS.slots)]
    concurrent_requests: usize,
    /// Requests one namespace may have waiting for one backend and device
    /// set; more get 429 with Retry-After.
    #[arg(long, env = "RM_MAX_QUEUED_PER_NAMESPACE", default_value_t = rm_agent::service::REQUEST_BOUNDS.per_tenant_queue)]
    max_queued_per_namespace: usize,
    /// Requests waiting for one backend and device set, all namespaces
    /// together; more get 503 with Retry-After.
    #[arg(long, env = "RM_MAX_QUEUED", default_value_t = rm_agent::service::REQUEST_BOUNDS.queue)]
    max_queued: usize,
    /// The longest a generate or forward request may take, waiting
    /// included (seconds); then it is stopped and answered 504.
    #[arg(long, env = "RM_REQUEST_TIMEOUT", default_value_t = 600)]
    request_timeout: u64,
    /// Compiles that run at once on this node (all backends); the others
    /// wait in turn between namespaces.
    #[arg(long, env = "RM_MAX_CONCURRENT_COMPILES", default_value_t = rm_agent::service::COMPILE_BOUNDS.slots)]
    max_concurrent_compiles: usize,
    /// Of those, how many one namespace may run at once: compiles take hours
    /// on NPUs, and one namespace must not hold every slot.
    #[arg(long, env = "RM_MAX_CONCURRENT_COMPILES_PER_NAMESPACE", default_value_t = rm_agent::service::COMPILE_BOUNDS.per_tenant_slots)]
    max_concurrent_compiles_per_namespace: usize,
    /// Compiles one namespace may have waiting; more get 429.
    #[arg(long, env = "RM_MAX_QUEUED_COMPILES_PER_NAMESPACE", default_value_t = rm_agent::service::COMPILE_BOUNDS.per_tenant_queue)]
    max_queued_compiles_per_namespace: usize,
    /// Let requests set `trust_remote_code` in `options.extra` for the worker
    /// backends whose manifest lists it. Off by default: it makes the compile
    /// run Python code from the model repository as the agent's user on the
    /// node. Enable only when every model the pods may name is trusted.
    #[arg(long, env = "RM_ALLOW_TRUST_REMOTE_CODE")]
    allow_trust_remote_code: bool,
    /// Seconds between two looks for worker processes whose allocation
    /// ended (token record removed by the device plugin, or lapsed); those
    /// are stopped so that the device's next pod finds it free.
    #[arg(long, env = "RM_WORKER_REAP_INTERVAL", default_value = "5", value_parser = parse_seconds)]
    worker_reap_interval: std::time::Duration,
}

fn parse_seconds(s: &str) -> Result<std::time::Duration, String> {
    match s.trim().parse::<f64>() {
        Ok(v) if v > 0.0 && v <= 86_400.0 => Ok(std::time::Duration::from_secs_f64(v)),
        _ => Err(format!(
            "{s:?} is not a number of seconds above 0 and at most 86400 (e.g. 5 or 0.5)"
        )),
    }
}

fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.chars().last() {
        Some('K' | 'k') => (&s[..s.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&s[..s.len() - 1], 1 << 20),
        Some('G' | 'g') => (&s[..s.len() - 1], 1 << 30),
        Some('T' | 't') => (&s[..s.len() - 1], 1 << 40),
        _ => (s, 1),
    };
    num.trim()
        .parse::<u64>()
        .map(|n| n.saturating_mul(mult))
        .map_err(|_| format!("{s:?} is not a size; write e.g. 500M or 100G"))
}

fn parse_floor(s: &str) -> Result<FreeFloor, String> {
    match s.trim().strip_suffix('%') {
        Some(p) => match p.trim().parse::<u8>() {
            Ok(p) if p < 100 => Ok(FreeFloor::Percent(p)),
            _ => Err(format!("{s:?} is not a share of the disk; write e.g. 5%")),
        },
        None => parse_size(s).map(FreeFloor::Bytes),
    }
}

#[derive(Debug, thiserror::Error)]
enum StartError {
    #[error("cannot open the cache: {0}")]
    Cache(#[from] rm_agent::cache::StoreError),
    #[error(
        "the admin token in {0} is shorter than 16 characters; write a random one (e.g. `head -c 24 /dev/urandom | base64`)"
    )]
    WeakAdminToken(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "cannot give socket {path} the group {gid} (--socket-group): {source}; \
         the agent must be a member of that group (the chart adds it to the \
         agent's supplementalGroups) or hold CAP_CHOWN"
    )]
    SocketGroup {
        gid: u32,
        path: String,
        #[source]
        source: std::io::Error,
    },
}

fn io(what: &'static str, path: &std::path::Path) -> impl FnOnce(std::io::Error) -> StartError {
    let path = path.display().to_string();
    move |source| StartError::Io { what, path, source }
}

async fn run(cli: Cli) -> Result<(), StartError> {
    std::fs::create_dir_all(&cli.cache_dir)
        .map_err(io("cannot create cache dir", &cli.cache_dir))?;
    let store = CacheStore::open(&cli.cache_dir, cli.cache_max_bytes)?;
    let models = Arc::new(
        ModelRegistry::new(&cli.cache_dir, cli.model_path_allow.clone())
            .map_err(io("cannot prepare model store in", &cli.cache_dir))?
            .with_hub_budget(cli.hub_max_bytes),
    );
    let mut engine = EngineOptions {
        gguf_engine: cli.cpu_engine,
        // Within 1..=MAX_BATCH_LIMIT (the parser's range).
        max_batch: usize::try_from(cli.cpu_max_batch).unwrap_or(1),
        exact_batching: cli.cpu_exact_batching,
        ..EngineOptions::default()
    };
    if let Some(t) = cli.cpu_threads.filter(|t| *t > 0) {
        engine.threads = t;
    }
    let mut cpu = CpuBackend::new(engine);
    match ProbeConfig::this_binary() {
        Ok(p) => {
            tracing::debug!(program = %p.program.display(), "model files are checked in a child process");
            cpu = cpu.with_probe(p);
        }
        // Still the in-process header checks; llama.cpp may abort the agent
        // on a malformed file.
        Err(e) => tracing::error!(
            error = %e,
            "cannot find the agent's own binary: model files are checked in-process only"
        ),
    }
    let mut backends: Vec<Arc<dyn Backend>> = vec![Arc::new(cpu)];
    if let Some(dir) = &cli.plugin_dir {
        for (wdir, manifest) in discover(dir) {
            tracing::info!(backend = %manifest.name, dir = %wdir.display(), "worker plugin found");
            let w = Arc::new(
                WorkerBackend::new(wdir, manifest)
                    .allow_trust_remote_code(cli.allow_trust_remote_code)
                    .worker_python(cli.worker_python.clone())
                    .cpu_threads(Some(engine.threads)),
            );
            w.probe_now().await;
            backends.push(w);
        }
    }
    let admin_token = match &cli.admin_token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .map_err(io("cannot read admin token file", path))?
                .trim()
                .to_string();
            if t.len() < 16 {
                return Err(StartError::WeakAdminToken(path.display().to_string()));
            }
            Some(t)
        }
        None => None,
    };
    let tokens = TokenStore::new(cli.state_dir.as_deref());
    if !tokens.enforced() {
        tracing::warn!(
            "no --state-dir: every caller is trusted and sees every model (development only; the chart sets it)"
        );
    }
    let mut agent = Agent::new(
        store,
        models,
        Registry::new(backends),
        tokens,
        rm_agent::access::AccessIndex::open(&cli.cache_dir),
        admin_token.as_deref(),
    );
    agent.limits = rm_agent::quota::Limits {
        max_upload: cli.max_upload_bytes,
        namespace_quota: cli.namespace_quota,
        uploads_max: cli.uploads_max_bytes,
        min_free: cli.min_free_disk,
    };
    agent.requests = rm_agent::admission::Admission::new(rm_agent::admission::Bounds {
        slots: cli.concurrent_requests,
        per_tenant_slots: cli.concurrent_requests,
        per_tenant_queue: cli.max_queued_per_namespace,
        queue: cli.max_queued,
    });
    agent.compiles = rm_agent::admission::Admission::new(rm_agent::admission::Bounds {
        slots: cli.max_concurrent_compiles,
        per_tenant_slots: cli.max_concurrent_compiles_per_namespace,
        per_tenant_queue: cli.max_queued_compiles_per_namespace,
        queue: rm_agent::service::COMPILE_BOUNDS.queue,
    });
    agent.request_timeout = std::time::Duration::from_secs(cli.request_timeout.max(1));
    let agent = Arc::new(agent);

    if let Some(parent) = cli.socket.parent() {
        std::fs::create_dir_all(parent).map_err(io("cannot create socket dir", parent))?;
    }
    if cli.socket.exists() {
        std::fs::remove_file(&cli.socket).map_err(io("cannot remove stale socket", &cli.socket))?;
    }
    let listener = tokio::net::UnixListener::bind(&cli.socket)
        .map_err(io("cannot bind socket", &cli.socket))?;
    if let Some(gid) = cli.socket_group {
        // The owner stays the agent's user (root in the chart); only the group
        // changes. The chart's agent has no capabilities, so the kernel allows
        // this only because the agent is a member of the group
        // (supplementalGroups).
        std::os::unix::fs::chown(&cli.socket, None, Some(gid)).map_err(|source| {
            StartError::SocketGroup {
                gid,
                path: cli.socket.display().to_string(),
                source,
            }
        })?;
    }
    std::fs::set_permissions(&cli.socket, std::fs::Permissions::from_mode(0o660))
        .map_err(io("cannot set mode of", &cli.socket))?;

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    tokio::spawn(reap_workers(
        agent.clone(),
        cli.worker_reap_interval,
        stop_rx.clone(),
    ));
    if let Some(addr) = &cli.metrics_addr {
        let tcp = tokio::net::TcpListener::bind(addr).await.map_err(io(
            "cannot bind metrics address",
            std::path::Path::new(addr),
        ))?;
        let router = api::metrics_router(agent.clone());
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let r = axum::serve(tcp, router)
                .with_graceful_shutdown(async move {
                    let _ = rx.wait_for(|v| *v).await;
                })
                .await;
            if let Err(e) = r {
                tracing::error!(error = %e, "metrics server failed");
            }
        });
        tracing::info!(%addr, "metrics listening");
    }
    tracing::info!(socket = %cli.socket.display(), cache = %cli.cache_dir.display(), version = rm_agent::VERSION, "rm-agent ready");
    let served = axum::serve(listener, api::socket_router(agent.clone()))
        .with_graceful_shutdown(rm_runtime::shutdown_signal())
        .await;
    let _ = stop_tx.send(true);
    if let Err(e) = served {
        tracing::error!(error = %e, "socket server failed");
    }
    for b in agent.backends.all() {
        b.shutdown().await;
    }
    let _ = std::fs::remove_file(&cli.socket);
    tracing::info!("rm-agent stopped");
    Ok(())
}

/// Stops, every `interval`, the worker processes whose allocation ended.
async fn reap_workers(
    agent: Arc<Agent>,
    interval: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {
                let released = agent.release_ended_workers().await;
                if released > 0 {
                    tracing::debug!(released, "worker reaper pass");
                }
            }
            // `changed`, not `wait_for`: its guard is not Send.
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    return;
                }
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    // The model check runs as `rm-agent probe-model ...`, the agent's own
    // binary, so that a container needs nothing else. Looked for before the
    // agent's flags are parsed, which stay exactly as they were (no
    // subcommands, required --socket).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == probe::SUBCOMMAND)
    {
        return probe::run(probe::ProbeArgs::parse_from(std::env::args_os().skip(1)));
    }
    // llama.cpp logs every model load and context at info, tens of lines.
    rm_runtime::init_logging("info,llama-cpp-2=warn");
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("rm-agent: cannot start the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "rm-agent failed to start");
            std::process::ExitCode::FAILURE
        }
    }
}
