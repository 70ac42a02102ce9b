//! The real `rm-agent` binary, driven through its unix socket: generation,
//! cache behaviour, tokens, workers and bad requests.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{
    Agent, TINY_VOCAB, direct_greedy, direct_greedy_qwen2, direct_last_logits, ids,
    test_double_plugins, tiny_llama, tiny_qwen2,
};
use rm_agent::backend::cpu::{EngineOptions, GgufEngine, LoadedModel};
use rm_agent::backend::{ForwardOutput, GenerationParams};
use serde_json::{Value, json};

fn prepare(agent: &Agent, model: &Path, options: Value) -> Value {
    let r = agent.post(
        "/v1/prepare",
        json!({"source": {"path": model}, "device": "cpu", "options": options}),
    );
    assert_eq!(
        r.status,
        200,
        "prepare: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()
}

/// The agent's HF -> GGUF conversion of `model` without quantization.
fn f32_gguf(model: &Path, dest: &Path) -> std::path::PathBuf {
    rm_agent::backend::cpu::compile::hf_to_gguf(
        model,
        candle_core::quantized::GgmlDType::F32,
        dest,
        &|_, _| {},
    )
    .unwrap();
    dest.to_owned()
}

fn generate_ids(agent: &Agent, key: &str, prompt: &[u32], n: usize) -> Vec<u32> {
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "input_ids": prompt, "max_new_tokens": n, "ignore_eos": true}),
    );
    assert_eq!(
        r.status,
        200,
        "generate: {}",
        String::from_utf8_lossy(&r.body)
    );
    ids(&r.json()["outputs"][0]["token_ids"])
}

#[test]
fn tiny_llama_greedy_output_equals_direct_candle() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 7);
    let agent = Agent::start(dir.path(), None, &[]);
    assert_eq!(agent.get("/healthz").json()["status"], "ok");
    let backends = agent.get("/v1/backends").json();
    assert_eq!(backends["backends"][0]["name"], "cpu");
    assert_eq!(backends["backends"][0]["available"], true);

    let p = prepare(&agent, &model, json!({}));
    assert_eq!(p["cached"], false);
    let key = p["key"].as_str().unwrap();
    let prompt = [1u32, 17, 42, 99, 3];
    let got = generate_ids(&agent, key, &prompt, 16);
    let want = direct_greedy(&model, &prompt, 16);
    assert_eq!(got, want, "agent greedy tokens differ from candle's");

    // Streaming gives the same tokens, one event per token, then "done".
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "input_ids": prompt, "max_new_tokens": 16, "ignore_eos": true, "stream": true}),
    );
    assert_eq!(r.status, 200);
    let lines = r.lines();
    let streamed: Vec<u32> = lines
        .iter()
        .filter(|l| l["event"] == "token")
        .map(|l| l["token_id"].as_u64().unwrap() as u32)
        .collect();
    assert_eq!(streamed, want);
    assert_eq!(lines.last().unwrap()["event"], "done");

    // A batch of prompts: each equals its own direct run.
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "input_ids": [[5, 6, 7], [200, 1]], "max_new_tokens": 6, "ignore_eos": true}),
    );
    assert_eq!(r.status, 200);
    let outs = r.json()["outputs"].clone();
    assert_eq!(
        ids(&outs[0]["token_ids"]),
        direct_greedy(&model, &[5, 6, 7], 6)
    );
    assert_eq!(
        ids(&outs[1]["token_ids"]),
        direct_greedy(&model, &[200, 1], 6)
    );

    // Sampling with a seed is reproducible; EOS stops early.
    let sample = |seed: u64| {
        let r = agent.post(
            "/v1/generate",
            json!({"key": key, "input_ids": prompt, "max_new_tokens": 12, "do_sample": true,
                   "temperature": 0.9, "top_p": 0.9, "top_k": 20, "seed": seed, "ignore_eos": true}),
        );
        ids(&r.json()["outputs"][0]["token_ids"])
    };
    assert_eq!(sample(3), sample(3));
    let stop = want[2];
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "input_ids": prompt, "max_new_tokens": 16, "eos_token_id": stop}),
    );
    let out = &r.json()["outputs"][0];
    assert_eq!(out["finish_reason"], "eos");
    assert_eq!(*ids(&out["token_ids"]).last().unwrap(), stop);
}

/// `POST /v1/forward`, decoded.
fn forward(agent: &Agent, key: &str, input_ids: Value, keep: usize) -> Vec<ForwardOutput> {
    let r = agent.post(
        "/v1/forward",
        json!({"key": key, "device": "cpu", "input_ids": input_ids, "logits_to_keep": keep}),
    );
    assert_eq!(
        r.status,
        200,
        "forward: {}",
        String::from_utf8_lossy(&r.body)
    );
    let body = r.json();
    assert_eq!(body["logits_dtype"], "float32-le-base64");
    serde_json::from_value(body["outputs"].clone()).unwrap()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn argmax(v: &[f32]) -> u32 {
    let mut best = 0;
    for (i, x) in v.iter().enumerate() {
        if *x > v[best] {
            best = i;
        }
    }
    best as u32
}

#[test]
fn forward_logits_equal_candle_run_afresh_on_each_prefix_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 23);
    let agent = Agent::start(dir.path(), None, &[]);
    let ids = [1u32, 17, 42, 99, 3];
    // Row i is the logits after ids[..=i], computed here independently: the
    // whole prefix in one pass, where the agent reuses its KV cache.
    let want: Vec<Vec<f32>> = (0..ids.len())
        .map(|i| direct_last_logits(&model, &ids[..=i]))
        .collect();
    let safetensors = prepare(&agent, &model, json!({}));
    let gguf = prepare(
        &agent,
        &f32_gguf(&model, &dir.path().join("f32.gguf")),
        json!({}),
    );
    // llama.cpp keeps its KV cache in f16 and rounds activations on the way:
    // about 1e-3 against logits of magnitude 5 on this model.
    for (p, engine, tolerance) in [(&safetensors, "candle", 1e-4), (&gguf, "llama.cpp", 1e-2)] {
        let key = p["key"].as_str().unwrap();
        let out = forward(&agent, key, json!(ids), 0);
        assert_eq!(engine_of(&agent, &p["key"]), engine);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].positions, out[0].vocab_size),
            (ids.len(), TINY_VOCAB)
        );
        for (i, row) in out[0].logits.chunks(TINY_VOCAB).enumerate() {
            let d = max_abs_diff(row, &want[i]);
            let scale = want[i].iter().fold(0f32, |m, x| m.max(x.abs()));
            assert!(
                d < tolerance,
                "{engine}: row {i} differs by {d} (largest logit {scale})"
            );
            assert_eq!(argmax(row), argmax(&want[i]), "{engine}: row {i}");
        }
        // logits_to_keep = 1 is the last row; its argmax is what generate
        // picks first.
        let last = forward(&agent, key, json!(ids), 1);
        assert_eq!(last[0].positions, 1);
        let d = max_abs_diff(&last[0].logits, &out[0].logits[4 * TINY_VOCAB..]);
        assert!(d < tolerance, "{engine}: last row differs by {d}");
        assert_eq!(
            argmax(&last[0].logits),
            generate_ids(&agent, key, &ids, 1)[0]
        );
        // A batch: one output per sequence, each of its own length.
        let batch = forward(&agent, key, json!([[5, 6, 7], [200, 1]]), 0);
        assert_eq!(
            batch.iter().map(|o| o.positions).collect::<Vec<_>>(),
            [3, 2]
        );
        let d = max_abs_diff(
            &batch[1].logits[TINY_VOCAB..],
            &direct_last_logits(&model, &[200, 1]),
        );
        assert!(d < tolerance, "{engine}: batch row differs by {d}");
    }

    // Bad requests say what to change.
    let key = safetensors["key"].as_str().unwrap();
    let long: Vec<u32> = (0..600).map(|i| i % 200).collect();
    let r = agent.post("/v1/forward", json!({"key": key, "input_ids": long}));
    assert_eq!(r.status, 400);
    assert!(r.message().contains("logits_to_keep"), "{}", r.message());
    let r = agent.post(
        "/v1/forward",
        json!({"key": key, "input_ids": [TINY_VOCAB + 5]}),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.message().contains("outside the vocabulary"),
        "{}",
        r.message()
    );
    let metrics = String::from_utf8_lossy(&agent.get("/metrics").body).to_string();
    assert!(
        metrics.contains("rm_agent_forward_requests_total 7"),
        "{metrics}"
    );
    assert!(
        metrics.contains("rm_agent_forward_errors_total 1"),
        "{metrics}"
    );
}

