//! The streaming loader: batches of clips for one rank, from shards in object storage, with memory bounded
//! by configuration and a position that a checkpoint can store.
//!
//! ```text
//!  fetch thread (tokio)          assembler thread         decode pool (crossbeam)     collector thread
//!  window by window: shards  ->  clip by clip: JPEGs,  ->  JPEG decode, augment,   ->  back in order,   -> batches
//!  under the byte budget,        labels, audio cut         CHW uint8                   batched, bounded
//!  verified, parsed              from resident shards
//! ```
//!
//! - The order is the sampler's ([`RankSampler::windows`]): one window's clips come from a few shards, so
//!   the fetcher holds a window's shards (plus the next window's, as the budget allows) and nothing else.
//!   Every resident shard holds permits of a byte semaphore of `prefetch_bytes` until the last clip that
//!   needs it is assembled: that, the bounded channels and the batches in flight are all the memory there is.
//! - Every clip gets a sequence number; decode threads finish out of order and the collector puts them back,
//!   and a clip's augmentation is drawn from (seed, rank, epoch, position): batches are identical whatever the
//!   number of decode threads or the timing of storage.
//! - Each batch carries the [`Cursor`] after its last clip; a loader started from it yields exactly the
//!   batches that would have come next. Batches never span two epochs (an epoch's last batch may be short).
//! - A missing or corrupt shard, or an undecodable frame, is an error naming it, delivered in order after the
//!   batches that came before it; with `skip_bad` the clips that need it are skipped and counted instead.
//!   Transient storage failures are retried by the store (see [`crate::store`]).

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use fast_image_resize::Resizer;
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use crate::augment::AugmentConfig;
use crate::augment::{Augmentation, bilinear, to_chw};
use crate::decode::{AUDIO_RATE, audio_samples};
use crate::fetch::{FetchError, fetch_shard};
use crate::manifest::{Manifest, VideoRecord};
use crate::sampler::{Clip, Cursor, RankSampler, SamplerError};
use crate::shard::Sample;
use crate::stack::{PaddedRow, stack_padded};
use crate::store::Store;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LoaderConfig {
    pub batch_size: usize,
    /// `None` (evaluation): the faces as stored, only resized. The other fields are the `data` section's of the
    /// same names ([`crate::config::DataConfig`] says what each means).
    pub augment: Option<AugmentConfig>,
    pub image_size: u32,
    pub prefetch_bytes: u64,
    pub fetch_concurrency: usize,
    pub decode_threads: usize,
    pub ready_batches: usize,
    pub skip_bad: bool,
}

