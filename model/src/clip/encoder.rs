//! The pre-LN transformer shared by CLIP's two towers (`CLIPEncoderLayer`, `CLIPEncoder`, `CLIPMLP` in
//! `transformers/models/clip/modeling_clip.py`).

use tch::{Tensor, nn, nn::Module};

use crate::activation::Activation;
use crate::attention::SelfAttention;
use crate::lora::{Adaptable, LoraSpec};

#[derive(Debug)]
pub struct ClipEncoderLayer {
    self_attn: SelfAttention,
    layer_norm1: nn::LayerNorm,
    fc1: Adaptable,
    fc2: Adaptable,
    layer_norm2: nn::LayerNorm,
    activation: Activation,
}

impl ClipEncoderLayer {
    pub fn new(vs: nn::Path, hidden: i64, intermediate: i64, heads: i64, eps: f64, activation: Activation) -> Self {
        let ln =
            |name: &str| nn::layer_norm(&vs / name, vec![hidden], nn::LayerNormConfig { eps, ..Default::default() });
        let mlp = &vs / "mlp";
        Self {
            self_attn: SelfAttention::new(&vs / "self_attn", hidden, heads),
            layer_norm1: ln("layer_norm1"),
            fc1: Adaptable::new(nn::linear(&mlp / "fc1", hidden, intermediate, Default::default())),
            fc2: Adaptable::new(nn::linear(&mlp / "fc2", intermediate, hidden, Default::default())),
            layer_norm2: ln("layer_norm2"),
            activation,
        }
    }

    /// `xs` is taken in the layer's precision (an adapted layer is f32 behind a bf16 frozen prefix).
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
        let xs = xs.to_kind(self.fc1.linear.ws.kind());
        let xs = &xs + self.self_attn.forward(&xs.apply(&self.layer_norm1), mask, causal);
        let ys = self.fc2.forward(&self.activation.forward(&self.fc1.forward(&xs.apply(&self.layer_norm2))));
        xs + ys
    }
}

#[derive(Debug)]
pub struct ClipEncoder {
    layers: Vec<ClipEncoderLayer>,
    shape: (i64, i64, i64, f64, Activation),
}

impl ClipEncoder {
    pub fn new(
        vs: nn::Path,
        hidden: i64,
        intermediate: i64,
        heads: i64,
        layers: i64,
        eps: f64,
        act: Activation,
    ) -> Self {
        let vs = &vs / "layers";
        let layers =
            (0..layers).map(|i| ClipEncoderLayer::new(&vs / i, hidden, intermediate, heads, eps, act)).collect();
        Self { layers, shape: (hidden, intermediate, heads, eps, act) }
    }

    pub fn num_layers(&self) -> i64 {
        self.layers.len() as i64
    }

    /// Builds the layers from `first` on anew under `vs/layers/<i>` (the adapted encoder's trainable copies,
    /// unfused); the caller gives them their values.
    pub fn rebuild_layers(&mut self, vs: &nn::Path, first: i64) {
        let (hidden, intermediate, heads, eps, act) = self.shape;
        for i in first as usize..self.layers.len() {
            self.layers[i] = ClipEncoderLayer::new(vs / "layers" / i, hidden, intermediate, heads, eps, act);
        }
    }

    pub fn fuse_qkv(&mut self) {
        self.layers.iter_mut().for_each(|l| l.self_attn.fuse_qkv());
    }

    /// LoRA on every layer's query and value projections (and MLP), variables under `vs/layers/<i>/self_attn`
    /// (and `vs/layers/<i>/mlp`).
    pub fn attach_lora(&mut self, vs: &nn::Path, spec: LoraSpec) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let at = vs / "layers" / i;
            layer.self_attn.attach_lora(&(&at / "self_attn"), spec);
            if spec.mlp {
                layer.fc1.attach(&(&at / "mlp" / "fc1"), spec);
                layer.fc2.attach(&(&at / "mlp" / "fc2"), spec);
            }
        }
    }

    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
        let mut xs = xs.shallow_clone();
        for layer in &self.layers {
            xs = layer.forward(&xs, mask, causal);
        }
        xs
    }
}

/// `nn::Module` is implemented for the unmasked, non-causal case (the vision tower).
impl Module for ClipEncoder {
    fn forward(&self, xs: &Tensor) -> Tensor {
        ClipEncoder::forward(self, xs, None, false)
    }
}
