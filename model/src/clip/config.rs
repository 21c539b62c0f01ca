//! CLIP configurations, deserialized from HF `config.json` with the defaults of
//! `transformers/models/clip/configuration_clip.py`, and presets for the public checkpoints.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::activation::{self, Activation};
use crate::error::{ModelError, Result};
use crate::hf::read_json;

/// `CLIPVisionConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipVisionConfig {
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub projection_dim: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub num_channels: i64,
    pub image_size: i64,
    pub patch_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
}

impl Default for ClipVisionConfig {
    fn default() -> Self {
        Self::vit_b32()
    }
}

impl ClipVisionConfig {
    /// `openai/clip-vit-base-patch32`.
    pub fn vit_b32() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            num_channels: 3,
            image_size: 224,
            patch_size: 32,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
        }
    }

    /// `openai/clip-vit-base-patch16`.
    pub fn vit_b16() -> Self {
        Self { patch_size: 16, ..Self::vit_b32() }
    }

    /// `openai/clip-vit-large-patch14`.
    pub fn vit_l14() -> Self {
        Self {
            hidden_size: 1024,
            intermediate_size: 4096,
            projection_dim: 768,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            patch_size: 14,
            ..Self::vit_b32()
        }
    }

    pub fn num_patches(&self) -> i64 {
        (self.image_size / self.patch_size).pow(2)
    }
}

/// `CLIPTextConfig`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub intermediate_size: i64,
    pub projection_dim: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub max_position_embeddings: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub pad_token_id: Option<i64>,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self::vit_b32()
    }
}

impl ClipTextConfig {
    /// Text tower of `openai/clip-vit-base-patch32` (and `-patch16`).
    pub fn vit_b32() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 512,
            intermediate_size: 2048,
            projection_dim: 512,
            num_hidden_layers: 12,
            num_attention_heads: 8,
            max_position_embeddings: 77,
            hidden_act: "quick_gelu".into(),
            layer_norm_eps: 1e-5,
            pad_token_id: Some(1),
            bos_token_id: Some(49406),
            eos_token_id: Some(49407),
        }
    }

    /// Text tower of `openai/clip-vit-large-patch14`.
    pub fn vit_l14() -> Self {
        Self {
            hidden_size: 768,
            intermediate_size: 3072,
            projection_dim: 768,
            num_attention_heads: 12,
            ..Self::vit_b32()
        }
    }
}

/// The two towers of a checkpoint directory, whichever class wrote it.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub vision: Option<ClipVisionConfig>,
    pub text: Option<ClipTextConfig>,
}

#[derive(Deserialize)]
struct RawClipConfig {
    model_type: Option<String>,
    projection_dim: Option<i64>,
    vision_config: Option<serde_json::Value>,
    text_config: Option<serde_json::Value>,
}

impl ClipConfig {
    /// Reads `config.json` of a `CLIPModel` (both towers; the top-level `projection_dim` wins, as in
    /// `CLIPModel.__init__`), a `CLIPVisionModelWithProjection` or a `CLIPTextModelWithProjection`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        let raw: RawClipConfig =
            serde_json::from_value(value.clone()).map_err(|e| ModelError::config(path, "<root>", e.to_string()))?;
        let field = |name: &str, v: serde_json::Value| -> Result<serde_json::Value> {
            if v.is_object() { Ok(v) } else { Err(ModelError::config(path, name, "must be a JSON object")) }
        };
        let config = match raw.model_type.as_deref() {
            Some("clip") => {
                let mut vision: ClipVisionConfig = parse_section(
                    path,
                    "vision_config",
                    field("vision_config", raw.vision_config.unwrap_or_default())?,
                )?;
                let mut text: ClipTextConfig =
                    parse_section(path, "text_config", field("text_config", raw.text_config.unwrap_or_default())?)?;
                let projection_dim = raw.projection_dim.unwrap_or(512);
                vision.projection_dim = projection_dim;
                text.projection_dim = projection_dim;
                ClipConfig { vision: Some(vision), text: Some(text) }
            }
            Some("clip_vision_model") => ClipConfig { vision: Some(parse_section(path, "<root>", value)?), text: None },
            Some("clip_text_model") => ClipConfig { vision: None, text: Some(parse_section(path, "<root>", value)?) },
            found => {
                return Err(ModelError::UnsupportedModelType {
                    path: path.to_path_buf(),
                    found: found.unwrap_or("<missing>").to_string(),
                    expected: "clip, clip_vision_model or clip_text_model".into(),
                });
            }
        };
        if let Some(v) = &config.vision {
            v.validate(path)?;
        }
        if let Some(t) = &config.text {
            t.validate(path)?;
        }
        Ok(config)
    }
}

fn parse_section<T: serde::de::DeserializeOwned>(path: &Path, section: &str, v: serde_json::Value) -> Result<T> {
    serde_json::from_value(v).map_err(|e| ModelError::config(path, section, e.to_string()))
}

fn check_heads(path: &Path, prefix: &str, hidden: i64, heads: i64) -> Result<()> {
    if heads <= 0 || hidden % heads != 0 {
        return Err(ModelError::config(
            path,
            format!("{prefix}num_attention_heads"),
            format!("{heads} must be positive and divide hidden_size ({hidden})"),
        ));
    }
    Ok(())
}

impl ClipVisionConfig {
    pub fn activation(&self, path: &Path) -> Result<Activation> {
        activation::parse(path, "vision_config.hidden_act", &self.hidden_act)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        self.activation(path)?;
        check_heads(path, "vision_config.", self.hidden_size, self.num_attention_heads)?;
        if self.patch_size <= 0 || self.image_size % self.patch_size != 0 {
            return Err(ModelError::config(
                path,
                "vision_config.patch_size",
                format!("{} must divide image_size ({})", self.patch_size, self.image_size),
            ));
        }
        Ok(())
    }
}

impl ClipTextConfig {
    pub fn activation(&self, path: &Path) -> Result<Activation> {
        activation::parse(path, "text_config.hidden_act", &self.hidden_act)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        self.activation(path)?;
        check_heads(path, "text_config.", self.hidden_size, self.num_attention_heads)
    }
}
