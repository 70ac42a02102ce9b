//! The `InferenceWorkload` custom resource (`rm-abstract.io/v1alpha1`).
//!
//! Validation lives in the schema itself (OpenAPI bounds and CEL rules), so the
//! apiserver rejects a bad spec with a message that names the field; the
//! operator never sees one.

// clippy reads the repeated `printcolumn(type_ = ...)` arguments of the derive
// as duplicated attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{PodTemplateSpec, ResourceRequirements};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::device::{DeviceRequest, DeviceStringError, DeviceType, device_string_regex};

/// API group of every rm-abstract resource, label and annotation.
pub const GROUP: &str = "rm-abstract.io";

/// Regex for `spec.model.source`: a hub id, a `pvc://` or a `file:///` URL.
pub const MODEL_SOURCE_REGEX: &str = r"^([A-Za-z0-9][A-Za-z0-9._-]{0,95}(/[A-Za-z0-9][A-Za-z0-9._-]{0,95})?|pvc://[a-z0-9]([-a-z0-9]{0,251}[a-z0-9])?(/[^\s]*)?|file:///[^\s]+)$";

/// Desired state of an inference workload: which model, on which kind of
/// device, how many replicas, compiled how, in which (unchanged) pod template.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "rm-abstract.io",
    version = "v1alpha1",
    kind = "InferenceWorkload",
    namespaced,
    shortname = "iw",
    status = "InferenceWorkloadStatus",
    derive = "PartialEq",
    doc = "An inference workload: a model and an unchanged pod template (or rm-abstract's own OpenAI-compatible server) that rm-abstract runs on the best accelerator with free capacity.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Device",
        type_ = "string",
        json_path = ".status.device.type",
        description = "Device type the workload runs on"
    ),
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.ready",
        description = "Ready replicas / wanted replicas"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Endpoint",
        type_ = "string",
        json_path = ".status.endpoint",
        description = "URL of the OpenAI-compatible API (served workloads with ready pods)"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    printcolumn(
        name = "Resource",
        type_ = "string",
        json_path = ".status.device.resourceName",
        priority = "1"
    ),
    printcolumn(
        name = "Model",
        type_ = "string",
        json_path = ".spec.model.source",
        priority = "1"
    )
)]
#[x_kube(
    validation = Rule::new("has(self.template) || has(self.serve)")
        .message("spec needs a template (your pod) or serve (rm-abstract's OpenAI-compatible server, `serve: {}` for the defaults), or both"),
    validation = Rule::new("!has(self.template) || has(self.serve) || (has(self.template.spec.containers) && size(self.template.spec.containers) >= 1)")
        .message("spec.template.spec.containers must have at least 1 container, unless spec.serve is set (then the template may hold only pod settings, e.g. nodeSelector and tolerations)")
        .field_path(".template.spec.containers"),
    validation = Rule::new("!has(self.containerName) || (has(self.template) && has(self.template.spec.containers) && self.template.spec.containers.exists(c, c.name == self.containerName))")
        .message("spec.containerName must be the name of one of spec.template.spec.containers")
        .field_path(".containerName"),
    validation = Rule::new(format!("!has(self.serve) || !has(self.template) || !has(self.template.spec.containers) || !self.template.spec.containers.exists(c, c.name == '{SERVE_CONTAINER}')"))
        .message("spec.template must not have a container named rm-serve: with spec.serve the operator adds the serving container under that name")
        .field_path(".template"),
    validation = Rule::new("!has(self.compile) || !has(self.compile.tensorParallelSize) || self.compile.tensorParallelSize <= self.devicesPerReplica")
        .message("spec.compile.tensorParallelSize cannot exceed spec.devicesPerReplica: each replica shards the model over its own devices")
        .field_path(".compile.tensorParallelSize"),
)]
#[serde(rename_all = "camelCase")]
pub struct InferenceWorkloadSpec {
    /// The model to serve.
    pub model: ModelSpec,

