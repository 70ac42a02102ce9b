//! Where a workload runs now and what capacity it sees: read from its
//! Deployment and pods. Pure functions, shared by the controller and by
//! `kubectl inference explain`, so both see a workload the same way.

use std::time::Duration;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::ResourceExt;
use rm_crds::{InferenceWorkload, labels};

use crate::capacity::CapacitySnapshot;
use crate::config::OperatorConfig;
use crate::render::{DEVICE_TYPE, SELECTION_BASIS};
use crate::selection::{Current, selection_basis};

/// Whether the pod belongs to the workload (its namespace and label).
pub fn is_own_pod(pod: &Pod, iw: &InferenceWorkload) -> bool {
    pod.namespace() == iw.namespace() && pod.labels().get(labels::WORKLOAD) == Some(&iw.name_any())
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

/// Where the replicas run, as the Deployment the operator wrote says.
pub fn current_placement(
    iw: &InferenceWorkload,
    deployment: &Deployment,
    unschedulable_for: Option<Duration>,
) -> Option<Current> {
    let device_type = deployment
        .spec
        .template
        .metadata
        .as_ref()?
        .annotations
        .as_ref()?
        .get(DEVICE_TYPE)?
        .parse()
        .ok()?;
    let basis = deployment.annotations().get(SELECTION_BASIS)?;
    Some(Current {
        device_type,
        same_basis: *basis == selection_basis(&iw.spec),
        unschedulable_for,
    })
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
