//! CLIP (Radford et al. 2021), ported from `transformers/models/clip`: the vision tower that embeds every face
//! frame and the text tower that embeds the label prompts, both frozen.

pub mod config;
pub mod encoder;
pub mod image_processor;
pub mod text_model;
pub mod tokenizer;
pub mod vision_model;

use std::path::Path;

use image::DynamicImage;
use tch::{Kind, Tensor, nn::Module, nn::VarStore};

pub use config::{ClipConfig, ClipTextConfig, ClipVisionConfig};
pub use image_processor::ClipImageProcessor;
pub use text_model::ClipTextModelWithProjection;
pub use tokenizer::ClipTokenizer;
pub use vision_model::ClipVisionModelWithProjection;

use crate::encoders::{EncoderOptions, Tower, build_frozen};
use crate::error::{ModelError, Result};
use crate::hf::{KeyMap, weights_file};

/// CLIP checkpoints need no key mapping: both `CLIPModel` and the single-tower classes use the same keys.
pub const KEY_MAP: KeyMap = KeyMap { strip_prefixes: &[], renames: &[] };

/// The frozen CLIP image encoder: `pixel_values` -> `image_embeds` (projected, not normalised).
#[derive(Debug)]
pub struct ClipVisionEncoder {
    tower: Tower<ClipVisionModelWithProjection>,
    pub config: ClipVisionConfig,
    pub processor: ClipImageProcessor,
}

impl ClipVisionEncoder {
    /// Loads the vision tower from a `CLIPModel` (text half ignored) or `CLIPVisionModelWithProjection`
    /// checkpoint directory.
    pub fn load(dir: &Path, options: EncoderOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = ClipConfig::from_file(&config_path)?
            .vision
            .ok_or_else(|| ModelError::config(&config_path, "model_type", "this checkpoint has no vision tower"))?;
        let processor = ClipImageProcessor::from_dir(dir, config.image_size as u32)?;
        let activation = config.activation(&config_path)?;
        let weights = weights_file(dir)?;
        let mut tower = Tower::new(
            build_frozen(Some((&weights, &KEY_MAP)), &options, |p| {
                ClipVisionModelWithProjection::new(p, &config, activation)
            })?,
            options,
        );
        tower.model.fuse_qkv();
        Ok(Self { tower, config, processor })
    }

    /// A randomly initialised encoder (benchmarks, shape checks).
    pub fn from_config(config: &ClipVisionConfig, options: EncoderOptions) -> Result<Self> {
        let activation = config.activation(Path::new("<config>"))?;
        let mut tower = Tower::new(
            build_frozen(None, &options, |p| ClipVisionModelWithProjection::new(p, config, activation))?,
            options,
        );
        tower.model.fuse_qkv();
        let processor = ClipImageProcessor::openai(config.image_size as u32);
        Ok(Self { tower, config: config.clone(), processor })
    }

    pub fn var_store(&self) -> &VarStore {
        &self.tower.vs
    }

    /// `pixel_values` `[batch, 3, H, W]` (any device) -> `image_embeds` `[batch, projection_dim]` f32 on the
    /// encoder's device.
    pub fn encode_pixels(&self, pixel_values: &Tensor) -> Tensor {
        self.tower.run(pixel_values, |model, xs| model.forward(xs).to_kind(Kind::Float))
    }

    /// LoRA of `rank` and `alpha` on every layer's query and value projections, its variables (trainable) under
    /// `vs` with the checkpoint's paths: `<vs>/vision_model/encoder/layers/<i>/self_attn/q_proj/lora_A`, ...
    /// `vs` must be on this encoder's device.
    pub fn attach_lora(&mut self, vs: &tch::nn::Path, spec: crate::lora::LoraSpec) {
        self.tower.attach_lora(vs, spec);
    }

    /// Unfreezes the layers from `first` on, the post-layernorm and the projection: trainable copies of them
    /// (the checkpoint's values) under `vs` with the checkpoint's paths
    /// (`<vs>/vision_model/encoder/layers/<i>/mlp/fc1/weight`, `<vs>/visual_projection/weight`, ...); the
    /// frozen layers before them run as before (they record no graph). Returns how many variables were copied.
    /// `vs` must be on this encoder's device.
    pub fn adapt_last_blocks(&mut self, vs: &tch::nn::Path, first: i64) -> usize {
        self.tower.adapt_last_blocks(vs, &self.config, first)
    }

    /// Transformer layers of the tower.
    pub fn num_layers(&self) -> i64 {
        self.tower.model.num_layers()
    }

    pub fn encode_images(&self, images: &[DynamicImage]) -> Tensor {
        self.encode_pixels(&self.processor.preprocess(images))
    }
}

/// The frozen CLIP text encoder with its tokenizer: texts -> `text_embeds` (projected, not normalised).
#[derive(Debug)]
pub struct ClipTextEncoder {
    vs: VarStore,
    model: ClipTextModelWithProjection,
    pub config: ClipTextConfig,
    /// From `tokenizer.json` when the directory has one.
    pub tokenizer: Option<ClipTokenizer>,
    options: EncoderOptions,
    dir: std::path::PathBuf,
}

impl ClipTextEncoder {
    /// Loads the text tower, and `tokenizer.json` when present, from a `CLIPModel` (vision half ignored) or
    /// `CLIPTextModelWithProjection` checkpoint directory.
    pub fn load(dir: &Path, options: EncoderOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = ClipConfig::from_file(&config_path)?
            .text
            .ok_or_else(|| ModelError::config(&config_path, "model_type", "this checkpoint has no text tower"))?;
        let tokenizer = if dir.join("tokenizer.json").is_file() {
            Some(ClipTokenizer::from_dir(dir, config.max_position_embeddings as usize)?)
        } else {
            None
        };
        let activation = config.activation(&config_path)?;
        let weights = weights_file(dir)?;
        let (vs, mut model) = build_frozen(Some((&weights, &KEY_MAP)), &options, |p| {
            ClipTextModelWithProjection::new(p, &config, activation)
        })?;
        model.fuse_qkv();
        Ok(Self { vs, model, config, tokenizer, options, dir: dir.to_path_buf() })
    }

    pub fn var_store(&self) -> &VarStore {
        &self.vs
    }

    pub fn model(&self) -> &ClipTextModelWithProjection {
        &self.model
    }

    /// `input_ids`, `attention_mask` `[batch, seq]` -> `text_embeds` `[batch, projection_dim]` f32.
    pub fn encode_ids(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        tch::no_grad(|| {
            let ids = input_ids.to_device(self.options.device);
            let mask = attention_mask.map(|m| m.to_device(self.options.device));
            self.model.forward(&ids, mask.as_ref()).to_kind(Kind::Float)
        })
    }

    /// Tokenizes and encodes texts; needs the checkpoint's `tokenizer.json`.
    pub fn encode_texts(&self, texts: &[&str]) -> Result<Tensor> {
        let tokenizer = self.tokenizer.as_ref().ok_or_else(|| ModelError::Tokenizer {
            path: self.dir.join("tokenizer.json"),
            reason: "file not found: texts cannot be tokenized without it".into(),
        })?;
        let batch = tokenizer.encode_batch(texts)?;
        Ok(self.encode_ids(&batch.input_ids, Some(&batch.attention_mask)))
    }
}