impl Default for LoaderConfig {
    /// Also the `data` section's defaults ([`crate::config::DataConfig`]).
    fn default() -> Self {
        Self {
            batch_size: 32,
            image_size: 0,
            augment: Some(AugmentConfig::default()),
            prefetch_bytes: 512 << 20,
            fetch_concurrency: 8,
            decode_threads: std::thread::available_parallelism().map_or(2, |n| n.get().clamp(1, 8)),
            ready_batches: 2,
            skip_bad: false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum LoaderError {
    #[error("{field}: {reason}")]
    Config { field: &'static str, reason: String },
    #[error(transparent)]
    Sampler(#[from] SamplerError),
    #[error(transparent)]
    Fetch(#[from] FetchError),
    #[error("shard {shard}: {reason}")]
    ShardLayout { shard: String, reason: String },
    #[error("shard {shard}: frame {frame} of video {video} does not decode: {reason}")]
    BadFrame { shard: String, video: String, frame: usize, reason: String },
    /// A loader thread panicked: the stream stopped before its end (the panic's message was printed above).
    #[error("loader thread `{thread}` panicked (its message is above): the stream stopped before its end")]
    ThreadPanicked { thread: String },
    #[error(
        "data.prefetch_bytes: {budget} bytes cannot hold one shuffle window ({needed} bytes in {shards} shards); \
         raise it or lower data.shuffle_shards"
    )]
    Budget { budget: u64, needed: u64, shards: usize },
}

impl LoaderConfig {
    pub fn validate(&self) -> Result<(), LoaderError> {
        let bad = |field: &'static str, reason: &str| Err(LoaderError::Config { field, reason: reason.to_string() });
        if self.batch_size == 0 {
            return bad("data.batch_size", "must be positive");
        }
        if self.prefetch_bytes < 1 << 20 {
            return bad("data.prefetch_bytes", "must be at least 1 MiB");
        }
        if self.fetch_concurrency == 0 {
            return bad("data.fetch_concurrency", "must be positive");
        }
        if self.decode_threads == 0 {
            return bad("data.decode_threads", "must be positive");
        }
        if self.ready_batches == 0 {
            return bad("data.ready_batches", "must be positive");
        }
        if self.image_size != 0 && self.image_size < 16 {
            return bad("data.image_size", "must be 0 (as stored) or at least 16");
        }
        if let Some(a) = &self.augment {
            if !(a.scale[0] > 0.0 && a.scale[0] <= a.scale[1] && a.scale[1] <= 1.0) {
                return bad("data.augment.scale", "must be [low, high] with 0 < low <= high <= 1");
            }
            if !(a.ratio[0] > 0.0 && a.ratio[0] <= a.ratio[1]) {
                return bad("data.augment.ratio", "must be [low, high] with 0 < low <= high");
            }
            if !(0.0..=1.0).contains(&a.flip) {
                return bad("data.augment.flip", "is a probability, in [0, 1]");
            }
            for (field, x) in [
                ("data.augment.brightness", a.brightness),
                ("data.augment.contrast", a.contrast),
                ("data.augment.saturation", a.saturation),
            ] {
                if !(0.0..1.0).contains(&x) {
                    return bad(field, "must be in [0, 1)");
                }
            }
        }
        Ok(())
    }
}

/// Where shards come from: a store, or memory (shard key -> parsed samples), which measures the decode-only
/// limit.
#[derive(Clone)]
pub enum Source {
    Store(Store),
    Memory(Arc<HashMap<String, Arc<Vec<Sample>>>>),
}

impl Source {
    /// Every shard of `videos`, fetched and verified into memory.
    pub fn preload(store: &Store, videos: &[&VideoRecord]) -> Result<Source, LoaderError> {
        let mut map = HashMap::new();
        for shard in videos.iter().flat_map(|v| &v.shards) {
            map.insert(shard.key.clone(), Arc::new(crate::store::block_on(fetch_shard(store, shard))?));
        }
        Ok(Source::Memory(Arc::new(map)))
    }
}

/// One clip's place in its video, as delivered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipMeta {
    pub video: String,
    /// First frame (negative: left padding); the clip covers `start..start + frames`.
    pub start: i64,
    pub frames: usize,
    pub fps: f64,
    /// The target frame's label.
    pub target: i8,
}

/// A batch of `clips.len()` clips of `frames` frames, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub clips: Vec<ClipMeta>,
    pub frames: usize,
    pub image_size: usize,
    /// `[batch, frames, 3, H, W]`, RGB, as stored (normalisation happens on the device).
    pub faces: Vec<u8>,
    /// `[batch, frames]`: 1 where the frame has its own face crop; 0 on padding and where a neighbour's
    /// crop stands in.
    pub face_mask: Vec<u8>,
    /// `[batch, frames]`: 1 on real frames, 0 on padding.
    pub frame_mask: Vec<u8>,
    /// `[batch, frames]` per-frame labels, -1 where ignored or padding.
    pub labels: Vec<i8>,
    /// `[batch, samples]` 16 kHz mono: the audio of the clip's frames.
    pub audio: Vec<f32>,
    /// `[batch, samples]`: 1 on real audio.
    pub audio_mask: Vec<u8>,
    pub samples: usize,
    /// Where the stream continues after this batch.
    pub cursor: Cursor,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.clips.len()
    }

    pub fn is_empty(&self) -> bool {
        self.clips.is_empty()
    }

    /// The clip labels (each clip's target frame).
    pub fn targets(&self) -> Vec<i8> {
        self.clips.iter().map(|c| c.target).collect()
    }

    fn from_clips(clips: Vec<DecodedClip>, cursor: Cursor, frames: usize, image_size: usize) -> Batch {
        let audio_rows: Vec<_> = clips.iter().map(|c| PaddedRow::dense(&c.audio[..], c.audio.len())).collect();
        let (audio, samples) = stack_padded(&audio_rows, 1, 1, 0);
        let mask_rows: Vec<_> = clips.iter().map(|c| PaddedRow::dense(&c.audio_mask[..], c.audio_mask.len())).collect();
        let (audio_mask, _) = stack_padded(&mask_rows, 1, 1, 0);
        Batch {
            frames,
            image_size,
            faces: clips.iter().map(|c| &c.faces[..]).collect::<Vec<_>>().concat(),
            face_mask: clips.iter().map(|c| &c.face_mask[..]).collect::<Vec<_>>().concat(),
            frame_mask: clips.iter().map(|c| &c.frame_mask[..]).collect::<Vec<_>>().concat(),
            labels: clips.iter().map(|c| &c.labels[..]).collect::<Vec<_>>().concat(),
            audio,
            audio_mask,
            samples,
            cursor,
            clips: clips.into_iter().map(|c| c.meta).collect(),
        }
    }
}

/// What the loader did so far.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct LoaderStats {
    pub shards_fetched: u64,
    pub bytes_fetched: u64,
    /// Distinct shards skipped because they were missing or corrupt (each is tried again by every window that
    /// needs it).
    pub shards_skipped_missing: u64,
    pub shards_skipped_corrupt: u64,
    pub clips: u64,
    /// Clips skipped with `skip_bad` (their shard was missing or corrupt, or a frame did not decode).
    pub clips_skipped: u64,
    pub batches: u64,
    /// Most shard bytes resident at once.
    pub peak_resident_bytes: u64,
    /// Time the consumer spent waiting in [`Loader::next`].
    pub wait_seconds: f64,
}

