//! A safetensors model's `config.json`, checked before anything is built
//! from it: against bounds every real model fits, and against the shapes the
//! weights' own headers declare.
//!
//! candle sizes its work from the config and trusts it: the rotary tables
//! are `max_position_embeddings × head_dim / 2` floats (built at every
//! request by its llama, at load by its qwen2), the layer count drives loops
//! and vectors, the head counts divide. A failed allocation aborts the
//! process, which `catch_unwind` cannot stop (and with overcommit the
//! kernel's OOM killer may pick the agent first), so a config of two billion
//! positions or a trillion layers uploaded by one tenant would end every
//! tenant's work. The compile (before it copies, casts or converts a model)
//! and the engine (before it loads a safetensors artifact, perhaps compiled
//! by an older agent) both go through [`check_dir`], which reads nothing in
//! proportion to a number in the config: the config file and the headers
//! are capped in size, and the checks are arithmetic on the declared shapes.
//!
//! Refusals are [`BackendError::Malformed`] (a 422, counted in
//! `rm_agent_models_malformed_total`) and name the field, its value and the
//! bound; a model the backend cannot run though it may be sound (a
//! `head_dim` other than `hidden_size / num_attention_heads`, a tensor
//! candle needs that is absent) stays [`BackendError::Unsupported`].

use std::collections::HashMap;
use std::fs;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_transformers::models::{llama, qwen2};
use serde::Deserialize;

use super::arch::{self, Arch};
use crate::backend::BackendError;

/// Transformer blocks (Llama 3.1 405B has 126).
pub const MAX_LAYERS: usize = 1024;
/// Positions (Qwen2.5-1M: 1 010 000).
pub const MAX_POSITIONS: usize = 1 << 21;
/// Vocabulary entries (the largest vocabularies have about 260 000).
pub const MAX_VOCAB: usize = 1 << 22;
/// Model width (Llama 3.1 405B: 16 384).
pub const MAX_HIDDEN: usize = 1 << 16;
/// MLP width (Llama 3.1 405B: 53 248).
pub const MAX_INTERMEDIATE: usize = 1 << 18;
/// Attention heads, and key/value heads (Llama 3.1 405B: 128).
pub const MAX_HEADS: usize = 1024;
/// Width of one head (real models: 64 to 256).
pub const MAX_HEAD_DIM: usize = 1024;
/// Rotary base (real models: 10 000 to 5 × 10⁸).
pub const MAX_ROPE_THETA: f64 = 1e12;
/// The rotary tables (`positions × head_dim` floats: cosines and sines)
/// may always hold this many values (64 MiB in f32; Llama 3.1 8B's 131 072
/// positions × 128 fill it exactly), and beyond it up to a quarter of the
/// weights' values: a table is built per sequence, so it must stay small
/// beside the model that needs it, and a few kilobytes of weights must not
/// ask for gigabytes.
pub const ROPE_TABLE_FLOOR: u64 = 1 << 24;
/// `config.json` is a few kilobytes; it is read whole.
const MAX_CONFIG_BYTES: u64 = 16 << 20;
/// The safetensors format's own limit on a header (the `safetensors` crate's).
const MAX_HEADER_BYTES: u64 = 100_000_000;

/// The numbers of a config that size the model, as the engine reads them
/// (candle's llama config, or the agent's Qwen2 reader with its defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct Dims {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub max_position_embeddings: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    pub tie_word_embeddings: bool,
    /// `head_dim` when the config states it (candle derives it).
    pub head_dim_field: Option<u64>,
    /// The attention window, when `use_sliding_window` turns one on.
    pub sliding_window: Option<usize>,
    /// Whether `rope_scaling` is set (not null).
    pub rope_scaling: bool,
    /// candle llama's Llama 3 rope scaling: (factor, low_freq_factor,
    /// high_freq_factor, original_max_position_embeddings).
    pub llama3_scaling: Option<(f32, f32, f32, usize)>,
}

impl Dims {
    /// The width of one head, as candle computes it.
    pub fn head_dim(&self) -> usize {
        self.hidden_size / self.num_attention_heads.max(1)
    }
}

/// The architecture's own config, for its candle loader.
#[derive(Clone, Debug)]
pub enum ModelConfig {
    Llama(llama::LlamaConfig),
    Qwen2(qwen2::Config),
}

