//! The training objective: a classification term (cross-entropy with optional class weights and label
//! smoothing, or focal loss) plus `contrastive_weight` times the prompt contrastive term (cross-entropy of the
//! prompt head's scaled cosine similarities against the class). Targets of -1 are ignored.

use avexpr_data::NUM_CLASSES;
use tch::{Kind, Reduction, Tensor};

use crate::config::{ClassWeights, ClassificationLoss, LogitAdjustmentMode, LossConfig};

/// Per-class weights from training-set class counts, normalised to mean 1 over the classes that occur;
/// a class with no sample gets weight 0. `None` for `ClassWeights::None`.
pub fn class_weights(kind: ClassWeights, counts: &[f64; NUM_CLASSES], beta: f64) -> Option<Vec<f64>> {
    let raw: Vec<f64> = match kind {
        ClassWeights::None => return None,
        ClassWeights::InverseFrequency => counts.iter().map(|&n| if n > 0.0 { 1.0 / n } else { 0.0 }).collect(),
        ClassWeights::EffectiveNumber => {
            counts.iter().map(|&n| if n > 0.0 { (1.0 - beta) / (1.0 - beta.powf(n)) } else { 0.0 }).collect()
        }
    };
    let present = raw.iter().filter(|&&w| w > 0.0).count().max(1) as f64;
    let total: f64 = raw.iter().sum();
    Some(raw.iter().map(|w| w * present / total).collect())
}

/// The loss terms of one batch; `total` is what backward runs on.
#[derive(Debug)]
pub struct LossTerms {
    pub total: Tensor,
    pub classification: Tensor,
    pub contrastive: Tensor,
}

/// `tau * log pi` from the training set's frames per class (`pi` normalised; a class with no frame counts as
/// one frame, so that its log stays finite).
pub fn logit_adjustment(tau: f64, counts: &[f64; NUM_CLASSES]) -> Vec<f64> {
    let total: f64 = counts.iter().map(|&n| n.max(1.0)).sum();
    counts.iter().map(|&n| tau * (n.max(1.0) / total).ln()).collect()
}

#[derive(Debug)]
pub struct ExprLoss {
    cfg: LossConfig,
    weights: Option<Tensor>,
    /// `tau * log pi` `[8]` when logit adjustment is on.
    adjustment: Option<Tensor>,
}

impl ExprLoss {
    pub fn new(cfg: &LossConfig, class_counts: &[f64; NUM_CLASSES], device: tch::Device) -> Self {
        let weights = class_weights(cfg.class_weights, class_counts, cfg.effective_number_beta)
            .map(|w| Tensor::from_slice(&w).to_kind(Kind::Float).to_device(device));
        let tau = cfg.logit_adjustment.tau;
        let adjustment = (tau > 0.0)
            .then(|| Tensor::from_slice(&logit_adjustment(tau, class_counts)).to_kind(Kind::Float).to_device(device));
        Self { cfg: cfg.clone(), weights, adjustment }
    }

    pub fn class_weights(&self) -> Option<&Tensor> {
        self.weights.as_ref()
    }

    /// What prediction subtracts from the logits (`post_hoc` logit adjustment), if anything.
    pub fn inference_adjustment(&self) -> Option<&Tensor> {
        self.adjustment.as_ref().filter(|_| self.cfg.logit_adjustment.mode == LogitAdjustmentMode::PostHoc)
    }

    /// `logits` `[n, 8]`, `targets` `[n]` (int64, -1 ignored).
    pub fn classification(&self, logits: &Tensor, targets: &Tensor) -> Tensor {
        let adjusted;
        let logits = match (&self.adjustment, self.cfg.logit_adjustment.mode) {
            (Some(adjustment), LogitAdjustmentMode::Loss) => {
                adjusted = logits.to_kind(Kind::Float) + adjustment;
                &adjusted
            }
            _ => logits,
        };
        match self.cfg.classification {
            ClassificationLoss::CrossEntropy => logits.to_kind(Kind::Float).cross_entropy_loss(
                targets,
                self.weights.as_ref(),
                Reduction::Mean,
                -1,
                self.cfg.label_smoothing,
            ),
            ClassificationLoss::Focal => focal_loss(logits, targets, self.weights.as_ref(), self.cfg.focal_gamma),
        }
    }

    /// Cross-entropy of the prompt logits (no class weights, no smoothing).
    pub fn contrastive(&self, prompt_logits: &Tensor, targets: &Tensor) -> Tensor {
        prompt_logits.to_kind(Kind::Float).cross_entropy_loss::<Tensor>(targets, None, Reduction::Mean, -1, 0.0)
    }

    pub fn terms(&self, logits: &Tensor, prompt_logits: &Tensor, targets: &Tensor, clip_targets: &Tensor) -> LossTerms {
        let classification = self.classification(logits, targets);
        let contrastive = self.contrastive(prompt_logits, clip_targets);
        let total = &classification + &contrastive * self.cfg.contrastive_weight;
        LossTerms { total, classification, contrastive }
    }
}

/// Focal loss (Lin et al. 2017) with class weights as alpha: `sum_i w_{t_i} (1 - p_{t_i})^gamma (-log p_{t_i})`
/// over the non-ignored samples, divided by `sum_i w_{t_i}` (the normalisation of weighted cross-entropy, so
/// gamma = 0 gives exactly weighted cross-entropy).
pub fn focal_loss(logits: &Tensor, targets: &Tensor, weights: Option<&Tensor>, gamma: f64) -> Tensor {
    let valid = targets.ne(-1);
    let safe_targets = targets.clamp_min(0).unsqueeze(-1);
    let log_p =
        logits.to_kind(Kind::Float).log_softmax(-1, Kind::Float).gather(-1, &safe_targets, false).squeeze_dim(-1);
    let focal = (log_p.exp().neg() + 1.0).clamp_min(0.0).pow_tensor_scalar(gamma);
    let w = match weights {
        Some(w) => w.index_select(0, &safe_targets.squeeze_dim(-1)),
        None => Tensor::ones_like(&log_p),
    } * valid.to_kind(Kind::Float);
    -(&w * focal * log_p).sum(Kind::Float) / w.sum(Kind::Float).clamp_min(1e-12)
}
