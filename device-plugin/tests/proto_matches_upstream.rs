//! Our `.proto` copies are wire-identical to the kubelet's: package,
//! services, rpc signatures, messages, field names, numbers, types and labels
//! are compared with those of the `k8s.io/kubelet` Go module of the release we
//! target, fetched with `go mod download` (options, comments and source
//! positions are ignored).
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use prost_types::{DescriptorProto, FileDescriptorProto};

const KUBELET_MODULE: &str = "k8s.io/kubelet@v0.37.2";

fn upstream_dir() -> PathBuf {
    let tmp = tempfile::tempdir().unwrap();
    let out = std::process::Command::new("go")
        .args(["mod", "download", "-json", KUBELET_MODULE])
        .current_dir(tmp.path()) // outside any go.mod of this repository
        .env("GOFLAGS", "")
        .output()
        .expect("`go` must be installed to fetch the kubelet's proto (see e2e/setup.sh)");
    assert!(
        out.status.success(),
        "go mod download {KUBELET_MODULE} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let info: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    PathBuf::from(info["Dir"].as_str().expect("Dir in go mod download output"))
}

fn compile(dir: &Path) -> FileDescriptorProto {
    let mut set = protox::compile(["api.proto"], [dir]).unwrap();
    assert_eq!(set.file.len(), 1);
    normalise(set.file.remove(0))
}

fn normalise_message(m: &mut DescriptorProto) {
    m.options = None;
    for f in &mut m.field {
        f.options = None;
        f.json_name = None;
    }
    for n in &mut m.nested_type {
        normalise_message(n);
    }
}

fn normalise(mut f: FileDescriptorProto) -> FileDescriptorProto {
    f.source_code_info = None;
    f.options = None;
    for m in &mut f.message_type {
        normalise_message(m);
    }
    for s in &mut f.service {
        s.options = None;
        for m in &mut s.method {
            m.options = None;
        }
    }
    f
}

fn check(ours_rel: &str, upstream_rel: &str, upstream: &Path) {
    let ours = compile(&Path::new(env!("CARGO_MANIFEST_DIR")).join(ours_rel));
    let theirs = compile(&upstream.join(upstream_rel));
    assert_eq!(ours.package, theirs.package);
    assert_eq!(ours.syntax, theirs.syntax);
    assert_eq!(
        ours.service, theirs.service,
        "services or rpc signatures differ"
    );
    assert_eq!(ours.enum_type, theirs.enum_type);
    let names = |f: &FileDescriptorProto| -> Vec<String> {
        f.message_type
            .iter()
            .map(|m| m.name().to_string())
            .collect()
    };
    assert_eq!(names(&ours), names(&theirs), "message sets differ");
    for (a, b) in ours.message_type.iter().zip(&theirs.message_type) {
        assert_eq!(a, b, "message {} differs", a.name());
    }
    assert_eq!(ours, theirs);
}

#[test]
fn deviceplugin_and_podresources_protos_match_the_kubelets() {
    let upstream = upstream_dir();
    check(
        "proto/deviceplugin/v1beta1",
        "pkg/apis/deviceplugin/v1beta1",
        &upstream,
    );
    check(
        "proto/podresources/v1",
        "pkg/apis/podresources/v1",
        &upstream,
    );
}

/// The comparison itself can fail: a changed field number is caught.
#[test]
fn the_comparison_detects_a_changed_field_number() {
    let dir = tempfile::tempdir().unwrap();
    let ours = Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/deviceplugin/v1beta1/api.proto");
    let text = std::fs::read_to_string(ours).unwrap();
    let changed = text.replace("string resource_name = 3;", "string resource_name = 7;");
    assert_ne!(text, changed);
    std::fs::write(dir.path().join("api.proto"), changed).unwrap();
    let a = compile(&Path::new(env!("CARGO_MANIFEST_DIR")).join("proto/deviceplugin/v1beta1"));
    let b = compile(dir.path());
    assert_ne!(a, b);
}
