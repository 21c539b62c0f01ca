//! Starting and stopping one attempt of a job ([`crate::spec::Job`]): `mpirun` on this machine (local), across
//! the hosts of a hostfile, or a Kubernetes MPIJob applied with `kubectl`. [`crate::watch`] drives the attempts.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use avexpr_worker::lease::LEASE_ENV;
use avexpr_worker::preempt::EXIT_PREEMPTED;

use crate::spec::{Job, Outcome};

/// Checks a hostfile before anything starts: readable, and at least `nodes` hosts listed.
pub fn check_hostfile(file: &Path, nodes: usize) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(file).with_context(|| format!("--hostfile {}", file.display()))?;
    let hosts: Vec<String> = text
        .lines()
        .map(|l| l.split('#').next().unwrap_or("").trim())
        .filter(|l| !l.is_empty())
        .map(|l| l.split_whitespace().next().unwrap_or("").to_string())
        .collect();
    anyhow::ensure!(
        hosts.len() >= nodes,
        "--hostfile {}: lists {} host(s), --nodes asks for {nodes}",
        file.display(),
        hosts.len()
    );
    Ok(hosts)
}

/// Whether `host` can start processes: the command mpirun starts its daemons with (`plm_rsh_agent` from
/// `launch.mpirun_args`, else ssh) runs `true` there within 15 s.
fn reachable(host: &str, mpirun_args: &[String]) -> bool {
    let agent = mpirun_args.windows(2).find(|w| w[0] == "plm_rsh_agent").map(|w| w[1].clone());
    let mut cmd = match &agent {
        Some(agent) => {
            let mut parts = agent.split_whitespace();
            let mut c = Command::new(parts.next().unwrap_or("ssh"));
            c.args(parts);
            c
        }
        None => {
            let mut c = Command::new("ssh");
            c.args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=10"]);
            c
        }
    };
    let Ok(mut child) =
        cmd.arg(host).arg("true").stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::null()).spawn()
    else {
        return false;
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        match child.try_wait() {
            Ok(Some(status)) => return status.success(),
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(50))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return false;
            }
        }
    }
}

/// The most nodes an elastic launch can run on when `available` can take its ranks: at most `--nodes`, at
/// least `min_nodes`, and a number whose ranks divide the job's data slots (so the global batch stays the same,
/// each rank accumulating more). `None` when no such number is available.
pub fn fitting_nodes(job: &Job, min_nodes: usize, available: usize) -> Option<usize> {
    let slots = job.job.slots();
    (min_nodes.max(1)..=available.min(job.nodes)).rev().find(|n| slots.is_multiple_of(n * job.gpus_per_node))
}

/// The shape of attempt `number` of an elastic hostfile launch (`--min-nodes`): the hosts of `hostfile` that
/// are reachable now, as many as the launch asks for and at least `min_nodes`, and a number of them whose ranks
/// divide the job's data slots (the global batch stays the same; each rank accumulates more). Hosts come back
/// at the next attempt when they answer again. Writes the attempt's hostfile into the run folder.
pub fn elastic_job(job: &Job, hostfile: &Path, min_nodes: usize, number: u32) -> Result<Job> {
    let text = std::fs::read_to_string(hostfile).with_context(|| format!("--hostfile {}", hostfile.display()))?;
    let lines: Vec<&str> = text.lines().filter(|l| !l.split('#').next().unwrap_or("").trim().is_empty()).collect();
    let host = |l: &str| l.split_whitespace().next().unwrap_or("").to_string();
    let (up, down): (Vec<&str>, Vec<&str>) =
        lines.iter().partition(|l| reachable(&host(l), &job.job.launch.mpirun_args));
    let slots = job.job.slots();
    let nodes = fitting_nodes(job, min_nodes, up.len()).with_context(|| {
        format!(
            "--hostfile {}: {} of {} host(s) reachable (unreachable: {}); --min-nodes {min_nodes} with {} rank(s) \
                 per node needs a number of hosts whose ranks divide the job's {slots} data slots",
            hostfile.display(),
            up.len(),
            job.nodes,
            down.iter().map(|l| host(l)).collect::<Vec<_>>().join(", "),
            job.gpus_per_node
        )
    })?;
    if nodes < job.nodes {
        tracing::warn!(
            attempt = number,
            "running on {nodes} of {} host(s) (unreachable: {}); the global batch stays {}: each rank accumulates \
             {} micro-batch(es)",
            job.nodes,
            down.iter().map(|l| host(l)).collect::<Vec<_>>().join(", "),
            job.job.train.global_batch,
            slots / (nodes * job.gpus_per_node)
        );
    }
    let file = job.job.run_dir.join(format!("hostfile-attempt-{number}"));
    std::fs::write(&file, up[..nodes].join("\n") + "\n").with_context(|| file.display().to_string())?;
    Ok(Job { nodes, target: crate::spec::Target::Hostfile(file), ..job.clone() })
}

/// One running attempt.
pub enum Attempt {
    /// mpirun, in its own process group.
    Mpirun { child: Child },
    /// An applied MPIJob, followed through its conditions and its worker pods.
    K8s(crate::k8s::K8sAttempt),
    /// A submitted Slurm job (it may requeue itself after a warning or a preemption).
    Slurm(crate::slurm::SlurmJob),
}

