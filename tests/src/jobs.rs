//! The synthetic job of the end-to-end tests: a small Aff-Wild2-layout dataset ingested to a local store and
//! a job config on the tiny random encoders.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tch::Tensor;

use crate::binary;

pub struct Dataset {
    pub _tmp: tempfile::TempDir,
    pub shards: PathBuf,
    pub root: PathBuf,
}

pub fn dataset() -> Dataset {
    let tmp = tempfile::tempdir().unwrap();
    let (root, shards) = (tmp.path().join("affwild2"), tmp.path().join("shards"));
    let out = binary("data")
        .args(["synth", "--videos", "6", "--min-seconds", "2", "--max-seconds", "3", "--seed", "4", "--out"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = binary("data")
        .args(["ingest", "--segment-frames", "16", "--shard-frames", "32", "--root"])
        .arg(&root)
        .arg("--out")
        .arg(&shards)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    Dataset { root: tmp.path().to_path_buf(), _tmp: tmp, shards }
}

/// A job on the tiny encoders: 2-frame micro-batches, global batch 4, checkpoints every 2 steps.
pub fn job(d: &Dataset, name: &str, steps: u64, extra: &str) -> PathBuf {
    let clip = avexpr_model::fixtures::clip_tiny_with_tokenizer().unwrap();
    let wav2vec2 = avexpr_model::fixtures::dir().join("wav2vec2-tiny-group");
    let run = d.root.join(name);
    let yaml = format!(
        "run_dir: {run}\n\
         data: {{shards: {shards}, frames_per_clip: 8, stride: 4, shuffle_shards: 2, image_size: 32, \
         prefetch_bytes: 8388608, decode_threads: 1}}\n\
         model:\n  clip: {{checkpoint: {clip}}}\n  wav2vec2: {{checkpoint: {wav2vec2}}}\n\
         \x20 tcn: {{channels: [16, 16], kernel_size: 3, dropout: 0.1}}\n\
         \x20 adapter: {{layers: weighted_sum, bottleneck: 16, dropout: 0.1}}\n\
         \x20 fusion: {{dim: 16, layers: 1, heads: 2, ff_dim: 32, dropout: 0.1}}\n\
         \x20 head: {{hidden: 16, dropout: 0.1}}\n\
         train: {{global_batch: 4, micro_batch: 2, steps: {steps}, warmup_steps: 1, log_every: 1, threads: 1}}\n\
         checkpoint: {{every: 2, keep_last_k: 3}}\n{extra}",
        run = run.display(),
        shards = d.shards.display(),
        clip = clip.display(),
        wav2vec2 = wav2vec2.display(),
    );
    let path = d.root.join(format!("{name}.yaml"));
    std::fs::write(&path, yaml).unwrap();
    path
}

pub fn run_dir(config: &Path) -> PathBuf {
    config.with_extension("")
}

pub fn checkpoint(config: &Path, step: u64) -> PathBuf {
    run_dir(config).join("checkpoints").join(format!("step-{step:08}"))
}

pub fn variables(config: &Path, step: u64) -> BTreeMap<String, Tensor> {
    Tensor::read_safetensors(checkpoint(config, step).join("variables.safetensors")).unwrap().into_iter().collect()
}

pub fn max_diff(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> f64 {
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    a.iter().map(|(k, t)| (t - &b[k]).abs().max().double_value(&[])).fold(0.0, f64::max)
}

pub fn ok(out: std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "{}\n{stderr}", String::from_utf8_lossy(&out.stdout));
    stderr
}