#[derive(Default)]
struct Counters {
    shards_fetched: AtomicU64,
    bytes_fetched: AtomicU64,
    shards_skipped_missing: AtomicU64,
    shards_skipped_corrupt: AtomicU64,
    clips: AtomicU64,
    clips_skipped: AtomicU64,
    batches: AtomicU64,
    peak_resident_kib: AtomicU64,
    wait_nanos: AtomicU64,
    /// Shards skipped so far: a shard that two windows need fails (and is counted) once.
    skipped: std::sync::Mutex<HashSet<ShardId>>,
}

/// A shard request in flight, holding its share of the budget.
type FetchTask = tokio::task::JoinHandle<(Result<Arc<Vec<Sample>>, FetchError>, OwnedSemaphorePermit)>;

/// (index of the video in the manifest, index of the shard in the video).
type ShardId = (usize, usize);

/// A shard held for the clips that need it; its permits return to the budget when the last holder drops it.
struct Resident {
    samples: Arc<Vec<Sample>>,
    _permit: OwnedSemaphorePermit,
}

/// One sampler window's clips (from `first_position` of the epoch on) and the shards they need.
struct Window {
    epoch: u64,
    epoch_len: usize,
    first_position: usize,
    clips: Vec<Clip>,
    shards: HashMap<ShardId, Arc<Resident>>,
}

struct Shared {
    manifest: Arc<Manifest>,
    video_index: HashMap<String, usize>,
    sampler: RankSampler,
    cfg: LoaderConfig,
    image_size: usize,
    source: Source,
    budget_kib: u64,
    semaphore: Arc<Semaphore>,
    counters: Counters,
}

fn kib(bytes: u64) -> u64 {
    bytes.div_ceil(1024)
}

impl Shared {
    fn video(&self, name: &str) -> (usize, &VideoRecord) {
        let i = self.video_index[name];
        (i, &self.manifest.videos[i])
    }

    /// The shard holding `frame` of a video (a video without shard records has none).
    fn shard_of(video: &VideoRecord, frame: usize) -> Option<usize> {
        let i = video.shards.partition_point(|s| s.first_frame + s.frames <= frame);
        (i < video.shards.len()).then_some(i)
    }

    /// The shards the clips need, in first-use order.
    fn needed(&self, clips: &[Clip]) -> Vec<ShardId> {
        let mut seen = HashSet::new();
        let mut order = Vec::new();
        for clip in clips {
            let (vi, video) = self.video(&clip.video);
            let range = clip.frame_range();
            let Some(first) = Self::shard_of(video, range.start) else { continue };
            for si in first..video.shards.len() {
                if video.shards[si].first_frame >= range.end {
                    break;
                }
                if seen.insert((vi, si)) {
                    order.push((vi, si));
                }
            }
        }
        order
    }

    /// [`Shared::needed`], or the budget error when those shards cannot all be resident at once.
    fn needed_within_budget(&self, clips: &[Clip]) -> Result<Vec<ShardId>, LoaderError> {
        let needed = self.needed(clips);
        let size = |id: &ShardId| self.manifest.videos[id.0].shards[id.1].bytes;
        if needed.iter().map(|id| kib(size(id))).sum::<u64>() > self.budget_kib {
            return Err(LoaderError::Budget {
                budget: self.cfg.prefetch_bytes,
                needed: needed.iter().map(size).sum(),
                shards: needed.len(),
            });
        }
        Ok(needed)
    }

