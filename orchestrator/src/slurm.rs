//! The Slurm target: an sbatch script asking for `--nodes` nodes with `--gpus-per-node` tasks (and GPUs) each,
//! running `mpirun` inside the allocation (Open MPI reads the allocation from Slurm), submitted with `sbatch`
//! and followed with `squeue` / `scontrol`.
//!
//! Time limits and preemption: the script asks Slurm to send SIGUSR1 to its shell `launch.slurm.signal_s`
//! seconds before the time limit (`--signal=B:USR1@...`); a preemption sends SIGTERM. The shell passes either
//! on to mpirun as SIGUSR1, which passes it on to every rank. The ranks agree to stop
//! after their step, commit its checkpoint and exit with 75 (worker/src/preempt.rs); the script then requeues
//! the job (`scontrol requeue`, allowed by `--requeue`), which resumes from that checkpoint: no step lost.
//! The environment reaches the job by name only (`--export=PATH,HOME,AWS_...`): no value is in the script.

use std::process::Command;

use anyhow::{Context, Result};

use crate::spec::{Job, Outcome};

/// The sbatch script of a launch; `name` is the job's name.
pub fn render(job: &Job, name: &str) -> String {
    let s = &job.job.launch.slurm;
    let mut lines = vec![
        "#!/bin/bash".to_string(),
        "# Rendered by `orchestrator launch --target slurm`; resubmitting it as is resumes the job.".into(),
        format!("#SBATCH --job-name={name}"),
        format!("#SBATCH --nodes={}", job.nodes),
        format!("#SBATCH --ntasks-per-node={}", job.gpus_per_node),
    ];
    if s.gpus {
        lines.push(format!("#SBATCH --gpus-per-node={}", job.gpus_per_node));
    }
    if !s.partition.is_empty() {
        lines.push(format!("#SBATCH --partition={}", s.partition));
    }
    if !s.time.is_empty() {
        lines.push(format!("#SBATCH --time={}", s.time));
    }
    lines.push("#SBATCH --requeue".into());
    // To the batch shell, which passes it on to mpirun, which passes it on to every rank.
    lines.push(format!("#SBATCH --signal=B:USR1@{}", s.signal_s));
    lines.push("#SBATCH --open-mode=append".into());
    lines.push(format!("#SBATCH --output={}/slurm-%j.out", absolute(&job.job.run_dir).display()));
    // Names only: sbatch copies their values from the submitting environment into the job's.
    let mut export = vec!["PATH".to_string(), "HOME".into(), avexpr_worker::lease::LEASE_ENV.into()];
    export.extend(avexpr_data::store::aws_environment().into_iter().map(|(name, _)| name));
    // A cluster configured outside /etc/slurm: the job's own `scontrol requeue` must find it too.
    if std::env::var_os("SLURM_CONF").is_some() {
        export.push("SLURM_CONF".into());
    }
    lines.push(format!("#SBATCH --export={}", export.join(",")));
    lines.extend(s.sbatch_args.iter().map(|a| format!("#SBATCH {a}")));
    lines.push(String::new());
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        lines.push("export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1".into());
    }
    let mut argv = job.mpirun_argv();
    argv.splice(1..1, ["-x".to_string(), avexpr_worker::lease::LEASE_ENV.to_string()]);
    argv.splice(1..1, ["-x".to_string(), avexpr_worker::preempt::MARKER_ENV.to_string()]);
    // The ranks say they stopped preempted, with their checkpoint committed, by creating this file: mpirun's exit
    // code cannot say it (it reports 1 when it ends ranks that have not exited yet).
    lines.push(format!(
        "export {}={}/preempted-\"$SLURM_JOB_ID-${{SLURM_RESTART_COUNT:-0}}\"",
        avexpr_worker::preempt::MARKER_ENV,
        shell_quote(&absolute(&job.job.run_dir).display().to_string())
    ));
    lines.push(argv.iter().map(|a| shell_quote(a)).collect::<Vec<_>>().join(" ") + " &");
    lines.push("pid=$!".into());
    lines.push(
        "# The time-limit warning (USR1) and a preemption (TERM) reach the ranks as USR1 through mpirun: they stop \
         after their step with a checkpoint."
            .into(),
    );
    lines.push("trap 'kill -USR1 \"$pid\"' USR1 TERM".into());
    lines.push("while :; do wait \"$pid\"; rc=$?; kill -0 \"$pid\" 2>/dev/null || break; done".into());
    lines.push("# The ranks were warned or preempted and committed the checkpoint of their last step: requeue.".into());
    lines.push(format!("if [ -e \"${}\" ]; then", avexpr_worker::preempt::MARKER_ENV));
    lines.push("  echo \"avexpr: the ranks stopped preempted with a checkpoint: requeueing job $SLURM_JOB_ID\"".into());
    lines.push("  scontrol requeue \"$SLURM_JOB_ID\" && exit 0".into());
    lines.push(format!(
        "  echo \"avexpr: scontrol requeue failed ($?)\"; exit {}",
        avexpr_worker::preempt::EXIT_PREEMPTED
    ));
    lines.push("fi".into());
    lines.push(format!(
        "echo \"avexpr: mpirun ended with $rc, no preemption marker (${})\"",
        avexpr_worker::preempt::MARKER_ENV
    ));
    lines.push("exit $rc".into());
    lines.join("\n") + "\n"
}