/// A model directory whose config passed [`check_dir`].
#[derive(Clone, Debug)]
pub struct CheckedModel {
    pub arch: Arch,
    pub config: ModelConfig,
    pub dims: Dims,
}

fn malformed(m: String) -> BackendError {
    BackendError::Malformed(m)
}

/// Checks the config and weights' headers of a safetensors model directory
/// (a source model or a compiled entry). Reads `config.json` (capped in
/// size) and the header of each `*.safetensors`, never the weights.
pub fn check_dir(dir: &Path) -> Result<CheckedModel, BackendError> {
    let raw = read_config(dir)?;
    let (arch, config, dims) = parse(&raw)?;
    check_bounds(&dims)?;
    let weights = read_headers(dir)?;
    check_tensors(arch, &dims, &weights.tensors)?;
    check_rope(&dims, weights.values)?;
    Ok(CheckedModel { arch, config, dims })
}

fn read_config(dir: &Path) -> Result<Vec<u8>, BackendError> {
    let path = dir.join("config.json");
    let f = fs::File::open(&path)
        .map_err(|e| BackendError::Unsupported(format!("config.json: {e}")))?;
    let mut raw = Vec::new();
    f.take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut raw)
        .map_err(|e| BackendError::Io(format!("{}: {e}", path.display())))?;
    if raw.len() as u64 > MAX_CONFIG_BYTES {
        return Err(malformed(format!(
            "config.json is larger than {} MiB; a model's config is a few kilobytes",
            MAX_CONFIG_BYTES >> 20
        )));
    }
    Ok(raw)
}

/// candle's llama config from `config.json`'s bytes.
pub fn parse_llama_config(raw: &[u8]) -> Result<llama::LlamaConfig, BackendError> {
    serde_json::from_slice(raw).map_err(|e| {
        BackendError::Unsupported(format!(
            "config.json is not a llama-family config the cpu backend understands: {e}"
        ))
    })
}

/// The fields candle does not read but the check does.
#[derive(Debug, Default, Deserialize)]
struct Extra {
    #[serde(default)]
    head_dim: Option<u64>,
    #[serde(default)]
    rope_scaling: Option<serde_json::Value>,
}

fn parse(raw: &[u8]) -> Result<(Arch, ModelConfig, Dims), BackendError> {
    let arch = Arch::of_config(raw)?;
    let extra: Extra = serde_json::from_slice(raw).map_err(|e| {
        BackendError::Unsupported(format!(
            "config.json's head_dim or rope_scaling cannot be read: {e}"
        ))
    })?;
    let rope_scaling = extra.rope_scaling.is_some_and(|v| !v.is_null());
    Ok(match arch {
        Arch::Llama => {
            let c = parse_llama_config(raw)?;
            let dims = Dims {
                vocab_size: c.vocab_size,
                hidden_size: c.hidden_size,
                intermediate_size: c.intermediate_size,
                num_hidden_layers: c.num_hidden_layers,
                num_attention_heads: c.num_attention_heads,
                num_key_value_heads: c.num_key_value_heads(),
                max_position_embeddings: c.max_position_embeddings,
                rope_theta: f64::from(c.rope_theta),
                rms_norm_eps: c.rms_norm_eps,
                tie_word_embeddings: c.tie_word_embeddings.unwrap_or(false),
                head_dim_field: extra.head_dim,
                sliding_window: None,
                rope_scaling,
                llama3_scaling: c.rope_scaling.as_ref().map(|s| {
                    (
                        s.factor,
                        s.low_freq_factor,
                        s.high_freq_factor,
                        s.original_max_position_embeddings,
                    )
                }),
            };
            (arch, ModelConfig::Llama(c), dims)
        }
        Arch::Qwen2 => {
            let c = arch::parse_qwen2_config(raw)?;
            let dims = Dims {
                vocab_size: c.vocab_size,
                hidden_size: c.hidden_size,
                intermediate_size: c.intermediate_size,
                num_hidden_layers: c.num_hidden_layers,
                num_attention_heads: c.num_attention_heads,
                num_key_value_heads: c.num_key_value_heads,
                max_position_embeddings: c.max_position_embeddings,
                rope_theta: c.rope_theta,
                rms_norm_eps: c.rms_norm_eps,
                tie_word_embeddings: c.tie_word_embeddings,
                head_dim_field: extra.head_dim,
                sliding_window: c.use_sliding_window.then_some(c.sliding_window),
                rope_scaling,
                llama3_scaling: None,
            };
            (arch, ModelConfig::Qwen2(c), dims)
        }
    })
}

