//! One unit's file: the clips whose target frame lies in one frame shard, stacked per field in a safetensors
//! object (`<video>/<unit:05>.safetensors`, `f32` or `f16`).

use std::collections::HashMap;

use anyhow::{Context, Result};
use avexpr_data::config::FeatureDtype;
use avexpr_data::stack::{PaddedRow, stack_padded};
use safetensors::tensor::{Dtype, SafeTensors, TensorView};

pub(super) fn unit_key(video: &str, unit: usize) -> String {
    format!("{video}/{unit:05}.safetensors")
}

/// One clip's features as extracted, on the CPU.
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

impl ClipFeatures {
    fn row(&self) -> Row<'_> {
        Row {
            start: self.start,
            fps: self.fps,
            target: self.target,
            image: &self.image,
            face_mask: &self.face_mask,
            labels: &self.labels,
            audio: PaddedRow::dense(&self.audio, self.audio_valid as usize),
        }
    }
}

/// One clip's features, borrowed from an extraction or from a row of [`FeatureRows`].
pub(super) struct Row<'a> {
    start: i64,
    fps: f64,
    target: i8,
    image: &'a [f32],
    face_mask: &'a [u8],
    labels: &'a [i8],
    /// `states` runs of `valid x hidden` values.
    audio: PaddedRow<'a, f32>,
}

/// The shapes of a cache's rows: frames per clip, CLIP embedding width, Wav2Vec 2.0 states per frame and width.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Dims {
    pub(super) frames: usize,
    pub(super) image_dim: usize,
    pub(super) states: usize,
    pub(super) hidden: usize,
}

/// The features of clips stacked per field, the audio padded to the longest: a unit as stored, and a training
/// batch gathered from units' rows.
pub(super) struct FeatureRows {
    pub(super) dims: Dims,
    /// Audio frames per row, padded (at least 1).
    pub(super) audio_frames: usize,
    /// `[n, frames, image_dim]`.
    pub(super) image: Vec<f32>,
    /// `[n, frames]`.
    pub(super) face_mask: Vec<u8>,
    /// `[n, frames]`.
    pub(super) labels: Vec<i8>,
    /// `[n, states, audio_frames, hidden]`.
    pub(super) audio: Vec<f32>,
    pub(super) audio_valid: Vec<i64>,
    pub(super) fps: Vec<f64>,
    pub(super) start: Vec<i64>,
    pub(super) target: Vec<i8>,
}

impl FeatureRows {
    /// Stacks `rows` (each of `dims`).
    pub(super) fn stack(dims: Dims, rows: &[Row<'_>]) -> Self {
        let audio: Vec<PaddedRow<'_, f32>> = rows.iter().map(|r| r.audio).collect();
        let (audio, audio_frames) = stack_padded(&audio, dims.states, dims.hidden, 1);
        FeatureRows {
            dims,
            audio_frames,
            image: rows.iter().map(|r| r.image).collect::<Vec<_>>().concat(),
            face_mask: rows.iter().map(|r| r.face_mask).collect::<Vec<_>>().concat(),
            labels: rows.iter().map(|r| r.labels).collect::<Vec<_>>().concat(),
            audio,
            audio_valid: rows.iter().map(|r| r.audio.len as i64).collect(),
            fps: rows.iter().map(|r| r.fps).collect(),
            start: rows.iter().map(|r| r.start).collect(),
            target: rows.iter().map(|r| r.target).collect(),
        }
    }

    pub(super) fn len(&self) -> usize {
        self.start.len()
    }

    /// Row `i`, borrowed.
    pub(super) fn row(&self, i: usize) -> Row<'_> {
        let Dims { frames, image_dim, states, hidden } = self.dims;
        let per_audio = states * self.audio_frames * hidden;
        Row {
            start: self.start[i],
            fps: self.fps[i],
            target: self.target[i],
            image: &self.image[i * frames * image_dim..(i + 1) * frames * image_dim],
            face_mask: &self.face_mask[i * frames..(i + 1) * frames],
            labels: &self.labels[i * frames..(i + 1) * frames],
            audio: PaddedRow {
                values: &self.audio[i * per_audio..(i + 1) * per_audio],
                len: self.audio_valid[i] as usize,
                stride: self.audio_frames,
            },
        }
    }
}

