//! Configuration of the device plugin: one precedence, flag > env > file >
//! default, merged by the pure [`Config::resolve`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use rm_crds::device::{AGENT_RESOURCE, DeviceType};
use serde::Deserialize;

use crate::error::{Error, Result};

/// Per-vendor settings.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VendorConfig {
    pub device_type: DeviceType,
    pub enabled: bool,
    /// Extended resource advertised to the kubelet.
    pub resource_name: String,
}

/// The node agent's socket as a resource (see `ResourceKind::AgentSocket`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AgentResourceConfig {
    pub resource_name: String,
    /// How many containers of the node may hold it at once.
    pub slots: u32,
}

/// The resolved configuration the plugin runs with.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// Root under which `sys/`, `dev/` and `proc/` of the host are read.
    pub host_root: PathBuf,
    /// The kubelet's device-plugin directory (holds `kubelet.sock`).
    pub kubelet_dir: PathBuf,
    /// Where token records are written for the node agent.
    pub state_dir: PathBuf,
    /// The kubelet's PodResources socket, used to collect stale tokens.
    pub pod_resources_socket: PathBuf,
    pub vendors: Vec<VendorConfig>,
    /// How often health is re-checked.
    pub health_interval: Duration,
    /// A Furiosa heartbeat that does not advance for this long is Unhealthy.
    pub heartbeat_timeout: Duration,
    /// How often registration state (kubelet.sock, our sockets) is checked.
    pub kubelet_poll_interval: Duration,
    /// Each device is advertised this many times (time-sharing); 1 = exclusive.
    pub replicas: u32,
    /// Host directory of the node agent's socket, bind-mounted into containers.
    pub agent_socket_dir: Option<PathBuf>,
    /// Advertised only together with `agent_socket_dir`; `None` when disabled.
    pub agent_resource: Option<AgentResourceConfig>,
    /// Also return CDI device names (`<vendor kind>=<device id>`).
    pub cdi_enabled: bool,
    /// How often tokens of vanished containers are collected.
    pub token_gc_interval: Duration,
    /// A token younger than this is kept even if no container holds it yet
    /// (kubelet calls Allocate before the container shows in PodResources).
    pub token_grace: Duration,
    /// How long a token stays valid without a renewal; the collector renews
    /// the tokens of live pods, so this bounds how long a token outlives its
    /// pod when the kubelet's PodResources cannot be asked.
    pub token_lease: Duration,
}

/// The YAML config file; every field optional.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    pub host_root: Option<PathBuf>,
    pub kubelet_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub pod_resources_socket: Option<PathBuf>,
    /// Keys: device type names or aliases (`gpu`, `rbln`, `furiosa`, ...).
    #[serde(default)]
    pub vendors: std::collections::BTreeMap<String, FileVendor>,
    pub health_interval_ms: Option<u64>,
    pub heartbeat_timeout_ms: Option<u64>,
    pub replicas: Option<u32>,
    pub agent_socket_dir: Option<PathBuf>,
    pub agent_resource: Option<String>,
    /// 0 disables the agent resource.
    pub agent_slots: Option<u32>,
    pub cdi_enabled: Option<bool>,
    pub token_gc_interval_ms: Option<u64>,
    pub token_grace_ms: Option<u64>,
    pub token_lease_ms: Option<u64>,
    /// Advertise Rebellions devices as the generic `rebellions.ai/npu`.
    pub rbln_generic_resource: Option<bool>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileVendor {
    pub enabled: Option<bool>,
    pub resource_name: Option<String>,
}

/// Values given on the command line (highest precedence).
#[derive(Clone, Debug, Default)]
pub struct FlagConfig {
    pub host_root: Option<PathBuf>,
    pub kubelet_dir: Option<PathBuf>,
    pub state_dir: Option<PathBuf>,
    pub config_file: Option<PathBuf>,
}

