//! Configuration from the environment the operator sets (the contract with
//! the operator; see serve/README.md). A pure function of a variable lookup.

use std::path::PathBuf;

use rm_crds::{CompileOptions, DeviceRequest};

/// Where the model comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum ModelSource {
    /// A hub id (`org/name`, optionally `@revision`): the agent downloads it.
    Hub {
        id: String,
        revision: Option<String>,
    },
    /// `file:///node/path`: a path on the node the agent reads.
    NodePath(String),
    /// A directory (or `.gguf` file) inside this container, e.g. a mounted
    /// PVC: uploaded to the agent as blobs.
    Local(PathBuf),
}

#[derive(Clone, Debug)]
pub struct Config {
    pub source: ModelSource,
    /// The model id in the API.
    pub model_name: String,
    /// The workload, for messages (`kubectl patch inferenceworkload <name>`).
    pub workload: Option<String>,
    pub device: String,
    /// Sent to the agent's prepare as given (validated against the CRD's
    /// bounds here, so that a typo fails at start, not later).
    pub compile_options: Option<serde_json::Value>,
    pub agent_socket: PathBuf,
    pub token: Option<String>,
    pub port: u16,
    /// `max_tokens` of a chat that does not say (completions default to
    /// OpenAI's 16).
    pub default_chat_max_tokens: usize,
}

pub const DEFAULT_SOCKET: &str = "/var/run/rm-abstract/agent.sock";
pub const DEFAULT_PORT: u16 = 8000;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error(
        "RM_SERVE_MODEL_SOURCE is not set; set it to a hub id, file:///node/path or a directory in this container"
    )]
    NoSource,
    #[error("{name}={value:?} is invalid: {why}")]
    Invalid {
        name: &'static str,
        value: String,
        why: String,
    },
    #[error("the model's name is unknown: set RM_SERVE_MODEL_NAME or RM_WORKLOAD_NAME")]
    NoName,
}

impl Config {
    /// Reads the configuration through `var` (the process environment in
    /// `main`, a map in tests). `exists` says whether a container path is
    /// there (a hub id and a relative directory look alike).
    pub fn from_lookup(
        var: impl Fn(&str) -> Option<String>,
        exists: impl Fn(&str) -> bool,
    ) -> Result<Config, ConfigError> {
        let get = |n: &str| {
            var(n)
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
        };
        let invalid = |name: &'static str, value: &str, why: String| ConfigError::Invalid {
            name,
            value: value.to_string(),
            why,
        };
        let raw = get("RM_SERVE_MODEL_SOURCE").ok_or(ConfigError::NoSource)?;
        let mut source = parse_source(&raw, &exists)
            .map_err(|why| invalid("RM_SERVE_MODEL_SOURCE", &raw, why))?;
        // The operator passes spec.model.revision on its own; an `@rev` in
        // the source itself wins.
        if let ModelSource::Hub { revision, .. } = &mut source {
            if revision.is_none() {
                *revision = get("RM_SERVE_MODEL_REVISION");
            }
        }
        let workload = get("RM_WORKLOAD_NAME");
        let model_name = get("RM_SERVE_MODEL_NAME")
            .or_else(|| workload.clone())
            .ok_or(ConfigError::NoName)?;
        let device = get("RM_DEVICE").unwrap_or_else(|| "auto".into());
        device
            .parse::<DeviceRequest>()
            .map_err(|e| invalid("RM_DEVICE", &device, e.to_string()))?;
        let compile_options = match get("RM_COMPILE_OPTIONS") {
            None => None,
            Some(s) => {
                let v: serde_json::Value = serde_json::from_str(&s)
                    .map_err(|e| invalid("RM_COMPILE_OPTIONS", &s, e.to_string()))?;
                // The CRD's camelCase form checked here; the agent also takes
                // its aliases, so only an object is required of those.
                if !v.is_object() {
                    return Err(invalid(
                        "RM_COMPILE_OPTIONS",
                        &s,
                        "not a JSON object".into(),
                    ));
                }
                if let Ok(o) = serde_json::from_value::<CompileOptions>(v.clone()) {
                    o.validate()
                        .map_err(|why| invalid("RM_COMPILE_OPTIONS", &s, why))?;
                }
                Some(v)
            }
        };
        let port = match get("RM_SERVE_PORT") {
            None => DEFAULT_PORT,
            Some(p) => p.parse().map_err(|e: std::num::ParseIntError| {
                invalid("RM_SERVE_PORT", &p, e.to_string())
            })?,
        };
        let default_chat_max_tokens = match get("RM_SERVE_DEFAULT_MAX_TOKENS") {
            None => 256,
            Some(p) => p.parse().map_err(|e: std::num::ParseIntError| {
                invalid("RM_SERVE_DEFAULT_MAX_TOKENS", &p, e.to_string())
            })?,
        };
        // An accelerator's token wins: it may use the devices (the slot's only the CPU).
        let token = get("RM_AGENT_TOKEN").or_else(|| get("RM_AGENT_SLOT_TOKEN"));
        Ok(Config {
            source,
            model_name,
            workload,
            device,
            compile_options,
            agent_socket: get("RM_AGENT_SOCKET")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET)),
            token,
            port,
            default_chat_max_tokens,
        })
    }
}

