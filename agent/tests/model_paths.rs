//! Models named by node path (`source.path`), on the real `rm-agent`: only
//! inside the allowed directories, never through a link out of them, only
//! regular files, and never compiled from files that changed after they were
//! registered.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::{Agent, tiny_llama};
use serde_json::json;

fn register(agent: &Agent, path: &Path) -> common::Reply {
    agent.post("/v1/models", json!({"source": {"path": path}}))
}

#[test]
fn without_allowed_directories_no_node_path_is_read() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_llama(&model, 1);
    let mut agent = Agent::start(dir.path(), None, &[]);
    agent.stop();
    agent.model_roots.clear();
    agent.spawn();
    let r = register(&agent, &model);
    assert_eq!(r.status, 403, "{}", r.message());
    assert!(
        r.message().contains("--model-path-allow"),
        "the refusal says how to allow paths: {}",
        r.message()
    );
}

#[test]
fn links_may_stay_inside_the_allowed_directory_but_not_leave_it() {
    let dir = tempfile::tempdir().unwrap();
    let outside = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_llama(&model, 2);
    let agent = Agent::start(dir.path(), None, &[]);

    // The Hugging Face cache's layout: files are relative links into a
    // sibling `blobs/` directory, all inside the allowed root.
    let hf = dir.path().join("hf/snapshots/rev");
    let blobs = dir.path().join("hf/blobs");
    std::fs::create_dir_all(&hf).unwrap();
    std::fs::create_dir_all(&blobs).unwrap();
    for f in std::fs::read_dir(&model).unwrap().flatten() {
        let name = f.file_name();
        std::fs::copy(f.path(), blobs.join(&name)).unwrap();
        std::os::unix::fs::symlink(Path::new("../../blobs").join(&name), hf.join(&name)).unwrap();
    }
    let direct = register(&agent, &model);
    assert_eq!(direct.status, 200, "{}", direct.message());
    let linked = register(&agent, &hf);
    assert_eq!(linked.status, 200, "{}", linked.message());
    assert_eq!(linked.json()["model"], direct.json()["model"]);

    // The weights replaced by a link to a file outside the allowed root.
    let secret = outside.path().join("secret.safetensors");
    std::fs::copy(model.join("model.safetensors"), &secret).unwrap();
    let escape = dir.path().join("escape");
    std::fs::create_dir_all(&escape).unwrap();
    std::fs::copy(model.join("config.json"), escape.join("config.json")).unwrap();
    std::os::unix::fs::symlink(&secret, escape.join("model.safetensors")).unwrap();
    let r = register(&agent, &escape);
    assert_eq!(r.status, 403, "{}", r.message());
    assert!(r.message().contains("symbolic link"), "{}", r.message());

    // A relative link climbing out is refused the same way.
    let climb = dir.path().join("climb");
    std::fs::create_dir_all(&climb).unwrap();
    std::fs::copy(model.join("config.json"), climb.join("config.json")).unwrap();
    let up = Path::new("../..")
        .join(outside.path().file_name().unwrap())
        .join("secret.safetensors");
    std::os::unix::fs::symlink(&up, climb.join("model.safetensors")).unwrap();
    let r = register(&agent, &climb);
    assert!(
        r.status == 403 || r.status == 422,
        "a link out of the root is never read: {} {}",
        r.status,
        r.message()
    );
}

#[test]
fn fifos_and_devices_under_a_model_name_are_refused_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_llama(&model, 3);
    let agent = Agent::start(dir.path(), None, &[]);

    // A link named like the weights, to a FIFO inside the allowed root:
    // reading it would wait for a writer that never comes, holding one of
    // the agent's threads for ever.
    let fifo_model = dir.path().join("fifo");
    std::fs::create_dir_all(&fifo_model).unwrap();
    std::fs::copy(model.join("config.json"), fifo_model.join("config.json")).unwrap();
    let made = std::process::Command::new("mkfifo")
        .arg(dir.path().join("pipe"))
        .status()
        .unwrap();
    assert!(made.success());
    std::os::unix::fs::symlink("../pipe", fifo_model.join("model.safetensors")).unwrap();
    let t = Instant::now();
    let r = register(&agent, &fifo_model);
    assert_eq!(r.status, 422, "{}", r.message());
    assert!(
        r.message().contains("not a regular file"),
        "{}",
        r.message()
    );
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refused without waiting"
    );

    // `/dev/zero` behind a link: outside the root, and not a regular file.
    let zero_model = dir.path().join("zero");
    std::fs::create_dir_all(&zero_model).unwrap();
    std::fs::copy(model.join("config.json"), zero_model.join("config.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero_model.join("model.safetensors")).unwrap();
    let t = Instant::now();
    let r = register(&agent, &zero_model);
    assert_eq!(r.status, 403, "{}", r.message());
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "refused without reading"
    );

    // The agent still serves.
    assert_eq!(agent.get("/healthz").status, 200);
    assert_eq!(register(&agent, &model).status, 200);
}

#[test]
fn files_changed_after_registration_are_never_compiled_under_the_old_digest() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("m");
    tiny_llama(&model, 4);
    let agent = Agent::start(dir.path(), None, &[]);
    let r = register(&agent, &model);
    assert_eq!(r.status, 200, "{}", r.message());
    let digest = r.json()["model"].as_str().unwrap().to_string();

    // Someone with write access to the node directory swaps the weights for
    // others of the same shape (what another tenant's compile would then
    // read under this digest).
    let other = dir.path().join("other");
    tiny_llama(&other, 5);
    std::fs::copy(
        other.join("model.safetensors"),
        model.join("model.safetensors"),
    )
    .unwrap();

    let r = agent.post("/v1/prepare", json!({"model": digest, "device": "cpu"}));
    assert_eq!(r.status, 409, "{}", r.message());
    assert!(r.message().contains("changed since"), "{}", r.message());
    // Nothing was stored under the old digest.
    let cache = agent.get("/v1/cache").json();
    assert_eq!(
        cache["entries"].as_array().map(Vec::len),
        Some(0),
        "{cache}"
    );

    // Registered again, the path is what it holds now, and compiles.
    let r = register(&agent, &model);
    assert_eq!(r.status, 200, "{}", r.message());
    let fresh = r.json()["model"].as_str().unwrap().to_string();
    assert_ne!(fresh, digest);
    let r = agent.post("/v1/prepare", json!({"model": fresh, "device": "cpu"}));
    assert_eq!(r.status, 200, "{}", r.message());
}
