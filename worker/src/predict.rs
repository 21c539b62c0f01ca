//! `worker predict`: the official `predictions.txt` for a split (a class for every frame of every video) from a
//! checkpoint or an ensemble of checkpoints (their class probabilities averaged), the videos sharded across
//! ranks and gathered on rank 0; optional soft voting (probabilities averaged over a centred window) and
//! majority smoothing (the most frequent class in a centred window); on a labelled split, the macro F1 of what
//! was written.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::metric::Confusion;
use avexpr_data::predictions::{Predictions, write_predictions};

use crate::dist::Dist;
use crate::eval::{gather_logits, summary};
use crate::job::JobConfig;
use crate::session::Session;

/// The most frequent class in a window of `window` frames centred on each frame (ties: the lower class).
pub fn smooth(labels: &[u8], window: usize) -> Vec<u8> {
    if window <= 1 {
        return labels.to_vec();
    }
    let half = window / 2;
    (0..labels.len())
        .map(|i| {
            let mut counts = [0usize; avexpr_data::NUM_CLASSES];
            for &l in &labels[i.saturating_sub(half)..(i + half + 1).min(labels.len())] {
                counts[l as usize] += 1;
            }
            (0..counts.len()).max_by_key(|&c| (counts[c], std::cmp::Reverse(c))).expect("8 classes") as u8
        })
        .collect()
}

/// Soft voting: each frame's class probabilities averaged over a window of `window` frames centred on it
/// (cut at the video's ends). `probs` is `[frames, 8]` row-major.
pub fn soft_vote(probs: &[f32], window: usize) -> Vec<f32> {
    let c = avexpr_data::NUM_CLASSES;
    let frames = probs.len() / c;
    if window <= 1 {
        return probs.to_vec();
    }
    let half = window / 2;
    let mut out = vec![0f32; probs.len()];
    for i in 0..frames {
        let (lo, hi) = (i.saturating_sub(half), (i + half + 1).min(frames));
        for k in 0..c {
            let sum: f64 = (lo..hi).map(|j| probs[j * c + k] as f64).sum();
            out[i * c + k] = (sum / (hi - lo) as f64) as f32;
        }
    }
    out
}

/// The most probable class of each row (ties: the lower class).
fn argmax_rows(probs: &[f32]) -> Vec<u8> {
    probs
        .chunks(avexpr_data::NUM_CLASSES)
        .map(|row| (0..row.len()).fold(0, |best, k| if row[k] > row[best] { k } else { best }) as u8)
        .collect()
}

pub struct PredictOptions<'a> {
    /// `best`, `latest`, a checkpoint name, or several separated by commas: an ensemble that averages their
    /// class probabilities.
    pub checkpoint: &'a str,
    pub split: Split,
    pub out: &'a Path,
    /// Majority vote over a centred window of this many frames, after everything else (1: none).
    pub smooth: usize,
    /// Soft voting: probabilities averaged over a centred window of this many frames (1: none).
    pub soft_vote: usize,
    /// Where to also write the probabilities the classes were taken from (after the ensemble and soft
    /// voting): one `[frames, 8]` f32 tensor per video, safetensors.
    pub probabilities: Option<&'a Path>,
    /// Test-time views averaged with each face (`--tta flip,zoom`).
    pub views: Vec<avexpr_model::expr::ImageView>,
}