/// A stored unit: its rows, and which row holds the clip starting at each frame.
pub(super) struct Unit {
    pub(super) rows: FeatureRows,
    pub(super) by_start: HashMap<i64, usize>,
}

pub(super) fn to_bytes(values: &[f32], dtype: FeatureDtype) -> (Dtype, Vec<u8>) {
    match dtype {
        FeatureDtype::F32 => (Dtype::F32, values.iter().flat_map(|v| v.to_le_bytes()).collect()),
        FeatureDtype::F16 => (Dtype::F16, values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect()),
    }
}

pub(super) fn from_bytes(view: &TensorView<'_>) -> Result<Vec<f32>> {
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

pub(super) fn view(dtype: Dtype, shape: Vec<usize>, data: &[u8]) -> TensorView<'_> {
    TensorView::new(dtype, shape, data).expect("consistent shape")
}

/// Serializes a unit's clips (sorted by start).
pub(super) fn write_unit(
    video: &str,
    unit: usize,
    mut clips: Vec<ClipFeatures>,
    dtype: FeatureDtype,
    dims: Dims,
) -> Result<Vec<u8>> {
    clips.sort_by_key(|c| c.start);
    let rows: Vec<Row<'_>> = clips.iter().map(ClipFeatures::row).collect();
    let r = FeatureRows::stack(dims, &rows);
    let (n, t) = (r.len(), r.audio_frames);
    let Dims { frames, image_dim, states, hidden } = dims;
    let (image_dtype, image_bytes) = to_bytes(&r.image, dtype);
    let (audio_dtype, audio_bytes) = to_bytes(&r.audio, dtype);
    let labels: Vec<u8> = r.labels.iter().map(|&l| l as u8).collect();
    let start: Vec<u8> = r.start.iter().flat_map(|s| s.to_le_bytes()).collect();
    let valid: Vec<u8> = r.audio_valid.iter().flat_map(|v| v.to_le_bytes()).collect();
    let fps: Vec<u8> = r.fps.iter().flat_map(|f| f.to_le_bytes()).collect();
    let target: Vec<u8> = r.target.iter().map(|&t| t as u8).collect();
    let tensors = vec![
        ("image", view(image_dtype, vec![n, frames, image_dim], &image_bytes)),
        ("audio", view(audio_dtype, vec![n, states, t, hidden], &audio_bytes)),
        ("face_mask", view(Dtype::U8, vec![n, frames], &r.face_mask)),
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

/// Reads a stored unit and stacks all its rows into a batch, as the cache's loader does with the rows it picks:
/// for callers that only need to know whether a unit is usable.
pub fn check_unit(key: &str, bytes: &[u8]) -> Result<()> {
    let unit = read_unit(key, bytes)?;
    let rows: Vec<Row<'_>> = (0..unit.by_start.len()).map(|i| unit.rows.row(i)).collect();
    FeatureRows::stack(unit.rows.dims, &rows);
    Ok(())
}

pub(super) fn read_unit(key: &str, bytes: &[u8]) -> Result<Unit> {
    let st = SafeTensors::deserialize(bytes).with_context(|| format!("feature unit {key}: not safetensors"))?;
    let get = |name: &str| st.tensor(name).with_context(|| format!("feature unit {key}: no `{name}`"));
    let image = get("image")?;
    let audio = get("audio")?;
    let [n, frames, image_dim] = image.shape()[..] else { anyhow::bail!("feature unit {key}: image shape") };
    let [audio_n, states, audio_frames, hidden] = audio.shape()[..] else {
        anyhow::bail!("feature unit {key}: audio shape")
    };
    // Every field's dtype and shape, before any is read as rows (safetensors checks each size against its own
    // shape, not the shapes against each other).
    let expect = |name: &str, dtypes: &[Dtype], shape: &[usize]| -> Result<()> {
        let t = get(name)?;
        anyhow::ensure!(
            dtypes.contains(&t.dtype()) && t.shape() == shape,
            "feature unit {key}: `{name}` is {:?} {:?}, expected {dtypes:?} {shape:?}",
            t.dtype(),
            t.shape()
        );
        Ok(())
    };
    expect("image", &[Dtype::F32, Dtype::F16], &[n, frames, image_dim])?;
    expect("audio", &[Dtype::F32, Dtype::F16], &[audio_n, states, audio_frames, hidden])?;
    anyhow::ensure!(audio_n == n, "feature unit {key}: {n} image rows but {audio_n} audio rows");
    expect("face_mask", &[Dtype::U8], &[n, frames])?;
    expect("labels", &[Dtype::I8], &[n, frames])?;
    for name in ["start", "audio_valid"] {
        expect(name, &[Dtype::I64], &[n])?;
    }
    expect("fps", &[Dtype::F64], &[n])?;
    expect("target", &[Dtype::I8], &[n])?;
    let i64s = |name: &str| -> Result<Vec<i64>> {
        Ok(get(name)?.data().chunks_exact(8).map(|b| i64::from_le_bytes(b.try_into().expect("8"))).collect())
    };
    let rows = FeatureRows {
        dims: Dims { frames, image_dim, states, hidden },
        audio_frames,
        image: from_bytes(&image)?,
        face_mask: get("face_mask")?.data().to_vec(),
        labels: get("labels")?.data().iter().map(|&b| b as i8).collect(),
        audio: from_bytes(&audio)?,
        audio_valid: i64s("audio_valid")?,
        fps: get("fps")?.data().chunks_exact(8).map(|b| f64::from_le_bytes(b.try_into().expect("8"))).collect(),
        start: i64s("start")?,
        target: get("target")?.data().iter().map(|&b| b as i8).collect(),
    };
    let class = |l: &i8| (-1..avexpr_data::NUM_CLASSES as i8).contains(l);
    anyhow::ensure!(rows.labels.iter().all(class), "feature unit {key}: a label outside -1..8");
    anyhow::ensure!(rows.target.iter().all(class), "feature unit {key}: a target outside -1..8");
    anyhow::ensure!(
        rows.audio_valid.iter().all(|v| (0..=audio_frames as i64).contains(v)),
        "feature unit {key}: audio_valid outside 0..={audio_frames}"
    );
    anyhow::ensure!(
        rows.fps.iter().all(|f| avexpr_data::limits::FPS.contains(f)),
        "feature unit {key}: an fps outside {:?}",
        avexpr_data::limits::FPS
    );
    let by_start: HashMap<i64, usize> = rows.start.iter().enumerate().map(|(i, s)| (*s, i)).collect();
    anyhow::ensure!(by_start.len() == n, "feature unit {key}: repeated clip starts");
    Ok(Unit { rows, by_start })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clip(start: i64) -> ClipFeatures {
        let dims = DIMS;
        ClipFeatures {
            start,
            fps: 30.0,
            target: 1,
            image: vec![0.5; dims.frames * dims.image_dim],
            face_mask: vec![1; dims.frames],
            labels: vec![1; dims.frames],
            audio: vec![0.25; dims.states * 3 * dims.hidden],
            audio_valid: 3,
        }
    }

    const DIMS: Dims = Dims { frames: 4, image_dim: 2, states: 1, hidden: 3 };

    /// A unit whose tensors are each well formed (safetensors checks each size against its own shape) but whose
    /// shapes disagree with each other: refused, naming the field, where stacking its rows once panicked.
    #[test]
    fn a_unit_with_shapes_that_disagree_is_refused() {
        let bytes = write_unit("v", 0, vec![clip(0), clip(4)], FeatureDtype::F32, DIMS).unwrap();
        check_unit("v/00000.safetensors", &bytes).unwrap();
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let labels = [1u8; 4];
        let tensors: Vec<(String, TensorView<'_>)> = st
            .tensors()
            .into_iter()
            .map(|(name, t)| match name.as_str() {
                // One row of labels for two clips.
                "labels" => (name, view(Dtype::I8, vec![1, 4], &labels)),
                _ => (name, t),
            })
            .collect();
        let broken = safetensors::tensor::serialize(tensors, None).unwrap();
        let err = check_unit("v/00000.safetensors", &broken).unwrap_err().to_string();
        assert!(err.contains("`labels` is I8 [1, 4], expected [I8] [2, 4]"), "{err}");
    }
}
