//! One unit's file: the clips whose target frame lies in one frame shard, stacked per field in a safetensors
//! object (`<video>/<unit:05>.safetensors`, `f32` or `f16`).

use std::collections::HashMap;

use anyhow::{Context, Result};
use avexpr_data::config::FeatureDtype;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

pub(super) fn unit_key(video: &str, unit: usize) -> String {
    format!("{video}/{unit:05}.safetensors")
}

/// One clip's features, on the CPU.
pub(super) struct ClipFeatures {
    pub(super) start: i64,
    pub(super) fps: f64,
    pub(super) target: i8,
    pub(super) image: Vec<f32>,
    pub(super) face_mask: Vec<u8>,
    pub(super) labels: Vec<i8>,
    /// `[states, audio_valid, hidden]`.
    pub(super) audio: Vec<f32>,
    pub(super) audio_valid: i64,
}

/// The features of one unit as stored.
pub(super) struct Unit {
    /// Clip start -> row.
    pub(super) rows: HashMap<i64, usize>,
    pub(super) frames: usize,
    pub(super) image_dim: usize,
    pub(super) states: usize,
    pub(super) audio_frames: usize,
    pub(super) hidden: usize,
    pub(super) image: Vec<f32>,
    pub(super) face_mask: Vec<u8>,
    pub(super) labels: Vec<i8>,
    pub(super) audio: Vec<f32>,
    pub(super) audio_valid: Vec<i64>,
    pub(super) fps: Vec<f64>,
    pub(super) target: Vec<i8>,
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
pub(super) fn write_unit(
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

pub(super) fn read_unit(key: &str, bytes: &[u8]) -> Result<Unit> {
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
