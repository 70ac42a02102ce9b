//! Prints the CustomResourceDefinition YAML of every rm-abstract CRD.
//! `crds/inferenceworkload.yaml` is this program's output, committed; a test
//! fails when it is stale (`cargo run -p rm-crds --bin crdgen > crds/inferenceworkload.yaml`).

fn main() -> Result<(), serde_yaml::Error> {
    print!("{}", rm_crds::workload::crd_yaml()?);
    Ok(())
}
