//! Cluster configuration of the operator: device priorities, resource names,
//! CPU fallback and the unschedulable grace period.
//!
//! One precedence, as in NVIDIA's device plugin: command-line flag, then
//! environment variable (clap reads both), then the YAML file given with
//! `--config`, then the built-in defaults of the device table.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use rm_crds::{DeviceType, Priority};
use serde::Deserialize;

/// Effective configuration after merging flags, env, file and defaults.
#[derive(Clone, Debug, PartialEq)]
pub struct OperatorConfig {
    pub priorities: BTreeMap<DeviceType, Priority>,
    pub resource_names: BTreeMap<DeviceType, String>,
    /// Whether `cpu` ends the cluster's priority list (workloads that name
    /// `cpu` in their own `devicePriority` may always use it).
    pub cpu_fallback: bool,
    /// How long a workload's pods may stay unschedulable on the chosen type
    /// before the operator picks another.
    pub unschedulable_grace: Duration,
    /// The serving container of workloads with `spec.serve`.
    pub serve: ServeSettings,
}

/// Image of the serving container (flags `--serve-image`,
/// `--serve-image-pull-policy`).
#[derive(Clone, Debug, PartialEq)]
pub struct ServeSettings {
    pub image: String,
    /// `None`: the cluster's default (Always for `:latest`, else IfNotPresent).
    pub image_pull_policy: Option<String>,
}

impl Default for ServeSettings {
    fn default() -> Self {
        Self {
            image: "ghcr.io/rm-abstract/serve:latest".into(),
            image_pull_policy: None,
        }
    }
}

impl Default for OperatorConfig {
    fn default() -> Self {
        Self {
            priorities: DeviceType::ALL
                .iter()
                .map(|t| (*t, t.info().default_priority))
                .collect(),
            resource_names: DeviceType::ALL
                .iter()
                .filter_map(|t| Some((*t, t.info().default_resource_name?.to_string())))
                .collect(),
            cpu_fallback: true,
            unschedulable_grace: Duration::from_secs(300),
            serve: ServeSettings::default(),
        }
    }
}

impl OperatorConfig {
    /// The cluster's priority list: highest priority first, ties broken by
    /// the device table's order (rbln, furiosa, gpu, cpu); `cpu` only with
    /// the fallback enabled.
    pub fn priority_order(&self) -> Vec<DeviceType> {
        let mut order: Vec<DeviceType> = DeviceType::ALL
            .into_iter()
            .filter(|t| *t != DeviceType::Cpu || self.cpu_fallback)
            .collect();
        // sort_by_key is stable: equal priorities keep the table's order.
        order.sort_by_key(|t| std::cmp::Reverse(self.priority(*t)));
        order
    }

    pub fn priority(&self, t: DeviceType) -> Priority {
        self.priorities
            .get(&t)
            .copied()
            .unwrap_or(t.info().default_priority)
    }

    /// Extended resource of a device type; `None` for cpu.
    pub fn resource_name(&self, t: DeviceType) -> Option<&str> {
        self.resource_names.get(&t).map(String::as_str)
    }

    /// The device type whose resource is `name`, if any.
    pub fn device_type_of_resource(&self, name: &str) -> Option<DeviceType> {
        self.resource_names
            .iter()
            .find(|(_, r)| r.as_str() == name)
            .map(|(t, _)| *t)
    }
}

/// Settings that may come from a flag or env (already merged by clap).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub priorities: Vec<(DeviceType, u32)>,
    pub resource_names: Vec<(DeviceType, String)>,
    pub cpu_fallback: Option<bool>,
    pub unschedulable_grace: Option<Duration>,
    pub serve_image: Option<String>,
    pub serve_image_pull_policy: Option<String>,
}

/// The `--config` file (YAML). Every field is optional.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FileConfig {
    #[serde(default)]
    pub priorities: BTreeMap<String, u32>,
    #[serde(default)]
    pub resource_names: BTreeMap<String, String>,
    pub cpu_fallback: Option<bool>,
    /// e.g. `300s`, `5m`.
    pub unschedulable_grace_period: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid: {source}")]
    Parse {
        path: PathBuf,
        source: serde_yaml::Error,
    },
    #[error("{context}: {source}")]
    DeviceType {
        context: String,
        source: rm_crds::DeviceStringError,
    },
    #[error("{0:?} is not TYPE=VALUE (e.g. gpu=75 or rbln=rebellions.ai/npu)")]
    NotKeyValue(String),
    #[error("{0:?} is not a whole number")]
    NotANumber(String),
    #[error("duration {0:?} is not valid; write e.g. 90s, 5m or 1h")]
    Duration(String),
    #[error("cpu has no resource name; only rbln, furiosa and gpu take one")]
    CpuResource,
}

