//! `orchestrator`: plans, launches and watches avexpr jobs. Thin: parse, log, call the library.

use std::process::ExitCode;

use avexpr_orchestrator::doctor;
use avexpr_worker::logging;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "orchestrator", version, about = "avexpr orchestrator: plans, launches and watches training jobs")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check that this machine can run avexpr workers (libtorch, devices, MPI, FFmpeg, Python venv).
    Doctor {
        /// Python of the project venv (default: $AVEXPR_PYTHON, else the scripts/setup venv).
        #[arg(long)]
        python: Option<String>,
    },
}

fn main() -> ExitCode {
    logging::init_labelled("orchestrator");
    match Cli::parse().command {
        Command::Doctor { python } => {
            let python = python.unwrap_or_else(avexpr_worker::default_python);
            let (text, ok) = doctor::report(&doctor::run_checks(&python));
            print!("{text}");
            if ok {
                ExitCode::SUCCESS
            } else {
                tracing::error!("required components are missing: run scripts/setup");
                ExitCode::FAILURE
            }
        }
    }
}
