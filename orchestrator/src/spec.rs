//! What every attempt of a launch runs: the job's config, its world (nodes x GPUs per node), where it runs
//! ([`Target`]) and the command line of its ranks.

use std::path::{Path, PathBuf};

use anyhow::Result;
use avexpr_worker::job::JobConfig;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// `mpirun -np N*G` on this machine.
    Local,
    /// `mpirun --hostfile F --npernode G -np N*G`.
    Hostfile(PathBuf),
    /// An MPIJob (`kubeflow.org/v2beta1`) rendered from `k8s/` and applied with `kubectl`.
    K8s,
    /// An sbatch script submitted to Slurm; mpirun runs inside the allocation.
    Slurm,
}

/// `--target`: where `orchestrator launch` starts the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum TargetKind {
    /// mpirun on this machine.
    Local,
    /// mpirun --hostfile FILE.
    Hostfile,
    /// An MPIJob applied with kubectl.
    K8s,
    /// An sbatch script submitted to Slurm.
    Slurm,
}

impl Target {
    /// The target `--target` and `--hostfile` name together.
    pub fn new(kind: TargetKind, hostfile: Option<&Path>) -> Result<Target> {
        match (kind, hostfile) {
            (TargetKind::Local, None) => Ok(Target::Local),
            (TargetKind::Hostfile, Some(f)) => Ok(Target::Hostfile(f.to_path_buf())),
            (TargetKind::Hostfile, None) => anyhow::bail!("--target hostfile needs --hostfile FILE"),
            (TargetKind::K8s, None) => Ok(Target::K8s),
            (TargetKind::Slurm, None) => Ok(Target::Slurm),
            (TargetKind::Local | TargetKind::K8s | TargetKind::Slurm, Some(_)) => {
                anyhow::bail!("--hostfile is only for --target hostfile")
            }
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
            Target::K8s | Target::Slurm => {}
        }
        // The store's credentials and endpoint reach remote ranks only when named (Open MPI forwards the
        // variables `-x` names, with mpirun's values): names only, never values, on the command line.
        for (name, _) in avexpr_data::store::aws_environment() {
            argv.extend(["-x".into(), name]);
        }
        argv.extend(self.job.launch.mpirun_args.iter().cloned());
        argv.push(self.worker.display().to_string());
        argv.extend(self.worker_args(&self.config.display().to_string()));
        argv
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Succeeded,
    /// The ranks were asked to stop (SIGTERM or SIGUSR1 to one of them: an eviction, a spot reclaim, Slurm's
    /// warning), committed a checkpoint of their last step and exited with the worker's `EXIT_PREEMPTED`.
    Preempted,
    /// Worker pods stayed unschedulable and an elastic launch (`--min-nodes`) can run on the ones that were
    /// placed: the attempt is relaunched smaller (not a failure; nothing of it ran).
    Unschedulable(String),
    Failed(String),
}

/// For a launch over several hosts: the job's stores must be reachable from every host. An `s3://` URI is; a
/// relative path never is (relative to each host's working directory); an absolute path only on a filesystem
/// every host mounts (`launch.shared_filesystem`).
pub fn check_stores_reachable_from_every_host(job: &JobConfig) -> Result<()> {
    let features = job.data.features.as_ref().map(|f| f.uri.as_str());
    let stores =
        [("data.shards", Some(job.data.shards.as_str())), ("checkpoint.uri", Some(job.checkpoint.uri.as_str()))];
    for (field, uri) in stores.into_iter().chain([("data.features.uri", features)]) {
        let Some(uri) = uri else { continue };
        if uri.starts_with("s3://") {
            continue;
        }
        let path = uri.strip_prefix("file://").unwrap_or(uri);
        anyhow::ensure!(
            Path::new(path).is_absolute(),
            "{field}: `{uri}` is relative to this machine's working directory; ranks on other hosts cannot read it: \
             use an s3:// URI (or an absolute path on a filesystem every host mounts, with launch.shared_filesystem)"
        );
        anyhow::ensure!(
            job.launch.shared_filesystem,
            "{field}: `{uri}` is a path on this machine; ranks on other hosts would each use their own copy: use an \
             s3:// URI, or set launch.shared_filesystem: true if every host mounts it (NFS)"
        );
    }
    Ok(())
}
