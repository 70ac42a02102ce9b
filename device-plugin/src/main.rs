//! `rm-device-plugin --host-root DIR --kubelet-dir DIR --state-dir DIR [--config FILE]`:
//! parses flags, loads the configuration, runs the plugin until SIGTERM/SIGINT.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use rm_device_plugin::config::{self, Config, FlagConfig};
use tokio::sync::watch;

#[derive(Parser, Debug)]
#[command(
    name = "rm-device-plugin",
    version,
    about = "Kubelet device plugin for GPU, ATOM and RNGD devices"
)]
struct Cli {
    /// Root of the host filesystem (sys/, dev/, proc/ are read under it).
    #[arg(long, env = config::ENV_HOST_ROOT)]
    host_root: Option<PathBuf>,
    /// The kubelet's device-plugin directory (with kubelet.sock).
    #[arg(long, env = config::ENV_KUBELET_DIR)]
    kubelet_dir: Option<PathBuf>,
    /// Directory for allocation tokens read by the node agent.
    #[arg(long, env = config::ENV_STATE_DIR)]
    state_dir: Option<PathBuf>,
    /// YAML configuration file (lowest precedence after defaults).
    #[arg(long)]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    rm_runtime::init_logging("info");
    let cli = Cli::parse();
    // clap already folded the env vars into these flags; Config::load applies
    // env again for the rest and the file below both, keeping flag > env > file.
    let flags = FlagConfig {
        host_root: cli.host_root,
        kubelet_dir: cli.kubelet_dir,
        state_dir: cli.state_dir,
        config_file: cli.config,
    };
    let cfg = match Config::load(flags) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "invalid configuration");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async move {
        tracing::info!(
            host_root = %cfg.host_root.display(),
            kubelet_dir = %cfg.kubelet_dir.display(),
            state_dir = %cfg.state_dir.display(),
            "starting"
        );
        let (tx, rx) = watch::channel(false);
        tokio::spawn(async move {
            rm_runtime::shutdown_signal().await;
            let _ = tx.send(true);
        });
        match rm_device_plugin::app::run(cfg, rx).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = %e, "stopped with an error");
                ExitCode::FAILURE
            }
        }
    })
}