#[test]
fn quantized_compiles_run_and_gguf_conversion_keeps_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 11);
    // The HF -> GGUF conversion (names, rope permutation) without
    // quantization gives the same greedy tokens as the safetensors model.
    let gguf = f32_gguf(&model, &dir.path().join("f32.gguf"));
    let agent = Agent::start(dir.path(), None, &[]);
    let p = prepare(&agent, &gguf, json!({}));
    let prompt = [3u32, 9, 27, 81];
    let got = generate_ids(&agent, p["key"].as_str().unwrap(), &prompt, 12);
    assert_eq!(got, direct_greedy(&model, &prompt, 12));

    for precision in ["q8_0", "q4", "bf16"] {
        let p = prepare(&agent, &model, json!({"precision": precision}));
        let out = generate_ids(&agent, p["key"].as_str().unwrap(), &prompt, 8);
        assert_eq!(out.len(), 8);
        assert!(out.iter().all(|t| (*t as usize) < TINY_VOCAB));
    }
    // q8_0 of this model stays close to f32: the first greedy token agrees.
    let p = prepare(&agent, &model, json!({"precision": "q8_0"}));
    let q8 = generate_ids(&agent, p["key"].as_str().unwrap(), &prompt, 1);
    assert_eq!(q8[0], direct_greedy(&model, &prompt, 1)[0]);
    // A GGUF made from safetensors says tokenizer.ggml.model = "none": it
    // runs on llama.cpp, and the agent tokenizes.
    assert_eq!(engine_of(&agent, &p["key"]), "llama.cpp");
}

/// Which engine the agent loaded a cache entry on.
fn engine_of(agent: &Agent, key: &Value) -> String {
    let status = agent.get("/v1/backends").json();
    let loaded = status["backends"][0]["status"]["loaded_models"].clone();
    loaded
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["key"] == *key)
        .and_then(|m| m["engine"].as_str())
        .unwrap_or_else(|| panic!("{key} is not loaded: {status}"))
        .to_string()
}

#[test]
fn tiny_qwen2_runs_from_safetensors_on_candle_and_converted_on_llama_cpp() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("qwen");
    tiny_qwen2(&model, 5);
    let agent = Agent::start(dir.path(), None, &[]);
    let prompt = [1u32, 17, 42, 99, 3];
    let want = direct_greedy_qwen2(&model, &prompt, 12);

    // As it came: candle's qwen2 (biases, tied head) gives the same tokens
    // as the reference forward pass.
    let p = prepare(&agent, &model, json!({}));
    assert_eq!(
        generate_ids(&agent, p["key"].as_str().unwrap(), &prompt, 12),
        want
    );
    assert_eq!(engine_of(&agent, &p["key"]), "candle");
    let p = prepare(&agent, &model, json!({"precision": "bf16"}));
    let bf16 = generate_ids(&agent, p["key"].as_str().unwrap(), &prompt, 4);
    assert!(bf16.iter().all(|t| (*t as usize) < TINY_VOCAB));

    // Converted to GGUF without quantization: llama.cpp's qwen2 (NEOX rope,
    // no permutation; biases) gives the same greedy tokens.
    let gguf = f32_gguf(&model, &dir.path().join("qwen-f32.gguf"));
    let key = prepare(&agent, &gguf, json!({}))["key"].clone();
    assert_eq!(
        generate_ids(&agent, key.as_str().unwrap(), &prompt, 12),
        want
    );
    assert_eq!(engine_of(&agent, &key), "llama.cpp");

    // The agent's q8_0 compile: on llama.cpp, close to f32.
    let p = prepare(&agent, &model, json!({"precision": "q8_0"}));
    let q8 = generate_ids(&agent, p["key"].as_str().unwrap(), &prompt, 1);
    assert_eq!(q8[0], want[0]);
    assert_eq!(engine_of(&agent, &p["key"]), "llama.cpp");
}

#[test]
fn cache_hits_misses_on_changed_options_and_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 3);
    let mut agent = Agent::start(dir.path(), None, &[]);
    let a = prepare(&agent, &model, json!({"maxSeqLen": 128}));
    assert_eq!(a["cached"], false);
    let t = Instant::now();
    let b = prepare(&agent, &model, json!({"max_seq_len": 128}));
    let hit_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert_eq!(b["cached"], true);
    assert_eq!(a["key"], b["key"]);
    eprintln!("prepare on cache hit: {hit_ms:.2} ms");
    let c = prepare(&agent, &model, json!({"maxSeqLen": 64}));
    assert_eq!(
        c["cached"], false,
        "a changed option must be a different entry"
    );
    assert_ne!(a["key"], c["key"]);

    let listed = agent.get("/v1/cache").json();
    assert_eq!(listed["entries"].as_array().unwrap().len(), 2);
    assert!(listed["entries"][0]["size_bytes"].as_u64().unwrap() > 0);

    agent.stop();
    agent.spawn();
    let listed = agent.get("/v1/cache").json();
    assert_eq!(
        listed["entries"].as_array().unwrap().len(),
        2,
        "index rebuilt from disk"
    );
    let again = prepare(&agent, &model, json!({"maxSeqLen": 128}));
    assert_eq!(again["cached"], true);
    assert_eq!(again["key"], a["key"]);

    // Deletion.
    let key = a["key"].as_str().unwrap();
    let r = common::request(
        &agent.socket,
        "DELETE",
        &format!("/v1/cache/{key}"),
        &[common::AUTH],
        b"",
    );
    assert_eq!(r.status, 200);
    let r = common::request(
        &agent.socket,
        "DELETE",
        &format!("/v1/cache/{key}"),
        &[common::AUTH],
        b"",
    );
    assert_eq!(r.status, 404);
    assert!(r.message().contains("GET /v1/cache"));
}

#[test]
fn corrupted_entry_is_never_served() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 5);
    let mut agent = Agent::start(dir.path(), None, &[]);
    let p = prepare(&agent, &model, json!({}));
    let key = p["key"].as_str().unwrap().to_string();
    agent.stop();
    // Same size, different bytes: only the checksum can tell.
    let f = agent
        .cache
        .join("entries")
        .join(&key)
        .join("model.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    let n = bytes.len();
    bytes[n - 5] ^= 0xff;
    std::fs::write(&f, bytes).unwrap();
    agent.spawn();
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "input_ids": [1, 2], "max_new_tokens": 2}),
    );
    assert_eq!(r.status, 409, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.message().contains("prepare"), "{}", r.message());
    // Prepare compiles it afresh.
    let again = prepare(&agent, &model, json!({}));
    assert_eq!(again["cached"], false);
    assert_eq!(generate_ids(&agent, &key, &[1, 2], 2).len(), 2);
}

