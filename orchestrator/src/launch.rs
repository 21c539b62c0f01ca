//! Starting and stopping one attempt of a job: `mpirun` on this machine (local), across the hosts of a
//! hostfile, or a Kubernetes MPIJob applied with `kubectl`. [`crate::watch`] drives the attempts.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};
use avexpr_worker::job::JobConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `mpirun -np N*G` on this machine.
    Local,
    /// `mpirun --hostfile F --npernode G -np N*G`.
    Hostfile(PathBuf),
    /// An MPIJob (`kubeflow.org/v2beta1`) rendered from `k8s/` and applied with `kubectl`.
    K8s,
}

impl Target {
    pub fn parse(name: &str, hostfile: Option<&Path>) -> Result<Target> {
        match (name, hostfile) {
            ("local", None) => Ok(Target::Local),
            ("hostfile", Some(f)) => Ok(Target::Hostfile(f.to_path_buf())),
            ("hostfile", None) => anyhow::bail!("--target hostfile needs --hostfile FILE"),
            ("k8s", None) => Ok(Target::K8s),
            ("local" | "k8s", Some(_)) => anyhow::bail!("--hostfile is only for --target hostfile"),
            (other, _) => anyhow::bail!("--target: `{other}` is not one of local, hostfile, k8s"),
        }
    }
}

/// What every attempt of a launch runs.
#[derive(Debug, Clone)]
pub struct Job {
    /// The config file (absolute), as the ranks read it.
    pub config: PathBuf,
    pub job: JobConfig,
    pub nodes: usize,
    pub gpus_per_node: usize,
    pub target: Target,
    /// The worker binary (default: beside this orchestrator).
    pub worker: PathBuf,
    /// The plan's URI (in the checkpoint store).
    pub plan: String,
}

impl Job {
    pub fn world_size(&self) -> usize {
        self.nodes * self.gpus_per_node
    }

    /// `worker train ...` as every rank runs it.
    pub fn worker_args(&self, config: &str) -> Vec<String> {
        vec![
            "train".into(),
            "--config".into(),
            config.into(),
            "--resume".into(),
            "auto".into(),
            "--plan".into(),
            self.plan.clone(),
        ]
    }

    /// The full `mpirun` command line of the local and hostfile targets.
    pub fn mpirun_argv(&self) -> Vec<String> {
        let world = self.world_size();
        let mut argv = vec!["mpirun".to_string(), "-np".into(), world.to_string()];
        match &self.target {
            Target::Local => {
                let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
                if world > cores {
                    argv.push("--oversubscribe".into());
                }
            }
            Target::Hostfile(file) => {
                argv.extend(["--hostfile".into(), file.display().to_string()]);
                argv.extend(["--npernode".into(), self.gpus_per_node.to_string()]);
            }
            Target::K8s => {}
        }
        argv.extend(self.job.launch.mpirun_args.iter().cloned());
        argv.push(self.worker.display().to_string());
        argv.extend(self.worker_args(&self.config.display().to_string()));
        argv
    }
}

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

/// One running attempt.
pub enum Attempt {
    /// mpirun, in its own process group.
    Mpirun { child: Child },
    /// An applied MPIJob, followed through its launcher pod's phase.
    K8s { name: String, namespace: String },
}

impl Attempt {
    /// Starts `mpirun` with stdout and stderr to `out` and `log`.
    pub fn mpirun(job: &Job, out: &Path, log: &Path) -> Result<Attempt> {
        let argv = job.mpirun_argv();
        let stdout = std::fs::File::create(out).with_context(|| out.display().to_string())?;
        let stderr = std::fs::File::create(log).with_context(|| log.display().to_string())?;
        let mut cmd = Command::new(&argv[0]);
        cmd.args(&argv[1..]).stdin(Stdio::null()).stdout(stdout).stderr(stderr).process_group(0);
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            // Open MPI refuses root without these (containers and CI run as root).
            cmd.env("OMPI_ALLOW_RUN_AS_ROOT", "1").env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1");
        }
        let child = cmd.spawn().with_context(|| format!("starting {} (is Open MPI installed?)", argv[0]))?;
        Ok(Attempt::Mpirun { child })
    }

    /// `Some(Ok(()))` when the attempt finished successfully, `Some(Err(reason))` when it failed, `None` while
    /// it runs.
    pub fn poll(&mut self) -> Option<std::result::Result<(), String>> {
        match self {
            Attempt::Mpirun { child } => match child.try_wait() {
                Ok(Some(status)) if status.success() => Some(Ok(())),
                Ok(Some(status)) => Some(Err(format!("mpirun exited with {status}"))),
                Ok(None) => None,
                Err(e) => Some(Err(format!("cannot wait for mpirun: {e}"))),
            },
            Attempt::K8s { name, namespace } => crate::k8s::job_state(name, namespace),
        }
    }

    /// Stops the attempt and everything it started. `local_pids`: ranks known (from heartbeats) to run on
    /// this machine, which may be stopped (SIGSTOP) and must be killed, not asked.
    pub fn stop(&mut self, local_pids: &[u32]) {
        match self {
            Attempt::Mpirun { child } => {
                let group = child.id() as i32;
                // SAFETY: signals to a process group we created and to pids our ranks reported.
                unsafe {
                    // mpirun tears the ranks down on SIGTERM ...
                    libc::kill(-group, libc::SIGTERM);
                }
                let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
                while std::time::Instant::now() < deadline && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(std::time::Duration::from_millis(100));
                }
                // ... unless a rank cannot act on it (stopped, stuck in a syscall): kill what is left.
                unsafe {
                    libc::kill(-group, libc::SIGKILL);
                    for &pid in local_pids {
                        libc::kill(pid as i32, libc::SIGKILL);
                    }
                }
                let _ = child.wait();
            }
            Attempt::K8s { name, namespace } => crate::k8s::delete(name, namespace),
        }
    }
}
