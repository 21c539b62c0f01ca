//! `data`: the data-layer commands. Thin: parse, log, call the library, report errors with their chain.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use avexpr_data::affwild2::PAPER_TRAIN_RATIOS;
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
                print!("{}", confusion.render(&PAPER_TRAIN_RATIOS));
            }
        }
        Command::Synth { out, videos, min_seconds, max_seconds, seed } => {
            let cfg = avexpr_data::synth::SynthConfig { videos, min_seconds, max_seconds, seed, ..Default::default() };
            let written = avexpr_data::synth::synth(&out, &cfg)?;
            let frames: usize = written.iter().map(|v| v.frames).sum();
            println!("wrote {} annotated/test entries ({frames} frames) under {}", written.len(), out.display());
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
