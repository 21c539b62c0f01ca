//! CLIP's vision tower: `CLIPVisionEmbeddings`, `CLIPVisionTransformer` and `CLIPVisionModelWithProjection`
//! of `transformers/models/clip/modeling_clip.py`. Variable paths: `vision_model.*`, `visual_projection.weight`.

use tch::{Tensor, nn, nn::Module};

use super::config::ClipVisionConfig;
use super::encoder::ClipEncoder;
use crate::activation::Activation;
use crate::encoders::AdaptableModel;
use crate::lora::LoraSpec;

#[derive(Debug)]
pub struct ClipVisionTransformer {
    class_embedding: Tensor,
    patch_embedding: nn::Conv2D,
    position_embedding: nn::Embedding,
    pre_layrnorm: nn::LayerNorm,
    encoder: ClipEncoder,
    post_layernorm: nn::LayerNorm,
    patch_size: i64,
}

impl ClipVisionTransformer {
    /// `vs` is the `vision_model` path.
    pub fn new(vs: nn::Path, cfg: &ClipVisionConfig, activation: Activation) -> Self {
        let emb = &vs / "embeddings";
        let hidden = cfg.hidden_size;
        let ln = |name: &str| layer_norm(&vs / name, cfg);
        Self {
            class_embedding: emb.var("class_embedding", &[hidden], nn::Init::Randn { mean: 0.0, stdev: 0.02 }),
            patch_embedding: nn::conv2d(
                &emb / "patch_embedding",
                cfg.num_channels,
                hidden,
                cfg.patch_size,
                nn::ConvConfig { stride: cfg.patch_size, bias: false, ..Default::default() },
            ),
            position_embedding: nn::embedding(
                &emb / "position_embedding",
                cfg.num_patches() + 1,
                hidden,
                Default::default(),
            ),
            pre_layrnorm: ln("pre_layrnorm"),
            encoder: ClipEncoder::new(
                &vs / "encoder",
                hidden,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.num_hidden_layers,
                cfg.layer_norm_eps,
                activation,
            ),
            post_layernorm: ln("post_layernorm"),
            patch_size: cfg.patch_size,
        }
    }

    /// `pixel_values`: `[batch, 3, image_size, image_size]`. Returns `(last_hidden_state, pooled)`:
    /// `[batch, 1 + patches, hidden]` and the post-layer-normed class token `[batch, hidden]`.
    pub fn forward(&self, pixel_values: &Tensor) -> (Tensor, Tensor) {
        let batch = pixel_values.size()[0];
        // [batch, hidden, grid, grid] -> [batch, patches, hidden]
        let patches = pixel_values.apply(&self.patch_embedding).flatten(2, -1).transpose(1, 2);
        let class = self.class_embedding.to_kind(patches.kind()).expand([batch, 1, -1], false);
        let xs = Tensor::cat(&[class, patches], 1) + &self.position_embedding.ws;
        let last_hidden_state = xs.apply(&self.pre_layrnorm).apply(&self.encoder);
        let pooled = last_hidden_state.select(1, 0).apply(&self.post_layernorm);
        (last_hidden_state, pooled)
    }

    pub fn patch_size(&self) -> i64 {
        self.patch_size
    }

    pub(crate) fn fuse_qkv(&mut self) {
        self.encoder.fuse_qkv();
    }

    /// The layers from `first` on and the post-layernorm built anew under `vs` (the `vision_model` path).
    fn rebuild_tail(&mut self, vs: &nn::Path, cfg: &ClipVisionConfig, first: i64) {
        self.encoder.rebuild_layers(&(vs / "encoder"), first);
        self.post_layernorm = layer_norm(vs / "post_layernorm", cfg);
    }

    /// `vs` is the `vision_model` path of the LoRA variables.
    pub(crate) fn attach_lora(&mut self, vs: &nn::Path, spec: LoraSpec) {
        self.encoder.attach_lora(&(vs / "encoder"), spec);
    }
}

fn layer_norm(vs: nn::Path, cfg: &ClipVisionConfig) -> nn::LayerNorm {
    nn::layer_norm(vs, vec![cfg.hidden_size], nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() })
}

fn projection(vs: nn::Path, cfg: &ClipVisionConfig) -> nn::Linear {
    nn::linear(vs, cfg.hidden_size, cfg.projection_dim, nn::LinearConfig { bias: false, ..Default::default() })
}

/// `CLIPVisionModelWithProjection`: the tower plus `visual_projection` (no bias).
#[derive(Debug)]
pub struct ClipVisionModelWithProjection {
    pub vision_model: ClipVisionTransformer,
    visual_projection: nn::Linear,
}

impl ClipVisionModelWithProjection {
    /// `vs` is the checkpoint root (holding `vision_model` and `visual_projection`).
    pub fn new(vs: &nn::Path, cfg: &ClipVisionConfig, activation: Activation) -> Self {
        Self {
            vision_model: ClipVisionTransformer::new(vs / "vision_model", cfg, activation),
            visual_projection: projection(vs / "visual_projection", cfg),
        }
    }

    pub fn fuse_qkv(&mut self) {
        self.vision_model.fuse_qkv();
    }

    pub fn num_layers(&self) -> i64 {
        self.vision_model.encoder.num_layers()
    }
}

impl AdaptableModel for ClipVisionModelWithProjection {
    type Config = ClipVisionConfig;

    /// LoRA on the vision tower's layers, variables under `vs/vision_model/encoder/layers/<i>/self_attn`.
    fn attach_lora(&mut self, vs: &nn::Path, spec: LoraSpec) {
        self.vision_model.attach_lora(&(vs / "vision_model"), spec);
    }

    /// The layers from `first` on, the post-layernorm and the projection built anew under `vs` (mirroring the
    /// checkpoint's root): trainable copies, which the caller gives the checkpoint's values. Returns the
    /// checkpoint keys' prefixes of what was rebuilt.
    fn rebuild_tail(&mut self, vs: &nn::Path, cfg: &Self::Config, first: i64) -> Vec<String> {
        self.vision_model.rebuild_tail(&(vs / "vision_model"), cfg, first);
        self.visual_projection = projection(vs / "visual_projection", cfg);
        let mut prefixes: Vec<String> =
            (first..self.num_layers()).map(|i| format!("vision_model.encoder.layers.{i}.")).collect();
        prefixes.extend(["vision_model.post_layernorm.".into(), "visual_projection.".into()]);
        prefixes
    }
}

/// `pixel_values` -> `image_embeds` `[batch, projection_dim]` (not normalised, as `get_image_features`).
impl Module for ClipVisionModelWithProjection {
    fn forward(&self, pixel_values: &Tensor) -> Tensor {
        self.vision_model.forward(pixel_values).1.apply(&self.visual_projection)
    }
}