fn within(field: &str, v: usize, lo: usize, hi: usize) -> Result<(), BackendError> {
    if v < lo {
        return Err(malformed(format!(
            "config.json: {field} is {v}; it must be at least {lo}"
        )));
    }
    if v > hi {
        return Err(malformed(format!(
            "config.json: {field} is {v}, more than {hi}, the most the cpu backend accepts"
        )));
    }
    Ok(())
}

fn positive(field: &str, v: f64, max: f64) -> Result<(), BackendError> {
    if !(v.is_finite() && v > 0.0 && v <= max) {
        let max = if max >= 1e6 {
            format!("{max:e}")
        } else {
            max.to_string()
        };
        return Err(malformed(format!(
            "config.json: {field} is {v}; it must be a number above 0 and at most {max}"
        )));
    }
    Ok(())
}

/// Every number within the bounds, and the ones that must divide do.
pub fn check_bounds(d: &Dims) -> Result<(), BackendError> {
    within("vocab_size", d.vocab_size, 1, MAX_VOCAB)?;
    within("hidden_size", d.hidden_size, 1, MAX_HIDDEN)?;
    within(
        "intermediate_size",
        d.intermediate_size,
        1,
        MAX_INTERMEDIATE,
    )?;
    within("num_hidden_layers", d.num_hidden_layers, 1, MAX_LAYERS)?;
    within("num_attention_heads", d.num_attention_heads, 1, MAX_HEADS)?;
    within("num_key_value_heads", d.num_key_value_heads, 1, MAX_HEADS)?;
    within(
        "max_position_embeddings",
        d.max_position_embeddings,
        1,
        MAX_POSITIONS,
    )?;
    if let Some(w) = d.sliding_window {
        within("sliding_window", w, 1, MAX_POSITIONS)?;
    }
    positive("rope_theta", d.rope_theta, MAX_ROPE_THETA)?;
    positive("rms_norm_eps", d.rms_norm_eps, 1.0)?;
    if let Some((factor, low, high, original)) = d.llama3_scaling {
        positive("rope_scaling.factor", f64::from(factor), 1e6)?;
        positive("rope_scaling.low_freq_factor", f64::from(low), 1e6)?;
        positive("rope_scaling.high_freq_factor", f64::from(high), 1e6)?;
        if low == high {
            return Err(malformed(format!(
                "config.json: rope_scaling.low_freq_factor and high_freq_factor are both {low}; they must differ"
            )));
        }
        within(
            "rope_scaling.original_max_position_embeddings",
            original,
            1,
            MAX_POSITIONS,
        )?;
    }
    if d.hidden_size % d.num_attention_heads != 0 {
        return Err(malformed(format!(
            "config.json: hidden_size {} is not a multiple of num_attention_heads {}",
            d.hidden_size, d.num_attention_heads
        )));
    }
    if d.num_key_value_heads > d.num_attention_heads
        || d.num_attention_heads % d.num_key_value_heads != 0
    {
        return Err(malformed(format!(
            "config.json: num_key_value_heads {} does not divide num_attention_heads {}",
            d.num_key_value_heads, d.num_attention_heads
        )));
    }
    let head_dim = d.head_dim();
    if let Some(h) = d.head_dim_field {
        if h > MAX_HEAD_DIM as u64 {
            return Err(malformed(format!(
                "config.json: head_dim is {h}, more than {MAX_HEAD_DIM}, the most the cpu backend accepts"
            )));
        }
        if h != head_dim as u64 {
            return Err(BackendError::Unsupported(format!(
                "config.json: head_dim is {h}, but hidden_size / num_attention_heads is {head_dim}; \
                 the cpu backend runs only models whose heads split hidden_size"
            )));
        }
    }
    if head_dim > MAX_HEAD_DIM || head_dim % 2 != 0 {
        return Err(malformed(format!(
            "config.json: hidden_size / num_attention_heads is {head_dim}; a head must be an even width of at most {MAX_HEAD_DIM} for rotary embeddings"
        )));
    }
    Ok(())
}

