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

/// Compile options in the CRD's camelCase or the seed's snake_case; unknown
/// keys are refused (silently ignoring a misspelt option would compile the
/// wrong artifact).
pub fn parse_options(v: Option<Value>) -> Result<CompileOptions, String> {
    let Some(v) = v else {
        return Ok(CompileOptions::default());
    };
    let Value::Object(obj) = v else {
        return Err("\"options\" must be an object".into());
    };
    let mut norm = Map::new();
    for (k, val) in obj {
        let Some((_, camel)) = OPTION_KEYS.iter().find(|(s, c)| *s == k || *c == k) else {
            let known: Vec<&str> = OPTION_KEYS.iter().map(|(_, c)| *c).collect();
            return Err(format!(
                "unknown compile option {k:?}; known: {}",
                known.join(", ")
            ));
        };
        if val.is_null() {
            continue;
        }
        // Everything in `extra` is passed to the backend as a string.
        let val = if *camel == "extra" {
            match val {
                Value::Object(m) => Value::Object(
                    m.into_iter()
                        .map(|(k, v)| match v {
                            Value::String(s) => (k, Value::String(s)),
                            other => (k, Value::String(other.to_string())),
                        })
                        .collect(),
                ),
                _ => return Err("\"options.extra\" must be an object of strings".into()),
            }
        } else {
            val
        };
        norm.insert((*camel).to_string(), val);
    }
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
    /// `prompts`.
    pub fn prompts(&self) -> Result<Vec<Prompt>, String> {
        let given = [
            self.input_ids.is_some(),
            self.prompt.is_some(),
            self.prompts.is_some(),
        ]
        .iter()
        .filter(|b| **b)
        .count();
        if given != 1 {
            return Err("give exactly one of \"input_ids\", \"prompt\" or \"prompts\"".into());
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
    }
}
