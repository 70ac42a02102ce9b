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
    let unschedulable = unschedulable_pods(
        pods.into_iter()
            .filter(|p| is_own_pod(p, iw) && is_for_device_type(p, device_type)),
        now,
    );
    Some((
        Current {
            device_type,
            same_basis: *basis == selection_basis(&iw.spec),
            unschedulable_for: unschedulable.as_ref().map(|u| u.longest),
        },
        unschedulable,
    ))
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