#[test]
fn lru_eviction_keeps_the_cache_under_its_limit() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 9);
    let size = std::fs::metadata(model.join("model.safetensors"))
        .unwrap()
        .len();
    // Room for about two copies of the model.
    let limit = (size * 2 + size / 2).to_string();
    let agent = Agent::start(dir.path(), None, &["--cache-max-bytes", &limit]);
    let a = prepare(&agent, &model, json!({"maxSeqLen": 100}));
    std::thread::sleep(Duration::from_millis(20));
    let b = prepare(&agent, &model, json!({"maxSeqLen": 101}));
    std::thread::sleep(Duration::from_millis(20));
    // Use `a` again, so `b` is the least recently used.
    assert_eq!(
        prepare(&agent, &model, json!({"maxSeqLen": 100}))["cached"],
        true
    );
    std::thread::sleep(Duration::from_millis(20));
    let c = prepare(&agent, &model, json!({"maxSeqLen": 102}));
    let listed = agent.get("/v1/cache").json();
    let keys: Vec<&str> = listed["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys.len(), 2, "{listed}");
    assert!(keys.contains(&a["key"].as_str().unwrap()));
    assert!(keys.contains(&c["key"].as_str().unwrap()));
    assert!(!keys.contains(&b["key"].as_str().unwrap()));
    assert!(listed["total_bytes"].as_u64().unwrap() <= limit.parse::<u64>().unwrap());
}

fn gpu_prepare(agent: &Agent, token: &str, model: &Path, extra: Value) -> common::Reply {
    agent.post_auth(
        "/v1/prepare",
        token,
        json!({"source": {"path": model}, "device": "gpu:0", "options": {"extra": extra}}),
    )
}

#[test]
fn sixteen_concurrent_prepares_run_one_compile() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 1);
    let agent = Agent::start(dir.path(), Some(test_double_plugins(dir.path())), &[]);
    agent.add_token("tok-gpu", "gpu", &[3]);
    let results: Vec<common::Reply> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..16)
            .map(|_| {
                s.spawn(|| {
                    gpu_prepare(
                        &agent,
                        "tok-gpu",
                        &model,
                        json!({"test.compile_seconds": "1.0"}),
                    )
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    }
    let keys: std::collections::HashSet<String> = results
        .iter()
        .map(|r| r.json()["key"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(keys.len(), 1);
    let stats = agent.get("/v1/cache").json()["stats"].clone();
    assert_eq!(stats["compiles_started"], 1, "{stats}");

    // Progress is observable while a compile runs (streamed prepare).
    let r = gpu_prepare(
        &agent,
        "tok-gpu",
        &model,
        json!({"test.compile_seconds": "0.3", "v": "2"}),
    );
    assert_eq!(r.status, 200);
    let r = agent.post_auth(
        "/v1/prepare",
        "tok-gpu",
        json!({"source": {"path": model}, "device": "gpu:0", "stream": true,
               "options": {"extra": {"test.compile_seconds": "0.5", "v": "3"}}}),
    );
    let lines = r.lines();
    assert!(
        lines
            .iter()
            .any(|l| l["event"] == "progress" && l["stage"] == "test-compile"),
        "{lines:?}"
    );
    assert_eq!(lines.last().unwrap()["event"], "done");
}

#[test]
fn sigkill_during_compile_leaves_no_entry_and_retry_succeeds() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 2);
    let mut agent = Agent::start(dir.path(), Some(test_double_plugins(dir.path())), &[]);
    agent.add_token("tok", "gpu", &[0]);
    let sock = agent.socket.clone();
    let m = model.clone();
    let pending = std::thread::spawn(move || {
        common::request(
            &sock,
            "POST",
            "/v1/prepare",
            &[("Authorization", "Bearer tok")],
            json!({"source": {"path": m}, "device": "gpu", "options": {"extra": {"test.compile_seconds": "30"}}})
                .to_string()
                .as_bytes(),
        )
    });
    // Wait until the compile is running and has written part of its output.
    let t = Instant::now();
    loop {
        let c = agent.get("/v1/compiles").json();
        if c["compiles"].as_array().is_some_and(|a| !a.is_empty()) {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "compile never started"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(300));
    agent.child.kill().unwrap(); // SIGKILL
    agent.child.wait().unwrap();
    let _ = pending.join();
    let tmp_entries = std::fs::read_dir(agent.cache.join("tmp")).unwrap().count();
    assert!(
        tmp_entries > 0,
        "the killed compile left its staging directory"
    );
    assert_eq!(
        std::fs::read_dir(agent.cache.join("entries"))
            .unwrap()
            .count(),
        0
    );

    agent.spawn();
    assert_eq!(
        std::fs::read_dir(agent.cache.join("tmp")).unwrap().count(),
        0,
        "staging cleaned at start"
    );
    assert_eq!(
        agent.get("/v1/cache").json()["entries"]
            .as_array()
            .unwrap()
            .len(),
        0
    );
    let r = gpu_prepare(
        &agent,
        "tok",
        &model,
        json!({"test.compile_seconds": "0.1"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["cached"], false);
}

#[test]
fn accelerator_requests_need_a_token_for_their_devices() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 4);
    let agent = Agent::start(dir.path(), Some(test_double_plugins(dir.path())), &[]);
    agent.add_token("good", "gpu", &[5, 6]);
    agent.add_token("rbln-token", "rbln", &[0]);
    let body = json!({"source": {"path": model}, "device": "gpu:0"});

    let r = agent.call("POST", "/v1/prepare", None, body.to_string().as_bytes());
    assert_eq!(r.status, 401);
    assert!(
        r.message().contains("Authorization: Bearer"),
        "{}",
        r.message()
    );
    // A pod with only an agent slot asks for a GPU.
    let r = agent.post("/v1/prepare", body.clone());
    assert_eq!(r.status, 403);
    assert!(
        r.message().contains("holds no accelerator"),
        "{}",
        r.message()
    );
    let r = agent.post_auth("/v1/prepare", "forged", body.clone());
    assert_eq!(r.status, 401);
    let r = agent.post_auth("/v1/prepare", "rbln-token", body.clone());
    assert_eq!(r.status, 403);
    assert!(r.message().contains("rbln"), "{}", r.message());
    let r = agent.post_auth(
        "/v1/prepare",
        "good",
        json!({"source": {"path": model}, "device": "gpu:2"}),
    );
    assert_eq!(r.status, 403);
    assert!(
        r.message().contains("outside the allocation"),
        "{}",
        r.message()
    );

    let r = agent.post_auth(
        "/v1/prepare",
        "good",
        json!({"source": {"path": model}, "device": "gpu:1"}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let p = r.json();
    assert_eq!(p["backend"], "test-double");
    assert_eq!(p["devices"], json!(["6"]));
    let key = p["key"].as_str().unwrap();
    // The worker process for this allocation sees only device 6.
    let r = agent.post_auth(
        "/v1/generate",
        "good",
        json!({"key": key, "device": "gpu:1", "input_ids": [1], "max_new_tokens": 2}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.json()["outputs"][0]["text"], "6");
    // Forward goes through the worker protocol too (logits as base64 f32).
    let r = agent.post_auth(
        "/v1/forward",
        "good",
        json!({"key": key, "device": "gpu:1", "input_ids": [[7, 8, 9]], "logits_to_keep": 2}),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let out: Vec<ForwardOutput> = serde_json::from_value(r.json()["outputs"].clone()).unwrap();
    assert_eq!((out[0].positions, out[0].vocab_size), (2, 4));
    assert_eq!(out[0].logits, [8.0, 9.0, 10.0, 11.0, 9.0, 10.0, 11.0, 12.0]);
    let no_token = |path: &str, body: Value| {
        agent
            .call("POST", path, None, body.to_string().as_bytes())
            .status
    };
    let body = json!({"key": key, "device": "gpu:1", "input_ids": [1]});
    assert_eq!(no_token("/v1/forward", body.clone()), 401);
    assert_eq!(no_token("/v1/generate", body.clone()), 401);
    // A pod of the same namespace without the GPU may not run on it.
    assert_eq!(agent.post("/v1/generate", body).status, 403);
    // And a cpu request may not use a GPU entry.
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "input_ids": [1]}),
    );
    assert_eq!(r.status, 403);
}

#[test]
fn crashed_or_garbled_worker_is_restarted() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 6);
    let agent = Agent::start(dir.path(), Some(test_double_plugins(dir.path())), &[]);
    agent.add_token("t", "gpu", &[0]);
    let p = agent
        .post_auth(
            "/v1/prepare",
            "t",
            json!({"source": {"path": model}, "device": "gpu"}),
        )
        .json();
    let key = p["key"].as_str().unwrap();
    let run = |prompt: Value| {
        agent.post_auth(
            "/v1/generate",
            "t",
            json!({"key": key, "device": "gpu", "prompt": prompt, "max_new_tokens": 3}),
        )
    };

    assert_eq!(run(json!("ok")).status, 200);
    let r = run(json!("crash"));
    assert_eq!(r.status, 502, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.message().contains("restarted"), "{}", r.message());
    let r = run(json!("ok"));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));

    let r = run(json!("garbage"));
    assert_eq!(r.status, 502);
    assert!(r.message().contains("protocol error"), "{}", r.message());
    assert_eq!(run(json!("ok")).status, 200);

    // A worker that hangs is killed after the manifest's request timeout.
    let r = run(json!("hang"));
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.message().contains("did not answer"), "{}", r.message());
    assert_eq!(run(json!("ok")).status, 200);

    let b = agent.get("/v1/backends").json();
    let w = b["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "test-double")
        .unwrap()
        .clone();
    assert!(w["status"]["restarts"].as_u64().unwrap() >= 3, "{w}");
}

