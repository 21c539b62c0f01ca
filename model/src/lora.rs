//! LoRA (Hu et al. 2021) on a frozen linear layer, as `peft` builds it: `y = W x + b + (alpha / r) B A x` with
//! `A` `[r, in]` (Kaiming-uniform, a = sqrt 5, as `nn.Linear`) and `B` `[out, r]` (zeros, so training starts
//! from the frozen model). Variable names follow peft's without the adapter name: `<layer>.lora_A`,
//! `<layer>.lora_B` under the `backbone` group.

use tch::{Kind, Tensor, nn};

#[derive(Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    scale: f64,
}

impl Lora {
    pub fn new(vs: &nn::Path, input: i64, output: i64, rank: i64, alpha: f64) -> Self {
        let bound = 1.0 / (input as f64).sqrt();
        Self {
            a: vs.var("lora_A", &[rank, input], nn::Init::Uniform { lo: -bound, up: bound }),
            b: vs.zeros("lora_B", &[output, rank]),
            scale: alpha / rank as f64,
        }
    }

    /// `(alpha / r) B A x` for `xs` `[..., in]`, in `xs`'s dtype.
    pub fn delta(&self, xs: &Tensor) -> Tensor {
        let kind = xs.kind();
        let cast = |t: &Tensor| if kind == Kind::Float { t.shallow_clone() } else { t.to_kind(kind) };
        xs.linear::<Tensor>(&cast(&self.a), None).linear::<Tensor>(&cast(&self.b), None) * self.scale
    }
}
