//! What each rank reads, in which order: the deterministic planning half of the streaming loader.
//!
//! - Assignment: videos of a split assigned to ranks (data slots), balanced by labelled frames (largest first to
//!   the least loaded, ties by slot), identical on every rank; or an explicit one (`plan.json`) that is honoured.
//! - Clips: windows of `frames_per_clip` frames every `stride` frames whose target frame (last or centre) is
//!   labelled; where that leaves a labelled frame outside every window (its neighbours' targets are -1), a
//!   window is added around it with the labelled target reaching furthest ahead. So the clips of an epoch cover
//!   every labelled frame. Windows may reach past the video's start or end: those frames are padding, masked.
//!   Dense evaluation instead gives one window per frame with that frame at the target position (so, for the
//!   last-frame target, one window ending at every frame, left-padded at the start).
//! - Order: shards are what storage serves, so the order is shuffled in two levels, as WebDataset does, but
//!   reproducibly: each clip belongs to the shard holding its target frame; the rank's shards are shuffled
//!   from (seed, epoch, rank) and taken in windows of `shuffle_shards`; the clips of a window are shuffled
//!   together (or, class-balanced, drawn with replacement with weights 1 / (class frequency of the target in
//!   the manifest)). A loader then holds one window's shards at a time, whatever the dataset size.
//! - Cursor: (epoch, position in the order). The order is a pure function of the plan and (seed, epoch, rank),
//!   so restarting from a cursor yields exactly the clips the original would have yielded next.

use std::collections::BTreeMap;

use rand::SeedableRng;
use rand::distr::Distribution;
use rand::distr::weighted::WeightedIndex;
use rand::seq::SliceRandom;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::affwild2::NUM_CLASSES;
use crate::layout::Split;
use crate::manifest::{Manifest, VideoRecord};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// The clip's last frame (causal).
    Last,
    Center,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SamplerConfig {
    pub frames_per_clip: usize,
    pub stride: usize,
    pub target: Target,
    pub class_balanced: bool,
    /// One window ending at every frame (evaluation), instead of strided training windows.
    pub dense: bool,
    /// Shards whose clips are shuffled together: more mixes better and needs more prefetch memory.
    pub shuffle_shards: usize,
    pub seed: u64,
}

impl Default for SamplerConfig {
    /// Also the `data` section's defaults ([`crate::config::DataConfig`]).
    fn default() -> Self {
        Self {
            frames_per_clip: 16,
            stride: 8,
            target: Target::Last,
            class_balanced: false,
            dense: false,
            shuffle_shards: 16,
            seed: 0,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum SamplerError {
    #[error("{field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error("plan: {0}")]
    Plan(String),
}

/// One clip: `frames` frames of `video` from `start`; positions before frame 0 or past the video's end are
/// padding.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Clip {
    pub video: String,
    pub start: i64,
    pub frames: usize,
    /// The video's length.
    pub video_frames: usize,
    /// The target frame's label (-1 only in dense mode).
    pub target: i8,
}

impl Clip {
    /// The video frames the clip covers (padding excluded).
    pub fn frame_range(&self) -> std::ops::Range<usize> {
        let end = (self.start + self.frames as i64).clamp(0, self.video_frames as i64) as usize;
        (self.start.max(0) as usize).min(end)..end
    }
}

/// Where a rank's stream is: restart from it to continue exactly.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cursor {
    pub epoch: u64,
    pub position: usize,
}

impl SamplerConfig {
    pub fn validate(&self) -> Result<(), SamplerError> {
        if self.frames_per_clip == 0 {
            return Err(SamplerError::Config { field: "data.frames_per_clip", reason: "must be positive".into() });
        }
        if self.stride == 0 || self.stride > self.frames_per_clip {
            return Err(SamplerError::Config {
                field: "data.stride",
                reason: format!(
                    "{} must be in 1..=frames_per_clip ({}) so that no frame is skipped",
                    self.stride, self.frames_per_clip
                ),
            });
        }
        if self.shuffle_shards == 0 {
            return Err(SamplerError::Config { field: "data.shuffle_shards", reason: "must be positive".into() });
        }
        Ok(())
    }

    /// Where in a window its target frame is.
    pub fn target_offset(&self) -> usize {
        match self.target {
            Target::Last => self.frames_per_clip - 1,
            Target::Center => self.frames_per_clip / 2,
        }
    }

