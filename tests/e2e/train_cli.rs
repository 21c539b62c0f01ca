//! `worker train` as a user runs it, on a synthetic dataset and the tiny random encoders: 2 ranks agree with
//! 1 rank; a run killed with SIGKILL resumes to exactly the uninterrupted result; a corrupt newest checkpoint
//! is skipped for the previous one; bad configs and stores fail before training with the field named.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use avexpr_tests::jobs::{Dataset, checkpoint, dataset, job, max_diff, ok, run_dir, variables};
use avexpr_tests::{binary, mpirun};
use tch::Tensor;

#[test]
fn two_ranks_train_exactly_what_one_rank_accumulating_trains() {
    let d = dataset();
    let one = job(&d, "one", 4, "");
    let two = job(&d, "two", 4, "");
    ok(binary("worker").args(["train", "--config"]).arg(&one).output().unwrap());
    let log = ok(mpirun(2, "worker").args(["train", "--config"]).arg(&two).output().unwrap());
    assert!(log.contains("[rank 1/2]") && log.contains("step 4/4"), "{log}");
    let (a, b) = (variables(&one, 4), variables(&two, 4));
    let diff = max_diff(&a, &b);
    assert!(diff < 1e-5, "1 rank x 2 micro-batches vs 2 ranks: variables differ by {diff}");
    assert!(max_diff(&a, &variables(&one, 2)) > 1e-4, "training moved the variables");
    tensorboard_holds_the_metrics(&run_dir(&two));
}

/// Adapted encoders (DINOv2 as the image encoder with LoRA, Wav2Vec 2.0's last block at its own learning rate)
/// train a fifth group,
/// `backbone`, all-reduced with the others: 2 ranks train exactly what 1 rank accumulating 2 micro-batches
/// trains, the adapted variables are in the checkpoint under their encoder paths and moved; a feature cache is
/// refused with an adapted encoder.
#[test]
fn adaptation_trains_the_backbone_group_across_ranks() {
    let d = dataset();
    // DINOv2 instead of CLIP's vision tower, with LoRA; the last block of Wav2Vec 2.0 at half the learning rate.
    let dinov2 = avexpr_model::fixtures::dir().join("dinov2-tiny");
    let lora = format!(
        "  clip: {{checkpoint: CLIP}}\n  image_encoder: dinov2\n  dinov2: {{checkpoint: {}, adapt: {{mode: lora, \
         rank: 4, alpha: 8}}}}\n",
        dinov2.display()
    );
    let last = "  wav2vec2: {checkpoint: W2V, adapt: {mode: last_blocks, blocks: 1, lr_scale: 0.5}}\n";
    let adapted = |name: &str| {
        let config = job(&d, name, 4, "");
        let mut text = std::fs::read_to_string(&config).unwrap();
        for (key, line, placeholder) in [("clip", lora.as_str(), "CLIP"), ("wav2vec2", last, "W2V")] {
            let old = text.lines().find(|l| l.trim_start().starts_with(&format!("{key}: {{checkpoint:"))).unwrap();
            let checkpoint = old.split("checkpoint: ").nth(1).unwrap().trim_end_matches('}').to_string();
            text = text.replace(&old.to_string(), line.replace(placeholder, &checkpoint).trim_end());
        }
        std::fs::write(&config, text).unwrap();
        config
    };
    let (one, two) = (adapted("adapt-one"), adapted("adapt-two"));
    ok(binary("worker").args(["train", "--config"]).arg(&one).output().unwrap());
    let log = ok(mpirun(2, "worker").args(["train", "--config"]).arg(&two).output().unwrap());
    // DINOv2: 2 layers x (query, value) x (A, B) of 4 x 16 = 512; Wav2Vec 2.0's last layer (hidden 16,
    // intermediate 20): attention 4 x (16 x 16 + 16), layer norms 4 x 16, feed-forward 16 x 20 + 20 + 20 x 16 + 16
    // = 1088 + 64 + 676.
    assert!(log.contains("group=\"backbone\" parameters=2340"), "{log}");
    let (a, b) = (variables(&one, 4), variables(&two, 4));
    let diff = max_diff(&a, &b);
    assert!(diff < 1e-5, "1 rank x 2 micro-batches vs 2 ranks: variables differ by {diff}");
    let lora_b = "backbone.dinov2.encoder.layer.1.attention.attention.value.lora_B";
    assert!(a[lora_b].abs().max().double_value(&[]) > 0.0, "lora_B starts at zero and must have trained");
    let key = "encoder.layers.1.feed_forward.output_dense.weight";
    let fixture = avexpr_model::fixtures::dir().join("wav2vec2-tiny-group").join("model.safetensors");
    let checkpoint: std::collections::HashMap<String, tch::Tensor> =
        tch::Tensor::read_safetensors(&fixture).unwrap().into_iter().collect();
    let moved = (&a[&format!("backbone.wav2vec2.{key}")] - checkpoint[key].to_kind(tch::Kind::Float)).abs().max();
    assert!(moved.double_value(&[]) > 0.0, "the unfrozen block trained from the checkpoint's values");
    assert!(!a.keys().any(|k| k.starts_with("backbone.wav2vec2.encoder.layers.0.")), "layer 0 stays frozen");
    let text = std::fs::read_to_string(&one).unwrap();
    let cached = d.root.join("lora-cached.yaml");
    std::fs::write(
        &cached,
        text.replace("decode_threads: 1}", "decode_threads: 1, augment: null, features: {uri: /tmp/x}}"),
    )
    .unwrap();
    let out = binary("worker").args(["train", "--config"]).arg(&cached).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("model.dinov2.adapt"), "{err}");
}

