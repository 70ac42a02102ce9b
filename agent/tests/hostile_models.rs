//! Hostile model files (issue 17): each is refused with a 422 that says what
//! is wrong, and the agent that read it keeps serving every other model.
//!
//! Before the fix, the files that reach llama.cpp (duplicate vocabulary
//! entries, zero layers, a NaN epsilon, a safetensors config of zero layers
//! converted to GGUF) killed the agent with SIGABRT at the first generate;
//! alignment 0 was a divide-by-zero panic (500); the out-of-file tensors were
//! accepted by prepare and only failed later. Where the old agent accepted a
//! prepare, these tests generate on it too, so that against that agent they
//! fail on its death and name the signal.
//!
//! Safetensors models run on candle in the agent's own process, sized by
//! their `config.json`: the last two tests give configs out of bounds or not
//! matching their weights to an agent under an address-space limit.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, GgufFile, Md, tiny_gguf, tiny_llama, tiny_qwen2};
use serde_json::{Value, json};

/// The agent's exit status if it died within `wait`.
fn died(agent: &mut Agent, wait: Duration) -> Option<std::process::ExitStatus> {
    let t = Instant::now();
    loop {
        if let Some(st) = agent.child.try_wait().unwrap() {
            return Some(st);
        }
        if t.elapsed() >= wait {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn post(agent: &Agent, path: &str, body: Value) -> Option<common::Reply> {
    common::try_request(
        &agent.socket,
        "POST",
        path,
        &[common::AUTH],
        body.to_string().as_bytes(),
    )
}

/// Registers `source`, prepares it on cpu with `options`, and returns the
/// prepare's answer. A prepare that succeeds is followed by a generate, as a
/// pod would: an agent that let a bad file through dies there, and this
/// panics with its exit status.
fn prepare_hostile(agent: &mut Agent, name: &str, source: Value, options: Value) -> common::Reply {
    let r = agent.post("/v1/models", json!({ "source": source }));
    assert_eq!(r.status, 200, "{name}: register: {}", r.message());
    let model = r.json()["model"].as_str().unwrap().to_string();
    let p = post(
        agent,
        "/v1/prepare",
        json!({"model": model, "device": "cpu", "options": options}),
    );
    let generated = match &p {
        Some(p) if p.status == 200 => {
            let key = p.json()["key"].as_str().unwrap().to_string();
            Some(post(
                agent,
                "/v1/generate",
                json!({"key": key, "input_ids": [1, 3, 5], "max_new_tokens": 2}),
            ))
        }
        _ => None,
    };
    let answered = p.is_some() && !matches!(generated, Some(None));
    let wait = if answered {
        Duration::from_millis(100)
    } else {
        Duration::from_secs(30)
    };
    if let Some(st) = died(agent, wait) {
        panic!("the agent died on the {name} file: {st}");
    }
    p.unwrap_or_else(|| panic!("{name}: no answer to the prepare"))
}

#[test]
fn hostile_gguf_files_get_422_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let files = dir.path().join("files");
    let mut agent = Agent::start(dir.path(), None, &[]);

    let past_end = {
        let mut g = tiny_gguf();
        g.tensors[0].offset = Some(1 << 40);
        g
    };
    let too_long = {
        let mut g = tiny_gguf();
        // 2^20 rows of 64 floats: 256 MiB the file does not have.
        g.tensors[1].dims = vec![64, 1 << 20];
        g
    };
    let overflowing = {
        let mut g = tiny_gguf();
        g.tensors[1].dims = vec![1 << 40, 1 << 30];
        g
    };
    let mut huge_string = (1u64 << 63).to_le_bytes().to_vec();
    huge_string.extend(b"x");
    let duplicate_token = {
        // Two vocabulary entries with one text: llama.cpp's vocabulary load
        // asserts that every text maps to one id.
        let mut tokens: Vec<String> = (0..=255u8).map(|b| format!("t{b}")).collect();
        tokens[5] = tokens[4].clone();
        tiny_gguf().set("tokenizer.ggml.tokens", Md::Strs(tokens))
    };

    let cases: Vec<(&str, GgufFile, &str)> = vec![
        (
            "alignment 0",
            tiny_gguf().set("general.alignment", Md::U32(0)),
            "general.alignment is 0; it must be a power of two",
        ),
        (
            "tensor offset past the end",
            past_end,
            "\"token_embd.weight\" needs 65536 bytes at file offset",
        ),
        (
            "tensor dims past the end",
            too_long,
            "past the end of the file",
        ),
        (
            "tensor dims overflowing",
            overflowing,
            "whose element count overflows",
        ),
        (
            "string length 2^63",
            tiny_gguf().set("general.name", Md::Raw(8, huge_string)),
            "declares 9223372036854775808 bytes",
        ),
        (
            "duplicate vocabulary entry",
            duplicate_token,
            "GGML_ASSERT(id_to_token.size() == token_to_id.size()) failed (the GGUF loader aborted with signal 6, SIGABRT)",
        ),
        (
            "zero layers",
            tiny_gguf().set("llama.block_count", Md::U32(0)),
            "GGML_ASSERT(hparams.n_layer_all > 0",
        ),
        (
            // Loads; the first forward pass asserts in the RMS-norm kernel.
            "NaN epsilon",
            tiny_gguf().set("llama.attention.layer_norm_rms_epsilon", Md::F32(f32::NAN)),
            "GGML_ASSERT(eps >= 0.0f) failed",
        ),
    ];
    for (i, (name, file, needle)) in cases.iter().enumerate() {
        let path = file.write(&files.join(format!("{i}.gguf")));
        let source = if i % 2 == 0 {
            json!({"path": path})
        } else {
            // What a pod does: upload the bytes, then register them.
            let bytes = std::fs::read(&path).unwrap();
            let sha = rm_agent::cache::key::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            let put = agent.call(
                "PUT",
                &format!("/v1/blobs/{sha}"),
                Some(common::TOKEN),
                &bytes,
            );
            assert_eq!(put.json()["stored"], true, "{name}: upload");
            json!({"files": [{"path": "model.gguf", "sha256": sha}]})
        };
        let r = prepare_hostile(&mut agent, name, source, json!({}));
        assert_eq!(
            r.status,
            422,
            "{name}: {}",
            String::from_utf8_lossy(&r.body)
        );
        let m = r.message();
        assert!(m.contains("the model file is malformed: "), "{name}: {m}");
        assert!(m.contains(needle), "{name}: {m:?} lacks {needle:?}");
    }

    // A safetensors model whose config.json says zero layers: the agent's own
    // q8_0 conversion wrote that into the GGUF, which llama.cpp asserts on
    // (refused by the child's check); now the config is refused before the
    // conversion.
    let zero_layers = dir.path().join("zero-layers");
    tiny_llama(&zero_layers, 3);
    let cfg_path = zero_layers.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
    cfg["num_hidden_layers"] = json!(0);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let r = prepare_hostile(
        &mut agent,
        "zero-layer safetensors (q8_0)",
        json!({"path": zero_layers}),
        json!({"precision": "q8_0"}),
    );
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.message()
            .contains("config.json: num_hidden_layers is 0; it must be at least 1"),
        "{}",
        r.message()
    );
    let refused = cases.len() + 1;

    // A refused model stays refused (the verdict is remembered).
    let again = agent.post(
        "/v1/prepare",
        json!({"source": {"path": files.join("5.gguf")}, "device": "cpu"}),
    );
    assert_eq!(again.status, 422, "{}", again.message());
    assert!(
        again.message().contains("GGML_ASSERT"),
        "{}",
        again.message()
    );

    // The same agent, still serving.
    assert_eq!(agent.get("/healthz").json()["status"], "ok");
    let metrics = String::from_utf8(agent.get("/metrics").body).unwrap();
    assert!(
        metrics.contains(&format!("rm_agent_models_malformed_total {}", refused + 1)),
        "{metrics}"
    );
    let good = tiny_gguf().write(&files.join("good.gguf"));
    let tiny = dir.path().join("tiny");
    tiny_llama(&tiny, 7);
    for (source, options) in [
        (json!({"path": good}), json!({})),
        (json!({"path": tiny}), json!({})),
        (json!({"path": tiny}), json!({"precision": "q8_0"})),
    ] {
        let r = agent.post(
            "/v1/prepare",
            json!({"source": source, "device": "cpu", "options": options}),
        );
        assert_eq!(r.status, 200, "{source} {options}: {}", r.message());
        let key = r.json()["key"].as_str().unwrap().to_string();
        let g = agent.post(
            "/v1/generate",
            json!({"key": key, "input_ids": [1, 3, 5], "max_new_tokens": 4, "ignore_eos": true}),
        );
        assert_eq!(g.status, 200, "{source} {options}: {}", g.message());
        assert_eq!(
            g.json()["outputs"][0]["token_ids"]
                .as_array()
                .unwrap()
                .len(),
            4
        );
    }
    assert!(died(&mut agent, Duration::ZERO).is_none());
}

/// Rewrites a cache entry's `model.gguf` and its checksum in `entry.json`,
/// as if an agent without the model check had compiled that file.
fn replace_entry_gguf(cache: &Path, key: &str, bytes: &[u8]) {
    replace_entry_file(cache, key, "model.gguf", bytes);
}

/// Rewrites one file of a cache entry and its checksum in `entry.json`.
fn replace_entry_file(cache: &Path, key: &str, file: &str, bytes: &[u8]) {
    let entry = cache.join("entries").join(key);
    std::fs::write(entry.join(file), bytes).unwrap();
    let meta_path = entry.join("entry.json");
    let mut meta: Value = serde_json::from_slice(&std::fs::read(&meta_path).unwrap()).unwrap();
    for f in meta["files"].as_array_mut().unwrap() {
        if f["path"] == file {
            f["size"] = json!(bytes.len());
            f["sha256"] = json!(rm_agent::cache::key::hex(
                &<sha2::Sha256 as sha2::Digest>::digest(bytes)
            ));
        }
    }
    std::fs::write(&meta_path, meta.to_string()).unwrap();
}

#[test]
fn entries_are_checked_again_by_a_new_agent_before_they_are_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let good = tiny_gguf().write(&dir.path().join("good.gguf"));
    let mut agent = Agent::start(dir.path(), None, &[]);
    let r = agent.post(
        "/v1/prepare",
        json!({"source": {"path": good}, "device": "cpu"}),
    );
    assert_eq!(r.status, 200, "{}", r.message());
    let key = r.json()["key"].as_str().unwrap().to_string();
    agent.stop();

    // The entry now holds a file llama.cpp asserts on, as one compiled by an
    // agent before this check existed could.
    let bad = tiny_gguf().set("llama.block_count", Md::U32(0)).bytes();
    replace_entry_gguf(&agent.cache, &key, &bad);
    agent.spawn();
    for _ in 0..2 {
        let g = post(
            &agent,
            "/v1/generate",
            json!({"key": key, "input_ids": [1, 3], "max_new_tokens": 2}),
        );
        if let Some(st) = died(&mut agent, Duration::from_millis(100)) {
            panic!("the agent died loading the entry: {st}");
        }
        let g = g.unwrap();
        assert_eq!(g.status, 422, "{}", String::from_utf8_lossy(&g.body));
        assert!(
            g.message().contains("the model file is malformed: ")
                && g.message().contains("GGML_ASSERT"),
            "{}",
            g.message()
        );
    }
    assert_eq!(agent.get("/healthz").status, 200);
}

