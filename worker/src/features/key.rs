//! What a cache was made from and what it holds: the key (`key.json`: both encoders' weights, the
//! preprocessing, the dataset's manifest) and the commit (`features.json`: every unit's size and SHA-256).

use std::io::Read;
use std::path::Path;

use anyhow::{Context, Result};
use avexpr_data::config::FeatureDtype;
use avexpr_data::sampler::Target;
use avexpr_model::config::{AudioLayers, ImageEncoder};
use avexpr_model::locate::{locate_encoders, locate_image_encoder};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::job::JobConfig;

pub const CACHE_MANIFEST: &str = "features.json";
/// Written first: the settings the units in the store were made with (so a resumed extraction cannot mix).
pub const CACHE_KEY: &str = "key.json";

/// What cached features depend on: equal keys, equal features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheKey {
    /// Over config.json, preprocessor_config.json and the weights (the name kept from earlier caches).
    pub clip_weights_sha256: String,
    /// The face-frame encoder's, when it is not CLIP's vision tower (`model.image_encoder: dinov2`); absent in
    /// caches of CLIP features (and in those made before there was a choice).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dinov2_weights_sha256: Option<String>,
    pub wav2vec2_weights_sha256: String,
    pub dataset_manifest_sha256: String,
    pub preprocessing: Preprocessing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    pub image_size: u32,
    pub frames_per_clip: usize,
    pub stride: usize,
    /// `last` or `center`: which frame a clip is labelled by (decides the unit a clip belongs to).
    pub target: Target,
    /// `last` or `weighted_sum`: which Wav2Vec 2.0 states are kept.
    pub audio_states: AudioLayers,
    pub dtype: FeatureDtype,
    /// `data.folds`: which videos are training videos (absent without folds, as in caches made before them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub folds: Option<avexpr_data::folds::FoldConfig>,
}

/// A setting's value as the job file writes it (`last`, `weighted_sum`, `f16`).
fn yaml_name(value: &impl Serialize) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        other => format!("{other:?}"),
    }
}

impl CacheKey {
    /// The key of `job`'s settings on the dataset whose `manifest.json` is `manifest_bytes`.
    pub fn of(job: &JobConfig, manifest_bytes: &[u8]) -> Result<CacheKey> {
        let dtype = job.data.features.as_ref().map_or(FeatureDtype::F32, |f| f.dtype);
        let (clip, wav2vec2) = locate_encoders(&job.model)?;
        let dinov2 = match job.model.image_encoder {
            ImageEncoder::Clip => None,
            ImageEncoder::Dinov2 => Some(hash_checkpoint(&locate_image_encoder(&job.model)?)?),
        };
        Ok(CacheKey {
            clip_weights_sha256: hash_checkpoint(&clip)?,
            dinov2_weights_sha256: dinov2,
            wav2vec2_weights_sha256: hash_checkpoint(&wav2vec2)?,
            dataset_manifest_sha256: hex::encode(Sha256::digest(manifest_bytes)),
            preprocessing: Preprocessing {
                image_size: job.data.image_size,
                frames_per_clip: job.data.frames_per_clip,
                stride: job.data.stride,
                target: job.model.head.target,
                audio_states: job.model.adapter.layers,
                dtype,
                folds: job.data.folds,
            },
        })
    }

    /// What differs from `other` (the cache's), in words.
    pub fn differences(&self, cache: &CacheKey) -> Vec<String> {
        let mut out = Vec::new();
        if self.clip_weights_sha256 != cache.clip_weights_sha256 {
            out.push("the CLIP weights or preprocessing (model.clip.checkpoint) changed".into());
        }
        if self.dinov2_weights_sha256 != cache.dinov2_weights_sha256 {
            out.push("the image encoder (model.image_encoder, model.dinov2.checkpoint) changed".into());
        }
        if self.wav2vec2_weights_sha256 != cache.wav2vec2_weights_sha256 {
            out.push("the Wav2Vec 2.0 weights or preprocessing (model.wav2vec2.checkpoint) changed".into());
        }
        if self.dataset_manifest_sha256 != cache.dataset_manifest_sha256 {
            out.push("the dataset changed (data.shards: another manifest.json)".into());
        }
        let (a, b) = (&self.preprocessing, &cache.preprocessing);
        let fields = [
            ("data.image_size", a.image_size.to_string(), b.image_size.to_string()),
            ("data.frames_per_clip", a.frames_per_clip.to_string(), b.frames_per_clip.to_string()),
            ("data.stride", a.stride.to_string(), b.stride.to_string()),
            ("model.head.target", yaml_name(&a.target), yaml_name(&b.target)),
            ("model.adapter.layers", yaml_name(&a.audio_states), yaml_name(&b.audio_states)),
            ("data.features.dtype", yaml_name(&a.dtype), yaml_name(&b.dtype)),
            ("data.folds", format!("{:?}", a.folds), format!("{:?}", b.folds)),
        ];
        for (field, now, then) in fields {
            if now != then {
                out.push(format!("{field} is {now}, the cache was made with {then}"));
            }
        }
        out
    }
}

/// SHA-256 over an HF checkpoint directory's config, preprocessing config and weight files (name and bytes, in
/// name order).
fn hash_checkpoint(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("encoder checkpoint {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            // preprocessor_config.json: the image mean/std and the audio normalisation the encoders' inputs get.
            name == "config.json"
                || name == "preprocessor_config.json"
                || name.ends_with(".safetensors")
                || name.ends_with(".bin")
        })
        .collect();
    files.sort();
    anyhow::ensure!(!files.is_empty(), "encoder checkpoint {}: no config or weight files", dir.display());
    let mut sha = Sha256::new();
    let mut buffer = vec![0u8; 1 << 20];
    for path in files {
        sha.update(path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default().as_bytes());
        let mut file = std::fs::File::open(&path).with_context(|| path.display().to_string())?;
        loop {
            let n = file.read(&mut buffer)?;
            if n == 0 {
                break;
            }
            sha.update(&buffer[..n]);
        }
    }
    Ok(hex::encode(sha.finalize()))
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UnitRecord {
    pub key: String,
    pub video: String,
    pub unit: usize,
    pub clips: usize,
    pub bytes: u64,
    pub sha256: String,
}

/// `features.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheManifest {
    pub key: CacheKey,
    /// Encoder device and precision of the extraction (values differ slightly between bf16 and f32).
    pub extracted_with: String,
    pub units: Vec<UnitRecord>,
    /// Per-frame image embeddings, one object per video of every split (absent from caches made before them).
    #[serde(default)]
    pub frames: Vec<super::FramesRecord>,
}

pub(super) fn check_key(now: &CacheKey, cache: &CacheKey, uri: &str) -> Result<()> {
    let diff = now.differences(cache);
    anyhow::ensure!(
        diff.is_empty(),
        "the feature cache {uri} does not match this job: {}. Extract again (`worker extract`) into an empty \
         data.features.uri",
        diff.join("; ")
    );
    Ok(())
}