    async fn fetch(&self, id: ShardId) -> Result<Arc<Vec<Sample>>, FetchError> {
        let shard = &self.manifest.videos[id.0].shards[id.1];
        match &self.source {
            Source::Store(store) => fetch_shard(store, shard).await.map(Arc::new),
            Source::Memory(map) => map
                .get(&shard.key)
                .cloned()
                .ok_or_else(|| FetchError::Missing { uri: "memory".into(), key: shard.key.clone() }),
        }
    }

    /// Fetches a window's shards, `fetch_concurrency` at a time, each under the budget; reuses what the
    /// previous window still holds.
    async fn fetch_window(
        self: &Arc<Self>,
        clips: &[Clip],
        cache: &mut HashMap<ShardId, Weak<Resident>>,
    ) -> Result<HashMap<ShardId, Arc<Resident>>, LoaderError> {
        let needed = self.needed_within_budget(clips)?;
        let size = |id: &ShardId| self.manifest.videos[id.0].shards[id.1].bytes;
        let mut held = HashMap::new();
        let mut in_flight = VecDeque::new();
        for id in needed {
            if let Some(resident) = cache.get(&id).and_then(Weak::upgrade) {
                held.insert(id, resident);
                continue;
            }
            let permit = self
                .semaphore
                .clone()
                .acquire_many_owned(kib(size(&id)) as u32)
                .await
                .expect("the budget semaphore is never closed");
            let resident_kib = self.budget_kib - self.semaphore.available_permits() as u64;
            self.counters.peak_resident_kib.fetch_max(resident_kib, Ordering::Relaxed);
            if in_flight.len() >= self.cfg.fetch_concurrency {
                let (id, task) = in_flight.pop_front().expect("non-empty");
                self.settle(id, task, &mut held).await?;
            }
            let this = self.clone();
            in_flight.push_back((id, tokio::spawn(async move { (this.fetch(id).await, permit) })));
        }
        while let Some((id, task)) = in_flight.pop_front() {
            self.settle(id, task, &mut held).await?;
        }
        *cache = held.iter().map(|(id, r)| (*id, Arc::downgrade(r))).collect();
        Ok(held)
    }

