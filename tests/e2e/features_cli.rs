//! The frozen-encoder feature cache as a user runs it: `worker extract` under mpirun, then training from the
//! cache gives the variables and validation table of training from frames; stale caches are refused naming
//! what changed; an extraction killed part-way resumes to the cache an uninterrupted one writes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use avexpr_tests::jobs::{Dataset, dataset, job, max_diff, ok, variables};
use avexpr_tests::mpirun;

const STEPS: u64 = 6;

/// The tiny job without augmentation, reading the cache at `cache` when given.
fn cached_job(d: &Dataset, name: &str, cache: Option<&Path>) -> PathBuf {
    let config = job(d, name, STEPS, "");
    let features = cache.map_or(String::new(), |c| format!(", features: {{uri: {}}}", c.display()));
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("decode_threads: 1}", &format!("decode_threads: 1, augment: null{features}}}"));
    std::fs::write(&config, text).unwrap();
    config
}

fn run(mut cmd: std::process::Command) -> (bool, String, String) {
    let out = cmd.output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn extract(config: &Path, ranks: usize) -> String {
    let log = ok(mpirun(ranks, "worker")
        .args(["extract", "--config"])
        .arg(config)
        .env("AVEXPR_PROGRESS_S", "0")
        .output()
        .unwrap());
    // Off a terminal, progress is a log line per interval (here every batch) on a rank that encodes.
    if log.lines().any(|l| l.contains(" extracting ") && !l.contains(" extracting 0 unit(s)")) {
        assert!(log.lines().any(|l| l.contains(" extract: ") && l.contains(" clips/s, ")), "{log}");
    }
    log
}

fn train(config: &Path) -> (bool, String, String) {
    run({
        let mut c = mpirun(2, "worker");
        c.args(["train", "--config"]).arg(config);
        c
    })
}

/// The class-wise table a run prints.
fn table(stdout: &str) -> String {
    stdout.lines().skip_while(|l| !l.starts_with("validation after step")).collect::<Vec<_>>().join("\n")
}

fn cache_files(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut files: Vec<_> = walk(dir)
        .into_iter()
        .map(|p| (p.strip_prefix(dir).unwrap().to_path_buf(), std::fs::read(&p).unwrap()))
        .collect();
    files.sort();
    files
}

/// Every file under `dir` (none when it does not exist yet).
fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else { return out };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// SIGKILLs the processes when dropped, so a failing test leaves no stopped rank behind.
struct KillOnDrop(Vec<i32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in self.0.iter().rev() {
            // SAFETY: processes the test started.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}

/// Every frame's logits of the validation split from `checkpoint` (`worker evaluate`, 2 ranks).
fn eval_logits(d: &Dataset, config: &Path, checkpoint: &str) -> std::collections::BTreeMap<String, tch::Tensor> {
    let out = d.root.join(format!("eval-{checkpoint}"));
    let mut cmd = mpirun(2, "worker");
    ok_stdout(cmd.args(["evaluate", "--checkpoint", checkpoint, "--out"]).arg(&out).arg("--config").arg(config));
    tch::Tensor::read_safetensors(out.join("logits.safetensors")).unwrap().into_iter().collect()
}

fn ok_stdout(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn training_from_the_cache_equals_training_from_frames() {
    let d = dataset();
    let cache = d.root.join("cache");
    let from_cache = cached_job(&d, "from-cache", Some(&cache));
    let from_frames = cached_job(&d, "from-frames", None);

    let stderr = extract(&from_cache, 2);
    assert!(stderr.contains("unit(s) written, 0 already there"), "{stderr}");
    assert!(cache.join("features.json").is_file());
    let (ok_c, out_c, err_c) = train(&from_cache);
    assert!(ok_c, "{err_c}");
    let (ok_f, out_f, err_f) = train(&from_frames);
    assert!(ok_f, "{err_f}");
    assert!(err_c.contains("frozen encoders 0.0"), "no encoder ran when training from the cache: {err_c}");
    let diff = max_diff(&variables(&from_cache, STEPS), &variables(&from_frames, STEPS));
    println!("largest variable difference after {STEPS} steps, cache vs frames: {diff:e}");
    assert!(diff < 1e-5, "cache vs frames: variables differ by {diff}");
    assert!(!table(&out_c).is_empty());
    assert_eq!(table(&out_c), table(&out_f), "the validation tables differ");

    // Evaluation reads every face's embedding from the cache (`frames/<video>.safetensors`, every split):
    // no image encoder pass, and the logits of the reference path (every window's faces encoded).
    let eval = |faces: &str, out: &str| {
        let out_dir = d.root.join(out);
        let mut cmd = mpirun(2, "worker");
        cmd.args(["evaluate", "--checkpoint", "latest", "--faces", faces, "--out"]).arg(&out_dir);
        let stdout =
            String::from_utf8_lossy(&cmd.arg("--config").arg(&from_cache).output().unwrap().stdout).into_owned();
        let line =
            stdout.lines().find(|l| l.starts_with("encoder passes per frame: ")).unwrap_or_else(|| panic!("{stdout}"));
        let logits: std::collections::BTreeMap<String, tch::Tensor> =
            tch::Tensor::read_safetensors(out_dir.join("logits.safetensors")).unwrap().into_iter().collect();
        (line.to_string(), logits)
    };
    let (cached, cached_logits) = eval("per-frame", "eval-cache");
    assert!(cached.starts_with("encoder passes per frame: image 0.00, audio 1.00"), "{cached}");
    let (windows, window_logits) = eval("per-window", "eval-windows");
    assert!(windows.starts_with("encoder passes per frame: image 8.00, audio 1.00"), "{windows}");
    assert!(!cached_logits.is_empty() && cached_logits.keys().eq(window_logits.keys()));
    for (video, t) in &cached_logits {
        let diff = (t - &window_logits[video]).abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{video}: logits from the cache differ by {diff}");
    }
    let frame_files = walk(&cache.join("frames"));
    assert!(frame_files.len() > cached_logits.len(), "frame embeddings of the other splits too: {frame_files:?}");
    // A damaged frame object is an error naming it, not wrong predictions.
    let video = cached_logits.keys().next().unwrap();
    let damaged = cache.join("frames").join(format!("{video}.safetensors"));
    let good = std::fs::read(&damaged).unwrap();
    let mut bad = good.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x40;
    std::fs::write(&damaged, &bad).unwrap();
    let (ok_e, _, err_e) = run({
        let mut c = mpirun(2, "worker");
        c.args(["evaluate", "--checkpoint", "latest", "--out"]).arg(d.root.join("eval-bad")).arg("--config");
        c.arg(&from_cache);
        c
    });
    assert!(!ok_e && err_e.contains(&format!("frames/{video}.safetensors")) && err_e.contains("SHA-256"), "{err_e}");
    std::fs::write(&damaged, &good).unwrap();

    // An ensemble of two checkpoints predicts from the mean of their class probabilities: those of each
    // checkpoint's own evaluation (softmax of its logits), averaged; predictions.txt holds their argmax.
    let member = |name: &str| eval_logits(&d, &from_cache, name);
    let (a, b) = (member("step-00000004"), member("step-00000006"));
    let (probs_path, pred_path) = (d.root.join("ensemble.safetensors"), d.root.join("ensemble.txt"));
    let mut cmd = mpirun(2, "worker");
    cmd.args(["predict", "--split", "validation", "--checkpoint", "step-00000004,step-00000006", "--out"]);
    let stdout =
        ok_stdout(cmd.arg(&pred_path).arg("--probabilities").arg(&probs_path).arg("--config").arg(&from_cache));
    assert!(stdout.contains("the ensemble of step-00000004, step-00000006"), "{stdout}");
    let probs: std::collections::BTreeMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(&probs_path).unwrap().into_iter().collect();
    assert!(!probs.is_empty() && probs.keys().eq(a.keys()));
    let written = std::fs::read_to_string(&pred_path).unwrap();
    for (video, p) in &probs {
        let mean = (a[video].softmax(-1, tch::Kind::Float) + b[video].softmax(-1, tch::Kind::Float)) / 2.0;
        let diff = (p - &mean).abs().max().double_value(&[]);
        assert!(diff < 1e-6, "{video}: ensemble probabilities differ from the members' mean by {diff}");
        let classes = Vec::<i64>::try_from(p.argmax(-1, false)).unwrap();
        let lines: Vec<i64> = written
            .lines()
            .filter_map(|l| l.split_once(',').filter(|(v, _)| v.starts_with(&format!("{video}/"))).map(|(_, c)| c))
            .map(|c| c.trim().parse().unwrap())
            .collect();
        assert_eq!(lines, classes, "{video}: predictions.txt is the argmax of the probabilities");
    }

    // An extraction that finds the cache complete encodes nothing.
    let stderr = extract(&from_cache, 2);
    assert!(stderr.contains("0 unit(s) written") && stderr.contains("0 clips"), "{stderr}");
    assert!(stderr.contains("frame embeddings of 0 video(s) written (0 faces encoded)"), "{stderr}");
}

#[test]
fn stale_or_missing_caches_and_augmentation_are_refused() {
    let d = dataset();
    let cache = d.root.join("cache");
    let config = cached_job(&d, "stale", Some(&cache));

    // Nothing extracted yet.
    let (ok_t, _, stderr) = train(&config);
    assert!(!ok_t && stderr.contains("holds no committed feature cache"), "{stderr}");
    extract(&config, 1);
    let text = std::fs::read_to_string(&config).unwrap();

    let mut cases: Vec<(String, &str)> = Vec::new();
    // Preprocessing.
    cases.push((text.replace("image_size: 32", "image_size: 48"), "data.image_size is 48, the cache was made with 32"));
    // Weights: a copy of the audio encoder with one weight changed.
    let w2v = avexpr_model::fixtures::dir().join("wav2vec2-tiny-group");
    let changed = d.root.join("wav2vec2-changed");
    std::fs::create_dir_all(&changed).unwrap();
    for e in std::fs::read_dir(&w2v).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, changed.join(p.file_name().unwrap())).unwrap();
    }
    let weights = changed.join("model.safetensors");
    let mut bytes = std::fs::read(&weights).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&weights, bytes).unwrap();
    cases.push((text.replace(&w2v.display().to_string(), &changed.display().to_string()), "the Wav2Vec 2.0 weights"));
    // Preprocessing settings of a checkpoint: the CLIP image mean changed in a copy.
    let clip = avexpr_model::fixtures::clip_tiny_with_tokenizer().unwrap();
    let clip_changed = d.root.join("clip-changed");
    std::fs::create_dir_all(&clip_changed).unwrap();
    for e in std::fs::read_dir(&clip).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, clip_changed.join(p.file_name().unwrap())).unwrap();
    }
    let pre = clip_changed.join("preprocessor_config.json");
    let mut settings: serde_json::Value = serde_json::from_slice(&std::fs::read(&pre).unwrap()).unwrap();
    settings["image_mean"] = serde_json::json!([0.5, 0.5, 0.5]);
    std::fs::write(&pre, serde_json::to_vec(&settings).unwrap()).unwrap();
    cases.push((
        text.replace(&clip.display().to_string(), &clip_changed.display().to_string()),
        "the CLIP weights or preprocessing",
    ));
    // The dataset: ingested again with other segments.
    let other = d.root.join("shards-other");
    ok(avexpr_tests::binary("data")
        .args(["ingest", "--segment-frames", "8", "--shard-frames", "24", "--root"])
        .arg(d.root.join("affwild2"))
        .arg("--out")
        .arg(&other)
        .output()
        .unwrap());
    cases.push((text.replace(&d.shards.display().to_string(), &other.display().to_string()), "the dataset changed"));
    // Augmentation cannot apply to cached features.
    cases.push((text.replace("augment: null", "augment: {}"), "data.augment: train-time augmentation cannot apply"));
    for (i, (yaml, want)) in cases.into_iter().enumerate() {
        let path = d.root.join(format!("stale{i}.yaml"));
        std::fs::write(&path, yaml).unwrap();
        let (ok_t, _, stderr) = train(&path);
        assert!(!ok_t && stderr.contains(want), "case {i}: want `{want}`: {stderr}");
        assert!(!stderr.contains("step 1/"), "case {i} trained: {stderr}");
    }
}

