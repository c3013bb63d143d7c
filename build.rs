//! Link flags for libtorch (tch issue #980).

fn main() {
    // tch's own link arguments do not reach downstream crates: keep libtorch.so in DT_NEEDED
    // (so CUDA registers when a CUDA libtorch is loaded) and find it without LD_LIBRARY_PATH.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rustc-link-arg=-Wl,--as-needed");
}