impl Attempt {
    /// Starts `mpirun` with stdout and stderr to `out` and `log`; its ranks join the launch's store lease `lease`.
    pub fn mpirun(job: &Job, out: &Path, log: &Path, lease: &str) -> Result<Attempt> {
        let mut argv = job.mpirun_argv();
        argv.splice(1..1, ["-x".to_string(), LEASE_ENV.to_string()]);
        let stdout = std::fs::File::create(out).with_context(|| out.display().to_string())?;
        let stderr = std::fs::File::create(log).with_context(|| log.display().to_string())?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).env(LEASE_ENV, lease).stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0);
        // SAFETY: prctl is async-signal-safe; it only sets a flag of the child between fork and exec.
        unsafe {
            // mpirun (in its own process group, out of reach of the terminal's Ctrl-C) is told when this
            // process dies, even by SIGKILL, and then tears the ranks down: no job outlives its orchestrator.
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Open MPI refuses root without these (containers and CI run as root).
            cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        let child = cmd.spawn().with_context(|| format!("starting {} (is Open MPI installed?)", argv[0]))?;
        Ok(Attempt::Mpirun { child })
    }

    /// How the attempt ended; `None` while it runs.
    pub fn poll(&mut self) -> Option<Outcome> {
        match self {
            Attempt::Mpirun { child } => match child.try_wait() {
                Ok(Some(status)) if status.success() => Some(Outcome::Succeeded),
                Ok(Some(status)) if status.code() == Some(EXIT_PREEMPTED.into()) => Some(Outcome::Preempted),
                Ok(Some(status)) => Some(Outcome::Failed(format!("mpirun exited with {status}"))),
                Ok(None) => None,
                Err(e) => Some(Outcome::Failed(format!("cannot wait for mpirun: {e}"))),
            },
            Attempt::K8s(k) => k.poll(),
            Attempt::Slurm(job) => job.outcome(),
        }
    }

    /// Asks the ranks to stop after their current step with a checkpoint committed, as a preemption does
    /// (SIGUSR1 to mpirun, which passes it on to every rank; a Kubernetes attempt is deleted, which sends the
    /// pods SIGTERM). The attempt then ends [`Outcome::Preempted`] unless a rank cannot get there.
    pub fn interrupt(&mut self) {
        match self {
            // SAFETY: a signal to the mpirun this attempt started.
            Attempt::Mpirun { child } => unsafe {
                libc::kill(child.id() as i32, libc::SIGUSR1);
            },
            Attempt::K8s(k) => k.mpijob.delete_or_warn(),
            Attempt::Slurm(job) => job.interrupt(),
        }
    }

    /// Whether the attempt waits for resources (a Slurm job pending or requeued, worker pods not running yet):
    /// its ranks cannot beat.
    pub fn waiting(&self) -> bool {
        match self {
            Attempt::Slurm(job) => job.waiting(),
            Attempt::K8s(k) => k.waiting(),
            _ => false,
        }
    }

    /// Times the scheduler requeued the attempt itself (Slurm, after a warning or a preemption).
    pub fn requeues(&self) -> u32 {
        match self {
            Attempt::Slurm(job) => job.restarts(),
            _ => 0,
        }
    }

    /// Stops the attempt and everything it started. `local_pids`: ranks known (from heartbeats) to run on
    /// this machine, which may be stopped (SIGSTOP) and must be killed, not asked.
    pub fn stop(&mut self, local_pids: &[u32]) {
        match self {
            Attempt::Mpirun { child } => {
                let group = child.id() as i32;
                // A pid from a heartbeat is only a claim (anyone who can write the store can forge one, and a
                // pid may be reused): only the ones that are descendants of this mpirun now are kept, with their
                // start times, and each is signalled later only if it is still that same process.
                let ranks: Vec<(u32, u64)> = local_pids
                    .iter()
                    .filter(|&&pid| {
                        let ours = descends_from(pid, child.id());
                        if !ours {
                            tracing::warn!(
                                pid,
                                "not signalled: a heartbeat names it, but it is not a rank of this attempt"
                            );
                        }
                        ours
                    })
                    .filter_map(|&pid| Some((pid, proc_stat(pid)?.1)))
                    .collect();
                // SAFETY: a signal to the process group we created.
                unsafe {
                    // mpirun tears the ranks down on SIGTERM ...
                    libc::kill(-group, libc::SIGTERM);
                }
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                // ... unless a rank cannot act on it (stopped, stuck in a syscall): kill what is left.
                // SAFETY: signals to the process group we created and to verified ranks of this attempt.
                unsafe { libc::kill(-group, libc::SIGKILL) };
                for (pid, started) in ranks {
                    if proc_stat(pid).is_some_and(|(_, t)| t == started) {
                        // SAFETY: as above.
                        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                    }
                }
                let _ = child.wait();
            }
            Attempt::K8s(k) => k.mpijob.delete_or_warn(),
            Attempt::Slurm(job) => job.cancel(),
        }
    }
}

/// Whether `pid` is a descendant of `ancestor`, by the parent links in /proc.
fn descends_from(pid: u32, ancestor: u32) -> bool {
    let mut p = pid;
    for _ in 0..64 {
        match proc_stat(p) {
            Some((q, _)) if q == ancestor => return true,
            Some((q, _)) if q > 1 => p = q,
            _ => return false,
        }
    }
    false
}

/// A live process's parent pid and start time (clock ticks since boot), from /proc/<pid>/stat.
fn proc_stat(pid: u32) -> Option<(u32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `pid (comm) state ppid ...`: comm may hold spaces and parentheses, so fields count from the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    // After comm: state (field 3 of stat(5)) is fields[0], ppid (4) fields[1], starttime (22) fields[19].
    Some((fields.get(1)?.parse().ok()?, fields.get(19)?.parse().ok()?))
}