    /// Device string: `auto` (best type with free capacity), `npu` (best NPU
    /// type), or `rbln`, `furiosa`, `gpu`, `cpu`, each but `cpu` optionally
    /// with `:N`. Aliases `atom`, `rebellions`, `rngd`, `cuda`, `nvidia` are
    /// accepted and normalised.
    #[serde(default = "default_device")]
    #[schemars(length(max = 32))]
    #[x_kube(validation = Rule::new(format!("self.matches(r'{}')", device_string_regex()))
        .message("spec.device must be auto, npu, or one of rbln, furiosa, gpu (aliases atom, rebellions, rngd, cuda, nvidia), optionally followed by :N, or cpu"))]
    pub device: String,

    /// Ordered device types to consider, overriding the cluster's priorities
    /// for this workload. A type left out is never used.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 4))]
    #[x_kube(validation = Rule::new("self.all(x, self.exists_one(y, y == x))")
        .message("spec.devicePriority must not list a device type twice"))]
    pub device_priority: Option<Vec<DeviceType>>,

    /// Devices each replica needs, all on one node.
    #[serde(default = "default_one_u32")]
    #[schemars(range(min = 1, max = 64))]
    pub devices_per_replica: u32,

    /// Number of replicas (scale subresource).
    #[serde(default = "default_one_i32")]
    #[schemars(range(min = 0, max = 10000))]
    pub replicas: i32,

    /// How the node agent compiles the model for the chosen device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compile: Option<CompileOptions>,

    /// The user's pod template, used unchanged apart from the device request,
    /// labels and `RM_DEVICE`. Only its outline is validated here (at least
    /// one named container); the full Pod schema is checked by the apiserver
    /// when the operator writes the Deployment, and errors are reported in
    /// the workload's conditions. See docs/crd.md for why. Optional with
    /// `serve`: the operator then renders the pod itself; a template
    /// without containers beside `serve` gives the serving pod its settings
    /// (nodeSelector, tolerations, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "pod_template_schema")]
    pub template: Option<PodTemplateSpec>,

    /// Name of the inference container in the template; default the first.
    /// With `serve` the device goes to the serving container instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub container_name: Option<String>,

    /// Serve the model over an OpenAI-compatible HTTP API (`/v1`): the
    /// operator adds rm-abstract's serving container (holding the device) and
    /// a ClusterIP Service named after the workload. `serve: {}` serves with
    /// the defaults.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serve: Option<ServeSpec>,

    /// How replicas are placed when the first type with room cannot hold
    /// them all. `single` (default): all on one type (the first with room
    /// for all, else the one with room for the most). `spread`: as many as
    /// fit on each type in priority order, one Deployment per type;
    /// scaling up places the new replicas, never moves running ones.
    #[serde(default, skip_serializing_if = "Placement::is_single")]
    pub placement: Placement,

    /// Move replicas to a higher-priority device type when it has room.
    /// Off by default: running replicas stay where they are. With
    /// `placement: single` the workload moves once that type has room for
    /// every replica; with `spread`, one replica at a time to the highest
    /// type with room above the lowest one it runs on. Either way one
    /// replica at a time, each new replica Ready before an old one goes, so
    /// the workload never serves with fewer ready replicas than before; it
    /// waits until all replicas are ready, and only ever goes up the
    /// priority list.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub move_up: bool,
}

/// `spec.placement`.
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema,
)]
#[serde(rename_all = "lowercase")]
pub enum Placement {
    #[default]
    Single,
    Spread,
}

impl Placement {
    pub fn is_single(&self) -> bool {
        *self == Placement::Single
    }
}

/// Name of the serving container the operator adds for `spec.serve`.
pub const SERVE_CONTAINER: &str = "rm-serve";
/// Default port of the serving container and its Service.
pub const DEFAULT_SERVE_PORT: i32 = 8000;

/// How a workload is served.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ServeSpec {
    /// Port of the API, on the container (named `http`) and on the Service.
    /// 1024 or above: the container runs as non-root without capabilities.
    #[serde(default = "default_serve_port")]
    #[schemars(range(min = 1024, max = 65535))]
    pub port: i32,

    /// The model's id in the API (`"model"` of requests, `/v1/models`);
    /// default the workload's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 256))]
    pub model_name: Option<String>,

    /// CPU and memory of the serving container (requests, limits); the
    /// device request is added by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "resources_schema")]
    pub resources: Option<ResourceRequirements>,
}

