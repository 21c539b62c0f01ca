//! `worker extract`: each rank's share of the training clips through the frozen encoders, and of every
//! split's frames through the image encoder, into the cache; objects already in the store are skipped, and
//! `features.json` is written last.

use std::collections::{BTreeMap, HashMap};
use std::time::Instant;

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::loader::{Loader, LoaderConfig, Source};
use avexpr_data::manifest::VideoRecord;
use avexpr_data::sampler::{Assignment, Cursor, RankSampler, SamplerConfig, unit_of, units_of};
use avexpr_data::store::{Store, StoreError};
use sha2::{Digest, Sha256};
use tch::{Device, Kind, Tensor};

use crate::dist::Dist;
use crate::job::JobConfig;
use crate::session::{Session, raw_batch};

use super::frames::{FramesRecord, extract_frames};
use super::key::{CACHE_KEY, CACHE_MANIFEST, CacheKey, CacheManifest, UnitRecord, check_key};
use super::unit::{ClipFeatures, Dims, read_unit, unit_key, write_unit};

pub struct ExtractReport {
    pub units_written: usize,
    pub units_skipped: usize,
    pub clips_encoded: usize,
    pub frames_encoded: usize,
    /// Videos whose per-frame image embeddings were written, and the faces encoded for them.
    pub videos_written: usize,
    pub faces_encoded: usize,
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
    // No collective here: ranks start extracting independently (a stopped rank cannot hold the others). Every
    // rank writes the key if there is none yet (create-only) and then checks the one there: no rank writes
    // units into a cache of other settings, whoever comes first.
    cache.blocking().put_if_absent(CACHE_KEY, serde_json::to_vec_pretty(&key)?.into())?;
    let stored = cache.blocking().get(CACHE_KEY)?;
    let stored =
        serde_json::from_slice(&stored).with_context(|| format!("{}/{CACHE_KEY}: not a cache key", cache.uri()))?;
    check_key(&key, &stored, cache.uri())?;

    let model = session.build_model()?;
    let cfg = SamplerConfig { shuffle_shards: 1, class_balanced: false, dense: false, ..job.sampler() };
    let videos: Vec<&VideoRecord> = manifest.videos.iter().filter(|v| v.split == Split::Train).collect();
    let plan = Assignment::balanced(&videos, dist.world_size);
    // This rank's units: (video, unit) -> clips expected.
    let mut expected: BTreeMap<(String, usize), usize> = BTreeMap::new();
    for v in videos.iter().filter(|v| plan.slot_of[&v.name] == dist.rank) {
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
        let sampler_len = sampler.len();
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
        let progress = avexpr_data::progress::Progress::new("extract", "clips", sampler_len as u64);
        for batch in loader {
            let batch = batch.context("extraction data")?;
            progress.inc(batch.len() as u64);
            let units: Vec<(String, usize)> = batch
                .clips
                .iter()
                .map(|c| (c.video.clone(), unit_of(&cfg, index[c.video.as_str()], c.start)))
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
                        Dims {
                            frames: f,
                            image_dim: image_dim as usize,
                            states: states as usize,
                            hidden: hidden as usize,
                        },
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
        progress.finish();
        anyhow::ensure!(pending.is_empty(), "extraction ended with {} unit(s) incomplete", pending.len());
    }
    let written = records.len() - skipped;
    // Every split's faces, once each, for dense evaluation and prediction.
    let frames = extract_frames(&session, &model, &cache, features.dtype)?;
    let seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        "frame embeddings: {} video(s) written, {} already there; {} frames encoded",
        frames.written,
        frames.records.len() - frames.written,
        frames.frames_encoded
    );

    // Rank 0 commits the cache with every rank's records.
    let mine = serde_json::to_vec(&(records, frames.records))?;
    if let Some(parts) = dist.gather_bytes(&mine) {
        let (mut units, mut frames): (Vec<UnitRecord>, Vec<FramesRecord>) = (Vec::new(), Vec::new());
        for p in parts {
            let (u, f): (Vec<UnitRecord>, Vec<FramesRecord>) = serde_json::from_slice(&p)?;
            units.extend(u);
            frames.extend(f);
        }
        units.sort_by(|a, b| a.key.cmp(&b.key));
        frames.sort_by(|a, b| a.key.cmp(&b.key));
        let precision = if device.is_cuda() { "bf16" } else { "f32" };
        let m = CacheManifest {
            key: key.clone(),
            extracted_with: format!("{device:?}, encoders in {precision}"),
            units,
            frames,
        };
        cache.blocking().put(CACHE_MANIFEST, serde_json::to_vec_pretty(&m)?.into())?;
    }
    dist.barrier();
    Ok(ExtractReport {
        units_written: written,
        units_skipped: skipped,
        clips_encoded,
        frames_encoded,
        videos_written: frames.written,
        faces_encoded: frames.frames_encoded,
        seconds,
    })
}
