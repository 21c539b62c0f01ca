//! Training checkpoints in an object store (`s3://...`, `file:///...` or a path), atomic by a commit manifest.
//!
//! A checkpoint is the folder `step-<NNNNNNNN>/`: `variables.safetensors` (the trainable variables under
//! their model paths), `optimizer.safetensors` (AdamW moments), `state.json` (step, every data slot's loader
//! cursor, the resolved config, the metrics so far), written first, then `COMMIT.json` listing each object's
//! size and SHA-256: the commit point. Readers ignore folders without a commit; a committed checkpoint whose
//! objects do not match (truncated, corrupt, missing) is reported and the previous one is used. After a
//! commit, checkpoints beyond the newest `keep_last_k` are deleted, except the best by validation macro F1
//! (commit first, so a half-deleted one is never taken for valid).

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use avexpr_data::sampler::Cursor;
use avexpr_data::store::Store;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::Tensor;

use crate::job::JobConfig;
use crate::metrics::StepMetrics;

pub const COMMIT: &str = "COMMIT.json";
const OBJECTS: [&str; 3] = ["variables.safetensors", "optimizer.safetensors", "state.json"];

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    pub step: u64,
    /// Per data slot (rank x accumulation + micro-step).
    pub cursors: Vec<Cursor>,
    pub config: JobConfig,
    pub metrics: Vec<StepMetrics>,
    /// The best validation macro F1 so far; its checkpoint is never pruned.
    pub best: Option<Best>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Best {
    pub step: u64,
    pub macro_f1: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CommitEntry {
    key: String,
    bytes: u64,
    sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Commit {
    step: u64,
    objects: Vec<CommitEntry>,
}

/// A checkpoint read back (or about to be written).
pub struct Checkpoint {
    pub name: String,
    pub state: CheckpointState,
    pub variables: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Copies the saved variables into the model's, checking that every one is there with its shape.
    pub fn restore_variables(&self, named: &[(String, Tensor)]) -> Result<()> {
        tch::no_grad(|| {
            for (name, var) in named {
                let saved = self
                    .variables
                    .get(name)
                    .with_context(|| format!("checkpoint {}: variable `{name}` is missing", self.name))?;
                anyhow::ensure!(
                    saved.size() == var.size(),
                    "checkpoint {}: `{name}` has shape {:?}, the model's is {:?}",
                    self.name,
                    saved.size(),
                    var.size()
                );
                var.shallow_clone().copy_(saved);
            }
            Ok(())
        })
    }
}

fn name(step: u64) -> String {
    format!("step-{step:08}")
}

fn safetensors_bytes(tensors: Vec<(String, Tensor)>) -> Result<Bytes> {
    let tmp = tempfile::NamedTempFile::new()?;
    let cpu: Vec<(String, Tensor)> = tensors.into_iter().map(|(n, t)| (n, t.to_device(tch::Device::Cpu))).collect();
    Tensor::write_safetensors(&cpu, tmp.path())?;
    Ok(Bytes::from(std::fs::read(tmp.path())?))
}

fn read_safetensors(bytes: &[u8]) -> Result<BTreeMap<String, Tensor>> {
    let tmp = tempfile::NamedTempFile::new()?;
    std::fs::write(tmp.path(), bytes)?;
    Ok(Tensor::read_safetensors(tmp.path())?.into_iter().collect())
}

pub struct CheckpointStore {
    store: Store,
    keep_last_k: usize,
}

impl CheckpointStore {
    pub fn open(uri: &str, keep_last_k: usize) -> Result<Self> {
        let store = Store::open(uri).with_context(|| format!("checkpoint.uri {uri}"))?;
        Ok(Self { store, keep_last_k })
    }

    /// Writes the objects, then the commit; then prunes old checkpoints.
    pub fn save(
        &self,
        state: &CheckpointState,
        variables: &[(String, Tensor)],
        optimizer: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let dir = name(state.step);
        let objects = [
            safetensors_bytes(variables.iter().map(|(n, t)| (n.clone(), t.detach())).collect())?,
            safetensors_bytes(optimizer.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect())?,
            Bytes::from(serde_json::to_vec_pretty(state)?),
        ];
        let mut entries = Vec::new();
        for (file, bytes) in OBJECTS.iter().zip(objects) {
            let key = format!("{dir}/{file}");
            entries.push(CommitEntry {
                key: key.clone(),
                bytes: bytes.len() as u64,
                sha256: hex::encode(Sha256::digest(&bytes)),
            });
            self.store.blocking().put(&key, bytes)?;
        }
        let commit = Commit { step: state.step, objects: entries };
        self.store.blocking().put(&format!("{dir}/{COMMIT}"), Bytes::from(serde_json::to_vec_pretty(&commit)?))?;
        self.prune(state.best.map(|b| name(b.step)))
    }

    fn committed(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for dir in self.store.blocking().list_dirs("")? {
            if dir.starts_with("step-") && self.store.blocking().exists(&format!("{dir}/{COMMIT}"))? {
                names.push(dir);
            }
        }
        Ok(names)
    }

    /// Deletes all but the newest `keep_last_k` committed checkpoints, and `keep` (the best).
    fn prune(&self, keep: Option<String>) -> Result<()> {
        let committed = self.committed()?;
        for dir in committed.iter().take(committed.len().saturating_sub(self.keep_last_k)) {
            if Some(dir) == keep.as_ref() {
                continue;
            }
            self.store.blocking().delete(&format!("{dir}/{COMMIT}"))?;
            for file in OBJECTS {
                self.store.blocking().delete(&format!("{dir}/{file}"))?;
            }
        }
        Ok(())
    }

    /// Reads and verifies one committed checkpoint.
    pub fn load(&self, dir: &str) -> Result<Checkpoint> {
        let commit: Commit = serde_json::from_slice(&self.store.blocking().get(&format!("{dir}/{COMMIT}"))?)
            .with_context(|| format!("{dir}/{COMMIT} is malformed"))?;
        let mut objects = BTreeMap::new();
        for e in &commit.objects {
            let bytes = self.store.blocking().get(&e.key)?;
            anyhow::ensure!(
                bytes.len() as u64 == e.bytes,
                "{} has {} bytes, the commit says {}",
                e.key,
                bytes.len(),
                e.bytes
            );
            let sha = hex::encode(Sha256::digest(&bytes));
            anyhow::ensure!(sha == e.sha256, "{}: SHA-256 {sha}, the commit says {}", e.key, e.sha256);
            objects.insert(e.key.rsplit('/').next().unwrap_or_default().to_string(), bytes);
        }
        let get = |file: &str| objects.get(file).with_context(|| format!("{dir}/{file} is not in the commit"));
        Ok(Checkpoint {
            name: dir.to_string(),
            state: serde_json::from_slice(get("state.json")?).with_context(|| format!("{dir}/state.json"))?,
            variables: read_safetensors(get("variables.safetensors")?)?,
            optimizer: read_safetensors(get("optimizer.safetensors")?)?,
        })
    }

    /// `latest` (the newest that verifies), `best` (the best validation F1 the newest one records) or a
    /// checkpoint name (`step-00001200`).
    pub fn select(&self, which: &str) -> Result<Checkpoint> {
        let latest = || self.latest_valid()?.with_context(|| format!("no valid checkpoint under {}", self.store.uri()));
        match which {
            "latest" => latest(),
            "best" => {
                let newest = latest()?;
                match newest.state.best {
                    Some(b) if name(b.step) != newest.name => self.load(&name(b.step)),
                    _ => Ok(newest),
                }
            }
            dir => self.load(dir).with_context(|| format!("checkpoint {}/{dir}", self.store.uri())),
        }
    }

    /// The newest committed checkpoint that verifies; broken ones are reported and skipped.
    pub fn latest_valid(&self) -> Result<Option<Checkpoint>> {
        for dir in self.committed()?.iter().rev() {
            match self.load(dir) {
                Ok(ckpt) => return Ok(Some(ckpt)),
                Err(e) => {
                    tracing::warn!("checkpoint {}/{dir} is unusable ({e:#}); trying the previous one", self.store.uri())
                }
            }
        }
        Ok(None)
    }
}
