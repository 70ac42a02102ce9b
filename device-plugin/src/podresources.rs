//! Collection of tokens whose containers are gone, using the kubelet's
//! PodResources API (`v1.PodResourcesLister/List`).

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::podresources_api::ListPodResourcesRequest;
use crate::podresources_api::pod_resources_lister_client::PodResourcesListerClient;
use crate::tokens::{TokenRecord, TokenStore};
use crate::transport::connect_unix;

/// `(resource name, device ID)` pairs held by live containers.
pub type LiveDevices = HashSet<(String, String)>;

/// Tokens to remove: older than `grace_ms` and none of their devices held by a
/// live container. Young tokens are kept because the kubelet calls Allocate
/// before the container appears in PodResources.
pub fn stale_tokens(
    records: &[TokenRecord],
    live: &LiveDevices,
    now_ms: u64,
    grace_ms: u64,
) -> Vec<String> {
    records
        .iter()
        .filter(|r| now_ms.saturating_sub(r.created_unix_ms) >= grace_ms)
        .filter(|r| {
            !r.device_ids
                .iter()
                .any(|id| live.contains(&(r.resource_name.clone(), id.clone())))
        })
        .map(|r| r.token_sha256.clone())
        .collect()
}

/// Asks the kubelet which devices live containers hold.
pub async fn list_live(socket: &Path) -> Result<LiveDevices> {
    let channel = connect_unix(socket).await?;
    let mut client = PodResourcesListerClient::new(channel);
    let resp = client
        .list(ListPodResourcesRequest {})
        .await
        .map_err(|status| Error::PodResources {
            path: socket.to_owned(),
            status: Box::new(status),
        })?
        .into_inner();
    let mut live = LiveDevices::new();
    for pod in resp.pod_resources {
        for c in pod.containers {
            for d in c.devices {
                for id in d.device_ids {
                    live.insert((d.resource_name.clone(), id));
                }
            }
        }
    }
    Ok(live)
}

/// One collection pass; returns the removed tokens.
pub async fn collect_once(
    store: &TokenStore,
    socket: &Path,
    grace: Duration,
) -> Result<Vec<String>> {
    let live = list_live(socket).await?;
    let records = store.list()?;
    let stale = stale_tokens(
        &records,
        &live,
        TokenStore::now_ms(),
        grace.as_millis() as u64,
    );
    for t in &stale {
        store.remove(t)?;
    }
    Ok(stale)
}

pub struct TokenCollector {
    pub store: Arc<TokenStore>,
    pub socket: PathBuf,
    pub interval: Duration,
    pub grace: Duration,
}

impl TokenCollector {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            match collect_once(&self.store, &self.socket, self.grace).await {
                Ok(removed) => {
                    failing = false;
                    for t in removed {
                        tracing::info!(
                            token_sha256_prefix = &t[..t.len().min(12)],
                            "removed token of a vanished container"
                        );
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(error = %e, "cannot collect stale tokens; will retry");
                }
                Err(_) => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_old_tokens_without_a_live_holder_are_stale() {
        let rec = |token: &str, id: &str, created| TokenRecord {
            version: 1,
            token_sha256: token.into(),
            resource_name: "nvidia.com/gpu".into(),
            device_ids: vec![id.into()],
            devices: vec![],
            created_unix_ms: created,
            expires_unix_ms: None,
        };
        let records = [
            rec("held", "GPU-a", 0),
            rec("gone", "GPU-b", 0),
            rec("young", "GPU-c", 9_500),
        ];
        let live: LiveDevices = [("nvidia.com/gpu".to_string(), "GPU-a".to_string())].into();
        assert_eq!(stale_tokens(&records, &live, 10_000, 1_000), ["gone"]);
        // Same device ID under another resource does not keep it alive.
        let other: LiveDevices = [("example.com/x".to_string(), "GPU-b".to_string())].into();
        assert!(stale_tokens(&records, &other, 10_000, 1_000).contains(&"gone".to_string()));
    }
}
