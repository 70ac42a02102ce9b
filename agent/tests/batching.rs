//! Continuous batching on llama.cpp (issue 19): requests of one model run
//! in one context at once, and each gets exactly what it gets alone, streams
//! its own tokens, can be cancelled without disturbing the others, and waits
//! when the batch is full. On SmolLM2 (e2e/fetch-smollm2.sh) when it can be
//! had, else on the tiny GGUF the hostile-model tests make.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use common::{Agent, tiny_gguf};
use rm_agent::backend::cpu::{EngineOptions, GgufEngine, LoadedModel};
use rm_agent::backend::{BackendError, Cancel, FinishReason, GenerationParams};
use serde_json::{Value, json};

/// SmolLM2's GGUF, or a tiny one written under `dir`.
fn model_file(dir: &Path) -> (PathBuf, bool) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/fetch-smollm2.sh");
    if let Ok(o) = std::process::Command::new(&script).output() {
        let path = String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .to_string();
        if o.status.success() && Path::new(&path).is_file() {
            return (PathBuf::from(path), true);
        }
    }
    eprintln!("e2e/fetch-smollm2.sh gave no GGUF: the tiny GGUF stands in");
    let p = dir.join("models/tiny.gguf");
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, tiny_gguf().bytes()).unwrap();
    (p, false)
}

