//! Types shared by every rm-abstract component: the `InferenceWorkload`
//! custom resource and the device table (types, aliases, resource names,
//! priorities, device strings) and the allocation token records between the
//! device plugin and the node agent.

pub mod device;
pub mod token;
pub mod workload;

pub use device::{DeviceRequest, DeviceStringError, DeviceType, Priority};
pub use workload::{
    CompileOptions, DeviceStatus, GROUP, InferenceWorkload, InferenceWorkloadSpec,
    InferenceWorkloadStatus, ModelSpec, Phase, Placement, Precision, ServeSpec, TypePlacement,
};

/// Labels and annotations under the `rm-abstract.io` prefix.
pub mod labels {
    /// On a workload's pods: the name of the workload.
    pub const WORKLOAD: &str = "rm-abstract.io/workload";
    /// On a pod (label) or pod/namespace (annotation): inject the init.
    pub const INJECT: &str = "rm-abstract.io/inject";
    /// On a pod: the workload's `spec.compile` as JSON, passed on to the
    /// container as `RM_COMPILE_OPTIONS` by the webhook.
    pub const COMPILE_OPTIONS: &str = "rm-abstract.io/compile-options";
    /// On a spread workload's pods and Deployments: the device type (each
    /// type's Deployment selects its own pods by it).
    pub const DEVICE_TYPE: &str = "rm-abstract.io/device-type";
}
