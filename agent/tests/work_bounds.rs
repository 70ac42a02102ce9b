//! Bounds on the work one request or one namespace can make the agent do,
//! on the real `rm-agent`: clients that hang up stop their generation,
//! requests past the timeout are stopped, a namespace that floods the CPU is
//! told 429 while others keep their turn, and a long prompt does not need
//! memory growing with its square.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, metric, tiny_llama_with_context};
use serde_json::{Value, json};

/// Room for generations that last seconds even on this tiny model.
const CONTEXT: usize = 8192;

fn prepared(agent: &Agent, dir: &Path) -> String {
    let model = dir.join("long");
    if !model.exists() {
        tiny_llama_with_context(&model, 7, CONTEXT);
    }
    let r = agent.post(
        "/v1/prepare",
        json!({"source": {"path": model}, "device": "cpu"}),
    );
    assert_eq!(r.status, 200, "{}", r.message());
    r.json()["key"].as_str().unwrap().to_string()
}

fn generate_body(key: &str, n: usize) -> Value {
    json!({"key": key, "device": "cpu", "input_ids": [1, 5, 9], "max_new_tokens": n, "ignore_eos": true})
}

/// Sends a generate and leaves the answer unread: the caller hangs up by
/// dropping the stream.
fn send_only(agent: &Agent, token: &str, body: &Value) -> UnixStream {
    common::send_only(&agent.socket, token, "/v1/generate", body)
}

fn wait_for(what: &str, limit: Duration, mut ok: impl FnMut() -> bool) {
    let t = Instant::now();
    while !ok() {
        assert!(t.elapsed() < limit, "{what} within {limit:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_client_that_hangs_up_stops_its_generation_and_frees_the_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &[]);
    let key = prepared(&agent, dir.path());

    // The abandoned generations below ask for 8 000 tokens: minutes of
    // work on this tiny model in a debug build, where 4 tokens take well
    // under a second.
    for stream in [false, true] {
        let mut body = generate_body(&key, CONTEXT - 8);
        body["stream"] = json!(stream);
        let before = metric(&agent, "rm_agent_requests_cancelled_total");
        let s = send_only(&agent, common::TOKEN, &body);
        std::thread::sleep(Duration::from_millis(300));
        drop(s);
        // Once the agent has seen the hang-up (one token), it computes
        // nothing: the abandoned generation is stopped, not left running.
        std::thread::sleep(Duration::from_millis(500));
        let cpu = cpu_seconds(agent.child.id());
        std::thread::sleep(Duration::from_secs(1));
        let used = cpu_seconds(agent.child.id()) - cpu;
        assert!(
            used < 0.3,
            "stream={stream}: the agent used {used:.2} s of CPU in the second after its only client hung up"
        );
        wait_for(
            "the agent to notice the hang-up",
            Duration::from_secs(5),
            || metric(&agent, "rm_agent_requests_cancelled_total") > before,
        );
        let t = Instant::now();
        let r = agent.post("/v1/generate", generate_body(&key, 4));
        assert_eq!(r.status, 200, "{}", r.message());
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "stream={stream}: the next request waited {:?} for work no one reads",
            t.elapsed()
        );
    }
}

#[test]
fn a_request_past_the_timeout_is_stopped_with_504_and_its_slot_freed() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &["--request-timeout", "1"]);
    let key = prepared(&agent, dir.path());
    let t = Instant::now();
    let r = agent.post("/v1/generate", generate_body(&key, CONTEXT - 8));
    let took = t.elapsed();
    assert_eq!(r.status, 504, "{}", r.message());
    assert!(r.message().contains("--request-timeout"), "{}", r.message());
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
    assert_eq!(metric(&agent, "rm_agent_request_timeouts_total"), 1.0);
    let t = Instant::now();
    let r = agent.post("/v1/generate", generate_body(&key, 4));
    assert_eq!(r.status, 200, "{}", r.message());
    assert!(
        t.elapsed() < Duration::from_secs(1),
        "the stopped work gave the slot back ({:?})",
        t.elapsed()
    );
}

