//! The `model` section of a job's YAML config: which frozen encoders, and the shape of the trainable parts
//! (`tcn`, `adapter`, `fusion` with the pooling head, `prompt`) and of the loss. Unknown fields are rejected
//! and every error names the field (`model.fusion.heads: ...`).

use std::path::Path;

use serde::{Deserialize, Serialize};

pub use crate::error::FieldError;
use crate::error::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The image encoder of every face frame: CLIP's vision tower (the paper's) or DINOv2 (`model.dinov2`). The
    /// prompts are always CLIP text embeddings (`model.clip`'s text tower).
    #[serde(skip_serializing_if = "ImageEncoder::is_clip")]
    pub image_encoder: ImageEncoder,
    pub clip: EncoderConfig,
    /// The DINOv2 checkpoint, used when `image_encoder` is `dinov2`.
    #[serde(skip_serializing_if = "EncoderConfig::is_default_dinov2")]
    pub dinov2: EncoderConfig,
    pub wav2vec2: EncoderConfig,
    pub tcn: TcnConfig,
    pub adapter: AdapterConfig,
    pub fusion: FusionConfig,
    pub head: HeadConfig,
    pub prompt: PromptConfig,
    pub loss: LossConfig,
    /// Which modalities reach the head (ablations): the other one is replaced by zeros.
    pub modalities: Modalities,
    /// In training, each clip loses its video or its audio with these probabilities (never both).
    pub modality_dropout: ModalityDropout,
}

/// Per-clip modality dropout in training: the dropped modality reaches the head as zeros, as in the ablations
/// (its masks unchanged, so no attention row is empty). Off by default (the paper has none).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ModalityDropout {
    pub video: f64,
    pub audio: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ImageEncoder {
    #[default]
    Clip,
    Dinov2,
}

impl ImageEncoder {
    pub fn is_clip(&self) -> bool {
        *self == ImageEncoder::Clip
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Modalities {
    #[default]
    Both,
    Video,
    Audio,
}

impl Default for ModelConfig {
    /// The paper's configuration (also `configs/paper.yaml`).
    fn default() -> Self {
        Self {
            image_encoder: ImageEncoder::Clip,
            clip: EncoderConfig::new("openai/clip-vit-base-patch32"),
            dinov2: EncoderConfig::new(DINOV2_DEFAULT),
            wav2vec2: EncoderConfig::new("facebook/wav2vec2-base"),
            tcn: TcnConfig::default(),
            adapter: AdapterConfig::default(),
            fusion: FusionConfig::default(),
            head: HeadConfig::default(),
            prompt: PromptConfig::default(),
            loss: LossConfig::default(),
            modalities: Modalities::Both,
            modality_dropout: ModalityDropout::default(),
        }
    }
}

/// A frozen encoder: a Hugging Face checkpoint directory, as a path, a Hugging Face model id found in the local
/// hub cache, or a store URI (see [`crate::locate`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct EncoderConfig {
    pub checkpoint: String,
    /// A Hugging Face model id's branch, tag or commit hash (default `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<String>,
    /// Adapting the encoder instead of keeping it frozen (the paper's choice, the default).
    #[serde(default, skip_serializing_if = "Adapt::is_frozen")]
    pub adapt: Adapt,
}

/// `model.dinov2.checkpoint` when not given.
pub const DINOV2_DEFAULT: &str = "facebook/dinov2-base";

impl EncoderConfig {
    pub fn new(checkpoint: impl Into<String>) -> Self {
        Self { checkpoint: checkpoint.into(), revision: None, adapt: Adapt::default() }
    }

