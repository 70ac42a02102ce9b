//! Serving a workload (`spec.serve`): the serving container the operator
//! adds to the pod (rm-abstract's OpenAI-compatible server, which holds the
//! device and talks to the node agent like any injected container), and the
//! ClusterIP Service in front of the pods. Pure functions; the controller
//! applies what they return.
//!
//! The serving container's contract (env, port, probes) is fixed here:
//! - `RM_SERVE_MODEL_SOURCE`: `spec.model.source`, except `pvc://CLAIM/PATH`,
//!   which becomes the directory the claim is mounted at (read-only) plus PATH;
//! - `RM_SERVE_MODEL_REVISION`: `spec.model.revision`, when set;
//! - `RM_SERVE_MODEL_NAME`: the model id in the API (`serve.modelName`, else
//!   the workload's name);
//! - `RM_SERVE_PORT`: the port to listen on (container port `http`);
//! - `RM_WORKLOAD_NAME`: the workload's name;
//! - `RM_COMPILE_OPTIONS`: `spec.compile` as JSON, the value the webhook
//!   passes to template containers (`render::compile_options_json`);
//! - `RM_DEVICE` (set by `render`), and from the webhook and the device
//!   plugin, as for any workload container: `RM_AGENT_SOCKET`,
//!   `RM_AGENT_TOKEN`, `RM_CACHE_DIR`, `PYTHONPATH` with the init package;
//! - `GET /ready` answers 200 once the model is compiled and loaded (the
//!   readiness gate of the Service), `GET /health` while the process works.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EmptyDirVolumeSource, EnvVar, HTTPGetAction,
    PersistentVolumeClaimVolumeSource, PodSecurityContext, Probe, SeccompProfile, SecurityContext,
    Service, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use kube::{Resource, ResourceExt};
use rm_crds::workload::SERVE_CONTAINER;
use rm_crds::{InferenceWorkload, ServeSpec, labels};
use sha2::{Digest, Sha256};

use crate::config::ServeSettings;

/// Name of the container port and of the Service port.
pub const PORT_NAME: &str = "http";
/// Volume of the serving container's `/tmp` (its root filesystem is read-only).
pub const TMP_VOLUME: &str = "rm-serve-tmp";
/// Volume of a `pvc://` model source.
pub const MODEL_VOLUME: &str = "rm-serve-model";
/// Where a `pvc://` claim is mounted in the serving container.
pub const MODEL_MOUNT: &str = "/rm-serve/model";
/// The uid the serving container runs as (the distroless `nonroot`, as the
/// init container): numeric, so that `runAsNonRoot` can be verified.
pub const SERVE_UID: i64 = 65532;
/// Annotation on the Service: hash of what the operator wrote.
pub const RENDER_HASH: &str = crate::render::RENDER_HASH;

/// The model source as the serving container sees it, and the claim to
/// mount for a `pvc://` source.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServedModel {
    pub source: String,
    pub claim: Option<String>,
}

/// `pvc://CLAIM/PATH` → the mounted directory; anything else unchanged (hub
/// ids are downloaded by the agent, `file://` paths are the node's).
pub fn served_model(source: &str) -> ServedModel {
    match source.strip_prefix("pvc://") {
        Some(rest) => {
            let (claim, path) = rest.split_once('/').unwrap_or((rest, ""));
            let path = path.trim_matches('/');
            ServedModel {
                source: if path.is_empty() {
                    MODEL_MOUNT.to_string()
                } else {
                    format!("{MODEL_MOUNT}/{path}")
                },
                claim: Some(claim.to_string()),
            }
        }
        None => ServedModel {
            source: source.to_string(),
            claim: None,
        },
    }
}

/// The model's id in the API.
pub fn model_name(iw: &InferenceWorkload, serve: &ServeSpec) -> String {
    serve.model_name.clone().unwrap_or_else(|| iw.name_any())
}

