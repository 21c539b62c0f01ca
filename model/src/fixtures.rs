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
    with_tokenizer(&dir().join("clip-tiny"), "clip-tiny")
}

/// The quickstart's pretrained encoders (`model/quickstart`, see its README): the CLIP directory with the
/// real tokenizer beside it (`target/fixtures/quickstart-clip`) and the Wav2Vec 2.0 directory.
pub fn quickstart_encoders() -> Result<(PathBuf, PathBuf), String> {
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("quickstart");
    Ok((with_tokenizer(&quickstart.join("clip"), "quickstart-clip")?, quickstart.join("wav2vec2")))
}

/// `checkpoint`'s files plus the tokenizer's in `target/fixtures/<name>`, assembled once, atomically.
fn with_tokenizer(checkpoint: &Path, name: &str) -> Result<PathBuf, String> {
    let tokenizer = clip_tokenizer_dir()?;
    let out = tokenizer.with_file_name(name);
    let _guard = GENERATE.lock().unwrap_or_else(|e| e.into_inner());
    let weights = |d: &Path| std::fs::read(d.join("model.safetensors")).ok();
    if out.join("tokenizer.json").is_file() {
        if weights(&out) == weights(checkpoint) {
            return Ok(out);
        }
        // Assembled from weights that have since been regenerated.
        std::fs::remove_dir_all(&out).map_err(|e| format!("{}: {e}", out.display()))?;
    }
    let tmp = out.with_extension(format!("tmp{}", std::process::id()));
    std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
    let copy = |from: PathBuf, name: &std::ffi::OsStr| {
        std::fs::copy(&from, tmp.join(name)).map(|_| ()).map_err(|e| format!("{}: {e}", from.display()))
    };
    for entry in std::fs::read_dir(checkpoint).map_err(|e| format!("{}: {e}", checkpoint.display()))? {
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
