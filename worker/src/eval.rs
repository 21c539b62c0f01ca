//! Dense evaluation: a prediction for every frame of a split, each from the window that has the frame at its
//! target position (the last frame for the paper's causal head), the videos sharded across ranks; the
//! confusion matrices are summed over ranks, so every rank ends with the split's macro F1. Used by training's
//! validation, `worker predict`, and `worker evaluate` ([`evaluate_to`]: table, eval.json, confusion.png).

use std::collections::HashMap;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};
use avexpr_data::layout::Split;
use avexpr_data::loader::{Batch, Loader, LoaderConfig, Source};
use avexpr_data::metric::Confusion;
use avexpr_data::sampler::{Cursor, RankSampler, SamplerConfig};
use avexpr_model::expr::ImageView;
use avexpr_model::{ExprModel, FeatureBatch};

use crate::dist::Dist;
use crate::job::JobConfig;
use crate::session::{Session, raw_batch};

/// One frame's prediction.
#[derive(Debug, Clone, PartialEq)]
pub struct FramePrediction {
    pub video: String,
    pub frame: usize,
    pub class: u8,
}

pub struct Evaluation {
    /// Summed over all ranks.
    pub confusion: Confusion,
    /// This rank's frames only.
    pub predictions: Vec<FramePrediction>,
    /// This rank's logits, `[predictions.len(), 8]` on the CPU (f32).
    pub logits: tch::Tensor,
    /// Summed over all ranks.
    pub stats: EvalStats,
}

/// How a dense pass encodes the faces of its windows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum FaceEncoding {
    /// Each face once per video, every window's image embeddings assembled from them (the default).
    #[default]
    PerFrame,
    /// Each window's faces through the image encoder, as training encodes a clip (every face once per window
    /// it is in: `frames_per_clip` times). The reference the per-frame path is tested against.
    PerWindow,
}

/// What a dense pass did, counted (summed over ranks): passes per frame and where the time went.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct EvalStats {
    /// Frames predicted.
    pub frames: u64,
    /// Face crops through the image encoder.
    pub image_passes: u64,
    /// Audio windows through Wav2Vec 2.0 (one per predicted frame: each window's own audio).
    pub audio_passes: u64,
    /// Seconds (summed over ranks; CUDA synchronised before each reading): waiting for the loader, image
    /// encoder, audio encoder, trainable head.
    pub data_s: f64,
    pub image_s: f64,
    pub audio_s: f64,
    pub head_s: f64,
    /// Wall seconds of the pass (the slowest rank's).
    pub wall_s: f64,
}

impl EvalStats {
    /// `encoder passes per frame: image X, audio Y` and the time per 1,000 frames, for logs.
    pub fn report(&self) -> String {
        let per_frame = |n: u64| n as f64 / self.frames.max(1) as f64;
        let ms = |s: f64| 1e3 * s / self.frames.max(1) as f64;
        format!(
            "encoder passes per frame: image {:.2}, audio {:.2} ({} frames, {} faces encoded, {} audio windows); \
             {:.1} s wall per 1,000 frames; per frame (summed over ranks): data wait {:.2} ms, image encoder \
             {:.2} ms, audio encoder {:.2} ms, head {:.2} ms",
            per_frame(self.image_passes),
            per_frame(self.audio_passes),
            self.frames,
            self.image_passes,
            self.audio_passes,
            1e3 * self.wall_s / self.frames.max(1) as f64,
            ms(self.data_s),
            ms(self.image_s),
            ms(self.audio_s),
            ms(self.head_s),
        )
    }

    fn all_reduce(&mut self, dist: &Dist) {
        let mut sums = [
            self.frames as f64,
            self.image_passes as f64,
            self.audio_passes as f64,
            self.data_s,
            self.image_s,
            self.audio_s,
            self.head_s,
        ];
        dist.all_reduce_sum_f64(&mut sums);
        let [frames, image, audio, data, image_s, audio_s, head] = sums;
        (self.frames, self.image_passes, self.audio_passes) = (frames as u64, image as u64, audio as u64);
        (self.data_s, self.image_s, self.audio_s, self.head_s) = (data, image_s, audio_s, head);
        // The pass ends with its slowest rank.
        let mut walls = [self.wall_s];
        dist.all_reduce_max_f64(&mut walls);
        self.wall_s = walls[0];
    }
}

