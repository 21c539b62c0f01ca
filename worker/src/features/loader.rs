//! Training from a committed cache: opening it (its key must match the job's) and the loader that yields
//! the frame loader's batches, in the same order, from the stored features.

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use anyhow::{Context, Result};
use avexpr_data::manifest::{Manifest, VideoRecord};
use avexpr_data::sampler::{Cursor, RankSampler, unit_of};
use avexpr_data::store::{Store, StoreError};
use avexpr_model::FeatureBatch;
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::job::JobConfig;

use super::frames::read_frames;
use super::key::{CACHE_MANIFEST, CacheKey, CacheManifest, UnitRecord, check_key};
use super::unit::{Dims, FeatureRows, Unit, read_unit, unit_key};

/// A committed cache: its store and its `features.json`.
#[derive(Clone)]
pub struct Cache {
    pub store: Store,
    pub manifest: Arc<CacheManifest>,
}

impl Cache {
    /// A video's per-frame image embeddings and the padding crop's (`[frames, dim]`, `[1, dim]`), checked
    /// against `features.json`.
    pub fn frames(&self, video: &str) -> Result<(Tensor, Tensor)> {
        let record = self.manifest.frames.iter().find(|r| r.video == video).with_context(|| {
            format!("the feature cache {} has no frame embeddings of video {video}", self.store.uri())
        })?;
        let bytes = get_verified(&self.store, &record.key, record.bytes, &record.sha256)?;
        read_frames(&record.key, &bytes, record.frames)
    }
}

/// An object of the cache as `features.json` lists it: its bytes, checked for size and SHA-256.
fn get_verified(store: &Store, key: &str, size: u64, sha256: &str) -> Result<bytes::Bytes> {
    let bytes = store.blocking().get(key).with_context(|| format!("feature cache object {key}"))?;
    let sha = hex::encode(Sha256::digest(&bytes));
    anyhow::ensure!(
        bytes.len() as u64 == size && sha == sha256,
        "feature cache object {}/{key}: {} bytes, SHA-256 {sha}; {CACHE_MANIFEST} says {size} bytes, {sha256}",
        store.uri(),
        bytes.len()
    );
    Ok(bytes)
}

/// Opens the job's cache for training: committed, and made with this job's settings.
pub fn open_cache(job: &JobConfig, manifest_bytes: &[u8]) -> Result<Cache> {
    let features = job.data.features.as_ref().context("data.features")?;
    let cache = Store::open(&features.uri).context("data.features.uri")?;
    cache.blocking().check_reachable(CACHE_MANIFEST).context("data.features.uri")?;
    let bytes = match cache.blocking().get(CACHE_MANIFEST) {
        Err(StoreError::NotFound { .. }) => anyhow::bail!(
            "data.features.uri: {} holds no committed feature cache ({CACHE_MANIFEST}): run `worker extract --config ...` first",
            cache.uri()
        ),
        other => other?,
    };
    let m: CacheManifest =
        serde_json::from_slice(&bytes).with_context(|| format!("{}/{CACHE_MANIFEST}", cache.uri()))?;
    check_key(&CacheKey::of(job, manifest_bytes)?, &m.key, cache.uri())?;
    Ok(Cache { store: cache, manifest: Arc::new(m) })
}

/// A batch read from the cache: what the encoders would have produced, and the per-frame labels.
pub struct CachedBatch {
    pub features: FeatureBatch,
    pub labels: Tensor,
    pub cursor: Cursor,
    pub len: usize,
}

/// A batch gathered on the loader thread, made tensors on the consumer's.
struct Gathered {
    rows: FeatureRows,
    cursor: Cursor,
}

impl Gathered {
    fn into_batch(self, device: Device) -> CachedBatch {
        let r = self.rows;
        let Dims { frames, image_dim, states, hidden } = r.dims;
        let (n, f, t) = (r.len() as i64, frames as i64, r.audio_frames as i64);
        let image_embeds = Tensor::from_slice(&r.image).view([n, f, image_dim as i64]).to_device(device);
        let face_mask = Tensor::from_slice(&r.face_mask).view([n, f]).to_kind(Kind::Bool).to_device(device);
        let audio_states = Tensor::from_slice(&r.audio).view([n, states as i64, t, hidden as i64]).to_device(device);
        let audio_mask = avexpr_model::length_mask(&Tensor::from_slice(&r.audio_valid).to_device(device), t);
        let labels = Tensor::from_slice(&r.labels).view([n, f]).to_kind(Kind::Int64);
        CachedBatch {
            features: FeatureBatch { image_embeds, face_mask, audio_states, audio_mask, fps: r.fps },
            labels,
            cursor: self.cursor,
            len: n as usize,
        }
    }
}