fn parse_source(raw: &str, exists: &impl Fn(&str) -> bool) -> Result<ModelSource, String> {
    if let Some(path) = raw.strip_prefix("file://") {
        if !path.starts_with('/') {
            return Err("file:// needs an absolute node path (file:///models/x)".into());
        }
        return Ok(ModelSource::NodePath(path.to_string()));
    }
    if raw.starts_with('/') || raw.starts_with("./") || exists(raw) {
        if !exists(raw) {
            return Err("no such file or directory in this container".into());
        }
        return Ok(ModelSource::Local(PathBuf::from(raw)));
    }
    let id = raw.strip_prefix("hf://").unwrap_or(raw);
    let (id, revision) = match id.split_once('@') {
        Some((id, rev)) => (id, Some(rev.to_string())),
        None => (id, None),
    };
    let parts: Vec<&str> = id.split('/').collect();
    if parts.len() != 2 || parts.iter().any(|p| p.is_empty()) {
        return Err(
            "expected a hub id org/name[@revision], file:///node/path, or a path in this container"
                .into(),
        );
    }
    Ok(ModelSource::Hub {
        id: id.to_string(),
        revision,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn cfg(vars: &[(&str, &str)], existing: &[&str]) -> Result<Config, ConfigError> {
        let m: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let ex: Vec<String> = existing.iter().map(|s| s.to_string()).collect();
        Config::from_lookup(|k| m.get(k).cloned(), |p| ex.iter().any(|e| e == p))
    }

    #[test]
    fn sources_are_hub_ids_node_paths_or_container_paths() {
        let c = cfg(
            &[
                ("RM_SERVE_MODEL_SOURCE", "HuggingFaceTB/SmolLM2-135M@main"),
                ("RM_WORKLOAD_NAME", "w"),
            ],
            &[],
        )
        .expect("ok");
        assert_eq!(
            c.source,
            ModelSource::Hub {
                id: "HuggingFaceTB/SmolLM2-135M".into(),
                revision: Some("main".into())
            }
        );
        assert_eq!(
            (c.model_name.as_str(), c.port, c.device.as_str()),
            ("w", 8000, "auto")
        );
        assert_eq!(c.agent_socket, PathBuf::from(DEFAULT_SOCKET));
        let c = cfg(
            &[
                ("RM_SERVE_MODEL_SOURCE", "file:///models/x"),
                ("RM_SERVE_MODEL_NAME", "m"),
            ],
            &[],
        )
        .expect("ok");
        assert_eq!(c.source, ModelSource::NodePath("/models/x".into()));
        let c = cfg(
            &[
                ("RM_SERVE_MODEL_SOURCE", "/mnt/model"),
                ("RM_SERVE_MODEL_NAME", "m"),
            ],
            &["/mnt/model"],
        )
        .expect("ok");
        assert_eq!(c.source, ModelSource::Local("/mnt/model".into()));
        assert!(
            cfg(
                &[
                    ("RM_SERVE_MODEL_SOURCE", "/mnt/none"),
                    ("RM_SERVE_MODEL_NAME", "m")
                ],
                &[]
            )
            .is_err()
        );
        assert!(
            cfg(
                &[
                    ("RM_SERVE_MODEL_SOURCE", "not-a-hub-id"),
                    ("RM_SERVE_MODEL_NAME", "m")
                ],
                &[]
            )
            .is_err()
        );
        assert_eq!(
            cfg(&[("RM_SERVE_MODEL_NAME", "m")], &[]).unwrap_err(),
            ConfigError::NoSource
        );
        assert_eq!(
            cfg(&[("RM_SERVE_MODEL_SOURCE", "a/b")], &[]).unwrap_err(),
            ConfigError::NoName
        );
    }

    #[test]
    fn device_options_port_and_token_are_checked() {
        let base = [
            ("RM_SERVE_MODEL_SOURCE", "a/b"),
            ("RM_SERVE_MODEL_NAME", "m"),
        ];
        let with = |extra: &[(&str, &str)]| {
            let mut v = base.to_vec();
            v.extend_from_slice(extra);
            cfg(&v, &[])
        };
        assert!(with(&[("RM_DEVICE", "toaster")]).is_err());
        assert_eq!(with(&[("RM_DEVICE", "rbln")]).expect("ok").device, "rbln");
        assert!(with(&[("RM_COMPILE_OPTIONS", "{\"precision\": \"q8_0\"}")]).is_ok());
        assert!(with(&[("RM_COMPILE_OPTIONS", "{\"optimizationLevel\": 9}")]).is_err());
        assert!(with(&[("RM_COMPILE_OPTIONS", "[1]")]).is_err());
        assert!(with(&[("RM_SERVE_PORT", "x")]).is_err());
        let c = with(&[
            ("RM_AGENT_SLOT_TOKEN", "slot"),
            ("RM_AGENT_TOKEN", "acc"),
            ("RM_AGENT_SOCKET", "/s"),
        ])
        .expect("ok");
        assert_eq!(
            (c.token.as_deref(), c.agent_socket.to_str()),
            (Some("acc"), Some("/s"))
        );
        assert_eq!(
            with(&[("RM_AGENT_SLOT_TOKEN", "slot")])
                .expect("ok")
                .token
                .as_deref(),
            Some("slot")
        );
    }
}
