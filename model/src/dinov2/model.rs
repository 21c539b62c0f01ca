//! `Dinov2Model` and `Dinov2WithRegistersModel` of `transformers/models/dinov2*/modeling_*.py`: patch and
//! position embeddings (interpolated, bicubic, to the input's grid), optional register tokens, pre-LN layers
//! with layer scale, the MLP or SwiGLU feed-forward, the final layernorm; the pooled output is the normed class
//! token. Variable paths are the checkpoints' keys as published (`encoder.layer.<i>.attention.attention.query`,
//! `mlp.weights_in` for SwiGLU), which transformers renames only in memory; [`KEY_MAP`] strips the `dinov2.`
//! prefix of task-head checkpoints.

use tch::{Kind, Tensor, nn};

use super::config::Dinov2Config;
use crate::activation::Activation;
use crate::attention::{SelfAttention, VIT_PROJECTIONS};
use crate::encoders::AdaptableModel;
use crate::hf::KeyMap;
use crate::lora::{Adaptable, LoraSpec};

pub const KEY_MAP: KeyMap = KeyMap { strip_prefixes: &["dinov2."], renames: &[] };

#[derive(Debug)]
enum FeedForward {
    Mlp {
        fc1: Adaptable,
        fc2: Adaptable,
        activation: Activation,
    },
    /// `weights_in` holds the gate and the up projection stacked (gate first).
    SwiGlu {
        weights_in: Adaptable,
        weights_out: Adaptable,
    },
}

impl FeedForward {
    fn new(vs: nn::Path, cfg: &Dinov2Config, activation: Activation) -> Self {
        let (hidden, inner) = (cfg.hidden_size, cfg.ffn_hidden());
        let linear = |name: &str, i: i64, o: i64| Adaptable::new(nn::linear(&vs / name, i, o, Default::default()));
        if cfg.use_swiglu_ffn {
            Self::SwiGlu {
                weights_in: linear("weights_in", hidden, 2 * inner),
                weights_out: linear("weights_out", inner, hidden),
            }
        } else {
            Self::Mlp { fc1: linear("fc1", hidden, inner), fc2: linear("fc2", inner, hidden), activation }
        }
    }

    fn forward(&self, xs: &Tensor) -> Tensor {
        match self {
            Self::Mlp { fc1, fc2, activation } => fc2.forward(&activation.forward(&fc1.forward(xs))),
            Self::SwiGlu { weights_in, weights_out } => {
                let gate_up = weights_in.forward(xs).chunk(2, -1);
                weights_out.forward(&(gate_up[0].silu() * &gate_up[1]))
            }
        }
    }

    /// LoRA on both linear layers (SwiGLU: on the stacked `weights_in` as one matrix), under `vs` (`mlp`).
    fn attach_lora(&mut self, vs: &nn::Path, spec: LoraSpec) {
        let (first, second, names) = match self {
            Self::Mlp { fc1, fc2, .. } => (fc1, fc2, ["fc1", "fc2"]),
            Self::SwiGlu { weights_in, weights_out } => (weights_in, weights_out, ["weights_in", "weights_out"]),
        };
        first.attach(&(vs / names[0]), spec);
        second.attach(&(vs / names[1]), spec);
    }
}

#[derive(Debug)]
struct Dinov2Layer {
    norm1: nn::LayerNorm,
    attention: SelfAttention,
    layer_scale1: Tensor,
    norm2: nn::LayerNorm,
    mlp: FeedForward,
    layer_scale2: Tensor,
}

impl Dinov2Layer {
    fn new(vs: nn::Path, cfg: &Dinov2Config, activation: Activation) -> Self {
        let ln = |name: &str| layer_norm(&vs / name, cfg);
        let scale = |name: &str| (&vs / name).var("lambda1", &[cfg.hidden_size], nn::Init::Const(cfg.layerscale_value));
        Self {
            norm1: ln("norm1"),
            attention: SelfAttention::with_names(
                &vs / "attention",
                cfg.hidden_size,
                cfg.num_attention_heads,
                VIT_PROJECTIONS,
            ),
            layer_scale1: scale("layer_scale1"),
            norm2: ln("norm2"),
            mlp: FeedForward::new(&vs / "mlp", cfg, activation),
            layer_scale2: scale("layer_scale2"),
        }
    }

    /// `xs` is taken in the layer's precision (an adapted layer is f32 behind a bf16 frozen prefix).
    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs.to_kind(self.layer_scale1.kind());
        let xs = &xs + self.attention.forward(&xs.apply(&self.norm1), None, false) * &self.layer_scale1;
        &xs + self.mlp.forward(&xs.apply(&self.norm2)) * &self.layer_scale2
    }
}

fn layer_norm(vs: nn::Path, cfg: &Dinov2Config) -> nn::LayerNorm {
    nn::layer_norm(vs, vec![cfg.hidden_size], nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() })
}

#[derive(Debug)]
pub struct Dinov2Model {
    cls_token: Tensor,
    position_embeddings: Tensor,
    register_tokens: Option<Tensor>,
    patch_embedding: nn::Conv2D,
    layers: Vec<Dinov2Layer>,
    layernorm: nn::LayerNorm,
    activation: Activation,
    patch_size: i64,
}