/// candle's GGUF llama (a GGUF without a vocabulary) allocates its rope
/// table from `rope.dimension_count`: 2^31 asked for terabytes, which took
/// the old agent down (here the kernel's OOM killer sent SIGKILL). The check
/// runs under an address-space limit, where the allocation just fails.
#[test]
fn a_hostile_candle_gguf_fails_its_allocation_in_the_check_not_in_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start(dir.path(), None, &[]);
    let path = tiny_gguf()
        .without("tokenizer.")
        .set("llama.rope.dimension_count", Md::U32(1 << 31))
        .write(&dir.path().join("rope.gguf"));
    let r = prepare_hostile(
        &mut agent,
        "huge rope table",
        json!({"path": path}),
        json!({}),
    );
    assert_eq!(r.status, 422, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.message().contains("memory allocation of"),
        "{}",
        r.message()
    );
    // The same file without the huge table runs (on candle).
    let ok = tiny_gguf()
        .without("tokenizer.")
        .write(&dir.path().join("ok.gguf"));
    let r = agent.post(
        "/v1/prepare",
        json!({"source": {"path": ok}, "device": "cpu"}),
    );
    assert_eq!(r.status, 200, "{}", r.message());
    let key = r.json()["key"].as_str().unwrap().to_string();
    let g = agent.post(
        "/v1/generate",
        json!({"key": key, "input_ids": [1, 3], "max_new_tokens": 2, "ignore_eos": true}),
    );
    assert_eq!(g.status, 200, "{}", g.message());
}

