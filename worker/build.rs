// Bake libtorch's directory into this package's binaries and tests as an rpath, so they run without
// LD_LIBRARY_PATH. torch-sys (`links = "tch"`) tells dependents where it found libtorch. The NCCL library
// that the torch wheel ships (`site-packages/nvidia/nccl/lib`, next to `torch/lib`) goes on the rpath too:
// cudarc dlopens `libnccl.so` at run time, and dlopen honours the executable's rpath.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        let nccl = std::path::Path::new(&lib).join("../../nvidia/nccl/lib");
        if let Ok(nccl) = nccl.canonicalize() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
