//! `worker predict`: the official `predictions.txt` for a split (a class for every frame of every video) from a
//! checkpoint, the videos sharded across ranks and gathered on rank 0; optional temporal smoothing (the most
//! frequent class in a centred window); on a labelled split, the class-wise table as well.

use std::path::Path;

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::metric::Confusion;
use avexpr_data::predictions::{Predictions, write_predictions};

use crate::checkpoint::CheckpointStore;
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

/// The job's session and its model with a checkpoint's variables.
pub struct Loaded<'a> {
    pub session: Session<'a>,
    pub model: avexpr_model::ExprModel,
    pub checkpoint: String,
}

pub fn load<'a>(job: &'a JobConfig, dist: &'a Dist, checkpoint: &str) -> Result<Loaded<'a>> {
    let session = Session::open(job, dist)?;
    let ckpt = CheckpointStore::open(&job.checkpoint.uri, job.checkpoint.keep_last_k)?.select(checkpoint)?;
    let model = session.build_model()?;
    let named: Vec<(String, tch::Tensor)> = model.trainable_groups().into_values().flatten().collect();
    ckpt.restore_variables(&named)?;
    Ok(Loaded { session, model, checkpoint: ckpt.name })
}

/// Returns the split's confusion (meaningful on labelled splits) on every rank.
pub fn predict(job: &JobConfig, dist: &Dist, o: &PredictOptions) -> Result<Confusion> {
    let Loaded { session, model, checkpoint } = load(job, dist, o.checkpoint)?;
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
    if eval.confusion.frames() > 0 {
        println!("{:?} before smoothing: {}", o.split, summary(&eval.confusion));
    }
    Ok(eval.confusion)
}

/// `worker evaluate`: the class-wise table, `eval.json` and `confusion.png` of a split, from a checkpoint.
pub fn evaluate_to(job: &JobConfig, dist: &Dist, checkpoint: &str, split: Split, out: &Path) -> Result<Confusion> {
    let Loaded { session, model, checkpoint } = load(job, dist, checkpoint)?;
    let eval = evaluate(&session, &model, split)?;
    let c = &eval.confusion;
    if dist.rank == 0 {
        anyhow::ensure!(c.frames() > 0, "the {split:?} split has no labelled frames to score");
        std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
        let table = c.render(&avexpr_data::affwild2::PAPER_TRAIN_RATIOS);
        std::fs::write(out.join("table.txt"), &table)?;
        let f1 = c.f1_per_class();
        let report = serde_json::json!({
            "checkpoint": checkpoint,
            "split": format!("{split:?}").to_lowercase(),
            "macro_f1": c.macro_f1(),
            "accuracy": c.accuracy(),
            "frames": c.frames(),
            "f1": avexpr_data::Expression::ALL.iter().zip(f1).map(|(e, f)| (e.name(), f)).collect::<std::collections::BTreeMap<_, _>>(),
            "classes": avexpr_data::Expression::ALL.map(|e| e.name()),
            "confusion": c.counts,
        });
        std::fs::write(out.join("eval.json"), serde_json::to_string_pretty(&report)?)?;
        crate::plots::confusion_png(
            &out.join("confusion.png"),
            c,
            &format!("{split:?}, {checkpoint}: {}", summary(c)),
        )?;
        print!("{table}");
        println!("wrote {}/{{table.txt,eval.json,confusion.png}}", out.display());
    }
    Ok(eval.confusion)
}
