//! What the agent stores for a namespace, on the real `rm-agent`: hub
//! downloads and compiled entries count against the namespace's quota with
//! its uploads, a download that would pass it is stopped and removed, and
//! the disk's floor may be a share of the filesystem.
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, tiny_llama};
use serde_json::json;

/// A test double of the Hugging Face CLI (`hf download ID --revision R
/// --local-dir D`): there is no hub to reach from the tests. `org/small`
/// copies a tiny model (`org/small-*`: the same weights, another
/// repository); `org/big` writes 16 files of 512 KiB, slowly, as a
/// large download would.
fn fake_hub_cli(dir: &Path, small_model: &Path) -> String {
    let bin = dir.join("fake-bin");
    std::fs::create_dir_all(&bin).unwrap();
    let script = format!(
        r#"#!/bin/sh
# test double of `hf download ID --revision R --local-dir D`
id="$2"; dest=""
while [ $# -gt 0 ]; do [ "$1" = "--local-dir" ] && dest="$2"; shift; done
mkdir -p "$dest"
case "$id" in
  org/small) cp {small}/* "$dest"/ ;;
  org/small-*) cp {small}/* "$dest"/; echo "$id" > "$dest/README.md" ;;
  org/slow) sleep 0.5; cp {small}/* "$dest"/; sleep 0.5 ;;
  org/big) i=0; while [ $i -lt 16 ]; do head -c 524288 /dev/zero > "$dest/part$i.bin"; i=$((i+1)); sleep 0.2; done ;;
  *) echo "404: $id" >&2; exit 1 ;;
esac
"#,
        small = small_model.display()
    );
    let hf = bin.join("hf");
    std::fs::write(&hf, script).unwrap();
    std::fs::set_permissions(&hf, std::fs::Permissions::from_mode(0o755)).unwrap();
    format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    )
}

#[test]
fn a_hub_download_past_the_namespace_quota_is_stopped_and_removed() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    tiny_llama(&small, 1);
    let path = fake_hub_cli(dir.path(), &small);
    let agent = Agent::start_with_env(
        dir.path(),
        None,
        &["--namespace-quota", "1M"],
        &[("PATH", &path)],
    );

    let t = Instant::now();
    let r = agent.post("/v1/models", json!({"source": {"hub": "org/big"}}));
    assert_eq!(r.status, 403, "{}", r.message());
    assert!(r.message().contains("--namespace-quota"), "{}", r.message());
    // Stopped once past 1 MiB (the third file), not after all 8 MiB.
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
    let hub = agent.cache.join("hub");
    let left: Vec<_> = std::fs::read_dir(&hub)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "nothing of it is left: {left:?}");

    // A download that fits is kept, and counts: the namespace's room is
    // what the quota leaves after it.
    let r = agent.post("/v1/models", json!({"source": {"hub": "org/small"}}));
    assert_eq!(r.status, 200, "{}", r.message());
    let model_bytes = r.json()["bytes"].as_u64().unwrap();
    assert!(model_bytes > 300_000, "{model_bytes}");
    let sha = "a".repeat(64);
    let big = 1_048_576 - model_bytes + 1;
    let r = agent.call(
        "PUT",
        &format!("/v1/blobs/{sha}"),
        Some(common::TOKEN),
        &vec![0u8; big as usize],
    );
    assert_eq!(r.status, 403, "{}", r.message());
    assert!(r.message().contains("hub downloads"), "{}", r.message());
}

#[test]
fn compiled_entries_count_against_the_namespace_quota() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_llama(&model, 2);
    // Room for one compile of this tiny model, not two.
    let agent = Agent::start(dir.path(), None, &["--namespace-quota", "100K"]);
    let prepare = |precision: &str| {
        agent.post(
            "/v1/prepare",
            json!({"source": {"path": model}, "device": "cpu", "options": {"precision": precision}}),
        )
    };
    let r = prepare("q8_0");
    assert_eq!(r.status, 200, "{}", r.message());
    let first = r.json()["key"].as_str().unwrap().to_string();
    let r = prepare("fp16");
    assert_eq!(r.status, 403, "{}", r.message());
    assert!(r.message().contains("DELETE /v1/cache"), "{}", r.message());
    // A cached entry is still served: only new writes are refused.
    assert_eq!(prepare("q8_0").status, 200);
    // Freed, the namespace compiles again.
    let r = agent.call(
        "DELETE",
        &format!("/v1/cache/{first}"),
        Some(common::TOKEN),
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.message());
    let r = prepare("fp16");
    assert_eq!(r.status, 200, "{}", r.message());
}

#[test]
fn the_disk_floor_may_be_a_share_of_the_filesystem() {
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &["--min-free-disk", "99%"]);
    let sha = "b".repeat(64);
    let r = agent.call(
        "PUT",
        &format!("/v1/blobs/{sha}"),
        Some(common::TOKEN),
        b"0123456789",
    );
    assert_eq!(r.status, 507, "{}", r.message());
    assert!(r.message().contains("--min-free-disk"), "{}", r.message());
}

#[test]
fn hub_downloads_past_the_node_budget_evict_the_least_recently_used() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    tiny_llama(&small, 3);
    let path = fake_hub_cli(dir.path(), &small);
    // Room for two downloads of the tiny model (~420 KiB each), not three.
    let agent = Agent::start_with_env(
        dir.path(),
        None,
        &["--hub-max-bytes", "1M"],
        &[("PATH", &path)],
    );
    let register = |id: &str| agent.post("/v1/models", json!({"source": {"hub": id}}));
    let a = register("org/small-a");
    assert_eq!(a.status, 200, "{}", a.message());
    let a_model = a.json()["model"].as_str().unwrap().to_string();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(register("org/small-b").status, 200);
    std::thread::sleep(Duration::from_millis(20));
    // a is used again: b becomes the least recently used.
    assert_eq!(register("org/small-a").status, 200);
    std::thread::sleep(Duration::from_millis(20));
    let c = register("org/small-c");
    assert_eq!(c.status, 200, "{}", c.message());
    let hub: Vec<String> = std::fs::read_dir(agent.cache.join("hub"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| !n.ends_with(".log"))
        .collect();
    assert!(
        hub.iter().any(|n| n.contains("small-a")) && hub.iter().any(|n| n.contains("small-c")),
        "{hub:?}"
    );
    assert!(
        !hub.iter().any(|n| n.contains("small-b")),
        "b was evicted: {hub:?}"
    );
    let metrics = String::from_utf8_lossy(&agent.get("/metrics").body).to_string();
    assert!(metrics.contains("rm_agent_hub_evictions 1"), "{metrics}");
    // a is still usable by digest.
    let r = agent.post("/v1/prepare", json!({"model": a_model, "device": "cpu"}));
    assert_eq!(r.status, 200, "{}", r.message());
}

#[test]
fn uploads_running_at_once_cannot_together_pass_the_quota() {
    use sha2::{Digest, Sha256};
    use std::io::{Read, Write};
    let dir = tempfile::tempdir().unwrap();
    let agent = Agent::start(dir.path(), None, &["--namespace-quota", "1M"]);
    // Four uploads of 400 KiB start before any ends: two fit in 1 MiB, the
    // others must be refused at once, from their headers.
    let bodies: Vec<Vec<u8>> = (0..4u8).map(|i| vec![i; 400 << 10]).collect();
    let mut streams: Vec<std::os::unix::net::UnixStream> = bodies
        .iter()
        .map(|b| {
            let sha = format!("{:x}", Sha256::digest(b));
            let mut s = std::os::unix::net::UnixStream::connect(&agent.socket).unwrap();
            write!(
                s,
                "PUT /v1/blobs/{sha} HTTP/1.1\r\nHost: rm-agent\r\nAuthorization: Bearer {}\r\nContent-Length: {}\r\n\r\n",
                common::TOKEN,
                b.len()
            )
            .unwrap();
            // A refused upload's socket may be closed already.
            let _ = s.write_all(&b[..1024]);
            std::thread::sleep(Duration::from_millis(100));
            s
        })
        .collect();
    let status = |s: &mut std::os::unix::net::UnixStream| {
        s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut buf = [0u8; 12];
        match s.read_exact(&mut buf) {
            Ok(()) => String::from_utf8_lossy(&buf[9..12]).to_string(),
            Err(_) => "none yet".to_string(),
        }
    };
    let early: Vec<String> = streams[2..].iter_mut().map(status).collect();
    assert_eq!(
        early,
        ["403", "403"],
        "the third and fourth are over the quota"
    );
    for (s, b) in streams[..2].iter_mut().zip(&bodies) {
        s.write_all(&b[1024..]).unwrap();
        assert_eq!(status(s), "200");
    }
}

#[test]
fn a_download_stopped_for_one_namespace_leaves_anothers_of_the_same_model() {
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    tiny_llama(&small, 4);
    let path = fake_hub_cli(dir.path(), &small);
    let agent = Agent::start_with_env(
        dir.path(),
        None,
        &["--namespace-quota", "1M"],
        &[("PATH", &path)],
    );
    agent.add_slot_token("token-of-full", "full");
    // Namespace "full" has 900 KiB of its 1 MiB in use: its download of the
    // model (~420 KiB) is stopped, while default's of the same one goes on.
    let blob = vec![7u8; 900 << 10];
    let sha = {
        use sha2::{Digest, Sha256};
        format!("{:x}", Sha256::digest(&blob))
    };
    let r = agent.call(
        "PUT",
        &format!("/v1/blobs/{sha}"),
        Some("token-of-full"),
        &blob,
    );
    assert_eq!(r.status, 200, "{}", r.message());
    let socket = agent.socket.clone();
    let other = std::thread::spawn(move || {
        common::request(
            &socket,
            "POST",
            "/v1/models",
            &[common::AUTH],
            json!({"source": {"hub": "org/slow"}})
                .to_string()
                .as_bytes(),
        )
    });
    std::thread::sleep(Duration::from_millis(100));
    let r = agent.post_auth(
        "/v1/models",
        "token-of-full",
        json!({"source": {"hub": "org/slow"}}),
    );
    assert_eq!(r.status, 403, "{}", r.message());
    let r = other.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.message());
}

#[test]
fn uploads_past_the_node_budget_evict_the_least_recently_used_with_their_models() {
    use sha2::{Digest, Sha256};
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_llama(&model, 5);
    let agent = Agent::start(dir.path(), None, &["--uploads-max-bytes", "1M"]);
    agent.add_slot_token("token-of-b", "team-b");
    let put = |token: &str, bytes: &[u8]| {
        let sha = format!("{:x}", Sha256::digest(bytes));
        let r = agent.call("PUT", &format!("/v1/blobs/{sha}"), Some(token), bytes);
        assert_eq!(r.status, 200, "{}", r.message());
        std::thread::sleep(Duration::from_millis(20));
        sha
    };
    let head = |token: &str, sha: &str| {
        agent
            .call("HEAD", &format!("/v1/blobs/{sha}"), Some(token), b"")
            .status
    };
    // default uploads the tiny model (~420 KiB) and registers it.
    let mut files = vec![];
    for name in ["config.json", "model.safetensors"] {
        let sha = put(common::TOKEN, &std::fs::read(model.join(name)).unwrap());
        files.push(json!({"path": name, "sha256": sha}));
    }
    let r = agent.post("/v1/models", json!({"source": {"files": files}}));
    assert_eq!(r.status, 200, "{}", r.message());
    let digest = r.json()["model"].as_str().unwrap().to_string();
    // team-b uploads 350 KiB, then default's blob is used again (HEAD).
    let b1 = put("token-of-b", &vec![1u8; 350 << 10]);
    assert_eq!(
        head(common::TOKEN, files[0]["sha256"].as_str().unwrap()),
        200
    );
    // 350 KiB more do not fit in 1 MiB: the least recently used goes, which
    // is default's weights (its config.json was just asked for), and the
    // model assembled from them.
    let b2 = put("token-of-b", &vec![2u8; 350 << 10]);
    assert_eq!(
        head(common::TOKEN, files[1]["sha256"].as_str().unwrap()),
        404
    );
    assert_eq!(head("token-of-b", &b1), 200);
    assert_eq!(head("token-of-b", &b2), 200);
    let r = agent.post("/v1/prepare", json!({"model": digest, "device": "cpu"}));
    assert_eq!(r.status, 404, "{}", r.message());
    let metrics = String::from_utf8_lossy(&agent.get("/metrics").body).to_string();
    assert!(
        metrics.contains("rm_agent_uploads_evicted_total 1"),
        "{metrics}"
    );
    // Uploaded again (as the client does: what HEAD does not find), the
    // model is back under the same digest.
    for name in ["config.json", "model.safetensors"] {
        put(common::TOKEN, &std::fs::read(model.join(name)).unwrap());
    }
    let r = agent.post("/v1/models", json!({"source": {"files": files}}));
    assert_eq!(r.status, 200, "{}", r.message());
    assert_eq!(r.json()["model"], digest.as_str());
}
