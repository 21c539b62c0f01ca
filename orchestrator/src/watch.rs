//! Following a job to its end: start an attempt, watch every rank's heartbeat (progress bar from rank 0's),
//! and when the attempt fails (a rank died, mpirun exited non-zero) or hangs (a heartbeat that stopped
//! advancing for `launch.heartbeat_timeout_s`), stop it and start the next with `--resume auto`, up to
//! `launch.max_restarts` times. Resuming continues from the last committed checkpoint with the loader cursors
//! it holds, so no sample is lost or repeated; the steps after that checkpoint are redone and counted.
//! The run's record (`orchestrator.json` in the checkpoint store) is what `orchestrator status` shows.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use avexpr_data::store::Store;
use avexpr_worker::heartbeat::{self, Heartbeat};
use serde::{Deserialize, Serialize};
use signal_hook::consts::{SIGINT, SIGTERM};

use crate::launch::Attempt;
use crate::spec::{Job, Outcome};

pub const RECORD_KEY: &str = "orchestrator.json";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AttemptRecord {
    pub number: u32,
    /// The checkpoint step it resumed from (0: from scratch), when its ranks got that far.
    pub resumed_from: Option<u64>,
    /// The highest step its heartbeats reported.
    pub reached_step: u64,
    /// `succeeded`, or why it was stopped.
    pub outcome: String,
    /// Its mpirun output (local and hostfile targets).
    pub log: Option<PathBuf>,
    /// Its ranks (fewer than the launch's when hosts were unreachable and `--min-nodes` allowed it).
    #[serde(default)]
    pub world_size: usize,
    /// After a failed or preempted attempt: seconds from the failure's detection to this attempt's first new
    /// optimizer step (relaunch, start-up, restore, the step itself).
    #[serde(default)]
    pub restart_s: Option<f64>,
}

/// An attempt as started: what to follow, where its output goes, how many ranks it has.
pub struct Started {
    pub attempt: Attempt,
    pub log: Option<PathBuf>,
    pub world: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    pub config: PathBuf,
    pub target: String,
    pub world_size: usize,
    /// `running`, `succeeded`, `failed`.
    pub status: String,
    pub restarts: u32,
    /// Attempts that ended preempted with their checkpoint committed (relaunched; not counted as restarts).
    #[serde(default)]
    pub preemptions: u32,
    /// Steps trained again after restarts (the last heartbeat's step minus the step resumed from).
    pub steps_redone: u64,
    pub attempts: Vec<AttemptRecord>,
}

pub struct Watcher {
    store: Store,
    world: usize,
    steps: u64,
    timeout: Duration,
    /// How often the heartbeats are read: as often as ranks write them (within 0.3-5 s).
    poll: Duration,
    host: String,
}

impl Watcher {
    pub fn new(job: &Job) -> Result<Watcher> {
        Ok(Watcher {
            store: Store::open(&job.job.checkpoint.uri).context("checkpoint.uri")?,
            world: job.world_size(),
            steps: job.job.train.steps,
            timeout: Duration::from_secs_f64(job.job.launch.heartbeat_timeout_s),
            poll: Duration::from_secs_f64(job.job.launch.heartbeat_every_s.clamp(0.3, 5.0)),
            host: heartbeat::hostname(),
        })
    }

    pub fn save(&self, record: &RunRecord) -> Result<()> {
        let bytes = serde_json::to_vec_pretty(record)?;
        self.store.blocking().put(RECORD_KEY, bytes.into()).context("writing orchestrator.json")?;
        Ok(())
    }

    /// The newest heartbeat of each of `world` ranks, read concurrently (hundreds of ranks on S3 must not take a
    /// second each).
    fn beats(&self, world: usize) -> Vec<Option<Heartbeat>> {
        avexpr_data::store::block_on(async {
            let mut reads = tokio::task::JoinSet::new();
            for r in 0..world {
                let store = self.store.clone();
                reads.spawn(async move { (r, heartbeat::read(&store, r).await.ok().flatten()) });
            }
            let mut beats = vec![None; world];
            while let Some(Ok((r, beat))) = reads.join_next().await {
                beats[r] = beat;
            }
            beats
        })
    }

