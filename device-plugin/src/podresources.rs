//! The kubelet's PodResources API (`v1.PodResourcesLister/List`) as the
//! source of truth about who holds an allocation. From it the token
//! collector (one pass per interval)
//! - binds each new token to the pod that holds its devices (the identity
//!   the node agent scopes models and cache entries by),
//! - renews the lease (`expiresUnixMs`) of tokens whose pod is alive, so a
//!   token lapses on its own when the kubelet can no longer be asked,
//! - and removes the tokens whose containers are gone.
//!
//! A fresh token is bound at once by [`TokenCollector::bind_soon`]: the
//! kubelet records the devices of a container right after Allocate, well
//! before the container starts.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::error::{Error, Result};
use crate::podresources_api::ListPodResourcesRequest;
use crate::podresources_api::pod_resources_lister_client::PodResourcesListerClient;
use crate::tokens::{TokenOwner, TokenRecord, TokenStore};
use crate::transport::connect_unix;

/// `(resource name, device ID)` held by a live container → its pod.
pub type LiveDevices = HashMap<(String, String), TokenOwner>;

/// The pod holding any of a record's devices.
pub fn holder<'a>(rec: &TokenRecord, live: &'a LiveDevices) -> Option<&'a TokenOwner> {
    rec.device_ids
        .iter()
        .find_map(|id| live.get(&(rec.resource_name.clone(), id.clone())))
}

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
        .filter(|r| holder(r, live).is_none())
        .map(|r| r.token_sha256.clone())
        .collect()
}

/// The new form of a live record: bound to its holder, lease renewed when
/// less than half of it is left. `None` when nothing changes.
pub fn refreshed(
    rec: &TokenRecord,
    live: &LiveDevices,
    now_ms: u64,
    lease_ms: u64,
) -> Option<TokenRecord> {
    let owner = holder(rec, live)?;
    let mut out = rec.clone();
    let mut changed = false;
    if rec.owner.as_ref() != Some(owner) {
        // A slot ID is handed to a new pod only after the old one left, and
        // then Allocate writes a new record; a record's owner never changes
        // otherwise. Bind the first time, keep the first binding after.
        if rec.owner.is_none() {
            out.owner = Some(owner.clone());
            changed = true;
        } else {
            return None;
        }
    }
    let left = rec.expires_unix_ms.map_or(0, |e| e.saturating_sub(now_ms));
    if left < lease_ms / 2 {
        out.expires_unix_ms = Some(now_ms.saturating_add(lease_ms));
        changed = true;
    }
    changed.then_some(out)
}

/// Asks the kubelet which devices live containers hold, and in which pod.
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
        let owner = TokenOwner {
            namespace: pod.namespace.clone(),
            pod: pod.name.clone(),
        };
        for c in pod.containers {
            for d in c.devices {
                for id in d.device_ids {
                    live.insert((d.resource_name.clone(), id), owner.clone());
                }
            }
        }
    }
    Ok(live)
}

/// What one collection pass did.
#[derive(Debug, Default, PartialEq)]
pub struct Pass {
    pub removed: Vec<String>,
    pub bound: Vec<String>,
}

/// One collection pass: remove stale tokens, bind and renew live ones.
pub async fn collect_once(
    store: &TokenStore,
    socket: &Path,
    grace: Duration,
    lease: Duration,
) -> Result<Pass> {
    let live = list_live(socket).await?;
    let records = store.list()?;
    let now = TokenStore::now_ms();
    let mut pass = Pass {
        removed: stale_tokens(&records, &live, now, grace.as_millis() as u64),
        ..Pass::default()
    };
    for t in &pass.removed {
        store.remove(t)?;
    }
    for rec in &records {
        if let Some(new) = refreshed(rec, &live, now, lease.as_millis() as u64) {
            if rec.owner.is_none() && new.owner.is_some() {
                pass.bound.push(new.token_sha256.clone());
            }
            store.update(&new)?;
        }
    }
    Ok(pass)
}

pub struct TokenCollector {
    pub store: Arc<TokenStore>,
    pub socket: PathBuf,
    pub interval: Duration,
    pub grace: Duration,
    pub lease: Duration,
}

