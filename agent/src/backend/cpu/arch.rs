//! The model architectures the cpu backend runs from safetensors, told by
//! `config.json`'s `model_type`, and what differs between them on the way to
//! GGUF. GGUF sources name theirs in `general.architecture`.

use std::fs;
use std::path::Path;

use candle_transformers::models::qwen2;
use serde::Deserialize;

use crate::backend::BackendError;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Arch {
    /// Llama, SmolLM, TinyLlama, ...: candle's `llama`.
    Llama,
    /// Qwen2 and Qwen2.5: llama plus q/k/v biases and the rope in HF's own
    /// (NEOX) layout; candle's `qwen2`.
    Qwen2,
}

/// `model_type`s accepted, for error messages.
const SUPPORTED: &str = "llama, qwen2";

/// The parts of an HF `config.json` the backend reads beyond candle's
/// per-architecture configs.
#[derive(Debug, Default, Deserialize)]
struct HfConfig {
    #[serde(default)]
    model_type: Option<String>,
    #[serde(default)]
    bos_token_id: Option<u32>,
}

fn read_config(dir: &Path) -> Result<(Vec<u8>, HfConfig), BackendError> {
    let raw = fs::read(dir.join("config.json"))
        .map_err(|e| BackendError::Unsupported(format!("config.json: {e}")))?;
    let cfg = serde_json::from_slice(&raw)
        .map_err(|e| BackendError::Unsupported(format!("config.json is not valid: {e}")))?;
    Ok((raw, cfg))
}

impl Arch {
    /// The architecture of a safetensors model directory. A config without
    /// `model_type` is taken as llama (older exports omit it).
    pub fn of_dir(dir: &Path) -> Result<Arch, BackendError> {
        let (_, cfg) = read_config(dir)?;
        Arch::of_model_type(cfg.model_type.as_deref())
    }

    /// The architecture `config.json`'s bytes name.
    pub fn of_config(raw: &[u8]) -> Result<Arch, BackendError> {
        let cfg: HfConfig = serde_json::from_slice(raw)
            .map_err(|e| BackendError::Unsupported(format!("config.json is not valid: {e}")))?;
        Arch::of_model_type(cfg.model_type.as_deref())
    }

    fn of_model_type(model_type: Option<&str>) -> Result<Arch, BackendError> {
        match model_type {
            None | Some("llama") => Ok(Arch::Llama),
            Some("qwen2") => Ok(Arch::Qwen2),
            Some(other) => Err(BackendError::Unsupported(format!(
                "model_type {other:?} is not supported by the cpu backend from safetensors \
                 (supported: {SUPPORTED}); a GGUF of it may run on llama.cpp"
            ))),
        }
    }

    /// `general.architecture` and the metadata key prefix in GGUF.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
        }
    }

    /// llama.cpp's llama expects q/k rows interleaved for its rope; its qwen2
    /// takes HF's layout as it is.
    pub fn permutes_rope(self) -> bool {
        self == Arch::Llama
    }

    /// Whether q/k/v projections carry biases.
    pub fn has_qkv_bias(self) -> bool {
        self == Arch::Qwen2
    }
}

/// Whether the cpu backend runs the safetensors model in `dir`, by
/// `config.json`'s `model_type` alone (no weights read), for selection.
/// Only a `model_type` it does not run is refused: a config that is missing
/// or unreadable is left to the compile, which says what is wrong with it.
pub fn accepts_dir(dir: &Path) -> Result<(), String> {
    match read_config(dir) {
        Ok((_, cfg)) => Arch::of_model_type(cfg.model_type.as_deref())
            .map(|_| ())
            .map_err(|e| e.to_string()),
        Err(_) => Ok(()),
    }
}

/// `bos_token_id` of `config.json`, whatever the architecture.
pub fn bos_token_id(dir: &Path) -> Result<Option<u32>, BackendError> {
    Ok(read_config(dir)?.1.bos_token_id)
}

/// candle's Qwen2 config from `config.json`. Read through our own struct so
/// that configs without the sliding-window fields load too: Qwen2 uses no
/// sliding window unless `use_sliding_window` says so.
pub fn read_qwen2_config(dir: &Path) -> Result<qwen2::Config, BackendError> {
    parse_qwen2_config(&read_config(dir)?.0)
}