#[test]
fn bad_requests_get_4xx_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 8);
    let agent = Agent::start(dir.path(), None, &[]);
    let key = prepare(&agent, &model, json!({}))["key"]
        .as_str()
        .unwrap()
        .to_string();
    let cases: Vec<(&str, Value, u16, &str)> = vec![
        (
            "/v1/prepare",
            json!({"source": {"path": model}, "device": "tpu"}),
            400,
            "unknown device type",
        ),
        (
            "/v1/prepare",
            json!({"source": {"path": model}, "options": {"precison": "q8_0"}}),
            400,
            "unknown compile option",
        ),
        (
            "/v1/prepare",
            json!({"source": {"path": model}, "options": {"precision": "int8"}}),
            400,
            "q8_0",
        ),
        (
            "/v1/prepare",
            json!({"source": {"path": "/nonexistent/model"}}),
            422,
            "cannot be read",
        ),
        (
            "/v1/prepare",
            json!({"source": {"path": "relative/model"}}),
            400,
            "absolute",
        ),
        (
            "/v1/prepare",
            json!({"model": "sha256:00"}),
            404,
            "POST /v1/models",
        ),
        (
            "/v1/prepare",
            json!({"source": {"path": model}, "backend": "nope"}),
            404,
            "GET /v1/backends",
        ),
        (
            "/v1/prepare",
            json!({"source": {"path": model}, "device": "rbln:0"}),
            403,
            "holds no accelerator",
        ),
        (
            "/v1/generate",
            json!({"key": key, "input_ids": [1], "max_new_tokens": 100000}),
            400,
            "max_new_tokens",
        ),
        (
            "/v1/generate",
            json!({"key": key, "input_ids": [100000]}),
            400,
            "vocabulary",
        ),
        (
            "/v1/generate",
            json!({"key": key, "input_ids": []}),
            400,
            "at least one token",
        ),
        (
            "/v1/generate",
            json!({"key": key, "prompt": "hello"}),
            400,
            "input_ids",
        ),
        (
            "/v1/generate",
            json!({"key": key, "input_ids": [1], "max_new_tokens": 300}),
            400,
            "maximum sequence length",
        ),
        (
            "/v1/generate",
            json!({"key": "zz", "input_ids": [1]}),
            400,
            "not a cache key",
        ),
        (
            "/v1/generate",
            json!({"key": "a".repeat(64), "input_ids": [1]}),
            404,
            "GET /v1/cache",
        ),
        (
            "/v1/generate",
            json!({"key": key, "input_ids": [1], "colour": "red"}),
            400,
            "unknown field",
        ),
    ];
    for (path, body, status, needle) in cases {
        let r = agent.post(path, body.clone());
        assert_eq!(
            r.status,
            status,
            "{path} {body}: {}",
            String::from_utf8_lossy(&r.body)
        );
        assert!(
            r.message().contains(needle),
            "{path} {body}: message {:?} lacks {needle:?}",
            r.message()
        );
    }
    let r = common::request(
        &agent.socket,
        "POST",
        "/v1/generate",
        &[common::AUTH],
        b"{not json",
    );
    assert_eq!(r.status, 400);
    assert!(r.message().contains("invalid JSON"));
    assert_eq!(agent.get("/v1/nothing").status, 404);
    // Still healthy after all that.
    assert_eq!(agent.get("/healthz").status, 200);
}

#[test]
fn smollm2_says_paris_on_llama_cpp_as_shipped_and_as_q8_0_and_candle_agrees() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../e2e/fetch-smollm2.sh");
    let out = std::process::Command::new(&script).output();
    let gguf = match out {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .last()
            .unwrap_or("")
            .to_string(),
        _ => {
            eprintln!(
                "SKIPPED smollm2 test: e2e/fetch-smollm2.sh could not provide the GGUF (no PyPI access?)"
            );
            return;
        }
    };
    let dir = tempfile::tempdir().unwrap();
    let gguf_dir = Path::new(&gguf).parent().unwrap().display().to_string();
    let agent = Agent::start(dir.path(), None, &["--model-path-allow", &gguf_dir]);
    let prompt = "The capital of France is";
    // As shipped (Q4_1), and the agent's own q8_0 compile of it: llama.cpp
    // must read the GGUF the compile step writes.
    for options in [json!({}), json!({"precision": "q8_0"})] {
        let r = agent.post(
            "/v1/prepare",
            json!({"source": {"path": gguf}, "device": "cpu", "options": options}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let key = r.json()["key"].as_str().unwrap().to_string();
        let r = agent.post(
            "/v1/generate",
            json!({"key": key, "prompt": prompt, "max_new_tokens": 16, "ignore_eos": true}),
        );
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        let out = &r.json()["outputs"][0];
        let text = out["text"].as_str().unwrap().to_string();
        assert!(
            text.starts_with(" Paris"),
            "{options}: continuation was {text:?}"
        );

        let status = agent.get("/v1/backends").json();
        let loaded = &status["backends"][0]["status"]["loaded_models"];
        let engine = loaded
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["key"] == key.as_str())
            .map(|m| m["engine"].clone());
        assert_eq!(engine, Some(json!("llama.cpp")), "{status}");

        // The same artifact on candle, in-process: two independent
        // implementations of the model agree on the greedy tokens. Only the
        // first 12 are compared: both quantize activations and accumulate in
        // their own order, and later on this prompt a near tie between two
        // digits falls differently (token 15 of 16 on Q4_1).
        let artifact = dir.path().join("cache/entries").join(&key);
        let candle = LoadedModel::load(
            &artifact,
            &EngineOptions {
                gguf_engine: GgufEngine::Candle,
                ..EngineOptions::default()
            },
        )
        .unwrap();
        assert_eq!(candle.engine(), "candle");
        let ids = candle.encode(prompt).unwrap();
        // Logits of every prompt position from llama.cpp: the last row's
        // argmax is the first generated token (" Paris").
        let rows = forward(&agent, &key, json!(ids), 0);
        assert_eq!(rows[0].positions, ids.len());
        let vocab = rows[0].vocab_size;
        assert_eq!(
            argmax(&rows[0].logits[(ids.len() - 1) * vocab..]),
            common::ids(&out["token_ids"])[0]
        );
        let (want, _) = candle
            .generate(&ids, &greedy(12), &Default::default(), |_, _| {})
            .unwrap();
        assert_eq!(
            common::ids(&out["token_ids"])[..12],
            want[..],
            "{options}: llama.cpp vs candle"
        );
    }
}

