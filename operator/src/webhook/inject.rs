//! The pod patch: a pure function from a pod (and the injection settings) to
//! the JSON patch that adds the rm_abstract init. No I/O; the server calls it.
//!
//! What it adds, when the pod asks for injection:
//! - an emptyDir volume (with a size limit) and one init container that
//!   copies `/rm-abstract/.` of the init image (the `rm_abstract` package and
//!   `sitecustomize.py`) into it; the init container runs as non-root, without
//!   privilege escalation, with all capabilities dropped, a read-only root
//!   filesystem and the RuntimeDefault seccomp profile, so Pod Security
//!   "restricted" admits it;
//! - in each target container: the volume mounted read-only, `PYTHONPATH`
//!   with the package directory in front, the `RM_*` env (the user's own
//!   variables of the same name win), and, for containers that request no
//!   accelerator, one `rm-abstract.io/agent` so that the device plugin's
//!   `Allocate` mounts the agent's socket directory (no hostPath volume, which
//!   Pod Security "baseline" refuses);
//! - with a socket group configured, that GID in the pod's
//!   `securityContext.supplementalGroups`, so that containers running as a
//!   non-root user may connect to the agent's socket (mode 0660, group =
//!   the socket group); "restricted" allows supplemental groups;
//! - the annotation `rm-abstract.io/injected`, which makes a second pass (or
//!   a copy of an injected pod) change nothing.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{
    Capabilities, Container, EmptyDirVolumeSource, EnvVar, EnvVarSource, ObjectFieldSelector, Pod,
    PodSecurityContext, ResourceRequirements, SeccompProfile, SecurityContext, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use rm_crds::labels;

/// Pod annotation: comma list of the containers to inject.
pub const CONTAINER_NAMES: &str = "rm-abstract.io/container-names";
/// Pod annotation: the JSON object passed on as `RM_COMPILE_OPTIONS`.
pub use rm_crds::labels::COMPILE_OPTIONS;
/// Pod annotation written by the webhook: the names of the injected
/// containers; its presence means "already injected".
pub const INJECTED: &str = "rm-abstract.io/injected";
/// Env set in every injected container; also a marker of a done injection.
pub const INJECTED_ENV: &str = "RM_INJECTED";
pub use rm_crds::device::AGENT_RESOURCE;

/// Base names of what the webhook adds; a suffix is appended on a clash.
const VOLUME_NAME: &str = "rm-abstract-inject";
const INIT_CONTAINER_NAME: &str = "rm-abstract-init";
/// Where the init image holds the package (`/rm-abstract/rm_abstract/`,
/// `/rm-abstract/sitecustomize.py`).
const IMAGE_PACKAGE_DIR: &str = "/rm-abstract";

/// Settings of the injection (flags of rm-operator).
#[derive(Debug, Clone)]
pub struct InjectConfig {
    /// Image with the package under `/rm-abstract/` and a `cp`.
    pub init_image: String,
    pub image_pull_policy: Option<String>,
    /// Mount path of the emptyDir in the init and in the target containers.
    pub mount_path: String,
    /// sizeLimit of the emptyDir.
    pub size_limit: String,
    /// Value of `RM_AGENT_SOCKET` (inside the directory the device plugin mounts).
    pub agent_socket: String,
    /// Value of `RM_CACHE_DIR`.
    pub cache_dir: String,
    /// Value of `RM_DEVICE` where neither the operator nor the user set one.
    pub default_device: String,
    /// Extended resources whose device plugin mounts the agent socket
    /// directory in `Allocate` (the accelerators); a container requesting none
    /// of them gets `rm-abstract.io/agent: 1`.
    pub accelerator_resources: BTreeSet<String>,
    /// Resource that carries the agent socket for CPU containers; `None`
    /// disables the request (e.g. clusters without the device plugin).
    pub agent_resource: Option<String>,
    /// GID that owns the agent's socket (rm-agent `--socket-group`); added to
    /// the pod's supplemental groups so that non-root users may connect.
    /// `None`: nothing added (the socket is then reachable as root only).
    pub agent_socket_group: Option<i64>,
    /// UID the init container runs as.
    pub init_uid: i64,
}

impl Default for InjectConfig {
    fn default() -> Self {
        Self {
            init_image: "ghcr.io/rm-abstract/python-init:latest".into(),
            image_pull_policy: None,
            mount_path: "/rm-abstract-inject".into(),
            size_limit: "64Mi".into(),
            agent_socket: "/var/run/rm-abstract/agent.sock".into(),
            cache_dir: "/var/cache/rm-abstract".into(),
            default_device: "auto".into(),
            accelerator_resources: rm_crds::DeviceType::ALL
                .iter()
                .filter_map(|t| t.info().default_resource_name.map(String::from))
                .collect(),
            agent_resource: Some(AGENT_RESOURCE.into()),
            agent_socket_group: None,
            init_uid: 65532,
        }
    }
}

