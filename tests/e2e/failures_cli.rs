//! Failure modes of a distributed job beyond a clean kill (the README's "Failure modes" section): each test
//! injects the fault as an operator would meet it and fails without the code that handles it.

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use avexpr_data::layout::Split;
use avexpr_data::manifest::Manifest;
use avexpr_data::sampler::Assignment;
use avexpr_tests::jobs::{checkpoint, dataset, job, ok, run_dir};
use avexpr_tests::{binary, mpirun};

/// Runs `cmd` in its own process group; gives up after `limit`, killing the group (mpirun and its ranks).
fn output_within(cmd: &mut Command, limit: Duration) -> (Output, Duration) {
    let child = cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0).spawn().unwrap();
    let group = child.id() as libc::pid_t;
    let started = Instant::now();
    let watchdog = std::thread::spawn(move || {
        while started.elapsed() < limit {
            std::thread::sleep(Duration::from_millis(100));
            // SAFETY: kill(2) with signal 0 only checks that the group still exists.
            if unsafe { libc::kill(-group, 0) } != 0 {
                return false;
            }
        }
        // SAFETY: kill(2) on the process group this test created.
        unsafe { libc::kill(-group, libc::SIGKILL) };
        true
    });
    let out = child.wait_with_output().unwrap();
    let elapsed = started.elapsed();
    let killed = watchdog.join().unwrap();
    assert!(!killed, "still running after {limit:?}: killed\n{}", String::from_utf8_lossy(&out.stderr));
    (out, elapsed)
}

fn manifest(shards: &Path) -> Manifest {
    serde_json::from_slice(&std::fs::read(shards.join("manifest.json")).unwrap()).unwrap()
}

/// A rank that fails ends every rank within seconds, with its message: the README's bare
/// `mpirun -np 2 worker train`, with the shards of every training video of rank 1 corrupt (no `skip_bad`).
/// Before, rank 1 returned its error and finalised MPI while rank 0 waited for it in the gradient all-reduce:
/// the job hung forever.
#[test]
fn a_failing_rank_ends_every_rank_with_its_message() {
    let d = dataset();
    let config = job(&d, "failing", 6, "");
    let m = manifest(&d.shards);
    let train: Vec<_> = m.videos.iter().filter(|v| v.split == Split::Train).collect();
    // Global batch 4 of micro-batches of 2 on 2 ranks: one data slot per rank, slot 1 is rank 1's.
    let assignment = Assignment::balanced(&train, 2);
    let mut corrupted = Vec::new();
    for v in train.iter().filter(|v| assignment.slot_of[&v.name] == 1) {
        for shard in &v.shards {
            std::fs::write(d.shards.join(&shard.key), b"not a shard").unwrap();
            corrupted.push(shard.key.clone());
        }
    }
    assert!(!corrupted.is_empty());
    let (out, elapsed) =
        output_within(mpirun(2, "worker").args(["train", "--config"]).arg(&config), Duration::from_secs(60));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(elapsed < Duration::from_secs(30), "took {elapsed:?} to end the job");
    let line = stderr.lines().find(|l| l.contains("ERROR")).unwrap_or_else(|| panic!("no error line: {stderr}"));
    assert!(line.contains("[rank 1/2]") && corrupted.iter().any(|k| line.contains(k.as_str())), "{stderr}");
}

/// Every rank resumes from the checkpoint rank 0 chose, or the job stops: rank 1 sees the store without the
/// newest checkpoint (a mount namespace hides its folder, as a node with its own view of the store would).
/// Before, each rank picked its own newest valid checkpoint: rank 1 silently went back to step 2 while rank 0
/// continued from step 4, and their gradients were averaged.
#[test]
fn ranks_resume_from_the_checkpoint_rank_0_chose_or_stop() {
    let d = dataset();
    let config = job(&d, "agree", 4, "");
    ok(mpirun(2, "worker").args(["train", "--config"]).arg(&config).output().unwrap());
    let config = job(&d, "agree", 6, ""); // same run: 2 more steps
    let metrics = std::fs::read_to_string(run_dir(&config).join("metrics.jsonl")).unwrap();
    let hidden = checkpoint(&config, 4);
    let empty = tempfile::tempdir().unwrap();
    let worker = binary("worker").get_program().to_owned();
    let args = format!("train --config {} --resume auto", config.display());
    let mut cmd = Command::new("mpirun");
    cmd.args(["--oversubscribe", "-np", "1"])
        .arg(&worker)
        .args(args.split(' '))
        .args([":", "-np", "1", "unshare", "--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "mount --bind {} {} && exec {} {args}",
            empty.path().display(),
            hidden.display(),
            worker.to_string_lossy()
        ))
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env_remove("LD_LIBRARY_PATH");
    let (out, _) = output_within(&mut cmd, Duration::from_secs(90));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.lines().any(|l| l.contains("[rank 1/2]")
            && l.contains("cannot resume from step-00000004")
            && l.contains("COMMIT.json is missing")),
        "{stderr}"
    );
    assert!(stderr.contains("could not resume from step-00000004"), "{stderr}");
    // Nothing trained on: no new checkpoint, the metrics as they were.
    assert!(!checkpoint(&config, 6).exists());
    assert_eq!(std::fs::read_to_string(run_dir(&config).join("metrics.jsonl")).unwrap(), metrics);
}

