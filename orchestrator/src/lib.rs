//! The orchestrator: plans a job's shards over ranks, launches it (local mpirun, a hostfile, Slurm or a Kubernetes
//! MPIJob), watches every rank's heartbeat and restarts the job from its last checkpoint when a rank dies or
//! hangs.

pub mod doctor;
pub mod folds;
pub mod jobs;
pub mod k8s;
pub mod launch;
pub mod plan;
pub mod slurm;
pub mod spec;
pub mod watch;
