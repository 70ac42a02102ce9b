//! The committed CRD YAML must be exactly what `crdgen` prints now.

#[test]
fn committed_crd_yaml_matches_the_generator() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/inferenceworkload.yaml");
    let committed = std::fs::read_to_string(path).expect("crds/inferenceworkload.yaml exists");
    let generated = rm_crds::workload::crd_yaml().expect("CRD serialises");
    assert!(
        committed == generated,
        "crds/inferenceworkload.yaml is stale; regenerate it with \
         `cargo run -p rm-crds --bin crdgen > crds/inferenceworkload.yaml`"
    );
}
