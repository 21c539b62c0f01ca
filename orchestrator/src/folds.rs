//! `orchestrator folds`: k-fold cross-validation. The job's training and validation videos are re-split by
//! video into K folds (`data.folds`, seeded and stratified by class frames, `avexpr_data::folds`); fold `i`'s
//! job validates on fold `i` and trains on the others, in `<run_dir>/fold-<i>` with its checkpoints under
//! `<checkpoint.uri>/fold-<i>`. The K jobs are launched one after another like `orchestrator launch` does
//! (restarts included); the report is each fold's best validation macro F1, their mean and standard
//! deviation, and the K best checkpoints.

use std::path::PathBuf;

use anyhow::{Context, Result};
use avexpr_worker::checkpoint::{CheckpointStore, checkpoint_name};
use avexpr_worker::job::JobConfig;
use serde_yaml::{Mapping, Value};

use crate::jobs::{LaunchArgs, launch};

/// The job file of fold `fold` of `k`: the base file's text with `data.folds`, `run_dir` and `checkpoint.uri`
/// set (the other settings as written).
pub fn fold_config(base: &str, job: &JobConfig, k: usize, fold: usize, seed: u64) -> Result<String> {
    let mut doc: Value = serde_yaml::from_str(base).context("the job file")?;
    let root = doc.as_mapping_mut().context("the job file is not a mapping")?;
    let section = |root: &mut Mapping, name: &str| -> Result<Mapping> {
        match root.get(name) {
            None | Some(Value::Null) => Ok(Mapping::new()),
            Some(Value::Mapping(m)) => Ok(m.clone()),
            Some(_) => anyhow::bail!("{name}: not a mapping"),
        }
    };
    let mut data = section(root, "data")?;
    let mut folds = Mapping::new();
    folds.insert("k".into(), (k as u64).into());
    folds.insert("fold".into(), (fold as u64).into());
    folds.insert("seed".into(), seed.into());
    data.insert("folds".into(), Value::Mapping(folds));
    root.insert("data".into(), Value::Mapping(data));
    root.insert("run_dir".into(), job.run_dir.join(format!("fold-{fold}")).display().to_string().into());
    let mut checkpoint = section(root, "checkpoint")?;
    checkpoint.insert("uri".into(), fold_uri(&job.checkpoint.uri, fold).into());
    root.insert("checkpoint".into(), Value::Mapping(checkpoint));
    Ok(serde_yaml::to_string(&doc)?)
}

fn fold_uri(uri: &str, fold: usize) -> String {
    format!("{}/fold-{fold}", uri.trim_end_matches('/'))
}

/// Mean and sample standard deviation.
pub fn mean_std(values: &[f64]) -> (f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n.max(1.0);
    let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (mean, var.sqrt())
}

/// `orchestrator folds`: the K fold jobs of `a.config`, one after another; the report.
pub fn run(a: &LaunchArgs, k: usize, seed: u64) -> Result<String> {
    anyhow::ensure!(k >= 2, "--folds {k}: at least 2");
    let config = std::fs::canonicalize(&a.config).with_context(|| format!("--config {}", a.config.display()))?;
    let job = JobConfig::from_file(&config)?;
    anyhow::ensure!(
        job.data.folds.is_none(),
        "{}: data.folds is set; `orchestrator folds` sets it for each fold (remove it, or launch that one fold)",
        config.display()
    );
    let base = std::fs::read_to_string(&config).with_context(|| config.display().to_string())?;
    let dir = job.run_dir.join("folds");
    std::fs::create_dir_all(&dir).with_context(|| dir.display().to_string())?;
    let mut report = String::new();
    let mut rows = Vec::new();
    for fold in 0..k {
        let path: PathBuf = dir.join(format!("fold-{fold}.yaml"));
        avexpr_data::files::write_atomic(&path, fold_config(&base, &job, k, fold, seed)?.as_bytes())
            .with_context(|| path.display().to_string())?;
        tracing::info!(fold, k, config = %path.display(), "launching fold");
        let name = a.name.as_ref().map(|n| format!("{n}-fold{fold}"));
        report += &launch(&LaunchArgs { config: path.clone(), name, ..a.clone() })
            .with_context(|| format!("fold {fold} of {k} ({})", path.display()))?;
        if a.dry_run {
            continue;
        }
        let uri = fold_uri(&job.checkpoint.uri, fold);
        let best = CheckpointStore::open(&uri, job.checkpoint.keep_last_k)?
            .latest_valid()?
            .and_then(|c| c.state.best)
            .with_context(|| {
                format!("fold {fold}: {uri} holds no validated checkpoint (train.eval_every, eval_at_end)")
            })?;
        rows.push((fold, uri, best));
    }
    if a.dry_run {
        return Ok(report);
    }
    report += &format!("\n{k}-fold cross-validation of {} (seed {seed}):\n", config.display());
    report += &format!("{:>5} {:>10} {:>9}  checkpoint\n", "fold", "best step", "macro F1");
    for (fold, uri, best) in &rows {
        report +=
            &format!("{fold:>5} {:>10} {:>9.4}  {uri}/{}\n", best.step, best.macro_f1, checkpoint_name(best.step));
    }
    let (mean, std) = mean_std(&rows.iter().map(|r| r.2.macro_f1).collect::<Vec<_>>());
    report += &format!("macro F1 over {k} folds: {mean:.4} +- {std:.4} (mean +- sample standard deviation)\n");
    let best: Vec<String> = rows.iter().map(|(_, uri, b)| format!("{uri}/{}", checkpoint_name(b.step))).collect();
    report += &format!(
        "the {k} best as an ensemble: mpirun -np <ranks> worker predict --config {} --split test --out \
         predictions.txt --checkpoint {}\n",
        config.display(),
        best.join(",")
    );
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fold_config_keeps_the_settings_and_sets_the_fold_and_its_stores() {
        let base = "run_dir: runs/x\ndata: {shards: /s, stride: 4}\nmodel: {}\ntrain: {steps: 3}\n";
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.yaml");
        std::fs::write(&path, base).unwrap();
        let job = JobConfig::from_file(&path).unwrap();
        let text = fold_config(base, &job, 5, 2, 7).unwrap();
        let fold_path = dir.path().join("fold.yaml");
        std::fs::write(&fold_path, &text).unwrap();
        let fold = JobConfig::from_file(&fold_path).unwrap();
        assert_eq!(fold.data.folds, Some(avexpr_data::folds::FoldConfig { k: 5, fold: 2, seed: 7 }));
        assert_eq!(fold.run_dir, PathBuf::from("runs/x/fold-2"));
        assert_eq!(fold.checkpoint.uri, "runs/x/checkpoints/fold-2");
        assert_eq!((fold.data.stride, fold.train.steps), (4, 3));
        let (mean, std) = mean_std(&[0.4, 0.5, 0.6]);
        assert!((mean - 0.5).abs() < 1e-12 && (std - 0.1).abs() < 1e-12);
    }
}
