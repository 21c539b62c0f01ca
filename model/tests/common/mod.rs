//! Shared by the parity tests: the reference outputs and a max-abs-difference check.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Kind, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    avexpr_model::fixtures::dir().join(name)
}

/// A writable copy of a fixture checkpoint directory (the TempDir removes it when dropped).
pub fn copy_fixture(name: &str) -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join(name);
    std::fs::create_dir(&dir).unwrap();
    for entry in std::fs::read_dir(fixture(name)).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), dir.join(entry.file_name())).unwrap();
    }
    (tmp, dir)
}

/// Rewrites `dir/config.json` through `edit`.
pub fn edit_config(dir: &std::path::Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, config.to_string()).unwrap();
}

pub fn expected() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture("expected.safetensors")).expect("expected.safetensors").into_iter().collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double)).abs().max().double_value(&[])
}

#[track_caller]
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, atol: f64) {
    let diff = max_abs_diff(&ours.to_device(tch::Device::Cpu), reference);
    assert!(diff <= atol, "{what}: max |ours - reference| = {diff:e} > {atol:e}");
}
