//! The Deployment of a workload: the user's pod template, unchanged except
//! for the device request of the inference container, the labels that tie
//! the pods to the workload and trigger injection, and `RM_DEVICE`.
//!
//! With `spec.serve` the serving container (`serve.rs`) is added to the
//! template, or makes up the whole pod when there is no template, and it is
//! the inference container: it gets the device request and `RM_DEVICE`, so
//! the webhook injects it and the device plugin gives it the agent socket
//! and token. The template's own containers keep their resources; they reach
//! the model through the serving container's API (e.g. `localhost:8000`).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{
    Deployment, DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment,
};
use k8s_openapi::api::core::v1::{
    Container, EnvVar, PodSpec, PodTemplateSpec, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::Resource;
use kube::ResourceExt;
use rm_crds::InferenceWorkload;
use rm_crds::labels;
use rm_crds::workload::SERVE_CONTAINER;
use sha2::{Digest, Sha256};

use crate::config::OperatorConfig;
use crate::selection::{Chosen, selection_basis};
use crate::webhook::inject::CONTAINER_NAMES;

/// Annotation on the Deployment: the spec fields its device was chosen for.
pub const SELECTION_BASIS: &str = "rm-abstract.io/selection-basis";
/// Annotation on the Deployment: hash of everything the operator wrote, so a
/// steady-state reconcile can tell that there is nothing to write.
pub const RENDER_HASH: &str = "rm-abstract.io/render-hash";
/// Annotation on the pod template: the device type chosen.
pub const DEVICE_TYPE: &str = "rm-abstract.io/device-type";

#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("spec.containerName {0:?} is not a container of spec.template")]
    NoSuchContainer(String),
    #[error("spec.template has no containers")]
    NoContainers,
    #[error("the workload has no {0}; it must come from the apiserver")]
    MissingMetadata(&'static str),
    #[error("the workload has neither spec.template nor spec.serve; give one of them")]
    NothingToRun,
    #[error("spec.template already has a volume named {0:?}, which spec.serve adds; rename it")]
    VolumeTaken(String),
}

/// Name of the inference container (the one holding the device): the
/// serving container when served, else `containerName`, else the first.
pub fn inference_container_name(iw: &InferenceWorkload) -> Option<String> {
    if iw.spec.serve.is_some() {
        return Some(SERVE_CONTAINER.to_string());
    }
    iw.spec.container_name.clone().or_else(|| {
        iw.spec
            .template
            .as_ref()?
            .spec
            .as_ref()
            .and_then(|s| s.containers.first())
            .map(|c| c.name.clone())
    })
}

/// `spec.compile` as the JSON object that pods get as `RM_COMPILE_OPTIONS`:
/// the operator writes it in the pod annotation the webhook reads for
/// template containers, and directly into the serving container's env.
pub fn compile_options_json(iw: &InferenceWorkload) -> Option<String> {
    // Serialising plain option structs cannot fail.
    iw.spec
        .compile
        .as_ref()
        .map(|c| serde_json::to_string(c).unwrap_or_default())
}

/// The pod template: the user's, with the serving container added when
/// served; or, served without a template, a pod of the serving container
/// alone that Pod Security `restricted` admits.
fn pod_template(
    iw: &InferenceWorkload,
    config: &OperatorConfig,
) -> Result<PodTemplateSpec, RenderError> {
    let Some(serve) = &iw.spec.serve else {
        return iw.spec.template.clone().ok_or(RenderError::NothingToRun);
    };
    let mut template = iw.spec.template.clone().unwrap_or_else(|| PodTemplateSpec {
        metadata: None,
        spec: Some(PodSpec {
            security_context: Some(crate::serve::restricted_pod()),
            // The server talks to the node agent, never to the apiserver.
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            ..Default::default()
        }),
    });
    let spec = template.spec.get_or_insert_with(PodSpec::default);
    let volumes = spec.volumes.get_or_insert_with(Vec::new);
    for v in crate::serve::serve_volumes(iw) {
        if volumes.iter().any(|u| u.name == v.name) {
            return Err(RenderError::VolumeTaken(v.name));
        }
        volumes.push(v);
    }
    let compile = compile_options_json(iw);
    spec.containers.push(crate::serve::serve_container(
        iw,
        serve,
        &config.serve,
        compile.as_deref(),
    ));
    Ok(template)
}

/// The name of the Deployment holding a workload's replicas on one type:
/// the workload's own name with `placement: single`; with `spread`, one per
/// type, named `<workload>-<type>`.
pub fn deployment_name(workload: &str, spread_type: Option<rm_crds::DeviceType>) -> String {
    match spread_type {
        Some(t) => format!("{workload}-{t}"),
        None => workload.to_string(),
    }
}

/// Every Deployment name a workload may own, in either placement.
pub fn deployment_names(workload: &str) -> impl Iterator<Item = String> + '_ {
    std::iter::once(None)
        .chain(rm_crds::DeviceType::ALL.into_iter().map(Some))
        .map(move |t| deployment_name(workload, t))
}

