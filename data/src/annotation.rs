//! Aff-Wild2 EXPR annotation files: the header `Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other`,
//! then line i = the label of frame i (from 1), in 0..=7 or -1 (ignore). And the one policy for files whose
//! label count differs from the decoded frame count.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::affwild2::Expression;
use crate::error::{DataError, Result};

/// A frame to ignore (not annotated).
pub const IGNORE: i8 = -1;

/// Reads an annotation file: one label per frame, frame 1 first.
pub fn read_annotation(path: &Path) -> Result<Vec<i8>> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    parse_annotation(&text, path)
}

pub fn parse_annotation(text: &str, path: &Path) -> Result<Vec<i8>> {
    let bad = |line: usize, reason: String| DataError::BadAnnotation { file: path.to_path_buf(), line, reason };
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    let header = lines.next().map(|(_, h)| h).unwrap_or("");
    let names: Vec<&str> = header.split(',').map(str::trim).collect();
    let expected = Expression::ALL.map(Expression::name);
    if names.len() != expected.len() || names.iter().zip(expected).any(|(a, b)| !a.eq_ignore_ascii_case(b)) {
        return Err(bad(1, format!("bad header `{header}`, expected `{}`", Expression::header())));
    }
    let mut labels = Vec::new();
    let mut blank_at = None;
    for (number, line) in lines {
        if line.is_empty() {
            blank_at.get_or_insert(number);
            continue;
        }
        if let Some(blank) = blank_at {
            return Err(bad(blank, "empty line inside the labels".into()));
        }
        let label: i64 = line.parse().map_err(|_| bad(number, format!("`{line}` is not an integer label")))?;
        Expression::from_label(label).map_err(|e| bad(number, e.to_string()))?;
        labels.push(label as i8);
    }
    Ok(labels)
}

/// What [`align_labels`] did to one video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelAlignment {
    pub labels: usize,
    pub frames: usize,
    /// Extra label lines dropped (labels beyond the last decoded frame).
    pub truncated: usize,
    /// Decoded frames without a label line, labelled -1 (ignored).
    pub unlabelled_tail: usize,
}

impl std::fmt::Display for LabelAlignment {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.truncated, self.unlabelled_tail) {
            (0, 0) => write!(f, "{} labels for {} frames", self.labels, self.frames),
            (t, 0) => write!(f, "{} labels for {} frames: dropped the last {t} labels", self.labels, self.frames),
            (_, u) => {
                write!(f, "{} labels for {} frames: the last {u} frames are ignored (-1)", self.labels, self.frames)
            }
        }
    }
}

/// The one policy for label/frame count mismatches, used everywhere: label i belongs to decoded frame i;
/// labels beyond the last frame are dropped, frames beyond the last label get -1 (ignored by training and the
/// metric).
pub fn align_labels(labels: &[i8], frames: usize) -> (Vec<i8>, LabelAlignment) {
    let mut aligned: Vec<i8> = labels.iter().copied().take(frames).collect();
    aligned.resize(frames, IGNORE);
    let report = LabelAlignment {
        labels: labels.len(),
        frames,
        truncated: labels.len().saturating_sub(frames),
        unlabelled_tail: frames.saturating_sub(labels.len()),
    };
    (aligned, report)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Vec<i8>> {
        parse_annotation(text, Path::new("Train_Set/12-24-1920x1080.txt"))
    }

    #[test]
    fn parses_labels_with_ignores_crlf_and_trailing_blank_lines() {
        let text = "Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other\r\n0\r\n-1\r\n7\r\n4\n\n";
        assert_eq!(parse(text).unwrap(), vec![0, -1, 7, 4]);
    }

    #[test]
    fn errors_name_file_and_line() {
        let header = Expression::header();
        let e = parse("Neutral,Anger,Happy\n0\n").unwrap_err().to_string();
        assert!(e.starts_with("Train_Set/12-24-1920x1080.txt:1: bad header"), "{e}");
        let e = parse(&format!("{header}\n0\n3.5\n")).unwrap_err().to_string();
        assert!(e.contains(":3:") && e.contains("`3.5` is not an integer"), "{e}");
        let e = parse(&format!("{header}\n0\n8\n")).unwrap_err().to_string();
        assert!(e.contains(":3:") && e.contains("out of range"), "{e}");
        let e = parse(&format!("{header}\n0\n\n1\n")).unwrap_err().to_string();
        assert!(e.contains(":3:") && e.contains("empty line"), "{e}");
        assert!(parse("").unwrap_err().to_string().contains(":1: bad header"));
    }

    #[test]
    fn the_mismatch_policy_truncates_extra_labels_and_ignores_unlabelled_frames() {
        let (a, r) = align_labels(&[1, 2, 3, 4], 2);
        assert_eq!((a, r.truncated, r.unlabelled_tail), (vec![1, 2], 2, 0));
        let (a, r) = align_labels(&[1, 2], 4);
        assert_eq!((a, r.truncated, r.unlabelled_tail), (vec![1, 2, -1, -1], 0, 2));
        assert!(r.to_string().contains("the last 2 frames are ignored"));
        let (a, r) = align_labels(&[5, 6], 2);
        assert_eq!((a, r.to_string()), (vec![5, 6], "2 labels for 2 frames".to_string()));
    }
}
