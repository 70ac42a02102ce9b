//! Where a workload runs now and what capacity it sees: read from its
//! Deployment and pods. Pure functions, shared by the controller and by
//! `kubectl inference explain`, so both see a workload the same way.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use rm_crds::{DeviceType, InferenceWorkload, labels};

use crate::capacity::CapacitySnapshot;
use crate::config::OperatorConfig;
use crate::render::{DEVICE_TYPE, SELECTION_BASIS};
use crate::selection::{Current, selection_basis};

/// Whether the pod belongs to the workload (its namespace and label).
/// Called for every cached pod on every reconcile, so it compares in place.
pub fn is_own_pod(pod: &Pod, iw: &InferenceWorkload) -> bool {
    let label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(labels::WORKLOAD));
    label.is_some()
        && label.map(String::as_str) == iw.metadata.name.as_deref()
        && pod.metadata.namespace == iw.metadata.namespace
}

/// Free capacity as the workload sees it: its own pods' devices count as
/// free for it, so that re-evaluating a running workload does not take its
/// own replicas for someone else's.
pub fn capacity_for<'a>(
    iw: &InferenceWorkload,
    nodes: impl IntoIterator<Item = &'a Node>,
    pods: impl IntoIterator<Item = &'a Pod>,
    config: &OperatorConfig,
) -> CapacitySnapshot {
    CapacitySnapshot::from_cluster(
        nodes,
        pods.into_iter().filter(|p| !is_own_pod(p, iw)),
        config,
    )
}

/// The device type the Deployment's pods are made for.
pub fn deployed_device_type(deployment: &Deployment) -> Option<DeviceType> {
    deployment
        .spec
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(DEVICE_TYPE)?
        .parse()
        .ok()
}

/// Whether the pod was made for the given device type (pods carry their
/// template's annotation), so that pods left from an earlier choice do not
/// count against the current one.
pub fn is_for_device_type(pod: &Pod, device_type: DeviceType) -> bool {
    pod.annotations()
        .get(DEVICE_TYPE)
        .is_some_and(|t| *t == device_type.as_str())
}

/// Where the replicas run, as the Deployment the operator wrote says, and
/// how long its pods have been unschedulable there.
pub fn current_placement<'a>(
    iw: &InferenceWorkload,
    deployment: &Deployment,
    pods: impl IntoIterator<Item = &'a Pod>,
    now: jiff::Timestamp,
) -> Option<(Current, Option<Unschedulable>)> {
    let device_type = deployed_device_type(deployment)?;
    let basis = deployment.annotations().get(SELECTION_BASIS)?;
    let pods_of_type: Vec<&Pod> = pods
        .into_iter()
        .filter(|p| is_own_pod(p, iw) && is_for_device_type(p, device_type))
        .collect();
    let unschedulable = unschedulable_pods(pods_of_type.iter().copied(), now);
    Some((
        Current {
            device_type,
            same_basis: *basis == selection_basis(&iw.spec),
            unschedulable_for: unschedulable.as_ref().map(|u| u.longest),
            ready: ready_pods(pods_of_type.iter().copied()),
        },
        unschedulable,
    ))
}

/// Pods whose Ready condition is True.
pub fn ready_pods<'a>(pods: impl IntoIterator<Item = &'a Pod>) -> u32 {
    let n = pods
        .into_iter()
        .filter(|p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
        })
        .count();
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Pods the scheduler cannot place.
#[derive(Clone, Debug, PartialEq)]
pub struct Unschedulable {
    /// How long the longest-waiting one has waited.
    pub longest: Duration,
    pub count: usize,
    /// The scheduler's message for the longest-waiting one.
    pub message: String,
}

pub fn unschedulable_pods<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    now: jiff::Timestamp,
) -> Option<Unschedulable> {
    let stuck: Vec<(Duration, String)> = pods
        .into_iter()
        .filter_map(|p| {
            let cond = p.status.as_ref()?.conditions.as_ref()?.iter().find(|c| {
                c.type_ == "PodScheduled"
                    && c.status == "False"
                    && c.reason.as_deref() == Some("Unschedulable")
            })?;
            let since = cond.last_transition_time.as_ref()?.0;
            let secs = now.as_second().saturating_sub(since.as_second()).max(0);
            Some((
                Duration::from_secs(u64::try_from(secs).unwrap_or(0)),
                cond.message.clone().unwrap_or_default(),
            ))
        })
        .collect();
    let (longest, message) = stuck.iter().max_by_key(|(d, _)| *d)?.clone();
    Some(Unschedulable {
        longest,
        count: stuck.len(),
        message,
    })
}