/// Training batches from the cache, in the sampler's order (the same clips, batches and cursors as the frame
/// loader), prepared by a background thread that holds at most `shuffle_shards + 1` units.
pub struct FeatureLoader {
    batches: std::sync::mpsc::Receiver<Result<Gathered>>,
    device: Device,
}

impl FeatureLoader {
    pub fn start(
        cache: Cache,
        manifest: Arc<Manifest>,
        sampler: RankSampler,
        batch_size: usize,
        cursor: Cursor,
        ready: usize,
        device: Device,
    ) -> Result<FeatureLoader> {
        let (tx, rx) = std::sync::mpsc::sync_channel(ready.max(1));
        let Cache { store: cache, manifest: cache_manifest } = cache;
        let records: HashMap<String, UnitRecord> =
            cache_manifest.units.iter().map(|u| (u.key.clone(), u.clone())).collect();
        std::thread::Builder::new().name("features".into()).spawn(move || {
            let cfg = sampler.config().clone();
            let keep = cfg.shuffle_shards + 1;
            let epoch_len = sampler.len();
            let index: HashMap<&str, &VideoRecord> = manifest.videos.iter().map(|v| (v.name.as_str(), v)).collect();
            let mut resident: VecDeque<(String, Arc<Unit>)> = VecDeque::new();
            let mut picked: Vec<(Arc<Unit>, usize)> = Vec::with_capacity(batch_size);
            let mut load = |key: &str| -> Result<Arc<Unit>> {
                if let Some((_, u)) = resident.iter().find(|(k, _)| k == key) {
                    return Ok(u.clone());
                }
                let record =
                    records.get(key).with_context(|| format!("feature cache: no unit {key} in {CACHE_MANIFEST}"))?;
                let bytes = get_verified(&cache, key, record.bytes, &record.sha256)?;
                let unit = Arc::new(read_unit(key, &bytes)?);
                resident.push_back((key.to_string(), unit.clone()));
                if resident.len() > keep {
                    resident.pop_front();
                }
                Ok(unit)
            };
            for (clip, cursor) in sampler.stream(cursor) {
                let step = (|| -> Result<Option<Gathered>> {
                    let video = index
                        .get(clip.video.as_str())
                        .with_context(|| format!("video {} not in the manifest", clip.video))?;
                    let key = unit_key(&clip.video, unit_of(&cfg, video, clip.start));
                    let unit = load(&key)?;
                    let row = *unit
                        .by_start
                        .get(&clip.start)
                        .with_context(|| format!("feature unit {key}: no clip starting at frame {}", clip.start))?;
                    anyhow::ensure!(
                        unit.rows.target[row] == clip.target,
                        "feature unit {key}: clip at frame {} is labelled {} in the cache, {} in the dataset",
                        clip.start,
                        unit.rows.target[row],
                        clip.target
                    );
                    picked.push((unit, row));
                    if picked.len() == batch_size || cursor.position == epoch_len {
                        let rows: Vec<_> = picked.iter().map(|(unit, row)| unit.rows.row(*row)).collect();
                        let rows = FeatureRows::stack(picked[0].0.rows.dims, &rows);
                        picked.clear();
                        return Ok(Some(Gathered { rows, cursor }));
                    }
                    Ok(None)
                })();
                let failed = step.is_err();
                match step {
                    Ok(None) => continue,
                    Ok(Some(b)) => {
                        if tx.send(Ok(b)).is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e));
                    }
                }
                if failed {
                    return;
                }
            }
        })?;
        Ok(FeatureLoader { batches: rx, device })
    }

    pub fn next_batch(&mut self) -> Result<CachedBatch> {
        let raw = self.batches.recv().context("the feature loader stopped")??;
        Ok(raw.into_batch(self.device))
    }
}
