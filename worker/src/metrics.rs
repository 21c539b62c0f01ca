//! What training measures: per logged step a line of `metrics.jsonl` (kept in checkpoints and drawn in
//! `curves.png`), and where a rank's step time goes.

use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::Device;

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
    /// Validation F1 of each class (in `Expression` order), on the steps that evaluated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub val_f1: Option<Vec<f64>>,
}

/// Where a rank's step time goes (seconds, summed over steps); CUDA work is synchronised before each reading.
pub struct Phases {
    device: Device,
    pub steps: u64,
    pub data: f64,
    pub encoders: f64,
    pub head: f64,
    pub all_reduce: f64,
    pub optimizer: f64,
}

impl Phases {
    pub fn new(device: Device) -> Self {
        Self { device, steps: 0, data: 0.0, encoders: 0.0, head: 0.0, all_reduce: 0.0, optimizer: 0.0 }
    }

    pub fn time<T>(&mut self, field: impl Fn(&mut Self) -> &mut f64, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        if let Device::Cuda(i) = self.device {
            tch::Cuda::synchronize(i as i64);
        }
        *field(self) += t.elapsed().as_secs_f64();
        out
    }

    pub fn report(&self, world: usize, accumulation: usize) -> String {
        let n = self.steps as f64;
        let ms = |x: f64| 1e3 * x / n;
        let total = self.data + self.encoders + self.head + self.all_reduce + self.optimizer;
        format!(
            "step time breakdown over {} steps ({world} rank(s) x {accumulation} micro-batch(es)), ms per step: \
             data wait {:.1}, frozen encoders {:.1}, trainable forward+backward {:.1}, all-reduce {:.1}, \
             clip+optimizer {:.1}; total {:.1}",
            self.steps,
            ms(self.data),
            ms(self.encoders),
            ms(self.head),
            ms(self.all_reduce),
            ms(self.optimizer),
            ms(total)
        )
    }
}