/// The per-frame image embeddings of the frames that the next windows may still need: a dense pass goes
/// through each video's windows in frame order, so a frame's embedding is computed when the first window
/// reaches it and dropped once the windows have moved past it. A hit is checked against the frame's pixels
/// (a window always sees the same crop of a frame; if it did not, the frame would be encoded again), so the
/// result is exactly the per-window one whatever the order.
struct FaceBank {
    /// `[rows, image_dim]` on the model's device.
    rows: Option<tch::Tensor>,
    /// (video, frame), or ("", `None`) for padding outside a video -> (row, the crop's pixels).
    index: HashMap<(String, Option<i64>), (i64, Vec<u8>)>,
}

impl FaceBank {
    fn new() -> Self {
        FaceBank { rows: None, index: HashMap::new() }
    }

    /// The batch's image embeddings `[clips, frames, image_dim]`, encoding only the crops not in the bank;
    /// returns them and the number of crops encoded.
    fn embed(
        &mut self,
        model: &ExprModel,
        batch: &Batch,
        frames: &tch::Tensor,
        views: &[ImageView],
    ) -> (tch::Tensor, u64) {
        let (n, f) = (batch.len(), batch.frames);
        let crop = 3 * batch.image_size * batch.image_size;
        let pixels = |i: usize| &batch.faces[i * crop..(i + 1) * crop];
        let known = self.rows.as_ref().map_or(0, |r| r.size()[0]);
        let mut new: Vec<i64> = Vec::new();
        let mut rows = Vec::with_capacity(n * f);
        for (c, clip) in batch.clips.iter().enumerate() {
            for j in 0..f {
                let i = c * f + j;
                let frame = clip.start + j as i64;
                // Padding outside the video is one crop for every video.
                let key = match batch.frame_mask[i] != 0 {
                    true => (clip.video.clone(), Some(frame)),
                    false => (String::new(), None),
                };
                let row = match self.index.get(&key) {
                    Some((row, seen)) if seen.as_slice() == pixels(i) => *row,
                    _ => {
                        let row = known + new.len() as i64;
                        new.push(i as i64);
                        self.index.insert(key, (row, pixels(i).to_vec()));
                        row
                    }
                };
                rows.push(row);
            }
        }
        if !new.is_empty() {
            let size = frames.size();
            let flat = frames.view([-1, size[2], size[3], size[4]]);
            let encoded = model.encode_image_views(&flat.index_select(0, &tch::Tensor::from_slice(&new)), views);
            self.rows = Some(match self.rows.take() {
                Some(old) => tch::Tensor::cat(&[old, encoded], 0),
                None => encoded,
            });
        }
        let bank = self.rows.as_ref().expect("rows exist once a frame was seen");
        let idx = tch::Tensor::from_slice(&rows).to_device(bank.device());
        let embeds = bank.index_select(0, &idx).view([n as i64, f as i64, -1]);
        // Keep what the windows after this batch can reach: the last clip's video from its first frame on
        // (windows come in frame order), and the padding crop.
        if let Some(last) = batch.clips.last() {
            self.index.retain(|(video, frame), _| frame.is_none_or(|fr| *video == last.video && fr >= last.start));
            let mut keep: Vec<&mut (i64, Vec<u8>)> = self.index.values_mut().collect();
            keep.sort_by_key(|(row, _)| *row);
            let old_rows: Vec<i64> = keep.iter().map(|(row, _)| *row).collect();
            for (new_row, (row, _)) in keep.into_iter().enumerate() {
                *row = new_row as i64;
            }
            let idx = tch::Tensor::from_slice(&old_rows).to_device(bank.device());
            self.rows = Some(bank.index_select(0, &idx));
        }
        (embeds, (new.len() * (1 + views.len())) as u64)
    }
}

/// Per-frame image embeddings read from the feature cache (`data.features`: `frames/<video>.safetensors`,
/// written by `worker extract`): no face goes through the image encoder.
struct CachedFaces {
    cache: crate::features::Cache,
    /// The videos of the last batch: `[frames + 1, dim]` on the device, the last row the padding crop's.
    loaded: HashMap<String, tch::Tensor>,
    device: tch::Device,
}

