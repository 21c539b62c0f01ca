//! The bucketed gradient all-reduce across real MPI ranks, as `mpirun` starts them: every rank ends with the
//! exact mean, with one rank (a singleton world) and with two and three.

use avexpr_tests::{binary, mpirun};

fn check(output: std::process::Output, ranks: usize) {
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&output.stderr));
    assert!(stdout.contains(&format!("over {ranks} ranks")), "{stdout}");
    assert!(stdout.contains("largest error against the exact mean: 0e0"), "{stdout}");
    assert_eq!(stdout.matches("ratio:").count(), 1, "rank 0 alone prints: {stdout}");
}

#[test]
fn every_rank_gets_the_exact_mean_gradients() {
    let args = ["bench-allreduce", "--bytes", "300000", "--bucket-bytes", "65536", "--iters", "2", "--rounds", "2"];
    for ranks in [2, 3] {
        check(mpirun(ranks, "worker").args(args).output().unwrap(), ranks);
    }
    // Started without mpirun: a world of one.
    check(binary("worker").args(args).output().unwrap(), 1);
}

/// NCCL's set-up half works without a GPU: libnccl (from the torch wheel, found through the rpath) loads, and
/// rank 0's unique id reaches every rank over MPI; the all-reduce itself is reported as needing a GPU, with
/// the reason.
#[test]
fn nccl_unique_id_reaches_every_rank() {
    let out = mpirun(2, "worker").arg("nccl-check").output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("libnccl 2."), "{stdout}");
    assert!(stdout.contains("reached all 2 ranks over MPI"), "{stdout}");
    if tch::Cuda::is_available() {
        assert!(stdout.contains("NCCL all-reduce (average)") && stdout.contains("correct"), "{stdout}");
    } else {
        assert!(stdout.contains("no GPU here (") && stdout.contains("was not run"), "{stdout}");
    }
}
