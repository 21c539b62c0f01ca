//! The optimizer side of a training step: AdamW, the warm-up + cosine learning rate, gradient-norm clipping.
//!
//! AdamW is PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected moments, the same operation
//! order), written on tch tensors because tch's wrapped C++ optimizers do not expose their state, and a
//! checkpoint must hold it for an exact resume. Variables of one dimension or less (biases, norm scales,
//! temperatures) get no weight decay.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub lr: f64,
    pub betas: [f64; 2],
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self { lr: 1e-3, betas: [0.9, 0.999], eps: 1e-8, weight_decay: 0.01 }
    }
}

/// One variable's state.
struct Slot {
    name: String,
    var: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    decay: bool,
    /// This variable's learning rate is `lr` times this (a group's own rate, e.g. an adapted backbone's).
    lr_scale: f64,
}

pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    /// Steps taken.
    pub step: u64,
}

#[derive(Debug, thiserror::Error)]
#[error("optimizer state: {0}")]
pub struct StateError(String);

impl AdamW {
    /// `vars`: (name, variable) in a fixed order.
    pub fn new(cfg: AdamWConfig, vars: &[(String, Tensor)]) -> AdamW {
        let slots = vars
            .iter()
            .map(|(name, var)| Slot {
                name: name.clone(),
                var: var.shallow_clone(),
                exp_avg: var.zeros_like(),
                exp_avg_sq: var.zeros_like(),
                decay: var.dim() > 1,
                lr_scale: 1.0,
            })
            .collect();
        AdamW { cfg, slots, step: 0 }
    }

    /// Each variable's learning rate scaled by `scale(name)` (as a PyTorch parameter group with its own `lr`:
    /// the decoupled weight decay scales with it).
    pub fn with_lr_scale(mut self, scale: impl Fn(&str) -> f64) -> AdamW {
        self.slots.iter_mut().for_each(|s| s.lr_scale = scale(&s.name));
        self
    }

    /// One update with learning rate `lr` from each variable's `.grad()`.
    pub fn step(&mut self, lr: f64) {
        self.step += 1;
        let [beta1, beta2] = self.cfg.betas;
        let bias_correction1 = 1.0 - beta1.powi(self.step as i32);
        let bias_correction2_sqrt = (1.0 - beta2.powi(self.step as i32)).sqrt();
        let step_size = lr / bias_correction1;
        tch::no_grad(|| {
            for s in &mut self.slots {
                let grad = s.var.grad();
                if !grad.defined() {
                    continue;
                }
                if s.decay && self.cfg.weight_decay != 0.0 {
                    let _ = s.var.g_mul_scalar_(1.0 - lr * s.lr_scale * self.cfg.weight_decay);
                }
                let _ = s.exp_avg.lerp_(&grad, 1.0 - beta1);
                let _ = s.exp_avg_sq.g_mul_scalar_(beta2);
                let _ = s.exp_avg_sq.addcmul_(&(&grad * (1.0 - beta2)), &grad);
                let denom = (s.exp_avg_sq.sqrt() / bias_correction2_sqrt) + self.cfg.eps;
                let _ = s.var.addcdiv_(&(&s.exp_avg * (-step_size * s.lr_scale)), &denom);
            }
        });
    }

    /// The moments by variable name (`<name>.exp_avg`, `<name>.exp_avg_sq`), for a checkpoint.
    pub fn state(&self) -> BTreeMap<String, Tensor> {
        let mut state = BTreeMap::new();
        for s in &self.slots {
            state.insert(format!("{}.exp_avg", s.name), s.exp_avg.shallow_clone());
            state.insert(format!("{}.exp_avg_sq", s.name), s.exp_avg_sq.shallow_clone());
        }
        state
    }

    /// Restores moments saved by [`AdamW::state`] and the step count.
    pub fn load_state(&mut self, state: &BTreeMap<String, Tensor>, step: u64) -> Result<(), StateError> {
        tch::no_grad(|| {
            for s in &mut self.slots {
                for (suffix, dst) in [("exp_avg", &mut s.exp_avg), ("exp_avg_sq", &mut s.exp_avg_sq)] {
                    let key = format!("{}.{suffix}", s.name);
                    let src = state.get(&key).ok_or_else(|| StateError(format!("`{key}` is missing")))?;
                    if src.size() != dst.size() {
                        return Err(StateError(format!(
                            "`{key}` has shape {:?}, expected {:?}",
                            src.size(),
                            dst.size()
                        )));
                    }
                    dst.copy_(src);
                }
            }
            Ok(())
        })?;
        self.step = step;
        Ok(())
    }
}

/// Linear warm-up from 0 over `warmup` steps, then cosine decay to `min_ratio` x `peak` at `total` steps.
pub fn learning_rate(step: u64, peak: f64, warmup: u64, total: u64, min_ratio: f64) -> f64 {
    if step < warmup {
        return peak * (step + 1) as f64 / warmup as f64;
    }
    let span = total.saturating_sub(warmup).max(1) as f64;
    let progress = ((step - warmup) as f64 / span).min(1.0);
    let min = peak * min_ratio;
    min + 0.5 * (peak - min) * (1.0 + (std::f64::consts::PI * progress).cos())
}

/// `torch.nn.utils.clip_grad_norm_` over flat gradient buffers (the all-reduce buckets hold every trainable
/// gradient): scales them so that their global L2 norm is at most `max_norm`; returns the norm before.
pub fn clip_grad_norm(buffers: &mut [Tensor], max_norm: f64) -> f64 {
    let total: f64 = buffers.iter().map(|b| b.square().sum(Kind::Double).double_value(&[])).sum::<f64>().sqrt();
    let coef = max_norm / (total + 1e-6);
    if coef < 1.0 {
        for b in buffers {
            let _ = b.g_mul_scalar_(coef);
        }
    }
    total
}