/// What the webhook does with one pod.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Nothing to do; the reason, for the log.
    Skip(&'static str),
    /// The patch to return, and what the user should know.
    Inject {
        patch: json_patch::Patch,
        /// The injected containers.
        containers: Vec<String>,
        warnings: Vec<String>,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum InjectError {
    #[error("the pod cannot be converted to JSON: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("no container of the pod can be injected: {0}")]
    NoTarget(String),
}

/// Whether the pod asks for injection: the label `rm-abstract.io/inject=true`
/// (set by the operator), or the annotation `rm-abstract.io/inject: "true"` on
/// the pod or (`namespace_opt_in`) its namespace; the pod's `"false"`
/// (annotation or label) wins.
pub fn wants_injection(pod: &Pod, namespace_opt_in: bool) -> bool {
    let annotation = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(labels::INJECT))
        .map(|v| v.trim().to_ascii_lowercase());
    let label = pod
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(labels::INJECT))
        .map(|v| v.trim().to_ascii_lowercase());
    if annotation.as_deref() == Some("false") || label.as_deref() == Some("false") {
        return false;
    }
    annotation.as_deref() == Some("true") || label.as_deref() == Some("true") || namespace_opt_in
}

/// Whether the pod already went through the injection: the annotation, or
/// a container that carries `RM_INJECTED` (a copy of an injected pod spec
/// whose annotations were dropped).
pub fn already_injected(pod: &Pod) -> bool {
    let annotated = pod
        .metadata
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key(INJECTED));
    annotated
        || pod.spec.as_ref().is_some_and(|s| {
            s.containers
                .iter()
                .chain(s.init_containers.iter().flatten())
                .any(|c| c.env.iter().flatten().any(|e| e.name == INJECTED_ENV))
        })
}

/// The decision and patch for one pod.
pub fn plan(
    pod: &Pod,
    namespace_opt_in: bool,
    cfg: &InjectConfig,
) -> Result<Decision, InjectError> {
    if !wants_injection(pod, namespace_opt_in) {
        return Ok(Decision::Skip("not selected for injection"));
    }
    if already_injected(pod) {
        return Ok(Decision::Skip("already injected"));
    }
    let Some(spec) = pod.spec.as_ref() else {
        return Ok(Decision::Skip("pod has no spec"));
    };
    let mut warnings = Vec::new();
    let targets = target_containers(pod, &mut warnings)?;
    let mut mutated = pod.clone();
    let new_spec = mutated
        .spec
        .as_mut()
        .ok_or_else(|| InjectError::NoTarget("no spec".into()))?;

    let volume_names: BTreeSet<&str> = spec
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.as_str())
        .collect();
    let container_names: BTreeSet<&str> = spec
        .containers
        .iter()
        .chain(spec.init_containers.iter().flatten())
        .map(|c| c.name.as_str())
        .chain(
            spec.ephemeral_containers
                .iter()
                .flatten()
                .map(|c| c.name.as_str()),
        )
        .collect();
    let volume = unique_name(VOLUME_NAME, &volume_names);
    let init_name = unique_name(INIT_CONTAINER_NAME, &container_names);

    let compile_options = compile_options_env(pod, &mut warnings);
    let mut injected = Vec::new();
    for c in new_spec.containers.iter_mut() {
        if !targets.contains(&c.name) {
            continue;
        }
        if c.volume_mounts
            .iter()
            .flatten()
            .any(|m| m.mount_path.trim_end_matches('/') == cfg.mount_path.trim_end_matches('/'))
        {
            warnings.push(format!(
                "rm-abstract: container {:?} already mounts {}; not injected",
                c.name, cfg.mount_path
            ));
            continue;
        }
        inject_container(c, &volume, cfg, compile_options.as_ref(), &mut warnings);
        injected.push(c.name.clone());
    }
    if injected.is_empty() {
        return Err(InjectError::NoTarget(warnings.join("; ")));
    }

    new_spec.volumes.get_or_insert_with(Vec::new).push(Volume {
        name: volume.clone(),
        empty_dir: Some(EmptyDirVolumeSource {
            size_limit: Some(Quantity(cfg.size_limit.clone())),
            ..Default::default()
        }),
        ..Default::default()
    });
    new_spec
        .init_containers
        .get_or_insert_with(Vec::new)
        .push(init_container(&init_name, &volume, cfg));
    if let Some(gid) = cfg.agent_socket_group {
        add_supplemental_group(new_spec, gid);
    }
    mutated
        .metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(INJECTED.into(), injected.join(","));

    let before = serde_json::to_value(pod)?;
    let after = serde_json::to_value(&mutated)?;
    Ok(Decision::Inject {
        patch: json_patch::diff(&before, &after),
        containers: injected,
        warnings,
    })
}

