//! `data ingest --root DIR --out URI`: decodes each video once and writes WebDataset-style tar shards
//! (readable with plain `tar`) of fixed-length segments of one video to an object store, then the JSON manifest
//! ([`crate::manifest`]).
//!
//! A sample (one segment) is the files `<key>.<i>.jpg` (face of frame `first + i`), `<key>.audio.f32` (16 kHz
//! mono little-endian PCM of exactly those frames: `[first / fps, (first + n) / fps)`), `<key>.labels.i8` (per
//! frame, -1 = ignored), `<key>.mask.u8` (1 where the frame had no face crop and the nearest earlier one was
//! used) and `<key>.json` (video, split, first frame, frames, fps). Keys have no dots, as WebDataset splits
//! names at the first dot.
//!
//! Videos run in parallel, one decoder each. A video's shards are written first, then its record
//! `videos/<name>.json`, and the manifest last: a re-run skips videos that have a record, and an interrupted
//! run never leaves the manifest pointing at a shard that was not completely written. Bad input (a corrupt
//! video, a malformed annotation, a missing media file, an unreadable JPEG) fails that video only; the
//! failures are listed in the report and the manifest.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use sha2::{Digest, Sha256};

use crate::affwild2::NUM_CLASSES;
use crate::annotation::{IGNORE, align_labels, read_annotation};
use crate::decode::{AUDIO_RATE, audio_samples, decode_audio, decode_video};
use crate::layout::{Layout, Split, VideoEntry, crop_frames};
use crate::manifest::{FORMAT, FaceSource, Failure, LABEL_POLICY, MANIFEST, Manifest, ShardRecord, VideoRecord};
use crate::store::{Store, StoreError};

#[derive(Debug, Clone)]
pub struct IngestConfig {
    pub root: PathBuf,
    pub out: String,
    pub segment_frames: usize,
    /// Frames per shard at most (a shard holds whole segments of one video).
    pub shard_frames: usize,
    pub face: FaceSource,
    pub face_size: u32,
    pub jobs: usize,
}

impl IngestConfig {
    /// What a video's shards depend on; a record written under other settings is redone, not reused.
    pub fn settings(&self) -> String {
        format!(
            "{FORMAT}; segment_frames {}; shard_frames {}; face {:?} {}",
            self.segment_frames, self.shard_frames, self.face, self.face_size
        )
    }

    pub fn new(root: PathBuf, out: String) -> Self {
        let jobs = std::thread::available_parallelism().map_or(1, |n| n.get());
        Self { root, out, segment_frames: 32, shard_frames: 1024, face: FaceSource::Crops, face_size: 112, jobs }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error(transparent)]
    Layout(#[from] crate::error::DataError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Other(String),
}

/// What a run did.
#[derive(Debug)]
pub struct IngestReport {
    pub manifest: Manifest,
    pub ingested: Vec<String>,
    pub skipped: Vec<String>,
}

impl IngestReport {
    /// One line per video (frames, label alignment, missing faces, shards) and per failure.
    pub fn lines(&self) -> Vec<String> {
        let mut lines: Vec<String> = self
            .manifest
            .videos
            .iter()
            .map(|v| {
                let labels = v.labels.map_or("test video, no labels".to_string(), |a| a.to_string());
                let how = if self.skipped.contains(&v.name) { "already ingested" } else { "ingested" };
                format!(
                    "{} ({:?}): {} frames at {} fps, {labels}, {} frames without a face crop, {} shard(s), {how}",
                    v.name,
                    v.split,
                    v.frames,
                    v.fps,
                    v.face_missing,
                    v.shards.len()
                )
            })
            .collect();
        lines.extend(self.manifest.failures.iter().map(|f| format!("FAILED {}: {}", f.video, f.error)));
        lines
    }
}

fn record_key(name: &str) -> String {
    format!("videos/{name}.json")
}

/// A WebDataset key: no dots (WebDataset splits at the first one), no slashes.
fn sample_key(video: &str, first: usize) -> String {
    format!("{}_{first:06}", video.replace(['.', '/'], "-"))
}

struct ShardWriter {
    builder: tar::Builder<Vec<u8>>,
    first_frame: usize,
    frames: usize,
    segments: usize,
}

impl ShardWriter {
    fn new(first_frame: usize) -> Self {
        Self { builder: tar::Builder::new(Vec::new()), first_frame, frames: 0, segments: 0 }
    }

