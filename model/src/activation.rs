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
pub(crate) fn parse(
    path: &std::path::Path,
    field: &str,
    name: &str,
) -> crate::error::Result<Activation> {
    Activation::from_hf(name).ok_or_else(|| {
        crate::ModelError::config(
            path,
            field,
            format!("unsupported activation `{name}` (supported: quick_gelu, gelu, gelu_new, gelu_pytorch_tanh, relu, silu)"),
        )
    })
}
