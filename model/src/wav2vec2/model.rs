//! `Wav2Vec2Model` of `transformers/models/wav2vec2/modeling_wav2vec2.py`: conv feature encoder
//! (`Wav2Vec2FeatureEncoder`, both `feat_extract_norm` variants), `Wav2Vec2FeatureProjection`, the positional
//! conv embedding with weight norm, and the post-LN (`Wav2Vec2Encoder`) or pre-LN
//! (`Wav2Vec2EncoderStableLayerNorm`) transformer. Variable paths are the HF keys without the `wav2vec2.`
//! prefix of task-head checkpoints, which [`KEY_MAP`] strips.

use tch::{Kind, Tensor, nn, nn::Module};

use super::config::{FeatExtractNorm, Wav2Vec2Config};
use crate::activation::Activation;
use crate::attention::SelfAttention;
use crate::encoders::AdaptableModel;
use crate::hf::KeyMap;
use crate::lora::{Adaptable, LoraSpec};
use crate::weight_norm::{WeightNormConv1d, WeightNormConv1dConfig};

/// The one key mapping of Wav2Vec 2.0 checkpoints: `Wav2Vec2ForCTC`-style prefixes, and the pre-parametrization
/// weight-norm names `weight_g` / `weight_v` of older checkpoints.
pub const KEY_MAP: KeyMap = KeyMap {
    strip_prefixes: &["wav2vec2."],
    renames: &[
        (".conv.weight_g", ".conv.parametrizations.weight.original0"),
        (".conv.weight_v", ".conv.parametrizations.weight.original1"),
    ],
};

#[derive(Debug)]
enum ConvNorm {
    None,
    Group(nn::GroupNorm),
    Layer(nn::LayerNorm),
}

#[derive(Debug)]
struct ConvLayer {
    conv: nn::Conv1D,
    norm: ConvNorm,
    activation: Activation,
}

impl ConvLayer {
    fn forward(&self, xs: &Tensor) -> Tensor {
        let xs = xs.apply(&self.conv);
        let xs = match &self.norm {
            ConvNorm::None => xs,
            ConvNorm::Group(gn) => xs.apply(gn),
            // LayerNorm over channels: [batch, channels, time] -> [batch, time, channels] and back.
            ConvNorm::Layer(ln) => xs.transpose(-2, -1).apply(ln).transpose(-2, -1),
        };
        self.activation.forward_owned(xs)
    }
}

/// `Wav2Vec2PositionalConvEmbedding`: grouped conv with weight norm over dim 2, "same" padding, activation.
#[derive(Debug)]
struct PositionalConvEmbedding {
    conv: WeightNormConv1d,
    kernel: i64,
    activation: Activation,
}

impl PositionalConvEmbedding {
    fn new(vs: nn::Path, cfg: &Wav2Vec2Config, activation: Activation) -> Self {
        let (hidden, kernel) = (cfg.hidden_size, cfg.num_conv_pos_embeddings);
        let conv_cfg = WeightNormConv1dConfig {
            dim: 2,
            padding: kernel / 2,
            groups: cfg.num_conv_pos_embedding_groups,
            ..Default::default()
        };
        Self { conv: WeightNormConv1d::new(&vs / "conv", hidden, hidden, kernel, 0.02, conv_cfg), kernel, activation }
    }

    /// `xs`: `[batch, time, hidden]` -> positional embeddings of the same shape.
    fn forward(&self, xs: &Tensor) -> Tensor {
        let ys = self.conv.forward(&xs.transpose(1, 2));
        // Wav2Vec2SamePadLayer: an even kernel yields one extra frame.
        let ys = if self.kernel % 2 == 0 { ys.narrow(2, 0, ys.size()[2] - 1) } else { ys };
        self.activation.forward_owned(ys).transpose(1, 2)
    }
}

#[derive(Debug)]
struct FeedForward {
    intermediate_dense: Adaptable,
    output_dense: Adaptable,
    activation: Activation,
}

impl Module for FeedForward {
    fn forward(&self, xs: &Tensor) -> Tensor {
        self.output_dense.forward(&self.activation.forward(&self.intermediate_dense.forward(xs)))
    }
}

#[derive(Debug)]
struct EncoderLayer {
    attention: SelfAttention,
    layer_norm: nn::LayerNorm,
    feed_forward: FeedForward,
    final_layer_norm: nn::LayerNorm,
    stable_layer_norm: bool,
}

