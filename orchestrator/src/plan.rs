//! `orchestrator plan`: the video -> rank plan of a job, balanced by labelled frames, written to the job's
//! checkpoint store (`plan.json`) where every rank (on any host) reads it.

use anyhow::{Context, Result};
use avexpr_data::manifest::{Manifest, read_manifest};
use avexpr_data::store::Store;
use avexpr_worker::job::JobConfig;
use avexpr_worker::plan::JobPlan;

/// Ranks of a launch: `nodes x gpus_per_node` (on CPU hosts, processes per node).
pub fn world_size(nodes: usize, gpus_per_node: usize) -> Result<usize> {
    anyhow::ensure!(nodes >= 1, "--nodes must be at least 1 (got {nodes})");
    anyhow::ensure!(gpus_per_node >= 1, "--gpus-per-node must be at least 1 (got {gpus_per_node})");
    anyhow::ensure!(
        nodes * gpus_per_node <= 65536,
        "--nodes x --gpus-per-node = {} ranks: too many",
        nodes * gpus_per_node
    );
    Ok(nodes * gpus_per_node)
}

pub fn read_job_manifest(job: &JobConfig) -> Result<Manifest> {
    let store = Store::open(&job.data.shards).context("data.shards")?;
    let mut manifest = read_manifest(&store).context("data.shards")?;
    if let Some(folds) = &job.data.folds {
        avexpr_data::folds::apply(&mut manifest, folds);
    }
    Ok(manifest)
}

/// Makes and writes the plan; returns it with its URI.
pub fn make(job: &JobConfig, manifest: &Manifest, ranks: usize) -> Result<(JobPlan, String)> {
    let plan = JobPlan::balanced(job, manifest, ranks)?;
    let store = Store::open(&job.checkpoint.uri).context("checkpoint.uri")?;
    let uri = plan.save(&store).context("checkpoint.uri: writing plan.json")?;
    Ok((plan, uri))
}

/// Per-rank videos and labelled frames, and the imbalance (largest load over the mean, minus one).
pub fn describe(plan: &JobPlan, manifest: &Manifest) -> String {
    let loads = plan.rank_loads(manifest);
    let mut videos = vec![0usize; plan.ranks];
    for slot in plan.train.slot_of.values() {
        videos[slot / plan.accumulation.max(1)] += 1;
    }
    let mut text = format!("{:>6} {:>8} {:>16}\n", "rank", "videos", "labelled frames");
    for (rank, (load, n)) in loads.iter().zip(&videos).enumerate() {
        text += &format!("{rank:>6} {n:>8} {load:>16}\n");
    }
    text += &format!("imbalance {:.2}% (largest rank load over the mean)\n", 100.0 * imbalance(&loads));
    text += &format!(
        "{} data slots: the plan (and the job's checkpoints) hold on any number of ranks dividing it\n",
        plan.train.slots
    );
    text
}

pub fn imbalance(loads: &[u64]) -> f64 {
    let mean = loads.iter().sum::<u64>() as f64 / loads.len().max(1) as f64;
    let max = loads.iter().copied().max().unwrap_or(0) as f64;
    if mean > 0.0 { max / mean - 1.0 } else { 0.0 }
}
