//! Wiring: discovers devices, starts one resource manager and one served,
//! registered endpoint per vendor that has devices, the health loop and the
//! token collector, and stops them all when `shutdown` turns true.

use std::sync::Arc;

use tokio::sync::watch;

use crate::allocation::AllocateOptions;
use crate::config::Config;
use crate::discovery;
use crate::error::Result;
use crate::health::HealthLoop;
use crate::podresources::TokenCollector;
use crate::registration::PluginEndpoint;
use crate::resource::{ResourceManager, ResourceState};
use crate::tokens::TokenStore;

pub async fn run(cfg: Config, shutdown: watch::Receiver<bool>) -> Result<()> {
    let tokens = Arc::new(TokenStore::open(&cfg.state_dir)?);
    let types: Vec<_> = cfg.enabled_vendors().map(|v| v.device_type).collect();
    let root = cfg.host_root.clone();
    let inventory = tokio::task::spawn_blocking(move || discovery::discover(&root, &types))
        .await
        .unwrap_or_default();
    for w in &inventory.warnings {
        tracing::warn!(problem = %w, "device entry skipped or degraded");
    }

    let mut managers = Vec::new();
    for v in cfg.enabled_vendors() {
        let devices: Vec<_> = inventory.of_type(v.device_type).cloned().collect();
        if devices.is_empty() {
            // Registering an empty resource would only add noise to every CPU
            // node; a vendor whose hardware appears later needs a restart.
            tracing::info!(device_type = %v.device_type, "no devices found; not advertising");
            continue;
        }
        tracing::info!(
            device_type = %v.device_type,
            resource = %v.resource_name,
            count = devices.len(),
            ids = ?devices.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(),
            "devices found"
        );
        let state = ResourceState {
            devices,
            control_nodes: inventory
                .control_nodes
                .get(&v.device_type)
                .cloned()
                .unwrap_or_default(),
        };
        managers.push(Arc::new(ResourceManager::new(
            v.resource_name.clone(),
            v.device_type,
            cfg.replicas,
            state,
        )));
    }

    let mut tasks = tokio::task::JoinSet::new();
    let collector = Arc::new(TokenCollector {
        store: tokens.clone(),
        socket: cfg.pod_resources_socket.clone(),
        interval: cfg.token_gc_interval,
        grace: cfg.token_grace,
        lease: cfg.token_lease,
    });
    {
        let (c, sd) = (collector.clone(), shutdown.clone());
        tasks.spawn(async move {
            c.run(sd).await;
            Ok(())
        });
    }
    if !managers.is_empty() {
        let health = HealthLoop {
            host_root: cfg.host_root.clone(),
            managers: managers.clone(),
            interval: cfg.health_interval,
            heartbeat_timeout: cfg.heartbeat_timeout,
        };
        let sd = shutdown.clone();
        tasks.spawn(async move {
            health.run(sd).await;
            Ok(())
        });
    }
    match (&cfg.agent_resource, &cfg.agent_socket_dir) {
        (Some(agent), Some(dir)) => {
            tracing::info!(
                resource = %agent.resource_name,
                slots = agent.slots,
                socket_dir = %dir.display(),
                "advertising the node agent's socket"
            );
            // Not handed to the health loop: nothing to discover; its slots
            // are always healthy.
            managers.push(Arc::new(ResourceManager::agent_socket(
                agent.resource_name.clone(),
                agent.slots,
            )));
        }
        (Some(agent), None) => tracing::info!(
            resource = %agent.resource_name,
            "no agentSocketDir configured; not advertising the agent resource"
        ),
        (None, _) => {}
    }
    for m in &managers {
        let ep = PluginEndpoint {
            manager: m.clone(),
            tokens: collector.clone(),
            options: AllocateOptions {
                resource_name: m.resource_name.clone(),
                agent_socket_dir: cfg.agent_socket_dir.clone(),
                cdi_enabled: cfg.cdi_enabled,
            },
            kubelet_dir: cfg.kubelet_dir.clone(),
            endpoint: m.endpoint_name(),
            poll_interval: cfg.kubelet_poll_interval,
        };
        tasks.spawn(ep.run(shutdown.clone()));
    }
    let mut sd = shutdown.clone();
    let _ = sd.wait_for(|s| *s).await;
    let mut result = Ok(());
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::error!(error = %e, "component failed");
                result = Err(e);
            }
            Err(e) => tracing::error!(error = %e, "component task panicked"),
        }
    }
    result
}