/// The containers to inject: the annotation's list, else the workload's
/// inference container (the one the operator gave `RM_DEVICE`), else the first.
fn target_containers(
    pod: &Pod,
    warnings: &mut Vec<String>,
) -> Result<BTreeSet<String>, InjectError> {
    let containers = pod
        .spec
        .as_ref()
        .map(|s| s.containers.as_slice())
        .unwrap_or_default();
    if containers.is_empty() {
        return Err(InjectError::NoTarget("the pod has no containers".into()));
    }
    let listed = pod
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(CONTAINER_NAMES));
    if let Some(list) = listed {
        let mut set = BTreeSet::new();
        for name in list.split(',').map(str::trim).filter(|n| !n.is_empty()) {
            if containers.iter().any(|c| c.name == name) {
                set.insert(name.to_string());
            } else {
                warnings.push(format!(
                    "rm-abstract: {CONTAINER_NAMES} names {name:?}, which is not a container of the pod"
                ));
            }
        }
        if set.is_empty() {
            return Err(InjectError::NoTarget(format!(
                "{CONTAINER_NAMES}={list:?} names no container of the pod"
            )));
        }
        return Ok(set);
    }
    let is_workload_pod = pod
        .metadata
        .labels
        .as_ref()
        .is_some_and(|l| l.contains_key(labels::WORKLOAD));
    let inference = is_workload_pod
        .then(|| {
            containers
                .iter()
                .find(|c| c.env.iter().flatten().any(|e| e.name == "RM_DEVICE"))
        })
        .flatten()
        .unwrap_or(&containers[0]);
    Ok([inference.name.clone()].into())
}

fn inject_container(
    c: &mut Container,
    volume: &str,
    cfg: &InjectConfig,
    compile_options: Option<&EnvVar>,
    warnings: &mut Vec<String>,
) {
    c.volume_mounts
        .get_or_insert_with(Vec::new)
        .push(VolumeMount {
            name: volume.into(),
            mount_path: cfg.mount_path.clone(),
            read_only: Some(true),
            ..Default::default()
        });

    let env = c.env.get_or_insert_with(Vec::new);
    match env.iter_mut().find(|e| e.name == "PYTHONPATH") {
        Some(e) if e.value_from.is_some() => warnings.push(format!(
            "rm-abstract: PYTHONPATH of container {:?} comes from valueFrom and is left alone; \
             put {} first in it, or rm_abstract is not loaded",
            c.name, cfg.mount_path
        )),
        Some(e) => {
            let old = e.value.take().unwrap_or_default();
            let already = old.split(':').any(|p| p == cfg.mount_path);
            e.value = Some(match (already, old.is_empty()) {
                (true, _) => old,
                (false, true) => cfg.mount_path.clone(),
                (false, false) => format!("{}:{old}", cfg.mount_path),
            });
        }
        None => {
            // envFrom is resolved before env, so `$(PYTHONPATH)` keeps a
            // value that comes from a ConfigMap or Secret.
            let value = if c.env_from.as_ref().is_some_and(|f| !f.is_empty()) {
                format!("{}:$(PYTHONPATH)", cfg.mount_path)
            } else {
                cfg.mount_path.clone()
            };
            env.push(plain_env("PYTHONPATH", &value));
        }
    }

    let mut add = |var: EnvVar| {
        if !env.iter().any(|e| e.name == var.name) {
            env.push(var);
        }
    };
    add(plain_env("RM_DEVICE", &cfg.default_device));
    add(plain_env("RM_AGENT_SOCKET", &cfg.agent_socket));
    add(plain_env("RM_CACHE_DIR", &cfg.cache_dir));
    if let Some(opts) = compile_options {
        add(opts.clone());
    }
    add(plain_env(INJECTED_ENV, "1"));
    add(field_env("RM_POD_NAME", "metadata.name"));
    add(field_env("RM_POD_NAMESPACE", "metadata.namespace"));
    add(field_env("RM_POD_UID", "metadata.uid"));

    if let Some(agent) = &cfg.agent_resource {
        request_agent(c, agent, &cfg.accelerator_resources);
    }

    // A script that fails (an accelerator it may not silently leave, an agent
    // it cannot reach) ends with rm_abstract's one-line error in its log:
    // with FallbackToLogsOnError the kubelet puts that log tail in the
    // container's termination message, where the operator reads it for the
    // workload's status. It applies only when the container failed and wrote
    // no termination message itself, so the default `File` loses nothing.
    if c.termination_message_policy.as_deref() != Some(FALLBACK_TO_LOGS) {
        c.termination_message_policy = Some(FALLBACK_TO_LOGS.into());
    }
}

const FALLBACK_TO_LOGS: &str = "FallbackToLogsOnError";

