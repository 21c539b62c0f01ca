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

/// The validation split holds every class, so that each per-class F1 (and the macro F1) can be scored; training
/// keeps the Aff-Wild2-like draw.
#[test]
fn validation_holds_every_class() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        videos: 10,
        min_seconds: 6.0,
        max_seconds: 8.0,
        seed: 9,
        val_segments_per_class: 1,
        ..Default::default()
    };
    let written = synth(tmp.path(), &cfg).unwrap();
    let mut frames = [0usize; 8];
    for v in written.iter().filter(|v| v.split == Split::Validation) {
        for &l in v.labels.iter().take(v.frames).filter(|&&l| l >= 0) {
            frames[l as usize] += 1;
        }
    }
    assert!(frames.iter().all(|&n| n >= 10), "validation frames per class: {frames:?}");
}

#[test]
fn bad_settings_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let e = synth(tmp.path(), &SynthConfig { videos: 2, ..Default::default() }).unwrap_err().to_string();
    assert!(e.contains("need >= 3 videos"), "{e}");
}

/// The rendered content carries each class in the intended modality: from the written files (JPEG crops, the
/// mp4's decoded audio), class centroids of face pixels and of audio spectra are far apart except for the
/// pairs designed to share a modality (Anger/Disgust look alike; Fear/Surprise and Happiness/Other sound alike).
#[test]
fn classes_need_both_modalities() {
    use avexpr_data::Expression::{Anger, Disgust, Fear, Happiness, Other, Surprise};
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    let written = synth(&root, &SynthConfig { videos: 40, seed: 3, ..Default::default() }).unwrap();
    let layout = Layout::discover(&root).unwrap();
    // Per class, one feature vector per sampled frame.
    let mut visual: Vec<Vec<Vec<f64>>> = vec![Vec::new(); 8];
    let mut audio: Vec<Vec<Vec<f64>>> = vec![Vec::new(); 8];
    for v in written.iter().filter(|v| !v.labels.is_empty()) {
        let entry = layout.videos.iter().find(|e| e.name == v.name).unwrap();
        let info = decode_video(entry.media.as_ref().unwrap(), None, |_| Ok(())).unwrap();
        let samples = avexpr_data::decode::audio_samples(info.frames, info.fps);
        let pcm = avexpr_data::decode::decode_audio(entry.media.as_ref().unwrap(), samples).unwrap();
        for (f, &label) in v.labels.iter().enumerate().take(v.frames).step_by(2) {
            // Skip ignored frames, missing crops and the frames right after a class change.
            if label < 0 || v.missing_crops.contains(&(f as u32 + 1)) || f < 6 || v.labels[f - 6] != label {
                continue;
            }
            let crop = image::open(entry.crops.as_ref().unwrap().join(format!("{:05}.jpg", f + 1))).unwrap().to_luma8();
            // Standardised per crop: skin tone and lighting (per video) drop out, the drawn features stay.
            let small = image::imageops::resize(&crop, 24, 24, image::imageops::FilterType::Triangle);
            let px: Vec<f64> = small.pixels().map(|p| p.0[0] as f64).collect();
            let mean = px.iter().sum::<f64>() / px.len() as f64;
            let std = (px.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / px.len() as f64).sqrt().max(1e-9);
            visual[label as usize].push(px.iter().map(|x| (x - mean) / std).collect());
            if v.name.ends_with("_right") {
                continue; // the voice is the left person's
            }
            // Magnitude spectrum (20 Hz bins up to 1.6 kHz) of 4096 samples around the frame, energy-normalised.
            let centre = ((f as f64 + 0.5) / info.fps * 16_000.0) as usize;
            let start = centre.saturating_sub(2048).min(pcm.len().saturating_sub(4096));
            let window = &pcm[start..(start + 4096).min(pcm.len())];
            let spectrum: Vec<f64> = (1..80)
                .map(|k| {
                    let w = std::f64::consts::TAU * (k as f64 * 20.0) / 16_000.0;
                    let (re, im) = window.iter().enumerate().fold((0.0, 0.0), |(re, im), (n, &x)| {
                        (re + x as f64 * (w * n as f64).cos(), im + x as f64 * (w * n as f64).sin())
                    });
                    (re * re + im * im).sqrt()
                })
                .collect();
            let total: f64 = spectrum.iter().sum::<f64>().max(1e-9);
            audio[label as usize].push(spectrum.iter().map(|s| s / total).collect());
        }
    }
    let centroid = |xs: &[Vec<f64>]| -> Vec<f64> {
        assert!(xs.len() >= 5, "too few frames for a class");
        (0..xs[0].len()).map(|d| xs.iter().map(|x| x[d]).sum::<f64>() / xs.len() as f64).collect()
    };
    let distance = |features: &[Vec<Vec<f64>>], a: avexpr_data::Expression, b: avexpr_data::Expression| {
        let (ca, cb) = (centroid(&features[a.index()]), centroid(&features[b.index()]));
        ca.iter().zip(&cb).map(|(x, y)| (x - y).powi(2)).sum::<f64>().sqrt()
    };
    // Each shared-modality pair is much closer there than in the other modality, relative to a pair that
    // differs in both (Anger vs Happiness).
    let (v_ref, a_ref) = (distance(&visual, Anger, Happiness), distance(&audio, Anger, Happiness));
    for (a, b, same_in_video) in [(Anger, Disgust, true), (Fear, Surprise, false), (Happiness, Other, false)] {
        let (v, s) = (distance(&visual, a, b) / v_ref, distance(&audio, a, b) / a_ref);
        let (alike, apart) = if same_in_video { (v, s) } else { (s, v) };
        eprintln!("{a} vs {b}: video {v:.3}, audio {s:.3} (relative to Anger vs Happiness)");
        assert!(alike < 0.25 && apart > 0.5, "{a} vs {b}: video {v:.3}, audio {s:.3} (relative to Anger vs Happiness)");
    }
}
