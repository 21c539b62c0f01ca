//! avexpr's model: the frozen encoders of the paper (CLIP image and text towers, Wav2Vec 2.0) and DINOv2 (an
//! image encoder that can replace CLIP's vision tower), ported to tch from the Hugging Face `transformers`
//! implementations and loading their checkpoints directly, and the trainable TCN / adapter / fusion / head /
//! prompt parts with the loss, assembled in [`expr::ExprModel`].
//!
//! Variable paths of the encoders are the Hugging Face state-dict keys, so a `model.safetensors` loads
//! without renaming; the trainable variables live in four groups: `tcn`, `adapter`, `fusion`, `prompt`, and a
//! fifth, `backbone`, when an encoder adapts (LoRA or its last blocks).

pub mod activation;
pub mod adapter;
pub mod attention;
pub mod autocast;
pub mod clip;
pub mod config;
pub mod dinov2;
pub mod encoders;
pub mod error;
pub mod expr;
#[doc(hidden)]
pub mod fixtures;
pub mod fusion;
pub mod head;
pub mod hf;
pub mod locate;
pub mod lora;
pub mod loss;
pub mod prompt;
pub mod tcn;
pub mod vision;
pub mod wav2vec2;
pub mod weight_norm;

pub use config::ModelConfig;

/// `[batch, len]` bool, true at the first `lengths[b]` positions of row `b` (`lengths`: `[batch]` int64, on
/// the device the mask is wanted on).
pub fn length_mask(lengths: &tch::Tensor, len: i64) -> tch::Tensor {
    tch::Tensor::arange(len, (tch::Kind::Int64, lengths.device())).unsqueeze(0).lt_tensor(&lengths.unsqueeze(1))
}
pub use encoders::{EncoderOptions, Precision};
pub use error::ModelError;
pub use expr::{Encoders, ExprHead, ExprModel, ExprOutput, FeatureBatch, RawBatch};