    async fn settle(
        &self,
        id: ShardId,
        task: FetchTask,
        held: &mut HashMap<ShardId, Arc<Resident>>,
    ) -> Result<(), LoaderError> {
        let (result, permit) = task.await.expect("a fetch task panicked");
        let c = &self.counters;
        match result {
            Ok(samples) => {
                c.shards_fetched.fetch_add(1, Ordering::Relaxed);
                c.bytes_fetched.fetch_add(self.manifest.videos[id.0].shards[id.1].bytes, Ordering::Relaxed);
                held.insert(id, Arc::new(Resident { samples, _permit: permit }));
            }
            Err(e @ (FetchError::Missing { .. } | FetchError::Corrupt { .. })) if self.cfg.skip_bad => {
                if c.skipped.lock().expect("no panic holds it").insert(id) {
                    tracing::warn!("{e}; its clips are skipped (data.skip_bad)");
                    let counter = if matches!(e, FetchError::Missing { .. }) {
                        &c.shards_skipped_missing
                    } else {
                        &c.shards_skipped_corrupt
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
            }
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Windows from `from` to the end of epoch `until - 1` (or forever), in order.
    async fn fetch_loop(
        self: Arc<Self>,
        from: Cursor,
        until: Option<u64>,
        tx: tokio::sync::mpsc::Sender<Result<Window, LoaderError>>,
    ) {
        let mut cursor = from;
        let mut cache = HashMap::new();
        while until.is_none_or(|u| cursor.epoch < u) {
            let windows = self.sampler.windows(cursor.epoch);
            let epoch_len: usize = windows.iter().map(Vec::len).sum();
            if epoch_len == 0 {
                return;
            }
            let mut start = 0;
            for clips in windows {
                let end = start + clips.len();
                if end > cursor.position {
                    let skip = cursor.position.saturating_sub(start);
                    let clips = clips[skip..].to_vec();
                    let window = match self.fetch_window(&clips, &mut cache).await {
                        Ok(shards) => {
                            Window { epoch: cursor.epoch, epoch_len, first_position: start + skip, clips, shards }
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e)).await;
                            return;
                        }
                    };
                    if tx.send(Ok(window)).await.is_err() {
                        return;
                    }
                }
                start = end;
            }
            cursor = Cursor { epoch: cursor.epoch + 1, position: 0 };
        }
    }

    /// Cuts one clip out of the window's shards: its JPEGs, labels, masks and audio. `None`: a shard it needs
    /// was skipped.
    fn cut(&self, clip: &Clip, window: &Window) -> Result<Option<ClipWork>, LoaderError> {
        let (vi, video) = self.video(&clip.video);
        let n = clip.frames;
        let segment = self.manifest.segment_frames;
        let fps = video.fps;
        let mut work = ClipWork {
            meta: ClipMeta { video: clip.video.clone(), start: clip.start, frames: n, fps, target: clip.target },
            jpegs: vec![None; n],
            shard_of_frame: vec![None; n],
            face_mask: vec![0; n],
            frame_mask: vec![0; n],
            labels: vec![-1; n],
            audio: Vec::new(),
            audio_mask: Vec::new(),
        };
        // The audio of frames start..start + n on the video's sample clock, zero and masked outside it.
        let clock = |frame: i64| (frame as f64 / fps * AUDIO_RATE as f64).round() as i64;
        let (g0, g1) = (clock(clip.start), clock(clip.start + n as i64));
        work.audio = vec![0.0; (g1 - g0) as usize];
        work.audio_mask = vec![0; (g1 - g0) as usize];
        let mut last_segment = None;
        for frame in clip.frame_range() {
            let p = (frame as i64 - clip.start) as usize;
            let si = Self::shard_of(video, frame).ok_or_else(|| LoaderError::ShardLayout {
                shard: format!("(video {})", video.name),
                reason: format!("no shard holds frame {frame}"),
            })?;
            let Some(resident) = window.shards.get(&(vi, si)) else { return Ok(None) };
            let record = &video.shards[si];
            let local = frame - record.first_frame;
            let (seg, offset) = (local / segment, local % segment);
            let sample = resident.samples.get(seg).filter(|s| offset < s.labels.len()).ok_or_else(|| {
                LoaderError::ShardLayout {
                    shard: record.key.clone(),
                    reason: format!(
                        "{} samples; frame {frame} of {} should be frame {offset} of sample {seg}",
                        resident.samples.len(),
                        video.name
                    ),
                }
            })?;
            // Copied: a job must not keep the shard's buffer alive after the window releases it.
            work.jpegs[p] = Some(sample.faces[offset].to_vec());
            work.shard_of_frame[p] = Some(si);
            work.labels[p] = sample.labels[offset];
            work.face_mask[p] = 1 - sample.face_missing.get(offset).copied().unwrap_or(0).min(1);
            work.frame_mask[p] = 1;
            if last_segment != Some((si, seg)) {
                last_segment = Some((si, seg));
                let a0 = audio_samples(record.first_frame + seg * segment, fps).min(video.audio_samples) as i64;
                let lo = (g0 - a0).max(0) as usize;
                let hi = ((g1 - a0).max(0) as usize).min(sample.audio_len());
                for (k, x) in sample.audio().enumerate().take(hi).skip(lo) {
                    let g = (a0 + k as i64 - g0) as usize;
                    work.audio[g] = x;
                    work.audio_mask[g] = video.has_audio as u8;
                }
            }
        }
        Ok(Some(work))
    }

    /// Turns the window channel into clip jobs, numbered in order.
    fn assemble(
        &self,
        mut windows: tokio::sync::mpsc::Receiver<Result<Window, LoaderError>>,
        jobs: crossbeam_channel::Sender<Job>,
    ) {
        let mut seq = 0;
        while let Some(window) = windows.blocking_recv() {
            let window = match window {
                Ok(w) => w,
                Err(e) => {
                    let cursor = Cursor { epoch: 0, position: 0 };
                    let _ = jobs.send(Job { seq, cursor, epoch_end: true, work: Err(e) });
                    return;
                }
            };
            for (i, clip) in window.clips.iter().enumerate() {
                let position = window.first_position + i + 1;
                let work = self.cut(clip, &window).map(|w| w.map(|w| (w, self.clip_seed(window.epoch, position))));
                let job = Job {
                    seq,
                    cursor: Cursor { epoch: window.epoch, position },
                    epoch_end: position == window.epoch_len,
                    work,
                };
                let failed = job.work.is_err();
                if jobs.send(job).is_err() || failed {
                    return;
                }
                seq += 1;
            }
        }
    }

    fn clip_seed(&self, epoch: u64, position: usize) -> u64 {
        let mut rng = ChaCha8Rng::seed_from_u64(self.sampler.config().seed ^ 0x5eed_a065_0000_0000);
        rng.set_stream((self.sampler.rank() as u64) << 48 ^ epoch << 32 ^ position as u64);
        rng.random()
    }

    fn decode_loop(&self, jobs: crossbeam_channel::Receiver<Job>, done: crossbeam_channel::Sender<Done>) {
        let mut resizer = Resizer::new();
        while let Ok(job) = jobs.recv() {
            let result = match job.work {
                Ok(Some((work, seed))) => match self.decode(work, seed, &mut resizer) {
                    Ok(clip) => Ok(Some(clip)),
                    Err(e) if self.cfg.skip_bad => {
                        tracing::warn!("{e}; the clip is skipped (data.skip_bad)");
                        self.counters.clips_skipped.fetch_add(1, Ordering::Relaxed);
                        Ok(None)
                    }
                    Err(e) => Err(e),
                },
                Ok(None) => {
                    self.counters.clips_skipped.fetch_add(1, Ordering::Relaxed);
                    Ok(None)
                }
                Err(e) => Err(e),
            };
            if done.send(Done { seq: job.seq, cursor: job.cursor, epoch_end: job.epoch_end, result }).is_err() {
                return;
            }
        }
    }

    fn decode(&self, work: ClipWork, seed: u64, resizer: &mut Resizer) -> Result<DecodedClip, LoaderError> {
        let size = self.image_size;
        let plane = 3 * size * size;
        let mut faces = vec![0u8; work.jpegs.len() * plane];
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let aug = self.cfg.augment.as_ref().map(|a| Augmentation::draw(a, &mut rng));
        for (p, jpeg) in work.jpegs.iter().enumerate() {
            let Some(jpeg) = jpeg else { continue };
            let frame = (work.meta.start + p as i64) as usize;
            let bad = |reason: String| {
                let (_, video) = self.video(&work.meta.video);
                LoaderError::BadFrame {
                    shard: video.shards[work.shard_of_frame[p].expect("a real frame")].key.clone(),
                    video: work.meta.video.clone(),
                    frame,
                    reason,
                }
            };
            let image = image::load_from_memory_with_format(jpeg, image::ImageFormat::Jpeg)
                .map_err(|e| bad(e.to_string()))?
                .into_rgb8();
            let out = &mut faces[p * plane..(p + 1) * plane];
            match &aug {
                Some(aug) => aug.apply(&image, size as u32, resizer, out),
                None if image.dimensions() == (size as u32, size as u32) => to_chw(&image, false, None, out),
                None => {
                    let mut resized = RgbImage::new(size as u32, size as u32);
                    resizer.resize(&image, &mut resized, &bilinear()).expect("same pixel type");
                    to_chw(&resized, false, None, out)
                }
            }
        }
        self.counters.clips.fetch_add(1, Ordering::Relaxed);
        Ok(DecodedClip {
            meta: work.meta,
            faces,
            face_mask: work.face_mask,
            frame_mask: work.frame_mask,
            labels: work.labels,
            audio: work.audio,
            audio_mask: work.audio_mask,
        })
    }

    /// Puts decoded clips back in order and batches them.
    fn collect(
        &self,
        done: crossbeam_channel::Receiver<Done>,
        batches: crossbeam_channel::Sender<Result<Batch, LoaderError>>,
    ) {
        let mut pending = BTreeMap::new();
        let mut next = 0;
        let mut clips = Vec::with_capacity(self.cfg.batch_size);
        let frames = self.sampler.config().frames_per_clip;
        while let Ok(d) = done.recv() {
            pending.insert(d.seq, d);
            while let Some(d) = pending.remove(&next) {
                next += 1;
                match d.result {
                    Err(e) => {
                        let _ = batches.send(Err(e));
                        return;
                    }
                    Ok(Some(clip)) => clips.push(clip),
                    Ok(None) => {}
                }
                if clips.len() == self.cfg.batch_size || d.epoch_end && !clips.is_empty() {
                    let batch = Batch::from_clips(std::mem::take(&mut clips), d.cursor, frames, self.image_size);
                    self.counters.batches.fetch_add(1, Ordering::Relaxed);
                    if batches.send(Ok(batch)).is_err() {
                        return;
                    }
                }
            }
        }
    }
}

struct ClipWork {
    meta: ClipMeta,
    jpegs: Vec<Option<Vec<u8>>>,
    shard_of_frame: Vec<Option<usize>>,
    face_mask: Vec<u8>,
    frame_mask: Vec<u8>,
    labels: Vec<i8>,
    audio: Vec<f32>,
    audio_mask: Vec<u8>,
}

struct Job {
    seq: u64,
    /// After this clip.
    cursor: Cursor,
    epoch_end: bool,
    /// The clip and its augmentation seed; `None`: skipped.
    work: Result<Option<(ClipWork, u64)>, LoaderError>,
}

struct DecodedClip {
    meta: ClipMeta,
    faces: Vec<u8>,
    face_mask: Vec<u8>,
    frame_mask: Vec<u8>,
    labels: Vec<i8>,
    audio: Vec<f32>,
    audio_mask: Vec<u8>,
}

struct Done {
    seq: u64,
    cursor: Cursor,
    epoch_end: bool,
    result: Result<Option<DecodedClip>, LoaderError>,
}

/// A running loader: an iterator of batches.
pub struct Loader {
    batches: crossbeam_channel::Receiver<Result<Batch, LoaderError>>,
    shared: Arc<Shared>,
    panics: Panics,
}

/// The names of the loader's threads that panicked. A panicking thread drops its channel ends like a thread
/// that finished, so without this the stream would just end early: an evaluation would score part of a split.
#[derive(Clone, Default)]
struct Panics(Arc<std::sync::Mutex<Vec<String>>>, Arc<std::sync::Mutex<Vec<std::thread::JoinHandle<()>>>>);

/// Records its thread's name in [`Panics`] when dropped by a panic's unwinding.
struct PanicGuard {
    thread: String,
    panics: Panics,
}

impl Drop for PanicGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.panics.0.lock().unwrap_or_else(|e| e.into_inner()).push(self.thread.clone());
        }
    }
}