    /// Whether the checkpoint of `step` is committed.
    fn committed(&self, step: u64) -> bool {
        let name = avexpr_worker::checkpoint::checkpoint_name(step);
        self.store.blocking().exists(&format!("{name}/{}", avexpr_worker::checkpoint::COMMIT)).unwrap_or(false)
    }

    fn clear_beats(&self) {
        for r in 0..self.world {
            let _ = self.store.blocking().delete(&heartbeat::key(r));
        }
    }

    /// The ranks known (from heartbeats) to run on this machine.
    fn local_pids(&self, beats: &[Option<Heartbeat>]) -> Vec<u32> {
        beats.iter().flatten().filter(|b| b.host == self.host && is_worker(b.pid)).map(|b| b.pid).collect()
    }

    /// Runs attempts until one succeeds or `max_restarts` relaunches have failed too.
    pub fn run(&self, job: &Job, record: &mut RunRecord, mut start: impl FnMut(u32) -> Result<Started>) -> Result<()> {
        let max_restarts = job.job.launch.max_restarts;
        let show_bar = std::io::stderr().is_terminal();
        let bar = indicatif::ProgressBar::new(self.steps);
        if show_bar {
            bar.set_style(
                indicatif::ProgressStyle::with_template("{bar:40} step {pos}/{len} {msg}").expect("a valid template"),
            );
        } else {
            bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
        }
        // SIGINT (Ctrl-C) or SIGTERM: the job is stopped with a checkpoint, not left running; a second one ends
        // this process at once (mpirun follows it: it is told when its parent dies).
        let stop = Arc::new(AtomicBool::new(false));
        for signal in [SIGINT, SIGTERM] {
            signal_hook::flag::register_conditional_shutdown(signal, 130, stop.clone())?;
            signal_hook::flag::register(signal, stop.clone())?;
        }
        let mut previous_reached: Option<u64> = None;
        // When the previous attempt's failure (or preemption) was detected.
        let mut failed_at: Option<Instant> = None;
        // The rank-0 process that stopped then, when the job continues in place (a Slurm requeue).
        let mut failed_pid: Option<u32> = None;
        for number in 0.. {
            // Every rank's of the largest world: a smaller attempt must not read a bigger one's leftovers.
            self.clear_beats();
            let Started { mut attempt, log, world } = start(number)?;
            tracing::info!(attempt = number, "started {world} rank(s)");
            let launched = Instant::now();
            let mut seen: Vec<Option<(u32, u64)>> = vec![None; world];
            let mut changed = vec![launched; world];
            let mut last_report = launched;
            let mut this = AttemptRecord { number, log: log.clone(), world_size: world, ..AttemptRecord::default() };
            let mut beats: Vec<Option<Heartbeat>>;
            let mut interrupted: Option<Instant> = None;
            let outcome = loop {
                std::thread::sleep(self.poll);
                if stop.load(Ordering::SeqCst) && interrupted.is_none() {
                    tracing::warn!(
                        "interrupted: asking the ranks to stop after their current step with a checkpoint \
                         (again to stop at once)"
                    );
                    attempt.interrupt();
                    interrupted = Some(Instant::now());
                }
                let finished = attempt.poll();
                beats = self.beats(world);
                let now = Instant::now();
                for (r, beat) in beats.iter().enumerate() {
                    let Some(b) = beat else { continue };
                    if seen[r] != Some((b.pid, b.seq)) {
                        seen[r] = Some((b.pid, b.seq));
                        changed[r] = now;
                    }
                    this.reached_step = this.reached_step.max(b.step);
                    if b.seq >= 1 && this.resumed_from.is_none() {
                        this.resumed_from = Some(b.resumed_from);
                        if let Some(prev) = previous_reached {
                            record.steps_redone += prev.saturating_sub(b.resumed_from);
                        }
                    }
                }
                if attempt.waiting() {
                    // Pending or requeued: no rank runs, none can beat.
                    changed.iter_mut().for_each(|t| *t = now);
                }
                if let Some(Some(b)) = beats.first() {
                    if b.phase == "preempted" && failed_pid != Some(b.pid) && failed_at.is_none() {
                        // Stopped for a requeue by the scheduler: the job continues in place.
                        failed_at = Some(now);
                        failed_pid = Some(b.pid);
                    }
                    if let Some(t) = failed_at
                        && b.seq >= 1
                        && b.step > b.resumed_from
                        && failed_pid != Some(b.pid)
                    {
                        let seconds = t.elapsed().as_secs_f64();
                        tracing::info!(
                            attempt = number,
                            "restarted: {seconds:.1} s from the failure's detection to a new step"
                        );
                        this.restart_s = Some(seconds);
                        failed_at = None;
                        failed_pid = None;
                    }
                    bar.set_position(b.step);
                    let msg = progress_message(b);
                    if !show_bar && now.duration_since(last_report) >= Duration::from_secs(15) {
                        tracing::info!("step {}/{} {msg}", b.step, b.steps);
                        last_report = now;
                    }
                    bar.set_message(msg);
                }
                if let Some(outcome) = finished {
                    break outcome;
                }
                if let Some(since) = interrupted
                    && since.elapsed() > self.timeout
                {
                    break Outcome::Failed(format!(
                        "interrupted, and the ranks did not stop within {:.0} s (launch.heartbeat_timeout_s)",
                        self.timeout.as_secs_f64()
                    ));
                }
                // A rank that finished waits for the others without beating.
                let done = |r: usize| beats[r].as_ref().is_some_and(|b| b.phase == "done");
                if let Some((r, idle)) = changed
                    .iter()
                    .enumerate()
                    .filter(|(r, _)| !done(*r))
                    .map(|(r, t)| (r, now.duration_since(*t)))
                    .max_by_key(|(_, d)| *d)
                    && idle > self.timeout
                {
                    let who = match &beats[r] {
                        Some(b) => format!("rank {r} (host {}, pid {}, {} at step {})", b.host, b.pid, b.phase, b.step),
                        None => format!("rank {r} (no heartbeat yet)"),
                    };
                    break Outcome::Failed(format!(
                        "{who} made no progress for {:.0} s (launch.heartbeat_timeout_s)",
                        idle.as_secs_f64()
                    ));
                }
            };
            // A launcher that reports only "failed" (an MPIJob's status carries no exit code) for ranks that all
            // stopped preempted with that step's checkpoint committed: a preemption, as the exit code says locally.
            let outcome = match outcome {
                Outcome::Failed(reason) => match preempted_at(&beats).filter(|step| self.committed(*step)) {
                    Some(step) => {
                        tracing::info!(
                            step,
                            "{reason}; every rank's heartbeat says it stopped preempted, checkpoint committed"
                        );
                        Outcome::Preempted
                    }
                    None => Outcome::Failed(reason),
                },
                other => other,
            };
            let requeues = attempt.requeues();
            if requeues > 0 {
                tracing::info!(
                    attempt = number,
                    "the scheduler requeued the job {requeues} time(s); it resumed each time"
                );
                record.preemptions += requeues;
            }
            match outcome {
                Outcome::Succeeded => {
                    bar.finish_and_clear();
                    this.outcome = "succeeded".into();
                    record.attempts.push(this);
                    record.status = "succeeded".into();
                    self.save(record)?;
                    return Ok(());
                }
                Outcome::Preempted if interrupted.is_some() => {
                    bar.abandon();
                    this.outcome = "stopped (interrupted) with a checkpoint".into();
                    record.attempts.push(this);
                    record.status = "stopped".into();
                    self.save(record)?;
                    anyhow::bail!(
                        "stopped: every rank committed the checkpoint of its last step; `orchestrator launch` with \
                         the same config continues from it"
                    );
                }
                _ if interrupted.is_some() => {
                    let pids = self.local_pids(&beats);
                    attempt.stop(&pids);
                    bar.abandon();
                    this.outcome = "stopped (interrupted)".into();
                    record.attempts.push(this);
                    record.status = "stopped".into();
                    self.save(record)?;
                    anyhow::bail!("stopped: the job's ranks are stopped; a launch continues from the last checkpoint");
                }
                Outcome::Preempted => {
                    // Every rank committed the checkpoint of its last step and exited: nothing to stop, no step
                    // lost, and not a failure of the job.
                    tracing::warn!(
                        attempt = number,
                        step = this.reached_step,
                        "preempted: the ranks committed a checkpoint and stopped; relaunching from it (not counted \
                         against launch.max_restarts)"
                    );
                    this.outcome = "preempted".into();
                    failed_at = Some(Instant::now());
                    previous_reached = Some(this.reached_step.max(previous_reached.unwrap_or(0)));
                    record.attempts.push(this);
                    record.preemptions += 1;
                    self.save(record)?;
                }
                Outcome::Unschedulable(reason) => {
                    // Nothing of it ran: not a failure, and no rank to wait for.
                    attempt.stop(&[]);
                    tracing::warn!(attempt = number, "{reason}");
                    this.outcome = format!("unschedulable: {reason}");
                    failed_at = Some(Instant::now());
                    previous_reached = Some(this.reached_step.max(previous_reached.unwrap_or(0)));
                    record.attempts.push(this);
                    self.save(record)?;
                }
                Outcome::Failed(reason) => {
                    failed_at = Some(Instant::now());
                    let pids = self.local_pids(&beats);
                    attempt.stop(&pids);
                    tracing::warn!(attempt = number, "{reason}");
                    if let Some(log) = &log {
                        tracing::warn!("its output: {}", log.display());
                    }
                    this.outcome = reason.clone();
                    previous_reached = Some(this.reached_step.max(previous_reached.unwrap_or(0)));
                    record.attempts.push(this);
                    if record.restarts >= max_restarts {
                        bar.abandon();
                        record.status = "failed".into();
                        self.save(record)?;
                        anyhow::bail!(
                            "the job failed {} time(s), launch.max_restarts ({max_restarts}) reached; last: {reason}",
                            record.attempts.len()
                        );
                    }
                    record.restarts += 1;
                    self.save(record)?;
                    tracing::warn!(
                        "restarting from the last checkpoint with --resume auto (restart {} of at most {max_restarts})",
                        record.restarts
                    );
                }
            }
        }
        unreachable!("the attempt loop returns")
    }
}