#[test]
fn a_namespace_flooding_the_cpu_gets_429_and_others_keep_their_turn() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &["--max-queued-per-namespace", "2"]);
    agent.add_slot_token("token-of-a", "team-a");
    agent.add_slot_token("token-of-b", "team-b");
    let model = dir.path().join("long");
    tiny_llama_with_context(&model, 7, CONTEXT);
    let mut key = String::new();
    for token in ["token-of-a", "token-of-b"] {
        let r = agent.post_auth(
            "/v1/prepare",
            token,
            json!({"source": {"path": model}, "device": "cpu"}),
        );
        assert_eq!(r.status, 200, "{}", r.message());
        key = r.json()["key"].as_str().unwrap().to_string();
    }

    // a's first request holds the CPU; two more of a's wait.
    let hold = send_only(&agent, "token-of-a", &generate_body(&key, CONTEXT - 8));
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let socket = agent.socket.clone();
    let spawn = |token: &'static str, n: usize| {
        let socket = socket.clone();
        let body = generate_body(&key, n);
        std::thread::spawn(move || {
            let auth = format!("Bearer {token}");
            let r = common::request(
                &socket,
                "POST",
                "/v1/generate",
                &[("Authorization", &auth)],
                body.to_string().as_bytes(),
            );
            (r.status, Instant::now())
        })
    };
    let a2 = spawn("token-of-a", 150);
    std::thread::sleep(Duration::from_millis(100));
    let a3 = spawn("token-of-a", 150);
    std::thread::sleep(Duration::from_millis(100));
    // A third waiting request of a's is one too many: 429, at once.
    let t = Instant::now();
    let r = agent.post_auth("/v1/generate", "token-of-a", generate_body(&key, 4));
    assert_eq!(r.status, 429, "{}", r.message());
    assert!(r.message().contains("team-a"), "{}", r.message());
    assert!(t.elapsed() < Duration::from_secs(1));
    // b queues after all of a's, but is served in turn: before a's last.
    let b = spawn("token-of-b", 4);
    std::thread::sleep(Duration::from_millis(100));
    drop(hold);
    let (a2_status, a2_done) = a2.join().unwrap();
    let (b_status, b_done) = b.join().unwrap();
    let (a3_status, a3_done) = a3.join().unwrap();
    assert_eq!((a2_status, b_status, a3_status), (200, 200, 200));
    assert!(
        a2_done < b_done && b_done < a3_done,
        "served in turn: a2 at {:?}, b at {:?}, a3 at {:?}",
        a2_done - started,
        b_done - started,
        a3_done - started
    );
    assert_eq!(metric(&agent, "rm_agent_refused_busy_total"), 1.0);
}

/// CPU time a process has used (user + system), from the kernel.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces), from field 3.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// The peak resident memory of a process, from the kernel (kB).
fn peak_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[test]
fn a_long_prompt_on_candle_needs_memory_linear_in_its_length() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &[]);
    let key = prepared(&agent, dir.path());
    // Load the model and warm up with a short prompt first.
    let r = agent.post("/v1/generate", generate_body(&key, 2));
    assert_eq!(r.status, 200, "{}", r.message());
    let before = peak_rss_kib(agent.child.id());
    let n = 4000;
    let prompt: Vec<u32> = (0..n).map(|i| (i % 200 + 3) as u32).collect();
    let r = agent.post(
        "/v1/generate",
        json!({"key": key, "device": "cpu", "input_ids": prompt, "max_new_tokens": 1}),
    );
    assert_eq!(r.status, 200, "{}", r.message());
    let grew_mib = (peak_rss_kib(agent.child.id()) - before) / 1024;
    eprintln!("a {n}-token prompt on candle: peak memory +{grew_mib} MiB");
    // Fed whole, 4 heads x 4000 x 4000 f32 scores are 244 MiB per copy
    // (the softmax makes another); in chunks of 512, 31 MiB.
    assert!(
        grew_mib < 150,
        "a {n}-token prompt raised the agent's peak memory by {grew_mib} MiB"
    );
}
