//! The cpu backend's "compile": turn the source weights into the artifact
//! for the requested precision.
//!
//! | source | precision | artifact |
//! |---|---|---|
//! | GGUF | unset | checked copy of the GGUF |
//! | GGUF | q8_0, q4, fp32 | GGUF re-quantized (norms stay f32) |
//! | safetensors | unset | copy of the safetensors, config and tokenizer |
//! | safetensors | fp32, bf16, fp16 | one safetensors file in that dtype |
//! | safetensors | q8_0, q4 | GGUF (llama.cpp tensor names and rope layout) |
//!
//! Safetensors models are llama or qwen2 (`arch.rs`). GGUF artifacts are what
//! llama.cpp reads, which keeps a faster engine (issue 9) a drop-in behind the
//! same cache. The agent's own conversions say `tokenizer.ggml.model = "none"`:
//! llama.cpp then runs them without a vocabulary of its own, and the agent
//! tokenizes with the `tokenizer.json` kept beside the GGUF.

use std::collections::HashMap;
use std::fs;
use std::io::{BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QTensor, gguf_file};
use candle_core::{DType, Device, Tensor};
use rm_crds::{CompileOptions, Precision};
use serde::{Deserialize, Serialize};

use super::arch;
use super::engine::load_safetensors_dir;
use super::hf_config;
use crate::backend::{BackendError, CompileJob, ProgressFn};
use crate::source::ModelFormat;

pub const MANIFEST: &str = "artifact.json";

/// `artifact.json`: what the engine needs to load an artifact.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ArtifactManifest {
    /// `gguf` or `safetensors`.
    pub format: String,
    /// `q8_0`, `q4_0`, `f32`, `bf16`, `f16`, or `source` (as the model came).
    pub dtype: String,
    pub source_format: ModelFormat,
    #[serde(default)]
    pub max_seq_len: Option<u32>,
    #[serde(default)]
    pub batch_size: Option<u32>,
    #[serde(default)]
    pub eos_token_ids: Vec<u32>,
    #[serde(default)]
    pub bos_token_id: Option<u32>,
}

impl ArtifactManifest {
    pub fn read(dir: &Path) -> Result<Self, BackendError> {
        let raw = fs::read(dir.join(MANIFEST))
            .map_err(|e| BackendError::Io(format!("{}: {e}", dir.join(MANIFEST).display())))?;
        serde_json::from_slice(&raw).map_err(|e| BackendError::Internal(format!("{MANIFEST}: {e}")))
    }

    fn write(&self, dir: &Path) -> Result<(), BackendError> {
        let json =
            serde_json::to_vec_pretty(self).map_err(|e| BackendError::Internal(e.to_string()))?;
        fs::write(dir.join(MANIFEST), json).map_err(io(dir))
    }
}

fn io(p: &Path) -> impl Fn(std::io::Error) -> BackendError + '_ {
    move |e| {
        if e.raw_os_error() == Some(28) {
            BackendError::Io(format!(
                "disk full while writing {}: free space in the cache directory",
                p.display()
            ))
        } else {
            BackendError::Io(format!("{}: {e}", p.display()))
        }
    }
}

fn cerr(what: &str) -> impl Fn(candle_core::Error) -> BackendError + '_ {
    move |e| BackendError::Internal(format!("{what}: {e}"))
}

/// Pure check of options for the cpu backend.
pub fn validate(options: &CompileOptions, format: ModelFormat) -> Result<(), BackendError> {
    if let Some(tp) = options.tensor_parallel_size.filter(|t| *t != 1) {
        return Err(BackendError::InvalidRequest(format!(
            "tensorParallelSize {tp} is not possible on the cpu backend; leave it unset or 1"
        )));
    }
    if !options.extra.is_empty() {
        let keys: Vec<String> = options.extra.keys().map(|k| format!("{k:?}")).collect();
        return Err(BackendError::InvalidRequest(format!(
            "the cpu backend takes no extra options, but options.extra has {}; remove them \
             (allowed keys: none; options.extra is for accelerator workers, each of which \
             lists the keys it takes in GET /v1/backends)",
            keys.join(", ")
        )));
    }
    match (options.precision, format) {
        (Some(Precision::Int8), _) => Err(BackendError::InvalidRequest(
            "precision int8 is not available on the cpu backend; use q8_0 (8-bit blocks) or q4"
                .into(),
        )),
        (Some(p @ (Precision::Bf16 | Precision::Fp16)), ModelFormat::Gguf) => {
            Err(BackendError::InvalidRequest(format!(
                "precision {} cannot be made from a GGUF model on the cpu backend; use fp32, q8_0, q4 or leave it unset",
                serde_json::to_string(&p)
                    .unwrap_or_default()
                    .trim_matches('"')
            )))
        }
        _ => Ok(()),
    }
}

