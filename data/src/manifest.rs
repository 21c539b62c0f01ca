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
    let manifest =
        Manifest::parse(&bytes).map_err(|reason| ManifestError::Malformed { uri: store.uri().to_string(), reason })?;
    Ok((bytes, manifest))
}

impl Manifest {
    /// Parses and validates `manifest.json`; the error names the field (`videos[3] (name).fps: ...`).
    pub fn parse(bytes: &[u8]) -> Result<Manifest, String> {
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Every value the readers rely on, checked: counts within bounds and consistent with each other, labels
    /// in range, shards covering each video's frames in order.
    pub fn validate(&self) -> Result<(), String> {
        use crate::limits::*;
        if self.format != FORMAT {
            return Err(format!("format: `{}`, expected `{FORMAT}` (ingest again with this version)", self.format));
        }
        if !(1..=MAX_SEGMENT_FRAMES).contains(&self.segment_frames) {
            return Err(format!("segment_frames: {} is not in 1..={MAX_SEGMENT_FRAMES}", self.segment_frames));
        }
        if !(1..=MAX_FACE_SIZE).contains(&self.face_size) {
            return Err(format!("face_size: {} is not in 1..={MAX_FACE_SIZE}", self.face_size));
        }
        if self.audio_rate != crate::decode::AUDIO_RATE {
            return Err(format!("audio_rate: {}, expected {}", self.audio_rate, crate::decode::AUDIO_RATE));
        }
        if let Some(r) = self.class_ratios.iter().find(|r| !(0.0..=1.0).contains(*r)) {
            return Err(format!("class_ratios: {r} is not a share in [0, 1]"));
        }
        let mut names = std::collections::BTreeSet::new();
        for (i, v) in self.videos.iter().enumerate() {
            v.validate(self.segment_frames).map_err(|e| format!("videos[{i}] ({}).{e}", v.name))?;
            if !names.insert(v.name.as_str()) {
                return Err(format!("videos[{i}].name: `{}` appears twice", v.name));
            }
        }
        Ok(())
    }
}

impl VideoRecord {
    /// Parses and validates a video's record (`records/<video>.json`, what a resumed ingest reuses).
    pub fn parse(bytes: &[u8], segment_frames: usize) -> Result<VideoRecord, String> {
        let record: VideoRecord = serde_json::from_slice(bytes).map_err(|e| e.to_string())?;
        record.validate(segment_frames)?;
        Ok(record)
    }

    /// Checks the record against itself and the manifest's `segment_frames`; the error starts with the field.
    pub fn validate(&self, segment_frames: usize) -> Result<(), String> {
        use crate::limits::*;
        if self.name.is_empty() || self.name.contains(['/', '\\']) || self.name.starts_with('.') {
            return Err(format!("name: `{}` is not a video name", self.name));
        }
        if self.frames > MAX_FRAMES {
            return Err(format!("frames: {} is more than {MAX_FRAMES}", self.frames));
        }
        if !FPS.contains(&self.fps) {
            return Err(format!("fps: {} is not in {}..={}", self.fps, FPS.start(), FPS.end()));
        }
        // The audio of the video's duration, with a second of slack (decoded audio runs a little past).
        let duration = crate::decode::audio_samples(self.frames, self.fps) + crate::decode::AUDIO_RATE as usize;
        if self.audio_samples > duration {
            return Err(format!(
                "audio_samples: {} is more than {} frames at {} fps hold ({duration})",
                self.audio_samples, self.frames, self.fps
            ));
        }
        let frames = self.frames as u64;
        for (field, n) in [("ignored_frames", self.ignored_frames), ("face_missing", self.face_missing)] {
            if n > frames {
                return Err(format!("{field}: {n} is more than the video's {frames} frames"));
            }
        }
        if self.label_histogram.iter().try_fold(0u64, |a, &n| a.checked_add(n)).is_none_or(|sum| sum > frames) {
            return Err(format!("label_histogram: counts more labelled frames than the video's {frames}"));
        }
        let mut labelled = 0u64;
        for (j, &(label, run)) in self.label_runs.iter().enumerate() {
            if !(-1..NUM_CLASSES as i8).contains(&label) {
                return Err(format!("label_runs[{j}]: label {label} is not -1 (ignored) or a class 0..{NUM_CLASSES}"));
            }
            labelled += run as u64;
            if run == 0 || labelled > frames {
                return Err(format!("label_runs[{j}]: a run of {run} (the runs must cover the {frames} frames)"));
            }
        }
        if !self.label_runs.is_empty() && labelled != frames {
            return Err(format!("label_runs: cover {labelled} frames, the video has {frames}"));
        }
        let mut next = 0usize;
        for (j, s) in self.shards.iter().enumerate() {
            let at = |reason: String| format!("shards[{j}] ({}).{reason}", s.key);
            if s.key.is_empty() || s.key.split('/').any(|part| part.is_empty() || part == "." || part == "..") {
                return Err(at(format!("key: `{}` is not an object key", s.key)));
            }
            if s.first_frame != next {
                return Err(at(format!(
                    "first_frame: {}, expected {next} (shards cover the frames in order)",
                    s.first_frame
                )));
            }
            if s.frames == 0 || s.frames > self.frames - next {
                return Err(at(format!(
                    "frames: {} (the video has {} frames from {next})",
                    s.frames,
                    self.frames - next
                )));
            }
            if s.segments != s.frames.div_ceil(segment_frames) {
                return Err(at(format!(
                    "segments: {}, but {} frames in segments of {segment_frames} make {}",
                    s.segments,
                    s.frames,
                    s.frames.div_ceil(segment_frames)
                )));
            }
            if s.bytes > MAX_SHARD_BYTES {
                return Err(at(format!("bytes: {} is more than {MAX_SHARD_BYTES}", s.bytes)));
            }
            if s.sha256.len() != 64 || !s.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(at("sha256: not a SHA-256 in hex".into()));
            }
            next += s.frames;
        }
        if next != self.frames {
            return Err(format!("shards: cover {next} frames, the video has {}", self.frames));
        }
        Ok(())
    }
}
