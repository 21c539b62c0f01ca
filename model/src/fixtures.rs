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

/// The tiny random CLIP checkpoint with the real tokenizer beside it, as a user's checkpoint directory holds
/// them (`target/fixtures/clip-tiny`). Assembled once, atomically: tests read it concurrently.
pub fn clip_tiny_with_tokenizer() -> Result<PathBuf, String> {
    let tokenizer = clip_tokenizer_dir()?;
    let out = tokenizer.with_file_name("clip-tiny");
    let _guard = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    if out.join("tokenizer.json").is_file() {
        return Ok(out);
    }
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let copy = |from: PathBuf, name: &std::ffi::OsStr| {
        std::fs::copy(&from, tmp.join(name)).map(|_| ()).map_err(|e| format!("{}: {e}", from.display()))
    };
    for entry in std::fs::read_dir(dir().join("clip-tiny")).map_err(|e| e.to_string())? {
        let entry = entry.map_err(|e| e.to_string())?;
        copy(entry.path(), &entry.file_name())?;
    }
    for name in ["tokenizer.json", "tokenizer_config.json"] {
        copy(tokenizer.join(name), std::ffi::OsStr::new(name))?;
    }
    // Another process may have won the race; its copy is as good as ours.
    if std::fs::rename(&tmp, &out).is_err() && out.join("tokenizer.json").is_file() {
        let _ = std::fs::remove_dir_all(&tmp);
    }
    Ok(out)
}
