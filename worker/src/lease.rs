//! One writer per checkpoint store. Two jobs on one store would prune each other's checkpoints and delete each
//! other's heartbeats; so whoever writes a store holds its lease, `lease.json`: created only if absent, renewed
//! by a background thread, checked before every checkpoint commit, released at the end.
//!
//! - `orchestrator launch` holds it for the whole launch (every attempt) and names it to its ranks
//!   (`AVEXPR_LEASE`); their rank 0 joins it. A bare `worker train` (rank 0) holds its own.
//! - A lease not renewed for its TTL, or held by a process of this host that no longer exists, is stale and is
//!   taken over (with a warning). A holder asked to stop by a signal says so in the lease (`ending`) and gets
//!   a few seconds to release it (it may still be committing, or be torn down by an aborting peer). Anything
//!   else is refused at once, naming the holder.
//! - Creation is `PutMode::Create` (O_EXCL-like locally, `If-None-Match: *` on S3). Garage ignores that
//!   condition and overwrites, so every acquisition reads the lease back after writing it, and every commit
//!   checks it: two jobs racing for a free lease on Garage can both write it, but only the one whose write
//!   landed last reads itself back; the other stops before its first commit.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use avexpr_data::store::{Store, StoreError};
use serde::{Deserialize, Serialize};

pub const LEASE_KEY: &str = "lease.json";
/// The lease id an orchestrator gives its ranks.
pub const LEASE_ENV: &str = "AVEXPR_LEASE";
/// How long a new holder waits for a holder that says it is ending before refusing.
const ENDING_GRACE: Duration = Duration::from_secs(15);

/// Who holds a lease, as `lease.json` says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Holder {
    pub id: String,
    pub what: String,
    pub host: String,
    pub pid: u32,
    pub renewed_unix_s: f64,
    pub ttl_s: f64,
    /// The holder is stopping (asked to by a signal: a preemption, an interrupted launch, a peer's abort) and
    /// will release the lease within seconds: a new job waits for it instead of being refused.
    #[serde(default)]
    pub ending: bool,
}

impl Holder {
    fn age_s(&self) -> f64 {
        now_unix_s() - self.renewed_unix_s
    }

    /// Not renewed within its TTL, or a process of this host that is gone.
    fn is_stale(&self) -> bool {
        self.age_s() > self.ttl_s || self.host == crate::heartbeat::hostname() && !process_lives(self.pid)
    }
}

/// Whether process `pid` of this machine runs: it exists and is not a zombie (a killed rank whose parent died
/// stays one until init reaps it, and holds nothing).
fn process_lives(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return false };
    // `pid (comm) state ...`: the state follows the last ')'.
    let state = stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z" | "X") | None)
}

#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error(
        "checkpoint store {uri} is in use by {} on {} (pid {}), renewed {:.0} s ago: one job writes a store at a \
         time. Stop that job, or use another checkpoint.uri; if it is gone, its lease expires in {:.0} s",
        holder.what, holder.host, holder.pid, holder.age_s(), (holder.ttl_s - holder.age_s()).max(0.0)
    )]
    Held { uri: String, holder: Holder },
    #[error(
        "checkpoint store {uri}: the lease is now held by {} on {} (pid {}): another job writes this store, so \
         this one stops before committing",
        holder.what, holder.host, holder.pid
    )]
    Lost { uri: String, holder: Holder },
    #[error("checkpoint store {uri}: no lease `{id}` (the orchestrator that started this rank holds none there)")]
    Missing { uri: String, id: String },
    #[error("checkpoint store {uri}: {LEASE_KEY} is not a lease: {reason}")]
    Malformed { uri: String, reason: String },
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A held (or joined) lease; renewed in the background while it lives, released when dropped (if acquired).
pub struct Lease {
    store: Store,
    id: String,
    owned: bool,
    stop: Arc<AtomicBool>,
    renewer: Option<std::thread::JoinHandle<()>>,
}

fn now_unix_s() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
}

fn read(store: &Store) -> Result<Option<Holder>, LeaseError> {
    match store.blocking().get(LEASE_KEY) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| LeaseError::Malformed { uri: store.uri().to_string(), reason: e.to_string() }),
        Err(StoreError::NotFound { .. }) => Ok(None),
        Err(e) => Err(e.into()),
    }
}

impl Lease {
    /// Takes the store's lease for `what`, renewed every `ttl / 10`; a stale one is taken over.
    pub fn acquire(store: &Store, what: &str, ttl: Duration) -> Result<Lease, LeaseError> {
        Self::acquire_ending_on(store, what, ttl, Arc::new(AtomicBool::new(false)))
    }

