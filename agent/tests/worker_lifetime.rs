//! Worker processes live as long as the allocation they serve, one
//! request's timeout or compile never costs another request its work, and
//! a request whose client is gone (or whose time is up) is stopped in its
//! worker without killing the process: the real `rm-agent` binary with the
//! test-double worker.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, metric, send_only, test_double_plugins, tiny_llama};
use serde_json::{Value, json};

/// Prepares `model` on the token's GPUs; answers the cache key.
fn prepare(agent: &Agent, token: &str, model: &Path, extra: Value) -> String {
    let r = agent.post_auth(
        "/v1/prepare",
        token,
        json!({"source": {"path": model}, "device": "gpu", "options": {"extra": extra}}),
    );
    assert_eq!(
        r.status,
        200,
        "prepare: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()["key"].as_str().unwrap().to_string()
}

fn generate(agent: &Agent, token: &str, key: &str, prompt: &str) -> common::Reply {
    agent.post_auth(
        "/v1/generate",
        token,
        json!({"key": key, "device": "gpu", "prompt": prompt, "max_new_tokens": 2}),
    )
}

/// The pid of the worker process that runs `token`'s generations.
fn worker_pid(agent: &Agent, token: &str, key: &str) -> u32 {
    let r = generate(agent, token, key, "pid");
    assert_eq!(
        r.status,
        200,
        "generate: {}",
        String::from_utf8_lossy(&r.body)
    );
    r.json()["outputs"][0]["text"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap()
}

/// Whether process `pid` runs (a zombie has ended: only its exit status is
/// left for the parent to collect).
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

fn eventually(bound: Duration, mut ok: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < bound {
        if ok() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    ok()
}

fn released_metric(agent: &Agent) -> String {
    let body = String::from_utf8_lossy(&agent.get("/metrics").body).to_string();
    body.lines()
        .find(|l| l.starts_with("rm_agent_workers_released_total{backend=\"test-double\"}"))
        .unwrap_or("")
        .to_string()
}

#[test]
fn a_pods_worker_is_stopped_soon_after_its_token_is_removed() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 11);
    let agent = Agent::start_with_env(
        dir.path(),
        Some(test_double_plugins(dir.path())),
        &[],
        &[("RM_WORKER_REAP_INTERVAL", "0.2")],
    );
    agent.add_token_of("tok-a", "gpu", &[0], "team-a", "pod-a");
    agent.add_token_of("tok-b", "gpu", &[1], "team-b", "pod-b");
    let key_a = prepare(&agent, "tok-a", &model, json!({}));
    let key_b = prepare(&agent, "tok-b", &model, json!({}));
    let pid_a = worker_pid(&agent, "tok-a", &key_a);
    let pid_b = worker_pid(&agent, "tok-b", &key_b);
    assert_ne!(pid_a, pid_b, "each allocation has its own process");
    assert!(alive(pid_a) && alive(pid_b));

    // Pod A is gone: the device plugin's collector removes its token.
    agent.remove_token("tok-a");
    assert!(
        eventually(Duration::from_secs(5), || !alive(pid_a)),
        "worker {pid_a} of the ended allocation still runs 5 s after its token was removed"
    );
    // Pod B's worker is not touched, and keeps serving.
    std::thread::sleep(Duration::from_millis(500));
    assert!(alive(pid_b), "the live allocation's worker was stopped");
    assert_eq!(worker_pid(&agent, "tok-b", &key_b), pid_b);
    assert_eq!(
        released_metric(&agent),
        "rm_agent_workers_released_total{backend=\"test-double\"} 1"
    );
    let backends = agent.get("/v1/backends").json();
    let double = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "test-double")
        .unwrap()
        .clone();
    assert_eq!(double["status"]["processes"], 1, "{double}");
    assert_eq!(double["status"]["released"], 1, "{double}");
}

