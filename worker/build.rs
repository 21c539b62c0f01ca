// Bake libtorch's directory into this package's binaries and tests as an rpath, so they run without
// LD_LIBRARY_PATH. torch-sys (`links = "tch"`) tells dependents where it found libtorch. The NCCL library
// that the torch wheel ships (`site-packages/nvidia/nccl/lib`, next to `torch/lib`) goes on the rpath too:
// cudarc dlopens `libnccl.so` at run time, and dlopen honours the executable's rpath.
//
// libtorch's CUDA backend lives in libtorch_cuda.so, which registers itself when loaded; nothing of ours calls
// into it, so rustc's default `--as-needed` drops it from the binaries and `tch::Cuda::device_count()` is then 0
// on a GPU machine. It is linked with `--no-as-needed` wherever the libtorch has it.
fn main() {
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
        let nccl = std::path::Path::new(&lib).join("../../nvidia/nccl/lib");
        if let Ok(nccl) = nccl.canonicalize() {
            println!("cargo:rustc-link-arg=-Wl,-rpath,{}", nccl.display());
        }
        if std::path::Path::new(&lib).join("libtorch_cuda.so").exists() {
            println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-L{lib},-ltorch_cuda,--as-needed");
        }
    }
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