fn greedy(n: usize) -> GenerationParams {
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

#[test]
fn shipped_workers_are_discovered_and_report_missing_sdks() {
    let dir = tempfile::tempdir().unwrap();
    let plugins = Path::new(env!("CARGO_MANIFEST_DIR")).join("workers");
    let agent = Agent::start(dir.path(), Some(plugins), &[]);
    let b = agent.get("/v1/backends").json();
    let names: Vec<&str> = b["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        vec!["cpu", "cpu-transformers", "furiosa", "gpu-vllm", "rbln"]
    );
    for w in b["backends"].as_array().unwrap().iter().skip(1) {
        // cpu-transformers runs here (with torch): nothing to verify elsewhere.
        let unverified = w["name"] != "cpu-transformers";
        assert_eq!(w["status"]["unverified_on_hardware"], unverified, "{w}");
        if w["available"] == false {
            assert!(!w["reason"].as_str().unwrap().is_empty(), "{w}");
        }
    }
    // With no SDK, an rbln request with a valid token gets a clear 503.
    agent.add_token("r", "rbln", &[0]);
    let model = dir.path().join("tiny");
    tiny_llama(&model, 12);
    let r = agent.post_auth(
        "/v1/prepare",
        "r",
        json!({"source": {"path": model}, "device": "rbln:0"}),
    );
    if b["backends"][4]["available"] == false {
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(r.message().contains("rbln"), "{}", r.message());
    }
}

/// An upload on its own connection: headers and the first `first` bytes
/// now, the rest when `finish` is called; dropping it aborts the upload.
struct SlowUpload {
    stream: std::os::unix::net::UnixStream,
    body: Vec<u8>,
    sent: usize,
}

impl SlowUpload {
    fn start(socket: &Path, sha: &str, body: &[u8], first: usize) -> SlowUpload {
        use std::io::Write;
        let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
        let head = format!(
            "PUT /v1/blobs/{sha} HTTP/1.1\r\nHost: rm-agent\r\nConnection: close\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
            common::TOKEN,
            body.len()
        );
        stream.write_all(head.as_bytes()).unwrap();
        stream.write_all(&body[..first]).unwrap();
        stream.flush().unwrap();
        SlowUpload {
            stream,
            body: body.to_vec(),
            sent: first,
        }
    }

    fn finish(mut self) -> u16 {
        use std::io::{Read, Write};
        self.stream.write_all(&self.body[self.sent..]).unwrap();
        let mut reply = String::new();
        self.stream.read_to_string(&mut reply).unwrap();
        reply
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0)
    }
}