/// The whole workload's Deployment (`placement: single`).
pub fn render_deployment(
    iw: &InferenceWorkload,
    chosen: &Chosen,
    config: &OperatorConfig,
) -> Result<Deployment, RenderError> {
    render_part(iw, chosen, iw.spec.replicas, false, false, config)
}

/// The Deployment of `replicas` on the chosen type. With `spread` it is one
/// of several: named after its type, selecting (and labelling) only its
/// type's pods, so that the workload's Deployments never share a pod.
/// `surge`: roll with one extra replica and none unavailable (a move up to
/// another type, where the extra replica has its own device).
pub fn render_part(
    iw: &InferenceWorkload,
    chosen: &Chosen,
    replicas: i32,
    spread: bool,
    surge: bool,
    config: &OperatorConfig,
) -> Result<Deployment, RenderError> {
    let workload = iw
        .metadata
        .name
        .clone()
        .ok_or(RenderError::MissingMetadata("name"))?;
    let name = deployment_name(&workload, spread.then_some(chosen.device_type));
    let owner = iw
        .controller_owner_ref(&())
        .ok_or(RenderError::MissingMetadata("uid"))?;
    let mut selector: BTreeMap<String, String> =
        [(labels::WORKLOAD.to_string(), workload.clone())].into();
    if spread {
        selector.insert(labels::DEVICE_TYPE.into(), chosen.device_type.to_string());
    }

    let mut template = pod_template(iw, config)?;
    let meta = template.metadata.get_or_insert_with(ObjectMeta::default);
    let pod_labels = meta.labels.get_or_insert_with(BTreeMap::new);
    pod_labels.extend(selector.clone());
    pod_labels.insert(labels::INJECT.into(), "true".into());
    let pod_annotations = meta.annotations.get_or_insert_with(BTreeMap::new);
    pod_annotations.insert(DEVICE_TYPE.into(), chosen.device_type.to_string());
    if let Some(json) = compile_options_json(iw) {
        pod_annotations.insert(labels::COMPILE_OPTIONS.into(), json);
    }

    if iw.spec.serve.is_some() {
        // The webhook's target is named, not guessed from RM_DEVICE (which a
        // template container may set too): the serving container, besides
        // any the user listed.
        let names = pod_annotations
            .entry(CONTAINER_NAMES.to_string())
            .or_default();
        if !names.split(',').any(|n| n.trim() == SERVE_CONTAINER) {
            if !names.trim().is_empty() {
                names.push(',');
            }
            names.push_str(SERVE_CONTAINER);
        }
    }

    let pod_spec = template.spec.as_mut().ok_or(RenderError::NoContainers)?;
    let target = inference_container_name(iw).ok_or(RenderError::NoContainers)?;
    let container = pod_spec
        .containers
        .iter_mut()
        .find(|c| c.name == target)
        .ok_or_else(|| RenderError::NoSuchContainer(target.clone()))?;
    let resource = config.resource_name(chosen.device_type);
    if let Some(resource) = resource {
        request_devices(container, resource, iw.spec.devices_per_replica);
    }
    set_env(container, "RM_DEVICE", &chosen.device_string);

    let mut deployment = Deployment {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            namespace: iw.namespace(),
            labels: Some(selector.clone()),
            owner_references: Some(vec![owner]),
            annotations: Some([(SELECTION_BASIS.to_string(), selection_basis(&iw.spec))].into()),
            ..Default::default()
        },
        spec: DeploymentSpec {
            replicas: Some(replicas),
            selector: LabelSelector {
                match_labels: Some(selector),
                ..Default::default()
            },
            // Devices are scarce: replace pods one at a time instead of
            // surging, which would need spare devices; except when moving
            // up, where the new pods take the other type's devices.
            strategy: resource.map(|_| DeploymentStrategy {
                type_: Some("RollingUpdate".into()),
                rolling_update: Some(RollingUpdateDeployment {
                    max_surge: Some(IntOrString::Int(i32::from(surge))),
                    max_unavailable: Some(IntOrString::Int(i32::from(!surge))),
                }),
            }),
            template,
            ..Default::default()
        },
        status: None,
    };
    let hash = render_hash(&deployment);
    deployment
        .annotations_mut()
        .insert(RENDER_HASH.into(), hash);
    Ok(deployment)
}

