//! k-fold cross-validation over the labelled videos: the training and validation videos together are split
//! by video into `k` folds (seeded, stratified by class frames), and fold `fold` becomes the validation split,
//! the others the training split. The test split is untouched. Applied to the manifest where a job reads it
//! (worker sessions, the orchestrator's plan), so everything downstream (sampler, class weights, validation)
//! sees the fold's splits.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

use crate::NUM_CLASSES;
use crate::layout::Split;
use crate::manifest::{Manifest, VideoRecord};

/// `data.folds`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FoldConfig {
    /// Number of folds (>= 2).
    pub k: usize,
    /// This job's validation fold, `0..k`.
    pub fold: usize,
    /// Seed of the assignment (the same seed gives the same folds).
    #[serde(default)]
    pub seed: u64,
}

/// Each labelled video's fold: videos in a seeded random order, each to the fold where it adds the
/// least overshoot beyond `1/k` of every class's frames (squared, each class scaled by its share, so rare
/// classes count as much as common ones); ties go to the fold with fewer frames, then the lower fold.
pub fn assign(videos: &[&VideoRecord], k: usize, seed: u64) -> BTreeMap<String, usize> {
    let mut order: Vec<&VideoRecord> = videos.to_vec();
    order.sort_by(|a, b| a.name.cmp(&b.name));
    order.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
    let mut target = [0f64; NUM_CLASSES];
    for v in &order {
        for (t, &n) in target.iter_mut().zip(&v.label_histogram) {
            *t += n as f64 / k as f64;
        }
    }
    let overshoot = |fold: &[f64; NUM_CLASSES]| -> f64 {
        (0..NUM_CLASSES)
            .filter(|&c| target[c] > 0.0)
            .map(|c| ((fold[c] - target[c]).max(0.0) / target[c]).powi(2))
            .sum()
    };
    let mut folds = vec![[0f64; NUM_CLASSES]; k];
    let mut out = BTreeMap::new();
    for v in order {
        let key = |f: usize| {
            let mut after = folds[f];
            after.iter_mut().zip(&v.label_histogram).for_each(|(a, &n)| *a += n as f64);
            (overshoot(&after) - overshoot(&folds[f]), folds[f].iter().sum::<f64>(), f)
        };
        let best = (0..k)
            .map(key)
            .min_by(|a, b| a.0.total_cmp(&b.0).then(a.1.total_cmp(&b.1)).then(a.2.cmp(&b.2)))
            .expect("k >= 1")
            .2;
        folds[best].iter_mut().zip(&v.label_histogram).for_each(|(f, &n)| *f += n as f64);
        out.insert(v.name.clone(), best);
    }
    out
}

/// The training and validation videos that the folds divide.
pub fn labelled_videos(manifest: &Manifest) -> Vec<&VideoRecord> {
    manifest.videos.iter().filter(|v| matches!(v.split, Split::Train | Split::Validation)).collect()
}

/// Makes fold `cfg.fold` the validation split and the other folds the training split.
pub fn apply(manifest: &mut Manifest, cfg: &FoldConfig) {
    let folds = assign(&labelled_videos(manifest), cfg.k, cfg.seed);
    let mut train = [0f64; NUM_CLASSES];
    for v in manifest.videos.iter_mut() {
        if let Some(&f) = folds.get(&v.name) {
            v.split = if f == cfg.fold { Split::Validation } else { Split::Train };
        }
        if v.split == Split::Train {
            train.iter_mut().zip(&v.label_histogram).for_each(|(t, &n)| *t += n as f64);
        }
    }
    let total: f64 = train.iter().sum();
    manifest.class_ratios = train.map(|n| if total > 0.0 { n / total } else { 0.0 });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn video(name: &str, split: Split, histogram: [u64; NUM_CLASSES]) -> VideoRecord {
        VideoRecord {
            name: name.into(),
            settings: String::new(),
            split,
            media: String::new(),
            frames: histogram.iter().sum::<u64>() as usize,
            fps: 30.0,
            audio_samples: 0,
            has_audio: false,
            labels: None,
            label_histogram: histogram,
            label_runs: Vec::new(),
            ignored_frames: 0,
            face_missing: 0,
            shards: Vec::new(),
        }
    }

    /// 40 labelled videos of uneven sizes and class mixes, and 3 test videos.
    fn manifest() -> Manifest {
        let mut videos = Vec::new();
        for i in 0..40u64 {
            let mut h = [0u64; NUM_CLASSES];
            h[(i % 8) as usize] = 100 + 37 * (i % 7);
            h[((i * 3 + 1) % 8) as usize] += 20 * (i % 5);
            let split = if i % 4 == 0 { Split::Validation } else { Split::Train };
            videos.push(video(&format!("v{i:02}"), split, h));
        }
        for i in 0..3 {
            videos.push(video(&format!("t{i}"), Split::Test, [0; NUM_CLASSES]));
        }
        Manifest {
            format: String::new(),
            segment_frames: 16,
            face_source: crate::manifest::FaceSource::Crops,
            face_size: 112,
            audio_rate: 16_000,
            label_policy: String::new(),
            videos,
            failures: Vec::new(),
            class_ratios: [0.0; NUM_CLASSES],
        }
    }

    #[test]
    fn the_folds_partition_the_labelled_videos_and_leave_the_test_split() {
        let m = manifest();
        let k = 5;
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        for fold in 0..k {
            let mut f = m.clone();
            apply(&mut f, &FoldConfig { k, fold, seed: 3 });
            for (before, after) in m.videos.iter().zip(&f.videos) {
                if before.split == Split::Test {
                    assert_eq!(after.split, Split::Test, "{}", after.name);
                } else if after.split == Split::Validation {
                    assert!(seen.insert(after.name.clone(), fold).is_none(), "{} validates twice", after.name);
                }
            }
        }
        // Every labelled video validates in exactly one fold.
        assert_eq!(seen.len(), 40);
        // Stratified: every fold holds each class's frames to within one video of a fifth.
        let folds = assign(&labelled_videos(&m), k, 3);
        let largest = m.videos.iter().flat_map(|v| v.label_histogram).max().unwrap() as f64;
        for c in 0..NUM_CLASSES {
            let total: u64 = m.videos.iter().map(|v| v.label_histogram[c]).sum();
            for fold in 0..k {
                let n: u64 =
                    m.videos.iter().filter(|v| folds.get(&v.name) == Some(&fold)).map(|v| v.label_histogram[c]).sum();
                assert!((n as f64 - total as f64 / k as f64).abs() <= largest, "class {c} fold {fold}: {n} of {total}");
            }
        }
        // Seeded: the same seed gives the same folds, another seed other folds.
        assert_eq!(assign(&labelled_videos(&m), k, 3), folds);
        assert_ne!(assign(&labelled_videos(&m), k, 4), folds);
    }
}