#[test]
fn concurrent_and_aborted_uploads_leave_only_verified_blobs() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &[]);
    let blobs = agent.cache.join("blobs");
    let body: Vec<u8> = (0..4u32 << 20).map(|i| (i * 7 + i / 251) as u8).collect();
    let sha = rm_agent::cache::key::hex(&<sha2::Sha256 as sha2::Digest>::digest(&body));
    let head = |sha: &str| {
        common::request(
            &agent.socket,
            "HEAD",
            &format!("/v1/blobs/{sha}"),
            &[common::AUTH],
            b"",
        )
        .status
    };
    let settle = || std::thread::sleep(Duration::from_millis(300));

    // A has written half when B starts the same blob; A completes, then B's
    // client goes away. Sharing one temp file, B's start would have cut A's
    // half, and A's rename would have stored that under the right name.
    let a = SlowUpload::start(&agent.socket, &sha, &body, body.len() / 2);
    settle();
    let b = SlowUpload::start(&agent.socket, &sha, &body, 4096);
    settle();
    assert_eq!(a.finish(), 200);
    drop(b);
    settle();
    assert_eq!(head(&sha), 200);
    let stored = std::fs::read(blobs.join(&sha)).unwrap();
    assert_eq!(stored.len(), body.len());
    assert!(stored == body, "the stored blob differs from the upload");

    // An upload whose client goes away stores nothing.
    let other: Vec<u8> = body.iter().rev().copied().collect();
    let other_sha = rm_agent::cache::key::hex(&<sha2::Sha256 as sha2::Digest>::digest(&other));
    drop(SlowUpload::start(
        &agent.socket,
        &other_sha,
        &other,
        other.len() / 3,
    ));
    settle();
    assert_eq!(head(&other_sha), 404);

    // Four at once: each answers 200 (stored, or already present).
    let uploads: Vec<SlowUpload> = (0..4)
        .map(|_| SlowUpload::start(&agent.socket, &other_sha, &other, 1000))
        .collect();
    settle();
    let codes: Vec<u16> = std::thread::scope(|s| {
        let handles: Vec<_> = uploads
            .into_iter()
            .map(|u| s.spawn(move || u.finish()))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(codes, vec![200; 4]);
    assert!(std::fs::read(blobs.join(&other_sha)).unwrap() == other);

    // No temporary file is left behind.
    let leftovers: Vec<String> = std::fs::read_dir(&blobs)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".part"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

/// A GET on the agent's TCP port (metrics), with optional extra headers.
fn tcp_get(addr: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: rm-agent\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let status = raw.split(' ').nth(1).unwrap().parse().unwrap();
    (status, raw)
}

#[test]
fn tenants_see_and_use_only_their_own_models_blobs_and_entries() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 11);
    let admin = "admin-token-0123456789abcdef";
    std::fs::write(dir.path().join("admin"), format!("{admin}\n")).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let tcp = format!("127.0.0.1:{port}");
    let admin_file = dir.path().join("admin").display().to_string();
    let agent = Agent::start(
        dir.path(),
        None,
        &["--admin-token-file", &admin_file, "--metrics-addr", &tcp],
    );
    agent.add_slot_token("ta", "team-a");
    agent.add_slot_token("tb", "team-b");
    let as_ = |token: &str, method: &str, path: &str, body: Value| {
        let b = if body.is_null() {
            vec![]
        } else {
            body.to_string().into_bytes()
        };
        agent.call(method, path, Some(token), &b)
    };

    // No token, no service (health aside).
    assert_eq!(agent.call("GET", "/healthz", None, b"").status, 200);
    for (m, p) in [
        ("GET", "/v1/backends"),
        ("GET", "/v1/cache"),
        ("POST", "/v1/prepare"),
        ("HEAD", "/v1/blobs/00"),
        ("GET", "/metrics"),
    ] {
        let r = agent.call(m, p, None, b"");
        assert_eq!(r.status, 401, "{m} {p}");
    }
    let r = agent.call("GET", "/v1/cache", None, b"");
    assert!(
        r.message().contains("RM_AGENT_SLOT_TOKEN"),
        "{}",
        r.message()
    );
    assert_eq!(
        agent.call("GET", "/v1/cache", Some("forged"), b"").status,
        401
    );

    // Team A compiles; team B, knowing the digest and key, gets nothing.
    let p = as_(
        "ta",
        "POST",
        "/v1/prepare",
        json!({"source": {"path": model}, "device": "cpu"}),
    );
    assert_eq!(p.status, 200, "{}", p.message());
    let (key, digest) = (
        p.json()["key"].as_str().unwrap().to_string(),
        p.json()["model"].as_str().unwrap().to_string(),
    );
    let entries = |token: &str| {
        as_(token, "GET", "/v1/cache", Value::Null).json()["entries"]
            .as_array()
            .unwrap()
            .len()
    };
    assert_eq!(entries("ta"), 1);
    assert_eq!(
        entries("tb"),
        0,
        "another namespace's entries are not listed"
    );
    assert_eq!(
        as_("tb", "GET", &format!("/v1/cache/{key}"), Value::Null).status,
        404
    );
    let r = as_(
        "tb",
        "POST",
        "/v1/prepare",
        json!({"model": digest, "device": "cpu"}),
    );
    assert_eq!(r.status, 404, "a digest alone is no proof: {}", r.message());
    let generate = json!({"key": key, "device": "cpu", "input_ids": [1, 2], "max_new_tokens": 2});
    assert_eq!(
        as_("tb", "POST", "/v1/generate", generate.clone()).status,
        404
    );
    assert_eq!(
        as_(
            "tb",
            "POST",
            "/v1/forward",
            json!({"key": key, "input_ids": [1, 2], "logits_to_keep": 1})
        )
        .status,
        404
    );
    assert_eq!(
        as_("tb", "DELETE", &format!("/v1/cache/{key}"), Value::Null).status,
        404
    );
    assert_eq!(
        as_("ta", "POST", "/v1/generate", generate.clone()).status,
        200
    );

    // Blobs: present only for whoever uploaded all of their bytes.
    let blob = b"weights of team a".to_vec();
    let sha = rm_agent::cache::key::hex(&<sha2::Sha256 as sha2::Digest>::digest(&blob));
    let put = |token: &str| agent.call("PUT", &format!("/v1/blobs/{sha}"), Some(token), &blob);
    let head = |token: &str| {
        agent
            .call("HEAD", &format!("/v1/blobs/{sha}"), Some(token), b"")
            .status
    };
    assert_eq!(put("ta").json()["stored"], true);
    assert_eq!((head("ta"), head("tb")), (200, 404));
    let files = json!({"source": {"files": [{"path": "model.gguf", "sha256": sha}]}});
    let r = as_("tb", "POST", "/v1/models", files.clone());
    assert_eq!(r.status, 404, "{}", r.message());
    assert!(r.message().contains(&sha), "{}", r.message());
    assert_eq!(
        put("tb").json()["stored"],
        true,
        "B proves it holds the bytes"
    );
    assert_eq!(head("tb"), 200);

    // Team B registers the same weights itself: it shares the compile...
    let r = as_(
        "tb",
        "POST",
        "/v1/prepare",
        json!({"source": {"path": model}, "device": "cpu"}),
    );
    assert_eq!(r.json()["key"], key.as_str());
    assert_eq!(r.json()["cached"], true, "one compile for both");
    assert_eq!(entries("tb"), 1);
    // ...so neither may delete it alone; the cluster operator may.
    let r = as_("ta", "DELETE", &format!("/v1/cache/{key}"), Value::Null);
    assert_eq!(r.status, 403, "{}", r.message());
    assert!(r.message().contains("other namespace"), "{}", r.message());

    // The TCP port lists the cache for the admin token only.
    assert_eq!(tcp_get(&tcp, "/metrics", &[]).0, 200);
    assert_eq!(tcp_get(&tcp, "/v1/cache", &[]).0, 401);
    let (st, body) = tcp_get(&tcp, "/v1/cache", &[("X-RM-Token", admin)]);
    assert_eq!(st, 200);
    assert!(body.contains(&key), "{body}");
    assert_eq!(
        tcp_get(&tcp, "/v1/prepare", &[("X-RM-Token", admin)]).0,
        404
    );
    let r = as_(admin, "DELETE", &format!("/v1/cache/{key}"), Value::Null);
    assert_eq!(r.status, 200, "{}", r.message());

    // Grants survive a restart.
    let mut agent = agent;
    agent.stop();
    agent.spawn();
    assert_eq!(
        agent
            .call("HEAD", &format!("/v1/blobs/{sha}"), Some("tb"), b"")
            .status,
        200
    );
    agent.add_slot_token("tc", "team-c");
    assert_eq!(
        agent
            .call("HEAD", &format!("/v1/blobs/{sha}"), Some("tc"), b"")
            .status,
        404
    );
}

#[test]
fn tokens_not_yet_bound_wait_briefly_and_lapsed_ones_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &[]);
    // Not bound: answered 503 with Retry-After once the short wait is over.
    agent.add_slot_token("fresh", None);
    let t = Instant::now();
    let r = agent.call("GET", "/v1/backends", Some("fresh"), b"");
    assert_eq!(r.status, 503, "{}", r.message());
    assert!(r.message().contains("retry"), "{}", r.message());
    assert!(t.elapsed() >= Duration::from_secs(2));
    // Bound while the request waits: answered.
    let bind = {
        let state = agent.state.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(400));
            let dir = state.join(rm_crds::token::TOKENS_DIR);
            let path = rm_crds::token::record_path(&dir, &rm_crds::token::token_sha256("fresh"));
            let mut rec: rm_crds::token::TokenRecord =
                serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            rec.owner = Some(rm_crds::token::TokenOwner {
                namespace: "team-a".into(),
                pod: "p".into(),
            });
            let tmp = dir.join(".bind.tmp");
            std::fs::write(&tmp, serde_json::to_vec(&rec).unwrap()).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        })
    };
    let r = agent.call("GET", "/v1/backends", Some("fresh"), b"");
    bind.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.message());
    // A lease that ran out (the device plugin could not renew it).
    let dir_ = agent.state.join(rm_crds::token::TOKENS_DIR);
    let path = rm_crds::token::record_path(&dir_, &rm_crds::token::token_sha256("fresh"));
    let mut rec: rm_crds::token::TokenRecord =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    rec.expires_unix_ms = Some(1);
    agent.write_token(&rec);
    let r = agent.call("GET", "/v1/backends", Some("fresh"), b"");
    assert_eq!(r.status, 401);
    assert!(r.message().contains("expired"), "{}", r.message());
}

/// The test double's `artifact.json` of a cache entry.
fn test_double_artifact(agent: &Agent, key: &str) -> Value {
    fn find(dir: &Path) -> Option<std::path::PathBuf> {
        for e in std::fs::read_dir(dir).ok()?.flatten() {
            let p = e.path();
            if p.file_name().is_some_and(|n| n == "artifact.json") {
                return Some(p);
            }
            if let Some(found) = p.is_dir().then(|| find(&p)).flatten() {
                return Some(found);
            }
        }
        None
    }
    let path = find(&agent.cache.join("entries").join(key)).expect("artifact.json in the entry");
    serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap()
}