impl EncoderLayer {
    fn new(vs: nn::Path, cfg: &Wav2Vec2Config, activation: Activation) -> Self {
        let ln = |name: &str| {
            nn::layer_norm(
                &vs / name,
                vec![cfg.hidden_size],
                nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() },
            )
        };
        let ff = &vs / "feed_forward";
        Self {
            attention: SelfAttention::new(&vs / "attention", cfg.hidden_size, cfg.num_attention_heads),
            layer_norm: ln("layer_norm"),
            feed_forward: FeedForward {
                intermediate_dense: Adaptable::new(nn::linear(
                    &ff / "intermediate_dense",
                    cfg.hidden_size,
                    cfg.intermediate_size,
                    Default::default(),
                )),
                output_dense: Adaptable::new(nn::linear(
                    &ff / "output_dense",
                    cfg.intermediate_size,
                    cfg.hidden_size,
                    Default::default(),
                )),
                activation,
            },
            final_layer_norm: ln("final_layer_norm"),
            stable_layer_norm: cfg.do_stable_layer_norm,
        }
    }

    /// `xs` is taken in the layer's precision (an adapted layer is f32 behind a bf16 frozen prefix).
    fn forward(&self, xs: &Tensor, mask: Option<&Tensor>) -> Tensor {
        let xs = &xs.to_kind(self.feed_forward.output_dense.linear.ws.kind());
        if self.stable_layer_norm {
            // Wav2Vec2EncoderLayerStableLayerNorm (pre-LN).
            let xs = xs + self.attention.forward(&xs.apply(&self.layer_norm), mask, false);
            &xs + xs.apply(&self.final_layer_norm).apply(&self.feed_forward)
        } else {
            // Wav2Vec2EncoderLayer (post-LN).
            let xs = (xs + self.attention.forward(xs, mask, false)).apply(&self.layer_norm);
            (&xs + xs.apply(&self.feed_forward)).apply(&self.final_layer_norm)
        }
    }
}

/// Outputs of [`Wav2Vec2Model::forward`].
#[derive(Debug)]
pub struct Wav2Vec2Output {
    /// `[batch, frames, hidden]`: the model's `last_hidden_state` (after the final LayerNorm in the stable-LN
    /// variant).
    pub last_hidden_state: Tensor,
    /// `num_hidden_layers + 1` tensors `[batch, frames, hidden]`: the input of the first transformer layer, then
    /// each layer's output, as `output_hidden_states=True` returns them.
    pub hidden_states: Vec<Tensor>,
    /// `[batch, frames]` bool, true for frames computed from real (unpadded) audio; `None` without a mask.
    pub frame_mask: Option<Tensor>,
}

#[derive(Debug)]
pub struct Wav2Vec2Model {
    conv_layers: Vec<ConvLayer>,
    projection_layer_norm: nn::LayerNorm,
    projection: nn::Linear,
    pos_conv_embed: PositionalConvEmbedding,
    encoder_layer_norm: nn::LayerNorm,
    layers: Vec<EncoderLayer>,
    stable_layer_norm: bool,
    hidden_act: Activation,
    conv_kernel: Vec<i64>,
    conv_stride: Vec<i64>,
}

