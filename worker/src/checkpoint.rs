//! Training checkpoints in an object store (`s3://...`, `file:///...` or a path), atomic by a commit manifest.
//!
//! A checkpoint is the folder `step-<NNNNNNNN>/`: `variables.safetensors` (the trainable variables under
//! their model paths), `optimizer.safetensors` (AdamW moments), `state.json` (step, every data slot's loader
//! cursor, the resolved config, the metrics so far), written first, then `COMMIT.json` listing each object's
//! size and SHA-256: the commit point. Readers ignore folders without a commit; a committed checkpoint whose
//! objects do not match (truncated, corrupt, missing) is reported and the previous one is used. After a
//! commit, checkpoints beyond the newest `keep_last_k` are deleted, except the best by validation macro F1
//! (commit first, so a half-deleted one is never taken for valid).
//!
//! Errors are typed by what the caller does about them ([`CheckpointError`]): only a checkpoint that does not
//! match its commit is `Corrupt` (skipped for the previous one); a store that cannot be read is `Store` and
//! stops whoever asked, because an older checkpoint would silently lose steps.

use std::collections::BTreeMap;

use avexpr_data::sampler::Cursor;
use avexpr_data::store::{Store, StoreError};
use bytes::Bytes;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Kind, Tensor};

use crate::job::JobConfig;
use crate::metrics::StepMetrics;

pub const COMMIT: &str = "COMMIT.json";

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    /// The store could not be read or written (unreachable, denied, a failed request): nothing is known about
    /// the checkpoint itself.
    #[error("checkpoint store: {0}")]
    Store(StoreError),
    /// A committed checkpoint whose objects do not match its commit (size, SHA-256, missing, unreadable).
    #[error("checkpoint {uri}/{name} is corrupt: {reason}")]
    Corrupt { uri: String, name: String, reason: String },
    /// A sound checkpoint that does not fit this job (a variable missing or shaped otherwise, other data slots).
    #[error("checkpoint {uri}/{name} does not fit this job: {reason}")]
    Mismatch { uri: String, name: String, reason: String },
    #[error("no valid checkpoint under {uri}")]
    NoneValid { uri: String },
    #[error("no committed checkpoint {name} under {uri} (committed: {committed})")]
    Unknown { uri: String, name: String, committed: String },
    /// The state could not be serialized (a bug, not a condition of the store or the data).
    #[error("checkpoint {name}: cannot encode: {reason}")]
    Encode { name: String, reason: String },
}

// The store's error is part of the message and so not also a `source` (printed twice in a chain).
impl From<StoreError> for CheckpointError {
    fn from(e: StoreError) -> Self {
        CheckpointError::Store(e)
    }
}

pub type Result<T, E = CheckpointError> = std::result::Result<T, E>;
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

/// The largest object a commit may list (a paper-width model's variables and optimizer state are ~100 MB).
const MAX_OBJECT_BYTES: u64 = 64 << 30;

impl Commit {
    /// Parses the `COMMIT.json` of checkpoint folder `dir`: exactly the checkpoint's objects, each in `dir`, of a
    /// plausible size, with a SHA-256 in hex; `step` the folder's.
    fn parse(bytes: &[u8], dir: &str) -> std::result::Result<Commit, String> {
        let commit: Commit = serde_json::from_slice(bytes).map_err(|e| format!("malformed: {e}"))?;
        if checkpoint_name(commit.step) != dir {
            return Err(format!("step {} does not match the folder", commit.step));
        }
        let mut keys: Vec<String> = commit.objects.iter().map(|e| e.key.clone()).collect();
        keys.sort();
        let mut expected: Vec<String> = OBJECTS.iter().map(|o| format!("{dir}/{o}")).collect();
        expected.sort();
        if keys != expected {
            return Err(format!("lists {keys:?}, expected {expected:?}"));
        }
        for e in &commit.objects {
            if e.bytes > MAX_OBJECT_BYTES {
                return Err(format!("{}: {} bytes is more than {MAX_OBJECT_BYTES}", e.key, e.bytes));
            }
            if e.sha256.len() != 64 || !e.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{}: not a SHA-256 in hex", e.key));
            }
        }
        Ok(commit)
    }
}