#[test]
fn vendor_extras_are_checked_against_the_worker_manifest() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 5);
    let plugins = test_double_plugins(dir.path());
    let mut agent = Agent::start(dir.path(), Some(plugins.clone()), &[]);
    agent.add_token("tok", "gpu", &[0]);
    let refused = |agent: &Agent, extra: Value| {
        let r = gpu_prepare(agent, "tok", &model, extra.clone());
        assert_eq!(
            r.status,
            400,
            "{extra}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.message()
    };
    let m = refused(&agent, json!({"rbln_device": "3"}));
    assert!(
        m.contains("\"rbln_device\"") && m.contains("test.compile_seconds (float 0..=3600)"),
        "{m}"
    );
    let m = refused(&agent, json!({"test.compile_seconds": "soon"}));
    assert!(m.contains("not a finite decimal number"), "{m}");
    let m = refused(&agent, json!({"v": -1}));
    assert!(m.contains("below the minimum 0"), "{m}");
    let m = refused(&agent, json!({"trust_remote_code": true}));
    assert!(m.contains("--allow-trust-remote-code"), "{m}");
    assert_eq!(
        agent.get("/v1/cache").json()["stats"]["compiles_started"],
        0,
        "refused before any compile"
    );
    let b = agent.get("/v1/backends").json();
    let listed = &b["backends"][1]["status"]["extra_options"];
    assert_eq!(listed["v"], "int 0..=1000000", "{b}");
    assert!(
        listed.get("trust_remote_code").is_none(),
        "not offered while off: {b}"
    );
    // Typed values the manifest allows pass; the worker is told trust_remote_code is off.
    let r = gpu_prepare(&agent, "tok", &model, json!({"v": 7}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let art = test_double_artifact(&agent, r.json()["key"].as_str().unwrap());
    assert_eq!(art["extra"], json!({"v": "7"}));
    assert_eq!(art["env_allow_trust_remote_code"], "0");

    // The cluster operator allows it: the flag reaches the backend and the worker.
    agent.child.kill().unwrap();
    agent.child.wait().unwrap();
    agent.extra_args = vec!["--allow-trust-remote-code".into()];
    agent.spawn();
    let r = gpu_prepare(&agent, "tok", &model, json!({"trust_remote_code": "true"}));
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let art = test_double_artifact(&agent, r.json()["key"].as_str().unwrap());
    assert_eq!(art["env_allow_trust_remote_code"], "1");
    let m = refused(&agent, json!({"trust_remote_code": "yes"}));
    assert!(m.contains("not true or false"), "{m}");
}

/// `PUT /v1/blobs/<sha>` that declares `len` bytes and sends none: what the
/// agent answers from the declared length alone. (Sending the body too would
/// race the early answer: a unix socket closed with unread data resets.)
fn put_declared(socket: &Path, token: &str, sha: &str, len: usize) -> common::Reply {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let head = format!(
        "PUT /v1/blobs/{sha} HTTP/1.1\r\nHost: rm-agent\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nContent-Length: {len}\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    common::parse_reply(&raw).expect("an HTTP answer")
}

/// `PUT /v1/blobs/<sha>` with a chunked body (no declared length).
fn put_chunked(socket: &Path, token: &str, sha: &str, body: &[u8]) -> common::Reply {
    use std::io::{Read, Write};
    let mut s = std::os::unix::net::UnixStream::connect(socket).unwrap();
    let head = format!(
        "PUT /v1/blobs/{sha} HTTP/1.1\r\nHost: rm-agent\r\nConnection: close\r\nAuthorization: Bearer {token}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).unwrap();
    for c in body.chunks(256) {
        // The agent may answer and close once the limit is passed.
        if s.write_all(format!("{:x}\r\n", c.len()).as_bytes())
            .is_err()
            || s.write_all(c).is_err()
            || s.write_all(b"\r\n").is_err()
        {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    // Status 0: reset before the answer could be read.
    common::parse_reply(&raw).unwrap_or(common::Reply {
        status: 0,
        body: vec![],
    })
}

#[test]
fn uploads_are_bounded_per_file_per_namespace_and_by_free_disk() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(
        dir.path(),
        None,
        &["--max-upload-bytes", "1K", "--namespace-quota", "3K"],
    );
    agent.add_slot_token("ta", "team-a");
    agent.add_slot_token("tb", "team-b");
    let blob = |seed: u8, len: usize| -> (Vec<u8>, String) {
        let b: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(seed)).collect();
        let sha = rm_agent::cache::key::hex(&<sha2::Sha256 as sha2::Digest>::digest(&b));
        (b, sha)
    };
    let put = |token: &str, (b, sha): &(Vec<u8>, String)| {
        agent.call("PUT", &format!("/v1/blobs/{sha}"), Some(token), b)
    };
    let head = |token: &str, sha: &str| {
        agent
            .call("HEAD", &format!("/v1/blobs/{sha}"), Some(token), b"")
            .status
    };
    let blobs_dir = agent.cache.join("blobs");
    let files_in_blobs = || std::fs::read_dir(&blobs_dir).unwrap().count();

    // One file over the limit: refused from its declared length, or cut off
    // while it streams when it declares none.
    let big = blob(3, 2000);
    let r = put_declared(&agent.socket, "ta", &big.1, big.0.len());
    assert_eq!(r.status, 413, "{}", r.message());
    assert!(
        r.message().contains("--max-upload-bytes"),
        "{}",
        r.message()
    );
    // Cut off mid-stream: the 413 races the rest of the body (the socket may
    // reset before it is read), but whole, verified and under the right
    // name, the blob would be stored without the cut-off.
    let r = put_chunked(&agent.socket, "ta", &big.1, &big.0);
    assert!(
        r.status == 413 || r.status == 0,
        "{} {}",
        r.status,
        String::from_utf8_lossy(&r.body)
    );
    assert_eq!(head("ta", &big.1), 404);
    assert_eq!(files_in_blobs(), 0, "nothing left of refused uploads");

    // The namespace's quota: three files of 1000 bytes fit in 3 KiB, a
    // fourth does not; another namespace has its own.
    let small: Vec<_> = (1..=4).map(|s| blob(s * 5, 1000)).collect();
    for b in &small[..3] {
        assert_eq!(put("ta", b).status, 200);
    }
    let r = put_declared(&agent.socket, "ta", &small[3].1, 1000);
    assert_eq!(r.status, 403, "{}", r.message());
    assert!(
        r.message().contains("team-a") && r.message().contains("DELETE /v1/blobs"),
        "{}",
        r.message()
    );
    assert_eq!(put("tb", &small[3]).status, 200, "team-b has its own quota");
    // Releasing a blob frees the quota; another namespace's blob is as absent.
    let r = agent.call(
        "DELETE",
        &format!("/v1/blobs/{}", small[0].1),
        Some("tb"),
        b"",
    );
    assert_eq!(r.status, 404);
    let r = agent.call(
        "DELETE",
        &format!("/v1/blobs/{}", small[0].1),
        Some("ta"),
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.message());
    assert_eq!(r.json()["file_removed"], true);
    assert_eq!(put("ta", &small[3]).status, 200);
    // Held by both now: team-a's release keeps team-b's file.
    let r = agent.call(
        "DELETE",
        &format!("/v1/blobs/{}", small[3].1),
        Some("ta"),
        b"",
    );
    assert_eq!(r.json()["file_removed"], false);
    assert_eq!(head("tb", &small[3].1), 200);

    // A floor of free disk no node has: every upload is refused, 507.
    let dir2 = tempfile::tempdir().unwrap();
    let full = Agent::start(dir2.path(), None, &["--min-free-disk", "1000000T"]);
    let r = put_declared(&full.socket, common::TOKEN, &small[1].1, 1000);
    assert_eq!(r.status, 507, "{}", r.message());
    assert!(r.message().contains("DiskPressure"), "{}", r.message());
}

/// transformers' repetition penalty on one row, written out here on its own
/// (not the agent's code): each distinct id of `seq` once.
fn penalised(mut row: Vec<f32>, seq: &[u32], penalty: f32) -> Vec<f32> {
    let mut ids = seq.to_vec();
    ids.sort_unstable();
    ids.dedup();
    for id in ids {
        let l = &mut row[id as usize];
        *l = if *l < 0.0 { *l * penalty } else { *l / penalty };
    }
    row
}

#[test]
fn min_new_tokens_and_repetition_penalty_follow_transformers_on_both_engines() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 29);
    let agent = Agent::start(dir.path(), None, &[]);
    let safetensors = prepare(&agent, &model, json!({}));
    let gguf = prepare(
        &agent,
        &f32_gguf(&model, &dir.path().join("f32.gguf")),
        json!({}),
    );
    let prompt = [1u32, 17, 42, 17, 3];
    for (p, engine) in [(&safetensors, "candle"), (&gguf, "llama.cpp")] {
        let key = p["key"].as_str().unwrap();
        let generate = |extra: Value| {
            let mut body = json!({"key": key, "input_ids": prompt, "max_new_tokens": 8});
            body.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let r = agent.post("/v1/generate", body);
            assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
            r.json()["outputs"][0].clone()
        };

        // (a) The first greedy token, declared EOS, ends the generation at
        // once; with min_new_tokens it cannot be chosen for that many steps,
        // and the first token is the runner-up of the same logits.
        let first_row = forward(&agent, key, json!(prompt), 1).remove(0).logits;
        let eos = argmax(&first_row);
        let out = generate(json!({"eos_token_id": eos}));
        assert_eq!(ids(&out["token_ids"]), [eos], "{engine}");
        assert_eq!(out["finish_reason"], "eos");
        let out = generate(json!({"eos_token_id": eos, "min_new_tokens": 3}));
        let got = ids(&out["token_ids"]);
        assert!(got.len() >= 3, "{engine}: {got:?}");
        assert!(!got[..3].contains(&eos), "{engine}: {got:?}");
        let mut masked = first_row.clone();
        masked[eos as usize] = f32::NEG_INFINITY;
        assert_eq!(got[0], argmax(&masked), "{engine}");
        // After the minimum, EOS stops it again if chosen.
        let stopped = got.iter().position(|t| *t == eos);
        match out["finish_reason"].as_str().unwrap() {
            "eos" => assert_eq!(stopped, Some(got.len() - 1), "{engine}: {got:?}"),
            _ => assert_eq!((stopped, got.len()), (None, 8), "{engine}: {got:?}"),
        }

        // (b) repetition_penalty changes the greedy tokens, and equals a
        // greedy loop over the agent's own logits with the penalty applied
        // here.
        let plain = generate(json!({"ignore_eos": true}));
        let penalty = 1.8f32;
        let out = generate(json!({"ignore_eos": true, "repetition_penalty": penalty}));
        let got = ids(&out["token_ids"]);
        assert_ne!(got, ids(&plain["token_ids"]), "{engine}: no effect");
        let mut seq = prompt.to_vec();
        let mut want = vec![];
        for _ in 0..8 {
            let row = forward(&agent, key, json!(seq), 1).remove(0).logits;
            let next = argmax(&penalised(row, &seq, penalty));
            want.push(next);
            seq.push(next);
        }
        assert_eq!(got, want, "{engine}");
        // 1.0 is off.
        let off = generate(json!({"ignore_eos": true, "repetition_penalty": 1.0}));
        assert_eq!(off["token_ids"], plain["token_ids"], "{engine}");
        assert_eq!(engine_of(&agent, &p["key"]), engine);
    }

    // Bad values are refused before any work, saying what is allowed.
    let key = safetensors["key"].as_str().unwrap();
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "input_ids": prompt, "repetition_penalty": 0}),
    );
    assert_eq!(r.status, 400);
    assert!(
        r.message()
            .contains("repetition_penalty must be a finite number > 0"),
        "{}",
        r.message()
    );
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "input_ids": prompt, "max_new_tokens": 4, "min_new_tokens": 5}),
    );
    assert_eq!(r.status, 400);
    assert_eq!(
        r.message(),
        "min_new_tokens (5) must be at most max_new_tokens (4)"
    );
}