    /// [`Lease::acquire`], saying in the lease that its holder is ending as soon as `ending` is set (a signal
    /// asked it to stop), so that a job started meanwhile waits for the lease instead of being refused.
    pub fn acquire_ending_on(
        store: &Store,
        what: &str,
        ttl: Duration,
        ending: Arc<AtomicBool>,
    ) -> Result<Lease, LeaseError> {
        let host = crate::heartbeat::hostname();
        let pid = std::process::id();
        // Unique even for two acquisitions of one process in the same microsecond.
        static ACQUISITIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = ACQUISITIONS.fetch_add(1, Ordering::Relaxed);
        let id = format!("{host}:{pid}:{:.6}:{n}", now_unix_s());
        let what = what.to_string();
        let is_ending = ending.clone();
        let me = move |id: &str| Holder {
            id: id.to_string(),
            what: what.clone(),
            host: host.clone(),
            pid,
            renewed_unix_s: now_unix_s(),
            ttl_s: ttl.as_secs_f64(),
            ending: is_ending.load(Ordering::SeqCst),
        };
        let mut waited = false;
        for _ in 0..4 {
            let bytes = serde_json::to_vec_pretty(&me(&id)).expect("a holder serializes");
            if store.blocking().put_if_absent(LEASE_KEY, bytes.into())? {
                match read(store)? {
                    Some(h) if h.id == id => return Ok(Self::start(store, id, ttl, ending, me.clone())),
                    Some(holder) => return Err(LeaseError::Held { uri: store.uri().to_string(), holder }),
                    None => continue,
                }
            }
            match read(store)? {
                // A holder that says it is ending (a run stopped a moment ago whose rank 0 still commits, or
                // one torn down by an aborting peer): given a few seconds to go before being refused.
                Some(holder) if holder.ending && !holder.is_stale() && !waited => {
                    tracing::info!(
                        "{}: the lease is held by {} on {} (pid {}), which is ending; waiting up to {:.0} s for it",
                        store.uri(),
                        holder.what,
                        holder.host,
                        holder.pid,
                        ENDING_GRACE.as_secs_f64()
                    );
                    let start = std::time::Instant::now();
                    while start.elapsed() < ENDING_GRACE
                        && read(store)?.is_some_and(|h| h.id == holder.id && !h.is_stale())
                    {
                        std::thread::sleep(Duration::from_millis(200));
                    }
                    waited = true;
                }
                Some(holder) if holder.is_stale() => {
                    tracing::warn!(
                        holder = %holder.id,
                        age_s = holder.age_s(),
                        "{}: taking over a stale lease ({} on {}, pid {})",
                        store.uri(),
                        holder.what,
                        holder.host,
                        holder.pid
                    );
                    store.blocking().delete(LEASE_KEY)?;
                }
                Some(holder) => return Err(LeaseError::Held { uri: store.uri().to_string(), holder }),
                None => {}
            }
        }
        match read(store)? {
            Some(holder) => Err(LeaseError::Held { uri: store.uri().to_string(), holder }),
            None => Err(LeaseError::Missing { uri: store.uri().to_string(), id }),
        }
    }

    /// Joins the lease `id` that the process which started this one holds (checked now and before commits;
    /// renewed and released by its holder).
    pub fn join(store: &Store, id: &str) -> Result<Lease, LeaseError> {
        let lease =
            Lease { store: store.clone(), id: id.to_string(), owned: false, stop: Default::default(), renewer: None };
        lease.check()?;
        Ok(lease)
    }

    /// The held lease, renewed every `ttl / 10` until dropped.
    fn start(
        store: &Store,
        id: String,
        ttl: Duration,
        ending: Arc<AtomicBool>,
        me: impl Fn(&str) -> Holder + Send + 'static,
    ) -> Lease {
        let stop = Arc::new(AtomicBool::new(false));
        let (s, i, flag) = (store.clone(), id.clone(), stop.clone());
        let renewer = std::thread::Builder::new()
            .name("lease".into())
            .spawn(move || {
                let every = ttl / 10;
                let mut since = std::time::Instant::now();
                let mut said_ending = false;
                while !flag.load(Ordering::SeqCst) {
                    std::thread::sleep(Duration::from_millis(100).min(every));
                    // Renewed at once when the holder starts ending, so that the lease says so.
                    let newly_ending = !said_ending && ending.load(Ordering::SeqCst);
                    if since.elapsed() < every && !newly_ending {
                        continue;
                    }
                    said_ending |= newly_ending;
                    since = std::time::Instant::now();
                    // Renewed only while still ours; a lost lease is found by the next check.
                    match read(&s) {
                        Ok(Some(h)) if h.id == i => {
                            let bytes = serde_json::to_vec_pretty(&me(&i)).expect("a holder serializes");
                            if let Err(e) = s.blocking().put(LEASE_KEY, bytes.into()) {
                                tracing::warn!("{}: renewing the lease: {e}", s.uri());
                            }
                        }
                        Ok(_) => return,
                        Err(e) => tracing::warn!("{}: reading the lease: {e}", s.uri()),
                    }
                }
            })
            .expect("spawning the lease thread");
        Lease { store: store.clone(), id, owned: true, stop, renewer: Some(renewer) }
    }

