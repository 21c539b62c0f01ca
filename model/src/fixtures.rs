//! Where the parity fixtures live, for this workspace's tests and benchmarks (not for users).
//!
//! The committed fixtures (`model/tests/fixtures`: tiny random HF checkpoints, inputs and reference outputs)
//! are written by `generate.py` there. The real CLIP tokenizer (2+ MB, derived from the vocabulary that the
//! `open-clip-torch` package ships) is generated on first use into `target/fixtures/clip-tokenizer` with the
//! project venv's Python (`AVEXPR_PYTHON`, set by `scripts/setup` in `.cargo/config.toml`).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// `model/tests/fixtures`.
pub fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures")
}

static GENERATE: Mutex<()> = Mutex::new(());

/// The real CLIP tokenizer files and `reference_ids.json`, generated once.
pub fn clip_tokenizer_dir() -> Result<PathBuf, String> {
    let out = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("target").join("fixtures").join("clip-tokenizer");
    let _guard = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    if out.join("reference_ids.json").is_file() {
        return Ok(out);
    }
    let python = std::env::var("AVEXPR_PYTHON").unwrap_or_else(|_| "python3".into());
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    let status = std::process::Command::new(&python)
        .arg(dir().join("generate.py"))
        .arg("tokenizer")
        .arg(&tmp)
        .status()
        .map_err(|e| format!("cannot run {python} (run scripts/setup first): {e}"))?;
    if !status.success() {
        return Err(format!("{python} generate.py tokenizer failed ({status}); run scripts/setup first"));
    }
    std::fs::rename(&tmp, &out).map_err(|e| format!("{}: {e}", out.display()))?;
    Ok(out)
}
