//! avexpr's model: the frozen encoders of the paper (CLIP image and text towers, Wav2Vec 2.0) ported to tch from
//! the Hugging Face `transformers` implementations and loading their checkpoints directly, plus (later) the
//! trainable TCN / adapter / fusion / prompt head.
//!
//! Variable paths are the Hugging Face state-dict keys, so a `model.safetensors` loads without renaming.

pub mod activation;
pub mod attention;
pub mod checkpoint;
pub mod clip;
pub mod encoders;
pub mod error;
#[doc(hidden)]
pub mod fixtures;
pub mod wav2vec2;

pub use encoders::{EncoderOptions, Precision};
pub use error::ModelError;