    /// The id to give the processes this one starts ([`LEASE_ENV`]).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Whether this job still holds the lease (before a commit).
    pub fn check(&self) -> Result<(), LeaseError> {
        match read(&self.store)? {
            Some(h) if h.id == self.id => Ok(()),
            Some(holder) => Err(LeaseError::Lost { uri: self.store.uri().to_string(), holder }),
            None => Err(LeaseError::Missing { uri: self.store.uri().to_string(), id: self.id.clone() }),
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(renewer) = self.renewer.take() {
            let _ = renewer.join();
        }
        if self.owned && self.check().is_ok() {
            let _ = self.store.blocking().delete(LEASE_KEY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(host: &str, pid: u32, age_s: f64, ttl_s: f64) -> Holder {
        Holder {
            id: format!("{host}:{pid}:test"),
            what: "another job".into(),
            host: host.into(),
            pid,
            renewed_unix_s: now_unix_s() - age_s,
            ttl_s,
            ending: false,
        }
    }

    fn store_held_by(h: &Holder) -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().display().to_string()).unwrap();
        store.blocking().put(LEASE_KEY, serde_json::to_vec(h).unwrap().into()).unwrap();
        (dir, store)
    }

    /// A zombie (killed, not yet reaped: what a rank of a SIGKILLed mpirun is until init reaps it) holds
    /// nothing; before, its /proc entry made its lease look held.
    #[test]
    fn a_zombie_does_not_hold_a_lease() {
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap()
            .rsplit_once(')')
            .unwrap()
            .1
            .trim_start()
            .starts_with('R')
        {
            std::thread::sleep(Duration::from_millis(10));
        }
        std::thread::sleep(Duration::from_millis(100));
        assert!(std::path::Path::new(&format!("/proc/{pid}")).exists(), "a zombie until waited for");
        assert!(!process_lives(pid));
        let (_d, store) = store_held_by(&holder(&crate::heartbeat::hostname(), pid, 1.0, 30.0));
        Lease::acquire(&store, "test", Duration::from_secs(30)).unwrap().check().unwrap();
        child.wait().unwrap();
        assert!(process_lives(std::process::id()));
    }

    #[test]
    fn a_live_holder_elsewhere_is_refused_a_stale_or_dead_one_taken_over() {
        let ttl = Duration::from_secs(30);
        let (_d, store) = store_held_by(&holder("another-host", 1, 1.0, 30.0));
        let err = Lease::acquire(&store, "test", ttl).err().expect("refused");
        assert!(err.to_string().contains("is in use by another job on another-host"), "{err}");
        // Not renewed within its TTL.
        let (_d, store) = store_held_by(&holder("another-host", 1, 31.0, 30.0));
        let lease = Lease::acquire(&store, "test", ttl).unwrap();
        lease.check().unwrap();
        // A process of this machine that is gone.
        let mut gone = std::process::Command::new("true").spawn().unwrap();
        gone.wait().unwrap();
        let (_d, store) = store_held_by(&holder(&crate::heartbeat::hostname(), gone.id(), 1.0, 30.0));
        Lease::acquire(&store, "test", ttl).unwrap().check().unwrap();
    }

    /// A holder that says it is ending (stopped by a signal, committing its last checkpoint or being torn down)
    /// is waited for; one that does not is refused at once. Before, a run started right after an aborted one met
    /// its rank 0 still holding the lease and was refused.
    #[test]
    fn a_holder_that_says_it_is_ending_is_waited_for() {
        let mut ending = std::process::Command::new("sleep").arg("1").spawn().unwrap();
        let here = crate::heartbeat::hostname();
        let (_d, store) = store_held_by(&Holder { ending: true, ..holder(&here, ending.id(), 1.0, 30.0) });
        let reaper = std::thread::spawn(move || ending.wait());
        let start = std::time::Instant::now();
        let lease = Lease::acquire(&store, "test", Duration::from_secs(30)).unwrap();
        assert!(start.elapsed() >= Duration::from_millis(500), "taken while its holder lived");
        lease.check().unwrap();
        reaper.join().unwrap().unwrap();

        let mut running = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let (_d, store) = store_held_by(&holder(&here, running.id(), 1.0, 30.0));
        let start = std::time::Instant::now();
        assert!(Lease::acquire(&store, "test", Duration::from_secs(30)).is_err());
        assert!(start.elapsed() < Duration::from_secs(2), "a running holder is refused at once");
        running.kill().unwrap();
        running.wait().unwrap();
    }

    /// The holder's lease says `ending` within moments of its flag being set.
    #[test]
    fn a_lease_says_when_its_holder_is_ending() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().display().to_string()).unwrap();
        let flag = Arc::new(AtomicBool::new(false));
        let lease = Lease::acquire_ending_on(&store, "test", Duration::from_secs(30), flag.clone()).unwrap();
        assert!(!read(&store).unwrap().unwrap().ending);
        flag.store(true, Ordering::SeqCst);
        std::thread::sleep(Duration::from_millis(600));
        assert!(read(&store).unwrap().unwrap().ending);
        drop(lease);
        assert!(read(&store).unwrap().is_none(), "released");
    }
}
