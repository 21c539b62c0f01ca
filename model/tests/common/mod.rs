//! Shared by the parity tests: the reference outputs and a max-abs-difference check.
#![allow(dead_code)] // each test binary uses a different part

use std::collections::HashMap;
use std::path::PathBuf;

use tch::{Kind, Tensor};

pub fn fixture(name: &str) -> PathBuf {
    avexpr_model::fixtures::dir().join(name)
}

pub fn expected() -> HashMap<String, Tensor> {
    Tensor::read_safetensors(fixture("expected.safetensors"))
        .expect("expected.safetensors")
        .into_iter()
        .collect()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.size(), b.size(), "shapes differ");
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

#[track_caller]
pub fn assert_close(what: &str, ours: &Tensor, reference: &Tensor, atol: f64) {
    let diff = max_abs_diff(&ours.to_device(tch::Device::Cpu), reference);
    assert!(
        diff <= atol,
        "{what}: max |ours - reference| = {diff:e} > {atol:e}"
    );
}