fn ggml_target(p: Precision) -> Option<GgmlDType> {
    match p {
        Precision::Q8_0 => Some(GgmlDType::Q8_0),
        // Q4_0 rather than Q4_1: candle has a SIMD dot product for it.
        Precision::Q4 => Some(GgmlDType::Q4_0),
        Precision::Fp32 => Some(GgmlDType::F32),
        _ => None,
    }
}

fn dtype_name(t: GgmlDType) -> &'static str {
    match t {
        GgmlDType::Q8_0 => "q8_0",
        GgmlDType::Q4_0 => "q4_0",
        GgmlDType::F32 => "f32",
        _ => "other",
    }
}

/// Runs the compile described by `job`. Blocking.
pub fn compile(job: &CompileJob, progress: &ProgressFn) -> Result<(), BackendError> {
    validate(&job.options, job.model_format)?;
    let out = &job.output_dir;
    let mut manifest = ArtifactManifest {
        format: String::new(),
        dtype: "source".into(),
        source_format: job.model_format,
        max_seq_len: job.options.max_seq_len,
        batch_size: job.options.batch_size,
        eos_token_ids: vec![],
        bos_token_id: None,
    };
    match job.model_format {
        ModelFormat::Gguf => {
            let mut f = fs::File::open(&job.model_path).map_err(io(&job.model_path))?;
            let content = super::engine::read_gguf_header(&mut f).map_err(|e| {
                BackendError::Unsupported(format!(
                    "{} is not a readable GGUF file: {e}",
                    job.model_path.display()
                ))
            })?;
            let arch = content
                .metadata
                .get("general.architecture")
                .and_then(|v| v.to_string().ok())
                .cloned()
                .unwrap_or_default();
            // candle runs llama; llama.cpp runs the rest, given the
            // `tokenizer.ggml.model` it needs (llama and qwen2 are tested).
            if arch != "llama" && !content.metadata.contains_key("tokenizer.ggml.model") {
                return Err(BackendError::Unsupported(format!(
                    "GGUF architecture {arch:?} without tokenizer.ggml.model cannot run on the cpu backend: \
                     candle runs llama only, and llama.cpp needs the vocabulary; use a GGUF made by llama.cpp's converter"
                )));
            }
            manifest.format = "gguf".into();
            let md_u32 = |k: &str| content.metadata.get(k).and_then(|v| v.to_u32().ok());
            manifest.eos_token_ids = md_u32("tokenizer.ggml.eos_token_id").into_iter().collect();
            manifest.bos_token_id = md_u32("tokenizer.ggml.bos_token_id");
            let dest = out.join("model.gguf");
            match job.options.precision.and_then(ggml_target) {
                None => copy_with_progress(&job.model_path, &dest, progress.as_ref())?,
                Some(target) => {
                    manifest.dtype = dtype_name(target).into();
                    requantize_gguf(&content, &mut f, target, &dest, progress)?;
                }
            }
        }
        ModelFormat::Safetensors => {
            let src = &job.model_path;
            // An unsupported model_type, a config.json out of bounds or not
            // matching the weights: refused before any work.
            hf_config::check_dir(src)?;
            manifest.eos_token_ids = eos_ids(src);
            manifest.bos_token_id = arch::bos_token_id(src)?;
            for name in ["config.json", "tokenizer.json", "generation_config.json"] {
                let p = src.join(name);
                if p.is_file() {
                    fs::copy(&p, out.join(name)).map_err(io(&p))?;
                }
            }
            match job.options.precision {
                None => {
                    manifest.format = "safetensors".into();
                    let files: Vec<PathBuf> = fs::read_dir(src)
                        .map_err(io(src))?
                        .flatten()
                        .map(|e| e.path())
                        .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
                        .collect();
                    let n = files.len().max(1) as f32;
                    for (i, p) in files.iter().enumerate() {
                        let name = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
                        copy_with_progress(p, &out.join(name), &|_, _| {})?;
                        progress((i + 1) as f32 / n, "copy");
                    }
                    manifest.dtype = "source".into();
                }
                Some(p @ (Precision::Fp32 | Precision::Bf16 | Precision::Fp16)) => {
                    let (dtype, name) = match p {
                        Precision::Bf16 => (DType::BF16, "bf16"),
                        Precision::Fp16 => (DType::F16, "f16"),
                        _ => (DType::F32, "f32"),
                    };
                    progress(0.1, "load");
                    let tensors = load_safetensors_dir(src)?;
                    let cast: HashMap<String, Tensor> = tensors
                        .into_iter()
                        .map(|(k, t)| t.to_dtype(dtype).map(|t| (k, t)))
                        .collect::<Result<_, _>>()
                        .map_err(cerr("cast"))?;
                    progress(0.6, "write");
                    let dest = out.join("model.safetensors");
                    candle_core::safetensors::save(&cast, &dest).map_err(cerr("save"))?;
                    manifest.format = "safetensors".into();
                    manifest.dtype = name.into();
                }
                Some(p) => {
                    let target = ggml_target(p).ok_or_else(|| {
                        BackendError::InvalidRequest(
                            "unsupported precision for the cpu backend".into(),
                        )
                    })?;
                    hf_to_gguf(src, target, &out.join("model.gguf"), progress.as_ref())?;
                    manifest.format = "gguf".into();
                    manifest.dtype = dtype_name(target).into();
                }
            }
        }
    }
    manifest.write(out)?;
    progress(1.0, "done");
    Ok(())
}

