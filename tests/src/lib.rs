//! Helpers for the end-to-end tests: where cargo put the workspace's binaries.

pub mod jobs;
pub mod slurm;

use std::path::PathBuf;
use std::process::Command;

/// A workspace binary (`worker`, `orchestrator`) next to this test executable's `deps/` directory.
pub fn binary(name: &str) -> Command {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().and_then(|deps| deps.parent()).expect("target profile directory");
    let path: PathBuf = dir.join(name);
    assert!(
        path.is_file(),
        "{} not built: run `cargo build --workspace --bins` first (scripts/test does)",
        path.display()
    );
    let mut cmd = Command::new(path);
    // The binaries must find libtorch through their rpath, as a user runs them.
    cmd.env_remove("LD_LIBRARY_PATH");
    cmd
}

/// `mpirun -np <ranks> <workspace binary> ...`, allowed to run as root (CI containers) and on more ranks than
/// cores.
pub fn mpirun(ranks: usize, name: &str) -> Command {
    let program = binary(name).get_program().to_owned();
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-np", &ranks.to_string()])
        .arg(program)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env_remove("LD_LIBRARY_PATH");
    cmd
}
