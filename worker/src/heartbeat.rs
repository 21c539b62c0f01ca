//! Heartbeats: every rank's progress, written to `heartbeats/rank-<r>.json` in the job's checkpoint store, so
//! that whatever launched the job (the orchestrator on this machine or another, a Kubernetes launcher) can show
//! its progress and tell a live job from a dead or hung one.
//!
//! The training loop calls [`update`] on every step and every evaluation batch; a background thread writes the
//! newest state at most every `launch.heartbeat_every_s`. `seq` grows with every update, so a heartbeat that
//! stops changing means the loop stopped: a killed or stopped process, a rank blocked on a dead peer, a hang.
//! Readers judge staleness by their own clock (when they last saw `seq` change), never by comparing clocks.

use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use avexpr_data::store::Store;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Heartbeat {
    pub rank: usize,
    pub world_size: usize,
    pub host: String,
    pub pid: u32,
    /// Grows with every update of the training loop.
    pub seq: u64,
    /// `starting`, `training`, `evaluating`, `checkpointing`, `done`.
    pub phase: String,
    /// Optimizer steps done, of `steps`.
    pub step: u64,
    pub steps: u64,
    /// The checkpoint step this attempt resumed from (0: from scratch).
    pub resumed_from: u64,
    pub loss: Option<f64>,
    pub val_macro_f1: Option<f64>,
    pub clips_per_s: Option<f64>,
    pub eta_s: Option<f64>,
    /// Writer's clock, for people reading the file.
    pub unix_ms: u64,
}

/// This machine's name, as heartbeats report it.
pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default().trim().to_string()
}

pub fn key(rank: usize) -> String {
    format!("heartbeats/rank-{rank}.json")
}

struct Shared {
    state: Mutex<(Heartbeat, bool, bool)>, // (newest, unwritten, stop)
    changed: Condvar,
}

/// The background writer; dropping it writes the last state and stops it.
pub struct Beacon {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

static CURRENT: OnceLock<Arc<Shared>> = OnceLock::new();

impl Beacon {
    /// Starts this process's heartbeat (one at a time per process).
    pub fn start(store: Store, rank: usize, world_size: usize, steps: u64, every: Duration) -> Beacon {
        let first = Heartbeat {
            rank,
            world_size,
            host: hostname(),
            pid: std::process::id(),
            phase: "starting".into(),
            steps,
            ..Heartbeat::default()
        };
        let shared = CURRENT
            .get_or_init(|| {
                Arc::new(Shared { state: Mutex::new((Heartbeat::default(), true, false)), changed: Condvar::new() })
            })
            .clone();
        // A process may train more than once (`worker ablate`): each run starts afresh.
        *shared.state.lock().expect("heartbeat lock") = (first, true, false);
        let writer = shared.clone();
        let thread = std::thread::Builder::new()
            .name("heartbeat".into())
            .spawn(move || {
                loop {
                    let (beat, stop) = {
                        let mut guard = writer.state.lock().expect("heartbeat lock");
                        while !guard.1 && !guard.2 {
                            guard = writer.changed.wait(guard).expect("heartbeat lock");
                        }
                        guard.1 = false;
                        (guard.0.clone(), guard.2)
                    };
                    let bytes = serde_json::to_vec_pretty(&beat).expect("a heartbeat serializes");
                    // Losing a beat is harmless; failing the job over it is not.
                    if let Err(e) = store.blocking().put(&key(beat.rank), bytes.into()) {
                        tracing::warn!("heartbeat not written: {e}");
                    }
                    if stop {
                        return;
                    }
                    std::thread::sleep(every);
                }
            })
            .expect("spawn the heartbeat thread");
        Beacon { shared, thread: Some(thread) }
    }
}

impl Drop for Beacon {
    fn drop(&mut self) {
        self.shared.state.lock().expect("heartbeat lock").2 = true;
        self.shared.changed.notify_all();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Records progress (a no-op when no [`Beacon`] runs in this process).
pub fn update(f: impl FnOnce(&mut Heartbeat)) {
    let Some(shared) = CURRENT.get() else { return };
    let mut guard = shared.state.lock().expect("heartbeat lock");
    f(&mut guard.0);
    guard.0.seq += 1;
    guard.0.unix_ms =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    guard.1 = true;
    shared.changed.notify_all();
}

/// A heartbeat's JSON; `None` when it does not parse (being rewritten, or damaged): readers wait for the next.
pub fn parse(bytes: &[u8]) -> Option<Heartbeat> {
    serde_json::from_slice(bytes).ok()
}

/// Reads rank `rank`'s newest heartbeat (`None` when it has not written one).
pub async fn read(store: &Store, rank: usize) -> Result<Option<Heartbeat>, avexpr_data::store::StoreError> {
    match store.get(&key(rank)).await {
        Ok(bytes) => Ok(parse(&bytes)),
        Err(avexpr_data::store::StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e),
    }
}
