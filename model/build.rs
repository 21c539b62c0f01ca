// The rpaths of the worker binaries (libtorch, and the libnccl the torch wheel ships).
include!("../worker/build.rs");