#[test]
fn devices_given_to_another_pod_get_a_fresh_worker_after_the_old_one_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 12);
    let events = dir.path().join("worker-events.log");
    // The reaper's first pass is at start and the next an hour later: only
    // the hand-over at the new pod's request can stop the old worker.
    let agent = Agent::start_with_env(
        dir.path(),
        Some(test_double_plugins(dir.path())),
        &[],
        &[
            ("RM_WORKER_REAP_INTERVAL", "3600"),
            ("TEST_DOUBLE_EVENTS", events.to_str().unwrap()),
        ],
    );
    agent.add_token_of("tok-old", "gpu", &[2], "team", "pod-old");
    let key = prepare(&agent, "tok-old", &model, json!({}));
    let old = worker_pid(&agent, "tok-old", &key);

    // The kubelet gives GPU 2 to a new pod: the device plugin's Allocate
    // writes its token and removes the one it supersedes.
    agent.add_token_of("tok-new", "gpu", &[2], "team", "pod-new");
    agent.remove_token("tok-old");
    let new = worker_pid(&agent, "tok-new", &key);
    assert_ne!(new, old, "the new pod was served by the old pod's process");
    assert!(!alive(old), "the old pod's worker {old} still runs");

    let log = std::fs::read_to_string(&events).unwrap();
    let at = |line: String| {
        log.lines()
            .position(|l| l.trim_end() == line)
            .unwrap_or_else(|| panic!("no {line:?} in the worker events:\n{log}"))
    };
    assert!(
        at(format!("exit {old} 2")) < at(format!("start {new} 2")),
        "the new pod's worker started before the old one exited:\n{log}"
    );
    assert_eq!(
        released_metric(&agent),
        "rm_agent_workers_released_total{backend=\"test-double\"} 1"
    );
}

#[test]
fn a_long_compile_and_a_timed_out_request_cost_other_requests_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 13);
    // The test double's manifest gives requests 3 s and compiles 120 s.
    let agent = Agent::start(dir.path(), Some(test_double_plugins(dir.path())), &[]);
    agent.add_token("tok", "gpu", &[0]);
    let ready = prepare(&agent, "tok", &model, json!({"v": "1"}));
    let compiles_running = || {
        let c = agent.call("GET", "/v1/compiles", Some("tok"), b"").json();
        c["compiles"].as_array().map_or(0, Vec::len)
    };

    std::thread::scope(|s| {
        // A compile of the same devices that takes four times a request's
        // timeout.
        let compile = s.spawn(|| {
            prepare(
                &agent,
                "tok",
                &model,
                json!({"v": "2", "test.compile_seconds": "12"}),
            )
        });
        assert!(
            eventually(Duration::from_secs(20), || compiles_running() == 1),
            "the compile never started"
        );
        std::thread::sleep(Duration::from_millis(300));

        let r = generate(&agent, "tok", &ready, "ok");
        assert_eq!(
            r.status,
            200,
            "a generate during the compile: {}",
            String::from_utf8_lossy(&r.body)
        );

        // A request that hangs times out, and ignores the cancel: its
        // process is killed once the cancel's grace is over (the last
        // resort), and one queued behind it on the same process is sent to
        // the restarted process and succeeds.
        let hung_pid = worker_pid(&agent, "tok", &ready);
        let hung = s.spawn(|| generate(&agent, "tok", &ready, "hang"));
        std::thread::sleep(Duration::from_millis(300));
        let r = generate(&agent, "tok", &ready, "ok");
        assert_eq!(
            r.status,
            200,
            "a generate queued behind a hung one: {}",
            String::from_utf8_lossy(&r.body)
        );
        let r = hung.join().unwrap();
        assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
        assert!(!alive(hung_pid), "the hung worker {hung_pid} still runs");
        assert_ne!(worker_pid(&agent, "tok", &ready), hung_pid);
        assert_eq!(compiles_running(), 1, "the timeout ended the compile too");

        let long = compile.join().unwrap();
        let r = generate(&agent, "tok", &long, "ok");
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    });
}

/// How many lines of the test double's events file start with `what pid`.
fn events(log: &Path, what: &str, pid: u32) -> usize {
    let prefix = format!("{what} {pid} ");
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.starts_with(&prefix))
        .count()
}

/// An agent with the test double, its events logged to the returned file,
/// a GPU token "tok" and a prepared model; answers the cache key too.
fn agent_with_events(dir: &Path, args: &[&str]) -> (Agent, std::path::PathBuf, String) {
    let model = dir.join("tiny");
    tiny_llama(&model, 14);
    let log = dir.join("worker-events.log");
    let agent = Agent::start_with_env(
        dir,
        Some(test_double_plugins(dir)),
        args,
        &[("TEST_DOUBLE_EVENTS", log.to_str().unwrap())],
    );
    agent.add_token("tok", "gpu", &[0]);
    let key = prepare(&agent, "tok", &model, json!({}));
    (agent, log, key)
}

/// The next request on the same devices is served at once, by `pid`.
fn served_promptly_by(agent: &Agent, key: &str, pid: u32, what: &str) {
    let t = Instant::now();
    assert_eq!(
        worker_pid(agent, "tok", key),
        pid,
        "{what}: the worker process was replaced"
    );
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "{what}: the next request took {:?}",
        t.elapsed()
    );
}

