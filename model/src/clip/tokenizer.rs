//! The CLIP BPE tokenizer, read from an HF `tokenizer.json` by the `tokenizers` crate (the library behind
//! `CLIPTokenizerFast`), padded and truncated to the text tower's `max_position_embeddings` as
//! `tokenizer(texts, padding="max_length", truncation=True)` does.

use std::path::{Path, PathBuf};

use tch::{Kind, Tensor};
use tokenizers::{PaddingDirection, PaddingParams, PaddingStrategy, Tokenizer, TruncationParams};

use crate::error::{ModelError, Result};

#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer").field("path", &self.path).field("max_length", &self.max_length).finish()
    }
}

/// Token ids and attention mask of a batch of texts, each `[batch, max_length]` int64.
#[derive(Debug)]
pub struct TokenizedBatch {
    pub input_ids: Tensor,
    pub attention_mask: Tensor,
}

impl ClipTokenizer {
    /// Loads `dir/tokenizer.json`; the pad token comes from `tokenizer_config.json` (CLIP checkpoints pad with
    /// `<|endoftext|>`), defaulting to `<|endoftext|>`.
    pub fn from_dir(dir: &Path, max_length: usize) -> Result<Self> {
        let path = dir.join("tokenizer.json");
        let tok_err = |reason: String| ModelError::Tokenizer { path: path.clone(), reason };
        if !path.is_file() {
            return Err(tok_err("file not found (the checkpoint directory must hold tokenizer.json)".into()));
        }
        let mut inner = Tokenizer::from_file(&path).map_err(|e| tok_err(e.to_string()))?;
        let pad_token = pad_token(dir)?.unwrap_or_else(|| "<|endoftext|>".to_string());
        let pad_id = inner
            .token_to_id(&pad_token)
            .ok_or_else(|| tok_err(format!("pad token `{pad_token}` is not in the vocabulary")))?;
        inner.with_padding(Some(PaddingParams {
            strategy: PaddingStrategy::Fixed(max_length),
            direction: PaddingDirection::Right,
            pad_to_multiple_of: None,
            pad_id,
            pad_type_id: 0,
            pad_token,
        }));
        inner
            .with_truncation(Some(TruncationParams { max_length, ..Default::default() }))
            .map_err(|e| tok_err(e.to_string()))?;
        Ok(Self { inner, path, max_length })
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Token ids of one text, special tokens included, padded to `max_length`.
    pub fn encode_ids(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer { path: self.path.clone(), reason: e.to_string() })?;
        Ok(enc.get_ids().to_vec())
    }

    pub fn encode_batch(&self, texts: &[&str]) -> Result<TokenizedBatch> {
        let encodings = self
            .inner
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| ModelError::Tokenizer { path: self.path.clone(), reason: e.to_string() })?;
        let flat =
            |f: &dyn Fn(&tokenizers::Encoding) -> Vec<i64>| -> Vec<i64> { encodings.iter().flat_map(f).collect() };
        let ids = flat(&|e| e.get_ids().iter().map(|&i| i as i64).collect());
        let mask = flat(&|e| e.get_attention_mask().iter().map(|&i| i as i64).collect());
        let shape = [texts.len() as i64, self.max_length as i64];
        Ok(TokenizedBatch {
            input_ids: Tensor::from_slice(&ids).view(shape).to_kind(Kind::Int64),
            attention_mask: Tensor::from_slice(&mask).view(shape).to_kind(Kind::Int64),
        })
    }
}

fn pad_token(dir: &Path) -> Result<Option<String>> {
    let path = dir.join("tokenizer_config.json");
    if !path.is_file() {
        return Ok(None);
    }
    let config: serde_json::Value = crate::hf::read_json(&path)?;
    Ok(match config.get("pad_token") {
        Some(serde_json::Value::String(s)) => Some(s.clone()),
        Some(serde_json::Value::Object(o)) => o.get("content").and_then(|c| c.as_str()).map(str::to_string),
        _ => None,
    })
}
