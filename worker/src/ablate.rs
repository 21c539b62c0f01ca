//! `worker ablate`: what each part of the model adds. Trains the job's config and four variants of it from
//! the same seed and data (video only, audio only, concatenation instead of cross-attention, without the
//! prompt loss), each in `<run_dir>/ablation/<variant>`, and tabulates their validation macro F1 and each
//! class's F1 (so a class that only one modality can tell apart shows where it comes from).

use anyhow::Result;
use avexpr_data::Expression;
use avexpr_model::config::Modalities;

use crate::dist::Dist;
use crate::job::JobConfig;
use crate::train::{TrainOptions, train};

/// One variant's outcome.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    pub variant: &'static str,
    pub what: &'static str,
    pub final_f1: f64,
    pub best_f1: f64,
    /// Each class's F1 at the end of training.
    pub class_f1: [f64; avexpr_data::NUM_CLASSES],
    pub accuracy: f64,
}

/// The variants of `job`, named.
pub fn variants(job: &JobConfig) -> Vec<(&'static str, &'static str, JobConfig)> {
    let with = |f: &dyn Fn(&mut JobConfig)| {
        let mut j = job.clone();
        f(&mut j);
        j
    };
    vec![
        ("full", "the config as given", job.clone()),
        ("video_only", "audio features replaced by zeros", with(&|j| j.model.modalities = Modalities::Video)),
        ("audio_only", "face features replaced by zeros", with(&|j| j.model.modalities = Modalities::Audio)),
        ("concat", "no cross-attention: pooled streams concatenated", with(&|j| j.model.fusion.layers = 0)),
        ("no_prompt_loss", "contrastive prompt term off", with(&|j| j.model.loss.contrastive_weight = 0.0)),
    ]
}

pub fn ablate(job: &JobConfig, dist: &Dist, steps: Option<u64>) -> Result<Vec<Outcome>> {
    let mut outcomes = Vec::new();
    for (variant, what, mut j) in variants(job) {
        j.run_dir = job.run_dir.join("ablation").join(variant);
        j.checkpoint.uri = j.run_dir.join("checkpoints").display().to_string();
        if let Some(steps) = steps {
            j.train.steps = steps;
        }
        if dist.rank == 0 {
            tracing::info!(variant, what, "ablation run");
        }
        let trained = train(&j, dist, &TrainOptions { resume: false, overwrite: true, plan: None })?;
        let f1s: Vec<f64> = trained.history.iter().filter_map(|m| m.val_macro_f1).collect();
        outcomes.push(Outcome {
            variant,
            what,
            final_f1: trained.validation.macro_f1(),
            best_f1: f1s.iter().copied().fold(f64::NAN, f64::max),
            class_f1: trained.validation.f1_per_class(),
            accuracy: trained.validation.accuracy(),
        });
    }
    Ok(outcomes)
}

/// The outcomes as two tables: macro F1 with each variant's difference to the full model, then each class's
/// F1 per variant.
pub fn render(outcomes: &[Outcome]) -> String {
    let full = outcomes.iter().find(|o| o.variant == "full").map_or(f64::NAN, |o| o.final_f1);
    let mut text = format!(
        "{:<16} {:>10} {:>10} {:>10} {:>10}  {}\n",
        "variant", "final F1", "best F1", "vs full", "accuracy", "what"
    );
    for o in outcomes {
        text += &format!(
            "{:<16} {:>10.4} {:>10.4} {:>+10.4} {:>10.4}  {}\n",
            o.variant,
            o.final_f1,
            o.best_f1,
            o.final_f1 - full,
            o.accuracy,
            o.what
        );
    }
    text += &format!("\n{:<12}", "class F1");
    for o in outcomes {
        text += &format!(" {:>14}", o.variant);
    }
    text += "\n";
    for (c, e) in Expression::ALL.iter().enumerate() {
        text += &format!("{:<12}", e.name());
        for o in outcomes {
            text += &format!(" {:>14.4}", o.class_f1[c]);
        }
        text += "\n";
    }
    text
}
