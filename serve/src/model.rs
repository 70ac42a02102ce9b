//! The served model's life: registered with the agent (uploaded as blobs
//! when it lies in this container), prepared (compiled) with progress, and
//! then ready. Until then, inference routes answer 503 saying how far it is.

use std::path::{Path, PathBuf};
use std::sync::RwLock;
use std::time::Duration;

use futures::StreamExt;
use hyper::{Method, StatusCode};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use crate::agent::{AgentCallError, AgentClient};
use crate::config::{Config, ModelSource};

#[derive(Clone, Debug, PartialEq)]
pub enum Phase {
    /// Registering (uploading, downloading) the model; what it is doing.
    Registering(String),
    Compiling {
        fraction: f64,
        stage: Option<String>,
    },
    Ready(Prepared),
    /// A failure waiting cannot fix (a bad model, a refused option).
    Failed(String),
}

/// The agent's prepare result.
#[derive(Clone, Debug, PartialEq)]
pub struct Prepared {
    pub key: String,
    pub backend: String,
    pub device_type: String,
    pub devices: Vec<String>,
}

pub struct ModelState {
    phase: RwLock<Phase>,
}

impl Default for ModelState {
    fn default() -> Self {
        ModelState {
            phase: RwLock::new(Phase::Registering("starting".into())),
        }
    }
}