/// The address space the agents of the safetensors tests run in: the tiny
/// models need a fraction of it, and an agent that believed a hostile
/// config would ask for far more (tens of GiB for the rotary tables of two
/// billion positions, unbounded for a trillion layers) and fail there
/// instead of drawing on the machine's memory.
const AGENT_ADDRESS_SPACE: u64 = 4 << 30;

/// A tiny llama (or Qwen2) in `dir` whose config.json has `edits` applied.
fn hostile_safetensors(dir: &Path, qwen2: bool, edits: &Value) -> std::path::PathBuf {
    if qwen2 {
        tiny_qwen2(dir, 5);
    } else {
        tiny_llama(dir, 5);
    }
    let path = dir.join("config.json");
    let mut cfg: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    for (k, v) in edits.as_object().unwrap() {
        cfg[k] = v.clone();
    }
    std::fs::write(&path, cfg.to_string()).unwrap();
    dir.to_owned()
}

/// Uploads a model directory's files as blobs, as a pod does, and answers
/// the source that registers them.
fn upload_dir(agent: &Agent, dir: &Path) -> Value {
    let mut files = Vec::new();
    for name in ["config.json", "model.safetensors"] {
        let bytes = std::fs::read(dir.join(name)).unwrap();
        let sha = rm_agent::cache::key::hex(&<sha2::Sha256 as sha2::Digest>::digest(&bytes));
        let put = agent.call(
            "PUT",
            &format!("/v1/blobs/{sha}"),
            Some(common::TOKEN),
            &bytes,
        );
        assert_eq!(put.status, 200, "upload {name}: {}", put.message());
        files.push(json!({"path": name, "sha256": sha}));
    }
    json!({ "files": files })
}

