//! rm-serve: an OpenAI-compatible server for one InferenceWorkload, run by
//! the operator beside the node agent. It registers and prepares the model
//! through the agent's unix socket, then serves completions and chats; only
//! wiring lives here.

mod agent;
mod config;
mod metrics;
mod model;
mod openai;
mod routes;
mod stop;

use std::sync::Arc;

use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() {
    let filter = EnvFilter::try_from_env("RM_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    if std::env::var("RM_LOG_FORMAT").is_ok_and(|f| f == "json") {
        tracing_subscriber::fmt()
            .with_env_filter(filter)
            .json()
            .init();
    } else {
        tracing_subscriber::fmt().with_env_filter(filter).init();
    }
    let cfg = match config::Config::from_lookup(
        |k| std::env::var(k).ok(),
        |p| std::path::Path::new(p).exists(),
    ) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "bad configuration");
            std::process::exit(2);
        }
    };
    tracing::info!(model = %cfg.model_name, source = ?cfg.source, device = %cfg.device,
        socket = %cfg.agent_socket.display(), port = cfg.port, token = cfg.token.is_some(), "rm-serve starting");
    let state = Arc::new(routes::AppState {
        agent: agent::AgentClient::new(&cfg.agent_socket, cfg.token.clone()),
        model: model::ModelState::default(),
        metrics: metrics::Metrics::default(),
        started_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        cfg,
    });
    let up = state.clone();
    tokio::spawn(async move { model::bring_up(&up.agent, &up.cfg, &up.model).await });
    let addr = std::net::SocketAddr::from(([0, 0, 0, 0], state.cfg.port));
    let listener = match tokio::net::TcpListener::bind(addr).await {
        Ok(l) => l,
        Err(e) => {
            tracing::error!(%addr, error = %e, "cannot listen");
            std::process::exit(1);
        }
    };
    tracing::info!(%addr, "listening");
    let app = routes::router(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
    {
        tracing::error!(error = %e, "server failed");
        std::process::exit(1);
    }
    tracing::info!("stopped");
}

/// SIGTERM (the kubelet) or Ctrl-C: stop accepting, finish what runs.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "no SIGTERM handler");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        _ = term => {},
        _ = tokio::signal::ctrl_c() => {},
    }
    tracing::info!("shutting down: no new connections, in-flight answers finish");
}