/// The step at which every rank stopped preempted (each one's last heartbeat says `preempted` at that same step),
/// if they all did.
fn preempted_at(beats: &[Option<Heartbeat>]) -> Option<u64> {
    let step = beats.first()?.as_ref()?.step;
    beats.iter().all(|b| b.as_ref().is_some_and(|b| b.phase == "preempted" && b.step == step)).then_some(step)
}

fn progress_message(b: &Heartbeat) -> String {
    let mut msg = String::new();
    if let Some(loss) = b.loss {
        msg += &format!("loss {loss:.4} ");
    }
    if let Some(f1) = b.val_macro_f1 {
        msg += &format!("val F1 {f1:.4} ");
    }
    if let Some(rate) = b.clips_per_s {
        msg += &format!("{rate:.1} clips/s ");
    }
    if let Some(eta) = b.eta_s {
        msg += &format!("ETA {eta:.0} s ");
    }
    msg += &b.phase;
    msg
}

/// Whether `pid` is (still) one of our worker processes, not a reused pid.
fn is_worker(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|&b| b == 0).next().is_some_and(|exe| exe.ends_with(b"worker")))
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn beat(phase: &str, step: u64) -> Option<Heartbeat> {
        Some(Heartbeat { phase: phase.into(), step, ..Heartbeat::default() })
    }

    #[test]
    fn a_preemption_is_every_rank_stopped_preempted_at_one_step() {
        assert_eq!(preempted_at(&[beat("preempted", 30), beat("preempted", 30)]), Some(30));
        // One rank still training, at another step, or silent: a failure, not a preemption.
        assert_eq!(preempted_at(&[beat("preempted", 30), beat("training", 30)]), None);
        assert_eq!(preempted_at(&[beat("preempted", 30), beat("preempted", 31)]), None);
        assert_eq!(preempted_at(&[beat("preempted", 30), None]), None);
        assert_eq!(preempted_at(&[]), None);
    }
}
