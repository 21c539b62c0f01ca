//! Benchmarks against the reference implementation on the same machine, in one run, with the same threads,
//! batch, input sizes and iteration counts; rounds alternate which side goes first (the machine's load
//! drifts) and the medians are compared.
//!
//! - `bench-encoders`: the frozen encoders (CLIP ViT-B/32 vision tower, wav2vec2-base; random weights) against
//!   transformers + PyTorch eager.
//! - `bench-head`: forward + backward of the trainable part (`configs/paper.yaml`'s shape, paper encoders'
//!   widths) against the same head written in PyTorch eager.
//! - `bench-adapt`: one training step with each way of adapting the encoders (frozen, LoRA, last blocks), with
//!   the trainable variables and the bytes a step all-reduces (no reference: the cost relative to frozen).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, Result};
use avexpr_model::clip::{ClipVisionConfig, ClipVisionEncoder};
use avexpr_model::expr::{EncoderDims, ExprHead};
use avexpr_model::prompt::ClassPrompts;
use avexpr_model::wav2vec2::{Wav2Vec2Config, Wav2Vec2Encoder};
use avexpr_model::{EncoderOptions, FeatureBatch, ModelConfig, Precision};
use serde::Serialize;
use tch::{Kind, Tensor, nn};

const ENCODERS_REFERENCE: &str = include_str!("bench_reference.py");
const HEAD_REFERENCE: &str = include_str!("bench_head_reference.py");

/// Named throughput figures of one run of one side.
pub type Figures = BTreeMap<String, f64>;

fn synchronize(device: tch::Device) {
    if let tch::Device::Cuda(n) = device {
        tch::Cuda::synchronize(n as i64);
    }
}

/// Seconds for `iters` calls of `step` after one warm-up call.
fn timed(device: tch::Device, iters: usize, mut step: impl FnMut()) -> f64 {
    step();
    synchronize(device);
    let start = Instant::now();
    for _ in 0..iters {
        step();
    }
    synchronize(device);
    start.elapsed().as_secs_f64()
}

/// One training step as training takes it: every gradient of `variables` zeroed, the loss (under bf16 autocast
/// when `bf16`), backward.
fn training_step(device: tch::Device, bf16: bool, variables: &[Tensor], loss: impl FnOnce() -> Tensor) {
    for v in variables {
        let mut grad = v.grad();
        if grad.defined() {
            let _ = grad.zero_();
        }
    }
    avexpr_model::autocast::bf16(device, bf16, loss).backward();
}

/// Runs `script` with `args` as JSON; it prints one JSON line with a `figures` object.
fn run_reference(python: &str, script: &str, args: &impl Serialize) -> Result<(Figures, serde_json::Value)> {
    let output = Command::new(python)
        .arg("-c")
        .arg(script)
        .arg(serde_json::to_string(args)?)
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
    let value: serde_json::Value = serde_json::from_str(line).with_context(|| format!("reference output: {line}"))?;
    let figures = value["figures"]
        .as_object()
        .context("reference output has no figures")?
        .iter()
        .filter_map(|(k, v)| Some((k.clone(), v.as_f64()?)))
        .collect();
    Ok((figures, value))
}

fn median(mut xs: Vec<f64>) -> Option<f64> {
    xs.sort_by(f64::total_cmp);
    (!xs.is_empty()).then(|| xs[xs.len() / 2])
}

/// What a benchmark measured: the table, and the medians of each side (`--json`).
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub title: String,
    #[serde(skip)]
    pub table: String,
    pub ours: Figures,
    pub reference: Figures,
    /// The reference's last JSON line (its versions, parameter counts).
    pub reference_raw: Option<serde_json::Value>,
}

impl Report {
    /// Writes the medians as JSON (`--json`).
    pub fn write_json(&self, path: &std::path::Path) -> Result<()> {
        std::fs::write(path, serde_json::to_string_pretty(self)? + "\n")
            .with_context(|| format!("cannot write {}", path.display()))
    }
}

