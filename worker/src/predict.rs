//! `worker predict`: the official `predictions.txt` for a split (a class for every frame of every video) from a
//! checkpoint, the videos sharded across ranks and gathered on rank 0; optional temporal smoothing (the most
//! frequent class in a centred window); on a labelled split, the class-wise table as well.

use std::path::Path;

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::metric::Confusion;
use avexpr_data::predictions::{Predictions, write_predictions};

use crate::dist::Dist;
use crate::eval::{FramePrediction, evaluate, summary};
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

pub struct PredictOptions<'a> {
    pub checkpoint: &'a str,
    pub split: Split,
    pub out: &'a Path,
    pub smooth: usize,
}

/// Returns the split's confusion (meaningful on labelled splits) on every rank.
pub fn predict(job: &JobConfig, dist: &Dist, o: &PredictOptions) -> Result<Confusion> {
    let session = Session::open(job, dist)?;
    let (model, checkpoint) = session.load_checkpoint(o.checkpoint)?;
    if dist.rank == 0 {
        tracing::info!(checkpoint = %checkpoint, split = ?o.split, "predicting");
    }
    let eval = evaluate(&session, &model, o.split)?;
    let lines: String = eval.predictions.iter().map(|p| format!("{}\t{}\t{}\n", p.video, p.frame, p.class)).collect();
    let Some(parts) = dist.gather_bytes(lines.as_bytes()) else { return Ok(eval.confusion) };

    let mut predictions: Predictions = session
        .manifest
        .videos
        .iter()
        .filter(|v| v.split == o.split)
        .map(|v| (v.name.clone(), vec![u8::MAX; v.frames]))
        .collect();
    for part in parts {
        for line in String::from_utf8(part)?.lines() {
            let mut f = line.split('\t');
            let (video, frame, class) = (f.next(), f.next(), f.next());
            let p = FramePrediction {
                video: video.context("prediction line")?.to_string(),
                frame: frame.context("prediction line")?.parse()?,
                class: class.context("prediction line")?.parse()?,
            };
            let frames = predictions.get_mut(&p.video).with_context(|| format!("unknown video {}", p.video))?;
            frames[p.frame] = p.class;
        }
    }
    for (video, frames) in &mut predictions {
        if let Some(missing) = frames.iter().position(|&c| c == u8::MAX) {
            anyhow::bail!("video {video}: frame {missing} got no prediction");
        }
        *frames = smooth(frames, o.smooth);
    }
    write_predictions(o.out, &predictions)?;
    let frames: usize = predictions.values().map(Vec::len).sum();
    println!("wrote {} ({} videos, {frames} frames) from checkpoint {checkpoint}", o.out.display(), predictions.len());
    println!("{}", eval.stats.report());
    if eval.confusion.frames() > 0 {
        println!("{:?} before smoothing: {}", o.split, summary(&eval.confusion));
    }
    Ok(eval.confusion)
}
