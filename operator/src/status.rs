//! The status of a workload: a pure function of the workload, the device
//! selection, its Deployment and pods. Timestamps of unchanged conditions are
//! carried over, so recomputing an unchanged status yields an equal value and
//! the controller writes nothing.

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use kube::ResourceExt;
use rm_crds::workload::condition;
use rm_crds::{DeviceStatus, InferenceWorkload, InferenceWorkloadStatus, Phase, labels};

use crate::config::OperatorConfig;
use crate::selection::{Decision, Selection};

/// What the controller observed besides the workload itself.
#[derive(Debug, Default)]
pub struct Observed<'a> {
    pub deployment: Option<&'a Deployment>,
    /// Why the Deployment could not be written, in the apiserver's words.
    pub deployment_error: Option<DeploymentError>,
    /// Ready pods made for the device type the status reports (old
    /// ReplicaSets' pods on another type do not count); `None` to take the
    /// Deployment's own count.
    pub ready_pods: Option<i32>,
    /// Ready pods of the workload on any type, those of a type it is
    /// leaving included (they serve until the move is done); `None` to
    /// take `ready_pods`.
    pub serving_ready: Option<i32>,
    /// Replicas that exist over all the workload's Deployments (`spread`);
    /// `None` to take the Deployment's own count.
    pub replicas: Option<i32>,
    /// Replicas per type, as placed.
    pub placements: Vec<rm_crds::TypePlacement>,
    /// Pods of the workload the scheduler cannot place, with its message.
    pub unschedulable: Option<(usize, String)>,
    /// Pods of the workload whose containers fail, with what the first says.
    pub failing: Option<(usize, String)>,
    /// The Service of a served workload.
    pub service: ServiceState,
}

/// The apiserver refused the Deployment.
#[derive(Debug, Clone, PartialEq)]
pub struct DeploymentError {
    pub code: u16,
    pub message: String,
}

impl DeploymentError {
    /// What to do about it: a 403 is about the namespace (quota, deletion)
    /// or the operator's rights, not the template; a 422/400 is the
    /// template.
    pub fn advice(&self) -> String {
        match self.code {
            403 => format!(
                "the apiserver refused to write the Deployment (403 Forbidden): {}; check the namespace's ResourceQuota, whether the namespace is being deleted, and the operator's RBAC",
                self.message
            ),
            _ => format!(
                "the Deployment for this workload was rejected: {}; fix spec.template",
                self.message
            ),
        }
    }

    /// Forbidden is Failed only until quota or the namespace changes; the
    /// template's errors need a new spec.
    pub fn is_spec_error(&self) -> bool {
        self.code != 403
    }
}

/// Where the Service of a served workload stands.
#[derive(Debug, Default, Clone, PartialEq)]
pub enum ServiceState {
    /// None written (not served, or not reconciled yet).
    #[default]
    Absent,
    /// The Service exists as the operator renders it.
    Present,
    /// It could not be written: the `Serving` reason and what to do.
    Failed {
        reason: &'static str,
        message: String,
    },
}

