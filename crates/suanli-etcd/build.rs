//! Compiles the project's declaration of etcd's v3 API (`proto/etcd/`) with protox, so that no
//! system `protoc` is needed, and generates tonic clients from it.

use std::path::Path;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.join("etcd").display());
    let fds = protox::compile(
        ["etcd/mvccpb/kv.proto", "etcd/etcdserverpb/rpc.proto"],
        [&root],
    )?;
    tonic_prost_build::configure()
        .build_server(false)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
