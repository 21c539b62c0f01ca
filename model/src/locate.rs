//! Where a frozen encoder's Hugging Face checkpoint directory is, from what `model.<encoder>.checkpoint` says:
//!
//! - a directory path: used as it is (checked first, as `from_pretrained` does);
//! - a Hugging Face model id (`openai/clip-vit-base-patch32`, with `revision:` a branch, tag or commit hash;
//!   default `main`): resolved offline from the local hub cache exactly as `transformers` does with
//!   `local_files_only=True`: the cache is `HF_HUB_CACHE`, else `HUGGINGFACE_HUB_CACHE`, else `$HF_HOME/hub`, else
//!   `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`; `refs/<revision>` names the commit
//!   whose `snapshots/<commit>/` is the directory. The network is never used;
//! - a store URI (`s3://bucket/models/clip-vit-base-patch32`): a directory uploaded with [`push`] (its files and
//!   [`MANIFEST`], written last, listing each file's size and SHA-256), fetched once per host into
//!   `<cache>/<key>/`, the key being the SHA-256 of the manifest's file list, every file verified. Ranks of one
//!   host share the download (a file lock); the cache is `AVEXPR_ENCODER_CACHE`, else
//!   `$XDG_CACHE_HOME/avexpr/encoders`, else `~/.cache/avexpr/encoders`.

use std::io::Write;
use std::path::{Path, PathBuf};

use avexpr_data::store::Store;
use hf_hub::{Repo, RepoType};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::{EncoderConfig, ModelConfig};
use crate::error::{ModelError, Result};

/// The file list of an encoder directory in a store, written last by [`push`].
pub const MANIFEST: &str = "avexpr-encoder.json";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub files: Vec<ManifestFile>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestFile {
    pub name: String,
    pub size: u64,
    pub sha256: String,
}

impl Manifest {
    /// The local cache key: SHA-256 over the sorted `name sha256` lines (sizes follow from the contents).
    pub fn key(&self) -> String {
        let mut lines: Vec<String> = self.files.iter().map(|f| format!("{}\t{}\n", f.name, f.sha256)).collect();
        lines.sort();
        hex::encode(Sha256::digest(lines.concat().as_bytes()))
    }
}

/// The local checkpoint directory `cfg` names. `fields` name its checkpoint and revision in messages
/// (`["model.clip.checkpoint", "model.clip.revision"]`, or command-line options).
pub fn locate(cfg: &EncoderConfig, fields: [&str; 2]) -> Result<PathBuf> {
    let spec = cfg.checkpoint.as_str();
    let [field, revision] = fields;
    let err = |reason: String| ModelError::Locate { field: field.into(), spec: spec.into(), reason };
    if spec.contains("://") {
        if cfg.revision.is_some() {
            return Err(err(format!("{revision} applies to Hugging Face model ids, not to store URIs")));
        }
        return fetch(spec, &encoder_cache()).map_err(err);
    }
    let path = Path::new(spec);
    if path.is_dir() {
        if cfg.revision.is_some() {
            return Err(err(format!("is a directory; {revision} applies to Hugging Face model ids")));
        }
        return Ok(path.to_path_buf());
    }
    if !is_repo_id(spec) {
        return Err(err("no such directory (nor a Hugging Face model id, nor a store URI)".into()));
    }
    hub_snapshot(&hub_cache(), spec, cfg.revision.as_deref().unwrap_or("main")).map_err(err)
}

/// The local checkpoint directories of a model's two frozen encoders, `(clip, wav2vec2)`; errors name the job
/// file's fields.
pub fn locate_encoders(cfg: &ModelConfig) -> Result<(PathBuf, PathBuf)> {
    Ok((
        locate(&cfg.clip, ["model.clip.checkpoint", "model.clip.revision"])?,
        locate(&cfg.wav2vec2, ["model.wav2vec2.checkpoint", "model.wav2vec2.revision"])?,
    ))
}

/// The local checkpoint directory of the face-frame encoder: CLIP's (the same as the text tower's) or DINOv2's,
/// as `model.image_encoder` says.
pub fn locate_image_encoder(cfg: &ModelConfig) -> Result<PathBuf> {
    match cfg.image_encoder {
        crate::config::ImageEncoder::Clip => locate(&cfg.clip, ["model.clip.checkpoint", "model.clip.revision"]),
        crate::config::ImageEncoder::Dinov2 => {
            locate(&cfg.dinov2, ["model.dinov2.checkpoint", "model.dinov2.revision"])
        }
    }
}