/// Environment variables read, by name. Kept explicit so `resolve` stays pure.
pub const ENV_HOST_ROOT: &str = "RM_DP_HOST_ROOT";
pub const ENV_KUBELET_DIR: &str = "RM_DP_KUBELET_DIR";
pub const ENV_STATE_DIR: &str = "RM_DP_STATE_DIR";
pub const ENV_POD_RESOURCES_SOCKET: &str = "RM_DP_POD_RESOURCES_SOCKET";
/// Comma-separated device types to enable, e.g. `gpu,rbln`.
pub const ENV_VENDORS: &str = "RM_DP_VENDORS";
pub const ENV_HEALTH_INTERVAL_MS: &str = "RM_DP_HEALTH_INTERVAL_MS";
pub const ENV_REPLICAS: &str = "RM_DP_REPLICAS";
pub const ENV_AGENT_SOCKET_DIR: &str = "RM_DP_AGENT_SOCKET_DIR";
pub const ENV_AGENT_RESOURCE: &str = "RM_DP_AGENT_RESOURCE";
/// Slots of the agent resource; 0 disables it.
pub const ENV_AGENT_SLOTS: &str = "RM_DP_AGENT_SLOTS";
/// Enough for every container a node can run (the kubelet's default is 110
/// pods), so the agent resource never limits scheduling.
const DEFAULT_AGENT_SLOTS: u32 = 1000;
/// `<type>=<resource name>` pairs, comma-separated.
pub const ENV_RESOURCE_NAMES: &str = "RM_DP_RESOURCE_NAMES";

const DEFAULT_KUBELET_DIR: &str = "/var/lib/kubelet/device-plugins";
const DEFAULT_POD_RESOURCES_SOCKET: &str = "/var/lib/kubelet/pod-resources/kubelet.sock";
const DEFAULT_STATE_DIR: &str = "/var/lib/rm-abstract/device-plugin";

