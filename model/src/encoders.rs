//! What the frozen encoders share: where they run, in which precision, and how they are built from a checkpoint.

use std::path::Path;

use tch::{Device, Kind, Tensor, nn, nn::VarStore};

use crate::error::Result;
use crate::hf::{KeyMap, load_into};
use crate::lora::LoraSpec;

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

/// What adapting a tower needs from its model.
pub(crate) trait AdaptableModel {
    type Config;
    /// LoRA on every layer (the query and value projections, and the feed-forward if `spec.mlp`), its
    /// variables under `vs` at the checkpoint's paths.
    fn attach_lora(&mut self, vs: &nn::Path, spec: LoraSpec);
    /// The layers from `first` on (and what follows them) rebuilt under `vs`, mirroring the checkpoint's root;
    /// returns the checkpoint keys' prefixes of what was rebuilt.
    fn rebuild_tail(&mut self, vs: &nn::Path, cfg: &Self::Config, first: i64) -> Vec<String>;
}

/// An encoder's model with its own variables, where and in which precision it runs, and whether it adapts.
#[derive(Debug)]
pub(crate) struct Tower<M> {
    pub vs: VarStore,
    pub model: M,
    pub options: EncoderOptions,
    /// Adapted (LoRA or last blocks): its forward keeps the autograd graph.
    pub adapted: bool,
}

impl<M> Tower<M> {
    /// What [`build_frozen`] built, not adapted.
    pub fn new((vs, model): (VarStore, M), options: EncoderOptions) -> Self {
        Self { vs, model, options, adapted: false }
    }

    /// `forward` on `input` moved to the tower's device and precision, under no_grad unless the tower adapts
    /// (then the gradients reach the adapted variables; the frozen weights never need one).
    pub fn run<T>(&self, input: &Tensor, forward: impl FnOnce(&M, &Tensor) -> T) -> T {
        let run = || forward(&self.model, &input.to_device(self.options.device).to_kind(self.options.kind()));
        if self.adapted { run() } else { tch::no_grad(run) }
    }
}

impl<M: AdaptableModel> Tower<M> {
    pub fn attach_lora(&mut self, vs: &nn::Path, spec: LoraSpec) {
        self.model.attach_lora(vs, spec);
        self.adapted = true;
    }

    /// The layers from `first` on (and what follows them) trainable under `vs`, from the checkpoint's values;
    /// the frozen layers before them record no graph. Returns how many variables were copied.
    pub fn adapt_last_blocks(&mut self, vs: &nn::Path, cfg: &M::Config, first: i64) -> usize {
        let prefixes = self.model.rebuild_tail(vs, cfg, first);
        self.adapted = true;
        copy_frozen_into(&self.vs, vs, &prefixes)
    }
}
