//! Preemption: Kubernetes evictions, spot reclaims and Slurm send SIGTERM (Slurm first SIGUSR1 with
//! `--signal`) with a grace period before killing. Any one rank receiving either signal asks the job to stop at
//! the next step boundary: the request travels with the step's loss all-reduce (no extra collective), every
//! rank sees it after the same step, a checkpoint of that step is committed, and every rank exits with
//! [`EXIT_PREEMPTED`], which `orchestrator launch` relaunches without counting it as a failure. No step is lost
//! or trained twice. A second SIGTERM ends the process at once (the default action), for a rank that cannot get
//! to a step boundary.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};

/// The exit code of a preempted rank whose checkpoint is committed (EX_TEMPFAIL: try again).
pub const EXIT_PREEMPTED: u8 = 75;

/// A file a preempted rank creates (after its checkpoint is committed) when this variable names one: how a
/// batch script learns it, where mpirun's exit code cannot tell (the Slurm target).
pub const MARKER_ENV: &str = "AVEXPR_PREEMPTED_MARKER";

/// Creates the [`MARKER_ENV`] file, if one is asked for, saying `what`.
pub fn write_marker(what: &str) {
    if let Some(path) = std::env::var_os(MARKER_ENV).filter(|p| !p.is_empty())
        && let Err(e) = std::fs::write(&path, format!("{what}\n"))
    {
        tracing::warn!("{MARKER_ENV}: cannot write {}: {e}", std::path::Path::new(&path).display());
    }
}

/// Set from a signal handler when this process is asked to stop.
#[derive(Clone)]
pub struct Preemption {
    requested: Arc<AtomicBool>,
}

impl Preemption {
    /// Catches SIGTERM and SIGUSR1 from now on (once per process; later calls share the first's flag).
    pub fn install() -> std::io::Result<Self> {
        static INSTALLED: OnceLock<Preemption> = OnceLock::new();
        if let Some(p) = INSTALLED.get() {
            return Ok(p.clone());
        }
        let p = Self::register()?;
        Ok(INSTALLED.get_or_init(|| p).clone())
    }

    fn register() -> std::io::Result<Self> {
        let requested = Arc::new(AtomicBool::new(false));
        use signal_hook::consts::{SIGTERM, SIGUSR1};
        // A second SIGTERM once the flag is set terminates (registered first, so it sees the flag before this
        // signal sets it).
        signal_hook::flag::register_conditional_default(SIGTERM, requested.clone())?;
        for signal in [SIGTERM, SIGUSR1] {
            signal_hook::flag::register(signal, requested.clone())?;
        }
        Ok(Self { requested })
    }

    /// The flag itself (set by the signal handlers), for what must follow it from another thread.
    pub fn flag(&self) -> Arc<AtomicBool> {
        self.requested.clone()
    }

    /// Whether this process was asked to stop.
    pub fn requested(&self) -> bool {
        self.requested.load(Ordering::SeqCst)
    }
}

/// The job stopped for a preemption, with its last step committed.
#[derive(Debug, thiserror::Error)]
#[error("preempted after step {step}: checkpoint {checkpoint} committed; `--resume auto` continues from it")]
pub struct Preempted {
    pub step: u64,
    pub checkpoint: String,
}
