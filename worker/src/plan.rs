//! The job's shard plan: which training videos each data slot reads. `orchestrator plan` writes it to
//! `plan.json` in the job's checkpoint store; `worker train --plan <uri>` honours it on any number of ranks with
//! the same slot count (rejecting one made for another slot count); without one, every rank computes the same
//! balanced plan itself.
//!
//! Training reads through `ranks x accumulation` data slots (see [`crate::train`]), so the plan assigns each
//! video to a slot; slot `s` belongs to rank `s / accumulation` (with no accumulation, slot = rank).

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::manifest::{Manifest, VideoRecord};
use avexpr_data::sampler::Assignment;
use avexpr_data::store::Store;
use serde::{Deserialize, Serialize};

use crate::job::JobConfig;

pub const PLAN_KEY: &str = "plan.json";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPlan {
    pub ranks: usize,
    pub accumulation: usize,
    /// Training videos -> data slot (`ranks x accumulation` of them).
    pub train: Assignment,
}

impl JobPlan {
    /// Balanced by labelled frames (largest video first, to the least loaded slot).
    pub fn balanced(job: &JobConfig, manifest: &Manifest, ranks: usize) -> Result<JobPlan> {
        anyhow::ensure!(ranks > 0, "a plan needs at least one rank");
        let accumulation = job.accumulation(ranks)?;
        let videos = train_videos(manifest);
        Ok(JobPlan { ranks, accumulation, train: Assignment::balanced(&videos, ranks * accumulation) })
    }

    /// Labelled training frames per rank.
    pub fn rank_loads(&self, manifest: &Manifest) -> Vec<u64> {
        let slots = self.train.loads(&train_videos(manifest));
        slots.chunks(self.accumulation.max(1)).map(|c| c.iter().sum()).collect()
    }

    /// Checks the plan against the job it is used for and the dataset it reads: every training video has a
    /// slot, and every slot exists.
    pub fn check(&self, job: &JobConfig, manifest: &Manifest, ranks: usize) -> Result<()> {
        self.check_job(job, ranks)?;
        for v in train_videos(manifest) {
            match self.train.slot_of.get(&v.name) {
                Some(&slot) if slot < self.train.slots => {}
                Some(slot) => anyhow::bail!("the plan puts video `{}` in slot {slot} of {}", v.name, self.train.slots),
                None => anyhow::bail!(
                    "the plan has no slot for training video `{}` (made for another dataset?): make it again with \
                     `orchestrator plan`",
                    v.name
                ),
            }
        }
        Ok(())
    }

    /// A plan assigns videos to data slots, not ranks: it holds for any number of ranks with the same slot count
    /// (a job resumed on fewer or more nodes keeps its plan); only another slot count is refused.
    fn check_job(&self, job: &JobConfig, ranks: usize) -> Result<()> {
        let slots = ranks * job.accumulation(ranks)?;
        anyhow::ensure!(
            self.train.slots == slots,
            "the plan was made for {} data slots, the job has {slots} (train.global_batch / train.micro_batch): \
             make it again with `orchestrator plan`",
            self.train.slots
        );
        Ok(())
    }

    /// Writes `plan.json` to `store`; returns its URI.
    pub fn save(&self, store: &Store) -> Result<String> {
        let bytes = serde_json::to_vec_pretty(self)?;
        store.blocking().put(PLAN_KEY, bytes.into())?;
        Ok(format!("{}/{PLAN_KEY}", store.uri().trim_end_matches('/')))
    }

    /// Reads a plan from a URI or path (`s3://bucket/run/checkpoints/plan.json`, `runs/x/plan.json`).
    pub fn load(uri: &str) -> Result<JobPlan> {
        let (dir, file) = uri.rsplit_once('/').unwrap_or((".", uri));
        let store = Store::open(if dir.is_empty() { "/" } else { dir }).with_context(|| format!("plan {uri}"))?;
        let bytes = store.blocking().get(file).with_context(|| format!("plan {uri}"))?;
        Self::parse(&bytes).with_context(|| format!("plan {uri}"))
    }

    /// A plan's JSON.
    pub fn parse(bytes: &[u8]) -> Result<JobPlan> {
        serde_json::from_slice(bytes).context("not a plan")
    }
}

fn train_videos(manifest: &Manifest) -> Vec<&VideoRecord> {
    manifest.videos.iter().filter(|v| v.split == Split::Train).collect()
}