    fn add(&mut self, name: &str, data: &[u8]) -> std::io::Result<()> {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_mtime(0);
        header.set_cksum();
        self.builder.append_data(&mut header, name, data)
    }
}

/// A media file decoded once: frame count and rate, audio, and (full-frame source) each frame as JPEG.
struct Decoded {
    info: crate::decode::VideoInfo,
    audio: Vec<f32>,
    full_frames: Vec<Vec<u8>>,
}

fn decode_media(media: &std::path::Path, cfg: &IngestConfig) -> Result<Decoded, String> {
    let mut full_frames: Vec<Vec<u8>> = Vec::new();
    let size = cfg.face_size;
    let info = match cfg.face {
        FaceSource::Crops => decode_video(media, None, |_| Ok(())),
        FaceSource::FullFrame => decode_video(media, Some((size, size)), |f| {
            let img = image::RgbImage::from_raw(f.width, f.height, f.data).expect("decoder output matches its size");
            let mut jpeg = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 90).encode_image(&img).map_err(|e| {
                crate::decode::DecodeError::Media { path: media.to_path_buf(), reason: format!("JPEG encoding: {e}") }
            })?;
            full_frames.push(jpeg);
            Ok(())
        }),
    }
    .map_err(|e| e.to_string())?;
    let audio = decode_audio(media, audio_samples(info.frames, info.fps)).map_err(|e| e.to_string())?;
    Ok(Decoded { info, audio, full_frames })
}

fn no_media(entry: &VideoEntry, cfg: &IngestConfig) -> String {
    let stem = VideoEntry::media_stem(&entry.name);
    format!("no media file for `{}` under {} (looked for {stem}.mp4 / {stem}.avi)", entry.name, cfg.root.display())
}