fn eos_ids(dir: &Path) -> Vec<u32> {
    let mut ids = Vec::new();
    for name in ["generation_config.json", "config.json"] {
        let Ok(raw) = fs::read(dir.join(name)) else {
            continue;
        };
        let Ok(v) = serde_json::from_slice::<serde_json::Value>(&raw) else {
            continue;
        };
        match v.get("eos_token_id") {
            Some(serde_json::Value::Number(n)) => ids.extend(n.as_u64().map(|n| n as u32)),
            Some(serde_json::Value::Array(a)) => {
                ids.extend(a.iter().filter_map(|n| n.as_u64()).map(|n| n as u32))
            }
            _ => {}
        }
        if !ids.is_empty() {
            break;
        }
    }
    ids
}

fn copy_with_progress(
    src: &Path,
    dest: &Path,
    progress: &dyn Fn(f32, &str),
) -> Result<(), BackendError> {
    let mut r = fs::File::open(src).map_err(io(src))?;
    let total = r.metadata().map(|m| m.len()).unwrap_or(0).max(1);
    let mut w = BufWriter::new(fs::File::create(dest).map_err(io(dest))?);
    let mut buf = vec![0u8; 4 << 20];
    let mut done = 0u64;
    loop {
        let n = r.read(&mut buf).map_err(io(src))?;
        if n == 0 {
            break;
        }
        w.write_all(&buf[..n]).map_err(io(dest))?;
        done += n as u64;
        progress(done as f32 / total as f32 * 0.95, "copy");
    }
    w.flush().map_err(io(dest))?;
    Ok(())
}

/// Whether a tensor is quantized to the target (2-D weights whose rows fit
/// the block size) or kept in f32 (norms, odd shapes).
fn quantizable(dims: &[usize], target: GgmlDType) -> bool {
    dims.len() == 2 && dims[1] % target.block_size() == 0
}