    fn is_default_dinov2(&self) -> bool {
        *self == Self::new(DINOV2_DEFAULT)
    }
}

/// `model.<encoder>.adapt`: `frozen` (default); `lora`: low-rank updates of every layer's query and value
/// projections (peft's default targets); `last_blocks`: the last `blocks` transformer layers (and what follows
/// them: CLIP's post-layernorm and projection, Wav2Vec 2.0's final layer norm where it has one) train from the
/// checkpoint's values. The adapted variables form a fifth group, `backbone`, all-reduced with the others.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Adapt {
    pub mode: AdaptMode,
    /// LoRA's rank and alpha (the update is scaled by alpha / rank).
    pub rank: i64,
    pub alpha: f64,
    /// LoRA on each layer's feed-forward (its two linear layers) too, not only on the query and value.
    pub mlp: bool,
    /// `last_blocks`: how many of the last transformer layers train.
    pub blocks: i64,
    /// This encoder's adapted variables learn at `train.optimizer.lr` times this.
    pub lr_scale: f64,
}

impl Default for Adapt {
    fn default() -> Self {
        Self { mode: AdaptMode::Frozen, rank: 8, alpha: 16.0, mlp: false, blocks: 2, lr_scale: 1.0 }
    }
}

impl Adapt {
    pub fn is_frozen(&self) -> bool {
        self.mode == AdaptMode::Frozen
    }

    /// The LoRA settings.
    pub fn lora(&self) -> crate::lora::LoraSpec {
        crate::lora::LoraSpec { rank: self.rank, alpha: self.alpha, mlp: self.mlp }
    }

    /// What does not depend on the encoder (`blocks` is checked against its layers when it is built).
    fn validate(&self, field: &str) -> Result<(), FieldError> {
        match self.mode {
            AdaptMode::Lora if self.rank < 1 || self.alpha.is_nan() || self.alpha <= 0.0 => {
                return Err(bad(field, format!("rank {} and alpha {} must be positive", self.rank, self.alpha)));
            }
            AdaptMode::LastBlocks if self.blocks < 1 => {
                return Err(bad(&format!("{field}.blocks"), format!("{} must be positive", self.blocks)));
            }
            _ => {}
        }
        if self.lr_scale.is_nan() || self.lr_scale <= 0.0 {
            return Err(bad(&format!("{field}.lr_scale"), format!("{} must be positive", self.lr_scale)));
        }
        Ok(())
    }