impl CachedFaces {
    /// The job's committed cache when it holds per-frame embeddings; `None` (and why, logged) when the job has
    /// no cache, or its cache is not committed, made with other settings, or older than per-frame embeddings.
    fn open(session: &Session) -> Option<CachedFaces> {
        session.job.data.features.as_ref()?;
        let why = match crate::features::open_cache(session.job, &session.manifest_bytes) {
            Ok(cache) if !cache.manifest.frames.is_empty() => {
                return Some(CachedFaces { cache, loaded: HashMap::new(), device: session.device });
            }
            Ok(_) => "it holds no per-frame embeddings (extracted by an older version; `worker extract` into an \
                      empty data.features.uri adds them)"
                .to_string(),
            Err(e) => format!("{e:#}"),
        };
        if session.dist.rank == 0 {
            tracing::warn!("evaluation encodes faces instead of reading the feature cache: {why}");
        }
        None
    }

    fn video(&mut self, name: &str) -> Result<&tch::Tensor> {
        if !self.loaded.contains_key(name) {
            let (image, padding) = self.cache.frames(name)?;
            self.loaded.insert(name.to_string(), tch::Tensor::cat(&[image, padding], 0).to_device(self.device));
        }
        Ok(&self.loaded[name])
    }

    /// The batch's image embeddings `[clips, frames, dim]`.
    fn embed(&mut self, batch: &Batch) -> Result<tch::Tensor> {
        let (f, device) = (batch.frames, self.device);
        self.loaded.retain(|video, _| batch.clips.iter().any(|c| &c.video == video));
        let mut clips = Vec::with_capacity(batch.len());
        for (c, clip) in batch.clips.iter().enumerate() {
            let video = self.video(&clip.video)?;
            let padding = video.size()[0] - 1;
            let rows: Vec<i64> = (0..f)
                .map(|j| if batch.frame_mask[c * f + j] != 0 { clip.start + j as i64 } else { padding })
                .collect();
            clips.push(video.index_select(0, &tch::Tensor::from_slice(&rows).to_device(device)));
        }
        Ok(tch::Tensor::stack(&clips, 0))
    }
}

/// Predicts every frame of `split` on this rank's share of the videos, from a dense sliding window with the
/// job's clip settings and no augmentation; the head under bf16 autocast when the session's mixed precision
/// is on. Each face goes through the image encoder once ([`FaceEncoding::PerFrame`]).
pub fn evaluate(session: &Session, model: &ExprModel, split: Split) -> Result<Evaluation> {
    evaluate_with(session, model, split, &FaceOptions::default())
}

/// How a dense pass treats the faces: how they are encoded, and the test-time views averaged with each.
#[derive(Debug, Clone, Default)]
pub struct FaceOptions {
    pub encoding: FaceEncoding,
    /// Each face's embedding is the mean over the crop and these views of it (`--tta flip,zoom`).
    pub views: Vec<ImageView>,
}

