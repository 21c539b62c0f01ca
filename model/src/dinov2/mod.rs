//! DINOv2 (Oquab et al. 2023; with registers, Darcet et al. 2024), ported from `transformers/models/dinov2` and
//! `dinov2_with_registers`: an image encoder that can replace CLIP's vision tower (`model.image_encoder:
//! dinov2`). Its image embedding is the pooled output (the layernormed class token, `hidden_size` wide); the
//! prompts stay CLIP text embeddings, which the prompt head's projection of the fused features is compared to.

pub mod config;
pub mod model;

use std::path::Path;

use tch::{Kind, Tensor, nn::VarStore};

pub use config::Dinov2Config;
pub use model::{Dinov2Model, KEY_MAP};

use crate::clip::ClipImageProcessor;
use crate::encoders::{EncoderOptions, Tower, build_frozen};
use crate::error::Result;
use crate::hf::weights_file;

/// The DINOv2 image encoder: `pixel_values` -> pooled output `[batch, hidden]`; frozen unless adapted.
#[derive(Debug)]
pub struct Dinov2Encoder {
    tower: Tower<Dinov2Model>,
    pub config: Dinov2Config,
    /// `preprocessor_config.json` (a `BitImageProcessor`: resize 256, crop 224, ImageNet normalisation).
    pub processor: ClipImageProcessor,
}

impl Dinov2Encoder {
    /// Loads a `Dinov2Model` / `Dinov2WithRegistersModel` checkpoint directory (or a task model's, with the
    /// `dinov2.` prefix).
    pub fn load(dir: &Path, options: EncoderOptions) -> Result<Self> {
        let config = Dinov2Config::from_file(&dir.join("config.json"))?;
        let activation = config.activation(&dir.join("config.json"))?;
        let processor = ClipImageProcessor::from_dir_or(dir, ClipImageProcessor::imagenet())?;
        let weights = weights_file(dir)?;
        let mut tower = Tower::new(
            build_frozen(Some((&weights, &KEY_MAP)), &options, |p| Dinov2Model::new(p, &config, activation))?,
            options,
        );
        tower.model.fuse_qkv();
        Ok(Self { tower, config, processor })
    }

    /// A randomly initialised encoder (benchmarks, shape checks).
    pub fn from_config(config: &Dinov2Config, options: EncoderOptions) -> Result<Self> {
        let activation = config.activation(Path::new("<config>"))?;
        let mut tower = Tower::new(build_frozen(None, &options, |p| Dinov2Model::new(p, config, activation))?, options);
        tower.model.fuse_qkv();
        Ok(Self { tower, config: config.clone(), processor: ClipImageProcessor::imagenet() })
    }

    pub fn var_store(&self) -> &VarStore {
        &self.tower.vs
    }

    /// `pixel_values` `[batch, 3, H, W]` (any device; H and W multiples of the patch size) -> the pooled output
    /// `[batch, hidden]` f32 on the encoder's device.
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Tensor {
        self.tower.run(pixel_values, |model, xs| model.forward(xs).1.to_kind(Kind::Float))
    }

    /// `(last_hidden_state, pooler_output)` f32, as `Dinov2Model` returns them (parity tests).
    pub fn forward(&self, pixel_values: &Tensor) -> (Tensor, Tensor) {
        self.tower.run(pixel_values, |model, xs| {
            let (sequence, pooled) = model.forward(xs);
            (sequence.to_kind(Kind::Float), pooled.to_kind(Kind::Float))
        })
    }

    pub fn num_layers(&self) -> i64 {
        self.tower.model.num_layers()
    }

    /// LoRA on every layer's query and value projections, variables under `vs` at their checkpoint paths
    /// (`<vs>/encoder/layer/<i>/attention/attention/query/lora_A`, ...).
    pub fn attach_lora(&mut self, vs: &tch::nn::Path, spec: crate::lora::LoraSpec) {
        self.tower.attach_lora(vs, spec);
    }

    /// Unfreezes the layers from `first` on and the final layernorm (trainable copies with the checkpoint's
    /// values under `vs`); returns how many variables were copied.
    pub fn adapt_last_blocks(&mut self, vs: &tch::nn::Path, first: i64) -> usize {
        self.tower.adapt_last_blocks(vs, &self.config, first)
    }
}