#[test]
fn system_reports_this_node_and_the_callers_devices() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &[]);
    let r = agent.get("/v1/system");
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    let s = r.json();
    assert_eq!(s["agent"]["version"], env!("CARGO_PKG_VERSION"));

    // The node, as /proc says (read here on its own).
    let node = &s["node"];
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let mem_total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    assert_eq!(node["memory_total_bytes"], mem_total_kib * 1024);
    let available = node["memory_available_bytes"].as_u64().unwrap();
    assert!(available > 0 && available <= mem_total_kib * 1024);
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap();
    let processors = cpuinfo
        .lines()
        .filter(|l| l.split(':').next().map(str::trim) == Some("processor"))
        .count();
    assert!(node["cpu_count"].as_u64().unwrap() >= 1);
    if processors > 0 {
        assert_eq!(node["cpu_count"], processors);
    }
    let osrelease = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(node["kernel"], osrelease.trim());
    assert_eq!(node["os"], std::env::consts::OS);
    assert_eq!(node["arch"], std::env::consts::ARCH);
    assert!(node["hostname"].as_str().is_some_and(|h| !h.is_empty()));
    for field in ["cpu_model", "node_name"] {
        assert!(node.get(field).is_some(), "{field} missing: {node}");
    }

    // A CPU slot's caller: the CPU only, its memory the node's.
    let devices = s["devices"].as_array().unwrap();
    assert_eq!(devices.len(), 1, "{s}");
    assert_eq!(devices[0]["device_type"], "cpu");
    assert_eq!(devices[0]["device_id"], 0);
    assert_eq!(devices[0]["name"], node["cpu_model"]);
    assert_eq!(devices[0]["memory_total_bytes"], node["memory_total_bytes"]);
    assert_eq!(s["backends"], agent.get("/v1/backends").json()["backends"]);

    // A GPU allocation's caller also sees its GPUs, numbered as its
    // requests number them; the agent does not know their memory.
    agent.add_token("tok-gpu", "gpu", &[4, 6]);
    let r = agent.call("GET", "/v1/system", Some("tok-gpu"), b"");
    assert_eq!(r.status, 200);
    let devices = r.json()["devices"].as_array().unwrap().clone();
    assert_eq!(devices.len(), 3);
    for (i, host) in [(0, "4"), (1, "6")] {
        let d = &devices[i + 1];
        assert_eq!(d["device_type"], "gpu");
        assert_eq!(d["device_id"], i);
        assert_eq!(d["host_id"], host);
        assert_eq!(d["name"], "NVIDIA GPU");
        assert_eq!(d["vendor"], "NVIDIA");
        assert!(d["memory_total_bytes"].is_null() && d["memory_available_bytes"].is_null());
    }

    // The same callers as /v1/backends: none without a token.
    let r = agent.call("GET", "/v1/system", None, b"");
    assert_eq!(
        r.status,
        agent.call("GET", "/v1/backends", None, b"").status
    );
    assert_eq!(r.status, 401);
}