/// Pods whose containers cannot run: crash-looping, exited with an error, or
/// never started (image or configuration errors).
#[derive(Clone, Debug, PartialEq)]
pub struct Failing {
    pub count: usize,
    /// What the first one says: the container, why, and the last line it
    /// logged (its termination message, which the webhook makes the log
    /// tail: rm_abstract's one-line error).
    pub message: String,
}

/// Waiting reasons of a container that will not run without a change.
const STUCK_REASONS: &[&str] = &[
    "CrashLoopBackOff",
    "CreateContainerConfigError",
    "CreateContainerError",
    "ErrImageNeverPull",
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "RunContainerError",
];

/// Longest message kept in a status (a termination message may be 4 KiB).
const MESSAGE_LIMIT: usize = 300;

/// A container that runs again after failing counts as failing while it
/// keeps crashing: restarted at least this often, its current run younger
/// than `RECOVERED_AFTER`. Kubernetes counts it ready between crashes
/// (without a readiness probe), which would flip the workload's phase with
/// every restart.
const CRASH_LOOP_RESTARTS: i32 = 2;
const RECOVERED_AFTER: Duration = Duration::from_secs(600);

pub fn failing_pods<'a>(
    pods: impl IntoIterator<Item = &'a Pod>,
    now: jiff::Timestamp,
) -> Option<Failing> {
    let messages: Vec<String> = pods
        .into_iter()
        .filter_map(|p| {
            let status = p.status.as_ref()?;
            status
                .init_container_statuses
                .iter()
                .chain(status.container_statuses.iter())
                .flatten()
                .find_map(|c| container_failure(c, now))
        })
        .collect();
    let message = messages.first()?.clone();
    Some(Failing {
        count: messages.len(),
        message,
    })
}

fn container_failure(
    c: &k8s_openapi::api::core::v1::ContainerStatus,
    now: jiff::Timestamp,
) -> Option<String> {
    let waiting = c.state.as_ref().and_then(|s| s.waiting.as_ref());
    let last_run = c
        .state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .or_else(|| c.last_state.as_ref()?.terminated.as_ref());
    let terminated = last_run.filter(|t| t.exit_code != 0);
    let stuck = waiting
        .and_then(|w| w.reason.as_deref())
        .filter(|r| STUCK_REASONS.contains(r));
    let running = c.state.as_ref().and_then(|s| s.running.as_ref());
    let crash_looping = running.is_some_and(|r| {
        let young = r.started_at.as_ref().is_none_or(|t| {
            now.as_second().saturating_sub(t.0.as_second()) < RECOVERED_AFTER.as_secs() as i64
        });
        young && c.restart_count >= CRASH_LOOP_RESTARTS
    });
    if stuck.is_none() && (terminated.is_none() || (running.is_some() && !crash_looping)) {
        return None;
    }
    let mut out = format!("container {}", c.name);
    if let Some(reason) = stuck {
        out.push_str(&format!(": {reason}"));
    } else if running.is_some() {
        out.push_str(&format!(": crash-looping ({} restarts)", c.restart_count));
    }
    match terminated {
        Some(t) => {
            out.push_str(&format!(", exit code {}", t.exit_code));
            let last_line = t
                .message
                .as_deref()
                .and_then(|m| m.lines().rev().map(str::trim).find(|l| !l.is_empty()));
            if let Some(line) = last_line {
                out.push_str(&format!(": {line}"));
            }
        }
        // A script that finishes is restarted by its Deployment.
        None if last_run.is_some() => {
            out.push_str(", its last run exited 0 (finished; a Deployment restarts what ends)")
        }
        None => {
            if let Some(m) = waiting.and_then(|w| w.message.as_deref()) {
                out.push_str(&format!(": {m}"));
            }
        }
    }
    Some(truncate(out, MESSAGE_LIMIT))
}

