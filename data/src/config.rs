//! The `data` section of a job config, owned here because every field of it is read here: where the ingested
//! shards are, how clips are cut ([`SamplerConfig`]), read and augmented ([`LoaderConfig`]), and the optional
//! frozen-encoder feature cache. The sampler and loader settings are built from it, with the few values that
//! come from other sections (the target frame, the seed, the micro-batch) passed in.

use serde::{Deserialize, Serialize};

use crate::loader::{AugmentConfig, LoaderConfig, LoaderError};
use crate::sampler::{SamplerConfig, SamplerError, Target};

/// `data`: where the ingested shards are and how clips are cut, read and augmented.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DataConfig {
    /// The ingest output: `s3://bucket/prefix` (AWS_* environment), `file:///dir` or a path.
    pub shards: String,
    /// Frames per clip (the temporal window).
    pub frames_per_clip: usize,
    /// Frames between the starts of consecutive training windows.
    pub stride: usize,
    /// Draw windows so that every class is seen equally often (by target-frame label).
    pub class_balanced: bool,
    /// Shards whose clips are shuffled together: more mixes better and needs more prefetch memory.
    pub shuffle_shards: usize,
    /// Side of the square face images delivered; 0: as stored (the manifest's `face_size`).
    pub image_size: u32,
    /// Train-time augmentation; `null`: none.
    pub augment: Option<AugmentConfig>,
    /// Shard bytes resident at once (being fetched, waiting, or being cut into clips).
    pub prefetch_bytes: u64,
    /// Shard requests in flight at once.
    pub fetch_concurrency: usize,
    pub decode_threads: usize,
    /// Batches ready ahead of the consumer.
    pub ready_batches: usize,
    /// Skip (and count) clips whose shard is missing or corrupt or whose frames do not decode, instead of
    /// failing.
    pub skip_bad: bool,
    /// A frozen-encoder feature cache (`worker extract` writes it, training reads it instead of frames).
    pub features: Option<FeaturesConfig>,
    /// k-fold cross-validation: the training and validation videos re-split by video, fold `fold` validating
    /// (`orchestrator folds` runs every fold).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folds: Option<crate::folds::FoldConfig>,
}

/// `data.features`: where the feature cache is and how its values are stored.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FeaturesConfig {
    /// Store URI of the cache (e.g. next to the shards: `s3://bucket/affwild2-features`).
    pub uri: String,
    /// `f32` (exact) or `f16` (half the size).
    pub dtype: FeatureDtype,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatureDtype {
    #[default]
    F32,
    F16,
}

impl Default for FeaturesConfig {
    fn default() -> Self {
        Self { uri: String::new(), dtype: FeatureDtype::F32 }
    }
}

impl Default for DataConfig {
    /// The sampler's and the loader's defaults.
    fn default() -> Self {
        let (s, l) = (SamplerConfig::default(), LoaderConfig::default());
        Self {
            shards: String::new(),
            frames_per_clip: s.frames_per_clip,
            stride: s.stride,
            class_balanced: s.class_balanced,
            shuffle_shards: s.shuffle_shards,
            image_size: l.image_size,
            augment: l.augment,
            prefetch_bytes: l.prefetch_bytes,
            fetch_concurrency: l.fetch_concurrency,
            decode_threads: l.decode_threads,
            ready_batches: l.ready_batches,
            skip_bad: l.skip_bad,
            features: None,
            folds: None,
        }
    }
}

/// A `data` field that is invalid, by its path in the job file (`data.stride`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct DataConfigError {
    pub field: &'static str,
    pub reason: String,
}

impl DataConfig {
    /// The training windows of this section: strided, labelled at `target`, shuffled from `seed`.
    pub fn sampler(&self, target: Target, seed: u64) -> SamplerConfig {
        SamplerConfig {
            frames_per_clip: self.frames_per_clip,
            stride: self.stride,
            target,
            class_balanced: self.class_balanced,
            dense: false,
            shuffle_shards: self.shuffle_shards,
            seed,
        }
    }

    /// The training loader of this section, delivering `batch_size` clips per batch.
    pub fn loader(&self, batch_size: usize) -> LoaderConfig {
        LoaderConfig {
            batch_size,
            image_size: self.image_size,
            augment: self.augment.clone(),
            prefetch_bytes: self.prefetch_bytes,
            fetch_concurrency: self.fetch_concurrency,
            decode_threads: self.decode_threads,
            ready_batches: self.ready_batches,
            skip_bad: self.skip_bad,
        }
    }

    /// Checks every field; the error names the first invalid one.
    pub fn validate(&self) -> Result<(), DataConfigError> {
        let bad = |field, reason: &str| Err(DataConfigError { field, reason: reason.into() });
        if self.shards.is_empty() {
            return bad("data.shards", "missing: the ingest output (s3://bucket/prefix, file:///dir or a path)");
        }
        if let Some(f) = &self.features {
            if f.uri.is_empty() {
                return bad("data.features.uri", "missing: where `worker extract` writes the cache");
            }
            if self.augment.is_some() {
                return bad(
                    "data.augment",
                    "train-time augmentation cannot apply to cached features (data.features): set \
                     `augment: null`, or remove data.features to train from frames",
                );
            }
        }
        if let Some(f) = &self.folds {
            if f.k < 2 {
                return bad("data.folds.k", "must be at least 2");
            }
            if f.fold >= f.k {
                return bad("data.folds.fold", "must be in 0..k");
            }
        }
        self.sampler(Target::Last, 0).validate().map_err(|e| match e {
            SamplerError::Config { field, reason } => DataConfigError { field, reason },
            other => DataConfigError { field: "data", reason: other.to_string() },
        })?;
        self.loader(1).validate().map_err(|e| match e {
            LoaderError::Config { field, reason } => DataConfigError { field, reason },
            other => DataConfigError { field: "data", reason: other.to_string() },
        })
    }
}