    /// The clips of one video.
    pub fn clips(&self, video: &VideoRecord) -> Vec<Clip> {
        let labels = video.labels();
        let n = labels.len();
        let (span, offset) = (self.frames_per_clip, self.target_offset());
        let clip = |target: usize| Clip {
            video: video.name.clone(),
            start: target as i64 - offset as i64,
            frames: span,
            video_frames: n,
            target: labels[target],
        };
        if self.dense {
            // One window for every frame, the frame at the window's target position (the last frame for
            // `Target::Last`: left padding at the start; the centre for `Target::Center`: padding both ends).
            return (0..n).map(clip).collect();
        }
        if n == 0 {
            return Vec::new();
        }
        // Strided windows inside the video, the last one ending at its last frame; keep labelled targets.
        let last_start = n.saturating_sub(span);
        let mut starts: Vec<usize> = (0..=last_start).step_by(self.stride).collect();
        if starts.last() != Some(&last_start) {
            starts.push(last_start);
        }
        let mut targets: Vec<usize> =
            starts.into_iter().map(|s| (s + offset).min(n - 1)).filter(|&t| labels[t] >= 0).collect();
        targets.dedup();
        // Cover what the skipped windows left out: a labelled frame f lies in the window of target t when
        // t - offset <= f <= t - offset + span - 1; take the furthest labelled t (f itself qualifies).
        let mut covered = vec![false; n];
        let cover = |t: usize, covered: &mut Vec<bool>| {
            let first = t.saturating_sub(offset);
            for c in covered.iter_mut().take((t + span - offset).min(n)).skip(first) {
                *c = true;
            }
        };
        for &t in &targets {
            cover(t, &mut covered);
        }
        for f in 0..n {
            if labels[f] >= 0 && !covered[f] {
                let t = (f..=(f + offset).min(n - 1)).rev().find(|&t| labels[t] >= 0).expect("f itself is labelled");
                cover(t, &mut covered);
                targets.push(t);
            }
        }
        targets.sort_unstable();
        targets.into_iter().map(clip).collect()
    }
}

/// Which data slot reads each video of a split. A slot is one stream of the sampler (a rank, or one micro-batch
/// of a rank that accumulates: see the worker's training loop); `plan.json` holds one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    /// How many slots the videos are spread over (written as `world_size` before 2026-12).
    #[serde(alias = "world_size")]
    pub slots: usize,
    /// Video -> slot (written as `ranks` before 2026-12).
    #[serde(alias = "ranks")]
    pub slot_of: BTreeMap<String, usize>,
}

impl Assignment {
    /// Largest videos first (by labelled frames, then name), each to the least loaded slot (then the lowest).
    /// A split without labels (the test set) is balanced by frames: every frame gets a prediction there.
    pub fn balanced(videos: &[&VideoRecord], slots: usize) -> Assignment {
        let mut order: Vec<&VideoRecord> = videos.to_vec();
        let any_labels = videos.iter().any(|v| v.frames as u64 > v.ignored_frames);
        let labelled = |v: &VideoRecord| if any_labels { v.frames as u64 - v.ignored_frames } else { v.frames as u64 };
        order.sort_by(|a, b| labelled(b).cmp(&labelled(a)).then_with(|| a.name.cmp(&b.name)));
        let mut load = vec![0u64; slots.max(1)];
        let mut slot_of = BTreeMap::new();
        for v in order {
            let slot = (0..load.len()).min_by_key(|&s| (load[s], s)).expect("at least one slot");
            load[slot] += labelled(v);
            slot_of.insert(v.name.clone(), slot);
        }
        Assignment { slots: slots.max(1), slot_of }
    }

    /// Labelled frames per slot.
    pub fn loads(&self, videos: &[&VideoRecord]) -> Vec<u64> {
        let mut load = vec![0u64; self.slots];
        for v in videos {
            load[self.slot_of[&v.name]] += v.frames as u64 - v.ignored_frames;
        }
        load
    }

    fn check(&self, videos: &[&VideoRecord], slots: usize) -> Result<(), SamplerError> {
        if self.slots != slots {
            return Err(SamplerError::Plan(format!("made for {} data slots, the job has {slots}", self.slots)));
        }
        for v in videos {
            match self.slot_of.get(&v.name) {
                None => return Err(SamplerError::Plan(format!("video `{}` is not assigned to any data slot", v.name))),
                Some(&s) if s >= slots => {
                    return Err(SamplerError::Plan(format!(
                        "video `{}` is assigned to data slot {s} of {slots}",
                        v.name
                    )));
                }
                _ => {}
            }
        }
        Ok(())
    }
}

/// One rank's view of a split: its clips grouped by shard, in a per-epoch order.
#[derive(Debug, Clone)]
pub struct RankSampler {
    cfg: SamplerConfig,
    rank: usize,
    /// Per shard (a video without shard records is one unit), its clips in frame order.
    units: Vec<Vec<Clip>>,
    len: usize,
    class_weights: [f64; NUM_CLASSES],
}