/// One annotated person (or test video) of a decoded media file: faces, audio, labels -> shards, then its
/// record.
fn write_entry(
    entry: &VideoEntry,
    decoded: &Decoded,
    cfg: &IngestConfig,
    store: &Store,
    rt: &tokio::runtime::Handle,
) -> Result<VideoRecord, String> {
    let media = entry.media.as_ref().ok_or_else(|| no_media(entry, cfg))?;
    let raw_labels = entry.annotation.as_ref().map(|a| read_annotation(a)).transpose().map_err(|e| e.to_string())?;
    let (info, audio, full_frames) = (&decoded.info, &decoded.audio, &decoded.full_frames);
    let crops: Option<(PathBuf, BTreeSet<u32>)> = match cfg.face {
        FaceSource::FullFrame => None,
        FaceSource::Crops => {
            let dir = entry.crops.as_ref().ok_or_else(|| {
                format!(
                    "no crop folder for `{}` (cropped_aligned/{}/); use the full-frame face source",
                    entry.name, entry.name
                )
            })?;
            Some((dir.clone(), crop_frames(dir).map_err(|e| e.to_string())?))
        }
    };
    let frames = info.frames;
    let samples = audio.len();
    let (labels, alignment) = match &raw_labels {
        Some(raw) => {
            let (aligned, report) = align_labels(raw, frames);
            (aligned, Some(report))
        }
        None => (vec![IGNORE; frames], None),
    };

    // The face of frame f (0-based): its crop, else the nearest earlier one (else the first later one).
    let face = |f: usize| -> Result<(Vec<u8>, bool), String> {
        match &crops {
            None => Ok((full_frames[f].clone(), false)),
            Some((dir, available)) => {
                let number = f as u32 + 1;
                let (chosen, missing) = if available.contains(&number) {
                    (number, false)
                } else {
                    let earlier = available.range(..number).next_back().copied();
                    let chosen = earlier
                        .or_else(|| available.range(number..).next().copied())
                        .ok_or_else(|| format!("{}: no face crop at all", dir.display()))?;
                    (chosen, true)
                };
                let path = dir.join(format!("{chosen:05}.jpg"));
                let bytes = std::fs::read(&path).map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
                image::load_from_memory_with_format(&bytes, image::ImageFormat::Jpeg)
                    .map_err(|e| format!("{}: unreadable JPEG: {e}", path.display()))?;
                Ok((bytes, missing))
            }
        }
    };

    let mut shards = Vec::new();
    let mut histogram = [0u64; NUM_CLASSES];
    let mut face_missing = 0u64;
    let mut shard = ShardWriter::new(0);
    let finish = |shard: ShardWriter, shards: &mut Vec<ShardRecord>| -> Result<(), String> {
        let bytes = shard.builder.into_inner().map_err(|e| e.to_string())?;
        let key = format!("shards/{}/{}-{:04}.tar", split_dir(entry.split), entry.name, shards.len());
        let record = ShardRecord {
            sha256: hex::encode(Sha256::digest(&bytes)),
            bytes: bytes.len() as u64,
            key: key.clone(),
            first_frame: shard.first_frame,
            frames: shard.frames,
            segments: shard.segments,
        };
        rt.block_on(store.put(&key, Bytes::from(bytes))).map_err(|e| e.to_string())?;
        shards.push(record);
        Ok(())
    };
    for first in (0..frames).step_by(cfg.segment_frames) {
        let end = (first + cfg.segment_frames).min(frames);
        if shard.frames > 0 && shard.frames + (end - first) > cfg.shard_frames {
            let next = ShardWriter::new(first);
            finish(std::mem::replace(&mut shard, next), &mut shards)?;
        }
        let key = sample_key(&entry.name, first);
        let mut mask = Vec::with_capacity(end - first);
        let io = |e: std::io::Error| e.to_string();
        for f in first..end {
            let (jpeg, missing) = face(f)?;
            face_missing += missing as u64;
            mask.push(missing as u8);
            shard.add(&format!("{key}.{:03}.jpg", f - first), &jpeg).map_err(io)?;
        }
        let (a0, a1) = (audio_samples(first, info.fps).min(samples), audio_samples(end, info.fps).min(samples));
        let pcm: Vec<u8> = audio[a0..a1].iter().flat_map(|s| s.to_le_bytes()).collect();
        shard.add(&format!("{key}.audio.f32"), &pcm).map_err(io)?;
        let seg_labels: Vec<u8> = labels[first..end].iter().map(|&l| l as u8).collect();
        shard.add(&format!("{key}.labels.i8"), &seg_labels).map_err(io)?;
        shard.add(&format!("{key}.mask.u8"), &mask).map_err(io)?;
        let meta = serde_json::json!({
            "video": entry.name, "split": entry.split, "first_frame": first, "frames": end - first, "fps": info.fps,
            "audio_samples": a1 - a0,
        });
        shard.add(&format!("{key}.json"), meta.to_string().as_bytes()).map_err(io)?;
        shard.frames += end - first;
        shard.segments += 1;
    }
    finish(shard, &mut shards)?;
    for &l in &labels {
        if l >= 0 {
            histogram[l as usize] += 1;
        }
    }
    let record = VideoRecord {
        name: entry.name.clone(),
        settings: cfg.settings(),
        split: entry.split,
        media: media.strip_prefix(&cfg.root).unwrap_or(media).display().to_string(),
        frames,
        fps: info.fps,
        audio_samples: samples,
        has_audio: info.has_audio,
        labels: alignment,
        ignored_frames: labels.iter().filter(|&&l| l < 0).count() as u64,
        label_runs: run_length(&labels),
        label_histogram: histogram,
        face_missing,
        shards,
    };
    let json = serde_json::to_vec_pretty(&record).map_err(|e| e.to_string())?;
    rt.block_on(store.put(&record_key(&entry.name), Bytes::from(json))).map_err(|e| e.to_string())?;
    Ok(record)
}

fn run_length(labels: &[i8]) -> Vec<(i8, u32)> {
    let mut runs: Vec<(i8, u32)> = Vec::new();
    for &l in labels {
        match runs.last_mut() {
            Some((label, n)) if *label == l => *n += 1,
            _ => runs.push((l, 1)),
        }
    }
    runs
}

/// A video's record or error, and whether it was already ingested by an earlier run.
type Outcome = (Result<VideoRecord, String>, bool);

fn split_dir(split: Split) -> &'static str {
    match split {
        Split::Train => "train",
        Split::Validation => "validation",
        Split::Test => "test",
    }
}

