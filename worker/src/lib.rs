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
pub mod lease;
pub mod metrics;
pub mod nccl;
pub mod optim;
pub mod plan;
pub mod plots;
pub mod predict;
pub mod preempt;
pub mod session;
pub mod tensorboard;
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

/// `--device` of the encoder commands: `auto` (CUDA when available), `cpu`, `cuda` (= `cuda:0`) or `cuda:N`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(format!("`{other}` is not one of auto, cpu, cuda, cuda:N")),
            },
        }
    }
}

/// The device `--device` names (checked against the visible CUDA devices), with `--precision` resolved on it.
pub fn encoder_options(device: DeviceChoice, precision: PrecisionChoice) -> anyhow::Result<EncoderOptions> {
    let device = match device {
        DeviceChoice::Auto => EncoderOptions::best_available().device,
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::Cuda(n),
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

/// The host's cores (the default torch threads of the benchmarks).
pub fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
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
