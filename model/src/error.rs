//! The model crate's error type: every variant names the file and the key or field at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // The cause is part of the message and so not also a `source`: binaries print the chain (`{:#}`), which
    // showed it twice.
    #[error("{path}: cannot read: {error}")]
    Io { path: PathBuf, error: std::io::Error },
    #[error("{path}: malformed JSON: {error}")]
    BadJson { path: PathBuf, error: serde_json::Error },
    #[error("{path}: field `{field}`: {reason}")]
    BadConfig { path: PathBuf, field: String, reason: String },
    /// A [`crate::ModelConfig`] built in code (not read from a file) that does not validate. The message holds
    /// the field error's, so it is not also a `source` (anyhow's `{:#}` printed it twice).
    #[error("model config: {0}")]
    InvalidConfig(FieldError),
    #[error("{path}: unsupported model_type `{found}` (expected {expected})")]
    UnsupportedModelType { path: PathBuf, found: String, expected: String },
    #[error("{dir}: no checkpoint found (looked for model.safetensors and pytorch_model.bin)")]
    NoWeights { dir: PathBuf },
    #[error("{path}: not a valid checkpoint: {reason}")]
    BadCheckpoint { path: PathBuf, reason: String },
    #[error("{path}: missing tensor `{key}`")]
    MissingTensor { path: PathBuf, key: String },
    #[error("{path}: tensor `{key}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { path: PathBuf, key: String, expected: Vec<i64>, found: Vec<i64> },
    #[error("{path}: tensor `{key}` has unsupported dtype {dtype}")]
    UnsupportedDtype { path: PathBuf, key: String, dtype: String },
    #[error("{path}: tokenizer: {reason}")]
    Tokenizer { path: PathBuf, reason: String },
    #[error("{path}: cannot decode image: {reason}")]
    BadImage { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadAudio { path: PathBuf, reason: String },
    /// `model.<encoder>.checkpoint` names no checkpoint directory that can be had here.
    #[error("{field}: `{spec}`: {reason}")]
    Locate { field: String, spec: String, reason: String },
    #[error("invalid input: {0}")]
    InvalidInput(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

impl From<FieldError> for ModelError {
    fn from(e: FieldError) -> Self {
        ModelError::InvalidConfig(e)
    }
}

/// A `model` field whose value is invalid, by its path in the job file (`model.fusion.heads`).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("field `{field}`: {reason}")]
pub struct FieldError {
    pub field: String,
    pub reason: String,
}

impl FieldError {
    /// As an error of the file the config was read from.
    pub fn in_file(self, path: &std::path::Path) -> ModelError {
        ModelError::config(path, self.field, self.reason)
    }
}

pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        ModelError::Io { path: path.into(), error }
    }

    pub(crate) fn config(path: impl Into<PathBuf>, field: impl Into<String>, reason: impl Into<String>) -> Self {
        ModelError::BadConfig { path: path.into(), field: field.into(), reason: reason.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a binary prints for an error and its chain of sources (anyhow's `{:#}`): each part once.
    fn chain(e: &dyn std::error::Error) -> String {
        let mut text = e.to_string();
        let mut source = e.source();
        while let Some(s) = source {
            text += &format!(": {s}");
            source = s.source();
        }
        text
    }

    #[test]
    fn an_invalid_config_names_its_field_once() {
        let e =
            ModelError::from(FieldError { field: "model.clip.adapt.blocks".into(), reason: "must be positive".into() });
        assert_eq!(chain(&e), "model config: field `model.clip.adapt.blocks`: must be positive");
    }

    #[test]
    fn an_unreadable_file_names_the_cause_once() {
        let e = ModelError::io("/x/config.json", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert_eq!(chain(&e), "/x/config.json: cannot read: entity not found");
        let bad = serde_json::from_str::<serde_json::Value>("{").unwrap_err();
        let e = ModelError::BadJson { path: "/x/config.json".into(), error: bad };
        assert_eq!(chain(&e), "/x/config.json: malformed JSON: EOF while parsing an object at line 1 column 1");
    }
}
