//! The dataset's manifest (`manifest.json`, written last by `data ingest`): every video's record (split,
//! frames, fps, audio, labels as runs, shards with their sizes and SHA-256s) and the failures. What the
//! sampler, the loader, the feature cache and the planners read; the ingest that writes it is `crate::ingest`.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::affwild2::NUM_CLASSES;
use crate::annotation::LabelAlignment;
use crate::layout::Split;
use crate::store::{Store, StoreError};

pub const MANIFEST: &str = "manifest.json";
pub const FORMAT: &str = "avexpr-shards-2";
pub const LABEL_POLICY: &str = "label line i belongs to decoded frame i; labels beyond the last frame are dropped; \
                                frames beyond the last label are labelled -1 (ignored)";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaceSource {
    /// The dataset's aligned crops (`cropped_aligned*`); a frame without a crop gets the nearest earlier one.
    Crops,
    /// The whole decoded frame, resized to `face_size` x `face_size`.
    FullFrame,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShardRecord {
    pub key: String,
    pub bytes: u64,
    pub sha256: String,
    pub first_frame: usize,
    pub frames: usize,
    pub segments: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VideoRecord {
    pub name: String,
    /// The settings of the ingest that wrote it (`IngestConfig::settings`): a record written under other
    /// settings is redone, not reused.
    pub settings: String,
    pub split: Split,
    /// Relative to the dataset root.
    pub media: String,
    pub frames: usize,
    pub fps: f64,
    pub audio_samples: usize,
    pub has_audio: bool,
    /// `None` for test videos (no annotation).
    pub labels: Option<LabelAlignment>,
    pub label_histogram: [u64; NUM_CLASSES],
    /// The per-frame labels after the mismatch policy, run-length encoded as (label, run length): what the
    /// loader plans clips from without reading shards.
    pub label_runs: Vec<(i8, u32)>,
    pub ignored_frames: u64,
    pub face_missing: u64,
    pub shards: Vec<ShardRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Failure {
    pub video: String,
    pub error: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: String,
    pub segment_frames: usize,
    pub face_source: FaceSource,
    pub face_size: u32,
    pub audio_rate: u32,
    pub label_policy: String,
    pub videos: Vec<VideoRecord>,
    pub failures: Vec<Failure>,
    /// Share of each class among the labelled training frames.
    pub class_ratios: [f64; NUM_CLASSES],
}

impl VideoRecord {
    /// The per-frame labels (after the mismatch policy), expanded from `label_runs`.
    pub fn labels(&self) -> Vec<i8> {
        self.label_runs.iter().flat_map(|&(l, n)| std::iter::repeat_n(l, n as usize)).collect()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{uri}/{MANIFEST}: {reason}")]
    Malformed { uri: String, reason: String },
}

/// Reads a manifest back.
pub fn read_manifest(store: &Store) -> Result<Manifest, ManifestError> {
    Ok(read_manifest_bytes(store)?.1)
}

/// Reads a manifest back with its bytes (whose hash identifies the dataset, e.g. in a feature cache's key).
pub fn read_manifest_bytes(store: &Store) -> Result<(Bytes, Manifest), ManifestError> {
    store.blocking().check_reachable(MANIFEST)?;
    let bytes = store.blocking().get(MANIFEST)?;
    let manifest = serde_json::from_slice(&bytes)
        .map_err(|e| ManifestError::Malformed { uri: store.uri().to_string(), reason: e.to_string() })?;
    Ok((bytes, manifest))
}
