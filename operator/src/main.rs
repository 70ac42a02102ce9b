//! rm-operator: wiring only. Configuration, leader election, the controller
//! and the operations HTTP server; the logic lives in the library modules.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use clap::Parser;
use kube::Client;
use kube::runtime::events::Reporter;
use rm_crds::DeviceType;
use rm_operator::config::{
    OperatorConfig, Overrides, parse_duration, parse_priority, parse_type_value,
};
use rm_operator::controller::{self, Scope};
use rm_operator::leader::LeaderElection;
use rm_operator::metrics::Metrics;
use rm_operator::server::{self, ServerState};
use tokio::sync::watch;

/// Reconciles InferenceWorkloads into Deployments on the best device type
/// with free capacity. Settings: flag > environment variable > --config file.
#[derive(Parser, Debug)]
#[command(version, about)]
struct Cli {
    /// YAML file with priorities, resourceNames, cpuFallback, unschedulableGracePeriod.
    #[arg(long, env = "RM_OPERATOR_CONFIG")]
    config: Option<PathBuf>,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, env = "RM_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Watch InferenceWorkloads in this namespace only (default: all).
    #[arg(long, env = "RM_WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Device priority, TYPE=N, repeatable or comma-separated (e.g. gpu=110).
    #[arg(long = "priority", env = "RM_PRIORITIES", value_delimiter = ',', value_parser = parse_priority_arg)]
    priorities: Vec<(DeviceType, u32)>,
    /// Extended resource of a type, TYPE=NAME (e.g. rbln=rebellions.ai/npu).
    #[arg(long = "resource-name", env = "RM_RESOURCE_NAMES", value_delimiter = ',', value_parser = parse_resource_arg)]
    resource_names: Vec<(DeviceType, String)>,
    /// Whether cpu ends the cluster's priority list.
    #[arg(long, env = "RM_CPU_FALLBACK")]
    cpu_fallback: Option<bool>,
    /// How long pods may stay unschedulable before another type is picked (e.g. 5m).
    #[arg(long, env = "RM_UNSCHEDULABLE_GRACE", value_parser = parse_duration_arg)]
    unschedulable_grace: Option<Duration>,
    /// Image of the serving container of workloads with spec.serve.
    #[arg(long, env = "RM_SERVE_IMAGE")]
    serve_image: Option<String>,
    /// imagePullPolicy of the serving container (Always, IfNotPresent, Never; "" = default).
    #[arg(long, env = "RM_SERVE_IMAGE_PULL_POLICY")]
    serve_image_pull_policy: Option<String>,
    /// Name of the leader-election Lease.
    #[arg(long, env = "RM_LEASE_NAME", default_value = "rm-operator")]
    lease_name: String,
    /// Namespace of the Lease (default: the pod's namespace, else "default").
    #[arg(long, env = "POD_NAMESPACE")]
    lease_namespace: Option<String>,
    /// Identity in the Lease (default: the pod name, else host-pid).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    #[command(flatten)]
    webhook: rm_operator::webhook::WebhookArgs,
}

fn parse_priority_arg(s: &str) -> Result<(DeviceType, u32), String> {
    parse_priority(s).map_err(|e| e.to_string())
}

fn parse_resource_arg(s: &str) -> Result<(DeviceType, String), String> {
    parse_type_value(s).map_err(|e| e.to_string())
}

fn parse_duration_arg(s: &str) -> Result<Duration, String> {
    parse_duration(s).map_err(|e| e.to_string())
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    rm_runtime::init_logging("info,kube=warn,tower=warn,hyper=warn");
    let cli = Cli::parse();
    let config = match OperatorConfig::load(&Overrides {
        config_file: cli.config.clone(),
        priorities: cli.priorities.clone(),
        resource_names: cli.resource_names.clone(),
        cpu_fallback: cli.cpu_fallback,
        unschedulable_grace: cli.unschedulable_grace,
        serve_image: cli.serve_image.clone(),
        serve_image_pull_policy: cli.serve_image_pull_policy.clone(),
    }) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            return std::process::ExitCode::from(2);
        }
    };
    tracing::info!(
        priority_order = ?config.priority_order(),
        resource_names = ?config.resource_names,
        cpu_fallback = config.cpu_fallback,
        unschedulable_grace_s = config.unschedulable_grace.as_secs(),
        serve_image = %config.serve.image,
        "configuration"
    );
    let client = match Client::try_default().await {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "cannot configure a Kubernetes client (KUBECONFIG or in-cluster)");
            return std::process::ExitCode::from(2);
        }
    };

    // One shutdown signal for every task.
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        rm_runtime::shutdown_signal().await;
        let _ = stop_tx.send(true);
    });
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };

    let metrics = Arc::new(Metrics::default());
    let ready = Arc::new(AtomicBool::new(false));
    let server_state = ServerState {
        metrics: metrics.clone(),
        ready: ready.clone(),
    };
    let server = tokio::spawn(server::serve(
        cli.metrics_addr,
        server_state,
        stopped(stop_rx.clone()),
    ));

    // The operator's own namespace: its Lease and its webhook Secret live here.
    let own_namespace = cli
        .lease_namespace
        .clone()
        .or_else(|| cli.namespace.clone())
        .unwrap_or_else(|| "default".into());
    // The webhook serves on every replica, leader or not.
    let inject = cli
        .webhook
        .inject_config(config.resource_names.values().cloned());
    let webhook = tokio::spawn(rm_operator::webhook::run(
        client.clone(),
        cli.webhook.clone(),
        own_namespace.clone(),
        inject,
        stopped(stop_rx.clone()),
    ));

    let identity = cli.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });
    let leader = LeaderElection::new(client.clone(), &own_namespace, &cli.lease_name, &identity);
    tokio::select! {
        _ = leader.acquire() => {}
        _ = stopped(stop_rx.clone()) => {
            let _ = server.await;
            let _ = webhook.await;
            return std::process::ExitCode::SUCCESS;
        }
    }

    // Leadership lost → stop reconciling and exit non-zero so that the pod
    // restarts as a standby; a clean shutdown releases the lease.
    let (lost_tx, lost_rx) = watch::channel(false);
    let holder = leader.clone();
    tokio::spawn(async move {
        holder.hold().await;
        let _ = lost_tx.send(true);
    });
    let end = {
        let (stop, lost) = (stop_rx.clone(), lost_rx.clone());
        async move {
            tokio::select! {
                _ = stopped(stop) => {}
                _ = stopped(lost) => {}
            }
        }
    };
    let reporter = Reporter {
        controller: "rm-operator".into(),
        instance: Some(identity.clone()),
    };
    controller::run(
        client,
        config,
        Scope {
            namespace: cli.namespace.clone(),
        },
        metrics,
        reporter,
        end,
        ready,
    )
    .await;

    if *lost_rx.borrow() {
        return std::process::ExitCode::from(1);
    }
    leader.release().await;
    let _ = server.await;
    if let Ok(Err(e)) = webhook.await {
        tracing::error!(error = %e, "the admission webhook could not serve");
    }
    tracing::info!("stopped");
    std::process::ExitCode::SUCCESS
}
