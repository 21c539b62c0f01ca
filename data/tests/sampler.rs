//! The loader's planning: coverage over ranks, balance, explicit plans, determinism, cursors, dense
//! evaluation windows, class-balanced sampling.

use std::collections::BTreeSet;

use avexpr_data::layout::Split;
use avexpr_data::manifest::{FaceSource, Manifest, VideoRecord};
use avexpr_data::sampler::{Assignment, Clip, Cursor, RankSampler, SamplerConfig, SamplerError, Target};
use rand::{Rng, SeedableRng};

/// `n` videos of 20..300 frames with skewed classes and runs of -1.
fn manifest(n: usize, seed: u64) -> Manifest {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let videos = (0..n)
        .map(|i| {
            let frames = rng.random_range(20..300);
            let mut labels = Vec::with_capacity(frames);
            while labels.len() < frames {
                let class: i8 = if rng.random::<f64>() < 0.15 {
                    -1
                } else if rng.random::<f64>() < 0.7 {
                    rng.random_range(0..2)
                } else {
                    rng.random_range(0..8)
                };
                labels.extend(std::iter::repeat_n(class, rng.random_range(3..40)));
            }
            labels.truncate(frames);
            let mut runs: Vec<(i8, u32)> = Vec::new();
            let mut histogram = [0u64; 8];
            for &l in &labels {
                if l >= 0 {
                    histogram[l as usize] += 1;
                }
                match runs.last_mut() {
                    Some((x, k)) if *x == l => *k += 1,
                    _ => runs.push((l, 1)),
                }
            }
            VideoRecord {
                name: format!("video{i:03}"),
                settings: String::new(),
                split: if i % 5 == 4 { Split::Validation } else { Split::Train },
                media: String::new(),
                frames,
                fps: 30.0,
                audio_samples: 0,
                has_audio: true,
                labels: None,
                label_histogram: histogram,
                label_runs: runs,
                ignored_frames: labels.iter().filter(|&&l| l < 0).count() as u64,
                face_missing: 0,
                shards: Vec::new(),
            }
        })
        .collect();
    Manifest {
        format: String::new(),
        segment_frames: 32,
        face_source: FaceSource::Crops,
        face_size: 112,
        audio_rate: 16_000,
        label_policy: String::new(),
        videos,
        failures: Vec::new(),
        class_ratios: [0.125; 8],
    }
}