impl Default for ServeSpec {
    /// What `serve: {}` means.
    fn default() -> Self {
        Self {
            port: DEFAULT_SERVE_PORT,
            model_name: None,
            resources: None,
        }
    }
}

/// Where the model comes from.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct ModelSpec {
    /// A Hugging Face hub id (`org/name`), `pvc://CLAIM/PATH` or
    /// `file:///ABSOLUTE/NODE/PATH`.
    #[x_kube(
        validation = Rule::new("self != ''").message("spec.model.source must not be empty: give a hub id (org/name), pvc://CLAIM/PATH or file:///PATH"),
        validation = Rule::new(format!("self == '' || self.matches(r'{MODEL_SOURCE_REGEX}')"))
            .message("spec.model.source must be a hub id (org/name), pvc://CLAIM/PATH or file:///ABSOLUTE/PATH"),
    )]
    #[schemars(length(max = 1024))]
    pub source: String,

    /// Hub revision (branch, tag or commit); ignored for pvc:// and file://.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 255))]
    pub revision: Option<String>,
}

/// Numeric precision the model is compiled to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Precision {
    #[serde(rename = "fp32")]
    Fp32,
    #[serde(rename = "fp16")]
    Fp16,
    #[serde(rename = "bf16")]
    Bf16,
    #[serde(rename = "int8")]
    Int8,
    #[serde(rename = "q8_0")]
    Q8_0,
    #[serde(rename = "q4")]
    Q4,
}

/// Bounds of the compile options: the CRD's schema and the node agent
/// (which also takes options from pods, not only from the apiserver) both
/// check these, so neither accepts what the other refuses.
pub mod compile_limits {
    pub const OPTIMIZATION_LEVEL_MAX: u8 = 3;
    pub const TENSOR_PARALLEL_SIZE_MAX: u32 = 64;
    pub const MAX_SEQ_LEN_MAX: u32 = 1_048_576;
    pub const BATCH_SIZE_MAX: u32 = 4096;
    pub const EXTRA_MAX_KEYS: usize = 64;
}

/// Compile options; their canonical form is part of the compile-cache key.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct CompileOptions {
    /// 0 (none) to 3 (most aggressive).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0, max = compile_limits::OPTIMIZATION_LEVEL_MAX))]
    pub optimization_level: Option<u8>,

    /// Target precision; the model's own precision when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<Precision>,

    /// Devices the model is sharded over (at most devicesPerReplica).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = compile_limits::TENSOR_PARALLEL_SIZE_MAX))]
    pub tensor_parallel_size: Option<u32>,

    /// Longest sequence (prompt + generation) the compiled model accepts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = compile_limits::MAX_SEQ_LEN_MAX))]
    pub max_seq_len: Option<u32>,

    /// Batch size the compiled model is built for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = compile_limits::BATCH_SIZE_MAX))]
    pub batch_size: Option<u32>,

    /// Vendor-specific options, as strings; each backend accepts only the
    /// keys its worker manifest lists (typed and bounded), and refuses others.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    #[schemars(extend("maxProperties" = compile_limits::EXTRA_MAX_KEYS))]
    pub extra: BTreeMap<String, String>,
}

impl CompileOptions {
    /// The schema's bounds, for options that did not come through the
    /// apiserver. The message names the field in the CRD's spelling.
    pub fn validate(&self) -> Result<(), String> {
        use compile_limits::*;
        let range = |name: &str, v: Option<u32>, max: u32| match v {
            Some(n) if n < 1 || n > max => Err(format!("{name} must be 1 to {max}, got {n}")),
            _ => Ok(()),
        };
        if let Some(l) = self
            .optimization_level
            .filter(|l| *l > OPTIMIZATION_LEVEL_MAX)
        {
            return Err(format!(
                "optimizationLevel must be 0 to {OPTIMIZATION_LEVEL_MAX}, got {l}"
            ));
        }
        range(
            "tensorParallelSize",
            self.tensor_parallel_size,
            TENSOR_PARALLEL_SIZE_MAX,
        )?;
        range("maxSeqLen", self.max_seq_len, MAX_SEQ_LEN_MAX)?;
        range("batchSize", self.batch_size, BATCH_SIZE_MAX)?;
        if self.extra.len() > EXTRA_MAX_KEYS {
            return Err(format!(
                "extra has {} keys; at most {EXTRA_MAX_KEYS}",
                self.extra.len()
            ));
        }
        Ok(())
    }
}

