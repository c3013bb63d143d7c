//! Build-script helpers shared by every package that links libtorch.
//!
//! tch's own link arguments do not reach downstream crates (tch issue #980): without these
//! flags a binary drops `libtorch.so` from DT_NEEDED under `--as-needed` (so a CUDA libtorch
//! never registers its CUDA backend) and needs `LD_LIBRARY_PATH` to find libtorch at run time.
//! Each such package lists `brats-build` as a build-dependency and a direct `torch-sys`
//! dependency (which exports `DEP_TCH_LIBTORCH_LIB` to its build script), and calls
//! [`link_libtorch`] from its `build.rs`.

/// Prints the cargo directives that keep `libtorch.so` in DT_NEEDED (`--no-as-needed -ltorch`)
/// and find it without `LD_LIBRARY_PATH` (`-rpath` to torch-sys's libtorch `lib/`).
pub fn link_libtorch() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
