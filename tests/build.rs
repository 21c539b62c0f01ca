//! Bake libtorch's directory into this package's binaries and tests as an rpath, so they run without
//! LD_LIBRARY_PATH. torch-sys (`links = "tch"`) tells dependents where it found libtorch.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