impl Wav2Vec2Model {
    /// `vs` is the checkpoint root of a `Wav2Vec2Model` (keys `feature_extractor.*`, `encoder.*`, ...).
    /// Activations must come from the validated config.
    pub fn new(vs: &nn::Path, cfg: &Wav2Vec2Config, feat_act: Activation, hidden_act: Activation) -> Self {
        let convs = vs / "feature_extractor" / "conv_layers";
        let mut in_dim = 1;
        let conv_layers = (0..cfg.conv_dim.len())
            .map(|i| {
                let layer = &convs / i as i64;
                let (out_dim, kernel, stride) = (cfg.conv_dim[i], cfg.conv_kernel[i], cfg.conv_stride[i]);
                let conv = nn::conv1d(
                    &layer / "conv",
                    in_dim,
                    out_dim,
                    kernel,
                    nn::ConvConfig { stride, bias: cfg.conv_bias, ..Default::default() },
                );
                let norm = match cfg.feat_extract_norm {
                    FeatExtractNorm::Group if i == 0 => ConvNorm::Group(nn::group_norm(
                        &layer / "layer_norm",
                        out_dim,
                        out_dim,
                        nn::GroupNormConfig { eps: 1e-5, affine: true, ..Default::default() },
                    )),
                    FeatExtractNorm::Group => ConvNorm::None,
                    FeatExtractNorm::Layer => {
                        ConvNorm::Layer(nn::layer_norm(&layer / "layer_norm", vec![out_dim], Default::default()))
                    }
                };
                in_dim = out_dim;
                ConvLayer { conv, norm, activation: feat_act }
            })
            .collect();
        let proj = vs / "feature_projection";
        let ln_cfg = nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() };
        if cfg.mask_time_prob > 0.0 || cfg.mask_feature_prob > 0.0 {
            // Used only by SpecAugment during pre-training; declared so the variables match the checkpoint.
            let _masked_spec_embed =
                vs.var("masked_spec_embed", &[cfg.hidden_size], nn::Init::Uniform { lo: 0.0, up: 1.0 });
        }
        let enc = vs / "encoder";
        Self {
            conv_layers,
            projection_layer_norm: nn::layer_norm(&proj / "layer_norm", vec![in_dim], ln_cfg),
            projection: nn::linear(&proj / "projection", in_dim, cfg.hidden_size, Default::default()),
            pos_conv_embed: PositionalConvEmbedding::new(&enc / "pos_conv_embed", cfg, feat_act),
            encoder_layer_norm: nn::layer_norm(&enc / "layer_norm", vec![cfg.hidden_size], ln_cfg),
            layers: (0..cfg.num_hidden_layers)
                .map(|i| EncoderLayer::new(&enc / "layers" / i, cfg, hidden_act))
                .collect(),
            stable_layer_norm: cfg.do_stable_layer_norm,
            hidden_act,
            conv_kernel: cfg.conv_kernel.clone(),
            conv_stride: cfg.conv_stride.clone(),
        }
    }

    /// Caches derived inference weights (fused q/k/v, the weight-normed positional conv). Call once the
    /// variables are loaded, moved and cast.
    pub fn prepare_inference(&mut self) {
        self.layers.iter_mut().for_each(|l| l.attention.fuse_qkv());
        self.pos_conv_embed.conv.freeze_weight();
    }

    pub fn num_layers(&self) -> i64 {
        self.layers.len() as i64
    }

    /// Frames per sample count, as `_get_feat_extract_output_lengths` (works on tensors of lengths).
    fn output_lengths(&self, lengths: &Tensor) -> Tensor {
        let mut lengths = lengths.shallow_clone();
        for (k, s) in self.conv_kernel.iter().zip(&self.conv_stride) {
            lengths = (lengths - *k).floor_divide_scalar(*s) + 1;
        }
        lengths
    }

    /// `input_values`: `[batch, samples]` (already normalised as the feature extractor does);
    /// `attention_mask`: `[batch, samples]`, 1 for real samples, 0 for padding.
    pub fn forward(&self, input_values: &Tensor, attention_mask: Option<&Tensor>) -> Wav2Vec2Output {
        // [batch, samples] -> [batch, 1, samples] -> [batch, conv_dim, frames]
        let mut xs = input_values.unsqueeze(1);
        for layer in &self.conv_layers {
            xs = layer.forward(&xs);
        }
        // [batch, frames, conv_dim] -> [batch, frames, hidden]
        let xs = xs.transpose(1, 2);
        let frames = xs.size()[1];
        let mut xs = xs.apply(&self.projection_layer_norm).apply(&self.projection);

        let frame_mask = attention_mask.map(|m| {
            let lengths = self.output_lengths(&m.to_kind(Kind::Int64).sum_dim_intlist(-1, false, Kind::Int64));
            crate::length_mask(&lengths.to_device(xs.device()), frames)
        });
        // Key-padding mask [batch, 1, 1, frames]; padded frames are zeroed before the positional conv.
        let attn_mask = frame_mask.as_ref().map(|m| {
            xs = xs.masked_fill(&m.logical_not().unsqueeze(-1), 0.0);
            m.unsqueeze(1).unsqueeze(1)
        });

        xs = &xs + self.pos_conv_embed.forward(&xs);
        if !self.stable_layer_norm {
            xs = xs.apply(&self.encoder_layer_norm);
        }
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(xs.shallow_clone());
        for layer in &self.layers {
            xs = layer.forward(&xs, attn_mask.as_ref());
            hidden_states.push(xs.shallow_clone());
        }
        let last_hidden_state = if self.stable_layer_norm { xs.apply(&self.encoder_layer_norm) } else { xs };
        Wav2Vec2Output { last_hidden_state, hidden_states, frame_mask }
    }
}

impl AdaptableModel for Wav2Vec2Model {
    type Config = Wav2Vec2Config;

    /// LoRA on every layer's query and value projections (and feed-forward), variables under
    /// `vs/encoder/layers/<i>/attention` (and `.../feed_forward`).
    fn attach_lora(&mut self, vs: &nn::Path, spec: LoraSpec) {
        for (i, layer) in self.layers.iter_mut().enumerate() {
            let at = vs / "encoder" / "layers" / i;
            layer.attention.attach_lora(&(&at / "attention"), spec);
            if spec.mlp {
                let ff = &at / "feed_forward";
                layer.feed_forward.intermediate_dense.attach(&(&ff / "intermediate_dense"), spec);
                layer.feed_forward.output_dense.attach(&(&ff / "output_dense"), spec);
            }
        }
    }

    /// The layers from `first` on (and, in the stable-layer-norm variant, the encoder's final layer norm that
    /// follows them) built anew under `vs` (mirroring the checkpoint's root): trainable copies, which the caller
    /// gives the checkpoint's values. Returns the checkpoint keys' prefixes of what was rebuilt.
    fn rebuild_tail(&mut self, vs: &nn::Path, cfg: &Self::Config, first: i64) -> Vec<String> {
        let enc = vs / "encoder";
        for i in first as usize..self.layers.len() {
            self.layers[i] = EncoderLayer::new(&enc / "layers" / i, cfg, self.hidden_act);
        }
        let mut prefixes: Vec<String> = (first..self.num_layers()).map(|i| format!("encoder.layers.{i}.")).collect();
        if self.stable_layer_norm {
            let ln_cfg = nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() };
            self.encoder_layer_norm = nn::layer_norm(&enc / "layer_norm", vec![cfg.hidden_size], ln_cfg);
            prefixes.push("encoder.layer_norm.".into());
        }
        prefixes
    }
}
