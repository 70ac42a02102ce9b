//! The health loop: re-discovers devices every interval, folds in what
//! vanished, checks that heartbeats advance, and hands the result to each
//! resource manager (which pushes to ListAndWatch only what changes the
//! kubelet's view: IDs, health, topology; not the heartbeat itself).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rm_crds::device::DeviceType;
use tokio::sync::watch;

use crate::discovery::{self, Device, Health, Inventory};
use crate::resource::{ResourceManager, ResourceState, merge};

/// Remembers when each device's heartbeat last changed.
#[derive(Debug, Default)]
pub struct HeartbeatTracker {
    seen: HashMap<String, (u64, Instant)>,
}

impl HeartbeatTracker {
    /// Marks Unhealthy every device whose heartbeat has not advanced for
    /// `timeout`. Pure apart from the tracker's memory; `now` is passed in.
    pub fn apply(&mut self, devices: &mut [Device], now: Instant, timeout: Duration) {
        for d in devices.iter_mut() {
            let Some(beat) = d.heartbeat else { continue };
            let entry = self.seen.entry(d.id.clone()).or_insert((beat, now));
            if entry.0 != beat {
                *entry = (beat, now);
            } else if now.duration_since(entry.1) >= timeout {
                d.mark_unhealthy(format!(
                    "heartbeat stuck at {beat} for {}s",
                    now.duration_since(entry.1).as_secs()
                ));
            }
        }
    }
}

/// The state of one resource after a discovery pass.
pub fn next_state(
    previous: &ResourceState,
    inventory: &Inventory,
    device_type: DeviceType,
) -> ResourceState {
    let found: Vec<Device> = inventory.of_type(device_type).cloned().collect();
    ResourceState {
        devices: merge(&previous.devices, found),
        control_nodes: inventory
            .control_nodes
            .get(&device_type)
            .cloned()
            .unwrap_or_default(),
    }
}

pub struct HealthLoop {
    pub host_root: PathBuf,
    pub managers: Vec<Arc<ResourceManager>>,
    pub interval: Duration,
    pub heartbeat_timeout: Duration,
}

impl HealthLoop {
    pub async fn run(self, mut shutdown: watch::Receiver<bool>) {
        let types: Vec<DeviceType> = self.managers.iter().map(|m| m.device_type).collect();
        let mut tracker = HeartbeatTracker::default();
        let mut warned: HashSet<String> = HashSet::new();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = shutdown.wait_for(|s| *s) => return,
            }
            let root = self.host_root.clone();
            let t = types.clone();
            let inventory =
                match tokio::task::spawn_blocking(move || discovery::discover(&root, &t)).await {
                    Ok(inv) => inv,
                    Err(e) => {
                        tracing::error!(error = %e, "device discovery task failed");
                        continue;
                    }
                };
            for w in &inventory.warnings {
                // Once per distinct problem: a broken entry must not flood
                // the log every 250 ms.
                if warned.insert(w.clone()) {
                    tracing::warn!(problem = %w, "device entry skipped or degraded");
                }
            }
            let now = Instant::now();
            for m in &self.managers {
                let prev = m.snapshot();
                let mut next = next_state(&prev, &inventory, m.device_type);
                tracker.apply(&mut next.devices, now, self.heartbeat_timeout);
                log_changes(&m.resource_name, &prev.devices, &next.devices);
                m.update(next);
            }
        }
    }
}

fn log_changes(resource: &str, before: &[Device], after: &[Device]) {
    for d in after {
        let old = before.iter().find(|o| o.id == d.id).map(|o| o.health);
        if old == Some(d.health) {
            continue;
        }
        match d.health {
            Health::Healthy => {
                tracing::info!(resource, device = %d.id, index = d.index, "device is Healthy")
            }
            Health::Unhealthy => tracing::warn!(
                resource,
                device = %d.id,
                index = d.index,
                reason = d.reason.as_deref().unwrap_or(""),
                "device is Unhealthy"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stuck_heartbeat_turns_unhealthy_and_recovers_when_it_moves() {
        let dev = |beat| Device {
            id: "rngd-0".into(),
            device_type: DeviceType::Furiosa,
            index: 0,
            pci_address: None,
            numa_node: None,
            nodes: vec![],
            mounts: vec![],
            health: Health::Healthy,
            reason: None,
            heartbeat: Some(beat),
        };
        let mut t = HeartbeatTracker::default();
        let t0 = Instant::now();
        let timeout = Duration::from_secs(5);
        let mut d = [dev(1)];
        t.apply(&mut d, t0, timeout);
        assert_eq!(d[0].health, Health::Healthy);
        let mut d = [dev(1)];
        t.apply(&mut d, t0 + Duration::from_secs(4), timeout);
        assert_eq!(d[0].health, Health::Healthy);
        let mut d = [dev(1)];
        t.apply(&mut d, t0 + Duration::from_secs(6), timeout);
        assert_eq!(d[0].health, Health::Unhealthy);
        let mut d = [dev(2)];
        t.apply(&mut d, t0 + Duration::from_secs(7), timeout);
        assert_eq!(d[0].health, Health::Healthy);
    }
}