/// Checks a `COMMIT.json` as [`CheckpointStore::load`] does before reading any object it lists.
pub fn check_commit(bytes: &[u8], dir: &str) -> std::result::Result<(), String> {
    Commit::parse(bytes, dir).map(drop)
}

/// Parses a checkpoint's `state.json` as [`CheckpointStore::load`] does.
pub fn parse_state(bytes: &[u8]) -> std::result::Result<CheckpointState, String> {
    serde_json::from_slice(bytes).map_err(|e| e.to_string())
}

/// A checkpoint read back (or about to be written).
pub struct Checkpoint {
    /// The store it was read from.
    pub uri: String,
    pub name: String,
    /// SHA-256 of its `COMMIT.json`: two readers holding the same name and hash hold the same checkpoint.
    pub commit_sha256: String,
    pub state: CheckpointState,
    pub variables: BTreeMap<String, Tensor>,
    pub optimizer: BTreeMap<String, Tensor>,
}

impl Checkpoint {
    /// Copies the saved variables into the model's, checking that every one is there with its shape.
    pub fn restore_variables(&self, named: &[(String, Tensor)]) -> Result<()> {
        tch::no_grad(|| {
            for (name, var) in named {
                let saved =
                    self.variables.get(name).ok_or_else(|| self.mismatch(format!("variable `{name}` is missing")))?;
                if saved.size() != var.size() {
                    return Err(self.mismatch(format!(
                        "`{name}` has shape {:?}, the model's is {:?}",
                        saved.size(),
                        var.size()
                    )));
                }
                var.shallow_clone().copy_(saved);
            }
            Ok(())
        })
    }

    /// A checkpoint that does not fit the job, by this checkpoint's name.
    pub fn mismatch(&self, reason: String) -> CheckpointError {
        CheckpointError::Mismatch { uri: self.uri.clone(), name: self.name.clone(), reason }
    }
}

