//! `worker params` and `worker bench-head` as a user runs them.

use avexpr_model::ModelConfig;
use avexpr_model::expr::{EncoderDims, parameter_counts};
use avexpr_tests::binary;

fn paper_yaml() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/paper.yaml")
}

#[test]
fn params_prints_every_group_of_the_paper_config() {
    let output = binary("worker").args(["params", "--config"]).arg(paper_yaml()).output().unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let counts = parameter_counts(&ModelConfig::default(), &EncoderDims::paper()).unwrap();
    for (group, n) in &counts {
        assert!(
            stdout.lines().any(|l| l.split_whitespace().collect::<Vec<_>>() == [*group, &n.to_string()]),
            "{group} {n} in:\n{stdout}"
        );
    }
    assert!(stdout.contains("TCN receptive field: 61 frames"), "{stdout}");
}

/// The PyTorch reference head of the benchmark has exactly our parameters, group by group: the comparison
/// is between the same model.
#[test]
fn bench_head_reference_is_the_same_model() {
    let output = binary("worker")
        .args(["bench-head", "--batch", "2", "--frames", "4", "--iters", "1", "--rounds", "1", "--threads", "1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{}\n{}", stdout, String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains("clips/s (forward + backward)"), "{stdout}");
    assert_eq!(stdout.matches("same in the reference").count(), 4, "{stdout}");
}

#[test]
fn params_rejects_a_bad_config_naming_the_field() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("job.yaml");
    std::fs::write(&path, "model:\n  fusion:\n    dim: 100\n    heads: 8\n").unwrap();
    let output = binary("worker").args(["params", "--config"]).arg(&path).output().unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("job.yaml") && stderr.contains("model.fusion.heads"), "{stderr}");
}