/// `RM_COMPILE_OPTIONS` from the pod annotation (camelCase keys like the
/// CRD's `compile`), normalised to compact JSON; anything but an object is
/// reported and dropped.
fn compile_options_env(pod: &Pod, warnings: &mut Vec<String>) -> Option<EnvVar> {
    let raw = pod.metadata.annotations.as_ref()?.get(COMPILE_OPTIONS)?;
    match serde_json::from_str::<serde_json::Value>(raw) {
        Ok(v @ serde_json::Value::Object(_)) => {
            Some(plain_env("RM_COMPILE_OPTIONS", &v.to_string()))
        }
        _ => {
            warnings.push(format!(
                "rm-abstract: annotation {COMPILE_OPTIONS} is not a JSON object \
                 (e.g. {{\"precision\":\"bf16\"}}); RM_COMPILE_OPTIONS not set"
            ));
            None
        }
    }
}

/// `rm-abstract.io/agent: 1` in requests and limits, unless the container
/// already requests an accelerator (whose Allocate mounts the socket) or the
/// agent resource.
fn request_agent(c: &mut Container, agent: &str, accelerators: &BTreeSet<String>) {
    let res = c
        .resources
        .get_or_insert_with(ResourceRequirements::default);
    let requested = |m: &Option<BTreeMap<String, Quantity>>| {
        m.as_ref()
            .is_some_and(|m| m.keys().any(|k| k == agent || accelerators.contains(k)))
    };
    if requested(&res.limits) || requested(&res.requests) {
        return;
    }
    let one = Quantity("1".into());
    res.limits
        .get_or_insert_with(BTreeMap::new)
        .insert(agent.into(), one.clone());
    res.requests
        .get_or_insert_with(BTreeMap::new)
        .insert(agent.into(), one);
}

/// `gid` in the pod's `securityContext.supplementalGroups` (created when
/// missing), after the user's own groups, at most once. Pod-level, because
/// every container of the pod that reaches the socket needs it and the
/// container securityContext has no such field.
fn add_supplemental_group(spec: &mut k8s_openapi::api::core::v1::PodSpec, gid: i64) {
    let groups = spec
        .security_context
        .get_or_insert_with(PodSecurityContext::default)
        .supplemental_groups
        .get_or_insert_with(Vec::new);
    if !groups.contains(&gid) {
        groups.push(gid);
    }
}

fn init_container(name: &str, volume: &str, cfg: &InjectConfig) -> Container {
    let target = format!("{}/", cfg.mount_path.trim_end_matches('/'));
    Container {
        name: name.into(),
        image: Some(cfg.init_image.clone()),
        image_pull_policy: cfg.image_pull_policy.clone(),
        command: Some(vec![
            "cp".into(),
            "-r".into(),
            format!("{IMAGE_PACKAGE_DIR}/."),
            target,
        ]),
        volume_mounts: Some(vec![VolumeMount {
            name: volume.into(),
            mount_path: cfg.mount_path.clone(),
            ..Default::default()
        }]),
        resources: Some(ResourceRequirements {
            requests: Some(
                [
                    ("cpu".to_string(), Quantity("10m".into())),
                    ("memory".to_string(), Quantity("16Mi".into())),
                ]
                .into(),
            ),
            limits: Some([("memory".to_string(), Quantity("64Mi".into()))].into()),
            ..Default::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(cfg.init_uid),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            read_only_root_filesystem: Some(true),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".into()]),
                add: None,
            }),
            seccomp_profile: Some(SeccompProfile {
                type_: "RuntimeDefault".into(),
                localhost_profile: None,
            }),
            ..Default::default()
        }),
        termination_message_policy: Some("FallbackToLogsOnError".into()),
        ..Default::default()
    }
}

fn unique_name(base: &str, taken: &BTreeSet<&str>) -> String {
    if !taken.contains(base) {
        return base.to_string();
    }
    (1..)
        .map(|i| format!("{base}-{i}"))
        .find(|n| !taken.contains(n.as_str()))
        .unwrap_or_else(|| base.to_string())
}

fn plain_env(name: &str, value: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: Some(value.into()),
        value_from: None,
    }
}

