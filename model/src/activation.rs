//! Activation functions named as in `transformers.activations.ACT2FN`.

use tch::Tensor;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    /// `x * sigmoid(1.702 x)`, CLIP's original activation.
    QuickGelu,
    /// Exact (erf) GELU.
    Gelu,
    /// Tanh approximation of GELU (`gelu_new`, `gelu_pytorch_tanh`).
    GeluTanh,
    Relu,
    Silu,
}

impl Activation {
    /// Parses an HF `hidden_act` value; `None` for a name we do not implement.
    pub fn from_hf(name: &str) -> Option<Self> {
        Some(match name {
            "quick_gelu" => Activation::QuickGelu,
            "gelu" => Activation::Gelu,
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            "silu" | "swish" => Activation::Silu,
            _ => return None,
        })
    }

    /// Like [`Activation::forward`], overwriting `xs` when no gradient can flow through it (frozen encoders
    /// under no_grad): one allocation and one memory pass fewer per activation.
    pub fn forward_owned(self, mut xs: Tensor) -> Tensor {
        if xs.requires_grad() {
            return self.forward(&xs);
        }
        match self {
            Activation::QuickGelu => {
                let gate = (&xs * 1.702).sigmoid_();
                xs *= gate;
                xs
            }
            Activation::Gelu => xs.gelu_("none"),
            Activation::GeluTanh => xs.gelu_("tanh"),
            Activation::Relu => xs.relu_(),
            Activation::Silu => xs.silu_(),
        }
    }

    pub fn forward(self, xs: &Tensor) -> Tensor {
        match self {
            Activation::QuickGelu => xs * (xs * 1.702).sigmoid_(),
            Activation::Gelu => xs.gelu("none"),
            Activation::GeluTanh => xs.gelu("tanh"),
            Activation::Relu => xs.relu(),
            Activation::Silu => xs.silu(),
        }
    }
}

/// Serde helper: an HF activation name, validated at load time by the config that holds it.
pub(crate) fn parse(path: &std::path::Path, field: &str, name: &str) -> crate::error::Result<Activation> {
    Activation::from_hf(name).ok_or_else(|| {
        crate::ModelError::config(
            path,
            field,
            format!(
                "unsupported activation `{name}` (supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu, silu)"
            ),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_place_variant_equals_the_out_of_place_one_and_keeps_autograd() {
        for act in [Activation::QuickGelu, Activation::Gelu, Activation::GeluTanh, Activation::Relu, Activation::Silu] {
            let xs = Tensor::randn([4, 7], tch::kind::FLOAT_CPU);
            let want = act.forward(&xs);
            assert!(act.forward_owned(xs.copy()).allclose(&want, 1e-6, 1e-6, false), "{act:?}");
            // With a gradient to carry, the input must survive for backward: no in-place update.
            let leaf = xs.copy().set_requires_grad(true);
            let ys = act.forward_owned(leaf.shallow_clone() * 1.0);
            ys.sum(tch::Kind::Float).backward();
            assert!(leaf.grad().defined(), "{act:?}");
        }
    }
}