/// Returns the confusion of the written predictions on a labelled split (rank 0; empty elsewhere).
pub fn predict(job: &JobConfig, dist: &Dist, o: &PredictOptions) -> Result<Confusion> {
    let session = Session::open(job, dist)?;
    let names: Vec<&str> = o.checkpoint.split(',').map(str::trim).filter(|n| !n.is_empty()).collect();
    anyhow::ensure!(!names.is_empty(), "--checkpoint: name at least one checkpoint");
    // Rank 0: the sum of the members' class probabilities per video.
    let mut sum: Option<BTreeMap<String, Vec<f32>>> = None;
    let mut used = Vec::new();
    for name in &names {
        let (model, checkpoint) = session.load_checkpoint(name)?;
        if dist.rank == 0 {
            tracing::info!(checkpoint = %checkpoint, split = ?o.split, "predicting");
        }
        let faces = crate::eval::FaceOptions { views: o.views.clone(), ..Default::default() };
        let eval = crate::eval::evaluate_with(&session, &model, o.split, &faces)?;
        if dist.rank == 0 {
            println!("{checkpoint}: {}", eval.stats.report());
            if eval.confusion.frames() > 0 && names.len() > 1 {
                println!("{checkpoint} alone, {:?}: {}", o.split, summary(&eval.confusion));
            }
        }
        used.push(checkpoint);
        let Some(logits) = gather_logits(dist, &eval)? else { continue };
        for (video, values) in logits {
            let probs = Vec::<f32>::try_from(
                tch::Tensor::from_slice(&values)
                    .view([-1, avexpr_data::NUM_CLASSES as i64])
                    .softmax(-1, tch::Kind::Float)
                    .view([-1]),
            )?;
            let entry = sum.get_or_insert_with(BTreeMap::new).entry(video).or_insert_with(|| vec![0.0; probs.len()]);
            anyhow::ensure!(entry.len() == probs.len(), "checkpoints disagree on the frames of a video");
            entry.iter_mut().zip(&probs).for_each(|(s, p)| *s += p);
        }
    }
    if dist.rank != 0 {
        return Ok(Confusion::default());
    }
    let sum = sum.unwrap_or_default();
    let mut predictions = Predictions::new();
    let mut probabilities = Vec::new();
    let mut confusion = Confusion::default();
    for video in session.manifest.videos.iter().filter(|v| v.split == o.split) {
        let Some(total) = sum.get(&video.name) else {
            anyhow::ensure!(video.frames == 0, "video {}: no frame got a prediction", video.name);
            continue;
        };
        anyhow::ensure!(
            total.len() == video.frames * avexpr_data::NUM_CLASSES,
            "video {}: {} frames predicted, the manifest has {}",
            video.name,
            total.len() / avexpr_data::NUM_CLASSES,
            video.frames
        );
        let mean: Vec<f32> = total.iter().map(|s| s / names.len() as f32).collect();
        let voted = soft_vote(&mean, o.soft_vote);
        let classes = smooth(&argmax_rows(&voted), o.smooth);
        for (&truth, &class) in video.labels().iter().zip(&classes) {
            confusion.add(truth, class);
        }
        predictions.insert(video.name.clone(), classes);
        if o.probabilities.is_some() {
            probabilities.push((
                video.name.clone(),
                tch::Tensor::from_slice(&voted).view([-1, avexpr_data::NUM_CLASSES as i64]),
            ));
        }
    }
    write_predictions(o.out, &predictions)?;
    if let Some(path) = o.probabilities {
        avexpr_data::files::replace_with(path, |tmp| {
            tch::Tensor::write_safetensors(&probabilities, tmp).map_err(anyhow::Error::from)
        })
        .with_context(|| path.display().to_string())?;
    }
    let frames: usize = predictions.values().map(Vec::len).sum();
    println!(
        "wrote {} ({} videos, {frames} frames) from {} {}",
        o.out.display(),
        predictions.len(),
        if used.len() > 1 { "the ensemble of" } else { "checkpoint" },
        used.join(", ")
    );
    if confusion.frames() > 0 {
        println!("{:?}, as written: {}", o.split, summary(&confusion));
    }
    Ok(confusion)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn soft_voting_averages_probabilities_over_a_centred_window_cut_at_the_ends() {
        // 4 frames x 8 classes: frame i puts probability 1 on class i.
        let mut probs = vec![0f32; 32];
        for i in 0..4 {
            probs[i * 8 + i] = 1.0;
        }
        assert_eq!(soft_vote(&probs, 1), probs);
        let voted = soft_vote(&probs, 3);
        let row = |i: usize| voted[i * 8..i * 8 + 4].to_vec();
        assert_eq!(row(0), [0.5, 0.5, 0.0, 0.0]); // frames 0 and 1 only
        let third = 1.0f32 / 3.0;
        assert_eq!(row(1), [third, third, third, 0.0]);
        assert_eq!(row(3), [0.0, 0.0, 0.5, 0.5]);
        // Ties go to the lower class; a soft vote can overrule the frame's own argmax.
        assert_eq!(argmax_rows(&voted), [0, 0, 1, 2]);
    }
}
