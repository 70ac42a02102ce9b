//! Generates the kubelet's device-plugin and pod-resources gRPC bindings from
//! the `.proto` files under `proto/`, with the pure-Rust `protox` compiler so
//! that no `protoc` binary is needed to build.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/deviceplugin/v1beta1/api.proto",
        "proto/podresources/v1/api.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    // Each file is compiled on its own: both declare messages named
    // `TopologyInfo`/`NUMANode`/`CDIDevice`, but in different packages, which
    // protox resolves fine; the include root is the folder of each file so the
    // file names match the upstream layout (`api.proto`).
    for f in files {
        let dir = std::path::Path::new(f)
            .parent()
            .ok_or("proto path has no parent")?;
        let fds = protox::compile(["api.proto"], [dir])?;
        tonic_prost_build::configure()
            .build_client(true)
            .build_server(true)
            .compile_fds(fds)?;
    }
    Ok(())
}