/// [`evaluate`], with the face encoding and test-time views chosen.
pub fn evaluate_with(session: &Session, model: &ExprModel, split: Split, options: &FaceOptions) -> Result<Evaluation> {
    let (faces, views) = (options.encoding, options.views.as_slice());
    let (job, dist, manifest) = (session.job, session.dist, &session.manifest);
    let started = Instant::now();
    let cfg = SamplerConfig { dense: true, class_balanced: false, ..job.sampler() };
    let offset = cfg.target_offset() as i64;
    let loader_cfg = LoaderConfig { augment: None, ..job.loader() };
    let rank_sampler = RankSampler::new(manifest, split, dist.rank, dist.world_size, &cfg, None)?;
    let mut confusion = Confusion::default();
    let mut predictions = Vec::with_capacity(rank_sampler.len());
    let mut logits_all = Vec::new();
    let mut stats = EvalStats::default();
    let device = session.device;
    let timed = |seconds: &mut f64, t: Instant| {
        if let tch::Device::Cuda(i) = device {
            tch::Cuda::synchronize(i as i64);
        }
        *seconds += t.elapsed().as_secs_f64();
    };
    if !rank_sampler.is_empty() {
        let rank_sampler_len = rank_sampler.len() as u64;
        let mut stream = Loader::start(
            Source::Store(session.store.clone()),
            manifest.clone(),
            rank_sampler,
            &loader_cfg,
            Cursor::default(),
            Some(1),
        )?;
        let progress =
            avexpr_data::progress::Progress::new(&format!("{split:?}").to_lowercase(), "frames", rank_sampler_len);
        let mut bank = FaceBank::new();
        // The cache holds each crop's embedding, not its views'.
        let mut cached = match (faces, views.is_empty()) {
            (FaceEncoding::PerFrame, true) => CachedFaces::open(session),
            _ => None,
        };
        loop {
            let t = Instant::now();
            let Some(batch) = stream.next() else { break };
            timed(&mut stats.data_s, t);
            let batch = batch.context("evaluation data")?;
            progress.inc(batch.len() as u64);
            crate::heartbeat::update(|h| h.phase = "evaluating".into());
            let (raw, _) = raw_batch(&batch);
            let t = Instant::now();
            let image_embeds = tch::no_grad(|| match faces {
                FaceEncoding::PerFrame if cached.is_some() => cached.as_mut().expect("cache").embed(&batch),
                FaceEncoding::PerFrame => {
                    let (embeds, encoded) = bank.embed(model, &batch, &raw.frames, views);
                    stats.image_passes += encoded;
                    Ok(embeds)
                }
                FaceEncoding::PerWindow => {
                    let size = raw.frames.size();
                    stats.image_passes += (size[0] * size[1]) as u64 * (1 + views.len() as u64);
                    let flat = raw.frames.view([size[0] * size[1], size[2], size[3], size[4]]);
                    Ok(model.encode_image_views(&flat, views).view([size[0], size[1], -1]))
                }
            })?;
            timed(&mut stats.image_s, t);
            let t = Instant::now();
            let (audio_states, audio_mask) = tch::no_grad(|| model.encode_audio(&raw.audio, &raw.audio_mask))?;
            stats.audio_passes += batch.len() as u64;
            timed(&mut stats.audio_s, t);
            let feats = FeatureBatch {
                image_embeds,
                face_mask: raw.face_mask.to_device(device),
                audio_states,
                audio_mask,
                fps: raw.fps.clone(),
            };
            let t = Instant::now();
            let logits = tch::no_grad(|| {
                avexpr_model::autocast::bf16(device, session.mixed_precision, || model.forward_t(&feats, false).logits)
            })
            .to_kind(tch::Kind::Float);
            // A per-frame head scores every frame of the window: take the target frame's.
            let logits = if logits.dim() == 3 { logits.select(1, offset) } else { logits };
            let logits = logits.to_device(tch::Device::Cpu);
            timed(&mut stats.head_s, t);
            let classes = Vec::<i64>::try_from(logits.argmax(-1, false))?;
            for (clip, class) in batch.clips.iter().zip(classes) {
                confusion.add(clip.target, class as u8);
                predictions.push(FramePrediction {
                    video: clip.video.clone(),
                    frame: (clip.start + offset) as usize,
                    class: class as u8,
                });
            }
            stats.frames += batch.len() as u64;
            logits_all.push(logits);
        }
        progress.finish();
    }
    let mut counts: Vec<f64> = confusion.counts.iter().flatten().map(|&c| c as f64).collect();
    dist.all_reduce_sum_f64(&mut counts);
    for (i, c) in counts.into_iter().enumerate() {
        confusion.counts[i / avexpr_data::NUM_CLASSES][i % avexpr_data::NUM_CLASSES] = c as u64;
    }
    stats.wall_s = started.elapsed().as_secs_f64();
    stats.all_reduce(dist);
    if dist.rank == 0 && stats.frames > 0 {
        tracing::info!("{:?}: {}", split, stats.report());
    }
    let logits = if logits_all.is_empty() {
        tch::Tensor::zeros([0, avexpr_data::NUM_CLASSES as i64], tch::kind::FLOAT_CPU)
    } else {
        tch::Tensor::cat(&logits_all, 0)
    };
    Ok(Evaluation { confusion, predictions, logits, stats })
}

/// One line for logs.
pub fn summary(confusion: &Confusion) -> String {
    format!(
        "macro F1 {:.4} over {} frames (accuracy {:.4})",
        confusion.macro_f1(),
        confusion.frames(),
        confusion.accuracy()
    )
}

