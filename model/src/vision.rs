//! The image encoder of every face frame, as `model.image_encoder` chooses it: CLIP's vision tower (the
//! paper's; its projected `image_embeds`) or DINOv2 (its pooled class token). The rest of the model sees only
//! `[n, image_dim]` embeddings.

use std::path::Path;

use tch::{Tensor, nn};

use crate::clip::{ClipImageProcessor, ClipVisionEncoder};
use crate::config::ImageEncoder;
use crate::dinov2::Dinov2Encoder;
use crate::encoders::EncoderOptions;
use crate::error::Result;

#[derive(Debug)]
pub enum VisionEncoder {
    Clip(ClipVisionEncoder),
    Dinov2(Dinov2Encoder),
}

impl VisionEncoder {
    pub fn load(kind: ImageEncoder, dir: &Path, options: EncoderOptions) -> Result<Self> {
        Ok(match kind {
            ImageEncoder::Clip => Self::Clip(ClipVisionEncoder::load(dir, options)?),
            ImageEncoder::Dinov2 => Self::Dinov2(Dinov2Encoder::load(dir, options)?),
        })
    }

    /// The checkpoint's preprocessing (resize, centre crop, normalisation).
    pub fn processor(&self) -> &ClipImageProcessor {
        match self {
            Self::Clip(e) => &e.processor,
            Self::Dinov2(e) => &e.processor,
        }
    }

    /// Width of an image embedding.
    pub fn image_dim(&self) -> i64 {
        match self {
            Self::Clip(e) => e.config.projection_dim,
            Self::Dinov2(e) => e.config.hidden_size,
        }
    }

    /// `pixel_values` `[batch, 3, H, W]` -> `[batch, image_dim]` f32 on the encoder's device.
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Tensor {
        match self {
            Self::Clip(e) => e.encode_pixels(pixel_values),
            Self::Dinov2(e) => e.encode_pixels(pixel_values),
        }
    }

    pub fn num_layers(&self) -> i64 {
        match self {
            Self::Clip(e) => e.num_layers(),
            Self::Dinov2(e) => e.num_layers(),
        }
    }

    pub fn var_store(&self) -> &nn::VarStore {
        match self {
            Self::Clip(e) => e.var_store(),
            Self::Dinov2(e) => e.var_store(),
        }
    }

    /// LoRA on every layer's query and value projections, and MLP if `spec.mlp` (variables under `vs` at the
    /// checkpoint's paths).
    pub fn attach_lora(&mut self, vs: &nn::Path, spec: crate::lora::LoraSpec) {
        match self {
            Self::Clip(e) => e.attach_lora(vs, spec),
            Self::Dinov2(e) => e.attach_lora(vs, spec),
        }
    }

    /// The layers from `first` on (and what follows them) trainable, from the checkpoint's values; returns how
    /// many variables were copied.
    pub fn adapt_last_blocks(&mut self, vs: &nn::Path, first: i64) -> usize {
        match self {
            Self::Clip(e) => e.adapt_last_blocks(vs, first),
            Self::Dinov2(e) => e.adapt_last_blocks(vs, first),
        }
    }
}
