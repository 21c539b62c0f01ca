//! `orchestrator`: plans, launches and watches avexpr jobs. Thin: parse, log, call the library.

use std::path::PathBuf;
use std::process::ExitCode;

use avexpr_orchestrator::spec::TargetKind;
use avexpr_orchestrator::{doctor, jobs};
use avexpr_worker::logging;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "orchestrator", version, about = "avexpr orchestrator: plans, launches and watches training jobs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// A job and the ranks it runs on.
#[derive(clap::Args)]
struct Shape {
    #[arg(long)]
    config: PathBuf,
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Ranks per node: one per GPU (on CPU hosts, processes per node).
    #[arg(long, alias = "ranks-per-node", default_value_t = 1)]
    gpus_per_node: usize,
}

/// Where and how `launch` (and each fold of `folds`) starts the ranks.
#[derive(clap::Args)]
struct Start {
    /// local (mpirun here), hostfile (mpirun --hostfile) or k8s (an MPIJob applied with kubectl).
    #[arg(long, value_enum, default_value_t = TargetKind::Local)]
    target: TargetKind,
    /// The hosts of `--target hostfile` (Open MPI format).
    #[arg(long)]
    hostfile: Option<PathBuf>,
    /// Print the mpirun command or the Kubernetes manifests, start nothing.
    #[arg(long)]
    dry_run: bool,
    /// The worker binary (default: `worker` beside this program).
    #[arg(long)]
    worker: Option<PathBuf>,
    /// A directory with edited copies of the k8s/ templates (mpijob.yaml, configmap.yaml).
    #[arg(long)]
    templates: Option<PathBuf>,
    /// The MPIJob's name (default: avexpr-<config stem>-<hash of checkpoint.uri>).
    #[arg(long)]
    name: Option<String>,
    /// Elastic launch: when hosts of the hostfile cannot be reached, or Kubernetes cannot schedule worker
    /// pods for launch.k8s.unschedulable_s, relaunch on the nodes that remain, down to this many (the global
    /// batch stays the same: each rank accumulates more); nodes that come back rejoin at the next restart.
    /// Default: --nodes (not elastic).
    #[arg(long)]
    min_nodes: Option<usize>,
    /// `--target k8s`: the worker image (built from k8s/Dockerfile, best by digest), instead of
    /// `launch.k8s.image`.
    #[arg(long)]
    image: Option<String>,
}

impl Start {
    fn args(self, shape: Shape) -> jobs::LaunchArgs {
        jobs::LaunchArgs {
            config: shape.config,
            nodes: shape.nodes,
            gpus_per_node: shape.gpus_per_node,
            target: self.target,
            hostfile: self.hostfile,
            dry_run: self.dry_run,
            worker: self.worker,
            templates: self.templates,
            name: self.name,
            min_nodes: self.min_nodes,
            image: self.image,
        }
    }
}

#[derive(Subcommand)]
enum Command {
    /// Check that this machine can run avexpr workers (libtorch, devices, MPI, FFmpeg, Python venv).
    Doctor {
        /// Python of the project venv (default: $AVEXPR_PYTHON, else the scripts/setup venv).
        #[arg(long)]
        python: Option<String>,
    },
    /// Write the job's video -> rank plan (balanced by labelled frames) to its checkpoint store.
    Plan {
        #[command(flatten)]
        shape: Shape,
    },
    /// Plan, start and watch a job; restart it from its last checkpoint when a rank dies or hangs.
    Launch {
        #[command(flatten)]
        shape: Shape,
        #[command(flatten)]
        start: Start,
    },
    /// k-fold cross-validation: the training and validation videos re-split by video into --folds folds
    /// (seeded, stratified by class frames); one launch per fold, one after another; each fold's best
    /// validation macro F1, their mean +- std, and the K best checkpoints.
    Folds {
        #[command(flatten)]
        shape: Shape,
        #[arg(long)]
        folds: usize,
        /// Seed of the fold assignment.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        #[command(flatten)]
        start: Start,
    },
    /// A job's state: orchestrator record, newest checkpoint, metrics, restarts, live ranks.
    Status {
        /// The job's config file, or its checkpoint store URI.
        run: String,
    },
}

fn main() -> ExitCode {
    logging::init_labelled("orchestrator");
    let printed = |result: anyhow::Result<String>| match result {
        Ok(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    };
    match Cli::parse().command {
        Command::Plan { shape } => printed(jobs::plan(&shape.config, shape.nodes, shape.gpus_per_node)),
        Command::Launch { shape, start } => printed(jobs::launch(&start.args(shape))),
        Command::Folds { shape, folds, seed, start } => {
            printed(avexpr_orchestrator::folds::run(&start.args(shape), folds, seed))
        }
        Command::Status { run } => printed(jobs::status(&run)),
        Command::Doctor { python } => {
            let python = python.unwrap_or_else(avexpr_worker::default_python);
            let (text, ok) = doctor::report(&doctor::run_checks(&python));
            print!("{text}");
            if ok {
                ExitCode::SUCCESS
            } else {
                tracing::error!("required components are missing: run scripts/setup");
                ExitCode::FAILURE
            }
        }
    }
}