/// [`read_qwen2_config`] from `config.json`'s bytes.
pub fn parse_qwen2_config(raw: &[u8]) -> Result<qwen2::Config, BackendError> {
    #[derive(Deserialize)]
    struct Raw {
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        #[serde(default)]
        num_key_value_heads: Option<usize>,
        #[serde(default = "default_max_positions")]
        max_position_embeddings: usize,
        #[serde(default)]
        sliding_window: Option<usize>,
        #[serde(default)]
        use_sliding_window: bool,
        #[serde(default)]
        max_window_layers: Option<usize>,
        #[serde(default)]
        tie_word_embeddings: bool,
        #[serde(default = "default_rope_theta")]
        rope_theta: f64,
        #[serde(default = "default_rms_eps")]
        rms_norm_eps: f64,
        #[serde(default = "default_act")]
        hidden_act: candle_nn::Activation,
    }
    fn default_max_positions() -> usize {
        32768
    }
    fn default_rope_theta() -> f64 {
        1_000_000.0
    }
    fn default_rms_eps() -> f64 {
        1e-6
    }
    fn default_act() -> candle_nn::Activation {
        candle_nn::Activation::Silu
    }
    let r: Raw = serde_json::from_slice(raw).map_err(|e| {
        BackendError::Unsupported(format!(
            "config.json is not a Qwen2 config the cpu backend understands: {e}"
        ))
    })?;
    let window = match (r.use_sliding_window, r.sliding_window) {
        (true, Some(w)) => w,
        _ => r.max_position_embeddings,
    };
    Ok(qwen2::Config {
        vocab_size: r.vocab_size,
        hidden_size: r.hidden_size,
        intermediate_size: r.intermediate_size,
        num_hidden_layers: r.num_hidden_layers,
        num_attention_heads: r.num_attention_heads,
        num_key_value_heads: r.num_key_value_heads.unwrap_or(r.num_attention_heads),
        max_position_embeddings: r.max_position_embeddings,
        sliding_window: window,
        max_window_layers: r.max_window_layers.unwrap_or(r.num_hidden_layers),
        tie_word_embeddings: r.tie_word_embeddings,
        rope_theta: r.rope_theta,
        rms_norm_eps: r.rms_norm_eps,
        use_sliding_window: r.use_sliding_window,
        hidden_act: r.hidden_act,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(config: &str) -> tempfile::TempDir {
        let d = tempfile::tempdir().expect("tempdir");
        fs::write(d.path().join("config.json"), config).expect("write");
        d
    }

    #[test]
    fn model_type_picks_the_architecture() {
        let d = dir_with(r#"{"model_type": "qwen2", "bos_token_id": 151643}"#);
        assert_eq!(Arch::of_dir(d.path()).ok(), Some(Arch::Qwen2));
        assert_eq!(bos_token_id(d.path()).ok(), Some(Some(151643)));
        let d = dir_with(r#"{"hidden_size": 8}"#);
        assert_eq!(Arch::of_dir(d.path()).ok(), Some(Arch::Llama));
        let d = dir_with(r#"{"model_type": "mamba"}"#);
        let err = Arch::of_dir(d.path()).expect_err("mamba");
        assert!(err.to_string().contains("\"mamba\""), "{err}");
        assert!(err.to_string().contains("qwen2"), "{err}");
    }

    #[test]
    fn selection_is_refused_only_for_an_architecture_the_backend_does_not_run() {
        let d = dir_with(r#"{"model_type": "gpt2", "n_layer": 2}"#);
        let why = accepts_dir(d.path()).expect_err("gpt2");
        assert!(
            why.starts_with("model_type \"gpt2\" is not supported by the cpu backend"),
            "{why}"
        );
        assert!(accepts_dir(dir_with(r#"{"model_type": "qwen2"}"#).path()).is_ok());
        assert!(accepts_dir(dir_with(r#"{"hidden_size": 8}"#).path()).is_ok());
        // Malformed or missing: the compile's error says what is wrong.
        assert!(accepts_dir(dir_with("not json").path()).is_ok());
        let empty = tempfile::tempdir().expect("tempdir");
        assert!(accepts_dir(empty.path()).is_ok());
    }

    #[test]
    fn qwen2_config_without_sliding_window_fields_loads() {
        let d = dir_with(
            r#"{"model_type": "qwen2", "vocab_size": 256, "hidden_size": 64,
                "intermediate_size": 128, "num_hidden_layers": 2,
                "num_attention_heads": 4, "num_key_value_heads": 2,
                "max_position_embeddings": 512, "tie_word_embeddings": true}"#,
        );
        let c = read_qwen2_config(d.path()).expect("config");
        assert_eq!(c.sliding_window, 512, "no window: the whole context");
        assert_eq!(c.num_key_value_heads, 2);
        assert!(c.tie_word_embeddings);
        let d = dir_with(r#"{"model_type": "qwen2", "hidden_size": 64}"#);
        assert!(read_qwen2_config(d.path()).is_err());
    }
}
