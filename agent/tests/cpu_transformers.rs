//! Architectures the built-in cpu backend does not run (issue 18): the
//! `cpu-transformers` worker runs them on the CPU with the real transformers
//! and torch, chosen by selection because the built-in backend refuses the
//! model; what the built-in backend runs stays with it.
//!
//! The model is a tiny random GPT-2 written by transformers itself, and the
//! expected tokens and logits come from transformers in the same Python.
//! Needs a Python with torch and transformers, named by `RM_TORCH_PYTHON`;
//! without it those tests say they are skipped and why. The refusal test
//! needs only `python3`.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{Agent, tiny_llama};
use rm_agent::backend::ForwardOutput;
use serde_json::{Value, json};

const TORCH_PYTHON_ENV: &str = "RM_TORCH_PYTHON";

/// The Python with torch + transformers, or `None` after saying why the
/// test is skipped. A Python that is named but cannot import them fails the
/// test: the runner meant it to run.
fn torch_python(test: &str) -> Option<PathBuf> {
    let Some(py) = std::env::var_os(TORCH_PYTHON_ENV).filter(|p| !p.is_empty()) else {
        // Straight to the process's stderr: the harness captures eprintln!
        // of a passing test, and a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: {TORCH_PYTHON_ENV} names no Python with torch and transformers \
             (e.g. {TORCH_PYTHON_ENV}=/path/to/venv/bin/python)"
        );
        return None;
    };
    let py = PathBuf::from(py);
    let out = Command::new(&py)
        .args(["-c", "import torch, transformers"])
        .output()
        .unwrap_or_else(|e| panic!("{TORCH_PYTHON_ENV}={}: {e}", py.display()));
    assert!(
        out.status.success(),
        "{TORCH_PYTHON_ENV}={} cannot import torch and transformers: {}",
        py.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    Some(py)
}

/// A plugin dir with the shipped `cpu-transformers` worker and the common
/// modules it imports (`../common`), as the agent image lays them out.
fn cpu_transformers_plugins(dir: &Path) -> PathBuf {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("workers");
    let plugins = dir.join("plugins");
    for (sub, files) in [
        ("cpu-transformers", &["manifest.json", "worker.py"][..]),
        ("common", &["rm_worker.py", "hf_engine.py"][..]),
    ] {
        std::fs::create_dir_all(plugins.join(sub)).unwrap();
        for f in files {
            std::fs::copy(src.join(sub).join(f), plugins.join(sub).join(f)).unwrap();
        }
    }
    plugins
}

const PROMPT: [u32; 5] = [5, 17, 42, 99, 3];
const NEW_TOKENS: usize = 12;

/// Writes a random GPT-2 to `model` with transformers and answers what
/// transformers itself computes on it: greedy tokens after [`PROMPT`] (EOS
/// suppressed, as the agent's `ignore_eos`) and the logits of every
/// position of [`PROMPT`].
fn gpt2_with_reference(py: &Path, model: &Path) -> (Vec<u32>, Vec<f32>) {
    const SCRIPT: &str = r#"
import json, sys, torch
from transformers import GPT2Config, GPT2LMHeadModel
out, prompt, n = sys.argv[1], json.loads(sys.argv[2]), int(sys.argv[3])
torch.manual_seed(1234)
cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=128, n_positions=64,
                 bos_token_id=127, eos_token_id=127)
model = GPT2LMHeadModel(cfg).eval()
model.save_pretrained(out)
ids = torch.tensor([prompt])
with torch.no_grad():
    gen = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                         min_new_tokens=n, do_sample=False)
    logits = model(ids).logits[0].float()
print(json.dumps({"tokens": gen[0, len(prompt):].tolist(), "logits": logits.flatten().tolist()}))
"#;
    let out = Command::new(py)
        .arg("-c")
        .arg(SCRIPT)
        .arg(model)
        .arg(json!(PROMPT).to_string())
        .arg(NEW_TOKENS.to_string())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the GPT-2 script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(stdout.lines().last().unwrap()).unwrap();
    let tokens = ids(&v["tokens"]);
    let logits = v["logits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap() as f32)
        .collect();
    (tokens, logits)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_u64().unwrap() as u32)
        .collect()
}

fn prepare(agent: &Agent, model: &Path, extra: Value) -> common::Reply {
    let mut body = json!({"source": {"path": model}, "device": "cpu", "options": {}});
    if let (Some(b), Some(e)) = (body.as_object_mut(), extra.as_object()) {
        b.extend(e.clone());
    }
    agent.post("/v1/prepare", body)
}

