//! Loading Hugging Face checkpoint directories (the pretrained encoders; training checkpoints are the worker's
//! `checkpoint` module): `config.json`, and weights from `model.safetensors` (memory-mapped) or, for older
//! repositories, `pytorch_model.bin`.
//!
//! Every variable of the VarStore must be found under its HF key (after the model's [`KeyMap`]) with exactly
//! the variable's shape; extra tensors in the file (the other tower of a `CLIPModel`, a CTC head) are ignored.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor, nn::VarStore};

use crate::error::{ModelError, Result};

/// How a model's checkpoint keys map onto its variable paths: one table per model.
#[derive(Debug, Clone, Copy, Default)]
pub struct KeyMap {
    /// Prefixes dropped from checkpoint keys (e.g. `wav2vec2.` in `Wav2Vec2ForCTC` checkpoints).
    pub strip_prefixes: &'static [&'static str],
    /// Suffix renames from older key styles to the variable paths (e.g. weight-norm `weight_g`).
    pub renames: &'static [(&'static str, &'static str)],
}

impl KeyMap {
    pub fn canonical(&self, key: &str) -> String {
        let key = self.strip_prefixes.iter().find_map(|p| key.strip_prefix(p)).unwrap_or(key);
        for (old, new) in self.renames {
            if let Some(stem) = key.strip_suffix(old) {
                return format!("{stem}{new}");
            }
        }
        key.to_string()
    }
}

/// The weights file of an HF checkpoint directory.
pub fn weights_file(dir: &Path) -> Result<PathBuf> {
    ["model.safetensors", "pytorch_model.bin"]
        .iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| ModelError::NoWeights { dir: dir.to_path_buf() })
}

/// Reads and parses a JSON file (a `config.json`, a `preprocessor_config.json`).
pub fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| ModelError::io(path, e))?;
    serde_json::from_str(&text).map_err(|error| ModelError::BadJson { path: path.to_path_buf(), error })
}

/// What a load did, for the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadReport {
    pub loaded: usize,
    pub ignored: usize,
}

/// Copies every variable of `vs` from the checkpoint at `path`, converting dtypes as needed.
pub fn load_into(vs: &VarStore, path: &Path, keymap: &KeyMap) -> Result<LoadReport> {
    let variables = vs.variables();
    let is_safetensors = path.extension().is_some_and(|e| e == "safetensors");
    let report = if is_safetensors {
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        // SAFETY: the file is opened read-only and only read while the map lives; a concurrent writer could
        // change the bytes under us, which at worst gives wrong weights, as reading the file would.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| ModelError::io(path, e))?;
        let st = SafeTensors::deserialize(&mmap)
            .map_err(|e| ModelError::BadCheckpoint { path: path.to_path_buf(), reason: e.to_string() })?;
        let by_name: HashMap<String, String> =
            st.names().into_iter().map(|n| (keymap.canonical(n), n.to_string())).collect();
        for (name, var) in &variables {
            let key = by_name
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor { path: path.to_path_buf(), key: name.clone() })?;
            let view = st
                .tensor(key)
                .map_err(|e| ModelError::BadCheckpoint { path: path.to_path_buf(), reason: e.to_string() })?;
            let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            check_shape(path, key, var, &shape)?;
            let kind = match view.dtype() {
                Dtype::F32 => Kind::Float,
                Dtype::F16 => Kind::Half,
                Dtype::BF16 => Kind::BFloat16,
                Dtype::F64 => Kind::Double,
                other => {
                    return Err(ModelError::UnsupportedDtype {
                        path: path.to_path_buf(),
                        key: key.clone(),
                        dtype: format!("{other:?}"),
                    });
                }
            };
            let src = Tensor::f_from_data_size(view.data(), &shape, kind)?;
            copy_into(var, &src)?;
        }
        LoadReport { loaded: variables.len(), ignored: by_name.len().saturating_sub(variables.len()) }
    } else {
        let named = Tensor::loadz_multi(path)
            .map_err(|e| ModelError::BadCheckpoint { path: path.to_path_buf(), reason: e.to_string() })?;
        let by_name: HashMap<String, (String, Tensor)> =
            named.into_iter().map(|(n, t)| (keymap.canonical(&n), (n, t))).collect();
        for (name, var) in &variables {
            let (key, src) = by_name
                .get(name)
                .ok_or_else(|| ModelError::MissingTensor { path: path.to_path_buf(), key: name.clone() })?;
            check_shape(path, key, var, &src.size())?;
            if !src.is_floating_point() {
                return Err(ModelError::UnsupportedDtype {
                    path: path.to_path_buf(),
                    key: key.clone(),
                    dtype: format!("{:?}", src.kind()),
                });
            }
            copy_into(var, src)?;
        }
        LoadReport { loaded: variables.len(), ignored: by_name.len().saturating_sub(variables.len()) }
    };
    tracing::debug!(file = %path.display(), loaded = report.loaded, ignored = report.ignored, "checkpoint loaded");
    Ok(report)
}

fn check_shape(path: &Path, key: &str, var: &Tensor, found: &[i64]) -> Result<()> {
    let expected = var.size();
    if expected != found {
        return Err(ModelError::ShapeMismatch {
            path: path.to_path_buf(),
            key: key.to_string(),
            expected,
            found: found.to_vec(),
        });
    }
    Ok(())
}

fn copy_into(var: &Tensor, src: &Tensor) -> Result<()> {
    let src = src.f_to_kind(var.kind())?;
    tch::no_grad(|| var.shallow_clone().f_copy_(&src))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keymap_strips_prefix_and_renames_old_weight_norm_keys() {
        let map =
            KeyMap { strip_prefixes: &["wav2vec2."], renames: &[(".weight_g", ".parametrizations.weight.original0")] };
        assert_eq!(
            map.canonical("wav2vec2.encoder.pos_conv_embed.conv.weight_g"),
            "encoder.pos_conv_embed.conv.parametrizations.weight.original0"
        );
        assert_eq!(map.canonical("encoder.layer_norm.weight"), "encoder.layer_norm.weight");
        assert_eq!(map.canonical("lm_head.weight"), "lm_head.weight");
    }
}