fn requantize_gguf(
    content: &gguf_file::Content,
    f: &mut fs::File,
    target: GgmlDType,
    dest: &Path,
    progress: &ProgressFn,
) -> Result<(), BackendError> {
    let mut names: Vec<&String> = content.tensor_infos.keys().collect();
    names.sort();
    let n = names.len().max(1) as f32;
    let mut tensors = Vec::with_capacity(names.len());
    for (i, name) in names.iter().enumerate() {
        let qt = content
            .tensor(f, name, &Device::Cpu)
            .map_err(cerr("read tensor"))?;
        let dims = qt.shape().dims().to_vec();
        let want = if quantizable(&dims, target) {
            target
        } else {
            GgmlDType::F32
        };
        let qt = if qt.dtype() == want {
            qt
        } else {
            let t = qt.dequantize(&Device::Cpu).map_err(cerr("dequantize"))?;
            QTensor::quantize(&t, want).map_err(cerr("quantize"))?
        };
        tensors.push(((*name).clone(), qt));
        progress((i + 1) as f32 / n * 0.9, "quantize");
    }
    let metadata: Vec<(&str, &gguf_file::Value)> = content
        .metadata
        .iter()
        .map(|(k, v)| (k.as_str(), v))
        .collect();
    write_gguf(dest, &metadata, &tensors)
}

fn write_gguf(
    dest: &Path,
    metadata: &[(&str, &gguf_file::Value)],
    tensors: &[(String, QTensor)],
) -> Result<(), BackendError> {
    let mut w = BufWriter::new(fs::File::create(dest).map_err(io(dest))?);
    let refs: Vec<(&str, &QTensor)> = tensors.iter().map(|(n, t)| (n.as_str(), t)).collect();
    gguf_file::write(&mut w, metadata, &refs).map_err(|e| match e {
        candle_core::Error::Io(e) => io(dest)(e),
        e => BackendError::Internal(format!("write GGUF: {e}")),
    })?;
    w.flush().map_err(io(dest))
}

/// llama.cpp's permutation of q/k rows from the HF (rotate-half) rope layout
/// to the interleaved one that GGUF llama models use.
fn permute_for_rope(w: &Tensor, n_head: usize) -> candle_core::Result<Tensor> {
    let (rows, cols) = w.dims2()?;
    w.reshape((n_head, 2, rows / n_head / 2, cols))?
        .transpose(1, 2)?
        .contiguous()?
        .reshape((rows, cols))
}

/// Converts a llama or qwen2 safetensors directory to GGUF with `target`
/// weights, in llama.cpp's layout for that architecture. Blocking. Public for
/// the engine's conversion test.
pub fn hf_to_gguf(
    src: &Path,
    target: GgmlDType,
    dest: &Path,
    progress: &dyn Fn(f32, &str),
) -> Result<(), BackendError> {
    use gguf_file::Value;
    // The numbers written into the GGUF, checked as the engine checks them.
    let hf_config::CheckedModel { arch, dims, .. } = hf_config::check_dir(src)?;
    if dims.rope_scaling {
        return Err(BackendError::Unsupported(
            "models with rope_scaling (Llama 3.1+) cannot be quantized by the cpu backend yet; leave precision unset or use fp32/bf16".into(),
        ));
    }
    let n_head = dims.num_attention_heads;
    let n_kv = dims.num_key_value_heads;
    let head_dim = dims.head_dim();
    progress(0.05, "load");
    let tensors = load_safetensors_dir(src)?;
    let mut out: Vec<(String, QTensor)> = Vec::new();
    let mut names: Vec<&String> = tensors.keys().collect();
    names.sort();
    let n = names.len().max(1) as f32;
    for (i, name) in names.iter().enumerate() {
        let t = tensors
            .get(*name)
            .ok_or_else(|| BackendError::Internal(format!("tensor {name} vanished")))?
            .to_dtype(DType::F32)
            .map_err(cerr("cast"))?;
        let gguf_name = match hf_tensor_name(name) {
            Some(g) => g,
            None => {
                tracing::debug!(tensor = %name, "not a llama tensor; left out of the GGUF");
                continue;
            }
        };
        let t = if arch.permutes_rope() && gguf_name.ends_with("attn_q.weight") {
            permute_for_rope(&t, n_head).map_err(cerr("permute q"))?
        } else if arch.permutes_rope() && gguf_name.ends_with("attn_k.weight") {
            permute_for_rope(&t, n_kv).map_err(cerr("permute k"))?
        } else {
            t
        };
        let want = if quantizable(t.dims(), target) {
            target
        } else {
            GgmlDType::F32
        };
        let q = QTensor::quantize(&t.contiguous().map_err(cerr("contiguous"))?, want)
            .map_err(cerr("quantize"))?;
        out.push((gguf_name, q));
        progress(0.05 + (i + 1) as f32 / n * 0.85, "quantize");
    }
    // Every number is bounded by the check, far below u32::MAX.
    let u = |v: usize| Value::U32(v as u32);
    let a = arch.gguf_name();
    let md: Vec<(String, Value)> = vec![
        ("general.architecture".into(), Value::String(a.into())),
        (
            "general.name".into(),
            Value::String("rm-agent cpu compile".into()),
        ),
        (
            format!("{a}.context_length"),
            u(dims.max_position_embeddings),
        ),
        (format!("{a}.embedding_length"), u(dims.hidden_size)),
        (format!("{a}.block_count"), u(dims.num_hidden_layers)),
        (
            format!("{a}.feed_forward_length"),
            u(dims.intermediate_size),
        ),
        (format!("{a}.attention.head_count"), u(n_head)),
        (format!("{a}.attention.head_count_kv"), u(n_kv)),
        (format!("{a}.rope.dimension_count"), u(head_dim)),
        (
            format!("{a}.attention.layer_norm_rms_epsilon"),
            Value::F32(dims.rms_norm_eps as f32),
        ),
        (
            format!("{a}.rope.freq_base"),
            Value::F32(dims.rope_theta as f32),
        ),
        // No vocabulary: llama.cpp then makes `vocab_size` placeholder
        // tokens and decodes token ids; the agent tokenizes.
        ("tokenizer.ggml.model".into(), Value::String("none".into())),
        (format!("{a}.vocab_size"), u(dims.vocab_size)),
    ];
    let refs: Vec<(&str, &Value)> = md.iter().map(|(k, v)| (k.as_str(), v)).collect();
    progress(0.92, "write");
    write_gguf(dest, &refs, &out)
}

