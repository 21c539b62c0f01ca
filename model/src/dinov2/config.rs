//! `Dinov2Config` (and `Dinov2WithRegistersConfig`), deserialized from HF `config.json` with the defaults of
//! `transformers/models/dinov2/configuration_dinov2.py`, and presets for the public checkpoints.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::activation::{self, Activation};
use crate::error::{ModelError, Result};
use crate::hf::read_json;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Dinov2Config {
    pub model_type: String,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub mlp_ratio: f64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    /// The resolution the position embeddings were trained at (518 for the public checkpoints); other
    /// resolutions interpolate them (bicubic).
    pub image_size: i64,
    pub patch_size: i64,
    pub num_channels: i64,
    pub qkv_bias: bool,
    pub layerscale_value: f64,
    pub use_swiglu_ffn: bool,
    pub use_mask_token: bool,
    /// `dinov2_with_registers` only (default 4 there).
    pub num_register_tokens: Option<i64>,
}

impl Default for Dinov2Config {
    fn default() -> Self {
        Self::base()
    }
}

impl Dinov2Config {
    /// `facebook/dinov2-base` (ViT-B/14).
    pub fn base() -> Self {
        Self {
            model_type: "dinov2".into(),
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            mlp_ratio: 4.0,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-6,
            image_size: 518,
            patch_size: 14,
            num_channels: 3,
            qkv_bias: true,
            layerscale_value: 1.0,
            use_swiglu_ffn: false,
            use_mask_token: true,
            num_register_tokens: None,
        }
    }

    /// `facebook/dinov2-small` (ViT-S/14).
    pub fn small() -> Self {
        Self { hidden_size: 384, num_attention_heads: 6, ..Self::base() }
    }

    /// `facebook/dinov2-large` (ViT-L/14).
    pub fn large() -> Self {
        Self { hidden_size: 1024, num_hidden_layers: 24, num_attention_heads: 16, ..Self::base() }
    }

    /// `facebook/dinov2-giant` (ViT-g/14, SwiGLU feed-forward).
    pub fn giant() -> Self {
        Self { hidden_size: 1536, num_hidden_layers: 40, num_attention_heads: 24, use_swiglu_ffn: true, ..Self::base() }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let config: Self = read_json(path)?;
        config.validate(path)?;
        Ok(config)
    }

    /// Register tokens (`dinov2_with_registers` checkpoints; 0 otherwise).
    pub fn registers(&self) -> i64 {
        if self.with_registers() { self.num_register_tokens.unwrap_or(4) } else { 0 }
    }

    pub fn with_registers(&self) -> bool {
        self.model_type == "dinov2_with_registers"
    }

    /// The feed-forward's hidden width: `hidden * mlp_ratio`, or for SwiGLU two thirds of it rounded up to a
    /// multiple of 8.
    pub fn ffn_hidden(&self) -> i64 {
        let hidden = (self.hidden_size as f64 * self.mlp_ratio) as i64;
        if self.use_swiglu_ffn { (hidden * 2 / 3 + 7) / 8 * 8 } else { hidden }
    }

    /// Patches per side at the trained resolution.
    pub fn grid(&self) -> i64 {
        self.image_size / self.patch_size
    }

    pub fn activation(&self, path: &Path) -> Result<Activation> {
        activation::parse(path, "hidden_act", &self.hidden_act)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        if !matches!(self.model_type.as_str(), "dinov2" | "dinov2_with_registers") {
            return Err(ModelError::config(
                path,
                "model_type",
                format!("`{}` is not a DINOv2 checkpoint (dinov2 or dinov2_with_registers)", self.model_type),
            ));
        }
        self.activation(path)?;
        if !self.qkv_bias {
            return Err(ModelError::config(
                path,
                "qkv_bias",
                "false is not supported (every public checkpoint has one)",
            ));
        }
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("patch_size", self.patch_size),
            ("image_size", self.image_size),
        ] {
            if v <= 0 {
                return Err(ModelError::config(path, field, format!("{v} must be positive")));
            }
        }
        if self.hidden_size % self.num_attention_heads != 0 {
            return Err(ModelError::config(
                path,
                "num_attention_heads",
                format!("{} does not divide hidden_size {}", self.num_attention_heads, self.hidden_size),
            ));
        }
        Ok(())
    }
}