impl OperatorConfig {
    /// Merges `overrides` (flag/env) over the file over the defaults.
    pub fn load(overrides: &Overrides) -> Result<Self, ConfigError> {
        let file = match &overrides.config_file {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        let mut config = OperatorConfig::default();
        for (name, value) in &file.priorities {
            config.priorities.insert(
                parse_type(name, "priorities in the config file")?,
                Priority(*value),
            );
        }
        for (name, value) in &file.resource_names {
            let t = parse_type(name, "resourceNames in the config file")?;
            if t == DeviceType::Cpu {
                return Err(ConfigError::CpuResource);
            }
            config.resource_names.insert(t, value.clone());
        }
        if let Some(v) = file.cpu_fallback {
            config.cpu_fallback = v;
        }
        if let Some(v) = &file.unschedulable_grace_period {
            config.unschedulable_grace = parse_duration(v)?;
        }
        for (t, value) in &overrides.priorities {
            config.priorities.insert(*t, Priority(*value));
        }
        for (t, value) in &overrides.resource_names {
            if *t == DeviceType::Cpu {
                return Err(ConfigError::CpuResource);
            }
            config.resource_names.insert(*t, value.clone());
        }
        if let Some(v) = overrides.cpu_fallback {
            config.cpu_fallback = v;
        }
        if let Some(v) = overrides.unschedulable_grace {
            config.unschedulable_grace = v;
        }
        if let Some(v) = &overrides.serve_image {
            config.serve.image = v.clone();
        }
        if let Some(v) = overrides.serve_image_pull_policy.as_deref() {
            // "" leaves the cluster's default, so a chart can pass the value unconditionally.
            config.serve.image_pull_policy = Some(v.to_string()).filter(|v| !v.is_empty());
        }
        Ok(config)
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

fn parse_type(name: &str, context: &str) -> Result<DeviceType, ConfigError> {
    name.parse().map_err(|source| ConfigError::DeviceType {
        context: context.to_string(),
        source,
    })
}

/// Parses `TYPE=VALUE` (flag and env syntax).
pub fn parse_type_value(s: &str) -> Result<(DeviceType, String), ConfigError> {
    let (t, v) = s
        .split_once('=')
        .ok_or_else(|| ConfigError::NotKeyValue(s.to_string()))?;
    Ok((parse_type(t, s)?, v.trim().to_string()))
}

/// Parses `TYPE=N` for priorities.
pub fn parse_priority(s: &str) -> Result<(DeviceType, u32), ConfigError> {
    let (t, v) = parse_type_value(s)?;
    let n = v.parse().map_err(|_| ConfigError::NotANumber(v.clone()))?;
    Ok((t, n))
}

/// Parses `90`, `90s`, `5m`, `1h`.
pub fn parse_duration(s: &str) -> Result<Duration, ConfigError> {
    let s = s.trim();
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| ConfigError::Duration(s.to_string()))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(ConfigError::Duration(s.to_string())),
    };
    Ok(Duration::from_secs(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_order_is_npus_then_gpu_then_cpu() {
        let c = OperatorConfig::default();
        assert_eq!(
            c.priority_order(),
            [
                DeviceType::Rbln,
                DeviceType::Furiosa,
                DeviceType::Gpu,
                DeviceType::Cpu
            ]
        );
        let no_cpu = OperatorConfig {
            cpu_fallback: false,
            ..c
        };
        assert!(!no_cpu.priority_order().contains(&DeviceType::Cpu));
    }

    #[test]
    fn flag_beats_file_beats_default() {
        let dir = std::env::temp_dir().join(format!("rm-op-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.yaml");
        std::fs::write(
            &file,
            "priorities: {gpu: 120, furiosa: 90}\nresourceNames: {atom: rebellions.ai/npu}\ncpuFallback: false\nunschedulableGracePeriod: 2m\n",
        )
        .unwrap();
        let overrides = Overrides {
            config_file: Some(file),
            priorities: vec![(DeviceType::Gpu, 10)],
            cpu_fallback: Some(true),
            ..Default::default()
        };
        let c = OperatorConfig::load(&overrides).unwrap();
        assert_eq!(c.priority(DeviceType::Gpu), Priority(10), "flag wins");
        assert_eq!(
            c.priority(DeviceType::Furiosa),
            Priority(90),
            "file beats default"
        );
        assert_eq!(c.priority(DeviceType::Rbln), Priority::HIGHEST, "default");
        assert_eq!(c.resource_name(DeviceType::Rbln), Some("rebellions.ai/npu"));
        assert!(c.cpu_fallback);
        assert_eq!(c.unschedulable_grace, Duration::from_secs(120));
        assert_eq!(
            c.priority_order(),
            [
                DeviceType::Rbln,
                DeviceType::Furiosa,
                DeviceType::Gpu,
                DeviceType::Cpu
            ]
        );
    }

    #[test]
    fn bad_config_says_what_is_wrong() {
        let dir = std::env::temp_dir().join(format!("rm-op-badconfig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("config.yaml");
        std::fs::write(&file, "priorities: {tpu: 1}\n").unwrap();
        let err = OperatorConfig::load(&Overrides {
            config_file: Some(file.clone()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("tpu") && err.contains("rbln"), "{err}");
        std::fs::write(&file, "priority: {gpu: 1}\n").unwrap();
        let err = OperatorConfig::load(&Overrides {
            config_file: Some(file),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(err.contains("unknown field `priority`"), "{err}");
        assert!(parse_duration("5 minutes").is_err());
        assert_eq!(parse_duration("90").unwrap(), Duration::from_secs(90));
        assert!(parse_priority("gpu").is_err());
    }
}