fn field_env(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value: None,
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                api_version: Some("v1".into()),
                field_path: path.into(),
            }),
            ..Default::default()
        }),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;
    use serde_json::{Value, json};

    fn pod(v: Value) -> Pod {
        serde_json::from_value(v).unwrap()
    }

    fn injectable(spec: Value) -> Value {
        json!({"metadata": {"name": "p", "namespace": "ns", "annotations": {"rm-abstract.io/inject": "true"}}, "spec": spec})
    }

    /// Applies the decision's patch to the pod's JSON (the apiserver's view)
    /// and returns the result, with the warnings.
    fn apply(raw: &Value) -> (Value, Vec<String>) {
        apply_with(raw, &InjectConfig::default())
    }

    fn apply_with(raw: &Value, cfg: &InjectConfig) -> (Value, Vec<String>) {
        let p = pod(raw.clone());
        match plan(&p, false, cfg).unwrap() {
            Decision::Inject {
                patch, warnings, ..
            } => {
                let mut out = raw.clone();
                json_patch::patch(&mut out, &patch).expect("patch applies to the original");
                (out, warnings)
            }
            Decision::Skip(r) => panic!("skipped: {r}"),
        }
    }

    fn env<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
        c["env"].as_array()?.iter().find(|e| e["name"] == name)
    }

    #[test]
    fn single_container_gets_init_volume_mount_env_and_agent_resource() {
        let (out, warnings) = apply(&injectable(
            json!({"containers": [{"name": "app", "image": "python:3.12"}]}),
        ));
        assert!(warnings.is_empty());
        let init = &out["spec"]["initContainers"][0];
        assert_eq!(init["name"], "rm-abstract-init");
        assert_eq!(
            init["command"],
            json!(["cp", "-r", "/rm-abstract/.", "/rm-abstract-inject/"])
        );
        let sc = &init["securityContext"];
        assert_eq!(sc["runAsNonRoot"], true);
        assert_eq!(sc["allowPrivilegeEscalation"], false);
        assert_eq!(sc["readOnlyRootFilesystem"], true);
        assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]));
        assert_eq!(sc["seccompProfile"]["type"], "RuntimeDefault");
        let vol = &out["spec"]["volumes"][0];
        assert_eq!(vol["name"], "rm-abstract-inject");
        assert_eq!(vol["emptyDir"]["sizeLimit"], "64Mi");
        assert!(vol.get("hostPath").is_none());
        let app = &out["spec"]["containers"][0];
        assert_eq!(app["volumeMounts"][0]["mountPath"], "/rm-abstract-inject");
        assert_eq!(app["volumeMounts"][0]["readOnly"], true);
        assert_eq!(
            env(app, "PYTHONPATH").unwrap()["value"],
            "/rm-abstract-inject"
        );
        assert_eq!(env(app, "RM_DEVICE").unwrap()["value"], "auto");
        assert_eq!(
            env(app, "RM_AGENT_SOCKET").unwrap()["value"],
            "/var/run/rm-abstract/agent.sock"
        );
        assert_eq!(
            env(app, "RM_CACHE_DIR").unwrap()["value"],
            "/var/cache/rm-abstract"
        );
        assert_eq!(env(app, "RM_INJECTED").unwrap()["value"], "1");
        assert_eq!(
            env(app, "RM_POD_UID").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.uid"
        );
        assert_eq!(
            env(app, "RM_POD_NAME").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.name"
        );
        assert_eq!(
            env(app, "RM_POD_NAMESPACE").unwrap()["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.namespace"
        );
        assert_eq!(app["resources"]["requests"]["rm-abstract.io/agent"], "1");
        assert_eq!(app["resources"]["limits"]["rm-abstract.io/agent"], "1");
        assert_eq!(
            out["metadata"]["annotations"]["rm-abstract.io/injected"],
            "app"
        );
    }

    #[test]
    fn failing_containers_report_their_log_tail_as_termination_message() {
        for policy in [None, Some("File"), Some("FallbackToLogsOnError")] {
            let mut spec = json!({"containers": [{"name": "app", "image": "py"}]});
            if let Some(p) = policy {
                spec["containers"][0]["terminationMessagePolicy"] = json!(p);
            }
            let (out, _) = apply(&injectable(spec));
            let app = &out["spec"]["containers"][0];
            assert_eq!(
                app["terminationMessagePolicy"], "FallbackToLogsOnError",
                "{policy:?}"
            );
        }
    }

    #[test]
    fn accelerator_container_gets_no_agent_resource() {
        let (out, _) = apply(&injectable(json!({"containers": [{"name": "app",
            "resources": {"limits": {"rebellions.ai/ATOM": "1"}, "requests": {"rebellions.ai/ATOM": "1"}}}]})));
        let res = &out["spec"]["containers"][0]["resources"];
        assert!(res["limits"].get("rm-abstract.io/agent").is_none());
        assert_eq!(res["limits"]["rebellions.ai/ATOM"], "1");
    }

    #[test]
    fn existing_pythonpath_is_kept_after_the_package() {
        let (out, _) = apply(&injectable(json!({"containers": [{"name": "app",
            "env": [{"name": "PYTHONPATH", "value": "/app:/lib"}]}]})));
        let app = &out["spec"]["containers"][0];
        assert_eq!(
            env(app, "PYTHONPATH").unwrap()["value"],
            "/rm-abstract-inject:/app:/lib"
        );
        assert_eq!(
            app["env"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|e| e["name"] == "PYTHONPATH")
                .count(),
            1
        );
    }

    #[test]
    fn pythonpath_from_value_from_is_left_alone_with_a_warning() {
        let from = json!({"name": "PYTHONPATH", "valueFrom": {"configMapKeyRef": {"name": "cm", "key": "pp"}}});
        let (out, warnings) = apply(&injectable(
            json!({"containers": [{"name": "app", "env": [from.clone()]}]}),
        ));
        assert_eq!(
            env(&out["spec"]["containers"][0], "PYTHONPATH").unwrap(),
            &from
        );
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].contains("valueFrom"), "{warnings:?}");
    }

    #[test]
    fn env_from_keeps_its_pythonpath_through_expansion() {
        let (out, _) = apply(&injectable(json!({"containers": [{"name": "app",
            "envFrom": [{"configMapRef": {"name": "cm"}}]}]})));
        assert_eq!(
            env(&out["spec"]["containers"][0], "PYTHONPATH").unwrap()["value"],
            "/rm-abstract-inject:$(PYTHONPATH)"
        );
    }

    #[test]
    fn user_env_of_the_same_name_wins() {
        let (out, _) = apply(&injectable(json!({"containers": [{"name": "app", "env": [
            {"name": "RM_DEVICE", "value": "rbln:0"},
            {"name": "RM_AGENT_SOCKET", "value": "/run/x.sock"},
            {"name": "RM_CACHE_DIR", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}]}]})));
        let app = &out["spec"]["containers"][0];
        assert_eq!(env(app, "RM_DEVICE").unwrap()["value"], "rbln:0");
        assert_eq!(env(app, "RM_AGENT_SOCKET").unwrap()["value"], "/run/x.sock");
        assert!(env(app, "RM_CACHE_DIR").unwrap().get("value").is_none());
        for n in ["RM_DEVICE", "RM_AGENT_SOCKET", "RM_CACHE_DIR"] {
            assert_eq!(
                app["env"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|e| e["name"] == n)
                    .count(),
                1,
                "{n}"
            );
        }
    }

    #[test]
    fn compile_options_annotation_becomes_env_and_garbage_is_reported() {
        let mut raw = injectable(json!({"containers": [{"name": "app"}]}));
        raw["metadata"]["annotations"]["rm-abstract.io/compile-options"] =
            json!(r#"{ "precision": "bf16", "tensorParallelSize": 2 }"#);
        let (out, _) = apply(&raw);
        let v = env(&out["spec"]["containers"][0], "RM_COMPILE_OPTIONS").unwrap()["value"]
            .as_str()
            .unwrap()
            .to_string();
        assert_eq!(
            serde_json::from_str::<Value>(&v).unwrap(),
            json!({"precision": "bf16", "tensorParallelSize": 2})
        );
        raw["metadata"]["annotations"]["rm-abstract.io/compile-options"] = json!("[1,2");
        let (out, warnings) = apply(&raw);
        assert!(env(&out["spec"]["containers"][0], "RM_COMPILE_OPTIONS").is_none());
        assert!(warnings.iter().any(|w| w.contains("compile-options")));
    }

    #[test]
    fn several_containers_only_the_first_by_default() {
        let (out, _) = apply(&injectable(
            json!({"containers": [{"name": "app"}, {"name": "sidecar"}]}),
        ));
        assert!(env(&out["spec"]["containers"][0], "RM_INJECTED").is_some());
        assert!(out["spec"]["containers"][1].get("env").is_none());
        assert!(out["spec"]["containers"][1].get("volumeMounts").is_none());
    }

    #[test]
    fn container_names_annotation_selects_and_reports_unknown_names() {
        let mut raw =
            injectable(json!({"containers": [{"name": "a"}, {"name": "b"}, {"name": "c"}]}));
        raw["metadata"]["annotations"]["rm-abstract.io/container-names"] = json!("b, c,nope");
        let (out, warnings) = apply(&raw);
        assert!(out["spec"]["containers"][0].get("env").is_none());
        assert!(env(&out["spec"]["containers"][1], "RM_INJECTED").is_some());
        assert!(env(&out["spec"]["containers"][2], "RM_INJECTED").is_some());
        assert!(warnings.iter().any(|w| w.contains("nope")));
        assert_eq!(
            out["metadata"]["annotations"]["rm-abstract.io/injected"],
            "b,c"
        );
    }

    #[test]
    fn container_names_naming_nothing_is_an_error() {
        let mut raw = injectable(json!({"containers": [{"name": "a"}]}));
        raw["metadata"]["annotations"]["rm-abstract.io/container-names"] = json!("x");
        assert!(matches!(
            plan(&pod(raw), false, &InjectConfig::default()),
            Err(InjectError::NoTarget(_))
        ));
    }

    #[test]
    fn workload_pods_inject_the_inference_container() {
        let raw = json!({"metadata": {"name": "w-1", "labels": {"rm-abstract.io/inject": "true", "rm-abstract.io/workload": "w"}},
            "spec": {"containers": [{"name": "proxy"}, {"name": "model", "env": [{"name": "RM_DEVICE", "value": "gpu:0"}],
                "resources": {"limits": {"nvidia.com/gpu": "1"}}}]}});
        let (out, _) = apply(&raw);
        assert!(out["spec"]["containers"][0].get("env").is_none());
        let model = &out["spec"]["containers"][1];
        assert_eq!(
            env(model, "RM_DEVICE").unwrap()["value"],
            "gpu:0",
            "the operator's value is kept"
        );
        assert!(
            model["resources"]["limits"]
                .get("rm-abstract.io/agent")
                .is_none()
        );
    }

    #[test]
    fn existing_init_containers_and_volumes_are_kept_and_names_never_clash() {
        let (out, _) = apply(&injectable(json!({
            "initContainers": [{"name": "rm-abstract-init"}, {"name": "rm-abstract-init-1"}],
            "volumes": [{"name": "rm-abstract-inject", "emptyDir": {}}, {"name": "data", "emptyDir": {}}],
            "containers": [{"name": "app", "volumeMounts": [{"name": "data", "mountPath": "/data"}]}]})));
        let inits = out["spec"]["initContainers"].as_array().unwrap();
        assert_eq!(inits.len(), 3);
        assert_eq!(inits[0]["name"], "rm-abstract-init");
        assert_eq!(inits[2]["name"], "rm-abstract-init-2");
        let vols = out["spec"]["volumes"].as_array().unwrap();
        assert_eq!(vols.len(), 3);
        assert_eq!(vols[2]["name"], "rm-abstract-inject-1");
        let mounts = out["spec"]["containers"][0]["volumeMounts"]
            .as_array()
            .unwrap();
        assert_eq!(mounts[0]["name"], "data");
        assert_eq!(mounts[1]["name"], "rm-abstract-inject-1");
        assert_eq!(inits[2]["volumeMounts"][0]["name"], "rm-abstract-inject-1");
    }

    #[test]
    fn a_container_already_mounting_the_path_is_skipped() {
        let raw = injectable(json!({"containers": [{"name": "app",
            "volumeMounts": [{"name": "x", "mountPath": "/rm-abstract-inject/"}]}], "volumes": [{"name": "x", "emptyDir": {}}]}));
        assert!(matches!(
            plan(&pod(raw), false, &InjectConfig::default()),
            Err(InjectError::NoTarget(_))
        ));
    }

    #[test]
    fn musl_alpine_image_needs_no_glibc_only_cp() {
        // The init container uses the init image's own `cp`; the target
        // image (alpine, musl) only needs Python and gets plain env.
        let (out, _) = apply(&injectable(
            json!({"containers": [{"name": "app", "image": "python:3.12-alpine",
            "command": ["python", "-m", "serve"]}]}),
        ));
        let app = &out["spec"]["containers"][0];
        assert_eq!(app["image"], "python:3.12-alpine");
        assert_eq!(app["command"], json!(["python", "-m", "serve"]));
        assert!(
            out["spec"]["initContainers"][0]["image"]
                .as_str()
                .unwrap()
                .contains("python-init")
        );
        assert!(env(app, "LD_PRELOAD").is_none());
    }

    #[test]
    fn a_second_pass_changes_nothing() {
        let (out, _) = apply(&injectable(json!({"containers": [{"name": "app"}]})));
        assert_eq!(
            plan(&pod(out.clone()), false, &InjectConfig::default()).unwrap(),
            Decision::Skip("already injected")
        );
        // A copy of the injected spec without the annotation is still recognised.
        let mut copy = out;
        copy["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("rm-abstract.io/injected");
        assert_eq!(
            plan(&pod(copy), false, &InjectConfig::default()).unwrap(),
            Decision::Skip("already injected")
        );
    }

    #[test]
    fn selection_label_annotation_namespace_and_opt_out() {
        let base = json!({"metadata": {"name": "p"}, "spec": {"containers": [{"name": "a"}]}});
        let cfg = InjectConfig::default();
        assert_eq!(
            plan(&pod(base.clone()), false, &cfg).unwrap(),
            Decision::Skip("not selected for injection")
        );
        assert!(matches!(
            plan(&pod(base.clone()), true, &cfg).unwrap(),
            Decision::Inject { .. }
        ));
        let mut labelled = base.clone();
        labelled["metadata"]["labels"] = json!({"rm-abstract.io/inject": "true"});
        assert!(matches!(
            plan(&pod(labelled.clone()), false, &cfg).unwrap(),
            Decision::Inject { .. }
        ));
        let mut opted_out = labelled;
        opted_out["metadata"]["annotations"] = json!({"rm-abstract.io/inject": "false"});
        assert_eq!(
            plan(&pod(opted_out.clone()), true, &cfg).unwrap(),
            Decision::Skip("not selected for injection")
        );
    }

    #[test]
    fn pod_without_containers_is_an_error_and_without_spec_is_skipped() {
        let cfg = InjectConfig::default();
        assert!(plan(&pod(injectable(json!({"containers": []}))), false, &cfg).is_err());
        let no_spec = json!({"metadata": {"annotations": {"rm-abstract.io/inject": "true"}}});
        assert_eq!(
            plan(&pod(no_spec), false, &cfg).unwrap(),
            Decision::Skip("pod has no spec")
        );
    }

    #[test]
    fn patch_keeps_fields_unknown_to_the_types() {
        // A newer apiserver may send fields k8s-openapi does not know; the
        // patch touches only what it adds, so they survive.
        let mut raw = injectable(
            json!({"containers": [{"name": "app", "futureField": {"x": 1}}], "futureSpec": true}),
        );
        raw["status"] = json!({"phase": "Pending"});
        let (out, _) = apply(&raw);
        assert_eq!(out["spec"]["containers"][0]["futureField"], json!({"x": 1}));
        assert_eq!(out["spec"]["futureSpec"], true);
    }

    #[test]
    fn agent_resource_can_be_disabled() {
        let cfg = InjectConfig {
            agent_resource: None,
            ..InjectConfig::default()
        };
        let raw = injectable(json!({"containers": [{"name": "app"}]}));
        let Decision::Inject { patch, .. } = plan(&pod(raw.clone()), false, &cfg).unwrap() else {
            panic!("not injected")
        };
        let mut out = raw;
        json_patch::patch(&mut out, &patch).unwrap();
        assert!(
            out["spec"]["containers"][0]["resources"]
                .get("limits")
                .is_none_or(|l| l.get("rm-abstract.io/agent").is_none())
        );
    }

    fn with_socket_group(gid: i64) -> InjectConfig {
        InjectConfig {
            agent_socket_group: Some(gid),
            ..InjectConfig::default()
        }
    }

    #[test]
    fn socket_group_is_added_to_a_pod_without_security_context() {
        let (out, _) = apply_with(
            &injectable(json!({"containers": [{"name": "app"}]})),
            &with_socket_group(2026),
        );
        assert_eq!(
            out["spec"]["securityContext"],
            json!({"supplementalGroups": [2026]})
        );
    }

    #[test]
    fn socket_group_keeps_the_users_groups_and_is_never_added_twice() {
        let cfg = with_socket_group(2026);
        let (out, _) = apply_with(
            &injectable(json!({"containers": [{"name": "app"}],
                "securityContext": {"runAsNonRoot": true, "runAsUser": 1000, "supplementalGroups": [10, 20]}})),
            &cfg,
        );
        let sc = &out["spec"]["securityContext"];
        assert_eq!(sc["supplementalGroups"], json!([10, 20, 2026]));
        assert_eq!(sc["runAsUser"], 1000);
        assert_eq!(sc["runAsNonRoot"], true);

        let already = injectable(json!({"containers": [{"name": "app"}],
            "securityContext": {"supplementalGroups": [2026, 30]}}));
        let Decision::Inject { patch, .. } = plan(&pod(already.clone()), false, &cfg).unwrap()
        else {
            panic!("not injected")
        };
        let ops = serde_json::to_string(&patch).unwrap();
        assert!(
            !ops.contains("\"/spec/securityContext"),
            "the pod's groups are left alone: {ops}"
        );
        let (out, _) = apply_with(&already, &cfg);
        assert_eq!(
            out["spec"]["securityContext"]["supplementalGroups"],
            json!([2026, 30])
        );
    }

    #[test]
    fn no_socket_group_adds_no_security_context() {
        let (out, _) = apply(&injectable(json!({"containers": [{"name": "app"}]})));
        assert!(out["spec"].get("securityContext").is_none());
        let (out, _) = apply(&injectable(json!({"containers": [{"name": "app"}],
            "securityContext": {"supplementalGroups": [10]}})));
        assert_eq!(
            out["spec"]["securityContext"],
            json!({"supplementalGroups": [10]})
        );
    }

    #[test]
    fn a_second_pass_with_a_socket_group_changes_nothing() {
        let cfg = with_socket_group(2026);
        let (out, _) = apply_with(&injectable(json!({"containers": [{"name": "app"}]})), &cfg);
        assert_eq!(
            plan(&pod(out.clone()), false, &cfg).unwrap(),
            Decision::Skip("already injected")
        );
        let mut copy = out;
        copy["metadata"]["annotations"]
            .as_object_mut()
            .unwrap()
            .remove("rm-abstract.io/injected");
        assert_eq!(
            plan(&pod(copy), false, &cfg).unwrap(),
            Decision::Skip("already injected")
        );
    }
}
