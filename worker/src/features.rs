//! The frozen-encoder feature cache. The CLIP and Wav2Vec 2.0 encoders never train, so `worker extract` runs
//! them once over every training clip and stores what the trainable head consumes; training then reads those
//! features instead of decoding frames and running the encoders, with the same sampler (sharding, order,
//! class balance, cursor and resume are unchanged) and the same results.
//!
//! - What is cached: per training clip (the clips of `data.frames_per_clip` / `data.stride`), its per-frame
//!   CLIP image embeddings, face mask and labels, and the Wav2Vec 2.0 states the adapter takes (the last layer,
//!   or every layer for the weighted sum) with their valid length. Audio is cached per clip, not per frame,
//!   because Wav2Vec 2.0 sees each clip's audio as one sequence (its attention and group norm span the clip).
//!   Validation and prediction read frames as before.
//! - Layout: one safetensors object per unit of the sampler (the clips whose target frame lies in one frame
//!   shard), `<video>/<unit:05>.safetensors`, stacked per field, in `f32` (exact) or `f16`.
//! - `features.json`, written last, is the commit point: the cache key, and every unit's size and SHA-256.
//!   The key holds the SHA-256 of both encoders' weight files, the preprocessing settings and the SHA-256 of
//!   the dataset's `manifest.json`; training refuses a cache whose key differs, saying what differs.
//! - Extraction runs under mpirun (videos balanced over ranks); a unit already in the store is not encoded or
//!   written again, so a killed extraction resumes where it stopped, and every object is written whole.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::io::Read;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::loader::{Loader, LoaderConfig, Source};
use avexpr_data::manifest::{Manifest, VideoRecord};
use avexpr_data::sampler::{Clip, Cursor, Plan, RankSampler, SamplerConfig, Target, unit_of, units_of};
use avexpr_data::store::{Store, StoreError};
use avexpr_model::FeatureBatch;
use avexpr_model::config::AudioLayers;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::dist::Dist;
use crate::job::{FeatureDtype, JobConfig};
use crate::session::{Session, raw_batch};

pub const CACHE_MANIFEST: &str = "features.json";
/// Written first: the settings the units in the store were made with (so a resumed extraction cannot mix).
pub const CACHE_KEY: &str = "key.json";

/// What cached features depend on: equal keys, equal features.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheKey {
    pub clip_weights_sha256: String,
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
        Ok(CacheKey {
            clip_weights_sha256: hash_checkpoint(&job.model.clip.checkpoint)?,
            wav2vec2_weights_sha256: hash_checkpoint(&job.model.wav2vec2.checkpoint)?,
            dataset_manifest_sha256: hex::encode(Sha256::digest(manifest_bytes)),
            preprocessing: Preprocessing {
                image_size: job.data.image_size,
                frames_per_clip: job.data.frames_per_clip,
                stride: job.data.stride,
                target: job.model.head.target,
                audio_states: job.model.adapter.layers,
                dtype,
            },
        })
    }

    /// What differs from `other` (the cache's), in words.
    pub fn differences(&self, cache: &CacheKey) -> Vec<String> {
        let mut out = Vec::new();
        if self.clip_weights_sha256 != cache.clip_weights_sha256 {
            out.push("the CLIP weights (model.clip.checkpoint) changed".into());
        }
        if self.wav2vec2_weights_sha256 != cache.wav2vec2_weights_sha256 {
            out.push("the Wav2Vec 2.0 weights (model.wav2vec2.checkpoint) changed".into());
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
        ];
        for (field, now, then) in fields {
            if now != then {
                out.push(format!("{field} is {now}, the cache was made with {then}"));
            }
        }
        out
    }
}

