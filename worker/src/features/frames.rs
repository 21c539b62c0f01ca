//! Per-frame CLIP image embeddings of every video of every split (`frames/<video>.safetensors`), so that
//! dense evaluation and prediction skip the image encoder: each object holds `image [frames, dim]` (frame `i`'s
//! crop as stored, the crop every window shows for that frame) and `padding [1, dim]` (the blank crop of a
//! window's positions outside its video). Written by `worker extract` next to the training units, in the
//! cache's dtype, and listed in `features.json` with their sizes and SHA-256s.

use std::collections::HashMap;

use anyhow::{Context, Result};
use avexpr_data::config::FeatureDtype;
use safetensors::tensor::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use tch::Tensor;

use super::unit::{from_bytes, to_bytes, view};

pub(super) fn frames_key(video: &str) -> String {
    format!("frames/{video}.safetensors")
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FramesRecord {
    pub key: String,
    pub video: String,
    pub frames: usize,
    pub bytes: u64,
    pub sha256: String,
}

impl FramesRecord {
    /// The record of a stored object: its size and SHA-256.
    fn of(key: String, video: &str, frames: usize, bytes: &[u8]) -> Self {
        use sha2::{Digest, Sha256};
        let sha256 = hex::encode(Sha256::digest(bytes));
        FramesRecord { key, video: video.to_string(), frames, bytes: bytes.len() as u64, sha256 }
    }
}

/// Serializes one video's embeddings: `image` `[frames, dim]` and `padding` `[dim]`, f32 on the CPU.
pub(super) fn write_frames(video: &str, image: &[f32], padding: &[f32], dtype: FeatureDtype) -> Result<Vec<u8>> {
    let dim = padding.len();
    anyhow::ensure!(dim > 0 && image.len().is_multiple_of(dim), "frame embeddings of {video}: ragged rows");
    let (image_dtype, image_bytes) = to_bytes(image, dtype);
    let (padding_dtype, padding_bytes) = to_bytes(padding, dtype);
    let tensors = vec![
        ("image", view(image_dtype, vec![image.len() / dim, dim], &image_bytes)),
        ("padding", view(padding_dtype, vec![1, dim], &padding_bytes)),
    ];
    let meta = HashMap::from([("avexpr".to_string(), serde_json::json!({"video": video}).to_string())]);
    Ok(safetensors::tensor::serialize(tensors, Some(meta))?)
}

/// A stored video's embeddings as f32 tensors on the CPU: `([frames, dim], [1, dim])`, checked against the
/// frame count the dataset's manifest has for the video.
pub(super) fn read_frames(key: &str, bytes: &[u8], frames: usize) -> Result<(Tensor, Tensor)> {
    let st = SafeTensors::deserialize(bytes).with_context(|| format!("frame embeddings {key}: not safetensors"))?;
    let get = |name: &str| -> Result<(Vec<f32>, Vec<usize>)> {
        let t = st.tensor(name).with_context(|| format!("frame embeddings {key}: no tensor {name}"))?;
        anyhow::ensure!(
            matches!(t.dtype(), Dtype::F32 | Dtype::F16) && t.shape().len() == 2,
            "frame embeddings {key}: {name} is {:?} {:?}, not a matrix of f32 or f16",
            t.dtype(),
            t.shape()
        );
        Ok((from_bytes(&t).with_context(|| format!("frame embeddings {key}: {name}"))?, t.shape().to_vec()))
    };
    let (image, shape) = get("image")?;
    let (padding, padding_shape) = get("padding")?;
    anyhow::ensure!(
        shape[0] == frames && padding_shape == [1, shape[1]],
        "frame embeddings {key}: image {shape:?} and padding {padding_shape:?}, the video has {frames} frames"
    );
    let tensor = |values: &[f32], shape: &[usize]| {
        Tensor::from_slice(values).view(shape.iter().map(|&d| d as i64).collect::<Vec<_>>().as_slice())
    };
    Ok((tensor(&image, &shape), tensor(&padding, &padding_shape)))
}

/// What [`extract_frames`] did on this rank.
pub(super) struct FramesReport {
    /// Every video of this rank's share, written now or found in the cache.
    pub(super) records: Vec<FramesRecord>,
    pub(super) written: usize,
    pub(super) frames_encoded: usize,
}

/// This rank's share of the videos of every split (balanced per split, as dense evaluation shares them),
/// each frame's crop through the image encoder once, one object per video; videos already in the cache are
/// verified and skipped.
pub(super) fn extract_frames(
    session: &crate::session::Session,
    model: &avexpr_model::ExprModel,
    cache: &avexpr_data::store::Store,
    dtype: FeatureDtype,
) -> Result<FramesReport> {
    use avexpr_data::layout::Split;
    use avexpr_data::loader::{Loader, Source};
    use avexpr_data::sampler::{Assignment, Cursor, RankSampler, SamplerConfig};
    use avexpr_data::store::StoreError;

    let (job, dist, manifest) = (session.job, session.dist, &session.manifest);
    // One frame per window: every frame of a video, in order, exactly once.
    let cfg = SamplerConfig {
        dense: true,
        frames_per_clip: 1,
        stride: 1,
        shuffle_shards: 1,
        class_balanced: false,
        ..job.sampler()
    };
    // As many crops per encoder call as a training micro-batch has.
    let loader_cfg = avexpr_data::loader::LoaderConfig {
        augment: None,
        ..job.data.loader(job.train.micro_batch * job.data.frames_per_clip)
    };
    let mut report = FramesReport { records: Vec::new(), written: 0, frames_encoded: 0 };
    let mut padding: Option<Vec<f32>> = None;
    for split in [Split::Train, Split::Validation, Split::Test] {
        let videos: Vec<&avexpr_data::manifest::VideoRecord> =
            manifest.videos.iter().filter(|v| v.split == split && v.frames > 0).collect();
        let plan = Assignment::balanced(&videos, dist.world_size);
        let mut todo: HashMap<String, usize> = HashMap::new();
        for v in videos.iter().filter(|v| plan.slot_of[&v.name] == dist.rank) {
            let key = frames_key(&v.name);
            match cache.blocking().get(&key) {
                Ok(bytes) => {
                    // Written whole: one that does not read is damage to report, not work to redo.
                    let _ = read_frames(&key, &bytes, v.frames)?;
                    report.records.push(FramesRecord::of(key, &v.name, v.frames, &bytes));
                }
                Err(StoreError::NotFound { .. }) => {
                    todo.insert(v.name.clone(), v.frames);
                }
                Err(e) => return Err(e.into()),
            }
        }
        if todo.is_empty() {
            continue;
        }
        let sampler = RankSampler::new(manifest, split, dist.rank, dist.world_size, &cfg, None)?;
        let total = sampler.len() as u64;
        let source = Source::Store(session.store.clone());
        let loader = Loader::start(source, manifest.clone(), sampler, &loader_cfg, Cursor::default(), Some(1))?;
        let progress = avexpr_data::progress::Progress::new(
            &format!("frame embeddings, {}", format!("{split:?}").to_lowercase()),
            "frames",
            total,
        );
        let mut pending: HashMap<String, Vec<f32>> = HashMap::new();
        for batch in loader {
            let batch = batch.context("frame embedding data")?;
            progress.inc(batch.len() as u64);
            if batch.clips.iter().all(|c| !todo.contains_key(&c.video)) {
                continue;
            }
            let (raw, _) = crate::session::raw_batch(&batch);
            let size = raw.frames.size();
            let crops = raw.frames.view([size[0], size[2], size[3], size[4]]);
            let embeds = tch::no_grad(|| model.encode_images(&crops)).to_device(tch::Device::Cpu).contiguous();
            report.frames_encoded += batch.len();
            let dim = embeds.size()[1] as usize;
            if padding.is_none() {
                let blank = Tensor::zeros([1, size[2], size[3], size[4]], (tch::Kind::Uint8, tch::Device::Cpu));
                padding = Some(Vec::try_from(tch::no_grad(|| model.encode_images(&blank)).view([-1]))?);
            }
            let values = Vec::<f32>::try_from(embeds.view([-1]))?;
            for (clip, row) in batch.clips.iter().zip(values.chunks(dim)) {
                let Some(&frames) = todo.get(&clip.video) else { continue };
                let rows = pending.entry(clip.video.clone()).or_default();
                anyhow::ensure!(
                    rows.len() == clip.start as usize * dim,
                    "frame embeddings of {}: frame {} arrived out of order",
                    clip.video,
                    clip.start
                );
                rows.extend_from_slice(row);
                if rows.len() == frames * dim {
                    let rows = pending.remove(&clip.video).expect("pending video");
                    let key = frames_key(&clip.video);
                    let bytes = write_frames(&clip.video, &rows, padding.as_deref().expect("encoded"), dtype)?;
                    report.records.push(FramesRecord::of(key.clone(), &clip.video, frames, &bytes));
                    cache.blocking().put(&key, bytes.into())?;
                    report.written += 1;
                }
            }
        }
        progress.finish();
        anyhow::ensure!(pending.is_empty(), "frame embeddings: {} video(s) incomplete", pending.len());
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_a_wrong_frame_count_is_refused() {
        let image: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        let bytes = write_frames("v", &image, &[7.0, 8.0, 9.0, 10.0], FeatureDtype::F32).unwrap();
        let (t, p) = read_frames("frames/v.safetensors", &bytes, 3).unwrap();
        assert_eq!(Vec::<f32>::try_from(t.view([-1])).unwrap(), image);
        assert_eq!(p.size(), [1, 4]);
        let err = read_frames("frames/v.safetensors", &bytes, 4).unwrap_err().to_string();
        assert!(err.contains("frames/v.safetensors") && err.contains("4 frames"), "{err}");
        let err = read_frames("frames/v.safetensors", b"garbage", 3).unwrap_err().to_string();
        assert!(err.contains("not safetensors"), "{err}");
    }
}