#[test]
fn a_client_that_hangs_up_stops_its_worker_request_and_the_process_stays() {
    let dir = tempfile::tempdir().unwrap();
    let (agent, log, key) = agent_with_events(dir.path(), &[]);
    let pid = worker_pid(&agent, "tok", &key);

    for stream in [false, true] {
        let what = format!("stream={stream}");
        let cancelled = events(&log, "cancelled", pid);
        let metric_before = metric(&agent, "rm_agent_requests_cancelled_total");
        // "slow": a token every 100 ms for a minute.
        let body = json!({"key": key, "device": "gpu", "prompt": "slow", "max_new_tokens": 2, "stream": stream});
        let s = send_only(&agent.socket, "tok", "/v1/generate", &body);
        let before = events(&log, "token", pid);
        assert!(
            eventually(Duration::from_secs(5), || events(&log, "token", pid)
                >= before + 3),
            "{what}: the slow generate never started"
        );
        drop(s);
        let hung_up = Instant::now();
        assert!(
            eventually(Duration::from_secs(2), || events(&log, "cancelled", pid)
                > cancelled),
            "{what}: the worker still generates 2 s after its client hung up"
        );
        let stopped_after = hung_up.elapsed();
        let n = events(&log, "token", pid);
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(
            events(&log, "token", pid),
            n,
            "{what}: tokens still come after the cancel"
        );
        assert!(alive(pid), "{what}: the worker process {pid} was killed");
        served_promptly_by(&agent, &key, pid, &what);
        assert!(
            metric(&agent, "rm_agent_requests_cancelled_total") > metric_before,
            "{what}: the hang-up was not counted"
        );
        eprintln!("{what}: the worker stopped {stopped_after:?} after the hang-up");
    }
}

#[test]
fn a_worker_request_past_its_time_gets_504_and_the_process_serves_the_next() {
    let dir = tempfile::tempdir().unwrap();
    // The agent's --request-timeout (1 s) passes before the manifest's
    // request_timeout_s (3 s).
    let (agent, log, key) = agent_with_events(dir.path(), &["--request-timeout", "1"]);
    let pid = worker_pid(&agent, "tok", &key);
    let t = Instant::now();
    let r = generate(&agent, "tok", &key, "slow");
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(r.message().contains("--request-timeout"), "{}", r.message());
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "answered after {:?}",
        t.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(2), || events(&log, "cancelled", pid)
            == 1),
        "the worker still generates after the 504"
    );
    assert!(alive(pid), "the worker process {pid} was killed");
    served_promptly_by(&agent, &key, pid, "after --request-timeout");
    assert_eq!(metric(&agent, "rm_agent_request_timeouts_total"), 1.0);
}

#[test]
fn a_worker_request_past_the_manifests_timeout_is_cancelled_not_killed() {
    let dir = tempfile::tempdir().unwrap();
    // The test double's manifest gives a request 3 s; the agent, 600.
    let (agent, log, key) = agent_with_events(dir.path(), &[]);
    let pid = worker_pid(&agent, "tok", &key);
    let t = Instant::now();
    let r = generate(&agent, "tok", &key, "slow");
    assert_eq!(r.status, 504, "{}", String::from_utf8_lossy(&r.body));
    assert!(
        r.message().contains("did not answer within 3 s"),
        "{}",
        r.message()
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "answered after {:?}",
        t.elapsed()
    );
    assert!(
        eventually(Duration::from_secs(2), || events(&log, "cancelled", pid)
            == 1),
        "the worker still generates after its timeout"
    );
    assert!(alive(pid), "the worker process {pid} was killed");
    served_promptly_by(&agent, &key, pid, "after the manifest's timeout");
    let backends = agent.get("/v1/backends").json();
    let double = backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "test-double")
        .unwrap()
        .clone();
    assert_eq!(double["status"]["cancelled"], 1, "{double}");
    assert_eq!(double["status"]["restarts"], 0, "{double}");
    assert_eq!(metric(&agent, "rm_agent_request_timeouts_total"), 1.0);
}

/// The agent's resident memory in MiB.
fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kib / 1024.0
}

