//! The eight expression classes of Aff-Wild2's EXPR track, in the order of the annotation files' header
//! (`Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other`): a label line `k` means `Expression::ALL[k]`.

use serde::{Deserialize, Serialize};

/// Number of expression classes (labels 0..=7; -1 marks an ignored frame).
pub const NUM_CLASSES: usize = 8;

/// Training-label distribution of Aff-Wild2 EXPR reported by the paper (train ratio, %): the default class
/// frequencies until a dataset's own histogram is known, and the column of the class-wise table.
pub const PAPER_TRAIN_RATIOS: [f64; NUM_CLASSES] = [27.10, 3.02, 2.04, 1.65, 15.87, 15.43, 5.36, 29.52];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Expression {
    Neutral = 0,
    Anger = 1,
    Disgust = 2,
    Fear = 3,
    Happiness = 4,
    Sadness = 5,
    Surprise = 6,
    Other = 7,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum LabelError {
    #[error("expression label {0} is out of range (0..=7, or -1 for an ignored frame)")]
    OutOfRange(i64),
    #[error(
        "unknown expression name `{0}` (expected one of Neutral, Anger, Disgust, Fear, Happiness, Sadness, Surprise, Other)"
    )]
    UnknownName(String),
}

impl Expression {
    /// All classes in label order.
    pub const ALL: [Expression; NUM_CLASSES] = [
        Expression::Neutral,
        Expression::Anger,
        Expression::Disgust,
        Expression::Fear,
        Expression::Happiness,
        Expression::Sadness,
        Expression::Surprise,
        Expression::Other,
    ];

    /// The label index used in annotation files and by the classifier.
    pub fn index(self) -> usize {
        self as usize
    }

    /// The class for an annotation label; `Ok(None)` for -1 (a frame to ignore).
    pub fn from_label(label: i64) -> Result<Option<Expression>, LabelError> {
        match label {
            -1 => Ok(None),
            0..=7 => Ok(Some(Self::ALL[label as usize])),
            other => Err(LabelError::OutOfRange(other)),
        }
    }

    /// The name as written in the annotation header.
    pub fn name(self) -> &'static str {
        match self {
            Expression::Neutral => "Neutral",
            Expression::Anger => "Anger",
            Expression::Disgust => "Disgust",
            Expression::Fear => "Fear",
            Expression::Happiness => "Happiness",
            Expression::Sadness => "Sadness",
            Expression::Surprise => "Surprise",
            Expression::Other => "Other",
        }
    }

    /// Parses a header name, case-insensitively.
    pub fn from_name(name: &str) -> Result<Expression, LabelError> {
        Self::ALL
            .into_iter()
            .find(|e| e.name().eq_ignore_ascii_case(name.trim()))
            .ok_or_else(|| LabelError::UnknownName(name.to_string()))
    }

    /// The annotation files' header line.
    pub fn header() -> String {
        Self::ALL.map(Expression::name).join(",")
    }
}

impl std::fmt::Display for Expression {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_is_the_official_one() {
        assert_eq!(Expression::header(), "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other");
    }

    #[test]
    fn labels_round_trip_and_reject_out_of_range() {
        for (k, e) in Expression::ALL.iter().enumerate() {
            assert_eq!(Expression::from_label(k as i64), Ok(Some(*e)));
            assert_eq!(e.index(), k);
            assert_eq!(Expression::from_name(&e.name().to_lowercase()), Ok(*e));
        }
        assert_eq!(Expression::from_label(-1), Ok(None));
        assert_eq!(Expression::from_label(8), Err(LabelError::OutOfRange(8)));
        assert!(Expression::from_name("Contempt").is_err());
    }
}