/// What the weights' headers declare.
#[derive(Debug, Default)]
pub struct WeightHeaders {
    /// Each tensor's shape.
    pub tensors: HashMap<String, Vec<u64>>,
    /// Values in all tensors together.
    pub values: u64,
}

/// One entry of a safetensors header; `__metadata__` is a string map and
/// is skipped.
#[derive(Deserialize)]
#[serde(untagged)]
enum HeaderEntry {
    Tensor {
        dtype: String,
        shape: Vec<u64>,
        data_offsets: (u64, u64),
    },
    Other(serde::de::IgnoredAny),
}

/// Bits per value of the safetensors dtypes.
fn dtype_bits(dtype: &str) -> Option<u64> {
    Some(match dtype {
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "U16" | "I16" | "F16" | "BF16" => 16,
        "U32" | "I32" | "F32" => 32,
        "U64" | "I64" | "F64" => 64,
        "F6_E2M3" | "F6_E3M2" => 6,
        "F4" => 4,
        _ => return None,
    })
}

/// The `*.safetensors` of a model directory, sorted; none is an error.
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>, BackendError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| BackendError::Io(format!("{}: {e}", dir.display())))?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
        .collect();
    names.sort();
    if names.is_empty() {
        return Err(BackendError::Unsupported(format!(
            "no *.safetensors in {}",
            dir.display()
        )));
    }
    Ok(names)
}

/// Reads the header of every `*.safetensors` in `dir`: each tensor's shape,
/// checked against its dtype and its bytes in the file (as the format
/// requires), so that the values counted are values the file holds.
pub fn read_headers(dir: &Path) -> Result<WeightHeaders, BackendError> {
    let mut out = WeightHeaders::default();
    for path in safetensors_files(dir)? {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bad = |why: String| malformed(format!("{name} is not a valid safetensors file: {why}"));
        let io = |e: std::io::Error| BackendError::Io(format!("{}: {e}", path.display()));
        let mut f = fs::File::open(&path).map_err(io)?;
        let size = f.metadata().map_err(io)?.len();
        let mut len = [0u8; 8];
        f.read_exact(&mut len)
            .map_err(|_| bad(format!("{size} bytes, too short for a header")))?;
        let n = u64::from_le_bytes(len);
        if n > MAX_HEADER_BYTES || n > size.saturating_sub(8) {
            return Err(bad(format!(
                "its header declares {n} bytes, more than the file's {size} bytes or the format's {MAX_HEADER_BYTES}"
            )));
        }
        let mut header = Vec::new();
        f.take(n).read_to_end(&mut header).map_err(io)?;
        let entries: HashMap<String, HeaderEntry> =
            serde_json::from_slice(&header).map_err(|e| bad(format!("header: {e}")))?;
        let data_len = size.saturating_sub(8).saturating_sub(n);
        for (tensor, entry) in entries {
            let HeaderEntry::Tensor {
                dtype,
                shape,
                data_offsets: (start, end),
            } = entry
            else {
                if tensor == "__metadata__" {
                    continue;
                }
                return Err(bad(format!("header entry {tensor:?} is not a tensor")));
            };
            let bits = dtype_bits(&dtype).ok_or_else(|| {
                BackendError::Unsupported(format!(
                    "{name}: tensor {tensor} has dtype {dtype}, which the cpu backend cannot read"
                ))
            })?;
            let values = shape
                .iter()
                .try_fold(1u64, |a, &d| a.checked_mul(d))
                .ok_or_else(|| bad(format!("tensor {tensor}'s shape {shape:?} overflows")))?;
            let bytes = values.checked_mul(bits).map(|b| b.div_ceil(8));
            if end < start || end > data_len || bytes != Some(end - start) {
                return Err(bad(format!(
                    "tensor {tensor} ({dtype}, shape {shape:?}) has bytes {start}..{end} of {data_len}"
                )));
            }
            out.values = out.values.saturating_add(values);
            out.tensors.insert(tensor, shape);
        }
    }
    Ok(out)
}

/// One dimension a tensor must have, and the config's words for it.
struct Want {
    len: u64,
    what: String,
}