/// HF tensor name (llama or qwen2) → GGUF name.
fn hf_tensor_name(name: &str) -> Option<String> {
    match name {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, tail) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, kind) = tail.rsplit_once('.')?;
    if kind != "weight" && kind != "bias" {
        return None;
    }
    let g = match (module, kind) {
        ("input_layernorm", "weight") => "attn_norm",
        ("post_attention_layernorm", "weight") => "ffn_norm",
        ("self_attn.q_proj", _) => "attn_q",
        ("self_attn.k_proj", _) => "attn_k",
        ("self_attn.v_proj", _) => "attn_v",
        ("self_attn.o_proj", "weight") => "attn_output",
        ("mlp.gate_proj", "weight") => "ffn_gate",
        ("mlp.up_proj", "weight") => "ffn_up",
        ("mlp.down_proj", "weight") => "ffn_down",
        _ => return None,
    };
    Some(format!("blk.{layer}.{g}.{kind}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_are_checked_before_compiling() {
        let mut o = CompileOptions::default();
        assert!(validate(&o, ModelFormat::Gguf).is_ok());
        o.precision = Some(Precision::Int8);
        assert!(validate(&o, ModelFormat::Safetensors).is_err());
        o.precision = Some(Precision::Bf16);
        assert!(validate(&o, ModelFormat::Gguf).is_err());
        assert!(validate(&o, ModelFormat::Safetensors).is_ok());
        let o = CompileOptions {
            tensor_parallel_size: Some(2),
            ..Default::default()
        };
        assert!(validate(&o, ModelFormat::Gguf).is_err());
        let mut o = CompileOptions::default();
        o.extra.insert("x".into(), "y".into());
        assert!(validate(&o, ModelFormat::Gguf).is_err());
    }

    #[test]
    fn tensor_names_map_to_llama_cpp() {
        assert_eq!(
            hf_tensor_name("model.layers.3.mlp.down_proj.weight").as_deref(),
            Some("blk.3.ffn_down.weight")
        );
        assert_eq!(
            hf_tensor_name("model.embed_tokens.weight").as_deref(),
            Some("token_embd.weight")
        );
        assert_eq!(
            hf_tensor_name("model.layers.0.self_attn.k_proj.bias").as_deref(),
            Some("blk.0.attn_k.bias")
        );
        assert_eq!(hf_tensor_name("model.layers.0.mlp.up_proj.bias"), None);
        assert_eq!(hf_tensor_name("model.layers.x.mlp.down_proj.weight"), None);
        assert_eq!(hf_tensor_name("model.rotary_emb.inv_freq"), None);
    }
}