/// An agent with the model prepared: (agent, key, artifact dir, SmolLM2?).
fn prepared(dir: &Path, args: &[&str]) -> (Agent, String, PathBuf, bool) {
    let (gguf, smol) = model_file(dir);
    let parent = gguf.parent().unwrap().display().to_string();
    let mut all = vec!["--model-path-allow", &parent, "--cpu-threads", "2"];
    all.extend_from_slice(args);
    let agent = Agent::start(dir, None, &all);
    let r = agent.post(
        "/v1/prepare",
        json!({"source": {"path": gguf}, "device": "cpu"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let key = r.json()["key"].as_str().unwrap().to_string();
    let artifact = dir.join("cache/entries").join(&key);
    (agent, key, artifact, smol)
}

fn params(n: usize) -> GenerationParams {
    GenerationParams {
        max_new_tokens: n,
        do_sample: false,
        temperature: 1.0,
        top_p: None,
        top_k: None,
        seed: 0,
        eos_token_ids: vec![],
        stop_at_eos: false,
        repetition_penalty: 1.0,
        min_new_tokens: 0,
    }
}

/// Prompts of different lengths, and every sampling option.
fn cases(model: &LoadedModel, smol: bool, n: usize) -> Vec<(Vec<u32>, GenerationParams)> {
    let prompts: Vec<Vec<u32>> = if smol {
        [
            "The capital of France is",
            "Once upon a time, in a small village by the sea, there lived an old fisherman who",
            "def fibonacci(n):",
            "1, 2, 3, 4,",
            "The three primary colours are red,",
            "Water boils at",
        ]
        .iter()
        .map(|t| model.encode(t).unwrap())
        .collect()
    } else {
        (0..6u32)
            .map(|i| (0..3 + 5 * i).map(|k| 3 + (k * 7 + i * 13) % 250).collect())
            .collect()
    };
    let mut out = Vec::new();
    for (i, p) in prompts.into_iter().enumerate() {
        let mut g = params(n);
        match i {
            1 => {
                g.do_sample = true;
                g.temperature = 0.8;
                g.top_k = Some(40);
                g.seed = 7;
            }
            2 => {
                g.do_sample = true;
                g.temperature = 1.1;
                g.top_p = Some(0.9);
                g.seed = 11;
            }
            3 => g.repetition_penalty = 1.3,
            4 => {
                g.stop_at_eos = true;
                g.min_new_tokens = n / 2;
            }
            _ => {}
        }
        out.push((p, g));
    }
    out
}

struct Run {
    tokens: Vec<u32>,
    streamed: Vec<u32>,
    finish: FinishReason,
    first: Instant,
    last: Instant,
}

fn run_one(
    model: &LoadedModel,
    prompt: &[u32],
    p: &GenerationParams,
    cancel: &Cancel,
    cancel_after: Option<usize>,
) -> Result<Run, BackendError> {
    let mut streamed = Vec::new();
    let mut times = Vec::new();
    let (tokens, finish) = model.generate(prompt, p, cancel, |id, _| {
        streamed.push(id);
        times.push(Instant::now());
        if cancel_after == Some(streamed.len()) {
            cancel.cancel();
        }
    })?;
    Ok(Run {
        tokens,
        streamed,
        finish,
        first: times[0],
        last: *times.last().unwrap(),
    })
}

fn load(artifact: &Path, max_batch: usize) -> LoadedModel {
    load_with(artifact, max_batch, false)
}

fn load_with(artifact: &Path, max_batch: usize, exact_batching: bool) -> LoadedModel {
    let m = LoadedModel::load(
        artifact,
        &EngineOptions {
            gguf_engine: GgufEngine::LlamaCpp,
            threads: 2,
            max_batch,
            exact_batching,
        },
    )
    .unwrap();
    assert_eq!(m.engine(), "llama.cpp");
    m
}

/// Runs every case at once from its own thread.
fn concurrently(
    model: &LoadedModel,
    cases: &[(Vec<u32>, GenerationParams)],
    cancel_after: &[Option<usize>],
) -> Vec<Result<Run, BackendError>> {
    let barrier = Barrier::new(cases.len());
    std::thread::scope(|s| {
        let handles: Vec<_> = cases
            .iter()
            .zip(cancel_after)
            .map(|((prompt, p), after)| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    run_one(model, prompt, p, &Cancel::default(), *after)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn concurrent_requests_get_exactly_what_each_gets_alone_and_extra_ones_wait() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, _key, artifact, smol) = prepared(dir.path(), &[]);
    // A batch of 4 for 6 requests: two wait for room, then run.
    let model = load(&artifact, 4);
    let cases = cases(&model, smol, 24);
    let alone: Vec<Run> = cases
        .iter()
        .map(|(prompt, p)| run_one(&model, prompt, p, &Cancel::default(), None).unwrap())
        .collect();
    let together = concurrently(&model, &cases, &[None; 6]);
    for (i, (a, t)) in alone.iter().zip(&together).enumerate() {
        let t = t.as_ref().unwrap();
        assert_eq!(a.tokens, t.tokens, "case {i}: batched differs from alone");
        assert_eq!(a.finish, t.finish, "case {i}");
        assert_eq!(t.streamed, t.tokens, "case {i}: streamed tokens");
    }
    // They ran at once: some request had its first token before another's
    // last one (one after another, each would end before the next began).
    let overlapping = together.iter().flatten().any(|a| {
        together
            .iter()
            .flatten()
            .any(|b| a.first < b.last && b.first < a.last && a.first != b.first)
    });
    assert!(overlapping, "no two requests ran at once");
    // Greedy requests of the same length stay identical on a batch of 1 too.
    let serial = load(&artifact, 1);
    let again = concurrently(&serial, &cases[..3], &[None; 3]);
    for (a, t) in alone.iter().zip(&again) {
        assert_eq!(a.tokens, t.as_ref().unwrap().tokens);
    }
}

/// A prompt of about 600 tokens (past the 512 KV cells where a lone decode
/// with flash attention splits its sums across threads), sampled, beside
/// three short ones: (tokens alone, tokens batched) of the long one.
fn long_context_alone_and_batched(exact: bool) -> (Vec<u32>, Vec<u32>) {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, _key, artifact, smol) = prepared(dir.path(), &[]);
    let model = load_with(&artifact, 4, exact);
    let mut cases: Vec<_> = cases(&model, smol, 16).into_iter().take(4).collect();
    let long: Vec<u32> = cases
        .iter()
        .flat_map(|(p, _)| p.clone())
        .cycle()
        .take(600)
        .collect();
    cases[0].0 = long;
    cases[0].1.do_sample = true;
    cases[0].1.temperature = 1.0;
    cases[0].1.seed = 3;
    let alone = run_one(&model, &cases[0].0, &cases[0].1, &Cancel::default(), None)
        .unwrap()
        .tokens;
    let together = concurrently(&model, &cases, &[None; 4]);
    (alone, together[0].as_ref().unwrap().tokens.clone())
}

#[test]
fn exact_batching_keeps_long_contexts_identical_too() {
    let (alone, batched) = long_context_alone_and_batched(true);
    assert_eq!(alone, batched);
}

#[test]
fn long_contexts_run_without_flash_attention_and_stay_identical() {
    // Streams of over 256 cells have flash attention off in the default
    // mode too (a lone decode would split its sums across threads).
    let (alone, batched) = long_context_alone_and_batched(false);
    assert_eq!(alone, batched);
}

#[test]
fn a_cancelled_sequence_stops_and_the_others_are_undisturbed() {
    let dir = tempfile::tempdir().unwrap();
    let (_agent, _key, artifact, smol) = prepared(dir.path(), &[]);
    let model = load(&artifact, 8);
    let cases: Vec<_> = cases(&model, smol, 20).into_iter().take(4).collect();
    let alone: Vec<Vec<u32>> = cases
        .iter()
        .map(|(prompt, p)| {
            run_one(&model, prompt, p, &Cancel::default(), None)
                .unwrap()
                .tokens
        })
        .collect();
    // The second stops itself after 3 tokens.
    let together = concurrently(&model, &cases, &[None, Some(3), None, None]);
    for (i, r) in together.iter().enumerate() {
        if i == 1 {
            assert!(
                matches!(r, Err(BackendError::Cancelled)),
                "{:?}",
                r.as_ref().map(|r| &r.tokens)
            );
        } else {
            assert_eq!(r.as_ref().unwrap().tokens, alone[i], "case {i}");
        }
    }
    // Its sequence was freed: the model still serves, and the same again.
    let (prompt, p) = &cases[1];
    let r = run_one(&model, prompt, p, &Cancel::default(), None).unwrap();
    assert_eq!(r.tokens, alone[1]);
}

/// Streams one generation through the agent: the token events' ids and the
/// final outputs' ids.
fn stream(agent: &Agent, key: &str, prompt: &str, n: usize) -> (Vec<u32>, Vec<u32>) {
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "prompt": prompt, "max_new_tokens": n, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let lines = r.lines();
    let streamed: Vec<u32> = lines
        .iter()
        .filter(|l| l["event"] == "token")
        .map(|l| l["token_id"].as_u64().unwrap() as u32)
        .collect();
    let done: &Value = lines.iter().find(|l| l["event"] == "done").unwrap();
    (streamed, common::ids(&done["outputs"][0]["token_ids"]))
}

#[test]
fn the_agent_streams_each_of_more_concurrent_requests_than_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    // A batch of 2 for 5 clients of one namespace: admission lets two in at
    // once (not one), the others wait their turn and complete.
    let (agent, key, _artifact, smol) = prepared(dir.path(), &["--cpu-max-batch", "2"]);
    let prompts: Vec<String> = if smol {
        ["Paris is", "The sea", "Rust is a", "In 1492,", "Hello"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    } else {
        ["abc", "hello world", "x", "zzzz top", "qq"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let alone: Vec<Vec<u32>> = prompts
        .iter()
        .map(|p| stream(&agent, &key, p, 12).1)
        .collect();
    let results = Mutex::new(Vec::new());
    let agent = Arc::new(agent);
    std::thread::scope(|s| {
        for (i, p) in prompts.iter().enumerate() {
            let (agent, key, results) = (agent.clone(), key.clone(), &results);
            s.spawn(move || {
                let r = stream(&agent, &key, p, 12);
                results.lock().unwrap().push((i, r));
            });
        }
    });
    let mut results = results.into_inner().unwrap();
    results.sort_by_key(|(i, _)| *i);
    assert_eq!(results.len(), prompts.len());
    for (i, (streamed, outputs)) in results {
        assert_eq!(streamed, outputs, "request {i}: streamed vs outputs");
        assert_eq!(outputs, alone[i], "request {i}: concurrent vs alone");
    }
    assert_eq!(
        common::metric(&agent, "rm_agent_generate_errors_total"),
        0.0
    );
}
