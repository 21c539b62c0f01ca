//! `data synth`: a small, seeded look-alike of Aff-Wild2 in the real layout, for tests and the quickstart.
//!
//! Each video shows a drawn face (two faces for the one `_left`/`_right` video) whose expression follows a
//! track of class segments drawn with the Aff-Wild2 training ratios (after two segments of every class in
//! training, and `val_segments_per_class` of every class in validation, so that every class can be learned and
//! scored). Each class has a visual signature (mouth curve and opening, brows, eyes) and an audio signature
//! (pitch, pitch contour, rhythm, timbre); face position, scale, lighting and noise vary, and the face moves
//! smoothly between expressions. Anger and Disgust look the same and differ only in the audio; Fear/Surprise
//! and Happiness/Other sound the same and differ only in the video: a model needs both modalities to separate
//! all eight.
//!
//! Written: H.264 + AAC mp4 (ffmpeg CLI) at 25 or 30 fps in `videos/batch1|2/`, 112x112 JPEG crops with gaps in
//! `cropped_aligned/`, annotation files with header, -1 runs and two label/frame count mismatches, and the
//! test-set name list.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use image::{Rgb, RgbImage};
use imageproc::drawing::{draw_filled_ellipse_mut, draw_line_segment_mut};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::affwild2::{Expression, NUM_CLASSES, PAPER_TRAIN_RATIOS};
use crate::decode::AUDIO_RATE;
use crate::layout::Split;

#[derive(Debug, Clone, PartialEq)]
pub struct SynthConfig {
    pub videos: usize,
    pub min_seconds: f64,
    pub max_seconds: f64,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// The validation split's class tracks start with this many segments of every class (in shuffled rounds,
    /// as far as the split's frames allow) before drawing with the training ratios, so every class can be
    /// scored; 0: validation draws with the training ratios only (rare classes may be absent).
    pub val_segments_per_class: usize,
}