/// The test double's `GET /v1/backends` status.
fn double_status(agent: &Agent) -> Value {
    let backends = agent.get("/v1/backends").json();
    backends["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["name"] == "test-double")
        .unwrap()["status"]
        .clone()
}

/// A pod loops "send a large generate, hang up" while its worker is still
/// busy with a cancelled request that does not stop (the test double's
/// `hang`; with this manifest its process is killed only after a minute).
/// Nothing of those requests may stay in the agent: their slot is the
/// busy request's, so they wait for it in the admission queue and leave
/// with their client; and a worker's own queue is bounded.
fn hang_ups_behind_a_busy_worker(slots: &str) {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("tiny");
    tiny_llama(&model, 15);
    let plugins = test_double_plugins(dir.path());
    let manifest = plugins.join("test-double/manifest.json");
    let mut m: Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    m["request_timeout_s"] = json!(60);
    m["cancel_grace_s"] = json!(60);
    std::fs::write(&manifest, m.to_string()).unwrap();
    let log = dir.path().join("worker-events.log");
    let agent = Agent::start_with_env(
        dir.path(),
        Some(plugins),
        &["--concurrent-requests", slots],
        &[("TEST_DOUBLE_EVENTS", log.to_str().unwrap())],
    );
    agent.add_token("tok", "gpu", &[0]);
    let key = prepare(&agent, "tok", &model, json!({}));
    let pid = worker_pid(&agent, "tok", &key);

    let body =
        |prompt: &str| json!({"key": key, "device": "gpu", "prompt": prompt, "max_new_tokens": 2});
    let hung = send_only(&agent.socket, "tok", "/v1/generate", &body("hang"));
    assert!(
        eventually(Duration::from_secs(5), || events(&log, "hang", pid) == 1),
        "the hanging request never reached the worker"
    );
    drop(hung);
    assert!(
        eventually(
            Duration::from_secs(5),
            || double_status(&agent)["cancelled"] == 1
        ),
        "the hang-up was not noticed"
    );

    let big = "x".repeat(4 << 20);
    let sent = metric(&agent, "rm_agent_generate_requests_total");
    let before = rss_mib(agent.child.id());
    for i in 1..=50 {
        let s = send_only(&agent.socket, "tok", "/v1/generate", &body(&big));
        // Read and parsed; then a moment to be admitted or queued.
        assert!(
            eventually(Duration::from_secs(10), || metric(
                &agent,
                "rm_agent_generate_requests_total"
            ) >= sent + i as f64),
            "request {i} never arrived"
        );
        std::thread::sleep(Duration::from_millis(100));
        drop(s);
    }
    std::thread::sleep(Duration::from_millis(500));
    let grown = rss_mib(agent.child.id()) - before;
    eprintln!("slots {slots}: the agent grew by {grown:.0} MiB over 50 hang-ups of 4 MiB");
    assert!(
        grown < 100.0,
        "the agent kept the hung-up requests: +{grown:.0} MiB over 50 of 4 MiB"
    );
    assert_eq!(events(&log, "hang", pid), 1);

    let status = double_status(&agent);
    assert_eq!(status["in_flight"], 1, "{status}");
    let mut live = Vec::new();
    if slots == "1" {
        // The slot stays the busy request's: the next one waits for it.
        live.push(send_only(
            &agent.socket,
            "tok",
            "/v1/generate",
            &body("pid"),
        ));
        assert!(
            eventually(Duration::from_secs(5), || metric(
                &agent,
                "rm_agent_requests_waiting"
            ) == 1.0),
            "a request was admitted while the worker is still busy with a cancelled one"
        );
        assert_eq!(metric(&agent, "rm_agent_requests_running"), 1.0);
        assert_eq!(double_status(&agent)["in_flight"], 1);
    } else {
        // More slots than the worker's queue: the process takes 4 requests
        // waiting behind the busy one, and answers the next 503 at once.
        for _ in 0..4 {
            live.push(send_only(
                &agent.socket,
                "tok",
                "/v1/generate",
                &body("pid"),
            ));
        }
        assert!(
            eventually(
                Duration::from_secs(5),
                || double_status(&agent)["in_flight"] == 5
            ),
            "{}",
            double_status(&agent)
        );
        let t = Instant::now();
        let r = generate(&agent, "tok", &key, "pid");
        assert_eq!(r.status, 503, "{}", String::from_utf8_lossy(&r.body));
        assert!(
            r.message().contains("4 requests waiting"),
            "{}",
            r.message()
        );
        assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    }
    drop(live);
}

#[test]
fn hang_ups_behind_a_busy_worker_leave_nothing_behind() {
    hang_ups_behind_a_busy_worker("1");
}

#[test]
fn a_workers_queue_is_bounded_and_hang_ups_leave_it_at_once() {
    hang_ups_behind_a_busy_worker("8");
}
