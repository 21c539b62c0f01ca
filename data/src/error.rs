//! The data crate's error type: every variant names the file (and line) at fault.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // The cause is part of the message and so not also a `source`: binaries print the chain (`{:#}`), which
    // showed it twice.
    #[error("{path}: cannot read: {error}")]
    Io { path: PathBuf, error: std::io::Error },
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
    pub(crate) fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        DataError::Io { path: path.into(), error }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn an_unreadable_file_names_the_cause_once() {
        // Binaries print an error with its sources (`{:#}`); the cause was both in the message and the source.
        let e = super::DataError::io("/x/a.txt", std::io::Error::from(std::io::ErrorKind::NotFound));
        assert!(std::error::Error::source(&e).is_none());
        assert_eq!(e.to_string(), "/x/a.txt: cannot read: entity not found");
    }
}