impl Default for SynthConfig {
    fn default() -> Self {
        Self {
            videos: 24,
            min_seconds: 3.0,
            max_seconds: 6.0,
            seed: 7,
            width: 160,
            height: 120,
            val_segments_per_class: 3,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SynthError {
    #[error("{path}: {reason}")]
    Write { path: PathBuf, reason: String },
    #[error("invalid synth settings: {0}")]
    Settings(String),
}

/// One written video entry (a person: the two-person video gives two).
#[derive(Debug, Clone, PartialEq)]
pub struct SynthVideo {
    pub name: String,
    pub split: Split,
    pub frames: usize,
    pub fps: u32,
    /// Label lines written (differs from `frames` in the mismatch cases); empty for test videos.
    pub labels: Vec<i8>,
    /// Frames (from 1) whose crop was left out.
    pub missing_crops: Vec<u32>,
}

/// Mouth curve (+ smile), mouth opening, brow height (+ raised), eye opening.
const FACES: [[f64; 4]; NUM_CLASSES] = [
    [0.0, 0.1, 0.0, 0.5],     // Neutral
    [-0.5, 0.15, -0.9, 0.35], // Anger
    [-0.5, 0.15, -0.9, 0.35], // Disgust: looks like Anger
    [-0.3, 0.6, 0.9, 0.95],   // Fear
    [0.9, 0.35, 0.2, 0.45],   // Happiness
    [-0.8, 0.05, 0.5, 0.25],  // Sadness
    [0.0, 0.95, 1.0, 1.0],    // Surprise
    [0.35, 0.2, -0.3, 0.6],   // Other
];

/// Base pitch (Hz), pitch slope (Hz/s), rhythm (Hz of amplitude modulation, 0 = steady), odd-harmonic weight.
const VOICES: [[f64; 4]; NUM_CLASSES] = [
    [150.0, 0.0, 0.0, 0.1],   // Neutral
    [220.0, 0.0, 6.0, 0.8],   // Anger
    [120.0, -10.0, 2.0, 0.9], // Disgust
    [310.0, 0.0, 8.0, 0.2],   // Fear
    [250.0, 60.0, 4.0, 0.3],  // Happiness
    [110.0, -25.0, 0.0, 0.2], // Sadness
    [310.0, 0.0, 8.0, 0.2],   // Surprise: sounds like Fear
    [250.0, 60.0, 4.0, 0.3],  // Other: sounds like Happiness
];

/// Segments of every class the training split starts with: the rarest Aff-Wild2 classes (Fear 1.65 %, Disgust
/// 2.04 %) would otherwise get one short segment or none in a small look-alike; two keep them near their ratio.
const TRAIN_SEGMENTS_PER_CLASS: usize = 2;

/// `n` rounds of all eight classes, each round in its own order, to be popped from the end.
fn rounds(n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    let mut classes = Vec::with_capacity(n * NUM_CLASSES);
    for _ in 0..n {
        let mut round: Vec<usize> = (0..NUM_CLASSES).collect();
        round.shuffle(rng);
        classes.extend(round);
    }
    classes
}

/// A person's class per frame: segments of 0.8-2 s, classes drawn with the training ratios, except that the
/// classes in `pending` are used first (so the training split sees every class, and the validation split
/// every class several times).
fn class_track(rng: &mut ChaCha8Rng, frames: usize, fps: f64, pending: &mut Vec<usize>) -> Vec<usize> {
    let total: f64 = PAPER_TRAIN_RATIOS.iter().sum();
    let mut track = Vec::with_capacity(frames);
    while track.len() < frames {
        let class = pending.pop().unwrap_or_else(|| {
            let mut x = rng.random::<f64>() * total;
            PAPER_TRAIN_RATIOS
                .iter()
                .position(|&r| {
                    x -= r;
                    x < 0.0
                })
                .unwrap_or(NUM_CLASSES - 1)
        });
        let length = ((0.8 + 1.2 * rng.random::<f64>()) * fps) as usize;
        track.extend(std::iter::repeat_n(class, length.max(1)));
    }
    track.truncate(frames);
    track
}

struct Person {
    track: Vec<usize>,
    centre: (f64, f64),
    radius: f64,
    skin: [f64; 3],
}

fn draw_face(img: &mut RgbImage, p: &Person, style: [f64; 4], light: f64) {
    let (cx, cy, r) = (p.centre.0 as f32, p.centre.1 as f32, p.radius as f32);
    let shade = |c: [f64; 3], k: f64| Rgb(c.map(|v| (v * k + light).clamp(0.0, 255.0) as u8));
    draw_filled_ellipse_mut(img, (cx as i32, cy as i32), (r * 0.8) as i32, r as i32, shade(p.skin, 1.0));
    let [curve, open, brow, eye] = style.map(|v| v as f32);
    for side in [-1.0f32, 1.0] {
        let (ex, ey) = (cx + side * r * 0.33, cy - r * 0.25);
        draw_filled_ellipse_mut(
            img,
            (ex as i32, ey as i32),
            (r * 0.14) as i32,
            ((r * 0.12 * eye).max(1.0)) as i32,
            shade([40.0, 30.0, 30.0], 1.0),
        );
        // Brows: raised and level for +, lowered and slanted towards the nose for -.
        let by = ey - r * (0.22 + 0.1 * brow);
        let slant = r * 0.08 * (-brow).max(0.0);
        for t in 0..3 {
            let t = t as f32;
            draw_line_segment_mut(
                img,
                (ex - side * r * 0.2, by - slant + t),
                (ex + side * r * 0.2, by + slant + t),
                shade([60.0, 40.0, 30.0], 1.0),
            );
        }
    }
    // Mouth: corners up for a smile (curve > 0), down for a frown; an ellipse when open.
    let (mx, my, mw) = (cx, cy + r * 0.45, r * 0.35);
    if open > 0.2 {
        draw_filled_ellipse_mut(
            img,
            (mx as i32, my as i32),
            (mw * 0.6) as i32,
            (r * 0.25 * open) as i32,
            shade([90.0, 20.0, 30.0], 1.0),
        );
    }
    let points: Vec<(f32, f32)> = (0..=10)
        .map(|i| {
            let u = i as f32 / 5.0 - 1.0;
            (mx + u * mw, my + curve * r * 0.15 * (1.0 - u * u) - curve * r * 0.05)
        })
        .collect();
    for w in points.windows(2) {
        for t in 0..2 {
            draw_line_segment_mut(
                img,
                (w[0].0, w[0].1 + t as f32),
                (w[1].0, w[1].1 + t as f32),
                shade([120.0, 30.0, 40.0], 1.0),
            );
        }
    }
}

/// 16 kHz mono audio following the (first) person's class track.
fn voice(track: &[usize], fps: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let samples = crate::decode::audio_samples(track.len(), fps);
    let mut phase = 0.0f64;
    let mut segment_start = 0.0;
    let mut previous = usize::MAX;
    (0..samples)
        .map(|i| {
            let t = i as f64 / AUDIO_RATE as f64;
            let class = track[((t * fps) as usize).min(track.len() - 1)];
            if class != previous {
                (previous, segment_start) = (class, t);
            }
            let [pitch, slope, rhythm, odd] = VOICES[class];
            let f = (pitch + slope * (t - segment_start)).max(60.0);
            phase += std::f64::consts::TAU * f / AUDIO_RATE as f64;
            let envelope = if rhythm > 0.0 { 0.55 + 0.45 * (std::f64::consts::TAU * rhythm * t).sin() } else { 1.0 };
            let tone =
                phase.sin() + 0.5 * (2.0 * phase).sin() + odd * (3.0 * phase).sin() + 0.5 * odd * (5.0 * phase).sin();
            (0.15 * envelope * tone + 0.01 * (rng.random::<f64>() - 0.5)) as f32
        })
        .collect()
}

fn write_err(path: &Path, e: impl std::fmt::Display) -> SynthError {
    SynthError::Write { path: path.to_path_buf(), reason: e.to_string() }
}

/// Encodes RGB frames and 16 kHz audio to H.264 + AAC with the ffmpeg CLI (single-threaded: reproducible).
fn encode(path: &Path, frames: &[RgbImage], audio: &[f32], fps: u32) -> Result<(), SynthError> {
    let wav = path.with_extension("wav");
    let spec = hound::WavSpec {
        channels: 1,
        sample_rate: AUDIO_RATE,
        bits_per_sample: 16,
        sample_format: hound::SampleFormat::Int,
    };
    let mut w = hound::WavWriter::create(&wav, spec).map_err(|e| write_err(&wav, e))?;
    for &s in audio {
        w.write_sample((s.clamp(-1.0, 1.0) * 32767.0) as i16).map_err(|e| write_err(&wav, e))?;
    }
    w.finalize().map_err(|e| write_err(&wav, e))?;
    let (width, height) = frames[0].dimensions();
    let mut child = Command::new("ffmpeg")
        .args(["-hide_banner", "-loglevel", "error", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24"])
        .args(["-s", &format!("{width}x{height}"), "-r", &fps.to_string(), "-i", "-", "-i"])
        .arg(&wav)
        .args([
            "-c:v", "libx264", "-preset", "veryfast", "-threads", "1", "-pix_fmt", "yuv420p", "-c:a", "aac", "-b:a",
            "64k",
        ])
        .args(["-map_metadata", "-1", "-fflags", "+bitexact", "-flags:v", "+bitexact", "-flags:a", "+bitexact"])
        .arg(path)
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| write_err(path, format!("cannot run ffmpeg (run scripts/setup): {e}")))?;
    {
        let mut stdin = child.stdin.take().expect("piped");
        for f in frames {
            stdin.write_all(f.as_raw()).map_err(|e| write_err(path, format!("ffmpeg stopped reading frames: {e}")))?;
        }
    }
    let out = child.wait_with_output().map_err(|e| write_err(path, e))?;
    std::fs::remove_file(&wav).map_err(|e| write_err(&wav, e))?;
    if !out.status.success() {
        return Err(write_err(path, format!("ffmpeg failed: {}", String::from_utf8_lossy(&out.stderr))));
    }
    Ok(())
}

fn write_file(path: &Path, content: &str) -> Result<(), SynthError> {
    std::fs::create_dir_all(path.parent().expect("a parent")).map_err(|e| write_err(path, e))?;
    std::fs::write(path, content).map_err(|e| write_err(path, e))
}

/// Writes the dataset under `out`; returns what was written, one entry per annotated person / test video.
pub fn synth(out: &Path, cfg: &SynthConfig) -> Result<Vec<SynthVideo>, SynthError> {
    if cfg.videos < 3 || !(0.5..=600.0).contains(&cfg.min_seconds) || cfg.max_seconds < cfg.min_seconds {
        return Err(SynthError::Settings(format!(
            "need >= 3 videos and 0.5 <= min_seconds <= max_seconds (got {} videos, {}..{} s)",
            cfg.videos, cfg.min_seconds, cfg.max_seconds
        )));
    }
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let annotations = out.join("7th ABAW Annotations").join("EXPR_Recognition_Challenge");
    let n_val = (cfg.videos / 5).max(1);
    let n_test = (cfg.videos / 10).max(1);
    let n_train = cfg.videos - n_val - n_test;
    let mut pending = rounds(TRAIN_SEGMENTS_PER_CLASS, &mut rng);
    let mut val_pending = rounds(cfg.val_segments_per_class, &mut rng);
    let mut written = Vec::new();
    let mut test_names = Vec::new();
    for i in 0..cfg.videos {
        let split = if i < n_train {
            Split::Train
        } else if i < n_train + n_val {
            Split::Validation
        } else {
            Split::Test
        };
        let fps: u32 = if rng.random::<bool>() { 25 } else { 30 };
        let seconds = cfg.min_seconds + (cfg.max_seconds - cfg.min_seconds) * rng.random::<f64>();
        let frames = (seconds * fps as f64).round() as usize;
        let name = format!("{}-{fps}-{}x{}", i + 1, cfg.width, cfg.height);
        let two_people = i == 1;
        let (w, h) = (cfg.width as f64, cfg.height as f64);
        let mut no_pending = Vec::new();
        let people: Vec<Person> = (0..if two_people { 2 } else { 1 })
            .map(|k| {
                let slot = if two_people { (k as f64 + 0.5) / 2.0 } else { 0.5 };
                let pending = match split {
                    Split::Train => &mut pending,
                    Split::Validation => &mut val_pending,
                    Split::Test => &mut no_pending,
                };
                Person {
                    track: class_track(&mut rng, frames, fps as f64, pending),
                    centre: (w * slot + (rng.random::<f64>() - 0.5) * w * 0.1, h * (0.45 + 0.1 * rng.random::<f64>())),
                    radius: h * (0.28 + 0.08 * rng.random::<f64>()) * if two_people { 0.8 } else { 1.0 },
                    skin: [
                        200.0 + 40.0 * rng.random::<f64>(),
                        160.0 + 30.0 * rng.random::<f64>(),
                        130.0 + 30.0 * rng.random::<f64>(),
                    ],
                }
            })
            .collect();
        let light0 = (rng.random::<f64>() - 0.5) * 60.0;
        let mut styles: Vec<[f64; 4]> = people.iter().map(|p| FACES[p.track[0]]).collect();
        let mut drift = (0.0f64, 0.0f64);
        let mut missing: Vec<Vec<u32>> = vec![Vec::new(); people.len()];
        let mut video_frames = Vec::with_capacity(frames);
        let mut crops: Vec<Vec<RgbImage>> = vec![Vec::with_capacity(frames); people.len()];
        for f in 0..frames {
            let light = light0 + 15.0 * (f as f64 / fps as f64 * 0.7).sin();
            drift = (drift.0 + (rng.random::<f64>() - 0.5) * 0.6, drift.1 + (rng.random::<f64>() - 0.5) * 0.4);
            let bg = (90.0 + light).clamp(0.0, 255.0) as u8;
            let mut img =
                RgbImage::from_fn(cfg.width, cfg.height, |x, _| Rgb([bg, bg.saturating_add((x / 8) as u8), bg]));
            for (k, p) in people.iter().enumerate() {
                // Move smoothly towards the current class's expression.
                let target = FACES[p.track[f]];
                for (s, t) in styles[k].iter_mut().zip(target) {
                    *s += 0.25 * (t - *s);
                }
                let moved = Person { centre: (p.centre.0 + drift.0, p.centre.1 + drift.1), track: Vec::new(), ..*p };
                draw_face(&mut img, &moved, styles[k], light);
            }
            for px in img.pixels_mut() {
                let n = (rng.random::<f64>() - 0.5) * 16.0;
                px.0 = px.0.map(|v| (v as f64 + n).clamp(0.0, 255.0) as u8);
            }
            for (k, p) in people.iter().enumerate() {
                let (cx, cy, r) = (p.centre.0 + drift.0, p.centre.1 + drift.1, p.radius * 1.15);
                let x0 = (cx - r).clamp(0.0, w - 2.0) as u32;
                let y0 = (cy - r).clamp(0.0, h - 2.0) as u32;
                let side = ((2.0 * r) as u32).min(cfg.width - x0).min(cfg.height - y0).max(2);
                let crop = image::imageops::crop_imm(&img, x0, y0, side, side).to_image();
                crops[k].push(image::imageops::resize(&crop, 112, 112, image::imageops::FilterType::Triangle));
                // Face not detected now and then: a run of 2-6 frames without a crop (never frame 1).
                let in_gap = missing[k].last().is_some_and(|&m| m as usize == f && rng.random::<f64>() < 0.75);
                if f > 0 && (in_gap || rng.random::<f64>() < 0.02) {
                    missing[k].push(f as u32 + 1);
                }
            }
            video_frames.push(img);
        }
        let batch = if i % 2 == 0 { "batch1" } else { "batch2" };
        let media = out.join("videos").join(batch).join(format!("{name}.mp4"));
        std::fs::create_dir_all(media.parent().expect("parent")).map_err(|e| write_err(&media, e))?;
        encode(&media, &video_frames, &voice(&people[0].track, fps as f64, &mut rng), fps)?;

        for (k, p) in people.iter().enumerate() {
            let person = match (two_people, k) {
                (false, _) => name.clone(),
                (true, 0) => format!("{name}_left"),
                (true, _) => format!("{name}_right"),
            };
            let dir = out.join("cropped_aligned").join(&person);
            std::fs::create_dir_all(&dir).map_err(|e| write_err(&dir, e))?;
            for (f, crop) in crops[k].iter().enumerate() {
                if !missing[k].contains(&(f as u32 + 1)) {
                    let path = dir.join(format!("{:05}.jpg", f + 1));
                    crop.save_with_format(&path, image::ImageFormat::Jpeg).map_err(|e| write_err(&path, e))?;
                }
            }
            let mut labels: Vec<i8> = p.track.iter().map(|&c| c as i8).collect();
            if split == Split::Test {
                test_names.push(person.clone());
                written.push(SynthVideo {
                    name: person,
                    split,
                    frames,
                    fps,
                    labels: Vec::new(),
                    missing_crops: missing[k].clone(),
                });
                continue;
            }
            // A run of ignored frames in every other video; two label/frame count mismatches.
            if i % 2 == 0 && frames > 40 {
                let start = rng.random_range(5..frames - 30);
                labels[start..start + 20].fill(-1);
            }
            match i {
                0 => labels.extend([*labels.last().expect("frames"); 3]),
                2 => labels.truncate(frames - 2),
                _ => {}
            }
            let set = if split == Split::Train { "Train_Set" } else { "Validation_Set" };
            let text: String = std::iter::once(Expression::header())
                .chain(labels.iter().map(|l| l.to_string()))
                .collect::<Vec<_>>()
                .join("\n");
            write_file(&annotations.join(set).join(format!("{person}.txt")), &(text + "\n"))?;
            written.push(SynthVideo { name: person, split, frames, fps, labels, missing_crops: missing[k].clone() });
        }
        tracing::info!(video = %name, frames, fps, ?split, "synthesised");
    }
    write_file(
        &out.join(crate::layout::TEST_LIST_DIR).join("Expression_Recognition_Challenge_test_set_release.txt"),
        &(test_names.join("\n") + "\n"),
    )?;
    Ok(written)
}
