//! Compiles the brats.v1 protobuf contract (`proto/brats/v1/*.proto` at the workspace root)
//! into tonic clients and servers, and writes the file descriptor set that
//! `brats_proto::FILE_DESCRIPTOR_SET` embeds for gRPC server reflection.

use std::{env, path::PathBuf};

const PROTOS: [&str; 5] = [
    "brats/v1/common.proto",
    "brats/v1/preprocess.proto",
    "brats/v1/trainer.proto",
    "brats/v1/inference.proto",
    "brats/v1/gateway.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let manifest_dir = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?);
    let proto_root = manifest_dir.join("../../proto");
    let out_dir = PathBuf::from(env::var("OUT_DIR")?);

    println!("cargo:rerun-if-changed={}", proto_root.display());
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", proto_root.join(proto).display());
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    println!("cargo:rerun-if-env-changed=PROTOC_INCLUDE");

    let protos: Vec<PathBuf> = PROTOS.iter().map(|p| proto_root.join(p)).collect();
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .emit_rerun_if_changed(false)
        .file_descriptor_set_path(out_dir.join("brats_v1_descriptor.bin"))
        .compile_protos(&protos, &[proto_root])?;
    Ok(())
}