#[test]
fn gpt2_runs_on_cpu_transformers_as_transformers_runs_it_and_llama_stays_built_in() {
    let Some(py) = torch_python(
        "gpt2_runs_on_cpu_transformers_as_transformers_runs_it_and_llama_stays_built_in",
    ) else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let gpt2 = dir.path().join("gpt2");
    let (want_tokens, want_logits) = gpt2_with_reference(&py, &gpt2);
    let plugins = cpu_transformers_plugins(dir.path());
    let agent = Agent::start(
        dir.path(),
        Some(plugins),
        &[
            "--worker-python",
            py.to_str().unwrap(),
            "--cpu-threads",
            "2",
        ],
    );
    let backends = agent.get("/v1/backends").json();
    let worker = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "cpu-transformers")
        .cloned()
        .unwrap_or_else(|| panic!("no cpu-transformers in {backends}"));
    assert_eq!(worker["available"], true, "{worker}");

    // The built-in backend refuses GPT-2: the worker serves it.
    let p = prepare(&agent, &gpt2, json!({}));
    assert_eq!(p.status, 200, "prepare: {}", p.message());
    let p = p.json();
    assert_eq!(p["backend"], "cpu-transformers", "{p}");
    let key = p["key"].as_str().unwrap();

    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "input_ids": PROMPT, "max_new_tokens": NEW_TOKENS, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200, "generate: {}", r.message());
    let out = &r.json()["outputs"][0];
    assert_eq!(ids(&out["token_ids"]), want_tokens, "greedy tokens differ");
    assert_eq!(out["finish_reason"], "length");

    // Streaming: the same tokens, one event each, then "done".
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "input_ids": PROMPT, "max_new_tokens": NEW_TOKENS, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(r.status, 200);
    let lines = r.lines();
    let streamed: Vec<u32> = lines
        .iter()
        .filter(|l| l["event"] == "token")
        .map(|l| l["token_id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(streamed, want_tokens);
    assert_eq!(lines.last().unwrap()["event"], "done");

    // Sampling with a seed is reproducible.
    let sample = |seed: u64| {
        let r = agent.post(
            "/v1/generate",
            json!({"key": key, "input_ids": PROMPT, "max_new_tokens": 8, "do_sample": true,
                   "temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": seed, "ignore_eos": true}),
        );
        assert_eq!(r.status, 200, "sample: {}", r.message());
        ids(&r.json()["outputs"][0]["token_ids"])
    };
    assert_eq!(sample(3), sample(3));

    let r = agent.post(
        "/v1/forward",
        json!({"key": key, "device": "cpu", "input_ids": PROMPT, "logits_to_keep": 0}),
    );
    assert_eq!(r.status, 200, "forward: {}", r.message());
    let out: Vec<ForwardOutput> = serde_json::from_value(r.json()["outputs"].clone()).unwrap();
    assert_eq!((out[0].positions, out[0].vocab_size), (PROMPT.len(), 128));
    let diff = out[0]
        .logits
        .iter()
        .zip(&want_logits)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert_eq!(out[0].logits.len(), want_logits.len());
    assert!(diff <= 1e-4, "logits differ from transformers' by {diff}");

    // Not a precision the worker runs: 400 naming the ones it does.
    let r = prepare(&agent, &gpt2, json!({"options": {"precision": "q8_0"}}));
    assert_eq!(r.status, 400, "{}", r.message());
    assert!(
        r.message().contains("none, fp32, bf16, fp16"),
        "{}",
        r.message()
    );

    // Named, the built-in backend says why it does not take GPT-2.
    let r = prepare(&agent, &gpt2, json!({"backend": "cpu"}));
    assert_eq!(r.status, 422, "{}", r.message());
    assert!(
        r.message().contains("model_type \"gpt2\" is not supported"),
        "{}",
        r.message()
    );

    // A llama stays with the built-in backend, which wins the tie.
    let llama = dir.path().join("llama");
    tiny_llama(&llama, 7);
    let p = prepare(&agent, &llama, json!({}));
    assert_eq!(p.status, 200, "prepare llama: {}", p.message());
    assert_eq!(p.json()["backend"], "cpu");
}

/// Where the worker's Python has no torch (the default agent image), GPT-2
/// is refused at prepare with each backend's reason, one line each, and a
/// llama still runs on the built-in backend.
#[test]
fn without_torch_gpt2_is_refused_with_each_backends_reason() {
    let dir = tempfile::tempdir().unwrap();
    // A `torch` that fails to import, first on the workers' path: the same
    // answer as a Python without torch, whatever python3 has installed.
    let shadow = dir.path().join("no-torch");
    std::fs::create_dir_all(&shadow).unwrap();
    std::fs::write(
        shadow.join("torch.py"),
        "raise ImportError('no torch in this test')\n",
    )
    .unwrap();
    let gpt2 = dir.path().join("gpt2");
    std::fs::create_dir_all(&gpt2).unwrap();
    std::fs::write(
        gpt2.join("config.json"),
        r#"{"model_type": "gpt2", "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": 128}"#,
    )
    .unwrap();
    std::fs::write(gpt2.join("model.safetensors"), b"").unwrap();
    let plugins = cpu_transformers_plugins(dir.path());
    let agent = Agent::start_with_env(
        dir.path(),
        Some(plugins),
        &[],
        &[("PYTHONPATH", shadow.to_str().unwrap())],
    );
    let r = prepare(&agent, &gpt2, json!({}));
    assert_eq!(r.status, 503, "{}", r.message());
    let m = r.message();
    let lines: Vec<&str> = m.lines().map(str::trim).collect();
    assert_eq!(lines.len(), 3, "{m}");
    assert!(
        lines[1].starts_with("cpu: model_type \"gpt2\" is not supported by the cpu backend"),
        "{m}"
    );
    assert!(
        lines[2].starts_with("cpu-transformers: unavailable (cannot import torch"),
        "{m}"
    );
    let r = prepare(&agent, &gpt2, json!({"backend": "cpu-transformers"}));
    assert_eq!(r.status, 503, "{}", r.message());
    assert!(
        r.message().contains("no torch in this test"),
        "{}",
        r.message()
    );

    let llama = dir.path().join("llama");
    tiny_llama(&llama, 3);
    let p = prepare(&agent, &llama, json!({}));
    assert_eq!(p.status, 200, "prepare llama: {}", p.message());
    assert_eq!(p.json()["backend"], "cpu");
}