/// Both sides for `rounds` rounds, alternating which goes first; the table of medians and their ratio.
fn interleaved(
    title: &str,
    rows: &[(&str, String)],
    rounds: usize,
    mut ours: impl FnMut() -> Result<Figures>,
    mut reference: Option<impl FnMut() -> Result<(Figures, serde_json::Value)>>,
) -> Result<Report> {
    anyhow::ensure!(rounds > 0, "--rounds must be positive");
    let (mut our_runs, mut reference_runs, mut last) = (Vec::new(), Vec::new(), None);
    for round in 0..rounds {
        let reference_first = round % 2 == 1;
        let mut run_reference = |runs: &mut Vec<Figures>| -> Result<()> {
            if let Some(reference) = reference.as_mut() {
                let (figures, raw) = reference()?;
                runs.push(figures);
                last = Some(raw);
            }
            Ok(())
        };
        if reference_first {
            run_reference(&mut reference_runs)?;
        }
        our_runs.push(ours()?);
        if !reference_first {
            run_reference(&mut reference_runs)?;
        }
        tracing::info!(round = round + 1, rounds, "benchmark round done");
    }
    let pick = |runs: &[Figures], key: &str| median(runs.iter().filter_map(|f| f.get(key).copied()).collect());
    let mut table = format!(
        "{title}, median of {rounds} interleaved round(s)\n{:<48} {:>12} {:>12} {:>7}\n",
        "", "avexpr", "reference", "ratio"
    );
    for (key, label) in rows {
        let Some(o) = pick(&our_runs, key) else { continue };
        let (r_text, ratio) = match pick(&reference_runs, key) {
            Some(r) => (format!("{r:.2}"), format!("{:.3}", o / r)),
            None => ("-".into(), "-".into()),
        };
        table.push_str(&format!("{label:<48} {o:>12.2} {r_text:>12} {ratio:>7}\n"));
    }
    let medians = |runs: &[Figures]| -> Figures {
        let keys: std::collections::BTreeSet<&String> = runs.iter().flat_map(|f| f.keys()).collect();
        keys.into_iter().filter_map(|k| Some((k.clone(), pick(runs, k)?))).collect()
    };
    Ok(Report {
        title: title.to_string(),
        table,
        ours: medians(&our_runs),
        reference: medians(&reference_runs),
        reference_raw: last,
    })
}

/// `worker bench-encoders`: the command line, and (the sizes) what the reference script is sent.
#[derive(Debug, Clone, Serialize, clap::Args)]
pub struct EncoderBench {
    /// Torch threads for both sides (default: all cores).
    #[arg(long, default_value_t = crate::all_cores())]
    pub threads: usize,
    #[arg(long, default_value_t = 32)]
    pub clip_batch: i64,
    #[arg(long, default_value_t = 3)]
    pub clip_iters: usize,
    #[arg(long, default_value_t = 2)]
    pub audio_batch: i64,
    #[arg(long, default_value_t = 10.0)]
    pub audio_seconds: f64,
    #[arg(long, default_value_t = 2)]
    pub audio_iters: usize,
    /// Rounds of both sides, interleaved; medians are reported.
    #[arg(long, default_value_t = 3)]
    #[serde(skip)]
    pub rounds: usize,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    #[serde(skip)]
    pub device: crate::DeviceChoice,
    #[arg(long, value_enum, default_value_t = crate::PrecisionChoice::F32)]
    #[serde(skip)]
    pub precision: crate::PrecisionChoice,
    /// Python with torch and transformers for the reference side (default: $AVEXPR_PYTHON, else the scripts/setup venv).
    #[arg(long)]
    #[serde(skip)]
    pub python: Option<String>,
    /// Only measure our side.
    #[arg(long)]
    #[serde(skip)]
    pub no_reference: bool,
    /// Also write the medians of both sides as JSON to this file.
    #[arg(long)]
    #[serde(skip)]
    pub json: Option<std::path::PathBuf>,
}

/// `cpu` or `cuda:N`, as torch spells it.
fn torch_device_name(device: tch::Device) -> String {
    match device {
        tch::Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    }
}

