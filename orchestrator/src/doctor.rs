//! `orchestrator doctor`: is this machine ready to run avexpr workers? Checks libtorch (and which devices it
//! sees), the NVIDIA driver's devices and libnccl (required only where there are GPUs), the MPI launcher, the
//! FFmpeg tools, and the Python venv used for benchmarks and fixtures.

use std::process::Command;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    pub ok: bool,
    /// Required for training; optional checks only inform.
    pub required: bool,
    pub detail: String,
}

fn first_line(program: &str, args: &[&str]) -> Result<String, String> {
    match Command::new(program).args(args).output() {
        Ok(out) if out.status.success() => {
            let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
            Ok(text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string())
        }
        Ok(out) => Err(format!("`{program}` exited with {}", out.status)),
        Err(e) => Err(format!("`{program}` not found on PATH ({e}); run scripts/setup")),
    }
}

fn command_check(name: &'static str, required: bool, program: &str, args: &[&str]) -> Check {
    match first_line(program, args) {
        Ok(detail) => Check { name, ok: true, required, detail },
        Err(detail) => Check { name, ok: false, required, detail },
    }
}

/// Whether libtorch's CUDA backend is in this process: libtorch_cuda.so registers it when loaded, and a binary
/// linked with `--as-needed` drops it (nothing calls into it), leaving GPUs unused. `Err` when the libtorch this
/// process loaded ships libtorch_cuda.so but it is not loaded.
pub fn cuda_backend() -> Result<String, String> {
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap_or_default();
    let mapped = |name: &str| {
        maps.lines().find_map(|l| l.split_whitespace().nth(5).filter(|p| p.ends_with(name)).map(str::to_string))
    };
    if let Some(path) = mapped("/libtorch_cuda.so") {
        return Ok(format!("CUDA backend loaded ({path})"));
    }
    let dir = mapped("/libtorch_cpu.so").and_then(|p| std::path::Path::new(&p).parent().map(|d| d.to_path_buf()));
    match dir {
        Some(dir) if dir.join("libtorch_cuda.so").exists() => Err(format!(
            "{} has libtorch_cuda.so but this binary did not load it, so GPUs go unused; \
             rebuild (worker/build.rs links it with --no-as-needed)",
            dir.display()
        )),
        Some(dir) => Ok(format!("CPU-only libtorch (no libtorch_cuda.so in {})", dir.display())),
        None => Ok("libtorch linked statically or not found in /proc/self/maps".into()),
    }
}

pub fn run_checks(python: &str) -> Vec<Check> {
    let cuda = tch::Cuda::device_count();
    let backend = cuda_backend();
    let torch = Check {
        name: "libtorch",
        ok: backend.is_ok(),
        required: true,
        detail: format!(
            "loaded; {} CPU thread(s); CUDA devices: {cuda}{}; {}",
            tch::get_num_threads(),
            if cuda > 0 { format!(", cuDNN {}", tch::Cuda::cudnn_is_available()) } else { String::new() },
            backend.unwrap_or_else(|e| e)
        ),
    };
    let gpus = match avexpr_worker::nccl::cuda_devices() {
        Ok(devices) => Check {
            name: "CUDA devices (driver)",
            ok: true,
            required: false,
            detail: if devices.is_empty() {
                "none".into()
            } else {
                let list: Vec<String> = devices
                    .iter()
                    .map(|(name, bytes)| format!("{name} ({:.0} GiB)", *bytes as f64 / 1073741824.0))
                    .collect();
                format!("{}: {}", devices.len(), list.join(", "))
            },
        },
        Err(detail) => Check { name: "CUDA devices (driver)", ok: false, required: false, detail },
    };
    // NCCL is what GPU ranks all-reduce with; CPU ranks use MPI and do not need it.
    let nccl = match (avexpr_worker::nccl::version(), avexpr_worker::nccl::missing_libraries()) {
        (Some(v), _) => Check {
            name: "libnccl",
            ok: true,
            required: false,
            detail: format!("{}.{}.{} loaded", v / 10000, v / 100 % 100, v % 100),
        },
        (None, why) => Check {
            name: "libnccl",
            ok: false,
            required: cuda > 0,
            detail: why.unwrap_or_else(|| "libnccl.so loads but ncclGetVersion failed".into()),
        },
    };
    vec![
        torch,
        gpus,
        nccl,
        command_check("mpirun", true, "mpirun", &["--version"]),
        command_check("ffmpeg", true, "ffmpeg", &["-hide_banner", "-version"]),
        command_check(
            "python venv (benchmarks, fixtures)",
            false,
            python,
            &[
                "-c",
                "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)",
            ],
        ),
    ]
}

/// Renders the checks; `true` when every required one passed.
pub fn report(checks: &[Check]) -> (String, bool) {
    let mut text = String::new();
    for c in checks {
        let status = match (c.ok, c.required) {
            (true, _) => "ok",
            (false, true) => "MISSING",
            (false, false) => "missing (optional)",
        };
        text.push_str(&format!("{:<36} {:<20} {}\n", c.name, status, c.detail));
    }
    (text, checks.iter().all(|c| c.ok || !c.required))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_required_tool_fails_the_report() {
        let missing = command_check("nothing", true, "avexpr-no-such-program", &[]);
        assert!(!missing.ok && missing.detail.contains("not found on PATH"));
        let optional = Check { required: false, ..missing.clone() };
        assert!(report(std::slice::from_ref(&optional)).1);
        let (text, ok) = report(&[missing]);
        assert!(!ok && text.contains("MISSING"));
    }

    #[test]
    fn libtorch_is_always_reported() {
        let checks = run_checks("avexpr-no-such-python");
        assert!(checks[0].ok && checks[0].detail.contains("CUDA devices"), "{}", checks[0].detail);
        assert!(!checks.last().unwrap().ok);
    }

    /// The torch wheels scripts/setup installs on Linux x86-64 are CUDA builds: their libtorch_cuda.so must be
    /// loaded by our binaries (and this test binary, built by the same build script), or a GPU machine trains
    /// on its CPU. Fails with the `--no-as-needed` link of worker/build.rs removed.
    #[test]
    fn the_cuda_backend_is_loaded_when_libtorch_has_one() {
        let backend = cuda_backend();
        assert!(backend.as_ref().is_ok_and(|b| !b.contains("not found")), "{backend:?}");
    }
}