/// A safetensors model runs on candle in the agent's own process (no child
/// checks it first), and candle sizes its allocations from config.json.
/// Before the fix, a config of 2·10⁹ positions made candle allocate its
/// rotary tables (tens of GiB) at the first generate, and one of 10¹² layers
/// built a name for each layer's tensors: both aborted the agent ("memory
/// allocation of ... bytes failed", SIGABRT) here, under an address-space
/// limit, and would have drawn the machine's memory without it. The rest
/// got a 422 only at the first generate, a 500 (a sliding window of
/// 2⁶⁴ - 1 overflowed; zero key/value heads divided by zero in the q8_0
/// conversion), or ran (a NaN-making rope_theta or rms_norm_eps, a table of
/// 2²¹ positions for a few kilobytes of weights). Now each is a 422 at
/// prepare that names the field, its value and the bound, with or without a
/// precision, and the agent goes on serving.
#[test]
fn hostile_safetensors_configs_get_422_naming_the_field_and_the_agent_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_limited(dir.path(), AGENT_ADDRESS_SPACE);
    let cases: Vec<(bool, Value, &str)> = vec![
        (
            false,
            json!({"max_position_embeddings": 2_000_000_000u64}),
            "config.json: max_position_embeddings is 2000000000, more than 2097152",
        ),
        (
            true,
            json!({"max_position_embeddings": 2_000_000_000u64}),
            "config.json: max_position_embeddings is 2000000000, more than 2097152",
        ),
        (
            false,
            json!({"num_hidden_layers": 1_000_000_000_000u64}),
            "config.json: num_hidden_layers is 1000000000000, more than 1024",
        ),
        (
            // 2 in the u32 of a GGUF: the old conversion ran it as 2 layers.
            true,
            json!({"num_hidden_layers": 4_294_967_298u64}),
            "config.json: num_hidden_layers is 4294967298, more than 1024",
        ),
        (
            false,
            json!({"vocab_size": 1u64 << 40}),
            "config.json: vocab_size is 1099511627776, more than 4194304",
        ),
        (
            true,
            json!({"hidden_size": 1u64 << 40}),
            "config.json: hidden_size is 1099511627776, more than 65536",
        ),
        (
            false,
            json!({"intermediate_size": 1u64 << 40}),
            "config.json: intermediate_size is 1099511627776, more than 262144",
        ),
        (
            false,
            json!({"num_attention_heads": 0}),
            "config.json: num_attention_heads is 0; it must be at least 1",
        ),
        (
            true,
            json!({"num_key_value_heads": 0}),
            "config.json: num_key_value_heads is 0; it must be at least 1",
        ),
        (
            false,
            json!({"num_key_value_heads": 0}),
            "config.json: num_key_value_heads is 0; it must be at least 1",
        ),
        (
            false,
            json!({"num_attention_heads": 3}),
            "config.json: hidden_size 64 is not a multiple of num_attention_heads 3",
        ),
        (
            false,
            json!({"num_key_value_heads": 3}),
            "config.json: num_key_value_heads 3 does not divide num_attention_heads 4",
        ),
        (
            false,
            json!({"head_dim": 1u64 << 30}),
            "config.json: head_dim is 1073741824, more than 1024",
        ),
        (
            // An f32 in candle's llama config: infinite.
            false,
            json!({"rope_theta": 1e39}),
            "config.json: rope_theta is inf; it must be a number above 0 and at most 1e12",
        ),
        (
            true,
            json!({"rope_theta": -1.0}),
            "config.json: rope_theta is -1;",
        ),
        (
            false,
            json!({"rms_norm_eps": -1.0}),
            "config.json: rms_norm_eps is -1; it must be a number above 0 and at most 1",
        ),
        (
            true,
            json!({"use_sliding_window": true, "sliding_window": u64::MAX}),
            "config.json: sliding_window is 18446744073709551615, more than 2097152",
        ),
        (
            false,
            json!({"vocab_size": 512}),
            "config.json does not match the weights: tensor model.embed_tokens.weight has shape [256, 64], and config.json wants [512, 64] (expected dimension 0 to be vocab_size (512), not 256)",
        ),
        (
            true,
            json!({"intermediate_size": 64}),
            "(expected dimension 0 to be intermediate_size (64), not 128)",
        ),
        (
            true,
            json!({"num_hidden_layers": 3}),
            "config.json: num_hidden_layers is 3, but the weights have 2 layers",
        ),
        (
            // Within the bound, but 2^21 × 16 values of rotary tables (128
            // MiB, built per request) for 100 000 values of weights.
            false,
            json!({"max_position_embeddings": 1u64 << 21}),
            "config.json: max_position_embeddings 2097152 × head_dim 16 makes rotary tables of 33554432 values (128 MiB), more than the 16777216 allowed",
        ),
    ];
    let mut refused = 0;
    for (i, (qwen2, edits, needle)) in cases.iter().enumerate() {
        let model = hostile_safetensors(&dir.path().join(format!("m{i}")), *qwen2, edits);
        let arch = if *qwen2 { "qwen2" } else { "llama" };
        for options in [json!({}), json!({"precision": "q8_0"})] {
            let name = format!("{arch} {edits} {options}");
            let source = if i % 2 == 0 {
                json!({ "path": model })
            } else {
                upload_dir(&agent, &model)
            };
            let r = prepare_hostile(&mut agent, &name, source, options.clone());
            assert_eq!(
                r.status,
                422,
                "{name}: {}",
                String::from_utf8_lossy(&r.body)
            );
            let m = r.message();
            assert!(m.contains("the model file is malformed: "), "{name}: {m}");
            assert!(m.contains(needle), "{name}: {m:?} lacks {needle:?}");
            refused += 1;
        }
    }

    // The same agent, still serving, each refusal counted.
    assert_eq!(agent.get("/healthz").json()["status"], "ok");
    assert_eq!(
        common::metric(&agent, "rm_agent_models_malformed_total"),
        refused as f64
    );
    for qwen2 in [false, true] {
        let model =
            hostile_safetensors(&dir.path().join(format!("good-{qwen2}")), qwen2, &json!({}));
        for options in [json!({}), json!({"precision": "q8_0"})] {
            let r = agent.post(
                "/v1/prepare",
                json!({"source": {"path": model}, "device": "cpu", "options": options}),
            );
            assert_eq!(r.status, 200, "{qwen2} {options}: {}", r.message());
            let key = r.json()["key"].as_str().unwrap().to_string();
            let g = agent.post(
                "/v1/generate",
                json!({"key": key, "input_ids": [1, 3, 5], "max_new_tokens": 4, "ignore_eos": true}),
            );
            assert_eq!(g.status, 200, "{qwen2} {options}: {}", g.message());
        }
    }
    assert!(died(&mut agent, Duration::ZERO).is_none());
}