/// Kill -9 an extraction after one rank wrote its units while the other was stopped before writing any; the
/// rerun writes only the missing units, and the cache equals an uninterrupted extraction's byte for byte.
#[test]
fn a_killed_extraction_resumes_to_the_same_cache() {
    let d = dataset();
    let whole = d.root.join("cache-whole");
    let resumed = d.root.join("cache-resumed");
    extract(&cached_job(&d, "whole", Some(&whole)), 2);
    let config = cached_job(&d, "resumed", Some(&resumed));

    let mut child = mpirun(2, "worker")
        .args(["extract", "--config"])
        .arg(&config)
        .env("RUST_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut guard = KillOnDrop(vec![child.id() as i32]);
    // Stop rank 1 when it says it starts extracting (MPI is up, it has written nothing).
    let stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let (said, starting) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufRead::lines(stderr).map_while(Result::ok) {
            if line.contains("[rank 1/2]") && line.contains("extracting") {
                let _ = said.send(());
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let rank1 = loop {
        let found = std::fs::read_dir("/proc").unwrap().filter_map(|e| e.ok()).find_map(|e| {
            let pid: i32 = e.file_name().to_string_lossy().parse().ok()?;
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            let ppid: u32 = stat.rsplit(')').next()?.split_whitespace().nth(1)?.parse().ok()?;
            let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
            let is_rank1 = environ.split(|&b| b == 0).any(|v| v == b"OMPI_COMM_WORLD_RANK=1");
            (ppid == child.id() && is_rank1).then_some(pid)
        });
        if let Some(pid) = found {
            break pid;
        }
        assert!(Instant::now() < deadline, "rank 1 never started");
        std::thread::sleep(Duration::from_millis(2));
    };
    guard.0.push(rank1);
    starting.recv_timeout(Duration::from_secs(120)).expect("rank 1 never started extracting");
    // SAFETY: a process this test started.
    unsafe { libc::kill(rank1, libc::SIGSTOP) };
    // Rank 0 writes its units, then waits for rank 1 at the commit.
    let whole_files = cache_files(&whole);
    let units = |dir: &Path| walk(dir).iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while units(&resumed) == 0 || Instant::now() < deadline && units(&resumed) < 2 {
        assert!(Instant::now() < deadline, "rank 0 wrote no unit");
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    drop(guard);
    let _ = child.wait();
    let written = units(&resumed);
    let total = units(&whole);
    assert!(written > 0 && written < total, "the kill left {written} of {total} units");
    assert!(!resumed.join("features.json").exists(), "an interrupted extraction must not commit");

    let stderr = extract(&config, 2);
    assert!(stderr.contains("already there"), "{stderr}");
    assert_eq!(units(&resumed), total);
    let resumed_files = cache_files(&resumed);
    assert_eq!(
        whole_files.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>(),
        resumed_files.iter().map(|(p, _)| p.clone()).collect::<Vec<_>>()
    );
    for ((path, a), (_, b)) in whole_files.iter().zip(&resumed_files) {
        assert!(a == b, "{} differs between the uninterrupted and the resumed extraction", path.display());
    }
}

/// A rank that reaches the cache while rank 0 has not (rank 0 here is a program that starts MPI and waits):
/// it writes the key itself (create-only) before any unit, so an extraction of other settings into the same
/// cache is refused instead of mixing its units with these.
#[test]
fn a_rank_alone_at_an_empty_cache_writes_the_key_before_its_units() {
    let d = dataset();
    let cache = d.root.join("cache");
    let config = cached_job(&d, "alone", Some(&cache));
    // Rank 0: MPI started with the worker's one start-up collective (its host's shared-memory split), then
    // nothing until killed.
    let source = d.root.join("waiting_rank.c");
    std::fs::write(
        &source,
        "#include <mpi.h>\n#include <unistd.h>\nint main(int c, char **v) {\n  MPI_Comm local;\n  MPI_Init(&c, &v);\n  \
         MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local);\n  for (;;) pause();\n}\n",
    )
    .unwrap();
    let waiting = d.root.join("waiting_rank");
    ok(std::process::Command::new("mpicc").arg(&source).arg("-o").arg(&waiting).output().unwrap());
    let log = d.root.join("alone.log");
    let mut child = std::process::Command::new("mpirun")
        .args(["--oversubscribe", "-np", "1"])
        .arg(&waiting)
        .args([":", "-np", "1"])
        .arg(avexpr_tests::binary("worker").get_program())
        .args(["extract", "--config"])
        .arg(&config)
        .env("OMPI_ALLOW_RUN_AS_ROOT", "1")
        .env("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        .env_remove("LD_LIBRARY_PATH")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // mpirun ends its ranks when terminated (a killed mpirun would leave them waiting forever).
    let stop = |child: &mut std::process::Child| {
        // SAFETY: a process this test started.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let _ = child.wait();
    };
    let units = || walk(&cache).iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")).count();
    let deadline = Instant::now() + Duration::from_secs(120);
    while units() == 0 {
        if Instant::now() > deadline {
            stop(&mut child);
            panic!("rank 1 wrote no unit: {}", std::fs::read_to_string(&log).unwrap_or_default());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let key = std::fs::read(cache.join("key.json"));
    stop(&mut child);
    assert!(key.is_ok(), "rank 1 wrote units into a cache with no key");

    // Another setting's extraction (alone, so rank 0) finds that key and is refused.
    let other = d.root.join("alone-48.yaml");
    std::fs::write(&other, std::fs::read_to_string(&config).unwrap().replace("image_size: 32", "image_size: 48"))
        .unwrap();
    let (ok_e, _, stderr) = run({
        let mut c = mpirun(1, "worker");
        c.args(["extract", "--config"]).arg(&other);
        c
    });
    assert!(!ok_e && stderr.contains("data.image_size is 48, the cache was made with 32"), "{stderr}");
}