/// The serving container, without the device request and `RM_DEVICE`
/// (added by `render` as for a template's inference container).
pub fn serve_container(
    iw: &InferenceWorkload,
    serve: &ServeSpec,
    settings: &ServeSettings,
    compile_options: Option<&str>,
) -> Container {
    let model = served_model(&iw.spec.model.source);
    let port = serve.port;
    let mut env = vec![
        plain_env("RM_SERVE_MODEL_SOURCE", &model.source),
        plain_env("RM_SERVE_MODEL_NAME", &model_name(iw, serve)),
        plain_env("RM_SERVE_PORT", &port.to_string()),
        plain_env("RM_WORKLOAD_NAME", &iw.name_any()),
    ];
    if let Some(rev) = &iw.spec.model.revision {
        env.push(plain_env("RM_SERVE_MODEL_REVISION", rev));
    }
    if let Some(opts) = compile_options {
        env.push(plain_env("RM_COMPILE_OPTIONS", opts));
    }
    let mut mounts = vec![VolumeMount {
        name: TMP_VOLUME.into(),
        mount_path: "/tmp".into(),
        ..Default::default()
    }];
    if model.claim.is_some() {
        mounts.push(VolumeMount {
            name: MODEL_VOLUME.into(),
            mount_path: MODEL_MOUNT.into(),
            read_only: Some(true),
            ..Default::default()
        });
    }
    let http_get = |path: &str| HTTPGetAction {
        path: Some(path.into()),
        port: IntOrString::String(PORT_NAME.into()),
        ..Default::default()
    };
    Container {
        name: SERVE_CONTAINER.into(),
        image: Some(settings.image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        env: Some(env),
        ports: Some(vec![ContainerPort {
            name: Some(PORT_NAME.into()),
            container_port: port,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        resources: serve.resources.clone(),
        // Readiness is the gate: the Service sends requests only to pods
        // whose model is compiled and loaded.
        readiness_probe: Some(Probe {
            http_get: Some(http_get("/ready")),
            period_seconds: Some(5),
            timeout_seconds: Some(3),
            failure_threshold: Some(3),
            ..Default::default()
        }),
        // Liveness only catches a hung server: a first compile can take many
        // minutes, so the delay and the threshold are generous (restarting
        // would start the compile over).
        liveness_probe: Some(Probe {
            http_get: Some(http_get("/health")),
            initial_delay_seconds: Some(30),
            period_seconds: Some(20),
            timeout_seconds: Some(5),
            failure_threshold: Some(15),
            ..Default::default()
        }),
        security_context: Some(restricted_container()),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        volume_mounts: Some(mounts),
        ..Default::default()
    }
}

/// What Pod Security `restricted` asks of a container, set on the container
/// itself so that it holds in a user's template too.
fn restricted_container() -> SecurityContext {
    SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: None,
        }),
        run_as_non_root: Some(true),
        run_as_user: Some(SERVE_UID),
        run_as_group: Some(SERVE_UID),
        read_only_root_filesystem: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// The pod-level part of `restricted`, for pods the operator renders alone.
pub fn restricted_pod() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            localhost_profile: None,
        }),
        ..Default::default()
    }
}

/// Volumes the serving container mounts.
pub fn serve_volumes(iw: &InferenceWorkload) -> Vec<Volume> {
    let mut volumes = vec![Volume {
        name: TMP_VOLUME.into(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity("1Gi".into())),
            ..Default::default()
        }),
        ..Default::default()
    }];
    if let Some(claim) = served_model(&iw.spec.model.source).claim {
        volumes.push(Volume {
            name: MODEL_VOLUME.into(),
            persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
                claim_name: claim,
                read_only: Some(true),
            }),
            ..Default::default()
        });
    }
    volumes
}

/// The URL of the API of a served workload: its Service's cluster DNS name.
pub fn endpoint_url(iw: &InferenceWorkload) -> Option<String> {
    let serve = iw.spec.serve.as_ref()?;
    Some(format!(
        "http://{}.{}.svc:{}/v1",
        iw.name_any(),
        iw.namespace()?,
        serve.port
    ))
}

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("the workload has no {0}; it must come from the apiserver")]
    MissingMetadata(&'static str),
}

