//! `data synth` writes a dataset that the layout parser, the annotation parser and the decoder read back
//! exactly, reproducibly for a seed.

use std::collections::BTreeMap;
use std::path::Path;

use avexpr_data::annotation::read_annotation;
use avexpr_data::decode::decode_video;
use avexpr_data::layout::{Layout, Split, crop_frames};
use avexpr_data::synth::{SynthConfig, synth};

fn small(seed: u64) -> SynthConfig {
    SynthConfig { videos: 8, min_seconds: 2.0, max_seconds: 3.0, seed, ..Default::default() }
}

fn files(root: &Path) -> BTreeMap<String, Vec<u8>> {
    walkdir::WalkDir::new(root)
        .into_iter()
        .map(Result::unwrap)
        .filter(|e| e.file_type().is_file())
        .map(|e| (e.path().strip_prefix(root).unwrap().display().to_string(), std::fs::read(e.path()).unwrap()))
        .collect()
}

#[test]
fn synth_reads_back_exactly_and_is_reproducible() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    let written = synth(&root, &small(11)).unwrap();
    let layout = Layout::discover(&root).unwrap();
    assert_eq!(layout.videos.len(), written.len());
    assert_eq!(layout.split(Split::Test).count(), 1);
    assert_eq!(layout.split(Split::Validation).count(), 1);

    // The two-person video: _left and _right annotations and crops, one media file.
    let left = layout.videos.iter().find(|v| v.name.ends_with("_left")).unwrap();
    let right = layout.videos.iter().find(|v| v.name.ends_with("_right")).unwrap();
    assert_eq!(left.media, right.media);
    assert_ne!(left.crops, right.crops);

    let mut train_classes = std::collections::BTreeSet::new();
    let mut fps_seen = std::collections::BTreeSet::new();
    for v in &written {
        let entry = layout.videos.iter().find(|e| e.name == v.name).unwrap();
        let info = decode_video(entry.media.as_ref().unwrap(), None, |_| Ok(())).unwrap();
        assert_eq!(info.frames, v.frames, "{}: decoded frames", v.name);
        assert_eq!(info.fps, v.fps as f64);
        assert!(info.has_audio);
        fps_seen.insert(v.fps);
        let crops = crop_frames(entry.crops.as_ref().unwrap()).unwrap();
        let expected: Vec<u32> = (1..=v.frames as u32).filter(|f| !v.missing_crops.contains(f)).collect();
        assert_eq!(crops.into_iter().collect::<Vec<_>>(), expected, "{}: crops with gaps", v.name);
        if let Some(path) = &entry.annotation {
            let labels = read_annotation(path).unwrap();
            assert_eq!(labels, v.labels);
            if v.split == Split::Train {
                train_classes.extend(labels.iter().filter(|&&l| l >= 0).copied());
            }
        }
    }
    assert_eq!(train_classes.len(), 8, "every class appears in training: {train_classes:?}");
    assert!(written.iter().any(|v| !v.missing_crops.is_empty()), "some crops are missing");
    assert!(written.iter().any(|v| v.labels.contains(&-1)), "-1 runs");
    assert!(written.iter().any(|v| !v.labels.is_empty() && v.labels.len() > v.frames), "more labels than frames");
    assert!(written.iter().any(|v| !v.labels.is_empty() && v.labels.len() < v.frames), "fewer labels than frames");
    assert_eq!(fps_seen.len(), 2, "mixed 25 / 30 fps");

    let again = tmp.path().join("again");
    synth(&again, &small(11)).unwrap();
    assert!(files(&root) == files(&again), "the same seed writes the same bytes");
    let other = tmp.path().join("other");
    synth(&other, &small(12)).unwrap();
    assert!(files(&root) != files(&other));
}

#[test]
fn bad_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let e = synth(tmp.path(), &SynthConfig { videos: 2, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("need >= 3 videos"), "{e}");
}