/// What TensorBoard's own reader (`EventAccumulator`, the `tensorboard` package) finds in a run's event files.
const TENSORBOARD_READ: &str = r#"
import io, json, sys
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
ea = EventAccumulator(sys.argv[1], size_guidance={"scalars": 0, "images": 0})
ea.Reload()
tags = ea.Tags()
print(json.dumps({
    "scalars": {t: [[e.step, e.value] for e in ea.Scalars(t)] for t in tags["scalars"]},
    "images": {t: [[e.step, e.width, e.height, list(Image.open(io.BytesIO(e.encoded_image_string)).size)]
                   for e in ea.Images(t)] for t in tags["images"]},
}))
"#;

/// TensorBoard reads every value of `metrics.jsonl` (loss terms, learning rate, gradient norm, validation macro
/// and per-class F1) from the run's event files, plus clips/s, data-wait % and the confusion matrix image.
fn tensorboard_holds_the_metrics(run: &Path) {
    let python = std::env::var("AVEXPR_PYTHON").expect("AVEXPR_PYTHON (set by scripts/setup)");
    let out = std::process::Command::new(python)
        .args(["-c", TENSORBOARD_READ])
        .arg(run.join("tensorboard"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tb: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scalar = |tag: &str, step: u64| -> f64 {
        let points = tb["scalars"][tag].as_array().unwrap_or_else(|| panic!("no scalar {tag} in {tb}"));
        let point = points.iter().find(|p| p[0] == step).unwrap_or_else(|| panic!("{tag}: no step {step}"));
        point[1].as_f64().unwrap()
    };
    let metrics = std::fs::read_to_string(run.join("metrics.jsonl")).unwrap();
    let mut validations = 0;
    for line in metrics.lines() {
        let m: serde_json::Value = serde_json::from_str(line).unwrap();
        let step = m["step"].as_u64().unwrap();
        let mut pairs: Vec<(String, f64)> = ["loss", "classification", "contrastive", "lr", "grad_norm"]
            .iter()
            .map(|k| (format!("train/{k}"), m[*k].as_f64().unwrap()))
            .collect();
        if let Some(f1) = m["val_macro_f1"].as_f64() {
            validations += 1;
            pairs.push(("val/macro_f1".into(), f1));
            let classes = avexpr_data::Expression::ALL.iter();
            for (e, f) in classes.zip(m["val_f1"].as_array().expect("per-class F1 with the macro F1")) {
                pairs.push((format!("val/f1/{}", e.name()), f.as_f64().unwrap()));
            }
            let image = tb["images"]["val/confusion"].as_array().unwrap().iter().find(|i| i[0] == step).cloned();
            assert_eq!(image, Some(serde_json::json!([step, 900, 820, [900, 820]])), "{tb}");
        }
        for (tag, want) in pairs {
            let got = scalar(&tag, step);
            assert!((got - want).abs() <= 1e-6 * want.abs().max(1e-3), "{tag} at step {step}: {got} vs {want}");
        }
        assert!(scalar("train/clips_per_s", step) > 0.0);
        assert!((0.0..=100.0).contains(&scalar("train/data_wait_pct", step)));
    }
    assert!(validations >= 1 && metrics.lines().count() >= 4, "{metrics}");
}

/// `model.*.checkpoint: s3://...`: encoder directories uploaded with `worker push-encoder` are fetched once per
/// host (the two ranks share one download per encoder) into the local cache, verified, and train exactly what
/// the directories train; a file changed in the store after its manifest is refused, naming it.
#[test]
fn encoder_checkpoints_in_s3_are_fetched_once_per_host_and_verified() {
    use avexpr_data::garage::{BUCKET, Garage};
    let garage = Garage::start();
    let d = dataset();
    let local = job(&d, "local", 2, "");
    let clip = avexpr_model::fixtures::clip_tiny_with_tokenizer().unwrap();
    let wav2vec2 = avexpr_model::fixtures::dir().join("wav2vec2-tiny-group");
    let env = garage.env();
    for (dir, name) in [(&clip, "clip"), (&wav2vec2, "wav2vec2")] {
        let out = binary("worker")
            .args(["push-encoder", "--from"])
            .arg(dir)
            .args(["--to", &format!("s3://{BUCKET}/models/{name}")])
            .envs(env.iter().map(|(k, v)| (k, v)))
            .output()
            .unwrap();
        assert!(ok(out).is_empty());
    }
    let remote = job(&d, "remote", 2, "");
    let yaml = std::fs::read_to_string(&remote).unwrap();
    let yaml = yaml
        .replace(&clip.display().to_string(), &format!("s3://{BUCKET}/models/clip"))
        .replace(&wav2vec2.display().to_string(), &format!("s3://{BUCKET}/models/wav2vec2"));
    std::fs::write(&remote, yaml).unwrap();
    let cache = d.root.join("encoder-cache");
    let train = |config: &Path, cache: &Path| {
        mpirun(2, "worker")
            .args(["train", "--config"])
            .arg(config)
            .envs(env.iter().map(|(k, v)| (k, v)))
            .env("AVEXPR_ENCODER_CACHE", cache)
            .output()
            .unwrap()
    };
    ok(train(&local, &cache));
    assert!(!cache.exists(), "directories are used where they are");
    let log = ok(train(&remote, &cache));
    assert_eq!(log.matches("encoder checkpoint fetched").count(), 2, "one download per encoder and host:\n{log}");
    let cached: Vec<_> =
        std::fs::read_dir(&cache).unwrap().filter_map(|e| e.ok()).filter(|e| e.path().is_dir()).collect();
    assert_eq!(cached.len(), 2, "{cached:?}");
    assert_eq!(max_diff(&variables(&local, 2), &variables(&remote, 2)), 0.0, "the same weights train the same");

    // A file replaced in the store after the manifest was written: refused on a host without the cache.
    let store = garage.store(&format!("s3://{BUCKET}/models/wav2vec2"));
    let reversed: Vec<u8> = std::fs::read(wav2vec2.join("config.json")).unwrap().into_iter().rev().collect();
    store.blocking().put("config.json", reversed.into()).unwrap();
    let out = train(&remote, &d.root.join("fresh-cache"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("model.wav2vec2.checkpoint") && stderr.contains("wav2vec2/config.json: SHA-256"),
        "{stderr}"
    );
}

/// The processes whose command line names `config` (the ranks of a job on it).
fn pids_running(config: &Path) -> Vec<libc::pid_t> {
    let out = std::process::Command::new("pgrep").arg("-f").arg(config).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

/// Starts `ranks` ranks on `config` and SIGKILLs mpirun (the process group it leads) and every rank (Open MPI
/// starts them in groups of their own) once the checkpoint of `at` is committed, then waits until they are gone,
/// as after a crash (a rank left alive would still hold the store's lease).
fn kill_after_checkpoint(config: &Path, ranks: usize, at: u64, steps: u64) {
    let mut child = mpirun(ranks, "worker")
        .args(["train", "--config"])
        .arg(config)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !checkpoint(config, at).join("COMMIT.json").is_file() {
        assert!(start.elapsed() < Duration::from_secs(120), "no checkpoint at step {at}");
        std::thread::sleep(Duration::from_millis(5));
    }
    let group = child.id() as libc::pid_t;
    assert!(group > 1);
    let pids = pids_running(config);
    // SAFETY: kill(2) on a process group this test created and on its ranks.
    assert_eq!(unsafe { libc::kill(-group, libc::SIGKILL) }, 0);
    for &pid in &pids {
        // SAFETY: as above.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    child.wait().unwrap();
    while !pids_running(config).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(150), "the killed ranks did not go");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !checkpoint(config, steps).join("COMMIT.json").is_file(),
        "killed too late to test anything: the run had finished"
    );
}

/// Elastic resume: a job checkpointed on R ranks continues on R' ranks with the same data slots (global_batch /
/// micro_batch = ranks x accumulation). Every slot continues from its cursor, so the global batches are the
/// uninterrupted run's: 2 -> 1 and 1 -> 2 ranks (2 slots), 4 -> 2 ranks (4 slots). The final variables equal the
/// uninterrupted run's within float reduction order (gradients summed over ranks, or accumulated on one), and
/// the loss curve up to the kill is the uninterrupted run's, line for line.
#[test]
fn a_job_resumes_on_another_number_of_ranks() {
    let d = dataset();
    let steps = 8;
    for (slots, from, to) in [(2usize, 2usize, 1usize), (2, 1, 2), (4, 4, 2)] {
        let make = |name: &str| {
            let config = job(&d, name, steps, "");
            let text = std::fs::read_to_string(&config)
                .unwrap()
                .replace("global_batch: 4,", &format!("global_batch: {},", 2 * slots));
            std::fs::write(&config, text).unwrap();
            config
        };
        let reference = make(&format!("reference-{from}-{to}"));
        ok(mpirun(from, "worker").args(["train", "--config"]).arg(&reference).output().unwrap());
        let elastic = make(&format!("elastic-{from}-{to}"));
        kill_after_checkpoint(&elastic, from, 4, steps);
        let log = ok(mpirun(to, "worker").args(["train", "--config"]).arg(&elastic).output().unwrap());
        assert!(log.contains("resumed"), "{log}");
        let diff = max_diff(&variables(&reference, steps), &variables(&elastic, steps));
        println!("{from} -> {to} ranks ({slots} slots): largest variable difference after {steps} steps {diff:e}");
        assert!(diff < 1e-5, "{from} -> {to} ranks: variables differ by {diff}");
        let metrics = |c: &Path| std::fs::read_to_string(run_dir(c).join("metrics.jsonl")).unwrap();
        let (a, b) = (metrics(&reference), metrics(&elastic));
        let head = |m: &str| m.lines().take(4).map(str::to_string).collect::<Vec<_>>();
        assert_eq!(head(&a), head(&b), "{from} -> {to}: the loss curve up to the kill differs");
        assert_eq!(b.lines().count(), steps as usize);
    }
    // On a number of ranks that does not divide the slots: the error names the ones that do.
    let config = job(&d, "three", steps, "");
    let out = mpirun(3, "worker").args(["train", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("its 2 data slots (global_batch / micro_batch) run on 1, 2 rank(s)"),
        "{stderr}"
    );
}

#[test]
fn a_killed_run_resumes_to_the_uninterrupted_result() {
    let d = dataset();
    let steps = 8;
    let reference = job(&d, "reference", steps, "");
    ok(mpirun(2, "worker").args(["train", "--config"]).arg(&reference).output().unwrap());

    let killed = job(&d, "killed", steps, "");
    kill_after_checkpoint(&killed, 2, 4, steps);
    let log = ok(mpirun(2, "worker").args(["train", "--config"]).arg(&killed).output().unwrap());
    assert!(log.contains("resumed"), "{log}");
    let diff = max_diff(&variables(&reference, steps), &variables(&killed, steps));
    assert_eq!(diff, 0.0, "resumed run's final variables differ from the uninterrupted run's");
    let metrics = |c: &Path| std::fs::read_to_string(run_dir(c).join("metrics.jsonl")).unwrap();
    assert_eq!(metrics(&killed), metrics(&reference), "metrics: a step repeated, skipped or differing");
    assert_eq!(metrics(&reference).lines().count(), steps as usize);
}

#[test]
fn a_corrupt_newest_checkpoint_is_reported_and_the_previous_one_used() {
    let d = dataset();
    let reference = job(&d, "reference", 6, "");
    ok(binary("worker").args(["train", "--config"]).arg(&reference).output().unwrap());
    let broken = job(&d, "broken", 4, "");
    ok(binary("worker").args(["train", "--config"]).arg(&broken).output().unwrap());
    let file = checkpoint(&broken, 4).join("variables.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let n = bytes.len();
    bytes[n - 10] ^= 0xff;
    std::fs::write(&file, &bytes).unwrap();
    // The same job, now to 6 steps: resumes from step 2, not from the corrupt step 4.
    let longer = std::fs::read_to_string(&broken).unwrap().replace("steps: 4", "steps: 6");
    std::fs::write(&broken, longer).unwrap();
    let log = ok(binary("worker").args(["train", "--config"]).arg(&broken).output().unwrap());
    assert!(log.contains("step-00000004 is corrupt") && log.contains("SHA-256"), "{log}");
    assert!(log.contains("checkpoint=step-00000002"), "{log}");
    assert_eq!(max_diff(&variables(&reference, 6), &variables(&broken, 6)), 0.0);
}

#[test]
fn bad_configs_and_stores_fail_before_training_naming_the_field() {
    let d = dataset();
    let cases =
        [("train:\n  global_batch: 5\n", "train.global_batch"), ("data:\n  strid: 3\n", "unknown field `strid`")];
    for (i, (extra, want)) in cases.iter().enumerate() {
        let config = job(&d, &format!("bad{i}"), 2, "");
        // Replace the section by a broken one.
        let text = std::fs::read_to_string(&config).unwrap();
        let section = extra.split(':').next().unwrap();
        let kept: String =
            text.lines().filter(|l| !l.starts_with(&format!("{section}:"))).map(|l| format!("{l}\n")).collect();
        std::fs::write(&config, format!("{kept}{extra}")).unwrap();
        let out = binary("worker").args(["train", "--config"]).arg(&config).output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && stderr.contains(want), "{want}: {stderr}");
        assert!(!stderr.contains("step 1/"), "{stderr}");
    }
    // A store without a manifest.
    let config = job(&d, "nostore", 2, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(&d.shards.display().to_string(), &d.root.join("empty").display().to_string());
    std::fs::write(&config, text).unwrap();
    let out = binary("worker").args(["train", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("data.shards") && stderr.contains("manifest.json"), "{stderr}");

    // An S3 endpoint where no server listens: said within seconds, not after the 2-minute retry window that
    // requests get to ride out an outage.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let config = job(&d, "unreachable", 2, "");
    let text = std::fs::read_to_string(&config).unwrap().replace(&d.shards.display().to_string(), "s3://avexpr/shards");
    std::fs::write(&config, text).unwrap();
    let started = std::time::Instant::now();
    let out = binary("worker")
        .args(["train", "--config"])
        .arg(&config)
        // An empty variable counts as unset (before, the empty AWS_ENDPOINT_URL hid AWS_ENDPOINT).
        .env("AWS_ENDPOINT_URL", "")
        .env("AWS_SESSION_TOKEN", "")
        .env("AWS_ENDPOINT", format!("http://127.0.0.1:{port}"))
        .env("AWS_ACCESS_KEY_ID", "GKunused")
        .env("AWS_SECRET_ACCESS_KEY", "not-a-real-secret")
        .env("AWS_REGION", "garage")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot reach the storage") && stderr.contains(&format!("127.0.0.1:{port}")), "{stderr}");
    assert!(stderr.contains("data.shards"), "{stderr}");
    assert!(!stderr.contains("not-a-real-secret"), "a credential was printed: {stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(60), "took {:?}", started.elapsed());
}

/// The synthetic task is learnable and the system learns it: validation macro F1 well above chance (1/8) after
/// a few hundred steps on 2 ranks, every frame of the validation videos predicted.
#[test]
fn the_synthetic_task_is_learned() {
    let tmp = tempfile::tempdir().unwrap();
    let (root, shards) = (tmp.path().join("affwild2"), tmp.path().join("shards"));
    ok(binary("data").args(["synth", "--seed", "7", "--out"]).arg(&root).output().unwrap());
    ok(binary("data").args(["ingest", "--root"]).arg(&root).arg("--out").arg(&shards).output().unwrap());
    let root = root.clone();
    let d = Dataset { root: tmp.path().to_path_buf(), shards, _tmp: tmp };
    let config = job(&d, "learn", 300, "");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace(
            "frames_per_clip: 8, stride: 4, shuffle_shards: 2, image_size: 32",
            "frames_per_clip: 16, stride: 4, shuffle_shards: 4, image_size: 64",
        )
        .replace("channels: [16, 16]", "channels: [64, 64, 64]")
        .replace("bottleneck: 16", "bottleneck: 32")
        .replace("dim: 16, layers: 1, heads: 2, ff_dim: 32", "dim: 64, layers: 1, heads: 4, ff_dim: 128")
        .replace("hidden: 16", "hidden: 64")
        .replace(
            "train: {global_batch: 4, micro_batch: 2, steps: 300, warmup_steps: 1, log_every: 1, threads: 1}",
            "train: {global_batch: 16, micro_batch: 8, steps: 300, warmup_steps: 20, log_every: 50, threads: 1, \
             optimizer: {lr: 0.003}}",
        )
        .replace("checkpoint: {every: 2, keep_last_k: 3}", "checkpoint: {every: 300, keep_last_k: 1}");
    std::fs::write(&config, text).unwrap();
    let out = mpirun(2, "worker").args(["train", "--config"]).arg(&config).output().unwrap();
    ok(out.clone());
    let stdout = String::from_utf8_lossy(&out.stdout);
    let f1: f64 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("validation after step 300: macro F1 "))
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no validation line in:\n{stdout}"))
        .parse()
        .unwrap();
    assert!(f1 > 0.2, "validation macro F1 {f1} after 300 steps: not learning (chance is about 0.125)\n{stdout}");
    assert!(stdout.contains("truth\\pred"), "the class-wise table and confusion matrix are printed:\n{stdout}");

    // predictions.txt from the final checkpoint, scored by the official scorer against the annotation files:
    // the same macro F1 the training reported.
    let val = d.root.join("val-predictions.txt");
    let predict = |split: &str, out: &Path, checkpoint: &str, ranks: usize| {
        let args = ["predict", "--split", split, "--checkpoint", checkpoint, "--config"];
        let mut cmd = mpirun(ranks, "worker");
        ok(cmd.args(args).arg(&config).arg("--out").arg(out).env("AVEXPR_PROGRESS_S", "0").output().unwrap())
    };
    let log = predict("validation", &val, "latest", 2);
    // Off a terminal, progress is a log line per interval (here every batch) on each rank.
    for rank in ["[rank 0/2]", "[rank 1/2]"] {
        assert!(
            log.lines().any(|l| l.starts_with(rank) && l.contains(" validation: ") && l.contains(" frames/s, ")),
            "{log}"
        );
    }
    let labels = root.join("7th ABAW Annotations/EXPR_Recognition_Challenge/Validation_Set");
    let out =
        binary("data").args(["score", "--json", "--pred"]).arg(&val).arg("--labels").arg(&labels).output().unwrap();
    ok(out.clone());
    let scored: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let scored = scored["macro_f1"].as_f64().unwrap();
    assert!((scored - f1).abs() < 5e-5, "official scorer {scored} vs training's validation {f1}");
    // `worker evaluate`: the same figure in eval.json, the table, a confusion-matrix PNG; and the training's
    // own figures at the end of the run.
    let eval_dir = d.root.join("eval");
    let args = ["evaluate", "--split", "validation", "--checkpoint", "latest", "--config"];
    let out = mpirun(2, "worker").args(args).arg(&config).arg("--out").arg(&eval_dir).output().unwrap();
    ok(out.clone());
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(eval_dir.join("eval.json")).unwrap()).unwrap();
    assert!((report["macro_f1"].as_f64().unwrap() - f1).abs() < 5e-5, "{report}");
    assert_eq!(report["frames"].as_u64().unwrap() as usize, {
        let m = &report["confusion"];
        (0..8).map(|t| (0..8).map(|p| m[t][p].as_u64().unwrap() as usize).sum::<usize>()).sum::<usize>()
    });
    let png = |p: PathBuf| {
        let bytes = std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n") && bytes.len() > 10_000, "{} is not a drawn PNG", p.display());
    };
    png(eval_dir.join("confusion.png"));
    // Each face went through the image encoder once (counted); every window's own audio once. The reference
    // path (one rank, every window's faces encoded, 16 per window as training encodes clips) gives the same
    // logits for every frame of every video, and so the same confusion.
    let passes = |stdout: &str| -> (f64, f64) {
        let line =
            stdout.lines().find(|l| l.starts_with("encoder passes per frame: ")).unwrap_or_else(|| panic!("{stdout}"));
        let num = |key: &str| line.split(key).nth(1).unwrap().split([',', ' ']).next().unwrap().parse::<f64>().unwrap();
        (num("image "), num("audio "))
    };
    let (image, audio) = passes(&String::from_utf8_lossy(&out.stdout));
    assert!((1.0..1.1).contains(&image) && audio == 1.0, "per frame: image {image}, audio {audio}");
    let reference_dir = d.root.join("eval-per-window");
    let out = mpirun(2, "worker")
        .args(args)
        .arg(&config)
        .args(["--faces", "per-window", "--out"])
        .arg(&reference_dir)
        .output()
        .unwrap();
    ok(out.clone());
    assert_eq!(passes(&String::from_utf8_lossy(&out.stdout)), (16.0, 1.0));
    let logits = |dir: &Path| -> BTreeMap<String, Tensor> {
        Tensor::read_safetensors(dir.join("logits.safetensors")).unwrap().into_iter().collect()
    };
    let (ours, reference) = (logits(&eval_dir), logits(&reference_dir));
    assert!(!ours.is_empty() && ours.keys().eq(reference.keys()));
    for (video, t) in &ours {
        assert_eq!(t.size()[1], 8, "{video}");
        let diff = (t - &reference[video]).abs().max().double_value(&[]);
        let scale = reference[video].abs().max().double_value(&[]);
        assert!(diff <= 1e-6, "{video}: logits differ by {diff} (largest {scale})");
    }
    let reference_report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(reference_dir.join("eval.json")).unwrap()).unwrap();
    assert_eq!(report["confusion"], reference_report["confusion"]);
    // Test-time views: each face and its mirror image encoded (2 passes per frame), other logits.
    let tta_dir = d.root.join("eval-tta");
    let out =
        mpirun(2, "worker").args(args).arg(&config).args(["--tta", "flip", "--out"]).arg(&tta_dir).output().unwrap();
    ok(out.clone());
    let (image, _) = passes(&String::from_utf8_lossy(&out.stdout));
    assert!((2.0..2.2).contains(&image), "with a flipped view: image {image}");
    let tta = logits(&tta_dir);
    assert!(tta.iter().any(|(video, t)| (t - &ours[video]).abs().max().double_value(&[]) > 1e-4));
    png(run_dir(&config).join("curves.png"));
    png(run_dir(&config).join("confusion.png"));

    // The test split (2 videos) on 3 ranks, so that one rank has nothing to contribute: one line per frame of
    // every test video, after the header.
    let test = d.root.join("test-predictions.txt");
    predict("test", &test, "best", 3);
    let lines = std::fs::read_to_string(&test).unwrap().lines().count();
    let store = avexpr_data::store::Store::open(&d.shards.display().to_string()).unwrap();
    let manifest = avexpr_data::manifest::read_manifest(&store).unwrap();
    let frames: usize =
        manifest.videos.iter().filter(|v| v.split == avexpr_data::layout::Split::Test).map(|v| v.frames).sum();
    assert!(frames > 0);
    assert_eq!(lines, frames + 1, "a prediction for every test frame");
}

/// `worker ablate` trains the full model and its four ablations on 2 ranks and tabulates them (a short run:
/// that every variant trains and evaluates to a finite F1, not what it reaches).
#[test]
fn ablate_runs_every_variant() {
    let d = dataset();
    let config = job(&d, "ablate", 4, "");
    let out = mpirun(2, "worker").args(["ablate", "--steps", "2", "--config"]).arg(&config).output().unwrap();
    ok(out.clone());
    let stdout = String::from_utf8_lossy(&out.stdout);
    for variant in ["full", "video_only", "audio_only", "concat", "no_prompt_loss"] {
        let line = stdout
            .lines()
            .find(|l| l.starts_with(&format!("{variant} ")))
            .unwrap_or_else(|| panic!("{variant}:\n{stdout}"));
        let f1: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
        assert!(f1.is_finite() && (0.0..=1.0).contains(&f1), "{line}");
        assert!(run_dir(&config).join("ablation").join(variant).join("checkpoints").join("step-00000002").is_dir());
    }
}