fn want(len: usize, what: String) -> Want {
    Want {
        len: len as u64,
        what,
    }
}

/// The tensors candle's loaders read, with the shapes the config implies
/// (HF layout: `[out, in]`). `lm_head.weight` is listed when it is needed
/// (llama, untied) or present.
fn expected(arch: Arch, d: &Dims, has_lm_head: bool) -> Vec<(String, Vec<Want>)> {
    let head_dim = d.head_dim();
    let hidden = || want(d.hidden_size, format!("hidden_size ({})", d.hidden_size));
    let vocab = || want(d.vocab_size, format!("vocab_size ({})", d.vocab_size));
    let inter = || {
        want(
            d.intermediate_size,
            format!("intermediate_size ({})", d.intermediate_size),
        )
    };
    let q = || {
        want(
            d.num_attention_heads * head_dim,
            format!(
                "num_attention_heads × head_dim ({} × {head_dim})",
                d.num_attention_heads
            ),
        )
    };
    let kv = || {
        want(
            d.num_key_value_heads * head_dim,
            format!(
                "num_key_value_heads × head_dim ({} × {head_dim})",
                d.num_key_value_heads
            ),
        )
    };
    let mut v = vec![
        (
            "model.embed_tokens.weight".to_string(),
            vec![vocab(), hidden()],
        ),
        ("model.norm.weight".to_string(), vec![hidden()]),
    ];
    if has_lm_head || (arch == Arch::Llama && !d.tie_word_embeddings) {
        v.push(("lm_head.weight".into(), vec![vocab(), hidden()]));
    }
    for i in 0..d.num_hidden_layers {
        let p = |n: &str| format!("model.layers.{i}.{n}");
        v.extend([
            (p("input_layernorm.weight"), vec![hidden()]),
            (p("post_attention_layernorm.weight"), vec![hidden()]),
            (p("self_attn.q_proj.weight"), vec![q(), hidden()]),
            (p("self_attn.k_proj.weight"), vec![kv(), hidden()]),
            (p("self_attn.v_proj.weight"), vec![kv(), hidden()]),
            (p("self_attn.o_proj.weight"), vec![hidden(), q()]),
            (p("mlp.gate_proj.weight"), vec![inter(), hidden()]),
            (p("mlp.up_proj.weight"), vec![inter(), hidden()]),
            (p("mlp.down_proj.weight"), vec![hidden(), inter()]),
        ]);
        if arch.has_qkv_bias() {
            v.extend([
                (p("self_attn.q_proj.bias"), vec![q()]),
                (p("self_attn.k_proj.bias"), vec![kv()]),
                (p("self_attn.v_proj.bias"), vec![kv()]),
            ]);
        }
    }
    v
}

/// The layer count and every tensor candle reads, against the headers.
/// Runs after [`check_bounds`], so the lists it builds are bounded.
pub fn check_tensors(
    arch: Arch,
    d: &Dims,
    tensors: &HashMap<String, Vec<u64>>,
) -> Result<(), BackendError> {
    let layers = tensors
        .keys()
        .filter_map(|n| n.strip_prefix("model.layers.")?.split_once('.'))
        .filter_map(|(i, _)| i.parse::<u64>().ok())
        .max()
        .map_or(0, |i| i.saturating_add(1));
    if layers != d.num_hidden_layers as u64 {
        return Err(malformed(format!(
            "config.json: num_hidden_layers is {}, but the weights have {layers} layers",
            d.num_hidden_layers
        )));
    }
    for (name, dims) in expected(arch, d, tensors.contains_key("lm_head.weight")) {
        let Some(shape) = tensors.get(&name) else {
            return Err(BackendError::Unsupported(format!(
                "the weights have no tensor {name}; does config.json's model_type match them?"
            )));
        };
        let wanted: Vec<u64> = dims.iter().map(|w| w.len).collect();
        if *shape == wanted {
            continue;
        }
        let why = if shape.len() != dims.len() {
            format!("{} dimensions", dims.len())
        } else {
            dims.iter()
                .zip(shape)
                .enumerate()
                .find(|(_, (w, s))| w.len != **s)
                .map(|(i, (w, s))| format!("dimension {i} to be {}, not {s}", w.what))
                .unwrap_or_default()
        };
        return Err(malformed(format!(
            "config.json does not match the weights: tensor {name} has shape {shape:?}, and config.json wants {wanted:?} (expected {why})"
        )));
    }
    Ok(())
}

