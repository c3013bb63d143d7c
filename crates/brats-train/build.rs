//! Link flags for libtorch (tch issue #980) and the c10d shim behind `src/dist/`.

use std::path::PathBuf;

fn main() {
    let libtorch_lib = std::env::var("DEP_TCH_LIBTORCH_LIB").ok();
    let torch_include = compile_dist_shim(libtorch_lib.as_deref());
    compile_nccl_shim(&torch_include);

    brats_build::link_libtorch();
}

/// Compiles `csrc/dist_shim.cpp` against libtorch's headers and Gloo's (which the torch wheel
/// lacks; `scripts/bootstrap.sh` puts them in `.deps/gloo/include`).
fn compile_dist_shim(libtorch_lib: Option<&str>) -> PathBuf {
    println!("cargo:rerun-if-changed=csrc/dist_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/dist_shim.h");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=BRATS_GLOO_INCLUDE");

    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    // torch-sys found libtorch through LIBTORCH; its lib/ sits beside include/ in every layout it accepts.
    let libtorch = match std::env::var_os("LIBTORCH") {
        Some(dir) => PathBuf::from(dir),
        None => match libtorch_lib {
            Some(lib) => PathBuf::from(lib).parent().expect("libtorch lib dir has a parent").to_path_buf(),
            None => panic!("LIBTORCH is not set and torch-sys reported no libtorch: run scripts/bootstrap.sh"),
        },
    };
    let torch_include = libtorch.join("include");
    let gloo_include = match std::env::var_os("BRATS_GLOO_INCLUDE") {
        Some(dir) => PathBuf::from(dir),
        None => manifest.join("../../.deps/gloo/include"),
    };
    if !gloo_include.join("gloo/config.h").exists() {
        panic!(
            "Gloo headers not found in {} (needed by crates/brats-train/csrc/dist_shim.cpp): run \
             scripts/bootstrap.sh, or set BRATS_GLOO_INCLUDE to a directory holding gloo/config.h",
            gloo_include.display()
        );
    }
    if !torch_include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp").exists() {
        panic!("libtorch headers with c10d not found under {}: run scripts/bootstrap.sh", torch_include.display());
    }

    cc::Build::new()
        .cpp(true)
        .pic(true)
        .std("c++17")
        .warnings(false)
        .include(&gloo_include)
        .include(&torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        // ProcessGroupGloo.hpp is empty without it; the wheel's libtorch_cpu was built with Gloo.
        .define("USE_C10D_GLOO", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .file(manifest.join("csrc/dist_shim.cpp"))
        .compile("brats_dist_shim");
    // After the archive on the link line, so its references to c10d resolve under --as-needed.
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    torch_include
}

/// Builds `csrc/nccl_shim.cpp` into `$OUT_DIR/libbrats_nccl_shim.so` when NCCL's and CUDA's
/// headers are at hand (`BOOTSTRAP_NCCL=1 scripts/bootstrap.sh`, or `BRATS_CUDA_INCLUDE`, a
/// `:`-separated list of include directories). Without them the build goes on and
/// `Backend::Nccl` reports itself unsupported. The object links against nothing: src/dist/
/// dlopens it only in a process that already runs a CUDA libtorch.
fn compile_nccl_shim(torch_include: &std::path::Path) {
    println!("cargo:rerun-if-changed=csrc/nccl_shim.cpp");
    println!("cargo:rerun-if-changed=csrc/cuda_stubs");
    println!("cargo:rerun-if-env-changed=BRATS_CUDA_INCLUDE");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let headers = manifest.join("../../.deps/cuda-headers");
    // Watched only when present: cargo reruns a script that watches a missing path on every
    // build, and so recompiled this crate and everything above it each time (minutes per cargo
    // call on two cores). `scripts/bootstrap.sh` touches this file when it installs the headers.
    if headers.exists() {
        println!("cargo:rerun-if-changed={}", headers.display());
    }
    let dirs: Vec<PathBuf> = match std::env::var_os("BRATS_CUDA_INCLUDE") {
        Some(list) => std::env::split_paths(&list).collect(),
        None => ["nccl", "cudart", "cccl"].iter().map(|d| headers.join(d)).collect(),
    };
    let has = |file: &str| dirs.iter().any(|d| d.join(file).exists());
    if !(has("nccl.h") && has("cuda_runtime_api.h") && has("crt/host_config.h") && has("nv/target")) {
        return;
    }
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("libbrats_nccl_shim.so");
    let mut build = cc::Build::new();
    build.cpp(true).pic(true).std("c++17").warnings(false).opt_level(2);
    for d in &dirs {
        build.include(d);
    }
    // After the real headers, so that those win wherever a full CUDA toolkit is installed.
    build
        .include(torch_include)
        .include(torch_include.join("torch/csrc/api/include"))
        .include(manifest.join("csrc/cuda_stubs"))
        .define("USE_C10D_NCCL", None)
        .define("USE_CUDA", None)
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None);
    let mut cmd = build.get_compiler().to_command();
    cmd.arg("-shared").arg("-o").arg(&out).arg(manifest.join("csrc/nccl_shim.cpp"));
    let status = cmd.status().unwrap_or_else(|e| panic!("running the C++ compiler for the NCCL shim: {e}"));
    if !status.success() {
        panic!(
            "compiling csrc/nccl_shim.cpp failed ({status}); fix it, or remove .deps/cuda-headers (and unset \
             BRATS_CUDA_INCLUDE) to build without NCCL"
        );
    }
    println!("cargo:rustc-env=BRATS_NCCL_SHIM_BUILT={}", out.display());
}