/// Runs the ingest; the manifest is written last.
pub fn ingest(cfg: &IngestConfig) -> Result<IngestReport, IngestError> {
    if cfg.segment_frames == 0 || cfg.shard_frames < cfg.segment_frames || cfg.face_size < 16 {
        return Err(IngestError::Other(format!(
            "segment_frames ({}) must be positive and at most shard_frames ({}); face_size ({}) at least 16",
            cfg.segment_frames, cfg.shard_frames, cfg.face_size
        )));
    }
    let layout = Layout::discover(&cfg.root)?;
    let store = Store::open(&cfg.out)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| IngestError::Other(e.to_string()))?;
    let handle = rt.handle().clone();
    // One job per media file (a `_left` / `_right` pair shares one), so each video is decoded once.
    let mut jobs: Vec<Vec<usize>> = Vec::new();
    let mut by_media: std::collections::HashMap<&std::path::Path, usize> = std::collections::HashMap::new();
    for (i, entry) in layout.videos.iter().enumerate() {
        match &entry.media {
            Some(media) => match by_media.get(media.as_path()) {
                Some(&job) => jobs[job].push(i),
                None => {
                    by_media.insert(media, jobs.len());
                    jobs.push(vec![i]);
                }
            },
            None => jobs.push(vec![i]),
        }
    }
    let next = AtomicUsize::new(0);
    let progress = crate::progress::Progress::new("ingest", "videos", layout.videos.len() as u64);
    let results: Mutex<Vec<Option<Outcome>>> = Mutex::new(vec![None; layout.videos.len()]);
    let run_job = |job: &[usize]| {
        let mut pending = Vec::new();
        for &i in job {
            let entry = &layout.videos[i];
            let previous = handle.block_on(async {
                match store.get(&record_key(&entry.name)).await {
                    Ok(bytes) => serde_json::from_slice::<VideoRecord>(&bytes).ok(),
                    Err(_) => None,
                }
            });
            // A record of other settings, or one that does not validate (damaged), is redone.
            let previous = previous.filter(|r| r.settings == cfg.settings() && r.validate(cfg.segment_frames).is_ok());
            match previous {
                Some(record) => {
                    results.lock().expect("no panic holding the lock")[i] = Some((Ok(record), true));
                    progress.inc(1);
                }
                None => pending.push(i),
            }
        }
        if pending.is_empty() {
            return;
        }
        let decoded = match &layout.videos[pending[0]].media {
            Some(media) => decode_media(media, cfg),
            None => Err(no_media(&layout.videos[pending[0]], cfg)),
        };
        for i in pending {
            let entry = &layout.videos[i];
            let result = match &decoded {
                Ok(decoded) => write_entry(entry, decoded, cfg, &store, &handle),
                Err(e) => Err(e.clone()),
            };
            match &result {
                // On a terminal the bar shows progress (the report lists every video at the end).
                Ok(r) if progress.is_bar() => {
                    tracing::debug!(video = %r.name, frames = r.frames, shards = r.shards.len(), "video ingested")
                }
                Ok(r) => tracing::info!(video = %r.name, frames = r.frames, shards = r.shards.len(), "video ingested"),
                Err(e) => tracing::error!(video = %entry.name, "{e}"),
            }
            results.lock().expect("no panic holding the lock")[i] = Some((result, false));
            progress.inc(1);
        }
    };
    std::thread::scope(|scope| {
        for _ in 0..cfg.jobs.max(1).min(jobs.len().max(1)) {
            scope.spawn(|| {
                while let Some(job) = jobs.get(next.fetch_add(1, Ordering::Relaxed)) {
                    run_job(job);
                }
            });
        }
    });
    progress.finish();
    let mut videos = Vec::new();
    let mut failures = Vec::new();
    let (mut ingested, mut skipped) = (Vec::new(), Vec::new());
    for (entry, result) in layout.videos.iter().zip(results.into_inner().expect("workers finished")) {
        match result.expect("every video was processed") {
            (Ok(record), was_skipped) => {
                if was_skipped { &mut skipped } else { &mut ingested }.push(record.name.clone());
                videos.push(record);
            }
            (Err(error), _) => failures.push(Failure { video: entry.name.clone(), error }),
        }
    }
    let mut train = [0u64; NUM_CLASSES];
    for v in videos.iter().filter(|v| v.split == Split::Train) {
        for (t, n) in train.iter_mut().zip(v.label_histogram) {
            *t += n;
        }
    }
    let total = train.iter().sum::<u64>().max(1) as f64;
    let manifest = Manifest {
        format: FORMAT.into(),
        segment_frames: cfg.segment_frames,
        face_source: cfg.face,
        face_size: cfg.face_size,
        audio_rate: AUDIO_RATE,
        label_policy: LABEL_POLICY.into(),
        videos,
        failures,
        class_ratios: train.map(|n| n as f64 / total),
    };
    let json = serde_json::to_vec_pretty(&manifest).map_err(|e| IngestError::Other(e.to_string()))?;
    handle.block_on(store.put(MANIFEST, Bytes::from(json)))?;
    Ok(IngestReport { manifest, ingested, skipped })
}