/// A video's clips split by the shard that holds each one's target frame (last frame of a dense window): the
/// units a rank's order is made of (and what a feature cache stores together).
pub fn units_of(cfg: &SamplerConfig, video: &VideoRecord) -> Vec<Vec<Clip>> {
    let clips = cfg.clips(video);
    if video.shards.is_empty() {
        return vec![clips];
    }
    let mut units = vec![Vec::new(); video.shards.len()];
    for clip in clips {
        units[unit_of(cfg, video, clip.start)].push(clip);
    }
    units
}

/// The index of the unit of [`units_of`] that holds the clip starting at frame `start`.
pub fn unit_of(cfg: &SamplerConfig, video: &VideoRecord, start: i64) -> usize {
    if video.shards.is_empty() {
        return 0;
    }
    let target = (start + cfg.target_offset() as i64).max(0) as usize;
    video.shards.partition_point(|s| s.first_frame + s.frames <= target).min(video.shards.len() - 1)
}

impl RankSampler {
    /// `plan`: `None` for the balanced assignment every rank computes identically.
    pub fn new(
        manifest: &Manifest,
        split: Split,
        rank: usize,
        world_size: usize,
        cfg: &SamplerConfig,
        plan: Option<&Assignment>,
    ) -> Result<Self, SamplerError> {
        cfg.validate()?;
        if rank >= world_size {
            return Err(SamplerError::Plan(format!("rank {rank} of a world of {world_size}")));
        }
        let videos: Vec<&VideoRecord> = manifest.videos.iter().filter(|v| v.split == split).collect();
        let plan = match plan {
            Some(plan) => {
                plan.check(&videos, world_size)?;
                plan.clone()
            }
            None => Assignment::balanced(&videos, world_size),
        };
        let units: Vec<Vec<Clip>> = videos
            .iter()
            .filter(|v| plan.slot_of[&v.name] == rank)
            .flat_map(|v| units_of(cfg, v))
            .filter(|u| !u.is_empty())
            .collect();
        let len = units.iter().map(Vec::len).sum();
        let mut counts = [0u64; NUM_CLASSES];
        for v in &videos {
            for (c, n) in counts.iter_mut().zip(v.label_histogram) {
                *c += n;
            }
        }
        let class_weights = counts.map(|n| if n > 0 { 1.0 / n as f64 } else { 0.0 });
        Ok(Self { cfg: cfg.clone(), rank, units, len, class_weights })
    }

    pub fn config(&self) -> &SamplerConfig {
        &self.cfg
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    /// Clips per epoch on this rank.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn rng(&self, epoch: u64) -> ChaCha8Rng {
        // Distinct, reproducible streams per (seed, epoch, rank).
        let mut rng = ChaCha8Rng::seed_from_u64(self.cfg.seed);
        rng.set_stream(epoch.wrapping_mul(1 << 20).wrapping_add(self.rank as u64));
        rng
    }

    /// The epoch's order: shuffled, or drawn class-balanced; dense evaluation keeps video order.
    pub fn epoch(&self, epoch: u64) -> Vec<Clip> {
        self.windows(epoch).into_iter().flatten().collect()
    }

    /// The epoch's order window by window: the clips of `shuffle_shards` shards each. Dense evaluation keeps
    /// video and frame order.
    pub fn windows(&self, epoch: u64) -> Vec<Vec<Clip>> {
        let chunk = self.cfg.shuffle_shards;
        if self.cfg.dense {
            return self.units.chunks(chunk).map(|c| c.concat()).collect();
        }
        let mut rng = self.rng(epoch);
        let mut order: Vec<&Vec<Clip>> = self.units.iter().collect();
        order.shuffle(&mut rng);
        order
            .chunks(chunk)
            .map(|units| {
                let mut clips: Vec<Clip> = units.iter().flat_map(|u| u.iter().cloned()).collect();
                if !self.cfg.class_balanced {
                    clips.shuffle(&mut rng);
                    return clips;
                }
                let weights = clips.iter().map(|c| self.class_weights[c.target as usize]);
                let Ok(draw) = WeightedIndex::new(weights) else { return Vec::new() };
                (0..clips.len()).map(|_| clips[draw.sample(&mut rng)].clone()).collect()
            })
            .collect()
    }

    /// The clips from `cursor` on, each with the cursor that follows it, across epochs.
    pub fn stream(&self, cursor: Cursor) -> impl Iterator<Item = (Clip, Cursor)> + '_ {
        let mut epoch = cursor.epoch;
        let mut position = cursor.position;
        let mut order = self.epoch(epoch);
        std::iter::from_fn(move || {
            if order.is_empty() {
                return None;
            }
            while position >= order.len() {
                (epoch, position) = (epoch + 1, 0);
                order = self.epoch(epoch);
            }
            let clip = order[position].clone();
            position += 1;
            Some((clip, Cursor { epoch, position }))
        })
    }
}