/// Lifecycle phase of a workload.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Phase {
    /// No device type with capacity yet; waiting for one.
    Pending,
    /// Device chosen, pods being created, scheduled or compiled.
    Progressing,
    /// All wanted replicas are ready.
    Running,
    /// Some replicas ready, fewer than wanted.
    Degraded,
    /// The workload cannot run as specified (see conditions).
    Failed,
}

/// Observed state, written by the operator.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct InferenceWorkloadStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<DeviceStatus>,
    /// Replicas that exist (scale subresource).
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    /// `readyReplicas/replicas` for the Ready printer column.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready: Option<String>,
    /// Label selector of the pods, in string form (scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// URL of the OpenAI-compatible API (`http://NAME.NAMESPACE.svc:PORT/v1`),
    /// set while a served workload has ready pods behind its Service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// Replicas per device type (more than one with `placement: spread`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub placements: Vec<TypePlacement>,
    /// `DeviceSelected`, `Compiled`, `Available` and, with `spec.serve`, `Serving`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[x_kube(merge_strategy = ListMerge::Map(vec!["type".into()]))]
    pub conditions: Vec<Condition>,
}

/// Replicas of a workload on one device type.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct TypePlacement {
    #[serde(rename = "type")]
    pub device_type: DeviceType,
    /// Replicas placed on the type (its Deployment's).
    pub replicas: i32,
    pub ready_replicas: i32,
}

/// The device choice and why it was made.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct DeviceStatus {
    #[serde(rename = "type")]
    pub device_type: DeviceType,
    /// Extended resource requested per replica; absent for cpu.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resource_name: Option<String>,
    /// Devices per replica.
    pub count: u32,
    /// The types considered, their free counts, and the rule that decided.
    pub reason: String,
}

/// Condition types set on a workload.
pub mod condition {
    pub const DEVICE_SELECTED: &str = "DeviceSelected";
    pub const COMPILED: &str = "Compiled";
    pub const AVAILABLE: &str = "Available";
    /// Served workloads: whether the Service has ready pods behind it.
    pub const SERVING: &str = "Serving";
}

impl InferenceWorkloadSpec {
    /// The parsed device request (aliases normalised).
    pub fn device_request(&self) -> Result<DeviceRequest, DeviceStringError> {
        self.device.parse()
    }
}

/// The CRD as the YAML document that `crdgen` prints and the repository commits.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let body = serde_yaml::to_string(&InferenceWorkload::crd())?;
    Ok(format!(
        "# Generated by `cargo run -p rm-crds --bin crdgen`; do not edit.\n{body}"
    ))
}

fn default_device() -> String {
    "auto".to_string()
}

fn default_one_u32() -> u32 {
    1
}

fn default_one_i32() -> i32 {
    1
}

fn default_serve_port() -> i32 {
    DEFAULT_SERVE_PORT
}

/// Outline schema of the serving container's resources: requests and limits
/// as maps of quantities (the generated schema would add `claims`, which a
/// container of the operator's cannot use).
fn resources_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    let quantities = serde_json::json!({
        "type": "object",
        "maxProperties": 32,
        "additionalProperties": {"x-kubernetes-int-or-string": true}
    });
    schemars::json_schema!({
        "description": "Requests and limits (cpu, memory, ...) of the serving container.",
        "type": "object",
        "properties": {
            "requests": quantities.clone(),
            "limits": quantities
        }
    })
}