/// An entry compiled from a safetensors model by an agent without the check
/// (or changed since) is checked again when an agent first loads it: the
/// old agent aborted loading these, at the generate.
#[test]
fn a_safetensors_entry_with_a_hostile_config_is_refused_when_loaded() {
    let dir = tempfile::tempdir().unwrap();
    let mut agent = Agent::start_limited(dir.path(), AGENT_ADDRESS_SPACE);
    let mut entries = Vec::new();
    for (qwen2, edits, needle) in [
        (
            false,
            json!({"num_hidden_layers": 1_000_000_000_000u64}),
            "num_hidden_layers is 1000000000000, more than 1024",
        ),
        (
            true,
            json!({"max_position_embeddings": 2_000_000_000u64}),
            "max_position_embeddings is 2000000000, more than 2097152",
        ),
    ] {
        let model = hostile_safetensors(&dir.path().join(format!("m{qwen2}")), qwen2, &json!({}));
        let r = agent.post(
            "/v1/prepare",
            json!({"source": {"path": model}, "device": "cpu"}),
        );
        assert_eq!(r.status, 200, "{}", r.message());
        let key = r.json()["key"].as_str().unwrap().to_string();
        let cfg_path = dir
            .path()
            .join("cache/entries")
            .join(&key)
            .join("config.json");
        let mut cfg: Value = serde_json::from_slice(&std::fs::read(&cfg_path).unwrap()).unwrap();
        for (k, v) in edits.as_object().unwrap() {
            cfg[k] = v.clone();
        }
        entries.push((key, cfg.to_string(), needle));
    }
    agent.stop();
    for (key, cfg, _) in &entries {
        replace_entry_file(&agent.cache, key, "config.json", cfg.as_bytes());
    }
    agent.spawn();
    for (key, _, needle) in &entries {
        for _ in 0..2 {
            let g = post(
                &agent,
                "/v1/generate",
                json!({"key": key, "input_ids": [1, 3], "max_new_tokens": 2}),
            );
            if let Some(st) = died(&mut agent, Duration::from_millis(100)) {
                panic!("the agent died loading the entry: {st}");
            }
            let g = g.unwrap();
            assert_eq!(g.status, 422, "{}", String::from_utf8_lossy(&g.body));
            assert!(
                g.message()
                    .contains("the model file is malformed: config.json: ")
                    && g.message().contains(needle),
                "{}",
                g.message()
            );
        }
    }
    assert_eq!(
        common::metric(&agent, "rm_agent_models_malformed_total"),
        4.0
    );
    assert_eq!(agent.get("/healthz").status, 200);
}