fn absolute(path: &std::path::Path) -> std::path::PathBuf {
    std::env::current_dir().map(|d| d.join(path)).unwrap_or_else(|_| path.to_path_buf())
}

fn shell_quote(arg: &str) -> String {
    if !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_./=:,@+".contains(&b)) {
        arg.to_string()
    } else {
        format!("'{}'", arg.replace('\'', "'\\''"))
    }
}

/// Fails (before anything is written) when `sbatch` cannot be run.
pub fn check_sbatch() -> Result<()> {
    match Command::new("sbatch").arg("--version").output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => anyhow::bail!("sbatch --version failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => anyhow::bail!("--target slurm needs sbatch on PATH: {e}"),
    }
}

/// Submits the script; returns the job id.
pub fn submit(script: &std::path::Path, lease: &str) -> Result<String> {
    let out = Command::new("sbatch")
        .arg("--parsable")
        .arg(script)
        .env(avexpr_worker::lease::LEASE_ENV, lease)
        .output()
        .context("--target slurm needs sbatch on PATH")?;
    anyhow::ensure!(
        out.status.success(),
        "sbatch {}: {}",
        script.display(),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    let id = String::from_utf8_lossy(&out.stdout).trim().split(';').next().unwrap_or("").to_string();
    anyhow::ensure!(!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()), "sbatch printed no job id: {id}");
    Ok(id)
}

/// Pending reasons that waiting does not resolve.
const NEVER_STARTS: [&str; 6] =
    ["PartitionNodeLimit", "PartitionConfig", "BadConstraints", "InvalidAccount", "InvalidQOS", "AssocGrp"];

/// Seconds after a requeue before the job may start again. Not 0: a node refuses a job credential created
/// within the second in which it revoked the job's previous one (the requeue's kill), and the job then ends
/// FAILED ("Killing non-startable batch JobId=N: Job credential revoked" in slurmctld's log; it happened in about
/// half the test runs when the hold was lifted with StartTime=now). Slurm's own hold exists for this reason.
pub const REQUEUE_START_S: u32 = 2;

/// One submitted Slurm job.
#[derive(Debug, Clone)]
pub struct SlurmJob {
    pub id: String,
    /// The requeue (Slurm's restart count) whose hold was last shortened.
    hold_lifted_for: std::cell::Cell<u32>,
    /// When to ask Slurm to schedule the job once its shortened hold has passed (a begin time that passes
    /// triggers nothing: the job would wait for the scheduler's next periodic pass, 30 s or more).
    nudge_at: std::cell::Cell<Option<std::time::Instant>>,
}

impl SlurmJob {
    pub fn new(id: String) -> SlurmJob {
        SlurmJob { id, hold_lifted_for: std::cell::Cell::new(0), nudge_at: std::cell::Cell::new(None) }
    }

    /// `scontrol show job`'s fields.
    fn fields(&self) -> Option<std::collections::HashMap<String, String>> {
        let out = Command::new("scontrol").args(["show", "job", "-o", &self.id]).output().ok()?;
        if !out.status.success() {
            return None;
        }
        Some(
            String::from_utf8_lossy(&out.stdout)
                .split_whitespace()
                .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
                .collect(),
        )
    }

    /// How many times Slurm requeued it.
    pub fn restarts(&self) -> u32 {
        self.fields().and_then(|f| f.get("Restarts")?.parse().ok()).unwrap_or(0)
    }

