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

/// What LoRA adapts in each transformer layer of an encoder: the query and value projections always (peft's
/// default targets for CLIP), the feed-forward's two linear layers too when `mlp`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraSpec {
    pub rank: i64,
    pub alpha: f64,
    pub mlp: bool,
}

/// A linear layer that LoRA may adapt: `linear(x)`, plus `(alpha / r) B A x` once a [`Lora`] is attached.
#[derive(Debug)]
pub struct Adaptable {
    pub linear: nn::Linear,
    lora: Option<Lora>,
}

impl Adaptable {
    pub fn new(linear: nn::Linear) -> Self {
        Self { linear, lora: None }
    }

    /// LoRA on this layer, its variables under `vs` (`<vs>/lora_A`, `<vs>/lora_B`).
    pub fn attach(&mut self, vs: &nn::Path, spec: LoraSpec) {
        let (output, input) = self.linear.ws.size2().expect("a linear layer's weight is [out, in]");
        self.lora = Some(Lora::new(vs, input, output, spec.rank, spec.alpha));
    }

    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let ys = xs.apply(&self.linear);
        match &self.lora {
            Some(lora) => ys + lora.delta(xs),
            None => ys,
        }
    }
}