/// Every frame's logits of every video of the pass, on rank 0 (`None` elsewhere): `video -> [frames, 8]`.
pub fn gather_logits(dist: &Dist, eval: &Evaluation) -> Result<Option<std::collections::BTreeMap<String, Vec<f32>>>> {
    // One line per frame: video, frame and the 8 logits (Rust prints an f32 in the fewest digits that read
    // back as the same f32: exact).
    let mut text = String::new();
    let logits = Vec::<f32>::try_from(eval.logits.contiguous().view([-1]))?;
    for (p, row) in eval.predictions.iter().zip(logits.chunks(avexpr_data::NUM_CLASSES)) {
        let values: Vec<String> = row.iter().map(f32::to_string).collect();
        text.push_str(&format!("{}\t{}\t{}\n", p.video, p.frame, values.join(",")));
    }
    let Some(parts) = dist.gather_bytes(text.as_bytes()) else { return Ok(None) };
    let mut frames: std::collections::BTreeMap<String, std::collections::BTreeMap<usize, Vec<f32>>> =
        Default::default();
    for part in parts {
        for line in String::from_utf8(part)?.lines() {
            let mut f = line.split('\t');
            let (video, frame, values) = (f.next(), f.next(), f.next());
            let row = values.context("logits line")?.split(',').map(str::parse).collect::<Result<Vec<f32>, _>>()?;
            let frame: usize = frame.context("logits line")?.parse()?;
            frames.entry(video.context("logits line")?.to_string()).or_default().insert(frame, row);
        }
    }
    frames
        .into_iter()
        .map(|(video, rows)| {
            anyhow::ensure!(
                rows.keys().copied().eq(0..rows.len()),
                "video {video}: the frames predicted are not 0..{}",
                rows.len()
            );
            Ok((video, rows.into_values().flatten().collect()))
        })
        .collect::<Result<_>>()
        .map(Some)
}

/// `worker evaluate`: the class-wise table, `eval.json`, `confusion.png` and every frame's logits
/// (`logits.safetensors`: one `[frames, 8]` f32 tensor per video) of a split, from a checkpoint.
pub fn evaluate_to(
    job: &JobConfig,
    dist: &Dist,
    checkpoint: &str,
    split: Split,
    faces: &FaceOptions,
    out: &Path,
) -> Result<Confusion> {
    let session = Session::open(job, dist)?;
    let (model, checkpoint) = session.load_checkpoint(checkpoint)?;
    let eval = evaluate_with(&session, &model, split, faces)?;
    let logits = gather_logits(dist, &eval)?;
    let c = &eval.confusion;
    if let Some(logits) = logits {
        anyhow::ensure!(c.frames() > 0, "the {split:?} split has no labelled frames to score");
        std::fs::create_dir_all(out).with_context(|| format!("{}", out.display()))?;
        let table = c.render(Some(&session.manifest.class_ratios));
        // Each file replaces a previous evaluation's whole (never left half-written).
        let write = |name: &str, bytes: &[u8]| {
            let path = out.join(name);
            avexpr_data::files::write_atomic(&path, bytes).with_context(|| path.display().to_string())
        };
        write("table.txt", table.as_bytes())?;
        let f1 = c.f1_per_class();
        let report = serde_json::json!({
            "checkpoint": checkpoint,
            "split": split,
            "macro_f1": c.macro_f1(),
            "accuracy": c.accuracy(),
            "frames": c.frames(),
            "f1": avexpr_data::Expression::ALL.iter().zip(f1).map(|(e, f)| (e.name(), f)).collect::<std::collections::BTreeMap<_, _>>(),
            "classes": avexpr_data::Expression::ALL.map(|e| e.name()),
            "confusion": c.counts,
        });
        write("eval.json", serde_json::to_string_pretty(&report)?.as_bytes())?;
        let tensors: Vec<(String, tch::Tensor)> = logits
            .into_iter()
            .map(|(video, values)| {
                (video, tch::Tensor::from_slice(&values).view([-1, avexpr_data::NUM_CLASSES as i64]))
            })
            .collect();
        avexpr_data::files::replace_with(&out.join("logits.safetensors"), |tmp| {
            tch::Tensor::write_safetensors(&tensors, tmp).map_err(anyhow::Error::from)
        })?;
        avexpr_data::files::replace_with(&out.join("confusion.png"), |tmp| {
            crate::plots::confusion_png(tmp, c, &format!("{split:?}, {checkpoint}: {}", summary(c)))
        })?;
        print!("{table}");
        println!("{}", eval.stats.report());
        println!("wrote {}/{{table.txt,eval.json,confusion.png,logits.safetensors}}", out.display());
    }
    Ok(eval.confusion)
}
