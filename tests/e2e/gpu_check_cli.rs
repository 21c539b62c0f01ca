//! `scripts/gpu-check`, the GPU path's proof in one command, run as the suite can run it: `--cpu` takes every
//! step through the same code paths on the CPU (bf16 where CUDA would use bf16), and without `--cpu` on a
//! machine with no GPU every device step fails with its reason in the table and the exit status. That second
//! run goes through a bundle (`scripts/gpu-bundle --prebuilt`, `scripts/gpu-check --bundle`), the way a GPU
//! machine with no network runs the check.

use std::path::Path;
use std::process::Command;

use avexpr_tests::binary;

/// The folder of our binaries.
fn bin() -> std::path::PathBuf {
    Path::new(binary("worker").get_program()).parent().unwrap().to_path_buf()
}

/// `scripts/NAME` with the quickstart's assets under `tmp` (6 videos), our binaries, and the project venv's
/// Python first on PATH (a bundle's run uses the `python3` it finds, as on a GPU machine).
fn script(name: &str, tmp: &Path) -> Command {
    let python = std::env::var("AVEXPR_PYTHON").unwrap_or_else(|_| "python3".into());
    let venv_bin = Path::new(&python).parent().map(Path::to_path_buf).unwrap_or_default();
    let mut cmd = Command::new(Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts").join(name));
    cmd.env("PATH", format!("{}:{}", venv_bin.display(), std::env::var("PATH").unwrap()))
        .env("AVEXPR_BIN", bin())
        .env("AVEXPR_QUICKSTART", tmp.join("quickstart"))
        .env("AVEXPR_QUICKSTART_VIDEOS", "6")
        .env_remove("LD_LIBRARY_PATH");
    cmd
}

/// `scripts/gpu-check ARGS --quick --steps 12 --out tmp/OUT`: its output and JSON.
fn gpu_check(tmp: &Path, out: &str, args: &[&str]) -> (std::process::Output, serde_json::Value) {
    let out_dir = tmp.join(out);
    let output =
        script("gpu-check", tmp).args(args).args(["--quick", "--steps", "12", "--out"]).arg(&out_dir).output().unwrap();
    let json = std::fs::read(out_dir.join("gpu-check.json"))
        .unwrap_or_else(|e| panic!("no gpu-check.json ({e}): {}", String::from_utf8_lossy(&output.stderr)));
    (output, serde_json::from_slice(&json).unwrap())
}

fn step<'a>(doc: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    doc["steps"].as_array().unwrap().iter().find(|s| s["step"] == name).unwrap_or_else(|| panic!("no step {name}"))
}

#[test]
fn the_gpu_check_runs_every_step_on_the_cpu_and_fails_where_there_is_no_gpu() {
    let tmp = tempfile::tempdir().unwrap();
    let (output, doc) = gpu_check(tmp.path(), "cpu", &["--cpu"]);
    let (stdout, stderr) = (String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "gpu-check --cpu failed:\n{stdout}\n{stderr}");
    let names = ["doctor", "embed", "nccl", "train", "encoders", "head"];
    for name in names {
        let s = step(&doc, name);
        assert_eq!(s["status"], "pass", "{s}");
        assert!(s["seconds"].as_f64().unwrap() <= s["limit_s"].as_f64().unwrap(), "{s}");
        assert!(stdout.lines().any(|l| l.starts_with(name) && l.contains("pass")), "{name} in the table:\n{stdout}");
    }

    // bf16 against f32 on every embedding of both encoder pairs: close (cosine >= 0.999), and not the same
    // numbers (the two precisions really ran).
    let embed = &step(&doc, "embed")["figures"];
    for pair in ["fixture", "quickstart"] {
        for tensor in ["image_embeds", "text_embeds", "audio.0.hidden_states", "audio.0.last_hidden_state"] {
            let f = &embed[format!("{pair}.{tensor}")];
            let cos = f["min_cosine"].as_f64().unwrap_or_else(|| panic!("{pair}.{tensor} missing: {embed}"));
            assert!((0.999..1.0).contains(&cos) && f["max_abs_diff"].as_f64().unwrap() > 0.0, "{pair}.{tensor}: {f}");
        }
    }
    // The loss curves of f32 and bf16 autocast from the same checkpoint: different, within the tolerances.
    let train = &step(&doc, "train")["figures"];
    assert_eq!(train["identical"], false, "{train}");
    let first = train["first_step"]["relative_diff"].as_f64().unwrap();
    assert!(first > 0.0 && first < 0.03, "{train}");
    assert_eq!(train["first_step"]["step"], 2, "{train}");
    assert_eq!(train["windows"].as_array().unwrap().len(), 4, "{train}");
    assert!(step(&doc, "encoders")["figures"]["clip_frames_per_s"].as_f64().unwrap() > 0.0);
    assert!(step(&doc, "head")["figures"]["clips_per_s"].as_f64().unwrap() > 0.0);
    assert!(doc["peak_gpu_mib"].is_null());

    // Without --cpu on this GPU-less machine, from a bundle of these binaries: the device steps fail with their
    // reasons, and the exit status says so.
    let bundle = tmp.path().join("bundle");
    let packed =
        script("gpu-bundle", tmp.path()).arg("--prebuilt").arg(bin()).arg("--out").arg(&bundle).output().unwrap();
    assert!(packed.status.success(), "gpu-bundle: {}", String::from_utf8_lossy(&packed.stderr));
    for file in ["bin.tar", "mpi.tar.gz", "assets.tar", "torch-version"] {
        assert!(bundle.join(file).exists(), "{file} missing from the bundle");
    }
    let (output, doc) = gpu_check(tmp.path(), "bundled", &["--bundle", bundle.to_str().unwrap()]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert_eq!(output.status.code(), Some(1), "{stdout}");
    assert!(step(&doc, "doctor")["summary"].as_str().unwrap().contains("libtorch sees no CUDA device"), "{stdout}");
    for name in ["embed", "train", "encoders", "head"] {
        let s = step(&doc, name);
        assert_eq!(s["status"], "FAIL", "{s}");
        assert!(stdout.lines().any(|l| l.starts_with(name) && l.contains("FAIL")), "{name}:\n{stdout}");
    }
    assert!(step(&doc, "embed")["summary"].as_str().unwrap().contains("CUDA device(s) are visible"), "{stdout}");
    // The bundle's binaries ran on the libtorch of the python3 found on PATH, its CUDA backend loaded.
    let doctor = step(&doc, "doctor")["summary"].as_str().unwrap().to_string();
    assert!(doctor.contains("CUDA backend loaded") || doctor.contains("CPU-only libtorch"), "{doctor}");
    let nccl = std::fs::read_to_string(tmp.path().join("bundled/logs/nccl-check-1.log")).unwrap_or_default();
    assert!(nccl.contains("reached all 1 ranks"), "nccl-check under mpirun, from the bundle: {nccl}");

    // A bundle built against another torch than this machine's is refused before anything runs.
    std::fs::write(bundle.join("torch-version"), "2.0.0\n").unwrap();
    let refused = script("gpu-check", tmp.path()).arg("--bundle").arg(&bundle).output().unwrap();
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success() && stderr.contains("built against torch 2.0.0"), "{stderr}");
    assert!(stderr.contains("run scripts/gpu-bundle --torch"), "{stderr}");
}
