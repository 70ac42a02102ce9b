//! Request bodies of the socket API and their checks (pure functions).

use rm_crds::CompileOptions;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::backend::{GenerationParams, Prompt};
use crate::source::ModelSource;

/// Longest generation one request may ask for.
pub const MAX_NEW_TOKENS: usize = 8192;
/// Most prompts in one batch.
pub const MAX_PROMPTS: usize = 64;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareBody {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub source: Option<ModelSource>,
    #[serde(default = "auto")]
    pub device: String,
    #[serde(default)]
    pub backend: Option<String>,
    #[serde(default)]
    pub options: Option<Value>,
    #[serde(default)]
    pub stream: bool,
}

/// `POST /v1/render`: a chat as the model's template writes it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RenderBody {
    pub key: String,
    /// A chat, or
    #[serde(default)]
    pub messages: Option<Vec<Value>>,
    /// a text prompt (its ids as a generate with `prompt` runs them).
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegisterBody {
    pub source: ModelSource,
}

fn auto() -> String {
    "auto".into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateBody {
    pub key: String,
    #[serde(default = "auto")]
    pub device: String,
    /// `[1, 2, 3]` (one prompt) or `[[1, 2], [3]]` (a batch).
    #[serde(default)]
    pub input_ids: Option<Value>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub prompts: Option<Vec<String>>,
    /// A chat, rendered with the model's own template (see `crate::chat`).
    #[serde(default)]
    pub messages: Option<Vec<Value>>,
    /// transformers' meaning; true unless said.
    #[serde(default)]
    pub add_generation_prompt: Option<bool>,
    #[serde(default)]
    pub max_new_tokens: Option<usize>,
    #[serde(default)]
    pub do_sample: bool,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<usize>,
    #[serde(default)]
    pub seed: Option<u64>,
    /// One id or a list.
    #[serde(default)]
    pub eos_token_id: Option<Value>,
    #[serde(default)]
    pub ignore_eos: bool,
    /// transformers' meaning; 1.0 (the default) is off.
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    #[serde(default)]
    pub min_new_tokens: Option<usize>,
    #[serde(default)]
    pub stream: bool,
}

/// Most rows of logits (positions, over the whole batch) one forward
/// request may ask for: SmolLM2's 49 152-word vocabulary makes 100 MB of
/// f32 at this limit. Longer inputs keep fewer positions per request.
pub const MAX_LOGITS_ROWS: usize = 512;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ForwardBody {
    pub key: String,
    #[serde(default = "auto")]
    pub device: String,
    /// `[1, 2, 3]` (one sequence) or `[[1, 2], [3]]` (a batch).
    pub input_ids: Value,
    /// transformers' meaning: 0 keeps every position, k the last k.
    #[serde(default)]
    pub logits_to_keep: usize,
}

impl ForwardBody {
    /// The sequences, checked against the size limits.
    pub fn sequences(&self) -> Result<Vec<Vec<u32>>, String> {
        let seqs = input_ids(&self.input_ids)?;
        if seqs.is_empty() || seqs.len() > MAX_PROMPTS {
            return Err(format!(
                "a request carries 1 to {MAX_PROMPTS} sequences, not {}",
                seqs.len()
            ));
        }
        if seqs.iter().any(Vec::is_empty) {
            return Err("every sequence in \"input_ids\" needs at least one token".into());
        }
        let rows: usize = seqs
            .iter()
            .map(|s| crate::backend::kept_positions(s.len(), self.logits_to_keep))
            .sum();
        if rows > MAX_LOGITS_ROWS {
            return Err(format!(
                "this request asks for {rows} rows of logits; at most {MAX_LOGITS_ROWS} per request: set logits_to_keep (1 scores the next token) or send fewer positions per request"
            ));
        }
        Ok(seqs)
    }
}

/// `input_ids`: a list of token ids (one sequence) or a list of such lists.
fn input_ids(v: &Value) -> Result<Vec<Vec<u32>>, String> {
    let bad = || "\"input_ids\" must be a list of token ids or a list of such lists".to_string();
    let arr = v.as_array().ok_or_else(bad)?;
    if arr.first().is_some_and(|x| x.is_array()) {
        arr.iter().map(|row| ids_of(row).ok_or_else(bad)).collect()
    } else {
        Ok(vec![ids_of(v).ok_or_else(bad)?])
    }
}

const OPTION_KEYS: [(&str, &str); 6] = [
    ("optimization_level", "optimizationLevel"),
    ("precision", "precision"),
    ("tensor_parallel_size", "tensorParallelSize"),
    ("max_seq_len", "maxSeqLen"),
    ("batch_size", "batchSize"),
    ("extra", "extra"),
];

/// vLLM's names, which the original Python library used: (alias, the CRD's
/// camelCase key it stands for).
const OPTION_ALIASES: [(&str, &str); 3] = [
    ("dtype", "precision"),
    ("max_model_len", "maxSeqLen"),
    ("max_num_seqs", "batchSize"),
];

/// vLLM's (and torch's) `dtype` as a precision: `"auto"` is no precision
/// (the model's own); other values go on unchanged, for the precision check
/// to accept or refuse.
fn dtype_precision(v: Value) -> Value {
    let Value::String(s) = &v else { return v };
    let lower = s.to_ascii_lowercase();
    // str(torch.float16) is "torch.float16".
    let name = lower.strip_prefix("torch.").unwrap_or(&lower);
    match name {
        "auto" => Value::Null,
        "float32" | "float" | "fp32" => Value::String("fp32".into()),
        "float16" | "half" | "fp16" => Value::String("fp16".into()),
        "bfloat16" | "bf16" => Value::String("bf16".into()),
        _ => v,
    }
}

/// Compile options in the CRD's camelCase, the seed's snake_case or vLLM's
/// names (`dtype`, `max_model_len`, `max_num_seqs`); unknown keys are
/// refused (silently ignoring a misspelt option would compile the wrong
/// artifact), and so are two names of one option with different values.
pub fn parse_options(v: Option<Value>) -> Result<CompileOptions, String> {
    let Some(v) = v else {
        return Ok(CompileOptions::default());
    };
    let Value::Object(obj) = v else {
        return Err("\"options\" must be an object".into());
    };
    let mut norm = Map::new();
    // The key (and value as sent) that set each option, for the message when
    // another name of it disagrees.
    let mut given: std::collections::HashMap<&str, (String, Value)> =
        std::collections::HashMap::new();
    for (k, sent) in obj {
        let (camel, val) = if let Some((_, camel)) = OPTION_ALIASES.iter().find(|(a, _)| *a == k) {
            let val = if k == "dtype" {
                dtype_precision(sent.clone())
            } else {
                sent.clone()
            };
            (*camel, val)
        } else if let Some((_, camel)) = OPTION_KEYS.iter().find(|(s, c)| *s == k || *c == k) {
            (*camel, sent.clone())
        } else {
            let known: Vec<&str> = OPTION_KEYS.iter().map(|(_, c)| *c).collect();
            let aliases: Vec<String> = OPTION_ALIASES
                .iter()
                .map(|(a, c)| format!("{a} = {c}"))
                .collect();
            return Err(format!(
                "unknown compile option {k:?}; known: {} (aliases: {})",
                known.join(", "),
                aliases.join(", ")
            ));
        };
        // Everything in `extra` is passed to the backend as a string.
        let val = match val {
            Value::Object(m) if camel == "extra" => Value::Object(
                m.into_iter()
                    .map(|(k, v)| match v {
                        Value::String(s) => (k, Value::String(s)),
                        other => (k, Value::String(other.to_string())),
                    })
                    .collect(),
            ),
            Value::Null => Value::Null,
            _ if camel == "extra" => {
                return Err("\"options.extra\" must be an object of strings".into());
            }
            other => other,
        };
        if let Some((first, first_sent)) = given.get(camel) {
            if norm.get(camel) != Some(&val) {
                return Err(format!(
                    "compile options {first:?} ({first_sent}) and {k:?} ({sent}) both set {camel} but disagree; give one of them"
                ));
            }
            continue;
        }
        given.insert(camel, (k.clone(), sent));
        norm.insert(camel.to_string(), val);
    }
    // null (and dtype "auto") leave an option unset.
    norm.retain(|_, v| !v.is_null());
    let opts: CompileOptions = serde_json::from_value(Value::Object(norm))
        .map_err(|e| format!("bad compile options: {e}"))?;
    // The CRD's bounds: a pod's options must not compile what the
    // apiserver would have refused.
    opts.validate()?;
    Ok(opts)
}

fn ids_of(v: &Value) -> Option<Vec<u32>> {
    v.as_array()?
        .iter()
        .map(|x| x.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect()
}

impl GenerateBody {
    /// The prompts of the request: exactly one of `input_ids`, `prompt`,
    /// `prompts` (a request with `messages` has its prompt rendered by the
    /// service, and none here).
    pub fn prompts(&self) -> Result<Vec<Prompt>, String> {
        let given = [
            self.input_ids.is_some(),
            self.prompt.is_some(),
            self.prompts.is_some(),
            self.messages.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err(
                "give exactly one of \"input_ids\", \"prompt\", \"prompts\" or \"messages\"".into(),
            );
        }
        if self.messages.is_some() {
            return Ok(Vec::new());
        }
        if self.add_generation_prompt.is_some() {
            return Err("\"add_generation_prompt\" goes with \"messages\"".into());
        }
        let prompts = if let Some(v) = &self.input_ids {
            input_ids(v)?.into_iter().map(Prompt::Ids).collect()
        } else if let Some(p) = &self.prompt {
            vec![Prompt::Text(p.clone())]
        } else {
            self.prompts
                .clone()
                .unwrap_or_default()
                .into_iter()
                .map(Prompt::Text)
                .collect()
        };
        if prompts.is_empty() || prompts.len() > MAX_PROMPTS {
            return Err(format!(
                "a request carries 1 to {MAX_PROMPTS} prompts, not {}",
                prompts.len()
            ));
        }
        Ok(prompts)
    }

    pub fn params(&self) -> Result<GenerationParams, String> {
        let max_new_tokens = self.max_new_tokens.unwrap_or(32);
        if max_new_tokens > MAX_NEW_TOKENS {
            return Err(format!("max_new_tokens must be at most {MAX_NEW_TOKENS}"));
        }
        let temperature = self.temperature.unwrap_or(1.0);
        if !temperature.is_finite() || temperature < 0.0 {
            return Err("temperature must be a number ≥ 0".into());
        }
        if let Some(p) = self.top_p {
            if !(p > 0.0 && p <= 1.0) {
                return Err("top_p must be in (0, 1]".into());
            }
        }
        let repetition_penalty = self.repetition_penalty.unwrap_or(1.0);
        if !(repetition_penalty.is_finite() && repetition_penalty > 0.0) {
            return Err(format!(
                "repetition_penalty must be a finite number > 0 (1.0 is no penalty), got {repetition_penalty}"
            ));
        }
        let min_new_tokens = self.min_new_tokens.unwrap_or(0);
        if min_new_tokens > max_new_tokens {
            return Err(format!(
                "min_new_tokens ({min_new_tokens}) must be at most max_new_tokens ({max_new_tokens})"
            ));
        }
        let eos_token_ids = match &self.eos_token_id {
            None | Some(Value::Null) => vec![],
            Some(Value::Number(n)) => vec![
                n.as_u64()
                    .and_then(|n| u32::try_from(n).ok())
                    .ok_or("eos_token_id must be a token id")?,
            ],
            Some(v) => ids_of(v).ok_or("eos_token_id must be a token id or a list of them")?,
        };
        let seed = self.seed.unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0)
        });
        Ok(GenerationParams {
            max_new_tokens,
            do_sample: self.do_sample,
            temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed,
            eos_token_ids,
            stop_at_eos: !self.ignore_eos,
            repetition_penalty,
            min_new_tokens,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn options_accept_both_spellings_and_refuse_typos() {
        let o = parse_options(Some(
            json!({"optimization_level": 2, "maxSeqLen": 64, "precision": "q8_0"}),
        ))
        .expect("valid");
        assert_eq!(o.optimization_level, Some(2));
        assert_eq!(o.max_seq_len, Some(64));
        assert!(parse_options(Some(json!({"precison": "q8_0"}))).is_err());
        assert!(parse_options(Some(json!({"precision": "q3"}))).is_err());
        assert!(parse_options(Some(json!({"optimizationLevel": 9}))).is_err());
        let o = parse_options(Some(json!({"extra": {"a": 1}}))).expect("valid");
        assert_eq!(o.extra.get("a").map(String::as_str), Some("1"));
    }

    #[test]
    fn vllm_option_names_are_aliases() {
        let o = parse_options(Some(
            json!({"dtype": "float16", "max_model_len": 128, "max_num_seqs": 4}),
        ))
        .expect("valid");
        let precision = |o: &CompileOptions| serde_json::to_value(o.precision).expect("serializes");
        assert_eq!(precision(&o), json!("fp16"));
        assert_eq!((o.max_seq_len, o.batch_size), (Some(128), Some(4)));
        for (dtype, want) in [
            ("auto", None),
            ("float32", Some("fp32")),
            ("fp32", Some("fp32")),
            ("half", Some("fp16")),
            ("fp16", Some("fp16")),
            ("bfloat16", Some("bf16")),
            ("bf16", Some("bf16")),
            ("torch.bfloat16", Some("bf16")),
            // Not a dtype name: passed on as a precision.
            ("q8_0", Some("q8_0")),
        ] {
            let o = parse_options(Some(json!({ "dtype": dtype }))).expect(dtype);
            assert_eq!(precision(&o), json!(want), "{dtype}");
        }
        let e = parse_options(Some(json!({"dtype": "float64"}))).expect_err("refused");
        assert!(e.contains("float64"), "{e}");
        // Two names of one option: the same value is fine, different ones
        // are refused naming both.
        let o =
            parse_options(Some(json!({"dtype": "bfloat16", "precision": "bf16"}))).expect("agree");
        assert_eq!(precision(&o), json!("bf16"));
        let e = parse_options(Some(json!({"dtype": "float16", "precision": "bf16"})))
            .expect_err("disagree");
        assert!(
            e.contains("\"dtype\" (\"float16\")") && e.contains("\"precision\" (\"bf16\")"),
            "{e}"
        );
        let e = parse_options(Some(json!({"max_model_len": 64, "maxSeqLen": 128})))
            .expect_err("disagree");
        assert!(
            e.contains("max_model_len") && e.contains("maxSeqLen"),
            "{e}"
        );
        let e =
            parse_options(Some(json!({"max_num_seqs": 2, "batch_size": 3}))).expect_err("disagree");
        assert!(
            e.contains("max_num_seqs") && e.contains("batch_size"),
            "{e}"
        );
        let e =
            parse_options(Some(json!({"dtype": "auto", "precision": "q4"}))).expect_err("disagree");
        assert!(e.contains("dtype") && e.contains("precision"), "{e}");
        // The aliases are named when a key is unknown.
        let e = parse_options(Some(json!({"max_len": 1}))).expect_err("unknown");
        assert!(
            e.contains("dtype = precision") && e.contains("max_model_len = maxSeqLen"),
            "{e}"
        );
    }

    fn body(v: Value) -> GenerateBody {
        serde_json::from_value(v).expect("body parses")
    }

    #[test]
    fn options_beyond_the_crds_bounds_are_refused_with_the_bound() {
        use rm_crds::workload::compile_limits::*;
        let refused = |v: Value| parse_options(Some(v)).expect_err("refused");
        let e = refused(json!({"maxSeqLen": MAX_SEQ_LEN_MAX + 1}));
        assert!(e.contains("maxSeqLen must be 1 to 1048576"), "{e}");
        let e = refused(json!({"batch_size": u32::MAX}));
        assert!(
            e.contains("batchSize must be 1 to 4096, got 4294967295"),
            "{e}"
        );
        assert!(refused(json!({"tensorParallelSize": 0})).contains("tensorParallelSize"));
        assert!(refused(json!({"optimizationLevel": 4})).contains("0 to 3"));
        let many: serde_json::Map<String, Value> = (0..=EXTRA_MAX_KEYS)
            .map(|i| (format!("k{i}"), json!("v")))
            .collect();
        assert!(refused(json!({"extra": many})).contains("at most 64"));
        // The bounds themselves are accepted.
        let ok = parse_options(Some(json!({
            "maxSeqLen": MAX_SEQ_LEN_MAX, "batchSize": BATCH_SIZE_MAX,
            "tensorParallelSize": TENSOR_PARALLEL_SIZE_MAX, "optimizationLevel": OPTIMIZATION_LEVEL_MAX
        })))
        .expect("accepted");
        assert_eq!(ok.max_seq_len, Some(MAX_SEQ_LEN_MAX));
    }

    #[test]
    fn prompts_come_in_three_shapes() {
        let b = body(json!({"key": "k", "input_ids": [1, 2]}));
        assert_eq!(b.prompts(), Ok(vec![Prompt::Ids(vec![1, 2])]));
        let b = body(json!({"key": "k", "input_ids": [[1], [2, 3]]}));
        assert_eq!(b.prompts().map(|p| p.len()), Ok(2));
        let b = body(json!({"key": "k", "prompt": "hi"}));
        assert_eq!(b.prompts(), Ok(vec![Prompt::Text("hi".into())]));
        assert!(body(json!({"key": "k"})).prompts().is_err());
        assert!(
            body(json!({"key": "k", "input_ids": [-1]}))
                .prompts()
                .is_err()
        );
        assert!(
            body(json!({"key": "k", "prompt": "a", "prompts": ["b"]}))
                .prompts()
                .is_err()
        );
        // messages are exclusive with the others, and rendered elsewhere.
        let chat = json!([{"role": "user", "content": "hi"}]);
        assert_eq!(
            body(json!({"key": "k", "messages": chat})).prompts(),
            Ok(vec![])
        );
        let e = body(json!({"key": "k", "messages": chat, "prompt": "x"}))
            .prompts()
            .expect_err("exclusive");
        assert!(e.contains("\"messages\""), "{e}");
        assert!(
            body(json!({"key": "k", "prompt": "x", "add_generation_prompt": false}))
                .prompts()
                .is_err()
        );
    }

    #[test]
    fn forward_bodies_are_checked() {
        let fwd = |v: Value| serde_json::from_value::<ForwardBody>(v).expect("body parses");
        let b = fwd(json!({"key": "k", "input_ids": [1, 2, 3]}));
        assert_eq!(b.sequences(), Ok(vec![vec![1, 2, 3]]));
        assert_eq!(b.logits_to_keep, 0);
        let long: Vec<u32> = (0..600).collect();
        let err = fwd(json!({"key": "k", "input_ids": long.clone()}))
            .sequences()
            .expect_err("too many rows");
        assert!(
            err.contains("600 rows") && err.contains("logits_to_keep"),
            "{err}"
        );
        assert!(
            fwd(json!({"key": "k", "input_ids": long, "logits_to_keep": 1}))
                .sequences()
                .is_ok()
        );
        assert!(
            fwd(json!({"key": "k", "input_ids": []}))
                .sequences()
                .is_err()
        );
        assert!(
            fwd(json!({"key": "k", "input_ids": "hi"}))
                .sequences()
                .is_err()
        );
        assert!(
            serde_json::from_value::<ForwardBody>(
                json!({"key": "k", "input_ids": [1], "labels": [1]})
            )
            .is_err()
        );
    }

    #[test]
    fn params_are_checked() {
        assert!(
            body(json!({"key": "k", "max_new_tokens": 100000}))
                .params()
                .is_err()
        );
        assert!(body(json!({"key": "k", "top_p": 0})).params().is_err());
        assert!(
            body(json!({"key": "k", "temperature": -1}))
                .params()
                .is_err()
        );
        let p = body(json!({"key": "k", "eos_token_id": [2, 3]}))
            .params()
            .expect("valid");
        assert_eq!(p.eos_token_ids, vec![2, 3]);
        assert_eq!((p.repetition_penalty, p.min_new_tokens), (1.0, 0));
    }

    #[test]
    fn repetition_penalty_and_min_new_tokens_are_checked() {
        let p = body(json!({"key": "k", "repetition_penalty": 1.3, "min_new_tokens": 4, "max_new_tokens": 4}))
            .params()
            .expect("valid");
        assert_eq!((p.repetition_penalty, p.min_new_tokens), (1.3, 4));
        for bad in [json!(0), json!(-1.5)] {
            let e = body(json!({"key": "k", "repetition_penalty": bad}))
                .params()
                .expect_err("refused");
            assert!(
                e.contains("repetition_penalty must be a finite number > 0"),
                "{e}"
            );
        }
        assert!(
            serde_json::from_value::<GenerateBody>(json!({"key": "k", "repetition_penalty": "x"}))
                .is_err()
        );
        let e = body(json!({"key": "k", "min_new_tokens": 33}))
            .params()
            .expect_err("refused");
        assert_eq!(e, "min_new_tokens (33) must be at most max_new_tokens (32)");
        assert!(
            serde_json::from_value::<GenerateBody>(json!({"key": "k", "min_new_tokens": -1}))
                .is_err()
        );
        // Workers always get both fields.
        let wire = serde_json::to_value(&p).expect("serializes");
        assert_eq!(wire["repetition_penalty"], 1.3);
        assert_eq!(wire["min_new_tokens"], 4);
    }
}