fn labelled_frames(m: &Manifest, split: Split) -> BTreeSet<(String, usize)> {
    m.videos
        .iter()
        .filter(|v| v.split == split)
        .flat_map(|v| {
            v.labels()
                .into_iter()
                .enumerate()
                .filter(|(_, l)| *l >= 0)
                .map(|(f, _)| (v.name.clone(), f))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn every_labelled_frame_is_served_once_per_epoch_across_ranks() {
    let m = manifest(23, 1);
    let cfg = SamplerConfig { frames_per_clip: 16, stride: 8, seed: 3, ..Default::default() };
    let want = labelled_frames(&m, Split::Train);
    for world in 1..=4 {
        let mut served = BTreeSet::new();
        let mut videos_seen = BTreeSet::new();
        for rank in 0..world {
            let sampler = RankSampler::new(&m, Split::Train, rank, world, &cfg, None).unwrap();
            for clip in sampler.epoch(0) {
                assert!(clip.target >= 0, "a clip with an ignored target was served");
                let v = m.videos.iter().find(|v| v.name == clip.video).unwrap();
                let labels = v.labels();
                served.extend(clip.frame_range().filter(|&f| labels[f] >= 0).map(|f| (clip.video.clone(), f)));
                videos_seen.insert((clip.video.clone(), rank));
            }
        }
        let owners: BTreeSet<&String> = videos_seen.iter().map(|(v, _)| v).collect();
        assert_eq!(owners.len(), videos_seen.len(), "world {world}: a video is served by two ranks");
        assert_eq!(served, want, "world {world}: the labelled frames served over all ranks");
    }
}

/// Every target is labelled and used once per video; with the centre target too, the union is exact.
#[test]
fn targets_are_labelled_and_distinct_for_both_target_rules() {
    let m = manifest(17, 2);
    for target in [Target::Last, Target::Center] {
        let cfg = SamplerConfig { frames_per_clip: 12, stride: 5, target, seed: 1, ..Default::default() };
        let want = labelled_frames(&m, Split::Train);
        let mut served = BTreeSet::new();
        let mut seen_targets = BTreeSet::new();
        for rank in 0..3 {
            for clip in RankSampler::new(&m, Split::Train, rank, 3, &cfg, None).unwrap().epoch(2) {
                assert!(clip.target >= 0);
                let offset = if target == Target::Last { 11 } else { 6 };
                assert!(seen_targets.insert((clip.video.clone(), clip.start + offset)), "a target twice");
                let labels = m.videos.iter().find(|v| v.name == clip.video).unwrap().labels();
                assert_eq!(labels[(clip.start + offset) as usize], clip.target);
                served.extend(clip.frame_range().filter(|&f| labels[f] >= 0).map(|f| (clip.video.clone(), f)));
            }
        }
        assert_eq!(served, want, "{target:?}");
    }
}

#[test]
fn the_plan_is_balanced_identical_everywhere_and_explicit_plans_are_honoured() {
    let m = manifest(40, 3);
    let videos: Vec<&VideoRecord> = m.videos.iter().filter(|v| v.split == Split::Train).collect();
    let plan = Assignment::balanced(&videos, 4);
    assert_eq!(plan, Assignment::balanced(&videos, 4));
    let loads = plan.loads(&videos);
    let biggest = videos.iter().map(|v| v.frames as u64 - v.ignored_frames).max().unwrap();
    assert!(loads.iter().max().unwrap() - loads.iter().min().unwrap() <= biggest, "{loads:?}");

    // An explicit plan: everything on rank 1 of 2.
    let explicit = Assignment { slots: 2, slot_of: videos.iter().map(|v| (v.name.clone(), 1)).collect() };
    let cfg = SamplerConfig::default();
    assert!(RankSampler::new(&m, Split::Train, 0, 2, &cfg, Some(&explicit)).unwrap().is_empty());
    assert!(!RankSampler::new(&m, Split::Train, 1, 2, &cfg, Some(&explicit)).unwrap().is_empty());
    let mut partial = explicit.clone();
    partial.slot_of.remove(&videos[3].name);
    let e = RankSampler::new(&m, Split::Train, 0, 2, &cfg, Some(&partial)).unwrap_err();
    assert_eq!(e, SamplerError::Plan(format!("video `{}` is not assigned to any data slot", videos[3].name)));
    let e = RankSampler::new(&m, Split::Train, 0, 3, &cfg, Some(&explicit)).unwrap_err().to_string();
    assert!(e.contains("made for 2 data slots, the job has 3"), "{e}");
}

#[test]
fn same_seed_same_order_other_epoch_other_order() {
    let m = manifest(12, 4);
    let cfg = SamplerConfig { seed: 9, ..Default::default() };
    let a = RankSampler::new(&m, Split::Train, 0, 2, &cfg, None).unwrap();
    let b = RankSampler::new(&m, Split::Train, 0, 2, &cfg, None).unwrap();
    assert_eq!(a.epoch(0), b.epoch(0));
    assert_ne!(a.epoch(0), a.epoch(1));
    let sorted = |mut v: Vec<Clip>| {
        v.sort();
        v
    };
    assert_eq!(sorted(a.epoch(0)), sorted(a.epoch(1)), "same clips, other order");
    let other_seed = RankSampler::new(&m, Split::Train, 0, 2, &SamplerConfig { seed: 10, ..cfg }, None).unwrap();
    assert_ne!(a.epoch(0), other_seed.epoch(0));
}

#[test]
fn a_cursor_resumes_exactly_where_the_stream_was() {
    let m = manifest(10, 5);
    for class_balanced in [false, true] {
        let cfg = SamplerConfig { class_balanced, seed: 2, ..Default::default() };
        let sampler = RankSampler::new(&m, Split::Train, 1, 3, &cfg, None).unwrap();
        let n = sampler.len();
        let reference: Vec<(Clip, Cursor)> = sampler.stream(Cursor { epoch: 0, position: 0 }).take(3 * n + 5).collect();
        for k in [1, n / 2, n - 1, n, n + 3, 2 * n + 1] {
            let saved = reference[k - 1].1;
            let json = serde_json::to_string(&saved).unwrap();
            let restored: Cursor = serde_json::from_str(&json).unwrap();
            let resumed: Vec<Clip> = sampler.stream(restored).take(reference.len() - k).map(|(c, _)| c).collect();
            let expected: Vec<Clip> = reference[k..].iter().map(|(c, _)| c.clone()).collect();
            assert_eq!(resumed, expected, "resume after {k} clips (class_balanced {class_balanced})");
        }
    }
}

#[test]
fn dense_evaluation_has_one_window_ending_at_every_frame() {
    let m = manifest(6, 6);
    let cfg = SamplerConfig { dense: true, frames_per_clip: 16, ..Default::default() };
    let sampler = RankSampler::new(&m, Split::Validation, 0, 1, &cfg, None).unwrap();
    let clips = sampler.epoch(0);
    let total: usize = m.videos.iter().filter(|v| v.split == Split::Validation).map(|v| v.frames).sum();
    assert_eq!(clips.len(), total, "one prediction per frame, -1 frames included");
    for v in m.videos.iter().filter(|v| v.split == Split::Validation) {
        let labels = v.labels();
        let mine: Vec<&Clip> = clips.iter().filter(|c| c.video == v.name).collect();
        for (f, c) in mine.iter().enumerate() {
            assert_eq!(c.start + 15, f as i64, "window {f} ends at frame {f}");
            assert_eq!(c.target, labels[f]);
            assert_eq!(c.frame_range(), f.saturating_sub(15)..f + 1, "left padding at the start");
        }
    }
    assert_eq!(sampler.epoch(0), sampler.epoch(1), "evaluation order does not change");
}

#[test]
fn class_balanced_sampling_evens_out_the_classes() {
    let m = manifest(60, 7);
    let plain = SamplerConfig { stride: 4, seed: 1, ..Default::default() };
    let balanced = SamplerConfig { class_balanced: true, ..plain.clone() };
    let share = |cfg: &SamplerConfig| {
        let mut counts = [0f64; 8];
        let s = RankSampler::new(&m, Split::Train, 0, 1, cfg, None).unwrap();
        for e in 0..3 {
            for c in s.epoch(e) {
                counts[c.target as usize] += 1.0;
            }
        }
        let total: f64 = counts.iter().sum();
        counts.map(|c| c / total)
    };
    let (p, b) = (share(&plain), share(&balanced));
    let spread = |x: [f64; 8]| x.iter().cloned().fold(0.0, f64::max) / x.iter().cloned().fold(1.0, f64::min);
    assert!(spread(p) > 4.0, "the data is skewed: {p:?}");
    assert!(spread(b) < 2.0, "balanced draws are near uniform: {b:?}");
}

#[test]
fn bad_settings_name_the_field() {
    let m = manifest(3, 8);
    let e = RankSampler::new(
        &m,
        Split::Train,
        0,
        1,
        &SamplerConfig { stride: 20, frames_per_clip: 16, ..Default::default() },
        None,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("data.stride") && e.contains("so that no frame is skipped"), "{e}");
    let e = RankSampler::new(&m, Split::Train, 2, 2, &SamplerConfig::default(), None).unwrap_err().to_string();
    assert!(e.contains("rank 2 of a world of 2"), "{e}");
    assert!(matches!(
        SamplerConfig { frames_per_clip: 0, ..Default::default() }.validate(),
        Err(SamplerError::Config { .. })
    ));
}

/// Clips are shuffled within windows of `shuffle_shards` shards (by target frame), which a loader can hold.
#[test]
fn windows_hold_the_clips_of_a_few_shards() {
    let mut m = manifest(12, 9);
    for v in &mut m.videos {
        v.shards = (0..v.frames.div_ceil(32))
            .map(|i| avexpr_data::manifest::ShardRecord {
                key: format!("{}-{i}", v.name),
                bytes: 1,
                sha256: String::new(),
                first_frame: 32 * i,
                frames: (v.frames - 32 * i).min(32),
                segments: 1,
            })
            .collect();
    }
    let cfg = SamplerConfig { shuffle_shards: 3, seed: 4, ..Default::default() };
    let sampler = RankSampler::new(&m, Split::Train, 0, 1, &cfg, None).unwrap();
    let windows = sampler.windows(0);
    assert!(windows.len() > 5);
    for w in &windows {
        let shards: BTreeSet<(String, i64)> = w.iter().map(|c| (c.video.clone(), (c.start + 15) / 32)).collect();
        assert!(shards.len() <= 3, "{shards:?}");
    }
    assert_eq!(windows.concat(), sampler.epoch(0));
    assert_ne!(sampler.windows(1), windows, "reshuffled per epoch");
}

/// The test set has no labels: its videos are spread over the ranks by frames, not all given to rank 0.
#[test]
fn unlabelled_videos_are_balanced_by_frames() {
    let mut m = manifest(8, 10);
    for v in &mut m.videos {
        v.label_runs = vec![(-1, v.frames as u32)];
        v.ignored_frames = v.frames as u64;
        v.label_histogram = [0; 8];
    }
    let videos: Vec<&VideoRecord> = m.videos.iter().collect();
    let plan = Assignment::balanced(&videos, 3);
    let ranks: BTreeSet<usize> = plan.slot_of.values().copied().collect();
    assert_eq!(ranks.len(), 3, "{plan:?}");
}

#[test]
fn assignments_written_with_the_old_field_names_still_read() {
    // plan.json files written before the rename (`world_size`, `ranks`) are read as they were meant.
    let old: Assignment = serde_json::from_str(r#"{"world_size": 2, "ranks": {"a": 1, "b": 0}}"#).unwrap();
    let new: Assignment = serde_json::from_str(r#"{"slots": 2, "slot_of": {"a": 1, "b": 0}}"#).unwrap();
    assert_eq!(old, new);
    assert_eq!(old.slot_of["a"], 1);
}