/// The Service of a served workload (`None` when not served): ClusterIP,
/// named after the workload, selecting its pods, port `http`.
pub fn render_service(iw: &InferenceWorkload) -> Result<Option<Service>, ServiceError> {
    let Some(serve) = iw.spec.serve.as_ref() else {
        return Ok(None);
    };
    let name = iw
        .metadata
        .name
        .clone()
        .ok_or(ServiceError::MissingMetadata("name"))?;
    let owner = iw
        .controller_owner_ref(&())
        .ok_or(ServiceError::MissingMetadata("uid"))?;
    let selector: BTreeMap<String, String> = [(labels::WORKLOAD.to_string(), name.clone())].into();
    let mut service = Service {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: iw.namespace(),
            labels: Some(selector.clone()),
            owner_references: Some(vec![owner]),
            ..Default::default()
        },
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector),
            ports: Some(vec![ServicePort {
                name: Some(PORT_NAME.into()),
                port: serve.port,
                target_port: Some(IntOrString::String(PORT_NAME.into())),
                protocol: Some("TCP".into()),
                ..Default::default()
            }]),
            ..Default::default()
        }),
        status: None,
    };
    // Serialising k8s-openapi types cannot fail (string keys, no floats).
    let bytes = serde_json::to_vec(&service).unwrap_or_default();
    let hash: String = Sha256::digest(&bytes)
        .iter()
        .take(12)
        .map(|b| format!("{b:02x}"))
        .collect();
    service.annotations_mut().insert(RENDER_HASH.into(), hash);
    Ok(Some(service))
}

/// Whether `existing` already is what `desired` would write.
pub fn service_is_current(existing: &Service, desired: &Service) -> bool {
    let hash = |s: &Service| s.annotations().get(RENDER_HASH).cloned();
    hash(existing).is_some() && hash(existing) == hash(desired)
}