impl Dinov2Model {
    /// `vs` is the checkpoint root (`embeddings`, `encoder`, `layernorm`).
    pub fn new(vs: &nn::Path, cfg: &Dinov2Config, activation: Activation) -> Self {
        let emb = vs / "embeddings";
        let hidden = cfg.hidden_size;
        if cfg.use_mask_token || cfg.with_registers() {
            // Used only by masked pre-training; declared so the variables match the checkpoint.
            let _mask_token = emb.zeros("mask_token", &[1, hidden]);
        }
        let positions = cfg.grid() * cfg.grid() + 1;
        let registers = cfg.registers();
        Self {
            cls_token: emb.zeros("cls_token", &[1, 1, hidden]),
            position_embeddings: emb.randn("position_embeddings", &[1, positions, hidden], 0.0, 0.02),
            register_tokens: (registers > 0).then(|| emb.zeros("register_tokens", &[1, registers, hidden])),
            patch_embedding: nn::conv2d(
                &emb / "patch_embeddings" / "projection",
                cfg.num_channels,
                hidden,
                cfg.patch_size,
                nn::ConvConfig { stride: cfg.patch_size, ..Default::default() },
            ),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| Dinov2Layer::new(vs / "encoder" / "layer" / i, cfg, activation))
                .collect(),
            layernorm: layer_norm(vs / "layernorm", cfg),
            activation,
            patch_size: cfg.patch_size,
        }
    }

    /// Position embeddings for a `grid_h` x `grid_w` patch grid: as trained when it is the trained square grid,
    /// else the patch part interpolated bicubically in f32 (antialiased in the registers variant, as there).
    fn positions(&self, grid_h: i64, grid_w: i64) -> Tensor {
        let trained = self.position_embeddings.size()[1] - 1;
        if grid_h * grid_w == trained && grid_h == grid_w {
            return self.position_embeddings.shallow_clone();
        }
        let side = (trained as f64).sqrt().round() as i64;
        let dim = self.position_embeddings.size()[2];
        let kind = self.position_embeddings.kind();
        let patch = self.position_embeddings.narrow(1, 1, trained).reshape([1, side, side, dim]).permute([0, 3, 1, 2]);
        let patch = patch.to_kind(Kind::Float);
        let patch = if self.register_tokens.is_some() {
            patch.internal_upsample_bicubic2d_aa([grid_h, grid_w], false, None, None)
        } else {
            patch.upsample_bicubic2d([grid_h, grid_w], false, None, None)
        };
        let patch = patch.to_kind(kind).permute([0, 2, 3, 1]).reshape([1, grid_h * grid_w, dim]);
        Tensor::cat(&[self.position_embeddings.narrow(1, 0, 1), patch], 1)
    }

    /// `pixel_values` `[batch, 3, H, W]` -> `(last_hidden_state, pooler_output)`: the layernormed sequence
    /// `[batch, 1 + registers + patches, hidden]` and its class token `[batch, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> (Tensor, Tensor) {
        let size = pixel_values.size();
        let (batch, grid_h, grid_w) = (size[0], size[2] / self.patch_size, size[3] / self.patch_size);
        let patches = pixel_values.apply(&self.patch_embedding).flatten(2, -1).transpose(1, 2);
        let cls = self.cls_token.to_kind(patches.kind()).expand([batch, 1, -1], false);
        let xs = Tensor::cat(&[cls, patches], 1) + self.positions(grid_h, grid_w).to_kind(pixel_values.kind());
        let mut xs = match &self.register_tokens {
            Some(registers) => {
                let registers = registers.to_kind(xs.kind()).expand([batch, -1, -1], false);
                let rest = xs.size()[1] - 1;
                Tensor::cat(&[xs.narrow(1, 0, 1), registers, xs.narrow(1, 1, rest)], 1)
            }
            None => xs,
        };
        for layer in &self.layers {
            xs = layer.forward(&xs);
        }
        // The final layernorm is in the last layer's precision (adapted, both are rebuilt together).
        let sequence = xs.apply(&self.layernorm);
        let pooled = sequence.select(1, 0);
        (sequence, pooled)
    }

    pub fn num_layers(&self) -> i64 {
        self.layers.len() as i64
    }

    pub fn fuse_qkv(&mut self) {
        self.layers.iter_mut().for_each(|l| l.attention.fuse_qkv());
    }
}

impl AdaptableModel for Dinov2Model {
    type Config = Dinov2Config;

    /// LoRA on every layer's query and value projections (and MLP), variables under
    /// `vs/encoder/layer/<i>/attention/attention/{query,value}` (and `vs/encoder/layer/<i>/mlp`).
    fn attach_lora(&mut self, vs: &nn::Path, spec: LoraSpec) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let at = vs / "encoder" / "layer" / i;
            layer.attention.attach_lora(&(&at / "attention"), spec);
            if spec.mlp {
                layer.mlp.attach_lora(&(&at / "mlp"), spec);
            }
        }
    }

    /// The layers from `first` on and the final layernorm built anew under `vs` (mirroring the checkpoint's
    /// root): trainable copies, which the caller gives the checkpoint's values. Returns the checkpoint keys'
    /// prefixes of what was rebuilt.
    fn rebuild_tail(&mut self, vs: &nn::Path, cfg: &Self::Config, first: i64) -> Vec<String> {
        for i in first as usize..self.layers.len() {
            self.layers[i] = Dinov2Layer::new(vs / "encoder" / "layer" / i, cfg, self.activation);
        }
        self.layernorm = layer_norm(vs / "layernorm", cfg);
        let mut prefixes: Vec<String> = (first..self.num_layers()).map(|i| format!("encoder.layer.{i}.")).collect();
        prefixes.push("layernorm.".into());
        prefixes
    }
}