impl Panics {
    fn spawn(&self, name: String, f: Box<dyn FnOnce() + Send>) {
        let guard = PanicGuard { thread: name.clone(), panics: self.clone() };
        let handle = std::thread::Builder::new()
            .name(name)
            .spawn(move || {
                let _guard = guard;
                f()
            })
            .expect("spawning a loader thread");
        self.1.lock().unwrap_or_else(|e| e.into_inner()).push(handle);
    }

    /// The next item of a stream fed by these threads: at the stream's end, an error if one of them panicked.
    fn receive<T>(
        &self,
        items: &crossbeam_channel::Receiver<Result<T, LoaderError>>,
    ) -> Option<Result<T, LoaderError>> {
        match items.recv() {
            Ok(item) => Some(item),
            Err(_) => {
                // Every sender is gone. A panicking thread drops its sender while unwinding, before its guard
                // records the panic: the threads that ended are joined first, so that the record is complete.
                let ended: Vec<_> = {
                    let mut handles = self.1.lock().unwrap_or_else(|e| e.into_inner());
                    let (done, running): (Vec<_>, Vec<_>) = handles.drain(..).partition(|h| h.is_finished());
                    *handles = running;
                    done
                };
                for h in ended {
                    let _ = h.join();
                }
                // A thread still unwinding: give it a moment to finish.
                let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
                while self.0.lock().unwrap_or_else(|e| e.into_inner()).is_empty()
                    && self.1.lock().unwrap_or_else(|e| e.into_inner()).iter().any(|h| !h.is_finished())
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(std::time::Duration::from_millis(5));
                }
                // The first thread that panicked, reported once; the stream then ends.
                let thread = self.0.lock().unwrap_or_else(|e| e.into_inner()).drain(..).next()?;
                Some(Err(LoaderError::ThreadPanicked { thread }))
            }
        }
    }
}