impl Config {
    /// Reads the file named by the flag (if any) and the process environment,
    /// then resolves.
    pub fn load(flags: FlagConfig) -> Result<Config> {
        let file = match &flags.config_file {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        Config::resolve(&flags, &env, &file)
    }

    /// Merges flag > env > file > default. Pure: `env` is a lookup function.
    pub fn resolve(
        flags: &FlagConfig,
        env: &dyn Fn(&str) -> Option<String>,
        file: &FileConfig,
    ) -> Result<Config> {
        let path = |flag: &Option<PathBuf>, name: &str, file: &Option<PathBuf>, default: &str| {
            flag.clone()
                .or_else(|| env(name).map(PathBuf::from))
                .or_else(|| file.clone())
                .unwrap_or_else(|| PathBuf::from(default))
        };
        let host_root = path(&flags.host_root, ENV_HOST_ROOT, &file.host_root, "/");
        let kubelet_dir = path(
            &flags.kubelet_dir,
            ENV_KUBELET_DIR,
            &file.kubelet_dir,
            DEFAULT_KUBELET_DIR,
        );
        let state_dir = path(
            &flags.state_dir,
            ENV_STATE_DIR,
            &file.state_dir,
            DEFAULT_STATE_DIR,
        );
        let pod_resources_socket = path(
            &None,
            ENV_POD_RESOURCES_SOCKET,
            &file.pod_resources_socket,
            DEFAULT_POD_RESOURCES_SOCKET,
        );

        let env_vendors: Option<Vec<DeviceType>> = match env(ENV_VENDORS) {
            Some(v) => Some(parse_vendor_list(&v)?),
            None => None,
        };
        let env_names = match env(ENV_RESOURCE_NAMES) {
            Some(v) => parse_resource_names(&v)?,
            None => Vec::new(),
        };
        let mut file_vendors = std::collections::BTreeMap::new();
        for (key, v) in &file.vendors {
            let t: DeviceType = key
                .parse()
                .map_err(|e| Error::ConfigInvalid(format!("vendors.{key}: {e}")))?;
            file_vendors.insert(t, v.clone());
        }

        let mut vendors = Vec::new();
        for t in DeviceType::ALL {
            let info = t.info();
            let Some(default_name) = info.default_resource_name else {
                continue; // CPU is not an extended resource.
            };
            let file_v = file_vendors.get(&t);
            let enabled = match &env_vendors {
                Some(list) => list.contains(&t),
                None => file_v.and_then(|v| v.enabled).unwrap_or(true),
            };
            let generic = file.rbln_generic_resource.unwrap_or(false);
            let fallback = match info.generic_resource_name {
                Some(g) if generic => g,
                _ => default_name,
            };
            let resource_name = env_names
                .iter()
                .find(|(et, _)| *et == t)
                .map(|(_, n)| n.clone())
                .or_else(|| file_v.and_then(|v| v.resource_name.clone()))
                .unwrap_or_else(|| fallback.to_string());
            validate_resource_name(&resource_name)?;
            vendors.push(VendorConfig {
                device_type: t,
                enabled,
                resource_name,
            });
        }

        let health_ms = match env(ENV_HEALTH_INTERVAL_MS) {
            Some(v) => Some(parse_env_u64(ENV_HEALTH_INTERVAL_MS, &v)?),
            None => file.health_interval_ms,
        }
        .unwrap_or(250);
        if health_ms == 0 || health_ms > 1000 {
            // Above 1 s a health change could not reach ListAndWatch within
            // the promised second.
            return Err(Error::ConfigInvalid(format!(
                "health interval {health_ms} ms must be between 1 and 1000"
            )));
        }
        let replicas = match env(ENV_REPLICAS) {
            Some(v) => Some(parse_env_u64(ENV_REPLICAS, &v)? as u32),
            None => file.replicas,
        }
        .unwrap_or(1);
        if replicas == 0 {
            return Err(Error::ConfigInvalid("replicas must be at least 1".into()));
        }
        let agent_socket_dir = env(ENV_AGENT_SOCKET_DIR)
            .map(PathBuf::from)
            .or_else(|| file.agent_socket_dir.clone());
        let agent_slots =
            match env(ENV_AGENT_SLOTS) {
                Some(v) => Some(u32::try_from(parse_env_u64(ENV_AGENT_SLOTS, &v)?).map_err(
                    |_| Error::EnvInvalid {
                        name: ENV_AGENT_SLOTS,
                        value: v.clone(),
                        reason: "more than 4294967295 slots".into(),
                    },
                )?),
                None => file.agent_slots,
            }
            .unwrap_or(DEFAULT_AGENT_SLOTS);
        let agent_resource = if agent_slots == 0 {
            None
        } else {
            let resource_name = env(ENV_AGENT_RESOURCE)
                .or_else(|| file.agent_resource.clone())
                .unwrap_or_else(|| AGENT_RESOURCE.to_string());
            validate_resource_name(&resource_name)?;
            if vendors.iter().any(|v| v.resource_name == resource_name) {
                return Err(Error::ConfigInvalid(format!(
                    "agent resource {resource_name:?} is also a vendor's resource name; \
                     give it its own (default {AGENT_RESOURCE})"
                )));
            }
            Some(AgentResourceConfig {
                resource_name,
                slots: agent_slots,
            })
        };

        let token_gc_interval_ms = file.token_gc_interval_ms.unwrap_or(30_000);
        let token_lease_ms = file.token_lease_ms.unwrap_or(600_000);
        // Renewal happens at half the lease; four passes per lease leave room
        // for one failed pass before a live pod's token could lapse.
        if token_lease_ms < 4 * token_gc_interval_ms {
            return Err(Error::ConfigInvalid(format!(
                "tokenLeaseMs ({token_lease_ms}) must be at least 4 x tokenGcIntervalMs ({token_gc_interval_ms}), or live pods' tokens could lapse between renewals"
            )));
        }
        Ok(Config {
            host_root,
            kubelet_dir,
            state_dir,
            pod_resources_socket,
            vendors,
            health_interval: Duration::from_millis(health_ms),
            heartbeat_timeout: Duration::from_millis(file.heartbeat_timeout_ms.unwrap_or(5000)),
            kubelet_poll_interval: Duration::from_millis(100),
            replicas,
            agent_socket_dir,
            agent_resource,
            cdi_enabled: file.cdi_enabled.unwrap_or(false),
            token_gc_interval: Duration::from_millis(token_gc_interval_ms),
            token_grace: Duration::from_millis(file.token_grace_ms.unwrap_or(120_000)),
            token_lease: Duration::from_millis(token_lease_ms),
        })
    }

    pub fn enabled_vendors(&self) -> impl Iterator<Item = &VendorConfig> {
        self.vendors.iter().filter(|v| v.enabled)
    }

    pub fn kubelet_socket(&self) -> PathBuf {
        self.kubelet_dir.join("kubelet.sock")
    }
}

pub fn read_file(path: &Path) -> Result<FileConfig> {
    let text = std::fs::read_to_string(path).map_err(|source| Error::ConfigRead {
        path: path.to_owned(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|source| Error::ConfigParse {
        path: path.to_owned(),
        source,
    })
}

fn parse_env_u64(name: &'static str, value: &str) -> Result<u64> {
    value
        .trim()
        .parse()
        .map_err(|e: std::num::ParseIntError| Error::EnvInvalid {
            name,
            value: value.to_string(),
            reason: e.to_string(),
        })
}

fn parse_vendor_list(value: &str) -> Result<Vec<DeviceType>> {
    value
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<DeviceType>().map_err(|e| Error::EnvInvalid {
                name: ENV_VENDORS,
                value: value.to_string(),
                reason: e.to_string(),
            })
        })
        .collect()
}

fn parse_resource_names(value: &str) -> Result<Vec<(DeviceType, String)>> {
    let mut out = Vec::new();
    for pair in value.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let invalid = |reason: String| Error::EnvInvalid {
            name: ENV_RESOURCE_NAMES,
            value: value.to_string(),
            reason,
        };
        let (t, name) = pair
            .split_once('=')
            .ok_or_else(|| invalid(format!("{pair:?} is not TYPE=RESOURCE")))?;
        let t: DeviceType = t.parse().map_err(|e| invalid(format!("{e}")))?;
        out.push((t, name.trim().to_string()));
    }
    Ok(out)
}

