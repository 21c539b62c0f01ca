//! The data crate's error type: every variant names the file (and line) at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error("{path}: cannot read: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{file}:{line}: {reason}")]
    BadAnnotation { file: PathBuf, line: usize, reason: String },
    #[error("{file}:{line}: {reason}")]
    BadPredictions { file: PathBuf, line: usize, reason: String },
    #[error("{file}: {reason}")]
    IncompletePredictions { file: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    BadLayout { path: PathBuf, reason: String },
}

pub type Result<T, E = DataError> = std::result::Result<T, E>;

impl DataError {
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        DataError::Io { path: path.into(), source }
    }
}
