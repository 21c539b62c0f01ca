//! `data`: the data-layer commands. Thin: parse, log, call the library, report errors with their chain.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use avexpr_data::{logging, predictions};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "data", version, about = "avexpr data layer: Aff-Wild2 layout, scoring, ingest")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Per-class and macro F1 of a predictions.txt against an annotation folder (e.g. Validation_Set/).
    Score {
        #[arg(long)]
        pred: PathBuf,
        #[arg(long)]
        labels: PathBuf,
        /// Print JSON instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Write a small seeded look-alike of Aff-Wild2 in the real layout (videos, crops, annotations, test list).
    Synth {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 24)]
        videos: usize,
        #[arg(long, default_value_t = 3.0)]
        min_seconds: f64,
        #[arg(long, default_value_t = 6.0)]
        max_seconds: f64,
        #[arg(long, default_value_t = 7)]
        seed: u64,
        #[arg(long, default_value_t = 160)]
        width: u32,
        #[arg(long, default_value_t = 120)]
        height: u32,
        /// The validation split starts with this many segments of every class (0: training ratios only).
        #[arg(long, default_value_t = 3)]
        val_segments_per_class: usize,
    },
    /// Ingest throughput (frames per CPU-second) against the ffmpeg CLI decoding the same files, and peak memory.
    BenchIngest {
        #[arg(long)]
        root: PathBuf,
        /// crops or full-frame.
        #[arg(long, default_value = "crops")]
        face: String,
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// Loader throughput (clips/s) from S3 (a local Garage, or --s3 with the AWS_* environment), from local
    /// files and from memory (the decode-only limit), with 1 and 2 decode threads; consumer waiting; peak RSS.
    BenchLoader {
        #[arg(long, default_value_t = 16)]
        videos: usize,
        /// Mean video length.
        #[arg(long, default_value_t = 40.0)]
        seconds: f64,
        #[arg(long, default_value_t = 256)]
        shard_frames: usize,
        #[arg(long, default_value_t = 4)]
        shuffle_shards: usize,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// Consumer step times in ms (comma-separated).
        #[arg(long, value_delimiter = ',', default_value = "100,25")]
        step_ms: Vec<f64>,
        /// An existing S3 prefix (s3://bucket/prefix) instead of starting Garage.
        #[arg(long)]
        s3: Option<String>,
        /// Deliver un-augmented faces (evaluation).
        #[arg(long)]
        no_augment: bool,
    },
    /// Decode every video once into tar shards of fixed-length segments on an object store, plus a manifest.
    Ingest {
        /// The dataset root (as the challenge ships it, or `data synth`'s output).
        #[arg(long)]
        root: PathBuf,
        /// s3://bucket/prefix (AWS_* environment for endpoint and credentials), file:///dir or a path.
        #[arg(long)]
        out: String,
        #[arg(long, default_value_t = 32)]
        segment_frames: usize,
        #[arg(long, default_value_t = 1024)]
        shard_frames: usize,
        /// crops (the aligned face crops) or full-frame.
        #[arg(long, default_value = "crops")]
        face: String,
        #[arg(long, default_value_t = 112)]
        face_size: u32,
        /// Videos decoded in parallel (default: all cores).
        #[arg(long)]
        jobs: Option<usize>,
    },
    /// List what a participant's copy of Aff-Wild2 holds: videos per split, missing media or crops.
    Inspect {
        #[arg(long)]
        root: PathBuf,
    },
}

fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Score { pred, labels, json } => {
            let confusion = predictions::score(&pred, &labels)?;
            if json {
                let report = serde_json::json!({
                    "macro_f1": confusion.macro_f1(),
                    "f1": confusion.f1_per_class(),
                    "classes": avexpr_data::Expression::ALL.map(|e| e.name()),
                    "frames": confusion.frames(),
                    "accuracy": confusion.accuracy(),
                    "confusion": confusion.counts,
                });
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print!("{}", confusion.render(None));
            }
        }
        Command::Synth { out, videos, min_seconds, max_seconds, seed, width, height, val_segments_per_class } => {
            let cfg = avexpr_data::synth::SynthConfig {
                videos,
                min_seconds,
                max_seconds,
                seed,
                width,
                height,
                val_segments_per_class,
            };
            let written = avexpr_data::synth::synth(&out, &cfg)?;
            let frames: usize = written.iter().map(|v| v.frames).sum();
            println!("wrote {} annotated/test entries ({frames} frames) under {}", written.len(), out.display());
        }
        Command::BenchIngest { root, face, jobs } => {
            let out = std::env::temp_dir().join(format!("avexpr-bench-ingest-{}", std::process::id()));
            let mut cfg = avexpr_data::ingest::IngestConfig::new(root, out.display().to_string());
            cfg.face = face_source(&face)?;
            if let Some(jobs) = jobs {
                cfg.jobs = jobs;
            }
            let result = avexpr_data::bench::ingest_vs_cli(&cfg);
            let _ = std::fs::remove_dir_all(&out);
            print!("{}", result?);
        }
        Command::BenchLoader {
            videos,
            seconds,
            shard_frames,
            shuffle_shards,
            batch_size,
            rounds,
            step_ms,
            s3,
            no_augment,
        } => {
            let mut loader = avexpr_data::loader::LoaderConfig { batch_size, ..Default::default() };
            if no_augment {
                loader.augment = None;
            }
            let sampler = avexpr_data::sampler::SamplerConfig { shuffle_shards, seed: 1, ..Default::default() };
            let bench =
                avexpr_data::bench::LoaderBench { videos, seconds, shard_frames, loader, sampler, rounds, step_ms, s3 };
            print!("{}", avexpr_data::bench::loader(&bench)?);
        }
        Command::Ingest { root, out, segment_frames, shard_frames, face, face_size, jobs } => {
            use avexpr_data::ingest::{IngestConfig, ingest};
            let face = face_source(&face)?;
            let mut cfg = IngestConfig::new(root, out);
            cfg.segment_frames = segment_frames;
            cfg.shard_frames = shard_frames;
            cfg.face = face;
            cfg.face_size = face_size;
            if let Some(jobs) = jobs {
                cfg.jobs = jobs;
            }
            let report = ingest(&cfg)?;
            for line in report.lines() {
                println!("{line}");
            }
            let frames: usize = report.manifest.videos.iter().map(|v| v.frames).sum();
            println!(
                "{} videos ({} ingested, {} already there), {frames} frames, {} failed; manifest at {}/manifest.json",
                report.manifest.videos.len(),
                report.ingested.len(),
                report.skipped.len(),
                report.manifest.failures.len(),
                cfg.out
            );
            if !report.manifest.failures.is_empty() {
                anyhow::bail!("{} video(s) failed (listed above and in the manifest)", report.manifest.failures.len());
            }
        }
        Command::Inspect { root } => {
            let layout = avexpr_data::layout::Layout::discover(&root)?;
            for split in [
                avexpr_data::layout::Split::Train,
                avexpr_data::layout::Split::Validation,
                avexpr_data::layout::Split::Test,
            ] {
                let videos: Vec<_> = layout.split(split).collect();
                let no_media = videos.iter().filter(|v| v.media.is_none()).count();
                let no_crops = videos.iter().filter(|v| v.crops.is_none()).count();
                println!("{split:?}: {} videos, {no_media} without media, {no_crops} without crops", videos.len());
                for v in videos.iter().filter(|v| v.media.is_none()) {
                    println!("  no media for {}", v.name);
                }
            }
        }
    }
    Ok(())
}

fn face_source(name: &str) -> Result<avexpr_data::manifest::FaceSource> {
    Ok(match name {
        "crops" => avexpr_data::manifest::FaceSource::Crops,
        "full-frame" => avexpr_data::manifest::FaceSource::FullFrame,
        other => anyhow::bail!("--face: `{other}` is not one of crops, full-frame"),
    })
}

fn main() -> ExitCode {
    logging::init_labelled("data");
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
