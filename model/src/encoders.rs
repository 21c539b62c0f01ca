//! What the frozen encoders share: where they run, in which precision, and how they are built from a checkpoint.

use std::path::Path;

use tch::{Device, Kind, nn, nn::VarStore};

use crate::error::Result;
use crate::hf::{KeyMap, load_into};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Precision {
    /// f32 weights and activations (the default; what parity is tested in).
    #[default]
    F32,
    /// bf16 weights and activations, meant for CUDA; outputs are returned as f32.
    Bf16,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EncoderOptions {
    pub device: Device,
    pub precision: Precision,
}

impl Default for EncoderOptions {
    fn default() -> Self {
        Self { device: Device::Cpu, precision: Precision::F32 }
    }
}

impl EncoderOptions {
    /// `cuda:0` in bf16 when CUDA is available, else CPU in f32.
    pub fn best_available() -> Self {
        if tch::Cuda::is_available() {
            Self { device: Device::Cuda(0), precision: Precision::Bf16 }
        } else {
            Self::default()
        }
    }

    pub fn kind(&self) -> Kind {
        match self.precision {
            Precision::F32 => Kind::Float,
            Precision::Bf16 => Kind::BFloat16,
        }
    }
}

/// Builds a module on a fresh VarStore on `options.device`, copies its weights from `weights` (or keeps the
/// random initialisation when `None`), freezes every variable and casts to the chosen precision.
pub(crate) fn build_frozen<M>(
    weights: Option<(&Path, &KeyMap)>,
    options: &EncoderOptions,
    build: impl FnOnce(&nn::Path) -> M,
) -> Result<(VarStore, M)> {
    let mut vs = VarStore::new(options.device);
    let module = build(&vs.root());
    if let Some((path, keymap)) = weights {
        load_into(&vs, path, keymap)?;
    }
    vs.freeze();
    if options.precision == Precision::Bf16 {
        vs.bfloat16();
    }
    Ok((vs, module))
}

/// Adapting the last layers of an encoder: copies the frozen weights whose names start with one of `prefixes`
/// (checkpoint keys, `vision_model.encoder.layers.11.`) into the variables of the same names under `trainable`
/// (a path mirroring the checkpoint's root, where the trainable copies of those modules were built). Every
/// matched weight must have its copy. Returns how many were copied.
pub(crate) fn copy_frozen_into(frozen: &VarStore, trainable: &nn::Path, prefixes: &[String]) -> usize {
    let mut copied = 0;
    tch::no_grad(|| {
        for (name, value) in frozen.variables() {
            if !prefixes.iter().any(|p| name.starts_with(p.as_str())) {
                continue;
            }
            let mut parts: Vec<&str> = name.split('.').collect();
            let last = parts.pop().expect("a variable name");
            let path = parts.iter().fold(trainable.clone(), |p, c| p.sub(*c));
            let var = path.get(last).unwrap_or_else(|| panic!("no trainable copy of {name} was built"));
            var.shallow_clone().copy_(&value);
            copied += 1;
        }
    });
    copied
}