impl ModelState {
    pub fn get(&self) -> Phase {
        self.phase.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn set(&self, p: Phase) {
        *self.phase.write().unwrap_or_else(|p| p.into_inner()) = p;
    }

    pub fn ready(&self) -> Option<Prepared> {
        match self.get() {
            Phase::Ready(p) => Some(p),
            _ => None,
        }
    }
}

/// What a request gets while the model is not ready.
pub fn not_ready_message(model: &str, device: &str, phase: &Phase) -> String {
    match phase {
        Phase::Registering(what) => format!("model {model} is not ready yet: {what}"),
        Phase::Compiling { fraction, stage } => format!(
            "model {model} is still compiling for {device}: {:.0}%{}",
            fraction * 100.0,
            stage
                .as_ref()
                .map(|s| format!(" ({s})"))
                .unwrap_or_default()
        ),
        Phase::Ready(_) => format!("model {model} is ready"),
        Phase::Failed(why) => format!("model {model} failed to load on {device}: {why}"),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Agent(#[from] AgentCallError),
    #[error("{0}")]
    Local(String),
}

impl StartError {
    fn is_retryable(&self) -> bool {
        match self {
            StartError::Agent(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Registers and prepares the model, retrying with backoff while the agent
/// is away or busy (503, 429); ends ready or failed.
pub async fn bring_up(client: &AgentClient, cfg: &Config, state: &ModelState) {
    let mut delay = Duration::from_millis(500);
    loop {
        match register_and_prepare(client, cfg, state).await {
            Ok(p) => {
                tracing::info!(model = %cfg.model_name, key = %p.key, backend = %p.backend,
                    device_type = %p.device_type, devices = ?p.devices, "model ready");
                state.set(Phase::Ready(p));
                return;
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(model = %cfg.model_name, error = %e, retry_in_s = delay.as_secs_f64(), "agent not ready; retrying");
                state.set(Phase::Registering(format!(
                    "waiting for the node agent ({e})"
                )));
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
            Err(e) => {
                tracing::error!(model = %cfg.model_name, error = %e, "the model cannot be served");
                state.set(Phase::Failed(e.to_string()));
                return;
            }
        }
    }
}

async fn register_and_prepare(
    client: &AgentClient,
    cfg: &Config,
    state: &ModelState,
) -> Result<Prepared, StartError> {
    let source = match &cfg.source {
        ModelSource::Hub { id, revision } => {
            state.set(Phase::Registering(format!(
                "the agent is fetching {id} from the hub"
            )));
            json!({"hub": id, "revision": revision})
        }
        ModelSource::NodePath(p) => json!({"path": p}),
        ModelSource::Local(dir) => json!({"files": upload(client, dir, state).await?}),
    };
    tracing::info!(model = %cfg.model_name, "registering the model with the agent");
    let reg = client
        .json(
            Method::POST,
            "/v1/models",
            Some(&json!({ "source": source })),
        )
        .await?;
    let digest = reg["model"].as_str().unwrap_or_default().to_string();
    tracing::info!(model = %cfg.model_name, digest = %digest, format = %reg["format"], bytes = %reg["bytes"], "registered; preparing");
    state.set(Phase::Compiling {
        fraction: 0.0,
        stage: None,
    });
    let mut body = json!({"model": digest, "device": cfg.device, "stream": true});
    if let Some(o) = &cfg.compile_options {
        body["options"] = o.clone();
    }
    let mut lines = client.ndjson("/v1/prepare", &body).await?;
    let mut last_logged = -1.0;
    while let Some(line) = lines.next().await {
        let line = line?;
        match line["event"].as_str() {
            Some("progress") => {
                let fraction = line["fraction"].as_f64().unwrap_or(0.0);
                let stage = line["stage"].as_str().map(str::to_string);
                // A line per tenth, not per update.
                if fraction - last_logged >= 0.1 {
                    tracing::info!(model = %cfg.model_name, device = %cfg.device, percent = (fraction * 100.0).round(), stage = ?stage, "compiling");
                    last_logged = fraction;
                }
                state.set(Phase::Compiling { fraction, stage });
            }
            Some("done") => {
                return Ok(Prepared {
                    key: line["key"].as_str().unwrap_or_default().to_string(),
                    backend: line["backend"].as_str().unwrap_or_default().to_string(),
                    device_type: line["device_type"].as_str().unwrap_or_default().to_string(),
                    devices: line["devices"]
                        .as_array()
                        .map(|d| {
                            d.iter()
                                .filter_map(|s| s.as_str().map(str::to_string))
                                .collect()
                        })
                        .unwrap_or_default(),
                });
            }
            Some("error") => {
                let status = line["status"].as_u64().unwrap_or(500) as u16;
                let message = line["message"].as_str().unwrap_or("").to_string();
                return Err(StartError::Agent(AgentCallError::Status {
                    status,
                    code: line["code"].as_str().unwrap_or("").into(),
                    message,
                    retry_after: None,
                }));
            }
            _ => {}
        }
    }
    Err(StartError::Agent(AgentCallError::Transport(
        "the prepare stream ended without a result".into(),
    )))
}

/// The files to upload, as the agent detects a model (and the in-pod
/// client mirrors): a `.gguf` file; a directory with config.json and
/// safetensors (weights in other formats left out); or a directory with one
/// `.gguf`.
pub fn model_files(path: &Path) -> Result<Vec<(String, PathBuf)>, String> {
    if path.is_file() {
        if path.extension().is_some_and(|e| e == "gguf") {
            return Ok(vec![("model.gguf".into(), path.to_path_buf())]);
        }
        return Err(format!(
            "{} is not a model: expected a directory or a .gguf file",
            path.display()
        ));
    }
    let mut files = Vec::new();
    walk(path, path, &mut files).map_err(|e| format!("{}: {e}", path.display()))?;
    files.sort();
    let has_config = files.iter().any(|(n, _)| n == "config.json");
    if has_config && files.iter().any(|(n, _)| n.ends_with(".safetensors")) {
        return Ok(files
            .into_iter()
            .filter(|(n, _)| !(n.ends_with(".bin") || n.ends_with(".gguf") || n.ends_with(".pt")))
            .collect());
    }
    let ggufs: Vec<_> = files
        .into_iter()
        .filter(|(n, _)| n.ends_with(".gguf"))
        .collect();
    match ggufs.as_slice() {
        [(_, f)] => Ok(vec![("model.gguf".into(), f.clone())]),
        _ => Err(format!(
            "{} holds no model the agent can read: it needs config.json + *.safetensors, or exactly one .gguf",
            path.display()
        )),
    }
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        let name = e.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let p = e.path();
        if p.is_dir() {
            walk(root, &p, out)?;
        } else if p.is_file() {
            let rel = p
                .strip_prefix(root)
                .unwrap_or(&p)
                .to_string_lossy()
                .into_owned();
            out.push((rel, p));
        }
    }
    Ok(())
}

fn file_sha256(p: &Path) -> std::io::Result<(String, u64)> {
    use std::io::Read;
    let mut f = std::fs::File::open(p)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf)?;
        if k == 0 {
            break;
        }
        h.update(&buf[..k]);
        n += k as u64;
    }
    let hex: String = h.finalize().iter().map(|b| format!("{b:02x}")).collect();
    Ok((hex, n))
}

/// Uploads what the agent lacks; answers the `files` listing to register.
async fn upload(
    client: &AgentClient,
    dir: &Path,
    state: &ModelState,
) -> Result<Vec<Value>, StartError> {
    let d = dir.to_path_buf();
    let hashed = tokio::task::spawn_blocking(
        move || -> Result<Vec<(String, PathBuf, String, u64)>, String> {
            model_files(&d)?
                .into_iter()
                .map(|(rel, p)| {
                    let (sha, n) = file_sha256(&p).map_err(|e| format!("{}: {e}", p.display()))?;
                    Ok((rel, p, sha, n))
                })
                .collect()
        },
    )
    .await
    .map_err(|e| StartError::Local(e.to_string()))?
    .map_err(StartError::Local)?;
    let total = hashed.len();
    let mut listing = Vec::with_capacity(total);
    for (i, (rel, path, sha, size)) in hashed.into_iter().enumerate() {
        if client.head(&format!("/v1/blobs/{sha}")).await? != StatusCode::OK {
            state.set(Phase::Registering(format!(
                "uploading {rel} ({}/{total}, {size} bytes)",
                i + 1
            )));
            tracing::info!(file = %rel, bytes = size, n = i + 1, of = total, "uploading to the agent");
            client.put_blob(&sha, &path, size).await?;
        }
        listing.push(json!({"path": rel, "sha256": sha}));
    }
    Ok(listing)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_ready_messages_say_how_far() {
        let m = not_ready_message(
            "smol",
            "rbln",
            &Phase::Compiling {
                fraction: 0.4,
                stage: Some("quantize".into()),
            },
        );
        assert_eq!(m, "model smol is still compiling for rbln: 40% (quantize)");
        let m = not_ready_message("smol", "cpu", &Phase::Failed("422: bad".into()));
        assert!(m.contains("failed") && m.contains("422: bad"));
    }

    #[test]
    fn model_files_mirror_the_agents_detection() {
        let d = tempfile::tempdir().expect("tmp");
        let p = d.path();
        std::fs::write(p.join("config.json"), "{}").expect("w");
        std::fs::write(p.join("model.safetensors"), "x").expect("w");
        std::fs::write(p.join("pytorch_model.bin"), "x").expect("w");
        std::fs::write(p.join(".hidden"), "x").expect("w");
        let names: Vec<String> = model_files(p)
            .expect("ok")
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(names, vec!["config.json", "model.safetensors"]);
        let g = tempfile::tempdir().expect("tmp");
        std::fs::write(g.path().join("m.gguf"), "x").expect("w");
        assert_eq!(model_files(g.path()).expect("ok")[0].0, "model.gguf");
        std::fs::write(g.path().join("n.gguf"), "x").expect("w");
        assert!(model_files(g.path()).is_err());
    }
}