/// An extended resource name is `<domain>/<name>`; the kubelet rejects others
/// at registration, so fail early with a clearer message.
fn validate_resource_name(name: &str) -> Result<()> {
    match name.split_once('/') {
        Some((domain, n))
            if !domain.is_empty()
                && !n.is_empty()
                && !n.contains('/')
                && !domain.starts_with("kubernetes.io") =>
        {
            Ok(())
        }
        _ => Err(Error::ConfigInvalid(format!(
            "resource name {name:?} must look like vendor.example/name"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn env_of(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k: &str| map.get(k).cloned()
    }

    fn vendor(c: &Config, t: DeviceType) -> &VendorConfig {
        c.vendors
            .iter()
            .find(|v| v.device_type == t)
            .expect("vendor")
    }

    #[test]
    fn defaults_use_the_device_table() {
        let c = Config::resolve(&FlagConfig::default(), &env_of(&[]), &FileConfig::default())
            .expect("resolve");
        assert_eq!(vendor(&c, DeviceType::Gpu).resource_name, "nvidia.com/gpu");
        assert_eq!(
            vendor(&c, DeviceType::Rbln).resource_name,
            "rebellions.ai/ATOM"
        );
        assert_eq!(
            vendor(&c, DeviceType::Furiosa).resource_name,
            "furiosa.ai/rngd"
        );
        assert_eq!(c.vendors.len(), 3, "cpu is not advertised");
        assert_eq!(c.replicas, 1);
        assert_eq!(
            c.kubelet_socket(),
            PathBuf::from("/var/lib/kubelet/device-plugins/kubelet.sock")
        );
    }

    #[test]
    fn flag_beats_env_beats_file() {
        let file: FileConfig = serde_yaml::from_str(
            "hostRoot: /file\nstateDir: /file-state\nkubeletDir: /file-kubelet\nreplicas: 2\n\
             vendors:\n  atom: {resourceName: example.com/from-file}\n  gpu: {enabled: false}\n",
        )
        .expect("yaml");
        let env = env_of(&[
            (ENV_HOST_ROOT, "/env"),
            (ENV_STATE_DIR, "/env-state"),
            (ENV_REPLICAS, "3"),
        ]);
        let flags = FlagConfig {
            host_root: Some("/flag".into()),
            ..Default::default()
        };
        let c = Config::resolve(&flags, &env, &file).expect("resolve");
        assert_eq!(c.host_root, PathBuf::from("/flag"));
        assert_eq!(c.state_dir, PathBuf::from("/env-state"));
        assert_eq!(c.kubelet_dir, PathBuf::from("/file-kubelet"));
        assert_eq!(c.replicas, 3);
        assert_eq!(
            vendor(&c, DeviceType::Rbln).resource_name,
            "example.com/from-file"
        );
        assert!(!vendor(&c, DeviceType::Gpu).enabled);

        let env = env_of(&[
            (ENV_VENDORS, "gpu"),
            (ENV_RESOURCE_NAMES, "rbln=example.com/env"),
        ]);
        let c = Config::resolve(&FlagConfig::default(), &env, &file).expect("resolve");
        assert!(
            vendor(&c, DeviceType::Gpu).enabled,
            "env list overrides file"
        );
        assert!(!vendor(&c, DeviceType::Furiosa).enabled);
        assert_eq!(
            vendor(&c, DeviceType::Rbln).resource_name,
            "example.com/env"
        );
    }

    #[test]
    fn generic_rebellions_resource_name() {
        let file: FileConfig = serde_yaml::from_str("rblnGenericResource: true").expect("yaml");
        let c = Config::resolve(&FlagConfig::default(), &env_of(&[]), &file).expect("resolve");
        assert_eq!(
            vendor(&c, DeviceType::Rbln).resource_name,
            "rebellions.ai/npu"
        );
    }

    #[test]
    fn invalid_values_are_rejected_with_their_name() {
        let err = Config::resolve(
            &FlagConfig::default(),
            &env_of(&[(ENV_REPLICAS, "many")]),
            &FileConfig::default(),
        )
        .expect_err("bad replicas");
        assert!(err.to_string().contains(ENV_REPLICAS), "{err}");
        let file: FileConfig =
            serde_yaml::from_str("vendors:\n  tpu: {enabled: true}").expect("yaml");
        let err = Config::resolve(&FlagConfig::default(), &env_of(&[]), &file).expect_err("tpu");
        assert!(err.to_string().contains("tpu"), "{err}");
        let file: FileConfig =
            serde_yaml::from_str("vendors:\n  gpu: {resourceName: gpu}").expect("yaml");
        assert!(Config::resolve(&FlagConfig::default(), &env_of(&[]), &file).is_err());
        assert!(serde_yaml::from_str::<FileConfig>("unknownKey: 1").is_err());
        let file: FileConfig = serde_yaml::from_str("healthIntervalMs: 5000").expect("yaml");
        assert!(Config::resolve(&FlagConfig::default(), &env_of(&[]), &file).is_err());
    }
    #[test]
    fn agent_resource_defaults_precedence_and_disabling() {
        let none = FlagConfig::default();
        let c = Config::resolve(&none, &env_of(&[]), &FileConfig::default()).expect("resolve");
        assert_eq!(
            c.agent_resource,
            Some(AgentResourceConfig {
                resource_name: AGENT_RESOURCE.into(),
                slots: 1000
            })
        );
        let file: FileConfig =
            serde_yaml::from_str("agentResource: example.com/agent\nagentSlots: 50").expect("yaml");
        let c = Config::resolve(&none, &env_of(&[(ENV_AGENT_SLOTS, "7")]), &file).expect("resolve");
        let agent = c.agent_resource.expect("agent resource");
        assert_eq!(
            (agent.resource_name.as_str(), agent.slots),
            ("example.com/agent", 7)
        );
        let c = Config::resolve(&none, &env_of(&[(ENV_AGENT_SLOTS, "0")]), &file).expect("resolve");
        assert_eq!(c.agent_resource, None, "0 slots disables it");

        let err = Config::resolve(&none, &env_of(&[(ENV_AGENT_RESOURCE, "agent")]), &file)
            .expect_err("no domain");
        assert!(err.to_string().contains("\"agent\""), "{err}");
        let err = Config::resolve(
            &none,
            &env_of(&[(ENV_AGENT_RESOURCE, "nvidia.com/gpu")]),
            &FileConfig::default(),
        )
        .expect_err("clash with a vendor");
        assert!(err.to_string().contains("also a vendor"), "{err}");
        let err = Config::resolve(&none, &env_of(&[(ENV_AGENT_SLOTS, "-1")]), &file)
            .expect_err("negative");
        assert!(err.to_string().contains(ENV_AGENT_SLOTS), "{err}");
    }
}