pub fn desired_status(
    iw: &InferenceWorkload,
    selection: &Selection,
    observed: &Observed<'_>,
    config: &OperatorConfig,
    now: &Time,
) -> InferenceWorkloadStatus {
    let wanted = iw.spec.replicas.max(0);
    let dep_status = observed.deployment.and_then(|d| d.status.as_ref());
    let replicas = observed
        .replicas
        .unwrap_or_else(|| dep_status.and_then(|s| s.replicas).unwrap_or(0));
    let ready = observed
        .ready_pods
        .unwrap_or_else(|| dep_status.and_then(|s| s.ready_replicas).unwrap_or(0));
    let chosen = selection.chosen();
    // No type for the current spec, but the Deployment made for an earlier
    // one still runs: say where it runs, not that nothing does.
    let still_serving = match chosen {
        None => observed
            .deployment
            .and_then(crate::placement::deployed_device_type),
        Some(_) => None,
    };
    // A kept device keeps the explanation of why it was chosen, so that
    // capacity changing elsewhere rewrites nothing.
    let previous_device = iw.status.as_ref().and_then(|s| s.device.as_ref());
    let previous_selected = iw.status.as_ref().and_then(|s| {
        s.conditions
            .iter()
            .find(|c| c.type_ == condition::DEVICE_SELECTED)
    });
    let carry = match (chosen, previous_device, previous_selected) {
        (Some(c), Some(d), Some(cond)) => {
            cond.status == "True"
                && d.device_type == c.device_type
                && (c.decision == Decision::Kept || cond.reason == selection.reason())
        }
        _ => false,
    };
    let (selected_reason, selected_message) = match (carry, previous_device, previous_selected) {
        (true, Some(d), Some(c)) => (c.reason.clone(), d.reason.clone()),
        _ => (selection.reason().to_string(), selection.message.clone()),
    };
    let device = chosen
        .map(|c| DeviceStatus {
            device_type: c.device_type,
            resource_name: config.resource_name(c.device_type).map(Into::into),
            count: iw.spec.devices_per_replica,
            reason: selected_message.clone(),
        })
        .or_else(|| {
            still_serving.map(|t| DeviceStatus {
                device_type: t,
                resource_name: config.resource_name(t).map(Into::into),
                count: previous_device.map_or(iw.spec.devices_per_replica, |d| d.count),
                reason: format!(
                    "the Deployment made for the previous spec still runs on {t}; the current spec waits: {}",
                    selection.message
                ),
            })
        });

    let phase = if observed
        .deployment_error
        .as_ref()
        .is_some_and(DeploymentError::is_spec_error)
    {
        Phase::Failed
    } else if chosen.is_none() && still_serving.is_none() {
        Phase::Pending
    } else if let Some((failing, _)) = &observed.failing {
        // Its containers fail on the chosen device: no waiting fixes that.
        if ready == 0 || i32::try_from(*failing).unwrap_or(i32::MAX) >= wanted {
            Phase::Failed
        } else {
            Phase::Degraded
        }
    } else if observed.serving_ready.unwrap_or(ready).max(ready) >= wanted
        && observed.deployment.is_some()
    {
        // Running also while a move rolls: the pods it leaves still serve.
        Phase::Running
    } else if ready > 0 {
        Phase::Degraded
    } else {
        Phase::Progressing
    };

    let generation = iw.metadata.generation;
    let previous = iw
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or(&[]);
    let cond = |type_: &str, status: &str, reason: &str, message: String| {
        make_condition(previous, type_, status, reason, message, generation, now)
    };

    let device_selected = match chosen {
        Some(_) => cond(
            condition::DEVICE_SELECTED,
            "True",
            &selected_reason,
            selected_message,
        ),
        None => cond(
            condition::DEVICE_SELECTED,
            "False",
            selection.reason(),
            selection.message.clone(),
        ),
    };
    let compiled = cond(
        condition::COMPILED,
        "Unknown",
        "NotReported",
        "the node agents report compilation per node: kubectl inference cache".into(),
    );
    let available = if let Some(err) = &observed.deployment_error {
        cond(
            condition::AVAILABLE,
            "False",
            if err.is_spec_error() {
                "DeploymentRejected"
            } else {
                "DeploymentForbidden"
            },
            err.advice(),
        )
    } else if chosen.is_none() && still_serving.is_none() {
        cond(
            condition::AVAILABLE,
            "False",
            "NoDevice",
            "no device type chosen yet; see the DeviceSelected condition".into(),
        )
    } else if let Some((n, msg)) = &observed.failing {
        cond(
            condition::AVAILABLE,
            "False",
            "ContainersFailing",
            format!("{ready}/{wanted} replicas ready; {n} pod(s) failing: {msg}"),
        )
    } else if ready >= wanted {
        cond(
            condition::AVAILABLE,
            "True",
            "ReplicasReady",
            format!("{ready}/{wanted} replicas ready"),
        )
    } else if observed.serving_ready.is_some_and(|s| s >= wanted) {
        let serving = observed.serving_ready.unwrap_or(0);
        cond(
            condition::AVAILABLE,
            "True",
            "Moving",
            format!(
                "{ready}/{wanted} replicas ready on {}; {} still serve on the type the workload leaves, until their replacements are ready",
                device
                    .as_ref()
                    .map(|d| d.device_type.to_string())
                    .unwrap_or_default(),
                serving - ready
            ),
        )
    } else if let Some((n, msg)) = &observed.unschedulable {
        cond(
            condition::AVAILABLE,
            "False",
            "Unschedulable",
            format!("{ready}/{wanted} replicas ready; {n} pod(s) cannot be scheduled: {msg}"),
        )
    } else {
        cond(
            condition::AVAILABLE,
            "False",
            "ReplicasNotReady",
            format!("{ready}/{wanted} replicas ready"),
        )
    };

    let mut conditions = vec![device_selected, compiled, available];
    let mut endpoint = None;
    if let Some(url) = crate::serve::endpoint_url(iw) {
        let serving = match &observed.service {
            ServiceState::Failed { reason, message } => {
                cond(condition::SERVING, "False", reason, message.clone())
            }
            ServiceState::Present if ready > 0 => {
                endpoint = Some(url.clone());
                cond(
                    condition::SERVING,
                    "True",
                    "EndpointReady",
                    format!(
                        "{url} serves {}: {ready} ready pod(s) behind Service {}",
                        iw.spec
                            .serve
                            .as_ref()
                            .map(|s| crate::serve::model_name(iw, s))
                            .unwrap_or_default(),
                        iw.name_any()
                    ),
                )
            }
            ServiceState::Present => cond(
                condition::SERVING,
                "False",
                "NoReadyPods",
                format!(
                    "{url} answers once a serving container is ready (GET /ready: the model compiled and loaded); {ready}/{wanted} ready"
                ),
            ),
            ServiceState::Absent => cond(
                condition::SERVING,
                "False",
                "NoService",
                format!("the Service for {url} is not written yet"),
            ),
        };
        conditions.push(serving);
    }

    InferenceWorkloadStatus {
        phase: Some(phase),
        endpoint,
        device,
        replicas,
        ready_replicas: ready,
        ready: Some(format!("{ready}/{wanted}")),
        selector: Some(format!("{}={}", labels::WORKLOAD, iw.name_any())),
        observed_generation: generation,
        placements: observed.placements.clone(),
        conditions,
    }
}