/// Outline schema of the embedded pod template.
///
/// The full generated PodTemplateSpec schema would add several hundred KiB to
/// the CRD (it is stored in etcd and served in discovery) and would freeze
/// this CRD to one Kubernetes release's Pod fields. The outline checks what
/// rm-abstract relies on and keeps everything else as the user wrote it.
fn pod_template_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Pod template of the workload (a core/v1 PodTemplateSpec), used unchanged.",
        "type": "object",
        "required": ["spec"],
        "properties": {
            "metadata": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true
            },
            "spec": {
                "type": "object",
                "x-kubernetes-preserve-unknown-fields": true,
                "properties": {
                    "containers": {
                        "description": "At least one, unless spec.serve is set (a CEL rule of the spec).",
                        "type": "array",
                        "maxItems": 64,
                        "items": {
                            "type": "object",
                            "required": ["name"],
                            "x-kubernetes-preserve-unknown-fields": true,
                            "properties": {
                                "name": { "type": "string", "minLength": 1 }
                            }
                        }
                    }
                }
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use kube::CustomResourceExt;

    fn spec_schema() -> serde_json::Value {
        let crd = serde_json::to_value(InferenceWorkload::crd()).unwrap();
        crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"].clone()
    }

    #[test]
    fn defaults_are_in_the_schema() {
        let spec = spec_schema();
        assert_eq!(spec["properties"]["device"]["default"], "auto");
        assert_eq!(spec["properties"]["replicas"]["default"], 1);
        assert_eq!(spec["properties"]["devicesPerReplica"]["default"], 1);
    }

    #[test]
    fn device_priority_accepts_only_canonical_types() {
        let spec = spec_schema();
        let items = &spec["properties"]["devicePriority"]["items"];
        let allowed: Vec<&str> = items["enum"]
            .as_array()
            .expect("enum")
            .iter()
            .filter_map(|v| v.as_str())
            .collect();
        assert_eq!(allowed, ["rbln", "furiosa", "gpu", "cpu"]);
    }

    #[test]
    fn model_source_regex_accepts_the_documented_forms() {
        let re = regex::Regex::new(MODEL_SOURCE_REGEX).unwrap();
        for ok in [
            "meta-llama/Llama-2-7b-hf",
            "gpt2",
            "HuggingFaceTB/SmolLM2-135M-Instruct",
            "pvc://models/llama/7b",
            "pvc://models",
            "file:///var/lib/models/smollm2",
        ] {
            assert!(re.is_match(ok), "{ok}");
        }
        for bad in [
            "",
            "/abs/path",
            "a/b/c",
            "pvc://Bad_Claim/x",
            "file://relative",
            "http://x/y",
            "org/ name",
        ] {
            assert!(!re.is_match(bad), "{bad}");
        }
    }

    #[test]
    fn serve_defaults_and_rules_are_in_the_schema() {
        let spec = spec_schema();
        assert_eq!(
            spec["properties"]["serve"]["properties"]["port"]["default"],
            8000
        );
        let required: Vec<&str> = spec["required"]
            .as_array()
            .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
            .unwrap_or_default();
        assert!(!required.contains(&"template"), "{required:?}");
        let rules = spec["x-kubernetes-validations"].to_string();
        assert!(
            rules.contains("has(self.template) || has(self.serve)"),
            "{rules}"
        );
        let served: InferenceWorkload = serde_yaml::from_str(
            "apiVersion: rm-abstract.io/v1alpha1\nkind: InferenceWorkload\nmetadata: {name: s}\nspec:\n  model: {source: gpt2}\n  serve: {}\n",
        )
        .unwrap();
        assert_eq!(served.spec.serve, Some(ServeSpec::default()));
        assert_eq!(ServeSpec::default().port, DEFAULT_SERVE_PORT);
        assert!(served.spec.template.is_none());
    }

    #[test]
    fn a_minimal_workload_round_trips_with_defaults() {
        let yaml = r#"
apiVersion: rm-abstract.io/v1alpha1
kind: InferenceWorkload
metadata: {name: w}
spec:
  model: {source: gpt2}
  template:
    spec:
      containers: [{name: app, image: python:3.12}]
"#;
        let iw: InferenceWorkload = serde_yaml::from_str(yaml).unwrap();
        assert_eq!(iw.spec.device, "auto");
        assert_eq!(iw.spec.replicas, 1);
        assert_eq!(iw.spec.devices_per_replica, 1);
        assert_eq!(iw.spec.device_request().unwrap(), DeviceRequest::Auto);
    }
}
