//! `worker bench-encoders`: throughput of our frozen encoders against transformers + PyTorch eager on the same
//! machine, in one run, with the same threads, batch, input sizes and iteration counts (random weights of the
//! full-size configurations: CLIP ViT-B/32 vision tower, wav2vec2-base).

use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use avexpr_model::clip::{ClipVisionConfig, ClipVisionEncoder};
use avexpr_model::wav2vec2::{Wav2Vec2Config, Wav2Vec2Encoder};
use avexpr_model::{EncoderOptions, Precision};
use serde::{Deserialize, Serialize};
use tch::Tensor;

const REFERENCE_SCRIPT: &str = include_str!("bench_reference.py");

#[derive(Debug, Clone, Serialize)]
pub struct BenchConfig {
    pub threads: usize,
    pub clip_batch: i64,
    pub clip_iters: usize,
    pub audio_batch: i64,
    pub audio_seconds: f64,
    pub audio_iters: usize,
    pub device: String,
    pub bf16: bool,
}

#[derive(Debug, Default, Clone, Serialize, Deserialize)]
pub struct Throughput {
    pub clip_frames_per_s: Option<f64>,
    pub audio_seconds_per_s: Option<f64>,
}

fn synchronize(options: &EncoderOptions) {
    if let tch::Device::Cuda(n) = options.device {
        tch::Cuda::synchronize(n as i64);
    }
}

fn timed(options: &EncoderOptions, iters: usize, mut step: impl FnMut()) -> f64 {
    step(); // warm-up
    synchronize(options);
    let start = Instant::now();
    for _ in 0..iters {
        step();
    }
    synchronize(options);
    start.elapsed().as_secs_f64()
}

/// Our side of the benchmark.
pub fn ours(cfg: &BenchConfig, options: EncoderOptions) -> Result<Throughput> {
    tch::set_num_threads(cfg.threads as i32);
    tch::manual_seed(0);
    let mut result = Throughput::default();
    let kind = (options.kind(), options.device);
    if cfg.clip_iters > 0 {
        let clip = ClipVisionEncoder::from_config(&ClipVisionConfig::vit_b32(), options)?;
        let pixels = Tensor::randn([cfg.clip_batch, 3, 224, 224], kind);
        let seconds = timed(&options, cfg.clip_iters, || {
            let _ = clip.encode_pixels(&pixels);
        });
        result.clip_frames_per_s = Some((cfg.clip_batch as usize * cfg.clip_iters) as f64 / seconds);
    }
    if cfg.audio_iters > 0 {
        let w2v = Wav2Vec2Encoder::from_config(&Wav2Vec2Config::base(), options)?;
        let waves = Tensor::randn([cfg.audio_batch, (cfg.audio_seconds * 16_000.0) as i64], kind);
        let seconds = timed(&options, cfg.audio_iters, || {
            let _ = w2v.encode(&waves, None);
        });
        result.audio_seconds_per_s =
            Some(cfg.audio_batch as f64 * cfg.audio_seconds * cfg.audio_iters as f64 / seconds);
    }
    Ok(result)
}

/// The reference side, in a Python subprocess (`python` must have torch and transformers: the project venv).
pub fn reference(cfg: &BenchConfig, python: &str) -> Result<(Throughput, String)> {
    let output = Command::new(python)
        .arg("-c")
        .arg(REFERENCE_SCRIPT)
        .arg(serde_json::to_string(cfg)?)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .with_context(|| {
            format!("cannot run {python} for the reference side (set --python to the project venv's python)")
        })?;
    anyhow::ensure!(
        output.status.success(),
        "reference benchmark failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    let line = stdout.lines().last().context("reference benchmark printed nothing")?;
    let parsed: Throughput = serde_json::from_str(line).with_context(|| format!("reference output: {line}"))?;
    Ok((parsed, line.to_string()))
}

/// Picks one figure out of a run.
type Field = fn(&Throughput) -> Option<f64>;

fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    (!xs.is_empty()).then(|| xs[xs.len() / 2])
}

/// Runs both sides for `rounds` rounds, alternating which goes first (the machine's load drifts), and renders
/// the medians and their ratio.
pub fn run(cfg: &BenchConfig, options: EncoderOptions, python: Option<&str>, rounds: usize) -> Result<String> {
    anyhow::ensure!(
        cfg.clip_batch > 0 && cfg.audio_batch > 0 && cfg.audio_seconds > 0.0 && rounds > 0,
        "batch sizes, --audio-seconds and --rounds must be positive"
    );
    let mut our_runs = Vec::new();
    let mut reference_runs = Vec::new();
    let mut raw = String::new();
    for round in 0..rounds {
        let reference_first = round % 2 == 1;
        if let (true, Some(py)) = (reference_first, python) {
            let (r, line) = reference(cfg, py)?;
            reference_runs.push(r);
            raw = line;
        }
        our_runs.push(ours(cfg, options)?);
        if let (false, Some(py)) = (reference_first, python) {
            let (r, line) = reference(cfg, py)?;
            reference_runs.push(r);
            raw = line;
        }
        tracing::info!(round = round + 1, rounds, "benchmark round done");
    }
    let pick = |runs: &[Throughput], f: Field| median(runs.iter().filter_map(f).collect());
    let mut table = format!(
        "encoder benchmark: device {:?}, {}, {} thread(s), random weights, median of {rounds} interleaved round(s)\n\
         {:<44} {:>12} {:>12} {:>7}\n",
        options.device,
        if options.precision == Precision::Bf16 { "bf16" } else { "f32" },
        cfg.threads,
        "",
        "avexpr",
        "transformers",
        "ratio"
    );
    let rows: [(String, Field); 2] = [
        (format!("CLIP ViT-B/32 vision, batch {} (frames/s)", cfg.clip_batch), |t| t.clip_frames_per_s),
        (format!("wav2vec2-base, {} x {} s (audio-s/s)", cfg.audio_batch, cfg.audio_seconds), |t| {
            t.audio_seconds_per_s
        }),
    ];
    for (name, field) in rows {
        let Some(o) = pick(&our_runs, field) else {
            continue;
        };
        let (r_text, ratio) = match pick(&reference_runs, field) {
            Some(r) => (format!("{r:.2}"), format!("{:.3}", o / r)),
            None => ("-".into(), "-".into()),
        };
        table.push_str(&format!("{name:<44} {o:>12.2} {r_text:>12} {ratio:>7}\n"));
    }
    if !raw.is_empty() {
        table.push_str(&format!("reference (last round): {raw}\n"));
    }
    Ok(table)
}