/// Requests and limits of the device resource on the inference container;
/// other resources stay as the user wrote them.
fn request_devices(container: &mut Container, resource: &str, count: u32) {
    let res = container
        .resources
        .get_or_insert_with(ResourceRequirements::default);
    let qty = Quantity(count.to_string());
    res.limits
        .get_or_insert_with(BTreeMap::new)
        .insert(resource.into(), qty.clone());
    res.requests
        .get_or_insert_with(BTreeMap::new)
        .insert(resource.into(), qty);
}

/// The value of a container's env var (tests of rendered pods).
#[cfg(test)]
pub(crate) fn env_value<'a>(c: &'a Container, name: &str) -> Option<&'a str> {
    c.env
        .iter()
        .flatten()
        .find(|e| e.name == name)
        .and_then(|e| e.value.as_deref())
}

fn set_env(container: &mut Container, name: &str, value: &str) {
    let env = container.env.get_or_insert_with(Vec::new);
    env.retain(|e| e.name != name);
    env.push(EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    });
}

/// Hash of the rendered object (before the hash annotation is added).
fn render_hash(d: &Deployment) -> String {
    // Serialising k8s-openapi types cannot fail (string keys, no floats).
    let bytes = serde_json::to_vec(d).unwrap_or_default();
    let digest = Sha256::digest(&bytes);
    digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// Whether `existing` already is what `desired` would write.
pub fn is_current(existing: &Deployment, desired: &Deployment) -> bool {
    let hash = |d: &Deployment| {
        d.metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(RENDER_HASH))
            .cloned()
    };
    hash(existing).is_some() && hash(existing) == hash(desired)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::selection::Decision;
    use rm_crds::DeviceType;

    fn workload(container_name: Option<&str>) -> InferenceWorkload {
        let mut iw: InferenceWorkload = serde_json::from_value(serde_json::json!({
            "apiVersion": "rm-abstract.io/v1alpha1", "kind": "InferenceWorkload",
            "metadata": {"name": "w", "namespace": "ns", "uid": "u-1"},
            "spec": {
                "model": {"source": "gpt2"},
                "devicesPerReplica": 2,
                "replicas": 3,
                "template": {
                    "metadata": {"labels": {"app": "mine"}},
                    "spec": {"containers": [
                        {"name": "side", "image": "busybox"},
                        {"name": "llm", "image": "python", "env": [{"name": "RM_DEVICE", "value": "cpu"}, {"name": "A", "value": "1"}],
                         "resources": {"limits": {"memory": "1Gi"}}}
                    ]}
                }
            }
        }))
        .unwrap();
        iw.spec.container_name = container_name.map(Into::into);
        iw
    }

    fn rbln() -> Chosen {
        Chosen {
            device_type: DeviceType::Rbln,
            decision: Decision::Full,
            device_string: "rbln".into(),
        }
    }

    #[test]
    fn the_inference_container_gets_the_devices_and_rm_device() {
        let d =
            render_deployment(&workload(Some("llm")), &rbln(), &OperatorConfig::default()).unwrap();
        let spec = d.spec;
        assert_eq!(spec.replicas, Some(3));
        let pod = spec.template.spec.unwrap();
        let llm = &pod.containers[1];
        let res = llm.resources.as_ref().unwrap();
        assert_eq!(res.limits.as_ref().unwrap()["rebellions.ai/ATOM"].0, "2");
        assert_eq!(res.requests.as_ref().unwrap()["rebellions.ai/ATOM"].0, "2");
        assert_eq!(
            res.limits.as_ref().unwrap()["memory"].0,
            "1Gi",
            "user resources kept"
        );
        let env = llm.env.as_ref().unwrap();
        assert_eq!(env.iter().filter(|e| e.name == "RM_DEVICE").count(), 1);
        assert!(
            env.iter()
                .any(|e| e.name == "RM_DEVICE" && e.value.as_deref() == Some("rbln"))
        );
        assert!(env.iter().any(|e| e.name == "A"), "user env kept");
        assert!(
            pod.containers[0].resources.is_none(),
            "other containers untouched"
        );
        let meta = spec.template.metadata.unwrap();
        assert!(
            !meta
                .annotations
                .unwrap()
                .contains_key(labels::COMPILE_OPTIONS)
        );
        let labels = meta.labels.unwrap();
        assert_eq!(labels["app"], "mine");
        assert_eq!(labels[labels::WORKLOAD], "w");
        assert_eq!(labels[labels::INJECT], "true");
        assert_eq!(d.metadata.owner_references.unwrap()[0].uid, "u-1");
    }

    #[test]
    fn the_first_container_is_the_default_and_cpu_requests_nothing() {
        let cpu = Chosen {
            device_type: DeviceType::Cpu,
            decision: Decision::CpuFallback,
            device_string: "cpu".into(),
        };
        let d = render_deployment(&workload(None), &cpu, &OperatorConfig::default()).unwrap();
        let spec = d.spec;
        assert!(spec.strategy.is_none());
        let side = &spec.template.spec.unwrap().containers[0];
        assert!(side.resources.is_none());
        assert_eq!(side.env.as_ref().unwrap()[0].value.as_deref(), Some("cpu"));
    }

    #[test]
    fn rendering_is_deterministic_and_tracks_changes() {
        let config = OperatorConfig::default();
        let a = render_deployment(&workload(Some("llm")), &rbln(), &config).unwrap();
        let b = render_deployment(&workload(Some("llm")), &rbln(), &config).unwrap();
        assert!(is_current(&a, &b));
        let mut scaled = workload(Some("llm"));
        scaled.spec.replicas = 4;
        let c = render_deployment(&scaled, &rbln(), &config).unwrap();
        assert!(!is_current(&a, &c));
    }

    #[test]
    fn compile_options_reach_the_pods_as_an_annotation() {
        let mut iw = workload(Some("llm"));
        iw.spec.compile = Some(
            serde_json::from_value(serde_json::json!({"precision": "q8_0", "maxSeqLen": 2048}))
                .unwrap(),
        );
        let d = render_deployment(&iw, &rbln(), &OperatorConfig::default()).unwrap();
        let ann = d.spec.template.metadata.unwrap().annotations.unwrap();
        let opts: serde_json::Value = serde_json::from_str(&ann[labels::COMPILE_OPTIONS]).unwrap();
        assert_eq!(
            opts,
            serde_json::json!({"precision": "q8_0", "maxSeqLen": 2048})
        );
    }

    fn served(template: Option<serde_json::Value>) -> InferenceWorkload {
        let mut spec = serde_json::json!({
            "model": {"source": "pvc://weights/smollm2"},
            "serve": {},
            "compile": {"precision": "bf16"}
        });
        if let Some(t) = template {
            spec["template"] = t;
        }
        serde_json::from_value(serde_json::json!({
            "apiVersion": "rm-abstract.io/v1alpha1", "kind": "InferenceWorkload",
            "metadata": {"name": "chat", "namespace": "ns", "uid": "u-1"},
            "spec": spec
        }))
        .unwrap()
    }

    #[test]
    fn served_without_a_template_the_pod_is_the_serving_container_alone() {
        let d = render_deployment(&served(None), &rbln(), &OperatorConfig::default()).unwrap();
        let meta = d.spec.template.metadata.unwrap();
        let annotations = meta.annotations.unwrap();
        assert_eq!(annotations[CONTAINER_NAMES], "rm-serve");
        assert_eq!(
            annotations[labels::COMPILE_OPTIONS],
            r#"{"precision":"bf16"}"#
        );
        assert_eq!(meta.labels.unwrap()[labels::INJECT], "true");
        let pod = d.spec.template.spec.unwrap();
        assert_eq!(pod.containers.len(), 1);
        let c = &pod.containers[0];
        assert_eq!(c.name, "rm-serve");
        let res = c.resources.as_ref().unwrap();
        assert_eq!(res.limits.as_ref().unwrap()["rebellions.ai/ATOM"].0, "1");
        assert_eq!(res.requests.as_ref().unwrap()["rebellions.ai/ATOM"].0, "1");
        assert_eq!(env_value(c, "RM_DEVICE"), Some("rbln"));
        // The same JSON as the annotation the webhook turns into the env.
        assert_eq!(
            env_value(c, "RM_COMPILE_OPTIONS"),
            Some(annotations[labels::COMPILE_OPTIONS].as_str())
        );
        assert_eq!(
            env_value(c, "RM_SERVE_MODEL_SOURCE"),
            Some("/rm-serve/model/smollm2")
        );
        let claim = pod
            .volumes
            .iter()
            .flatten()
            .find_map(|v| v.persistent_volume_claim.as_ref())
            .unwrap();
        assert_eq!(claim.claim_name, "weights");
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(pod.automount_service_account_token, Some(false));
    }

    #[test]
    fn served_with_a_template_the_serving_container_takes_the_device() {
        let template = serde_json::json!({
            "metadata": {"annotations": {CONTAINER_NAMES: "app"}},
            "spec": {"containers": [{"name": "app", "image": "python",
                                     "env": [{"name": "RM_DEVICE", "value": "cpu"}]}],
                     "volumes": [{"name": "data", "emptyDir": {}}]}
        });
        let d = render_deployment(
            &served(Some(template.clone())),
            &rbln(),
            &OperatorConfig::default(),
        )
        .unwrap();
        let annotations = d.spec.template.metadata.unwrap().annotations.unwrap();
        assert_eq!(
            annotations[CONTAINER_NAMES], "app,rm-serve",
            "the user's list kept"
        );
        let pod = d.spec.template.spec.unwrap();
        let names: Vec<&str> = pod.containers.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, ["app", "rm-serve"]);
        assert!(
            pod.containers[0].resources.is_none(),
            "the device is the server's"
        );
        assert_eq!(
            env_value(&pod.containers[0], "RM_DEVICE"),
            Some("cpu"),
            "user env kept"
        );
        assert_eq!(env_value(&pod.containers[1], "RM_DEVICE"), Some("rbln"));
        let volumes: Vec<&str> = pod
            .volumes
            .iter()
            .flatten()
            .map(|v| v.name.as_str())
            .collect();
        assert_eq!(volumes, ["data", "rm-serve-tmp", "rm-serve-model"]);
        assert!(
            pod.security_context.is_none(),
            "the user's pod settings stay"
        );

        let mut clash = template;
        clash["spec"]["volumes"][0]["name"] = "rm-serve-tmp".into();
        let err = render_deployment(&served(Some(clash)), &rbln(), &OperatorConfig::default())
            .unwrap_err();
        assert!(matches!(err, RenderError::VolumeTaken(_)), "{err}");
    }

    #[test]
    fn a_template_without_containers_gives_the_serving_pod_its_settings() {
        let template = serde_json::json!({"spec": {
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}]
        }});
        let d = render_deployment(&served(Some(template)), &rbln(), &OperatorConfig::default())
            .unwrap();
        let pod = d.spec.template.spec.unwrap();
        assert_eq!(pod.node_selector.unwrap()["pool"], "gpu");
        assert_eq!(pod.tolerations.unwrap().len(), 1);
        assert_eq!(pod.containers.len(), 1);
        assert_eq!(pod.containers[0].name, "rm-serve");
        assert_eq!(env_value(&pod.containers[0], "RM_DEVICE"), Some("rbln"));
    }

    #[test]
    fn neither_template_nor_serve_is_an_error() {
        let mut iw = served(None);
        iw.spec.serve = None;
        let err = render_deployment(&iw, &rbln(), &OperatorConfig::default()).unwrap_err();
        assert!(matches!(err, RenderError::NothingToRun), "{err}");
    }

    #[test]
    fn a_missing_container_is_an_error() {
        let err = render_deployment(&workload(Some("nope")), &rbln(), &OperatorConfig::default())
            .unwrap_err();
        assert!(err.to_string().contains("\"nope\""));
    }
}