impl Loader {
    /// Starts streaming `sampler`'s clips from `from` to the end of epoch `until - 1` (`None`: without end).
    pub fn start(
        source: Source,
        manifest: Arc<Manifest>,
        sampler: RankSampler,
        cfg: &LoaderConfig,
        from: Cursor,
        until: Option<u64>,
    ) -> Result<Loader, LoaderError> {
        cfg.validate()?;
        let image_size = if cfg.image_size == 0 { manifest.face_size } else { cfg.image_size } as usize;
        let video_index = manifest.videos.iter().enumerate().map(|(i, v)| (v.name.clone(), i)).collect();
        let budget_kib = cfg.prefetch_bytes / 1024;
        let shared = Arc::new(Shared {
            manifest,
            video_index,
            sampler,
            cfg: cfg.clone(),
            image_size,
            source,
            budget_kib,
            semaphore: Arc::new(Semaphore::new(budget_kib as usize)),
            counters: Counters::default(),
        });
        // Fail before any thread starts when the first epoch's windows cannot fit the budget.
        for clips in shared.sampler.windows(from.epoch) {
            shared.needed_within_budget(&clips)?;
        }

        let (window_tx, window_rx) = tokio::sync::mpsc::channel(1);
        let (job_tx, job_rx) = crossbeam_channel::bounded(4 * cfg.decode_threads);
        let (done_tx, done_rx) = crossbeam_channel::bounded(4 * cfg.decode_threads);
        let (batch_tx, batch_rx) = crossbeam_channel::bounded(cfg.ready_batches);
        let panics = Panics::default();
        let spawn = |name: String, f: Box<dyn FnOnce() + Send>| panics.spawn(name, f);
        let s = shared.clone();
        spawn(
            "loader-fetch".into(),
            Box::new(move || {
                let rt = tokio::runtime::Builder::new_multi_thread()
                    .worker_threads(2)
                    .thread_name("loader-io")
                    .enable_all()
                    .build()
                    .expect("tokio runtime");
                rt.block_on(s.fetch_loop(from, until, window_tx));
            }),
        );
        let s = shared.clone();
        spawn("loader-assemble".into(), Box::new(move || s.assemble(window_rx, job_tx)));
        for i in 0..cfg.decode_threads {
            let (s, jobs, done) = (shared.clone(), job_rx.clone(), done_tx.clone());
            spawn(format!("loader-decode-{i}"), Box::new(move || s.decode_loop(jobs, done)));
        }
        drop(done_tx);
        let s = shared.clone();
        spawn("loader-collect".into(), Box::new(move || s.collect(done_rx, batch_tx)));
        Ok(Loader { batches: batch_rx, shared, panics })
    }