impl TokenCollector {
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            match collect_once(&self.store, &self.socket, self.grace, self.lease).await {
                Ok(pass) => {
                    failing = false;
                    for t in pass.removed {
                        tracing::info!(
                            token_sha256_prefix = &t[..t.len().min(12)],
                            "removed token of a vanished container"
                        );
                    }
                }
                Err(e) if !failing => {
                    failing = true;
                    tracing::warn!(
                        error = %e,
                        lease_s = self.lease.as_secs(),
                        "cannot ask the kubelet who holds the tokens; they lapse unless renewed within their lease; will retry"
                    );
                }
                Err(_) => {}
            }
        }
    }

    /// Binds a fresh token to its pod as soon as the kubelet reports it
    /// (tries for about 30 s; after that the periodic pass does it).
    pub fn bind_soon(self: &Arc<Self>, token_sha256: String) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut delay = Duration::from_millis(20);
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while tokio::time::Instant::now() < deadline {
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
                let Ok(live) = list_live(&this.socket).await else {
                    continue;
                };
                let Some(rec) = this.store.get(&token_sha256) else {
                    return; // superseded or collected meanwhile
                };
                let now = TokenStore::now_ms();
                if let Some(new) = refreshed(&rec, &live, now, this.lease.as_millis() as u64) {
                    if let Some(o) = &new.owner {
                        tracing::info!(
                            namespace = %o.namespace,
                            pod = %o.pod,
                            resource = %new.resource_name,
                            "token bound to its pod"
                        );
                    }
                    if let Err(e) = this.store.update(&new) {
                        tracing::warn!(error = %e, "cannot bind token");
                    }
                }
                if rec.owner.is_some() || holder(&rec, &live).is_some() {
                    return;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(ns: &str, pod: &str) -> TokenOwner {
        TokenOwner {
            namespace: ns.into(),
            pod: pod.into(),
        }
    }

    #[test]
    fn live_records_are_bound_once_and_their_lease_renewed_at_half_time() {
        let rec = TokenRecord {
            version: 1,
            token_sha256: "t".into(),
            resource_name: "rm-abstract.io/agent".into(),
            device_ids: vec!["slot-7".into()],
            devices: vec![],
            created_unix_ms: 0,
            expires_unix_ms: Some(1_000),
            owner: None,
            agent_slot: true,
        };
        let live: LiveDevices = [(
            ("rm-abstract.io/agent".to_string(), "slot-7".to_string()),
            owner("team-a", "p1"),
        )]
        .into();
        // Not held: nothing to do (the collector removes it after the grace).
        assert_eq!(refreshed(&rec, &LiveDevices::new(), 0, 1_000), None);
        let bound = refreshed(&rec, &live, 0, 1_000).expect("bound");
        assert_eq!(bound.owner, Some(owner("team-a", "p1")));
        assert_eq!(bound.expires_unix_ms, Some(1_000), "more than half left");
        assert_eq!(refreshed(&bound, &live, 400, 1_000), None);
        let renewed = refreshed(&bound, &live, 600, 1_000).expect("renewed");
        assert_eq!(renewed.expires_unix_ms, Some(1_600));
        assert_eq!(renewed.owner, bound.owner);
        // A record never changes hands: another pod reported on the same
        // slot (impossible while the record lives) does not rebind it.
        let other: LiveDevices = [(
            ("rm-abstract.io/agent".to_string(), "slot-7".to_string()),
            owner("team-b", "p2"),
        )]
        .into();
        assert_eq!(refreshed(&bound, &other, 900, 1_000), None);
    }

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
            owner: None,
            agent_slot: false,
        };
        let records = [
            rec("held", "GPU-a", 0),
            rec("gone", "GPU-b", 0),
            rec("young", "GPU-c", 9_500),
        ];
        let live: LiveDevices = [(
            ("nvidia.com/gpu".to_string(), "GPU-a".to_string()),
            owner("team-a", "p1"),
        )]
        .into();
        assert_eq!(stale_tokens(&records, &live, 10_000, 1_000), ["gone"]);
        // Same device ID under another resource does not keep it alive.
        let other: LiveDevices = [(
            ("example.com/x".to_string(), "GPU-b".to_string()),
            owner("team-a", "p1"),
        )]
        .into();
        assert!(stale_tokens(&records, &other, 10_000, 1_000).contains(&"gone".to_string()));
    }
}