/// Whether the workload controls the object (its controller owner reference,
/// by uid): a Service of the same name that is someone else's is never
/// taken over or deleted.
pub fn is_controlled_by(meta: &ObjectMeta, iw: &InferenceWorkload) -> bool {
    let Some(uid) = iw.metadata.uid.as_deref() else {
        return false;
    };
    meta.owner_references
        .iter()
        .flatten()
        .any(|o| o.controller == Some(true) && o.uid == uid)
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::render::env_value;

    fn served(source: &str, serve: serde_json::Value) -> InferenceWorkload {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "rm-abstract.io/v1alpha1", "kind": "InferenceWorkload",
            "metadata": {"name": "chat", "namespace": "ml", "uid": "u-1"},
            "spec": {"model": {"source": source}, "serve": serve}
        }))
        .unwrap()
    }

    #[test]
    fn pvc_sources_become_the_mounted_directory() {
        assert_eq!(
            served_model("pvc://models/llama/7b/"),
            ServedModel {
                source: "/rm-serve/model/llama/7b".into(),
                claim: Some("models".into())
            }
        );
        assert_eq!(served_model("pvc://models").source, MODEL_MOUNT);
        assert_eq!(served_model("pvc://models/").source, MODEL_MOUNT);
        let hub = served_model("HuggingFaceTB/SmolLM2-135M-Instruct");
        assert_eq!(hub.source, "HuggingFaceTB/SmolLM2-135M-Instruct");
        assert!(hub.claim.is_none());
        assert_eq!(served_model("file:///m").source, "file:///m");
    }

    #[test]
    fn the_serving_container_has_the_env_port_probes_and_a_restricted_context() {
        let iw = served("org/m", serde_json::json!({}));
        let serve = iw.spec.serve.clone().unwrap();
        let c = serve_container(
            &iw,
            &serve,
            &ServeSettings::default(),
            Some(r#"{"precision":"bf16"}"#),
        );
        assert_eq!(c.name, "rm-serve");
        assert_eq!(c.image.as_deref(), Some("ghcr.io/rm-abstract/serve:latest"));
        assert_eq!(env_value(&c, "RM_SERVE_MODEL_SOURCE"), Some("org/m"));
        assert_eq!(env_value(&c, "RM_SERVE_MODEL_NAME"), Some("chat"));
        assert_eq!(env_value(&c, "RM_SERVE_PORT"), Some("8000"));
        assert_eq!(env_value(&c, "RM_WORKLOAD_NAME"), Some("chat"));
        assert_eq!(
            env_value(&c, "RM_COMPILE_OPTIONS"),
            Some(r#"{"precision":"bf16"}"#)
        );
        assert_eq!(env_value(&c, "RM_SERVE_MODEL_REVISION"), None);
        let port = &c.ports.as_ref().unwrap()[0];
        assert_eq!(
            (port.name.as_deref(), port.container_port),
            (Some("http"), 8000)
        );
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/ready"));
        assert_eq!(ready.port, IntOrString::String("http".into()));
        let live = c.liveness_probe.as_ref().unwrap();
        assert_eq!(
            live.http_get.as_ref().unwrap().path.as_deref(),
            Some("/health")
        );
        let patience = live.initial_delay_seconds.unwrap()
            + live.period_seconds.unwrap() * live.failure_threshold.unwrap();
        assert!(
            patience >= 300,
            "a hung server only after minutes: {patience}s"
        );
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_deref(),
            Some(&["ALL".to_string()][..])
        );
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        assert_eq!(serve_volumes(&iw).len(), 1, "only /tmp");
    }

    #[test]
    fn model_name_port_and_resources_come_from_serve() {
        let iw = served(
            "pvc://weights/smollm2",
            serde_json::json!({"port": 9000, "modelName": "smol",
                               "resources": {"limits": {"memory": "2Gi"}}}),
        );
        let serve = iw.spec.serve.clone().unwrap();
        let c = serve_container(&iw, &serve, &ServeSettings::default(), None);
        assert_eq!(env_value(&c, "RM_SERVE_MODEL_NAME"), Some("smol"));
        assert_eq!(env_value(&c, "RM_SERVE_PORT"), Some("9000"));
        assert_eq!(
            env_value(&c, "RM_SERVE_MODEL_SOURCE"),
            Some("/rm-serve/model/smollm2")
        );
        assert_eq!(env_value(&c, "RM_COMPILE_OPTIONS"), None);
        assert_eq!(
            c.resources.as_ref().unwrap().limits.as_ref().unwrap()["memory"].0,
            "2Gi"
        );
        let mount = c
            .volume_mounts
            .iter()
            .flatten()
            .find(|m| m.name == MODEL_VOLUME)
            .unwrap();
        assert_eq!(
            (mount.mount_path.as_str(), mount.read_only),
            (MODEL_MOUNT, Some(true))
        );
        let claim = serve_volumes(&iw)
            .into_iter()
            .find_map(|v| v.persistent_volume_claim)
            .unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("weights", Some(true))
        );
        assert_eq!(
            endpoint_url(&iw).as_deref(),
            Some("http://chat.ml.svc:9000/v1")
        );
    }

    #[test]
    fn the_service_selects_the_workloads_pods_on_port_http() {
        let iw = served("org/m", serde_json::json!({}));
        let svc = render_service(&iw).unwrap().unwrap();
        assert_eq!(svc.metadata.name.as_deref(), Some("chat"));
        assert_eq!(
            svc.metadata.owner_references.as_ref().unwrap()[0].uid,
            "u-1"
        );
        assert!(is_controlled_by(&svc.metadata, &iw));
        let spec = svc.spec.as_ref().unwrap();
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.selector.as_ref().unwrap()[labels::WORKLOAD], "chat");
        let port = &spec.ports.as_ref().unwrap()[0];
        assert_eq!((port.name.as_deref(), port.port), (Some("http"), 8000));
        assert_eq!(port.target_port, Some(IntOrString::String("http".into())));
        assert!(service_is_current(
            &svc,
            &render_service(&iw).unwrap().unwrap()
        ));

        let mut moved = iw.clone();
        moved.spec.serve.as_mut().unwrap().port = 8080;
        assert!(!service_is_current(
            &svc,
            &render_service(&moved).unwrap().unwrap()
        ));

        let mut unserved = iw.clone();
        unserved.spec.serve = None;
        assert!(render_service(&unserved).unwrap().is_none());
        assert!(endpoint_url(&unserved).is_none());

        let mut other = iw;
        other.metadata.uid = Some("u-2".into());
        assert!(!is_controlled_by(&svc.metadata, &other), "someone else's");
    }
}