/// SHA-256 over an HF checkpoint directory's config and weight files (name and bytes, in name order).
fn hash_checkpoint(dir: &Path) -> Result<String> {
    let mut files: Vec<_> = std::fs::read_dir(dir)
        .with_context(|| format!("encoder checkpoint {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            name == "config.json" || name.ends_with(".safetensors") || name.ends_with(".bin")
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
}

fn unit_key(video: &str, unit: usize) -> String {
    format!("{video}/{unit:05}.safetensors")
}

/// One clip's features, on the CPU.
struct ClipFeatures {
    start: i64,
    fps: f64,
    target: i8,
    image: Vec<f32>,
    face_mask: Vec<u8>,
    labels: Vec<i8>,
    /// `[states, audio_valid, hidden]`.
    audio: Vec<f32>,
    audio_valid: i64,
}

/// The features of one unit as stored.
struct Unit {
    /// Clip start -> row.
    rows: HashMap<i64, usize>,
    frames: usize,
    image_dim: usize,
    states: usize,
    audio_frames: usize,
    hidden: usize,
    image: Vec<f32>,
    face_mask: Vec<u8>,
    labels: Vec<i8>,
    audio: Vec<f32>,
    audio_valid: Vec<i64>,
    fps: Vec<f64>,
    target: Vec<i8>,
}

fn to_bytes(values: &[f32], dtype: FeatureDtype) -> (Dtype, Vec<u8>) {
    match dtype {
        FeatureDtype::F32 => (Dtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        FeatureDtype::F16 => (Dtype::F16, values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
    }
}

fn from_bytes(view: &TensorView<'_>) -> Result<Vec<f32>> {
    match view.dtype() {
        Dtype::F32 => Ok(view.data().chunks_exact(4).map(|b| f32::from_le_bytes(b.try_into().expect("4"))).collect()),
        Dtype::F16 => Ok(view
            .data()
            .chunks_exact(2)
            .map(|b| half::f16::from_le_bytes(b.try_into().expect("2")).to_f32())
            .collect()),
        other => anyhow::bail!("unexpected dtype {other:?}"),
    }
}

fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> TensorView<'_> {
    TensorView::new(dtype, shape, data).expect("consistent shape")
}

/// Serializes a unit's clips (sorted by start).
fn write_unit(
    video: &str,
    unit: usize,
    mut clips: Vec<ClipFeatures>,
    dtype: FeatureDtype,
    dims: [usize; 4],
) -> Result<Vec<u8>> {
    clips.sort_by_key(|c| c.start);
    let [frames, image_dim, states, hidden] = dims;
    let n = clips.len();
    let t = clips.iter().map(|c| c.audio_valid as usize).max().unwrap_or(0).max(1);
    let mut audio = vec![0f32; n * states * t * hidden];
    for (i, c) in clips.iter().enumerate() {
        let v = c.audio_valid as usize;
        for s in 0..states {
            let src = &c.audio[s * v * hidden..(s + 1) * v * hidden];
            let dst = (i * states + s) * t * hidden;
            audio[dst..dst + v * hidden].copy_from_slice(src);
        }
    }
    let image: Vec<f32> = clips.iter().flat_map(|c| c.image.iter().copied()).collect();
    let (image_dtype, image_bytes) = to_bytes(&image, dtype);
    let (audio_dtype, audio_bytes) = to_bytes(&audio, dtype);
    let face_mask: Vec<u8> = clips.iter().flat_map(|c| c.face_mask.iter().copied()).collect();
    let labels: Vec<u8> = clips.iter().flat_map(|c| c.labels.iter().map(|&l| l as u8)).collect();
    let start: Vec<u8> = clips.iter().flat_map(|c| c.start.to_le_bytes()).collect();
    let valid: Vec<u8> = clips.iter().flat_map(|c| c.audio_valid.to_le_bytes()).collect();
    let fps: Vec<u8> = clips.iter().flat_map(|c| c.fps.to_le_bytes()).collect();
    let target: Vec<u8> = clips.iter().map(|c| c.target as u8).collect();
    let tensors = vec![
        ("image", view(image_dtype, vec![n, frames, image_dim], &image_bytes)),
        ("audio", view(audio_dtype, vec![n, states, t, hidden], &audio_bytes)),
        ("face_mask", view(Dtype::U8, vec![n, frames], &face_mask)),
        ("labels", view(Dtype::I8, vec![n, frames], &labels)),
        ("start", view(Dtype::I64, vec![n], &start)),
        ("audio_valid", view(Dtype::I64, vec![n], &valid)),
        ("fps", view(Dtype::F64, vec![n], &fps)),
        ("target", view(Dtype::I8, vec![n], &target)),
    ];
    // One entry: the header is written in the map's order, and a HashMap's differs from run to run.
    let meta = HashMap::from([("avexpr".to_string(), serde_json::json!({"video": video, "unit": unit}).to_string())]);
    Ok(safetensors::tensor::serialize(tensors, Some(meta))?)
}

fn read_unit(key: &str, bytes: &[u8]) -> Result<Unit> {
    let st = SafeTensors::deserialize(bytes).with_context(|| format!("feature unit {key}: not safetensors"))?;
    let get = |name: &str| st.tensor(name).with_context(|| format!("feature unit {key}: no `{name}`"));
    let image = get("image")?;
    let audio = get("audio")?;
    let [n, frames, image_dim] = image.shape()[..] else { anyhow::bail!("feature unit {key}: image shape") };
    let [_, states, audio_frames, hidden] = audio.shape()[..] else { anyhow::bail!("feature unit {key}: audio shape") };
    let i64s = |name: &str| -> Result<Vec<i64>> {
        Ok(get(name)?.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8"))).collect())
    };
    let start = i64s("start")?;
    let fps = get("fps")?.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8"))).collect();
    Ok(Unit {
        rows: start.iter().enumerate().map(|(i, s)| (*s, i)).collect(),
        frames,
        image_dim,
        states,
        audio_frames,
        hidden,
        image: from_bytes(&image)?,
        face_mask: get("face_mask")?.data().to_vec(),
        labels: get("labels")?.data().iter().map(|&b| b as i8).collect(),
        audio: from_bytes(&audio)?,
        audio_valid: i64s("audio_valid")?,
        fps,
        target: get("target")?.data().iter().map(|&b| b as i8).collect(),
    })
    .and_then(|u: Unit| {
        anyhow::ensure!(u.rows.len() == n, "feature unit {key}: repeated clip starts");
        Ok(u)
    })
}

pub struct ExtractReport {
    pub units_written: usize,
    pub units_skipped: usize,
    pub clips_encoded: usize,
    pub frames_encoded: usize,
    pub seconds: f64,
}

/// `worker extract`: this rank's share of the training clips through the frozen encoders, into the cache.
pub fn extract(job: &JobConfig, dist: &Dist) -> Result<ExtractReport> {
    let features = job.data.features.as_ref().context("data.features: say where the cache goes (uri)")?;
    let session = Session::open(job, dist)?;
    let (device, manifest) = (session.device, &session.manifest);
    let key = CacheKey::of(job, &session.manifest_bytes)?;
    let cache = Store::open(&features.uri).context("data.features.uri")?;
    cache.blocking().check_reachable(CACHE_KEY).context("data.features.uri")?;
    // No collective here: ranks start extracting independently (a stopped rank cannot hold the others).
    match cache.blocking().get(CACHE_KEY) {
        Err(StoreError::NotFound { .. }) if dist.rank == 0 => {
            cache.blocking().put(CACHE_KEY, serde_json::to_vec_pretty(&key)?.into())?;
        }
        Err(StoreError::NotFound { .. }) => {} // rank 0 writes it; its key is this key
        other => check_key(&key, &serde_json::from_slice(&other?)?, cache.uri())?,
    }

    let model = session.build_model()?;
    let cfg = SamplerConfig { shuffle_shards: 1, class_balanced: false, dense: false, ..job.sampler() };
    let videos: Vec<&VideoRecord> = manifest.videos.iter().filter(|v| v.split == Split::Train).collect();
    let plan = Plan::balanced(&videos, dist.world_size);
    // This rank's units: (video, unit) -> clips expected.
    let mut expected: BTreeMap<(String, usize), usize> = BTreeMap::new();
    for v in videos.iter().filter(|v| plan.ranks[&v.name] == dist.rank) {
        for (u, clips) in units_of(&cfg, v).iter().enumerate().filter(|(_, c)| !c.is_empty()) {
            expected.insert((v.name.clone(), u), clips.len());
        }
    }
    let mut records = Vec::new();
    let mut done = std::collections::BTreeSet::new();
    for ((video, unit), &clips) in &expected {
        let k = unit_key(video, *unit);
        let bytes = match cache.blocking().get(&k) {
            Err(StoreError::NotFound { .. }) => continue,
            other => other?,
        };
        // Objects are written whole, so one that does not parse is damage to report, not work to redo.
        read_unit(&k, &bytes)?;
        let sha256 = hex::encode(Sha256::digest(&bytes));
        records.push(UnitRecord {
            key: k,
            video: video.clone(),
            unit: *unit,
            clips,
            bytes: bytes.len() as u64,
            sha256,
        });
        done.insert((video.clone(), *unit));
    }
    let skipped = done.len();
    tracing::info!("extracting {} unit(s), {skipped} already in the cache", expected.len() - skipped);
    let started = Instant::now();
    let (mut clips_encoded, mut frames_encoded) = (0, 0);
    if done.len() < expected.len() {
        let sampler = RankSampler::new(manifest, Split::Train, dist.rank, dist.world_size, &cfg, None)?;
        let loader_cfg = LoaderConfig { augment: None, ..job.loader() };
        let index: HashMap<&str, &VideoRecord> = videos.iter().map(|v| (v.name.as_str(), *v)).collect();
        let loader = Loader::start(
            Source::Store(session.store.clone()),
            manifest.clone(),
            sampler,
            &loader_cfg,
            Cursor::default(),
            Some(1),
        )?;
        let mut pending: HashMap<(String, usize), Vec<ClipFeatures>> = HashMap::new();
        for batch in loader {
            let batch = batch.context("extraction data")?;
            let units: Vec<(String, usize)> = batch
                .clips
                .iter()
                .map(|c| {
                    let video = index[c.video.as_str()];
                    let clip = Clip {
                        video: c.video.clone(),
                        start: c.start,
                        frames: c.frames,
                        video_frames: video.frames,
                        target: c.target,
                    };
                    (c.video.clone(), unit_of(&cfg, video, &clip))
                })
                .collect();
            if units.iter().all(|u| done.contains(u)) {
                continue;
            }
            let (raw, _) = raw_batch(&batch);
            let feats = tch::no_grad(|| model.encode(&raw))?;
            clips_encoded += batch.len();
            frames_encoded += batch.len() * batch.frames;
            let cpu = |t: &Tensor| t.to_device(Device::Cpu).to_kind(Kind::Float).contiguous();
            let (image, audio) = (cpu(&feats.image_embeds), cpu(&feats.audio_states));
            let valid =
                Vec::<i64>::try_from(feats.audio_mask.sum_dim_intlist(1, false, Kind::Int64).to_device(Device::Cpu))?;
            let [_, frames, image_dim] = image.size()[..] else { unreachable!("[batch, frames, dim]") };
            let [_, states, _, hidden] = audio.size()[..] else { unreachable!("[batch, states, frames, hidden]") };
            for (i, (clip, unit)) in batch.clips.iter().zip(&units).enumerate() {
                if done.contains(unit) {
                    continue;
                }
                let f = frames as usize;
                let v = valid[i];
                let clip_audio = audio.get(i as i64).narrow(1, 0, v).contiguous();
                pending.entry(unit.clone()).or_default().push(ClipFeatures {
                    start: clip.start,
                    fps: clip.fps,
                    target: clip.target,
                    image: Vec::try_from(image.get(i as i64).reshape([-1]))?,
                    face_mask: batch.face_mask[i * f..(i + 1) * f].to_vec(),
                    labels: batch.labels[i * f..(i + 1) * f].to_vec(),
                    audio: Vec::try_from(clip_audio.reshape([-1]))?,
                    audio_valid: v,
                });
                if pending[unit].len() == expected[unit] {
                    let clips = pending.remove(unit).expect("pending unit");
                    let bytes = write_unit(
                        &unit.0,
                        unit.1,
                        clips,
                        features.dtype,
                        [f, image_dim as usize, states as usize, hidden as usize],
                    )?;
                    let k = unit_key(&unit.0, unit.1);
                    let sha256 = hex::encode(Sha256::digest(&bytes));
                    let len = bytes.len() as u64;
                    cache.blocking().put(&k, bytes.into())?;
                    records.push(UnitRecord {
                        key: k,
                        video: unit.0.clone(),
                        unit: unit.1,
                        clips: expected[unit],
                        bytes: len,
                        sha256,
                    });
                    done.insert(unit.clone());
                }
            }
        }
        anyhow::ensure!(pending.is_empty(), "extraction ended with {} unit(s) incomplete", pending.len());
    }
    let seconds = started.elapsed().as_secs_f64();
    let written = records.len() - skipped;

    // Rank 0 commits the cache with every rank's records.
    let mine = serde_json::to_vec(&records)?;
    if let Some(parts) = dist.gather_bytes(&mine) {
        let mut units: Vec<UnitRecord> = Vec::new();
        for p in parts {
            units.extend(serde_json::from_slice::<Vec<UnitRecord>>(&p)?);
        }
        units.sort_by(|a, b| a.key.cmp(&b.key));
        let precision = if device.is_cuda() { "bf16" } else { "f32" };
        let m =
            CacheManifest { key: key.clone(), extracted_with: format!("{device:?}, encoders in {precision}"), units };
        cache.blocking().put(CACHE_MANIFEST, serde_json::to_vec_pretty(&m)?.into())?;
    }
    dist.barrier();
    Ok(ExtractReport { units_written: written, units_skipped: skipped, clips_encoded, frames_encoded, seconds })
}

fn check_key(now: &CacheKey, cache: &CacheKey, uri: &str) -> Result<()> {
    let diff = now.differences(cache);
    anyhow::ensure!(
        diff.is_empty(),
        "the feature cache {uri} does not match this job: {}. Extract again (`worker extract`) into an empty \
         data.features.uri",
        diff.join("; ")
    );
    Ok(())
}

/// A committed cache: its store and its `features.json`.
#[derive(Clone)]
pub struct Cache {
    pub store: Store,
    pub manifest: Arc<CacheManifest>,
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

struct RawCached {
    frames: usize,
    image_dim: usize,
    states: usize,
    hidden: usize,
    audio_frames: usize,
    image: Vec<f32>,
    face_mask: Vec<u8>,
    labels: Vec<i8>,
    audio: Vec<f32>,
    valid: Vec<i64>,
    fps: Vec<f64>,
    cursor: Cursor,
}

impl RawCached {
    fn into_batch(self, device: Device) -> CachedBatch {
        let n = self.fps.len() as i64;
        let (f, t) = (self.frames as i64, self.audio_frames as i64);
        let image_embeds = Tensor::from_slice(&self.image).view([n, f, self.image_dim as i64]).to_device(device);
        let face_mask = Tensor::from_slice(&self.face_mask).view([n, f]).to_kind(Kind::Bool).to_device(device);
        let audio_states =
            Tensor::from_slice(&self.audio).view([n, self.states as i64, t, self.hidden as i64]).to_device(device);
        let audio_mask = avexpr_model::length_mask(&Tensor::from_slice(&self.valid).to_device(device), t);
        let labels = Tensor::from_slice(&self.labels).view([n, f]).to_kind(Kind::Int64);
        CachedBatch {
            features: FeatureBatch { image_embeds, face_mask, audio_states, audio_mask, fps: self.fps },
            labels,
            cursor: self.cursor,
            len: n as usize,
        }
    }
}

/// Training batches from the cache, in the sampler's order (the same clips, batches and cursors as the frame
/// loader), prepared by a background thread that holds at most `shuffle_shards + 1` units.
pub struct FeatureLoader {
    batches: std::sync::mpsc::Receiver<Result<RawCached>>,
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
                let bytes = cache.blocking().get(key).with_context(|| format!("feature unit {key}"))?;
                let sha = hex::encode(Sha256::digest(&bytes));
                anyhow::ensure!(
                    bytes.len() as u64 == record.bytes && sha == record.sha256,
                    "feature unit {}/{key}: {} bytes, SHA-256 {sha}; {CACHE_MANIFEST} says {} bytes, {}",
                    cache.uri(),
                    bytes.len(),
                    record.bytes,
                    record.sha256
                );
                let unit = Arc::new(read_unit(key, &bytes)?);
                resident.push_back((key.to_string(), unit.clone()));
                if resident.len() > keep {
                    resident.pop_front();
                }
                Ok(unit)
            };
            for (clip, cursor) in sampler.stream(cursor) {
                let step = (|| -> Result<Option<RawCached>> {
                    let video = index
                        .get(clip.video.as_str())
                        .with_context(|| format!("video {} not in the manifest", clip.video))?;
                    let key = unit_key(&clip.video, unit_of(&cfg, video, &clip));
                    let unit = load(&key)?;
                    let row = *unit
                        .rows
                        .get(&clip.start)
                        .with_context(|| format!("feature unit {key}: no clip starting at frame {}", clip.start))?;
                    anyhow::ensure!(
                        unit.target[row] == clip.target,
                        "feature unit {key}: clip at frame {} is labelled {} in the cache, {} in the dataset",
                        clip.start,
                        unit.target[row],
                        clip.target
                    );
                    picked.push((unit, row));
                    if picked.len() == batch_size || cursor.position == epoch_len {
                        return Ok(Some(gather(std::mem::take(&mut picked), cursor)));
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

/// Stacks the picked rows, padding the audio to the longest.
fn gather(picked: Vec<(Arc<Unit>, usize)>, cursor: Cursor) -> RawCached {
    let first = &picked[0].0;
    let (frames, image_dim, states, hidden) = (first.frames, first.image_dim, first.states, first.hidden);
    let t = picked.iter().map(|(u, r)| u.audio_valid[*r] as usize).max().unwrap_or(0).max(1);
    let n = picked.len();
    let mut out = RawCached {
        frames,
        image_dim,
        states,
        hidden,
        audio_frames: t,
        image: Vec::with_capacity(n * frames * image_dim),
        face_mask: Vec::with_capacity(n * frames),
        labels: Vec::with_capacity(n * frames),
        audio: vec![0.0; n * states * t * hidden],
        valid: Vec::with_capacity(n),
        fps: Vec::with_capacity(n),
        cursor,
    };
    for (i, (u, r)) in picked.iter().enumerate() {
        let r = *r;
        out.image.extend_from_slice(&u.image[r * frames * image_dim..(r + 1) * frames * image_dim]);
        out.face_mask.extend_from_slice(&u.face_mask[r * frames..(r + 1) * frames]);
        out.labels.extend_from_slice(&u.labels[r * frames..(r + 1) * frames]);
        let v = u.audio_valid[r] as usize;
        for s in 0..states {
            let src = (r * u.states + s) * u.audio_frames * hidden;
            let dst = (i * states + s) * t * hidden;
            out.audio[dst..dst + v * hidden].copy_from_slice(&u.audio[src..src + v * hidden]);
        }
        out.valid.push(u.audio_valid[r]);
        out.fps.push(u.fps[r]);
    }
    out
}
