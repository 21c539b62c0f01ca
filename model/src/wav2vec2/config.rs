//! `Wav2Vec2Config` (`transformers/models/wav2vec2/configuration_wav2vec2.py`) with its defaults, which are
//! `facebook/wav2vec2-base`'s, and the `-large-lv60` preset.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::activation::{self, Activation};
use crate::error::{ModelError, Result};
use crate::hf::read_json;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FeatExtractNorm {
    /// GroupNorm on the first conv layer only (base).
    Group,
    /// LayerNorm after every conv layer (large-lv60).
    Layer,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Wav2Vec2Config {
    pub model_type: String,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub hidden_act: String,
    pub layer_norm_eps: f64,
    pub feat_extract_norm: FeatExtractNorm,
    pub feat_extract_activation: String,
    pub conv_dim: Vec<i64>,
    pub conv_stride: Vec<i64>,
    pub conv_kernel: Vec<i64>,
    pub conv_bias: bool,
    pub num_conv_pos_embeddings: i64,
    pub num_conv_pos_embedding_groups: i64,
    pub do_stable_layer_norm: bool,
    pub mask_time_prob: f64,
    pub mask_feature_prob: f64,
    pub add_adapter: bool,
}

impl Default for Wav2Vec2Config {
    fn default() -> Self {
        Self::base()
    }
}

impl Wav2Vec2Config {
    /// `facebook/wav2vec2-base`.
    pub fn base() -> Self {
        Self {
            model_type: "wav2vec2".into(),
            hidden_size: 768,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            intermediate_size: 3072,
            hidden_act: "gelu".into(),
            layer_norm_eps: 1e-5,
            feat_extract_norm: FeatExtractNorm::Group,
            feat_extract_activation: "gelu".into(),
            conv_dim: vec![512; 7],
            conv_stride: vec![5, 2, 2, 2, 2, 2, 2],
            conv_kernel: vec![10, 3, 3, 3, 3, 2, 2],
            conv_bias: false,
            num_conv_pos_embeddings: 128,
            num_conv_pos_embedding_groups: 16,
            do_stable_layer_norm: false,
            mask_time_prob: 0.05,
            mask_feature_prob: 0.0,
            add_adapter: false,
        }
    }

    /// `facebook/wav2vec2-large-lv60`.
    pub fn large_lv60() -> Self {
        Self {
            hidden_size: 1024,
            num_hidden_layers: 24,
            num_attention_heads: 16,
            intermediate_size: 4096,
            feat_extract_norm: FeatExtractNorm::Layer,
            conv_bias: true,
            do_stable_layer_norm: true,
            ..Self::base()
        }
    }

    pub fn from_file(path: &Path) -> Result<Self> {
        let value: serde_json::Value = read_json(path)?;
        let model_type = value.get("model_type").and_then(|v| v.as_str()).unwrap_or("<missing>");
        if model_type != "wav2vec2" {
            return Err(ModelError::UnsupportedModelType {
                path: path.to_path_buf(),
                found: model_type.to_string(),
                expected: "wav2vec2".into(),
            });
        }
        let cfg: Self = serde_json::from_value(value).map_err(|e| ModelError::config(path, "<root>", e.to_string()))?;
        cfg.validate(path)?;
        Ok(cfg)
    }

    pub fn hidden_activation(&self, path: &Path) -> Result<Activation> {
        activation::parse(path, "hidden_act", &self.hidden_act)
    }

    pub fn feat_extract_activation(&self, path: &Path) -> Result<Activation> {
        activation::parse(path, "feat_extract_activation", &self.feat_extract_activation)
    }

    pub fn validate(&self, path: &Path) -> Result<()> {
        self.hidden_activation(path)?;
        self.feat_extract_activation(path)?;
        let n = self.conv_dim.len();
        if n == 0 || self.conv_stride.len() != n || self.conv_kernel.len() != n {
            return Err(ModelError::config(
                path,
                "conv_dim",
                format!(
                    "conv_dim ({n}), conv_stride ({}) and conv_kernel ({}) must be non-empty and of equal length",
                    self.conv_stride.len(),
                    self.conv_kernel.len()
                ),
            ));
        }
        // Sizes come from a file: zero or negative ones would divide by zero or ask for absurd shapes.
        for (field, values) in
            [("conv_dim", &self.conv_dim), ("conv_stride", &self.conv_stride), ("conv_kernel", &self.conv_kernel)]
        {
            if let Some(v) = values.iter().find(|v| **v <= 0) {
                return Err(ModelError::config(path, field, format!("{v}: every entry must be positive")));
            }
        }
        for (field, v) in [
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_conv_pos_embeddings", self.num_conv_pos_embeddings),
        ] {
            if v <= 0 {
                return Err(ModelError::config(path, field, format!("{v}: must be positive")));
            }
        }
        if self.num_hidden_layers < 0 {
            return Err(ModelError::config(path, "num_hidden_layers", "must not be negative"));
        }
        if self.num_attention_heads <= 0 || self.hidden_size % self.num_attention_heads != 0 {
            return Err(ModelError::config(
                path,
                "num_attention_heads",
                format!("{} must divide hidden_size ({})", self.num_attention_heads, self.hidden_size),
            ));
        }
        if self.num_conv_pos_embedding_groups <= 0 || self.hidden_size % self.num_conv_pos_embedding_groups != 0 {
            return Err(ModelError::config(
                path,
                "num_conv_pos_embedding_groups",
                format!("{} must divide hidden_size ({})", self.num_conv_pos_embedding_groups, self.hidden_size),
            ));
        }
        if self.add_adapter {
            return Err(ModelError::config(path, "add_adapter", "adapter layers are not supported"));
        }
        Ok(())
    }

    /// `_get_feat_extract_output_lengths`: frames produced by the conv feature encoder from `samples` samples.
    pub fn output_frames(&self, samples: i64) -> i64 {
        self.conv_kernel
            .iter()
            .zip(&self.conv_stride)
            .fold(samples, |len, (k, s)| if len < *k { 0 } else { (len - k) / s + 1 })
    }

    /// Samples per output frame (320 for the base/large feature encoders: 50 frames per second at 16 kHz).
    pub fn total_stride(&self) -> i64 {
        self.conv_stride.iter().product()
    }
}