/// What the encoder reference script reads: the sizes, and the device and precision as resolved.
#[derive(Serialize)]
struct EncoderReference<'a> {
    #[serde(flatten)]
    sizes: &'a EncoderBench,
    /// `cpu` or `cuda:N`, as torch spells it.
    device: String,
    bf16: bool,
}

/// Our side of the encoder benchmark.
pub fn encoders_ours(cfg: &EncoderBench, options: EncoderOptions) -> Result<Figures> {
    tch::set_num_threads(cfg.threads as i32);
    tch::manual_seed(0);
    let mut figures = Figures::new();
    let kind = (options.kind(), options.device);
    if cfg.clip_iters > 0 {
        let clip = ClipVisionEncoder::from_config(&ClipVisionConfig::vit_b32(), options)?;
        let pixels = Tensor::randn([cfg.clip_batch, 3, 224, 224], kind);
        let seconds = timed(options.device, cfg.clip_iters, || {
            let _ = clip.encode_pixels(&pixels);
        });
        figures.insert("clip_frames_per_s".into(), (cfg.clip_batch as usize * cfg.clip_iters) as f64 / seconds);
    }
    if cfg.audio_iters > 0 {
        let w2v = Wav2Vec2Encoder::from_config(&Wav2Vec2Config::base(), options)?;
        let waves = Tensor::randn([cfg.audio_batch, (cfg.audio_seconds * 16_000.0) as i64], kind);
        let seconds = timed(options.device, cfg.audio_iters, || {
            let _ = w2v.encode(&waves, None);
        });
        let audio_seconds = cfg.audio_batch as f64 * cfg.audio_seconds * cfg.audio_iters as f64;
        figures.insert("audio_seconds_per_s".into(), audio_seconds / seconds);
    }
    Ok(figures)
}

/// Both sides of the encoder benchmark, `cfg.rounds` rounds interleaved.
pub fn encoders(cfg: &EncoderBench) -> Result<Report> {
    anyhow::ensure!(
        cfg.clip_batch > 0 && cfg.audio_batch > 0 && cfg.audio_seconds > 0.0,
        "batch sizes and --audio-seconds must be positive"
    );
    let options = crate::encoder_options(cfg.device, cfg.precision)?;
    let title = format!(
        "encoder benchmark: {:?}, {}, {} thread(s), random weights; reference: transformers + PyTorch eager",
        options.device,
        if options.precision == Precision::Bf16 { "bf16" } else { "f32" },
        cfg.threads
    );
    let rows = [
        ("clip_frames_per_s", format!("CLIP ViT-B/32 vision, batch {} (frames/s)", cfg.clip_batch)),
        ("audio_seconds_per_s", format!("wav2vec2-base, {} x {} s (audio-s/s)", cfg.audio_batch, cfg.audio_seconds)),
    ];
    let args = EncoderReference {
        sizes: cfg,
        device: torch_device_name(options.device),
        bf16: options.precision == Precision::Bf16,
    };
    let python = cfg.python.clone().unwrap_or_else(crate::default_python);
    let reference = (!cfg.no_reference).then_some(|| run_reference(&python, ENCODERS_REFERENCE, &args));
    let mut report = interleaved(&title, &rows, cfg.rounds, || encoders_ours(cfg, options), reference)?;
    if let Some(raw) = &report.reference_raw {
        report.table.push_str(&format!("reference (last round): {raw}\n"));
    }
    Ok(report)
}

#[derive(Debug, Clone, Serialize)]
pub struct HeadBench {
    /// `cpu` or `cuda:N`, as torch spells it.
    pub device: String,
    /// Under bf16 autocast, as training runs the head on CUDA (`train.mixed_precision: auto`).
    pub bf16: bool,
    pub threads: usize,
    pub batch: i64,
    pub frames: i64,
    pub iters: usize,
    pub fps: f64,
    pub image_dim: i64,
    pub text_dim: i64,
    pub audio_hidden: i64,
    pub audio_states: i64,
    pub audio_frames: i64,
    pub audio_stride: i64,
    pub audio_receptive_field: i64,
    pub model: ModelConfig,
}