/// `huggingface_hub.utils.validate_repo_id`: `[namespace/]name` of word characters, `-` and `.`, at most 96
/// characters, no `--` or `..`, not starting or ending with `-` or `.`.
fn is_repo_id(id: &str) -> bool {
    let parts: Vec<&str> = id.split('/').collect();
    id.len() <= 96
        && (1..=2).contains(&parts.len())
        && !id.contains("--")
        && !id.contains("..")
        && parts.iter().all(|p| {
            !p.is_empty()
                && p.chars().all(|c| c.is_alphanumeric() || "_-.".contains(c))
                && !p.starts_with(['-', '.'])
                && !p.ends_with(['-', '.'])
        })
}

/// A directory from the environment (an empty variable counts as unset).
fn env_dir(name: &str) -> Option<PathBuf> {
    std::env::var_os(name).filter(|v| !v.is_empty()).map(PathBuf::from)
}

/// `$XDG_CACHE_HOME`, else `~/.cache`.
fn user_cache() -> PathBuf {
    env_dir("XDG_CACHE_HOME").unwrap_or_else(|| env_dir("HOME").unwrap_or_default().join(".cache"))
}

/// The hub cache directory, as `huggingface_hub.constants.HF_HUB_CACHE` is computed.
pub fn hub_cache() -> PathBuf {
    env_dir("HF_HUB_CACHE")
        .or_else(|| env_dir("HUGGINGFACE_HUB_CACHE"))
        .unwrap_or_else(|| env_dir("HF_HOME").unwrap_or_else(|| user_cache().join("huggingface")).join("hub"))
}

/// `snapshots/<commit>/` of model `id` at `revision` (a ref, or a commit hash) in the hub cache `cache`.
pub fn hub_snapshot(cache: &Path, id: &str, revision: &str) -> Result<PathBuf, String> {
    let repo = Repo::with_revision(id.to_string(), RepoType::Model, revision.to_string());
    let repo_dir = cache.join(repo.folder_name());
    let found = hf_hub::Cache::new(cache.to_path_buf()).repo(repo.clone()).get("config.json");
    let snapshot = match found {
        Some(config) => config.parent().map(Path::to_path_buf).unwrap_or_default(),
        // A commit hash has no ref file: its snapshot is named by it.
        None if revision.len() == 40 && revision.chars().all(|c| c.is_ascii_hexdigit()) => {
            repo_dir.join("snapshots").join(revision)
        }
        None => {
            let reference = repo_dir.join("refs").join(revision);
            return Err(if reference.is_file() {
                format!("{} has no config.json (an incomplete download?)", snapshot_of(&repo_dir, &reference))
            } else {
                format!(
                    "no such directory, and model `{id}` (revision {revision}) is not in the Hugging Face cache: no {} \
                     (the cache is HF_HUB_CACHE, else $HF_HOME/hub, else ~/.cache/huggingface/hub; download it once \
                     with `hf download {id}` where there is network)",
                    reference.display()
                )
            });
        }
    };
    if !snapshot.join("config.json").is_file() {
        return Err(format!("{}: no config.json (not in the cache, or an incomplete download)", snapshot.display()));
    }
    tracing::debug!(model = id, revision, snapshot = %snapshot.display(), "resolved from the Hugging Face cache");
    Ok(snapshot)
}

fn snapshot_of(repo_dir: &Path, reference: &Path) -> String {
    let commit = std::fs::read_to_string(reference).unwrap_or_default();
    repo_dir.join("snapshots").join(commit.trim()).display().to_string()
}

/// The per-host cache of encoder directories fetched from stores.
pub fn encoder_cache() -> PathBuf {
    env_dir("AVEXPR_ENCODER_CACHE").unwrap_or_else(|| user_cache().join("avexpr/encoders"))
}