fn make_condition(
    previous: &[Condition],
    type_: &str,
    status: &str,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    // The transition time moves only when the status does.
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or_else(|| now.clone());
    Condition {
        type_: type_.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::capacity::CapacitySnapshot;
    use crate::selection::select_device;

    /// A workload as the apiserver stores it, and the selection for it on
    /// an empty cluster.
    fn workload_and_selection(
        name: &str,
        ns: &str,
        generation: i64,
        spec: serde_json::Value,
        config: &OperatorConfig,
    ) -> (InferenceWorkload, Selection) {
        let iw: InferenceWorkload = serde_json::from_value(serde_json::json!({
            "apiVersion": "rm-abstract.io/v1alpha1", "kind": "InferenceWorkload",
            "metadata": {"name": name, "namespace": ns, "generation": generation},
            "spec": spec
        }))
        .unwrap();
        let capacity = CapacitySnapshot::from_cluster([], [], config);
        let selection = select_device(&iw.spec, config, &capacity, None);
        (iw, selection)
    }

    #[test]
    fn failing_containers_fail_the_workload_and_say_why() {
        let config = OperatorConfig::default();
        let (iw, selection) = workload_and_selection(
            "w",
            "n",
            1,
            serde_json::json!({"model": {"source": "m"}, "device": "cpu", "replicas": 1,
                     "template": {"spec": {"containers": [{"name": "app"}]}}}),
            &config,
        );
        assert!(selection.chosen().is_some());
        let deployment = Deployment::default();
        let now = Time(jiff::Timestamp::now());
        let mut observed = Observed {
            deployment: Some(&deployment),
            failing: Some((
                1,
                "container app, exit code 1: RMUnavailableError: no SDK".into(),
            )),
            ..Default::default()
        };
        let failed = desired_status(&iw, &selection, &observed, &config, &now);
        assert_eq!(failed.phase, Some(Phase::Failed));
        assert_eq!(
            available_of(&failed),
            (
                "ContainersFailing".into(),
                "0/1 replicas ready; 1 pod(s) failing: container app, exit code 1: RMUnavailableError: no SDK".into()
            )
        );

        observed.failing = None;
        let progressing = desired_status(&iw, &selection, &observed, &config, &now);
        assert_eq!(progressing.phase, Some(Phase::Progressing));
        assert_eq!(available_of(&progressing).0, "ReplicasNotReady");
    }

    #[test]
    fn a_served_workload_gets_its_endpoint_once_pods_are_ready() {
        let config = OperatorConfig::default();
        let (iw, selection) = workload_and_selection(
            "chat",
            "ml",
            1,
            serde_json::json!({"model": {"source": "m"}, "device": "cpu", "serve": {}}),
            &config,
        );
        let now = Time(jiff::Timestamp::now());
        let serving = |s: &InferenceWorkloadStatus| {
            let c = s
                .conditions
                .iter()
                .find(|c| c.type_ == condition::SERVING)
                .unwrap();
            (c.status.clone(), c.reason.clone(), c.message.clone())
        };
        let deployment = Deployment::default();
        let mut observed = Observed {
            deployment: Some(&deployment),
            service: ServiceState::Present,
            ..Default::default()
        };
        let waiting = desired_status(&iw, &selection, &observed, &config, &now);
        assert_eq!(waiting.endpoint, None);
        assert_eq!(serving(&waiting).1, "NoReadyPods");
        assert!(serving(&waiting).2.contains("http://chat.ml.svc:8000/v1"));

        let ready_deployment = Deployment {
            status: Some(k8s_openapi::api::apps::v1::DeploymentStatus {
                replicas: Some(1),
                ready_replicas: Some(1),
                ..Default::default()
            }),
            ..Default::default()
        };
        observed.deployment = Some(&ready_deployment);
        let ready = desired_status(&iw, &selection, &observed, &config, &now);
        assert_eq!(
            ready.endpoint.as_deref(),
            Some("http://chat.ml.svc:8000/v1")
        );
        assert_eq!(serving(&ready).0, "True");
        assert_eq!(serving(&ready).1, "EndpointReady");

        observed.service = ServiceState::Failed {
            reason: "ServiceConflict",
            message: "a Service named chat exists".into(),
        };
        let conflict = desired_status(&iw, &selection, &observed, &config, &now);
        assert_eq!(conflict.endpoint, None);
        assert_eq!(serving(&conflict).1, "ServiceConflict");

        let mut unserved = iw.clone();
        unserved.spec.serve = None;
        let plain = desired_status(&unserved, &selection, &observed, &config, &now);
        assert!(
            plain
                .conditions
                .iter()
                .all(|c| c.type_ != condition::SERVING)
        );
        assert_eq!(plain.endpoint, None);
    }

    fn available_of(s: &InferenceWorkloadStatus) -> (String, String) {
        let c = s
            .conditions
            .iter()
            .find(|c| c.type_ == condition::AVAILABLE)
            .unwrap();
        (c.reason.clone(), c.message.clone())
    }

    #[test]
    fn a_spec_waiting_for_capacity_still_reports_the_deployment_that_serves() {
        let config = OperatorConfig {
            cpu_fallback: false,
            ..OperatorConfig::default()
        };
        let (iw, selection) = workload_and_selection(
            "w",
            "n",
            2,
            serde_json::json!({"model": {"source": "m"}, "device": "npu", "replicas": 2,
                     "template": {"spec": {"containers": [{"name": "app"}]}}}),
            &config,
        );
        assert!(selection.chosen().is_none(), "no NPU anywhere");
        // The Deployment made for the previous spec (gpu) runs, 2 ready.
        let serving: Deployment = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "w"},
            "spec": {"selector": {}, "template": {"metadata": {"annotations": {crate::render::DEVICE_TYPE: "gpu"}}}},
            "status": {"replicas": 2, "readyReplicas": 2}
        }))
        .unwrap();
        let observed = Observed {
            deployment: Some(&serving),
            ..Default::default()
        };
        let now = Time(jiff::Timestamp::now());
        let status = desired_status(&iw, &selection, &observed, &config, &now);
        assert_eq!(status.phase, Some(Phase::Running), "it still serves");
        let device = status.device.as_ref().expect("the device it runs on");
        assert_eq!(device.device_type, rm_crds::DeviceType::Gpu);
        assert!(device.reason.contains("previous spec"), "{}", device.reason);
        let selected = status
            .conditions
            .iter()
            .find(|c| c.type_ == condition::DEVICE_SELECTED)
            .unwrap();
        assert_eq!(
            (selected.status.as_str(), selected.reason.as_str()),
            ("False", "NoCapacity")
        );
    }

    #[test]
    fn forbidden_is_not_a_template_error_and_old_type_pods_are_not_ready_ones() {
        let config = OperatorConfig::default();
        let (iw, selection) = workload_and_selection(
            "w",
            "n",
            1,
            serde_json::json!({"model": {"source": "m"}, "device": "cpu", "replicas": 2,
                     "template": {"spec": {"containers": [{"name": "app"}]}}}),
            &config,
        );
        let now = Time(jiff::Timestamp::now());
        let mut observed = Observed {
            deployment_error: Some(DeploymentError {
                code: 403,
                message: "exceeded quota: compute".into(),
            }),
            ..Default::default()
        };
        let status = desired_status(&iw, &selection, &observed, &config, &now);
        assert_ne!(status.phase, Some(Phase::Failed));
        let (reason, message) = available_of(&status);
        assert_eq!(reason, "DeploymentForbidden");
        assert!(
            message.contains("ResourceQuota") && !message.contains("spec.template"),
            "{message}"
        );
        observed.deployment_error = Some(DeploymentError {
            code: 422,
            message: "spec.template.spec.containers[0].image: Required value".into(),
        });
        let status = desired_status(&iw, &selection, &observed, &config, &now);
        assert_eq!(status.phase, Some(Phase::Failed));
        assert!(available_of(&status).1.contains("fix spec.template"));

        // Right after a move the Deployment counts 2 ready (old pods); only
        // 1 pod of the new type is.
        let moving = Deployment {
            status: Some(k8s_openapi::api::apps::v1::DeploymentStatus {
                replicas: Some(3),
                ready_replicas: Some(2),
                ..Default::default()
            }),
            ..Default::default()
        };
        let observed = Observed {
            deployment: Some(&moving),
            ready_pods: Some(1),
            ..Default::default()
        };
        let status = desired_status(&iw, &selection, &observed, &config, &now);
        assert_eq!(status.ready_replicas, 1);
        assert_eq!(status.phase, Some(Phase::Degraded));
    }
}
