//! What training logs per step: a line of `metrics.jsonl`, kept in checkpoints and drawn in `curves.png`.

use serde::{Deserialize, Serialize};

/// One logged step (a line of `metrics.jsonl`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub loss: f64,
    pub classification: f64,
    pub contrastive: f64,
    pub lr: f64,
    pub grad_norm: f64,
    /// Validation macro F1, on the steps that evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_macro_f1: Option<f64>,
}