    pub fn stats(&self) -> LoaderStats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        LoaderStats {
            shards_fetched: get(&c.shards_fetched),
            bytes_fetched: get(&c.bytes_fetched),
            shards_skipped_missing: get(&c.shards_skipped_missing),
            shards_skipped_corrupt: get(&c.shards_skipped_corrupt),
            clips: get(&c.clips),
            clips_skipped: get(&c.clips_skipped),
            batches: get(&c.batches),
            peak_resident_bytes: get(&c.peak_resident_kib) * 1024,
            wait_seconds: get(&c.wait_nanos) as f64 / 1e9,
        }
    }

    /// Clips per epoch on this rank.
    pub fn epoch_len(&self) -> usize {
        self.shared.sampler.len()
    }
}

impl Iterator for Loader {
    type Item = Result<Batch, LoaderError>;

    fn next(&mut self) -> Option<Self::Item> {
        let t = Instant::now();
        let batch = self.panics.receive(&self.batches);
        self.shared.counters.wait_nanos.fetch_add(t.elapsed().as_nanos() as u64, Ordering::Relaxed);
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A feeding thread that panics mid-stream ends the stream with an error naming it, not with a quiet end
    /// that looks like the end of the data; a thread that finishes ends it quietly.
    #[test]
    fn a_panicking_loader_thread_ends_the_stream_with_an_error() {
        let panics = Panics::default();
        let (tx, rx) = crossbeam_channel::bounded::<Result<u32, LoaderError>>(4);
        panics.spawn(
            "loader-test".into(),
            Box::new(move || {
                tx.send(Ok(1)).unwrap();
                let shard: Vec<u8> = Vec::new();
                // As a bug on hostile data would: an index past the end.
                let _ = shard[std::hint::black_box(3)];
            }),
        );
        assert!(matches!(panics.receive(&rx), Some(Ok(1))));
        match panics.receive(&rx) {
            Some(Err(LoaderError::ThreadPanicked { thread })) => assert_eq!(thread, "loader-test"),
            other => panic!("expected the panic to be reported, got {other:?}"),
        }
        assert!(panics.receive(&rx).is_none(), "reported once, then the end");

        let (tx, rx) = crossbeam_channel::bounded::<Result<u32, LoaderError>>(4);
        panics.spawn("loader-done".into(), Box::new(move || tx.send(Ok(2)).unwrap()));
        assert!(matches!(panics.receive(&rx), Some(Ok(2))));
        assert!(panics.receive(&rx).is_none());
    }
}