fn truncate(mut s: String, limit: usize) -> String {
    if s.len() > limit {
        let mut end = limit;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
        s.push('…');
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn now() -> jiff::Timestamp {
        "2026-12-01T12:00:00Z".parse().unwrap()
    }

    fn pod(statuses: serde_json::Value) -> Pod {
        serde_json::from_value(
            json!({"metadata": {"name": "p"}, "status": {"containerStatuses": statuses}}),
        )
        .unwrap()
    }

    fn status(state: serde_json::Value, last: serde_json::Value) -> serde_json::Value {
        json!({"name": "app", "image": "i", "imageID": "", "ready": false, "restartCount": 2,
               "state": state, "lastState": last})
    }

    #[test]
    fn crash_loop_reports_the_last_logged_line() {
        let p = pod(json!([status(
            json!({"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 20s"}}),
            json!({"terminated": {"exitCode": 1, "reason": "Error",
                   "message": "Traceback (most recent call last):\n  ...\nrm_abstract.errors.RMUnavailableError: cannot run m on rbln:0: no RBLN SDK\n\n"}}),
        )]));
        let f = failing_pods([&p], now()).unwrap();
        assert_eq!(f.count, 1);
        assert_eq!(
            f.message,
            "container app: CrashLoopBackOff, exit code 1: rm_abstract.errors.RMUnavailableError: cannot run m on rbln:0: no RBLN SDK"
        );
    }

    #[test]
    fn a_container_running_again_between_crashes_fails_until_it_stays_up() {
        let crashed =
            json!({"terminated": {"exitCode": 1, "message": "RMUnavailableError: no SDK"}});
        let running = |since: &str, restarts: i32| {
            let mut s = status(json!({"running": {"startedAt": since}}), crashed.clone());
            s["restartCount"] = json!(restarts);
            pod(json!([s]))
        };
        let f = failing_pods([&running("2026-12-01T11:59:50Z", 3)], now()).unwrap();
        assert_eq!(
            f.message,
            "container app: crash-looping (3 restarts), exit code 1: RMUnavailableError: no SDK"
        );
        // One restart, or ten minutes up since: recovered.
        assert_eq!(
            failing_pods([&running("2026-12-01T11:59:50Z", 1)], now()),
            None
        );
        assert_eq!(
            failing_pods([&running("2026-12-01T11:49:00Z", 3)], now()),
            None
        );
    }

    #[test]
    fn image_errors_report_the_kubelets_message_and_long_ones_are_cut() {
        let long = "x".repeat(1000);
        let p = pod(json!([status(
            json!({"waiting": {"reason": "ErrImageNeverPull", "message": long}}),
            json!({}),
        )]));
        let f = failing_pods([&p], now()).unwrap();
        assert!(
            f.message
                .starts_with("container app: ErrImageNeverPull: xxx")
        );
        assert!(f.message.len() <= MESSAGE_LIMIT + '…'.len_utf8());
    }

    #[test]
    fn running_starting_and_recovered_containers_are_not_failing() {
        let running_after_a_crash = pod(json!([status(
            json!({"running": {"startedAt": "2026-12-01T10:00:00Z"}}),
            json!({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}),
        )]));
        let creating = pod(json!([status(
            json!({"waiting": {"reason": "ContainerCreating"}}),
            json!({}),
        )]));
        let completed = pod(json!([status(
            json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
            json!({}),
        )]));
        let no_status = pod(json!(null));
        let finished_and_restarted = pod(json!([status(
            json!({"waiting": {"reason": "CrashLoopBackOff"}}),
            json!({"terminated": {"exitCode": 0, "reason": "Completed"}}),
        )]));
        assert_eq!(
            failing_pods([&finished_and_restarted], now())
                .unwrap()
                .message,
            "container app: CrashLoopBackOff, its last run exited 0 (finished; a Deployment restarts what ends)"
        );
        assert_eq!(
            failing_pods(
                [&running_after_a_crash, &creating, &completed, &no_status],
                now()
            ),
            None
        );
        let exited = pod(json!([status(
            json!({"terminated": {"exitCode": 2, "message": "bad flag"}}),
            json!({}),
        )]));
        let f = failing_pods([&creating, &exited, &exited], now()).unwrap();
        assert_eq!(
            (f.count, f.message.as_str()),
            (2, "container app, exit code 2: bad flag")
        );
    }
}
