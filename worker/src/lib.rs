//! One avexpr rank: training (`train`, `ablate`), the feature cache (`extract`), evaluation and prediction,
//! each opening a [`session::Session`]; the frozen-encoder commands (`embed`, benchmarks); and what ranks share
//! (MPI and NCCL in `dist`, `nccl` and `buckets`, checkpoints, plans and heartbeats in the job's store).

pub mod ablate;
pub mod allocator;
pub mod bench;
pub mod buckets;
pub mod checkpoint;
pub mod dist;
pub mod embed;
pub mod eval;
pub mod features;
pub mod heartbeat;
pub mod job;
pub mod metrics;
pub mod nccl;
pub mod optim;
pub mod plan;
pub mod plots;
pub mod predict;
pub mod session;
pub mod train;
pub use avexpr_data::logging;

use tch::Device;

use avexpr_model::{EncoderOptions, Precision};

/// `--precision` of the encoder commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum PrecisionChoice {
    /// bf16 on CUDA, f32 on CPU.
    Auto,
    F32,
    Bf16,
}

/// Parses `--device` (`auto`, `cpu`, `cuda`, `cuda:N`) and resolves `--precision` on it.
pub fn encoder_options(device: &str, precision: PrecisionChoice) -> anyhow::Result<EncoderOptions> {
    let device = match device {
        "auto" => EncoderOptions::best_available().device,
        "cpu" => Device::Cpu,
        "cuda" => Device::Cuda(0),
        other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
            Some(Ok(n)) => Device::Cuda(n),
            _ => anyhow::bail!("--device: `{other}` is not one of auto, cpu, cuda, cuda:N"),
        },
    };
    if let Device::Cuda(n) = device
        && n as i64 >= tch::Cuda::device_count()
    {
        anyhow::bail!("--device: cuda:{n} requested but {} CUDA device(s) are visible", tch::Cuda::device_count());
    }
    let precision = match precision {
        PrecisionChoice::F32 => Precision::F32,
        PrecisionChoice::Bf16 => Precision::Bf16,
        PrecisionChoice::Auto if device.is_cuda() => Precision::Bf16,
        PrecisionChoice::Auto => Precision::F32,
    };
    Ok(EncoderOptions { device, precision })
}

/// The Python used for reference benchmarks: `$AVEXPR_PYTHON`, else the venv that `scripts/setup` creates,
/// else `python3`.
pub fn default_python() -> String {
    if let Ok(python) = std::env::var("AVEXPR_PYTHON") {
        return python;
    }
    let venv = std::env::var_os("HOME").map(|home| {
        std::path::Path::new(&home)
            .join(".cache/avexpr")
            .join(format!("venv-torch-{}", TORCH_VERSION))
            .join("bin/python")
    });
    match venv {
        Some(path) if path.is_file() => path.to_string_lossy().into_owned(),
        _ => "python3".into(),
    }
}

/// The PyTorch release whose libtorch tch links against (pinned in scripts/setup).
pub const TORCH_VERSION: &str = "2.13.0";