/// `--checkpoint best` names a checkpoint that exists: a new best validation is committed when it is measured.
/// Here every step is evaluated and checkpoints are due every 100 steps; the best is step 1's (the first
/// evaluation; the tiny model's validation F1 does not improve after it). Before, step 1 was never committed and
/// `worker evaluate` (best by default) failed.
#[test]
fn the_best_checkpoint_is_always_committed() {
    let d = dataset();
    let config = job(&d, "best", 4, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("checkpoint: {every: 2,", "checkpoint: {every: 100,")
        .replace("log_every: 1,", "log_every: 1, eval_every: 1,");
    std::fs::write(&config, text).unwrap();
    let train = binary("worker").args(["train", "--config"]).arg(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&train.stdout).into_owned();
    ok(train);
    assert!(stdout.contains("at step 1 (kept as checkpoint step-00000001)"), "{stdout}");
    // Its outputs replace a previous evaluation's whole: written under a temporary name and renamed (strace),
    // never opened for writing in place, where an interruption would leave a truncated table.
    let out = d.root.join("best-eval");
    let trace = d.root.join("evaluate.trace");
    ok(Command::new("strace")
        .args(["-f", "-e", "trace=openat,rename,renameat,renameat2", "-o"])
        .arg(&trace)
        .arg(binary("worker").get_program())
        .args(["evaluate", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&out)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap());
    let trace = std::fs::read_to_string(&trace).unwrap();
    for file in ["table.txt", "eval.json", "confusion.png"] {
        let path = format!("\"{}\"", out.join(file).display());
        assert!(out.join(file).is_file(), "{file}");
        let written_in_place =
            trace.lines().any(|l| l.contains("openat(") && l.contains(&path) && l.contains("O_WRONLY"));
        assert!(!written_in_place, "{file} written in place:\n{trace}");
        assert!(trace.lines().any(|l| l.contains("rename") && l.contains(&path)), "{file} not renamed into place");
    }
    // The table's train ratios are this dataset's (the manifest's), not the paper's fixed ones.
    let manifest = manifest(&d.shards);
    let table = std::fs::read_to_string(out.join("table.txt")).unwrap();
    for (c, line) in table.lines().skip(1).take(8).enumerate() {
        let ratio = line.split_whitespace().nth(1).unwrap();
        assert_eq!(ratio, format!("{:.2}", 100.0 * manifest.class_ratios[c]), "{table}");
    }
}

/// A store holding a run's checkpoints is not reused by accident: a fresh start into it is refused unless asked
/// (`--overwrite` deletes them), and a resumed run cannot change what it trains (the fields are named) while it
/// may change its length. Before, `--resume none` trained into the store (whose pruning then deleted the new
/// run's checkpoints, and a later `--resume auto` continued the old run), and a resume compared only the number
/// of data slots.
#[test]
fn a_used_store_is_not_reused_by_accident() {
    let d = dataset();
    let config = job(&d, "used", 2, "");
    let train = |args: &[&str]| binary("worker").args(["train", "--config"]).arg(&config).args(args).output().unwrap();
    ok(train(&[]));
    let first_metrics = std::fs::read_to_string(run_dir(&config).join("metrics.jsonl")).unwrap();
    assert_eq!(first_metrics.lines().count(), 2);
    let out = train(&["--resume", "none"]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("already holds 1 checkpoint(s)"), "{stderr}");
    assert!(stderr.contains("`--resume none --overwrite` deletes them"), "{stderr}");
    assert!(checkpoint(&config, 2).join("COMMIT.json").is_file());

    // Other clips and another seed: refused, naming both; the longer run alone would be fine.
    let text = std::fs::read_to_string(&config).unwrap();
    let changed = text
        .replace("stride: 4,", "stride: 2,")
        .replace("log_every: 1, threads: 1}", "log_every: 1, threads: 1, seed: 7}");
    std::fs::write(&config, changed.replace("steps: 2,", "steps: 4,")).unwrap();
    let out = train(&[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("data.stride: 4 -> 2") && stderr.contains("train.seed: 0 -> 7"), "{stderr}");
    assert!(!stderr.contains("train.steps"), "{stderr}");

    let log = ok(train(&["--resume", "none", "--overwrite"]));
    assert!(log.contains("--overwrite: deleting the store's checkpoints"), "{log}");
    assert!(checkpoint(&config, 4).join("COMMIT.json").is_file());
    // The first run's metrics are kept beside the new run's, not truncated.
    assert!(log.contains("held another run's metrics: kept as"), "{log}");
    let kept: Vec<String> = std::fs::read_dir(run_dir(&config))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            name.starts_with("metrics.") && name != "metrics.jsonl"
        })
        .map(|p| std::fs::read_to_string(p).unwrap())
        .collect();
    assert_eq!(kept, vec![first_metrics]);
    assert_eq!(std::fs::read_to_string(run_dir(&config).join("metrics.jsonl")).unwrap().lines().count(), 4);
}

/// One writer per checkpoint store: a live holder of its lease is named and the job refused; the lease of a
/// process of this host that is gone (a crashed run) is taken over.
#[test]
fn a_store_leased_to_a_live_job_is_refused_and_a_dead_ones_lease_taken_over() {
    let d = dataset();
    let config = job(&d, "leased", 2, "");
    let lease = run_dir(&config).join("checkpoints/lease.json");
    std::fs::create_dir_all(lease.parent().unwrap()).unwrap();
    let holder = |pid: u32| {
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
        let host = avexpr_worker::heartbeat::hostname();
        serde_json::json!({"id": format!("{host}:{pid}:1"), "what": "another job", "host": host, "pid": pid,
                           "renewed_unix_s": now, "ttl_s": 600.0})
    };
    // This test's own process: alive.
    std::fs::write(&lease, holder(std::process::id()).to_string()).unwrap();
    let out = binary("worker").args(["train", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("is in use by another job on"), "{stderr}");
    assert!(!checkpoint(&config, 2).exists());
    // A pid that no process has.
    std::fs::write(&lease, holder(u32::MAX - 1).to_string()).unwrap();
    let log = ok(binary("worker").args(["train", "--config"]).arg(&config).output().unwrap());
    assert!(log.contains("taking over a stale lease (another job on"), "{log}");
    assert!(checkpoint(&config, 2).join("COMMIT.json").is_file());
    assert!(!lease.exists(), "released at the end");
}

/// A local store's checkpoint is on disk when its commit is: every object and the commit are synced (fsync),
/// and so are their directory, before the previous checkpoint may be pruned. object_store's local backend does
/// not sync, so a power loss could leave a `COMMIT.json` whose data never reached the disk. Shown with strace.
#[test]
fn a_local_checkpoint_is_synced_to_disk_before_it_counts() {
    let d = dataset();
    let config = job(&d, "synced", 2, "");
    let trace = d.root.join("fsync.trace");
    let worker = binary("worker").get_program().to_owned();
    let out = Command::new("strace")
        .args(["-f", "-y", "-e", "trace=fsync,fdatasync", "-o"])
        .arg(&trace)
        .arg(worker)
        .args(["train", "--config"])
        .arg(&config)
        .env_remove("LD_LIBRARY_PATH")
        .output()
        .unwrap();
    ok(out);
    let trace = std::fs::read_to_string(&trace).unwrap();
    let dir = checkpoint(&config, 2);
    for file in ["variables.safetensors", "optimizer.safetensors", "state.json", "COMMIT.json"] {
        let path = format!("{}>", dir.join(file).display());
        assert!(trace.lines().any(|l| l.contains("fsync(") && l.contains(&path)), "{file} not synced:\n{trace}");
    }
    let dir_synced = format!("{}>) = 0", dir.display());
    assert!(trace.lines().any(|l| l.contains("fsync(") && l.contains(&dir_synced)), "{trace}");
}