impl HeadBench {
    /// Clips of `frames` frames at `fps` with the paper encoders' widths and the audio frames Wav2Vec 2.0
    /// produces for them.
    pub fn new(model: ModelConfig, device: tch::Device, threads: usize, batch: i64, frames: i64, iters: usize) -> Self {
        let dims = EncoderDims::paper();
        let fps = 25.0;
        let samples = (frames as f64 / fps * dims.audio_timing.sample_rate) as i64;
        let t = dims.audio_timing;
        Self {
            device: torch_device_name(device),
            bf16: crate::job::MixedPrecision::Auto.enabled(device),
            threads,
            batch,
            frames,
            iters,
            fps,
            image_dim: dims.image_dim,
            text_dim: dims.text_dim,
            audio_hidden: dims.audio_hidden,
            audio_states: dims.audio_layers + 1,
            audio_frames: (samples - t.receptive_field) / t.stride + 1,
            audio_stride: t.stride,
            audio_receptive_field: t.receptive_field,
            model,
        }
    }
}

/// Our side of the head benchmark: clips/s of forward + loss + backward, and the parameter count per group.
pub fn head_ours(cfg: &HeadBench, device: tch::Device) -> Result<(Figures, Vec<(&'static str, i64)>)> {
    tch::set_num_threads(cfg.threads as i32);
    tch::manual_seed(0);
    let dims = EncoderDims::paper();
    let vs = nn::VarStore::new(device);
    let f32 = (Kind::Float, device);
    let classes = ClassPrompts::Embeddings(Tensor::randn([8, dims.text_dim], f32));
    let head = ExprHead::new(&vs.root(), &cfg.model, &dims, classes, None)?;
    let feats = FeatureBatch {
        image_embeds: Tensor::randn([cfg.batch, cfg.frames, cfg.image_dim], f32),
        face_mask: Tensor::ones([cfg.batch, cfg.frames], (Kind::Bool, device)),
        audio_states: Tensor::randn([cfg.batch, cfg.audio_states, cfg.audio_frames, cfg.audio_hidden], f32),
        audio_mask: Tensor::ones([cfg.batch, cfg.audio_frames], (Kind::Bool, device)),
        fps: vec![cfg.fps; cfg.batch as usize],
    };
    let targets = Tensor::arange(cfg.batch, (Kind::Int64, device)).remainder(8);
    let labels = targets.unsqueeze(1).expand([cfg.batch, cfg.frames], false).contiguous();
    let variables = vs.trainable_variables();
    let seconds = timed(device, cfg.iters, || {
        training_step(device, cfg.bf16, &variables, || head.loss(&head.forward_t(&feats, true), &labels).total)
    });
    let counts = avexpr_model::expr::parameter_counts(&cfg.model, &dims)?;
    Ok((Figures::from([("clips_per_s".to_string(), (cfg.batch as usize * cfg.iters) as f64 / seconds)]), counts))
}

pub fn head(cfg: &HeadBench, device: tch::Device, python: Option<&str>, rounds: usize) -> Result<Report> {
    anyhow::ensure!(cfg.batch > 0 && cfg.frames > 0 && cfg.iters > 0, "--batch, --frames and --iters must be positive");
    let title = format!(
        "trainable head benchmark: {device:?}{}, {} thread(s), forward + backward, {} clips x {} frames; reference: \
         the same head in PyTorch eager",
        if cfg.bf16 { " under bf16 autocast" } else { "" },
        cfg.threads,
        cfg.batch,
        cfg.frames
    );
    let mut counts = Vec::new();
    let ours = || -> Result<Figures> {
        let (figures, c) = head_ours(cfg, device)?;
        counts = c;
        Ok(figures)
    };
    let reference = python.map(|py| move || run_reference(py, HEAD_REFERENCE, cfg));
    let rows = [("clips_per_s", "clips/s (forward + backward)".to_string())];
    let mut report = interleaved(&title, &rows, rounds, ours, reference)?;
    for (group, n) in &counts {
        let theirs = report.reference_raw.as_ref().and_then(|r| r["params"][*group].as_i64());
        let check = match theirs {
            Some(t) if t == *n => "same in the reference".to_string(),
            Some(t) => format!("reference has {t}: the heads differ"),
            None => String::new(),
        };
        report.table.push_str(&format!("parameters {group:<8} {n:>12}   {check}\n"));
    }
    Ok(report)
}

/// `worker bench-adapt`: what adapting an encoder costs per training step.
#[derive(Debug, Clone, clap::Args)]
pub struct AdaptBench {
    /// Job config whose `model` section names the encoders and shapes the head (e.g. the paper-size random
    /// encoders of `model/tests/fixtures/generate.py paper-random`); its `adapt` settings are replaced per row.
    #[arg(long)]
    pub config: PathBuf,
    /// cpu, cuda, cuda:N or auto; on CUDA the encoders run in bf16 and the step under bf16 autocast.
    #[arg(long, default_value = "cpu")]
    pub device: crate::DeviceChoice,
    #[arg(long, default_value_t = crate::all_cores())]
    pub threads: usize,
    /// Clips per step.
    #[arg(long, default_value_t = 2)]
    pub batch: i64,
    #[arg(long, default_value_t = 16)]
    pub frames: i64,
    /// Timed steps per row and round (after one warm-up step).
    #[arg(long, default_value_t = 2)]
    pub iters: usize,
    /// Rounds over all rows (in alternating order); a row's figure is the median of its rounds.
    #[arg(long, default_value_t = 3)]
    pub rounds: usize,
    /// LoRA rank (alpha = 2 x rank) and unfrozen blocks of the rows.
    #[arg(long, default_value_t = 8)]
    pub rank: i64,
    #[arg(long, default_value_t = 2)]
    pub blocks: i64,
    /// Also write the rows as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

/// One row of `worker bench-adapt`.
#[derive(Debug, Clone, Serialize)]
pub struct AdaptRow {
    pub mode: String,
    pub ms_per_step: f64,
    /// Trainable variables per group.
    pub parameters: BTreeMap<String, i64>,
    /// What one step all-reduces: every trainable variable's gradient in f32 (the buckets' type).
    pub all_reduced_bytes: i64,
}

/// Seconds per training step (raw clips through the encoders, the head, the loss and backward) of each way of
/// adapting the encoders, on the same random clips, with the trainable variables and the bytes one step
/// all-reduces. Returns the table and the rows.
pub fn adaptation(cfg: &AdaptBench) -> Result<(String, Vec<AdaptRow>)> {
    use avexpr_model::config::{Adapt, AdaptMode};
    anyhow::ensure!(
        cfg.batch > 0 && cfg.frames > 0 && cfg.iters > 0 && cfg.rounds > 0,
        "--batch, --frames, --iters and --rounds must be positive"
    );
    tch::set_num_threads(cfg.threads as i32);
    let base = ModelConfig::from_job_file(&cfg.config)?;
    let options = crate::encoder_options(cfg.device, crate::PrecisionChoice::Auto)?;
    let device = options.device;
    let lora = Adapt { mode: AdaptMode::Lora, rank: cfg.rank, alpha: 2.0 * cfg.rank as f64, ..Adapt::default() };
    let last = Adapt { mode: AdaptMode::LastBlocks, blocks: cfg.blocks, ..Adapt::default() };
    let frozen = Adapt::default();
    // The image rows adapt the image encoder the config uses (CLIP's vision tower or DINOv2).
    let image = if base.image_encoder.is_clip() { "CLIP" } else { "DINOv2" };
    let rows = [
        ("frozen (the paper)".to_string(), frozen, frozen),
        (format!("{image} LoRA r{} q,v", cfg.rank), lora, frozen),
        (format!("{image} last {} blocks", cfg.blocks), last, frozen),
        (format!("Wav2Vec 2.0 LoRA r{} q,v", cfg.rank), frozen, lora),
        (format!("Wav2Vec 2.0 last {} blocks", cfg.blocks), frozen, last),
    ];
    // Every model is built first; then rounds time each of them in turn (the order alternating), so that the
    // machine's drift spreads over all rows; a row's figure is the median of its rounds.
    let samples = cfg.frames * 16_000 / 25;
    let mut models = Vec::new();
    for (mode, image, wav2vec2) in rows {
        let mut model_cfg = base.clone();
        if model_cfg.image_encoder.is_clip() {
            model_cfg.clip.adapt = image
        } else {
            model_cfg.dinov2.adapt = image
        }
        model_cfg.wav2vec2.adapt = wav2vec2;
        tch::manual_seed(0);
        let encoders = avexpr_model::Encoders::load(&model_cfg, options)?;
        models.push((mode, avexpr_model::ExprModel::new(&model_cfg, encoders, None, device)?));
    }
    let size = models[0].1.encoders().vision.processor().crop_height as i64;
    let raw = avexpr_model::RawBatch {
        frames: Tensor::randint(256, [cfg.batch, cfg.frames, 3, size, size], (Kind::Uint8, device)),
        face_mask: Tensor::ones([cfg.batch, cfg.frames], (Kind::Bool, device)),
        audio: Tensor::randn([cfg.batch, samples], (Kind::Float, device)) * 0.1,
        audio_mask: Tensor::ones([cfg.batch, samples], (Kind::Bool, device)),
        fps: vec![25.0; cfg.batch as usize],
    };
    let labels = Tensor::arange(cfg.batch * cfg.frames, (Kind::Int64, device)).remainder(8).view([cfg.batch, -1]);
    let bf16 = crate::job::MixedPrecision::Auto.enabled(device);
    let mut seconds: Vec<Vec<f64>> = vec![Vec::new(); models.len()];
    for round in 0..cfg.rounds {
        let mut order: Vec<usize> = (0..models.len()).collect();
        if round % 2 == 1 {
            order.reverse();
        }
        for i in order {
            let model = &models[i].1;
            let variables = model.trainable_variables();
            let s = timed(device, cfg.iters, || {
                training_step(device, bf16, &variables, || {
                    model.loss(&model.forward_raw_t(&raw, true).expect("a well-formed batch"), &labels).total
                })
            });
            seconds[i].push(s / cfg.iters as f64);
        }
        tracing::info!(round = round + 1, rounds = cfg.rounds, "adaptation benchmark round done");
    }
    let mut out = Vec::new();
    for ((mode, model), s) in models.iter().zip(seconds) {
        let parameters: BTreeMap<String, i64> =
            model.parameter_counts().into_iter().map(|(g, n)| (g.to_string(), n)).collect();
        let all_reduced_bytes = 4 * parameters.values().sum::<i64>();
        let ms_per_step = 1e3 * median(s).expect("at least one round");
        out.push(AdaptRow { mode: mode.clone(), ms_per_step, parameters, all_reduced_bytes });
    }
    let mut table = format!(
        "adaptation benchmark: {device:?}{}, {} thread(s), one training step (encoders + head + loss + backward) of \
         {} clips x {} frames, median over {} interleaved round(s) of the mean of {} step(s) after a warm-up\n{:<28} \
         {:>10} {:>12} {:>14} {:>10}\n",
        if bf16 { " (bf16)" } else { "" },
        cfg.threads,
        cfg.batch,
        cfg.frames,
        cfg.rounds,
        cfg.iters,
        "mode",
        "ms/step",
        "backbone",
        "all-reduced MB",
        "vs frozen"
    );
    let frozen_ms = out[0].ms_per_step;
    for row in &out {
        table.push_str(&format!(
            "{:<28} {:>10.0} {:>12} {:>14.2} {:>9.2}x\n",
            row.mode,
            row.ms_per_step,
            row.parameters.get("backbone").copied().unwrap_or(0),
            row.all_reduced_bytes as f64 / 1e6,
            row.ms_per_step / frozen_ms
        ));
    }
    Ok((table, out))
}