/// The rotary tables candle builds (`positions × head_dim` values in f32)
/// against [`ROPE_TABLE_FLOOR`] and the weights' size.
pub fn check_rope(d: &Dims, weight_values: u64) -> Result<(), BackendError> {
    let table = (d.max_position_embeddings as u64).saturating_mul(d.head_dim() as u64);
    let allowed = ROPE_TABLE_FLOOR.max(weight_values / 4);
    if table > allowed {
        return Err(malformed(format!(
            "config.json: max_position_embeddings {} × head_dim {} makes rotary tables of {table} values ({} MiB), more than the {allowed} allowed for weights of {weight_values} values (a quarter of them, or {ROPE_TABLE_FLOOR})",
            d.max_position_embeddings,
            d.head_dim(),
            table.saturating_mul(4) >> 20,
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Published configs' numbers, as `Dims`, and the values in their
    /// weights (parameters).
    fn real_models() -> Vec<(&'static str, Dims, u64)> {
        let d = |v, h, i, l, a, kv, p, theta, tied| Dims {
            vocab_size: v,
            hidden_size: h,
            intermediate_size: i,
            num_hidden_layers: l,
            num_attention_heads: a,
            num_key_value_heads: kv,
            max_position_embeddings: p,
            rope_theta: theta,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: tied,
            head_dim_field: None,
            sliding_window: None,
            rope_scaling: false,
            llama3_scaling: None,
        };
        vec![
            (
                "SmolLM2-135M",
                d(49152, 576, 1536, 30, 9, 3, 8192, 1e5, true),
                135_000_000,
            ),
            (
                "TinyLlama-1.1B",
                d(32000, 2048, 5632, 22, 32, 4, 2048, 1e4, false),
                1_100_000_000,
            ),
            (
                "Llama-3.2-1B",
                d(128256, 2048, 8192, 16, 32, 8, 131072, 5e5, true),
                1_240_000_000,
            ),
            (
                "Llama-3.1-8B",
                d(128256, 4096, 14336, 32, 32, 8, 131072, 5e5, false),
                8_000_000_000,
            ),
            (
                "Llama-3.1-405B",
                d(128256, 16384, 53248, 126, 128, 8, 131072, 5e5, false),
                405_000_000_000,
            ),
            (
                "Qwen2.5-0.5B",
                d(151936, 896, 4864, 24, 14, 2, 32768, 1e6, true),
                494_000_000,
            ),
            (
                "Qwen2.5-7B-Instruct-1M",
                d(152064, 3584, 18944, 28, 28, 4, 1_010_000, 1e7, false),
                7_600_000_000,
            ),
            (
                "Qwen2.5-72B",
                d(152064, 8192, 29568, 80, 64, 8, 131072, 1e6, false),
                72_700_000_000,
            ),
        ]
    }

    #[test]
    fn published_models_fit_the_bounds() {
        for (name, mut d, params) in real_models() {
            if name.starts_with("Llama-3") {
                // Their rope_scaling (3.2: factor 32).
                d.rope_scaling = true;
                d.llama3_scaling = Some((8.0, 1.0, 4.0, 8192));
            }
            check_bounds(&d).unwrap_or_else(|e| panic!("{name}: {e}"));
            check_rope(&d, params).unwrap_or_else(|e| panic!("{name}: {e}"));
        }
    }

    /// The tests' tiny llama (`tests/common`).
    fn tiny() -> Dims {
        Dims {
            vocab_size: 256,
            hidden_size: 64,
            intermediate_size: 128,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 256,
            rope_theta: 1e4,
            rms_norm_eps: 1e-5,
            tie_word_embeddings: false,
            head_dim_field: None,
            sliding_window: None,
            rope_scaling: false,
            llama3_scaling: None,
        }
    }

    fn refused(d: &Dims) -> String {
        match check_bounds(d) {
            Err(e) => e.to_string(),
            Ok(()) => panic!("{d:?} was accepted"),
        }
    }

    #[test]
    fn each_bound_names_its_field_and_value() {
        type Edit = fn(&mut Dims);
        let cases: Vec<(Edit, &str)> = vec![
            (
                |d| d.num_hidden_layers = 1 << 40,
                "num_hidden_layers is 1099511627776, more than 1024",
            ),
            (
                |d| d.num_hidden_layers = 0,
                "num_hidden_layers is 0; it must be at least 1",
            ),
            (
                |d| d.max_position_embeddings = 2_000_000_000,
                "max_position_embeddings is 2000000000, more than 2097152",
            ),
            (
                |d| d.vocab_size = 1 << 23,
                "vocab_size is 8388608, more than 4194304",
            ),
            (
                |d| d.hidden_size = 1 << 17,
                "hidden_size is 131072, more than 65536",
            ),
            (
                |d| d.intermediate_size = 1 << 19,
                "intermediate_size is 524288",
            ),
            (|d| d.num_attention_heads = 0, "num_attention_heads is 0"),
            (|d| d.num_key_value_heads = 0, "num_key_value_heads is 0"),
            (
                |d| d.num_attention_heads = 3,
                "hidden_size 64 is not a multiple of num_attention_heads 3",
            ),
            (
                |d| d.num_key_value_heads = 3,
                "num_key_value_heads 3 does not divide num_attention_heads 4",
            ),
            (
                |d| d.num_key_value_heads = 8,
                "num_key_value_heads 8 does not divide",
            ),
            (
                |d| d.num_attention_heads = 64,
                "hidden_size / num_attention_heads is 1; a head must be an even width",
            ),
            (|d| d.rope_theta = f64::NAN, "rope_theta is NaN"),
            (|d| d.rope_theta = f64::INFINITY, "rope_theta is inf"),
            (|d| d.rope_theta = -1.0, "rope_theta is -1"),
            (|d| d.rms_norm_eps = 0.0, "rms_norm_eps is 0"),
            (|d| d.rms_norm_eps = f64::NAN, "rms_norm_eps is NaN"),
            (
                |d| d.head_dim_field = Some(1 << 30),
                "head_dim is 1073741824, more than 1024",
            ),
            (
                |d| d.sliding_window = Some(usize::MAX),
                "sliding_window is 18446744073709551615",
            ),
            (
                |d| d.llama3_scaling = Some((8.0, 1.0, 1.0, 8192)),
                "low_freq_factor and high_freq_factor are both 1",
            ),
            (
                |d| d.llama3_scaling = Some((f32::NAN, 1.0, 4.0, 8192)),
                "rope_scaling.factor is NaN",
            ),
        ];
        for (edit, needle) in cases {
            let mut d = tiny();
            edit(&mut d);
            let m = refused(&d);
            assert!(m.contains(needle), "{m:?} lacks {needle:?}");
            assert!(
                m.starts_with("the model file is malformed: config.json: "),
                "{m}"
            );
        }
        let mut d = tiny();
        d.head_dim_field = Some(32);
        match check_bounds(&d) {
            Err(BackendError::Unsupported(m)) => {
                assert!(
                    m.contains("head_dim is 32, but hidden_size / num_attention_heads is 16"),
                    "{m}"
                )
            }
            other => panic!("{other:?}"),
        }
        d.head_dim_field = Some(16);
        assert!(check_bounds(&d).is_ok());
    }

    #[test]
    fn rotary_tables_are_bounded_by_the_weights() {
        let mut d = tiny();
        d.max_position_embeddings = MAX_POSITIONS;
        // 2^21 × 16 = 2^25 values: past the floor for a tiny model...
        let m = check_rope(&d, 100_000).expect_err("tiny").to_string();
        assert!(
            m.contains("max_position_embeddings 2097152 × head_dim 16"),
            "{m}"
        );
        // ...fine beside 2^27 values of weights.
        assert!(check_rope(&d, 1 << 27).is_ok());
        d.max_position_embeddings = 1 << 20;
        assert!(check_rope(&d, 0).is_ok(), "at the floor");
    }

    fn tiny_tensors(arch: Arch, d: &Dims) -> HashMap<String, Vec<u64>> {
        expected(arch, d, false)
            .into_iter()
            .map(|(n, w)| (n, w.iter().map(|w| w.len).collect()))
            .collect()
    }

    #[test]
    fn tensor_shapes_are_checked_against_the_config() {
        let d = tiny();
        for arch in [Arch::Llama, Arch::Qwen2] {
            let t = tiny_tensors(arch, &d);
            assert!(check_tensors(arch, &d, &t).is_ok());
        }
        let t = tiny_tensors(Arch::Llama, &d);
        let mut bad = d.clone();
        bad.vocab_size = 512;
        let m = check_tensors(Arch::Llama, &bad, &t)
            .expect_err("vocab")
            .to_string();
        assert!(
            m.contains("tensor model.embed_tokens.weight has shape [256, 64], and config.json wants [512, 64] (expected dimension 0 to be vocab_size (512), not 256)"),
            "{m}"
        );
        let mut bad = d.clone();
        bad.num_key_value_heads = 4;
        let m = check_tensors(Arch::Llama, &bad, &t)
            .expect_err("kv")
            .to_string();
        assert!(m.contains("k_proj.weight has shape [32, 64]"), "{m}");
        assert!(m.contains("num_key_value_heads × head_dim (4 × 16)"), "{m}");
        let mut bad = d.clone();
        bad.num_hidden_layers = 3;
        let m = check_tensors(Arch::Llama, &bad, &t)
            .expect_err("layers")
            .to_string();
        assert!(
            m.contains("num_hidden_layers is 3, but the weights have 2 layers"),
            "{m}"
        );
        let mut t2 = t.clone();
        t2.remove("lm_head.weight");
        match check_tensors(Arch::Llama, &d, &t2) {
            Err(BackendError::Unsupported(m)) => {
                assert!(m.contains("no tensor lm_head.weight"), "{m}")
            }
            other => panic!("{other:?}"),
        }
        // Qwen2 without biases: a llama under the wrong model_type.
        match check_tensors(Arch::Qwen2, &d, &t) {
            Err(BackendError::Unsupported(m)) => assert!(m.contains(".bias"), "{m}"),
            other => panic!("{other:?}"),
        }
    }

    fn write_safetensors(dir: &Path, header: &str, data: usize) {
        let mut b = (header.len() as u64).to_le_bytes().to_vec();
        b.extend(header.as_bytes());
        b.extend(vec![0u8; data]);
        fs::write(dir.join("model.safetensors"), b).expect("write");
    }

    #[test]
    fn headers_are_read_against_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_safetensors(
            dir.path(),
            r#"{"__metadata__":{"format":"pt"},"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"BF16","shape":[4],"data_offsets":[24,32]}}"#,
            32,
        );
        let h = read_headers(dir.path()).expect("headers");
        assert_eq!(h.values, 10);
        assert_eq!(h.tensors["a"], vec![2, 3]);
        for (header, data, needle) in [
            (
                r#"{"a":{"dtype":"F32","shape":[1099511627776,1099511627776],"data_offsets":[0,24]}}"#,
                24,
                "shape [1099511627776, 1099511627776] overflows",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[1000,1000],"data_offsets":[0,24]}}"#,
                24,
                "has bytes 0..24 of 24",
            ),
            (
                r#"{"a":{"dtype":"F32","shape":[6],"data_offsets":[0,24]}}"#,
                8,
                "has bytes 0..24 of 8",
            ),
            (r#"{"a":3}"#, 0, "is not a tensor"),
        ] {
            write_safetensors(dir.path(), header, data);
            let m = read_headers(dir.path()).expect_err(needle).to_string();
            assert!(m.contains(needle), "{m:?} lacks {needle:?}");
        }
        let mut b = u64::MAX.to_le_bytes().to_vec();
        b.extend(b"{}");
        fs::write(dir.path().join("model.safetensors"), b).expect("write");
        let m = read_headers(dir.path()).expect_err("huge").to_string();
        assert!(m.contains("declares 18446744073709551615 bytes"), "{m}");
    }

    #[test]
    fn a_huge_config_is_not_read_whole() {
        let dir = tempfile::tempdir().expect("tempdir");
        let f = fs::File::create(dir.path().join("config.json")).expect("create");
        f.set_len(1 << 30).expect("sparse");
        let m = read_config(dir.path()).expect_err("huge").to_string();
        assert!(m.contains("config.json is larger than 16 MiB"), "{m}");
    }
}