/// The folder of the checkpoint of `step`.
pub fn checkpoint_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// The tensors (moved to the CPU) as a safetensors file, in memory.
fn safetensors_bytes(name: &str, tensors: Vec<(String, Tensor)>) -> Result<Bytes> {
    let encode = |reason: String| CheckpointError::Encode { name: name.to_string(), reason };
    let mut data: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = Vec::with_capacity(tensors.len());
    for (n, t) in tensors {
        let t = t.to_device(tch::Device::Cpu).contiguous();
        let dtype = dtype_of(t.kind()).ok_or_else(|| encode(format!("`{n}`: kind {:?} is not stored", t.kind())))?;
        let mut bytes = vec![0u8; t.numel() * t.kind().elt_size_in_bytes()];
        t.f_copy_data_u8(&mut bytes, t.numel()).map_err(|e| encode(format!("`{n}`: {e}")))?;
        data.push((n, dtype, t.size().iter().map(|&d| d as usize).collect(), bytes));
    }
    let views = data
        .iter()
        .map(|(n, dtype, shape, bytes)| {
            TensorView::new(*dtype, shape.clone(), bytes).map(|v| (n.as_str(), v)).map_err(|e| encode(e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Bytes::from(safetensors::tensor::serialize(views, None).map_err(|e| encode(e.to_string()))?))
}

/// A safetensors file's tensors; `Err` says why the bytes are not one.
fn read_safetensors(bytes: &[u8]) -> std::result::Result<BTreeMap<String, Tensor>, String> {
    let st = SafeTensors::deserialize(bytes).map_err(|e| format!("not safetensors: {e}"))?;
    st.tensors()
        .into_iter()
        .map(|(n, view)| {
            let kind = kind_of(view.dtype()).ok_or_else(|| format!("`{n}`: dtype {:?} is not ours", view.dtype()))?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let t = Tensor::f_from_data_size(view.data(), &shape, kind).map_err(|e| format!("`{n}`: {e}"))?;
            Ok((n, t))
        })
        .collect()
}

/// The kinds checkpoints hold, as safetensors spells them.
const KINDS: [(Kind, Dtype); 5] = [
    (Kind::Float, Dtype::F32),
    (Kind::Double, Dtype::F64),
    (Kind::BFloat16, Dtype::BF16),
    (Kind::Half, Dtype::F16),
    (Kind::Int64, Dtype::I64),
];

fn dtype_of(kind: Kind) -> Option<Dtype> {
    KINDS.iter().find(|(k, _)| *k == kind).map(|(_, d)| *d)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    KINDS.iter().find(|(_, d)| *d == dtype).map(|(k, _)| *k)
}

pub struct CheckpointStore {
    store: Store,
    keep_last_k: usize,
}

impl CheckpointStore {
    pub fn open(uri: &str, keep_last_k: usize) -> Result<Self> {
        Ok(Self { store: Store::open(uri)?, keep_last_k })
    }

    pub fn uri(&self) -> &str {
        self.store.uri()
    }

    /// The store the checkpoints are in (also the heartbeats' and the lease's).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// Writes the objects, then the commit; then prunes old checkpoints.
    pub fn save(
        &self,
        state: &CheckpointState,
        variables: &[(String, Tensor)],
        optimizer: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let dir = checkpoint_name(state.step);
        let encode = |e: serde_json::Error| CheckpointError::Encode { name: dir.clone(), reason: e.to_string() };
        let objects = [
            safetensors_bytes(&dir, variables.iter().map(|(n, t)| (n.clone(), t.detach())).collect())?,
            safetensors_bytes(&dir, optimizer.iter().map(|(n, t)| (n.clone(), t.shallow_clone())).collect())?,
            Bytes::from(serde_json::to_vec_pretty(state).map_err(encode)?),
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
        self.store
            .blocking()
            .put(&format!("{dir}/{COMMIT}"), Bytes::from(serde_json::to_vec_pretty(&commit).map_err(encode)?))?;
        // Older checkpoints are deleted only once this one reads back whole (with keep_last_k: 1, the previous is
        // all there is to fall back on); on a local store its files are on disk by now (Store::put syncs).
        self.load(&dir)?;
        self.prune(state.best.map(|b| checkpoint_name(b.step)))
    }

    /// The committed checkpoints' names, oldest first.
    pub fn committed(&self) -> Result<Vec<String>> {
        let mut names = Vec::new();
        for dir in self.store.blocking().list_dirs("")? {
            if dir.starts_with("step-") && self.store.blocking().exists(&format!("{dir}/{COMMIT}"))? {
                names.push(dir);
            }
        }
        Ok(names)
    }

    /// Deletes every committed checkpoint (each commit first, so a half-deleted one is never taken for valid).
    pub fn clear(&self) -> Result<()> {
        for dir in self.committed()? {
            self.delete(&dir)?;
        }
        Ok(())
    }

    fn delete(&self, dir: &str) -> Result<()> {
        self.store.blocking().delete(&format!("{dir}/{COMMIT}"))?;
        for file in OBJECTS {
            self.store.blocking().delete(&format!("{dir}/{file}"))?;
        }
        Ok(())
    }

    /// Deletes all but the newest `keep_last_k` committed checkpoints, and `keep` (the best).
    fn prune(&self, keep: Option<String>) -> Result<()> {
        let committed = self.committed()?;
        for dir in committed.iter().take(committed.len().saturating_sub(self.keep_last_k)) {
            if Some(dir) == keep.as_ref() {
                continue;
            }
            self.delete(dir)?;
        }
        Ok(())
    }

    /// Reads and verifies one committed checkpoint.
    pub fn load(&self, dir: &str) -> Result<Checkpoint> {
        let corrupt = |reason: String| CheckpointError::Corrupt {
            uri: self.store.uri().to_string(),
            name: dir.to_string(),
            reason,
        };
        // An object the commit lists that is not there is the checkpoint's fault; any other failure the store's.
        let get = |key: &str| match self.store.blocking().get(key) {
            Err(StoreError::NotFound { .. }) => Err(corrupt(format!("{key} is missing"))),
            other => Ok(other?),
        };
        let commit_bytes = get(&format!("{dir}/{COMMIT}"))?;
        let commit = Commit::parse(&commit_bytes, dir).map_err(|e| corrupt(format!("{COMMIT}: {e}")))?;
        let mut objects = BTreeMap::new();
        for e in &commit.objects {
            // Sizes first: an object of another size than the commit's is not downloaded.
            let bytes = match self.store.blocking().get_sized(&e.key, e.bytes) {
                Err(StoreError::NotFound { .. }) => Err(corrupt(format!("{} is missing", e.key))),
                Err(StoreError::Size { found, .. }) => {
                    Err(corrupt(format!("{} has {found} bytes, the commit says {}", e.key, e.bytes)))
                }
                other => Ok(other?),
            }?;
            let sha = hex::encode(Sha256::digest(&bytes));
            if sha != e.sha256 {
                return Err(corrupt(format!("{}: SHA-256 {sha}, the commit says {}", e.key, e.sha256)));
            }
            objects.insert(e.key.rsplit('/').next().unwrap_or_default().to_string(), bytes);
        }
        let object = |file: &str| objects.get(file).ok_or_else(|| corrupt(format!("{file} is not in the commit")));
        let tensors = |file: &str| read_safetensors(object(file)?).map_err(|e| corrupt(format!("{file}: {e}")));
        Ok(Checkpoint {
            uri: self.store.uri().to_string(),
            name: dir.to_string(),
            commit_sha256: hex::encode(Sha256::digest(&commit_bytes)),
            state: parse_state(object("state.json")?).map_err(|e| corrupt(format!("state.json: {e}")))?,
            variables: tensors("variables.safetensors")?,
            optimizer: tensors("optimizer.safetensors")?,
        })
    }

    /// `latest` (the newest that verifies), `best` (the best validation F1 the newest one records) or a
    /// checkpoint name (`step-00001200`).
    pub fn select(&self, which: &str) -> Result<Checkpoint> {
        let latest =
            || self.latest_valid()?.ok_or_else(|| CheckpointError::NoneValid { uri: self.store.uri().to_string() });
        match which {
            "latest" => latest(),
            "best" => {
                let newest = latest()?;
                match newest.state.best {
                    Some(b) if checkpoint_name(b.step) != newest.name => self.committed_one(&checkpoint_name(b.step)),
                    _ => Ok(newest),
                }
            }
            dir => self.committed_one(dir),
        }
    }

    /// The committed checkpoint `dir`, verified; an error listing the committed ones when it is not one of them.
    fn committed_one(&self, dir: &str) -> Result<Checkpoint> {
        let committed = self.committed()?;
        if !committed.iter().any(|c| c == dir) {
            return Err(CheckpointError::Unknown {
                uri: self.store.uri().to_string(),
                name: dir.to_string(),
                committed: if committed.is_empty() { "none".into() } else { committed.join(", ") },
            });
        }
        self.load(dir)
    }

    /// The newest committed checkpoint that verifies; corrupt ones are reported and skipped. A store that
    /// cannot be read is an error (not a reason to go back to an older checkpoint).
    pub fn latest_valid(&self) -> Result<Option<Checkpoint>> {
        for dir in self.committed()?.iter().rev() {
            match self.load(dir) {
                Ok(ckpt) => return Ok(Some(ckpt)),
                Err(e @ CheckpointError::Corrupt { .. }) => tracing::warn!("{e}; trying the previous one"),
                Err(e) => return Err(e),
            }
        }
        Ok(None)
    }
}
