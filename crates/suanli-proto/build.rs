//! Compiles `proto/suanli/v1/*.proto` with protox (no system `protoc`), writes the encoded
//! descriptor set to `OUT_DIR` for gRPC reflection, and generates messages, clients and servers
//! from it.

use std::path::{Path, PathBuf};
use std::{env, fs};

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let package = root.join("suanli/v1");
    println!("cargo:rerun-if-changed={}", root.display());

    // Paths relative to the include root, sorted so the descriptor set is the same on every
    // machine.
    let mut files = Vec::new();
    for entry in fs::read_dir(&package)? {
        let name = entry?.file_name();
        if Path::new(&name).extension().is_some_and(|e| e == "proto") {
            files.push(Path::new("suanli/v1").join(name));
        }
    }
    files.sort();

    let fds = protox::compile(&files, [&root])?;
    let out = PathBuf::from(env::var_os("OUT_DIR").ok_or("OUT_DIR is not set")?);
    fs::write(out.join("suanli_v1_descriptor.bin"), fds.encode_to_vec())?;

    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
