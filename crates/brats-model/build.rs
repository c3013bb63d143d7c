//! Link flags for libtorch (tch issue #980) and the ONNX protobuf code generation.

fn main() {
    brats_build::link_libtorch();

    println!("cargo:rerun-if-changed=proto/onnx/onnx.proto");
    prost_build::Config::new()
        .compile_protos(&["proto/onnx/onnx.proto"], &["proto"])
        .expect("compiling proto/onnx/onnx.proto (is PROTOC set? see .cargo/config.toml)");
}
