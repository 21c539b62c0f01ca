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