    /// `blocks` of an encoder with `layers` transformer layers: the first trainable layer's index.
    pub fn first_trainable_layer(&self, field: &str, layers: i64) -> Result<i64, FieldError> {
        if self.blocks > layers {
            return Err(bad(
                &format!("{field}.blocks"),
                format!("{} is more than the encoder's {layers} layers", self.blocks),
            ));
        }
        Ok(layers - self.blocks)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum AdaptMode {
    #[default]
    Frozen,
    Lora,
    LastBlocks,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TcnConfig {
    /// Output channels of each level; level `i` has dilation `2^i`.
    pub channels: Vec<i64>,
    pub kernel_size: i64,
    pub dropout: f64,
}

impl Default for TcnConfig {
    fn default() -> Self {
        Self { channels: vec![256; 4], kernel_size: 3, dropout: 0.1 }
    }
}

impl TcnConfig {
    /// Frames one output frame sees: `1 + 2 (k - 1) (2^levels - 1)` (two convs per level).
    pub fn receptive_field(&self) -> i64 {
        1 + 2 * (self.kernel_size - 1) * ((1i64 << self.channels.len()) - 1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AudioLayers {
    /// The encoder's last hidden state.
    Last,
    /// A learned softmax-weighted sum of every hidden state (SUPERB style).
    WeightedSum,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdapterConfig {
    pub layers: AudioLayers,
    /// Width of the residual bottleneck MLP.
    pub bottleneck: i64,
    pub dropout: f64,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        Self { layers: AudioLayers::WeightedSum, bottleneck: 128, dropout: 0.1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FusionConfig {
    /// Width of both streams inside the fusion (the adapter and the TCN are projected to it).
    pub dim: i64,
    /// Cross-attention layers; 0: none, the pooled streams are only concatenated (an ablation).
    pub layers: i64,
    pub heads: i64,
    pub ff_dim: i64,
    pub dropout: f64,
}

impl Default for FusionConfig {
    fn default() -> Self {
        Self { dim: 256, layers: 2, heads: 4, ff_dim: 512, dropout: 0.1 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pooling {
    Mean,
    Attention,
}

/// The frame of a clip that its label and prediction belong to: the sampler's (one enum for data and model).
pub use avexpr_data::sampler::Target;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HeadConfig {
    pub pooling: Pooling,
    pub target: Target,
    /// Logits for every frame of the clip from the fused sequence, instead of one per clip.
    pub per_frame: bool,
    pub hidden: i64,
    pub dropout: f64,
}

impl Default for HeadConfig {
    fn default() -> Self {
        Self { pooling: Pooling::Mean, target: Target::Last, per_frame: false, hidden: 256, dropout: 0.1 }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PromptConfig {
    /// Templates with `{}` for the lower-case class name; the embeddings of several are averaged.
    pub templates: Vec<String>,
    /// Learnable context vectors fed through the frozen text encoder (CoOp); 0 uses the fixed templates.
    pub context_vectors: i64,
}

impl Default for PromptConfig {
    fn default() -> Self {
        Self { templates: vec!["A face expressing {}".into()], context_vectors: 0 }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassificationLoss {
    CrossEntropy,
    Focal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClassWeights {
    None,
    InverseFrequency,
    /// Cui et al. 2019: `(1 - beta) / (1 - beta^n_c)`.
    EffectiveNumber,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LossConfig {
    pub classification: ClassificationLoss,
    pub class_weights: ClassWeights,
    pub effective_number_beta: f64,
    pub focal_gamma: f64,
    pub label_smoothing: f64,
    /// Weight of the prompt contrastive term: total = classification + contrastive_weight * contrastive.
    pub contrastive_weight: f64,
    /// Logit adjustment for the class imbalance (Menon et al. 2021), off by default.
    pub logit_adjustment: LogitAdjustment,
}

/// Logit adjustment (Menon et al., "Long-tail learning via logit adjustment", 2021) with the training set's
/// class prior `pi` (frames per class): `loss` trains on `logits + tau * log pi` (the classification term only)
/// and predicts with the plain logits; `post_hoc` trains as usual and predicts with `logits - tau * log pi`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogitAdjustment {
    /// 0: off; Menon et al. use 1.
    pub tau: f64,
    pub mode: LogitAdjustmentMode,
}

impl Default for LogitAdjustment {
    fn default() -> Self {
        Self { tau: 0.0, mode: LogitAdjustmentMode::Loss }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogitAdjustmentMode {
    Loss,
    PostHoc,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            classification: ClassificationLoss::CrossEntropy,
            class_weights: ClassWeights::None,
            effective_number_beta: 0.999,
            focal_gamma: 2.0,
            label_smoothing: 0.0,
            contrastive_weight: 0.5,
            logit_adjustment: LogitAdjustment::default(),
        }
    }
}

/// A serde error message without the path (or the part of it) it may start with, `<path>: ...`: the caller
/// names the field itself, from `serde_path_to_error`'s path.
pub fn without_path(path: &str, message: String) -> String {
    match message.split_once(": ") {
        Some((at, rest)) if path.starts_with(at) => rest.to_string(),
        _ => message,
    }
}

fn bad(field: &str, reason: String) -> FieldError {
    FieldError { field: field.into(), reason }
}

fn check_dropout(field: &str, p: f64) -> Result<(), FieldError> {
    if !(0.0..1.0).contains(&p) {
        return Err(bad(field, format!("{p} must be in [0, 1)")));
    }
    Ok(())
}

fn check_positive(field: &str, v: i64) -> Result<(), FieldError> {
    if v <= 0 {
        return Err(bad(field, format!("{v} must be positive")));
    }
    Ok(())
}

impl ModelConfig {
    /// The adapted image tower's name and settings (`clip` or `dinov2`): the one `image_encoder` uses.
    pub fn image_tower(&self) -> (&'static str, &EncoderConfig) {
        match self.image_encoder {
            ImageEncoder::Clip => ("clip", &self.clip),
            ImageEncoder::Dinov2 => ("dinov2", &self.dinov2),
        }
    }

    /// Each encoder's `adapt` setting with its field name.
    pub fn adapts(&self) -> [(&'static str, &Adapt); 3] {
        [
            ("model.clip.adapt", &self.clip.adapt),
            ("model.dinov2.adapt", &self.dinov2.adapt),
            ("model.wav2vec2.adapt", &self.wav2vec2.adapt),
        ]
    }

    /// The learning-rate factor of a trainable variable: `model.<encoder>.adapt.lr_scale` for an adapted
    /// encoder's (`backbone.<encoder>.*`), 1 for the rest.
    pub fn lr_scale(&self, variable: &str) -> f64 {
        match variable.split('.').take(2).collect::<Vec<_>>()[..] {
            ["backbone", "clip"] => self.clip.adapt.lr_scale,
            ["backbone", "dinov2"] => self.dinov2.adapt.lr_scale,
            ["backbone", "wav2vec2"] => self.wav2vec2.adapt.lr_scale,
            _ => 1.0,
        }
    }

    /// Reads the `model` section of a job's YAML file (the other sections belong to other crates). Relative
    /// checkpoint paths are taken relative to the directory the job is started from.
    pub fn from_job_file(path: &Path) -> Result<Self> {
        /// A job file as this crate sees it: unknown fields are the other sections.
        #[derive(Deserialize)]
        struct Job {
            model: ModelConfig,
        }
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
        let cfg = deserialize::<Job>(&text, path, "")?.model;
        cfg.validate().map_err(|e| e.in_file(path))?;
        Ok(cfg)
    }

    /// Parses the `model` section from YAML text (the section's own mapping, without the `model:` key).
    pub fn from_yaml(text: &str, origin: &Path) -> Result<Self> {
        let cfg: Self = deserialize(text, origin, "model.")?;
        cfg.validate().map_err(|e| e.in_file(origin))?;
        Ok(cfg)
    }

    /// Checks what serde cannot: ranges and divisibility. Messages name the field from `model.` down.
    pub fn validate(&self) -> Result<(), FieldError> {
        let t = &self.tcn;
        if t.channels.is_empty() {
            return Err(bad("model.tcn.channels", "must list at least one level".into()));
        }
        for (i, &c) in t.channels.iter().enumerate() {
            check_positive(&format!("model.tcn.channels[{i}]"), c)?;
        }
        if t.channels.len() > 16 {
            return Err(bad(
                "model.tcn.channels",
                format!("{} levels: dilation 2^{} is beyond any clip", t.channels.len(), t.channels.len() - 1),
            ));
        }
        if t.kernel_size < 2 {
            return Err(bad("model.tcn.kernel_size", format!("{} must be at least 2", t.kernel_size)));
        }
        check_dropout("model.tcn.dropout", t.dropout)?;
        check_positive("model.adapter.bottleneck", self.adapter.bottleneck)?;
        check_dropout("model.adapter.dropout", self.adapter.dropout)?;
        let f = &self.fusion;
        check_positive("model.fusion.dim", f.dim)?;
        if f.layers < 0 {
            return Err(bad("model.fusion.layers", format!("{} must be >= 0 (0: no cross-attention)", f.layers)));
        }
        check_positive("model.fusion.heads", f.heads)?;
        if f.dim % f.heads != 0 {
            return Err(bad("model.fusion.heads", format!("{} must divide model.fusion.dim ({})", f.heads, f.dim)));
        }
        check_positive("model.fusion.ff_dim", f.ff_dim)?;
        check_dropout("model.fusion.dropout", f.dropout)?;
        check_positive("model.head.hidden", self.head.hidden)?;
        check_dropout("model.head.dropout", self.head.dropout)?;
        if self.prompt.templates.is_empty() && self.prompt.context_vectors == 0 {
            return Err(bad("model.prompt.templates", "give at least one template (or context_vectors > 0)".into()));
        }
        for (i, tpl) in self.prompt.templates.iter().enumerate() {
            if !tpl.contains("{}") {
                return Err(bad(
                    &format!("model.prompt.templates[{i}]"),
                    format!("`{tpl}` has no {{}} for the class name"),
                ));
            }
        }
        if self.prompt.context_vectors < 0 || self.prompt.context_vectors > 60 {
            return Err(bad(
                "model.prompt.context_vectors",
                format!("{} must be in 0..=60", self.prompt.context_vectors),
            ));
        }
        let l = &self.loss;
        if !(0.0..1.0).contains(&l.effective_number_beta) {
            return Err(bad(
                "model.loss.effective_number_beta",
                format!("{} must be in [0, 1)", l.effective_number_beta),
            ));
        }
        if l.focal_gamma < 0.0 {
            return Err(bad("model.loss.focal_gamma", format!("{} must be >= 0", l.focal_gamma)));
        }
        if !(0.0..1.0).contains(&l.label_smoothing) {
            return Err(bad("model.loss.label_smoothing", format!("{} must be in [0, 1)", l.label_smoothing)));
        }
        if l.label_smoothing > 0.0 && l.classification == ClassificationLoss::Focal {
            return Err(bad("model.loss.label_smoothing", "applies to cross_entropy only, not focal".into()));
        }
        if l.contrastive_weight < 0.0 {
            return Err(bad("model.loss.contrastive_weight", format!("{} must be >= 0", l.contrastive_weight)));
        }
        if !(l.logit_adjustment.tau >= 0.0 && l.logit_adjustment.tau.is_finite()) {
            return Err(bad("model.loss.logit_adjustment.tau", format!("{} must be >= 0", l.logit_adjustment.tau)));
        }
        for (field, a) in self.adapts() {
            a.validate(field)?;
        }
        match self.image_encoder {
            ImageEncoder::Dinov2 if !self.clip.adapt.is_frozen() => {
                return Err(bad(
                    "model.clip.adapt",
                    "with model.image_encoder: dinov2 only CLIP's text tower is used (frozen): adapt model.dinov2 \
                     instead"
                        .into(),
                ));
            }
            ImageEncoder::Clip if !self.dinov2.adapt.is_frozen() => {
                return Err(bad("model.dinov2.adapt", "model.image_encoder is clip: DINOv2 is not used".into()));
            }
            _ => {}
        }
        let m = self.modality_dropout;
        for (field, p) in [("model.modality_dropout.video", m.video), ("model.modality_dropout.audio", m.audio)] {
            if !(0.0..1.0).contains(&p) {
                return Err(bad(field, format!("{p} must be in [0, 1)")));
            }
        }
        if m.video + m.audio > 1.0 {
            return Err(bad(
                "model.modality_dropout",
                format!("video {} + audio {} must be <= 1 (a clip never loses both)", m.video, m.audio),
            ));
        }
        Ok(())
    }
}

/// YAML text deserialized; errors name `origin` and the field's path (`prefix` + serde's path:
/// `model.head.pooling`).
fn deserialize<T: serde::de::DeserializeOwned>(text: &str, origin: &Path, prefix: &str) -> Result<T> {
    serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(text)).map_err(|e| {
        let path = e.path().to_string();
        let reason = without_path(&path, e.into_inner().to_string());
        let field = match (path.as_str(), prefix.strip_suffix('.')) {
            (".", Some(section)) => section.to_string(),
            (".", None) => "<root>".to_string(),
            _ => format!("{prefix}{path}"),
        };
        ModelError::config(origin, field, reason)
    })
}