    /// The outcome once the job has ended; `None` while it is pending, running or requeued. A job pending for
    /// a reason that no wait resolves (it asks for more than its partition has, an account or QOS it may not
    /// use) is cancelled and fails with that reason.
    pub fn outcome(&self) -> Option<Outcome> {
        let fields = self.fields()?;
        let outcome = self.outcome_of(&fields)?;
        if outcome == Outcome::Succeeded || matches!(&outcome, Outcome::Failed(r) if r.contains("cannot start")) {
            return Some(outcome);
        }
        // A job that requeues itself passes through an ended state (FAILED: the script and its ranks killed by
        // their own requeue) for as long as they take to go, before it is pending again: an end is believed only
        // when it lasts.
        let brief: Vec<String> = ["JobState", "Reason", "ExitCode", "Restarts"]
            .iter()
            .map(|k| format!("{k}={}", fields.get(*k).map_or("?", String::as_str)))
            .collect();
        tracing::info!("Slurm job {} looks ended ({}); believed if that lasts 20 s", self.id, brief.join(" "));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(500));
            self.outcome_now()?;
        }
        self.outcome_now()
    }

    fn outcome_now(&self) -> Option<Outcome> {
        self.outcome_of(&self.fields()?)
    }

    fn outcome_of(&self, fields: &std::collections::HashMap<String, String>) -> Option<Outcome> {
        let state = fields.get("JobState")?.as_str();
        let reason = fields.get("Reason").map_or("", String::as_str);
        if state == "PENDING" && NEVER_STARTS.iter().any(|r| reason.starts_with(r)) {
            self.cancel();
            return Some(Outcome::Failed(format!(
                "Slurm job {} cannot start: {reason} (it asks for {} node(s); see `scontrol show job {}`)",
                self.id,
                fields.get("NumNodes").map_or("?", String::as_str),
                self.id
            )));
        }
        let exit = fields.get("ExitCode").cloned().unwrap_or_default();
        match state {
            "COMPLETED" => Some(Outcome::Succeeded),
            "PENDING" | "RUNNING" | "CONFIGURING" | "COMPLETING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
            | "RESIZING" | "SUSPENDED" | "STOPPED" | "SIGNALING" => None,
            _ if exit.starts_with(&format!("{}:", avexpr_worker::preempt::EXIT_PREEMPTED)) => Some(Outcome::Preempted),
            other => Some(Outcome::Failed(format!("Slurm job {} ended {other} (exit code {exit})", self.id))),
        }
    }

    /// Waiting for resources (pending, or requeued and pending): no heartbeat is due. Slurm holds a requeued
    /// job back for two minutes (its BeginTime); ours requeue only with their checkpoint committed, so the hold
    /// is shortened to [`REQUEUE_START_S`], once per requeue.
    pub fn waiting(&self) -> bool {
        let Some(fields) = self.fields() else { return false };
        let state = fields.get("JobState").map_or("", String::as_str);
        let restarts: u32 = fields.get("Restarts").and_then(|r| r.parse().ok()).unwrap_or(0);
        if state == "PENDING"
            && restarts > self.hold_lifted_for.get()
            && fields.get("Reason").is_some_and(|r| r == "BeginTime")
        {
            let start = format!("StartTime=now+{REQUEUE_START_S}");
            let _ = Command::new("scontrol").args(["update", &format!("JobId={}", self.id), &start]).status();
            self.hold_lifted_for.set(restarts);
            let after = std::time::Duration::from_millis(REQUEUE_START_S as u64 * 1000 + 500);
            self.nudge_at.set(Some(std::time::Instant::now() + after));
        } else if state == "PENDING" && self.nudge_at.get().is_some_and(|t| std::time::Instant::now() >= t) {
            // An update is an event the scheduler acts on at once.
            let _ = Command::new("scontrol").args(["update", &format!("JobId={}", self.id), "StartTime=now"]).status();
            self.nudge_at.set(None);
        }
        matches!(state, "PENDING" | "REQUEUED" | "CONFIGURING")
    }

    /// Asks the ranks to stop after their step with a checkpoint, without requeueing: the job is made
    /// non-requeueable first, so the script's requeue fails and the job ends with the ranks' 75.
    pub fn interrupt(&self) {
        let _ = Command::new("scontrol").args(["update", &format!("JobId={}", self.id), "Requeue=0"]).status();
        let _ = Command::new("scancel").args(["--batch", "--signal=USR1", &self.id]).status();
    }

    pub fn cancel(&self) {
        let status = Command::new("scancel").arg(&self.id).status();
        if !matches!(status, Ok(s) if s.success()) {
            tracing::warn!("scancel {} failed: {status:?}", self.id);
        }
    }
}
