//! Dense evaluation: a prediction for every frame of a split, each from the window that has the frame at its
//! target position (the last frame for the paper's causal head), the videos sharded across ranks; the
//! confusion matrices are summed over ranks, so every rank ends with the split's macro F1. Used by training's
//! validation, `worker predict`, and `worker evaluate` ([`evaluate_to`]: table, eval.json, confusion.png).

use std::path::Path;

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::loader::{Loader, LoaderConfig, Source};
use avexpr_data::metric::Confusion;
use avexpr_data::sampler::{Cursor, RankSampler, SamplerConfig};
use avexpr_model::ExprModel;

use crate::dist::Dist;
use crate::job::JobConfig;
use crate::session::{Session, raw_batch};

/// One frame's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct FramePrediction {
    pub video: String,
    pub frame: usize,
    pub class: u8,
}

pub struct Evaluation {
    /// Summed over all ranks.
    pub confusion: Confusion,
    /// This rank's frames only.
    pub predictions: Vec<FramePrediction>,
}

/// Predicts every frame of `split` on this rank's share of the videos, from a dense sliding window with the
/// job's clip settings and no augmentation; the head under bf16 autocast when the session's mixed precision
/// is on.
pub fn evaluate(session: &Session, model: &ExprModel, split: Split) -> Result<Evaluation> {
    let (job, dist, manifest) = (session.job, session.dist, &session.manifest);
    let cfg = SamplerConfig { dense: true, class_balanced: false, ..job.sampler() };
    let offset = cfg.target_offset() as i64;
    let loader_cfg = LoaderConfig { augment: None, ..job.loader() };
    let rank_sampler = RankSampler::new(manifest, split, dist.rank, dist.world_size, &cfg, None)?;
    let mut confusion = Confusion::default();
    let mut predictions = Vec::with_capacity(rank_sampler.len());
    if !rank_sampler.is_empty() {
        let rank_sampler_len = rank_sampler.len() as u64;
        let stream = Loader::start(
            Source::Store(session.store.clone()),
            manifest.clone(),
            rank_sampler,
            &loader_cfg,
            Cursor::default(),
            Some(1),
        )?;
        let progress =
            avexpr_data::progress::Progress::new(&format!("{split:?}").to_lowercase(), "frames", rank_sampler_len);
        for batch in stream {
            let batch = batch.context("evaluation data")?;
            progress.inc(batch.len() as u64);
            crate::heartbeat::update(|h| h.phase = "evaluating".into());
            let (raw, _) = raw_batch(&batch);
            let feats = tch::no_grad(|| model.encode(&raw))?;
            let device = feats.image_embeds.device();
            let logits = tch::no_grad(|| {
                avexpr_model::autocast::bf16(device, session.mixed_precision, || model.forward_t(&feats, false).logits)
            })
            .to_kind(tch::Kind::Float);
            // A per-frame head scores every frame of the window: take the target frame's.
            let logits = if logits.dim() == 3 { logits.select(1, offset) } else { logits };
            let classes = Vec::<i64>::try_from(logits.argmax(-1, false).to_device(tch::Device::Cpu))?;
            for (clip, class) in batch.clips.iter().zip(classes) {
                confusion.add(clip.target, class as u8);
                predictions.push(FramePrediction {
                    video: clip.video.clone(),
                    frame: (clip.start + offset) as usize,
                    class: class as u8,
                });
            }
        }
        progress.finish();
    }
    let mut counts: Vec<f64> = confusion.counts.iter().flatten().map(|&c| c as f64).collect();
    dist.all_reduce_sum_f64(&mut counts);
    for (i, c) in counts.into_iter().enumerate() {
        confusion.counts[i / avexpr_data::NUM_CLASSES][i % avexpr_data::NUM_CLASSES] = c as u64;
    }
    Ok(Evaluation { confusion, predictions })
}

/// One line for logs.
pub fn summary(confusion: &Confusion) -> String {
    format!(
        "macro F1 {:.4} over {} frames (accuracy {:.4})",
        confusion.macro_f1(),
        confusion.frames(),
        confusion.accuracy()
    )
}

/// `worker evaluate`: the class-wise table, `eval.json` and `confusion.png` of a split, from a checkpoint.
pub fn evaluate_to(job: &JobConfig, dist: &Dist, checkpoint: &str, split: Split, out: &Path) -> Result<Confusion> {
    let session = Session::open(job, dist)?;
    let (model, checkpoint) = session.load_checkpoint(checkpoint)?;
    let eval = evaluate(&session, &model, split)?;
    let c = &eval.confusion;
    if dist.rank == 0 {
        anyhow::ensure!(c.frames() > 0, "the {split:?} split has no labelled frames to score");
        std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
        let table = c.render(Some(&session.manifest.class_ratios));
        // Each file replaces a previous evaluation's whole (never left half-written).
        let write = |name: &str, bytes: &[u8]| {
            let path = out.join(name);
            avexpr_data::files::write_atomic(&path, bytes).with_context(|| path.display().to_string())
        };
        write("table.txt", table.as_bytes())?;
        let f1 = c.f1_per_class();
        let report = serde_json::json!({
            "checkpoint": checkpoint,
            "split": split,
            "macro_f1": c.macro_f1(),
            "accuracy": c.accuracy(),
            "frames": c.frames(),
            "f1": avexpr_data::Expression::ALL.iter().zip(f1).map(|(e, f)| (e.name(), f)).collect::<std::collections::BTreeMap<_, _>>(),
            "classes": avexpr_data::Expression::ALL.map(|e| e.name()),
            "confusion": c.counts,
        });
        write("eval.json", serde_json::to_string_pretty(&report)?.as_bytes())?;
        avexpr_data::files::replace_with(&out.join("confusion.png"), |tmp| {
            crate::plots::confusion_png(tmp, c, &format!("{split:?}, {checkpoint}: {}", summary(c)))
        })?;
        print!("{table}");
        println!("wrote {}/{{table.txt,eval.json,confusion.png}}", out.display());
    }
    Ok(eval.confusion)
}