/// The directory at store `uri`, fetched into `cache/<key>` unless already there.
pub fn fetch(uri: &str, cache: &Path) -> Result<PathBuf, String> {
    let store = Store::open(uri).map_err(|e| e.to_string())?;
    let store = store.blocking();
    let bytes = store.get(MANIFEST).map_err(|e| {
        format!("{e} (upload the checkpoint directory with `worker push-encoder DIR {uri}`: it writes {MANIFEST})")
    })?;
    let manifest: Manifest = serde_json::from_slice(&bytes).map_err(|e| format!("{uri}/{MANIFEST}: malformed: {e}"))?;
    if manifest.files.iter().any(|f| f.name.contains('/') || f.name.starts_with('.') || f.name.is_empty()) {
        return Err(format!("{uri}/{MANIFEST}: file names must be plain names"));
    }
    let dir = cache.join(manifest.key());
    if dir.is_dir() {
        return Ok(dir);
    }
    std::fs::create_dir_all(cache).map_err(|e| format!("{}: {e}", cache.display()))?;
    // One download per host: the ranks of a host wait for the first one's.
    let lock_path = cache.join(format!("{}.lock", manifest.key()));
    let lock = std::fs::File::create(&lock_path).map_err(|e| format!("{}: {e}", lock_path.display()))?;
    lock.lock().map_err(|e| format!("{}: {e}", lock_path.display()))?;
    if dir.is_dir() {
        return Ok(dir);
    }
    let partial = cache.join(format!("{}.partial-{}", manifest.key(), std::process::id()));
    let _ = std::fs::remove_dir_all(&partial);
    std::fs::create_dir_all(&partial).map_err(|e| format!("{}: {e}", partial.display()))?;
    let started = std::time::Instant::now();
    let mut total = 0;
    for f in &manifest.files {
        let data = store.get_sized(&f.name, f.size).map_err(|e| e.to_string())?;
        let sha = hex::encode(Sha256::digest(&data));
        if sha != f.sha256 {
            let _ = std::fs::remove_dir_all(&partial);
            return Err(format!("{uri}/{}: SHA-256 {sha}, the manifest says {}", f.name, f.sha256));
        }
        let path = partial.join(&f.name);
        let mut file = std::fs::File::create(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        file.write_all(&data).and_then(|_| file.sync_all()).map_err(|e| format!("{}: {e}", path.display()))?;
        total += f.size;
    }
    std::fs::rename(&partial, &dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    tracing::info!(uri, dir = %dir.display(), bytes = total, seconds = started.elapsed().as_secs_f64(), "encoder checkpoint fetched");
    Ok(dir)
}

/// Uploads the files of checkpoint directory `dir` (not its sub-directories) to store `uri`, then [`MANIFEST`].
pub fn push(dir: &Path, uri: &str) -> Result<Manifest, String> {
    let store = Store::open(uri).map_err(|e| e.to_string())?;
    let store = store.blocking();
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map_err(|e| format!("{}: {e}", dir.display()))?
        .filter_map(|e| e.ok())
        // Hub snapshots hold symlinks into blobs/: follow them.
        .filter(|e| e.path().is_file())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.') && n != MANIFEST)
        .collect();
    names.sort();
    if !names.iter().any(|n| n == "config.json") {
        return Err(format!("{}: no config.json: not a Hugging Face checkpoint directory", dir.display()));
    }
    let mut files = Vec::new();
    for name in names {
        let path = dir.join(&name);
        let data = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        files.push(ManifestFile {
            name: name.clone(),
            size: data.len() as u64,
            sha256: hex::encode(Sha256::digest(&data)),
        });
        store.put(&name, data.into()).map_err(|e| e.to_string())?;
    }
    let manifest = Manifest { files };
    let json = serde_json::to_vec_pretty(&manifest).expect("a manifest serializes");
    store.put(MANIFEST, json.into()).map_err(|e| e.to_string())?;
    Ok(manifest)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repo_ids_are_told_from_paths_as_huggingface_hub_does() {
        for id in ["openai/clip-vit-base-patch32", "facebook/wav2vec2-base", "gpt2", "a_b.c/d-e"] {
            assert!(is_repo_id(id), "{id}");
        }
        for id in ["/abs/path", "a/b/c", "a--b/c", "a/..", "./x", "a/b-", "", "x y/z"] {
            assert!(!is_repo_id(id), "{id}");
        }
    }
}
