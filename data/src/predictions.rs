//! The official submission file `predictions.txt` (5th ABAW on):
//!
//! ```text
//! image_location,Neutral,Anger,Disgust,Fear,Happiness,Sadness,Surprise,Other
//! <video_name>/00001.jpg,<label 0-7>
//! ```
//!
//! one line per frame of every video, frames without a crop included; and scoring one against annotations.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use crate::affwild2::Expression;
use crate::annotation::read_annotation;
use crate::error::{DataError, Result};
use crate::metric::Confusion;

pub fn header() -> String {
    format!("image_location,{}", Expression::header())
}

/// Per video, the predicted class of frames 1, 2, ... in order.
pub type Predictions = BTreeMap<String, Vec<u8>>;

/// Writes `predictions.txt` through a temporary file and a rename (an existing file is replaced only whole).
pub fn write_predictions(path: &Path, predictions: &Predictions) -> Result<()> {
    let write = |tmp: &Path| -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::fs::File::create(tmp)?);
        writeln!(out, "{}", header())?;
        for (video, labels) in predictions {
            for (i, label) in labels.iter().enumerate() {
                writeln!(out, "{video}/{:05}.jpg,{label}", i + 1)?;
            }
        }
        out.flush()
    };
    crate::files::replace_with(path, write).map_err(|e| DataError::io(path, e))
}

/// Reads `predictions.txt`. With `expected` (frames per video), every video must be known and complete:
/// exactly frames 1..=n, each once.
pub fn read_predictions(path: &Path, expected: Option<&BTreeMap<String, usize>>) -> Result<Predictions> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::io(path, e))?;
    parse_predictions(&text, path, expected)
}

/// [`read_predictions`] on the file's text; `path` names it in errors.
pub fn parse_predictions(text: &str, path: &Path, expected: Option<&BTreeMap<String, usize>>) -> Result<Predictions> {
    let bad = |line: usize, reason: String| DataError::BadPredictions { file: path.to_path_buf(), line, reason };
    let mut lines = text.lines().enumerate().map(|(i, l)| (i + 1, l.trim()));
    let first = lines.next().map(|(_, l)| l).unwrap_or("");
    if first != header() {
        return Err(bad(1, format!("bad header `{first}`, expected `{}`", header())));
    }
    let mut frames: BTreeMap<String, BTreeMap<u32, (u8, usize)>> = BTreeMap::new();
    for (number, line) in lines.filter(|(_, l)| !l.is_empty()) {
        let (location, label) = line
            .split_once(',')
            .ok_or_else(|| bad(number, format!("`{line}` is not `<video>/<frame>.jpg,<label>`")))?;
        let (video, file) = location
            .rsplit_once('/')
            .ok_or_else(|| bad(number, format!("`{location}` is not `<video>/<frame>.jpg`")))?;
        let frame: u32 = file
            .strip_suffix(".jpg")
            .and_then(|f| f.parse().ok())
            .filter(|&f| f >= 1)
            .ok_or_else(|| bad(number, format!("`{file}` is not a frame file name like 00001.jpg")))?;
        let label: u8 = label
            .trim()
            .parse()
            .ok()
            .filter(|&l: &u8| (l as usize) < Expression::ALL.len())
            .ok_or_else(|| bad(number, format!("label `{label}` is not a class index 0-7")))?;
        if let Some(expected) = expected {
            let Some(&count) = expected.get(video) else {
                return Err(bad(number, format!("unknown video `{video}`")));
            };
            if frame as usize > count {
                return Err(bad(number, format!("frame {frame} of `{video}`, which has {count} frames")));
            }
        }
        if let Some((_, first_line)) = frames.entry(video.to_string()).or_default().insert(frame, (label, number)) {
            return Err(bad(number, format!("frame {frame} of `{video}` already predicted on line {first_line}")));
        }
    }
    if let Some(expected) = expected {
        for (video, &count) in expected {
            let got = frames.get(video).map_or(0, BTreeMap::len);
            if got != count {
                let missing =
                    (1..=count as u32).find(|f| !frames.get(video).is_some_and(|m| m.contains_key(f))).unwrap_or(1);
                return Err(DataError::IncompletePredictions {
                    file: path.to_path_buf(),
                    reason: format!(
                        "`{video}` has {got} of its {count} frames predicted (first missing: frame {missing})"
                    ),
                });
            }
        }
    }
    let mut predictions = Predictions::new();
    for (video, by_frame) in frames {
        let count = by_frame.keys().next_back().copied().unwrap_or(0);
        if by_frame.len() != count as usize {
            let missing = (1..=count).find(|f| !by_frame.contains_key(f)).expect("a gap");
            return Err(DataError::IncompletePredictions {
                file: path.to_path_buf(),
                reason: format!("`{video}` skips frame {missing}"),
            });
        }
        predictions.insert(video, by_frame.into_values().map(|(label, _)| label).collect());
    }
    Ok(predictions)
}

/// Scores `predictions.txt` against a folder of annotation files (`Validation_Set/`): every labelled frame
/// (every label line) of every annotated video must be predicted; predictions past a video's last label line
/// are ignored, as the label policy ignores unlabelled tail frames.
pub fn score(predictions: &Path, annotations: &Path) -> Result<Confusion> {
    let mut labels = BTreeMap::new();
    for entry in std::fs::read_dir(annotations).map_err(|e| DataError::io(annotations, e))? {
        let path = entry.map_err(|e| DataError::io(annotations, e))?.path();
        if path.extension().is_some_and(|e| e == "txt") {
            let name = path.file_stem().and_then(|s| s.to_str()).unwrap_or_default().to_string();
            labels.insert(name, read_annotation(&path)?);
        }
    }
    if labels.is_empty() {
        return Err(DataError::BadLayout {
            path: annotations.to_path_buf(),
            reason: "no annotation files (*.txt)".into(),
        });
    }
    let predicted = read_predictions(predictions, None)?;
    let mut confusion = Confusion::default();
    for (video, truth) in &labels {
        let got = predicted.get(video).map(Vec::as_slice).unwrap_or_default();
        if got.len() < truth.len() {
            return Err(DataError::IncompletePredictions {
                file: predictions.to_path_buf(),
                reason: format!("`{video}` has {} labelled frames but {} predictions", truth.len(), got.len()),
            });
        }
        for (&t, &p) in truth.iter().zip(got) {
            confusion.add(t, p);
        }
    }
    Ok(confusion)
}
