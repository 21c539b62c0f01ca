//! synth -> ingest -> read back, on a local directory and on a real S3 server (Garage): every frame count,
//! label and audio length equals the source; re-runs skip finished videos; an interrupted video is redone;
//! bad input fails only the video it belongs to, with the file named.

mod garage;

use std::path::Path;

use avexpr_data::annotation::align_labels;
use avexpr_data::decode::audio_samples;
use avexpr_data::ingest::{IngestConfig, ingest};
use avexpr_data::layout::Split;
use avexpr_data::manifest::{FaceSource, Manifest, read_manifest};
use avexpr_data::shard::read_shard;
use avexpr_data::store::Store;
use avexpr_data::synth::{SynthConfig, SynthVideo, synth};
use sha2::{Digest, Sha256};

fn small_dataset(root: &Path) -> Vec<SynthVideo> {
    synth(root, &SynthConfig { videos: 6, min_seconds: 1.5, max_seconds: 2.5, seed: 5, ..Default::default() }).unwrap()
}

fn config(root: &Path, out: &str) -> IngestConfig {
    let mut cfg = IngestConfig::new(root.to_path_buf(), out.to_string());
    cfg.segment_frames = 16;
    cfg.shard_frames = 32;
    cfg.jobs = 2;
    cfg
}

/// Reads every shard back and checks it against the synthesised source.
fn check_round_trip(store: &Store, written: &[SynthVideo]) -> Manifest {
    let manifest = read_manifest(store).unwrap();
    assert!(manifest.failures.is_empty(), "{:?}", manifest.failures);
    assert_eq!(manifest.videos.len(), written.len());
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    for source in written {
        let v = manifest.videos.iter().find(|v| v.name == source.name).unwrap();
        assert_eq!((v.frames, v.fps, v.split), (source.frames, source.fps as f64, source.split), "{}", v.name);
        let want_labels = if source.split == Split::Test {
            vec![-1; source.frames]
        } else {
            align_labels(&source.labels, source.frames).0
        };
        let (mut labels, mut audio, mut faces, mut missing) = (Vec::new(), 0usize, 0usize, 0u64);
        let mut next_frame = 0;
        for shard in &v.shards {
            let bytes = rt.block_on(store.get(&shard.key)).unwrap();
            assert_eq!(bytes.len() as u64, shard.bytes);
            assert_eq!(hex::encode(Sha256::digest(&bytes)), shard.sha256, "{}", shard.key);
            assert_eq!(shard.first_frame, next_frame);
            for sample in read_shard(&shard.key, &bytes).unwrap() {
                assert_eq!(sample.meta["first_frame"].as_u64().unwrap() as usize, next_frame);
                assert_eq!(sample.meta["video"], v.name.as_str());
                let n = sample.labels.len();
                assert_eq!(sample.audio_len(), audio_samples(next_frame + n, v.fps) - audio_samples(next_frame, v.fps));
                for jpeg in &sample.faces {
                    let img = image::load_from_memory(jpeg).unwrap();
                    assert_eq!((img.width(), img.height()), (112, 112));
                }
                faces += sample.faces.len();
                missing += sample.face_missing.iter().map(|&m| m as u64).sum::<u64>();
                audio += sample.audio_len();
                labels.extend(sample.labels);
                next_frame += n;
            }
        }
        assert_eq!(labels, want_labels, "{}: labels after the mismatch policy", v.name);
        assert_eq!(v.labels(), want_labels, "{}: the manifest's label runs", v.name);
        assert_eq!((faces, audio), (v.frames, audio_samples(v.frames, v.fps)), "{}", v.name);
        assert_eq!(audio, v.audio_samples);
        assert_eq!(missing, source.missing_crops.len() as u64, "{}: frames standing in for missing crops", v.name);
        assert_eq!(missing, v.face_missing);
    }
    let ratio_sum: f64 = manifest.class_ratios.iter().sum();
    assert!((ratio_sum - 1.0).abs() < 1e-9);
    manifest
}

#[test]
fn local_round_trip_idempotent_rerun_and_interrupted_video() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    let written = small_dataset(&root);
    let out = tmp.path().join("shards").display().to_string();
    let report = ingest(&config(&root, &out)).unwrap();
    assert_eq!(report.ingested.len(), written.len());
    let store = Store::open(&out).unwrap();
    let manifest = check_round_trip(&store, &written);
    assert!(report.lines().iter().any(|l| l.contains("dropped the last 3 labels")), "{:?}", report.lines());
    assert!(report.lines().iter().any(|l| l.contains("the last 2 frames are ignored")));

    // A re-run skips every finished video and writes the same manifest.
    let again = ingest(&config(&root, &out)).unwrap();
    assert_eq!((again.ingested.len(), again.skipped.len()), (0, written.len()));
    assert_eq!(again.manifest, manifest);

    // A crash in the middle of a video: its shard half-written, its record never written. The next run redoes it.
    let victim = &manifest.videos[1];
    let shard = Path::new(&out).join(&victim.shards[0].key);
    let bytes = std::fs::read(&shard).unwrap();
    std::fs::write(&shard, &bytes[..bytes.len() / 2]).unwrap();
    std::fs::remove_file(Path::new(&out).join(format!("videos/{}.json", victim.name))).unwrap();
    let redo = ingest(&config(&root, &out)).unwrap();
    assert_eq!(redo.ingested, vec![victim.name.clone()]);
    assert_eq!(check_round_trip(&store, &written), manifest);

    // Other settings: nothing of the earlier run is reused.
    let mut longer = config(&root, &out);
    longer.segment_frames = 8;
    let rerun = ingest(&longer).unwrap();
    assert_eq!((rerun.ingested.len(), rerun.skipped.len()), (written.len(), 0));
    assert!(rerun.manifest.videos.iter().all(|v| v.shards.iter().all(|s| s.segments == s.frames.div_ceil(8))));
    check_round_trip(&store, &written);
}

#[test]
fn full_frame_face_source() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    let written = small_dataset(&root);
    let out = tmp.path().join("shards").display().to_string();
    let mut cfg = config(&root, &out);
    cfg.face = FaceSource::FullFrame;
    cfg.face_size = 64;
    let manifest = ingest(&cfg).unwrap().manifest;
    assert!(manifest.failures.is_empty());
    let store = Store::open(&out).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let v = &manifest.videos[0];
    let sample = &read_shard("s", &rt.block_on(store.get(&v.shards[0].key)).unwrap()).unwrap()[0];
    let img = image::load_from_memory(&sample.faces[0]).unwrap();
    assert_eq!((img.width(), img.height(), v.face_missing), (64, 64, 0));
    assert_eq!(
        manifest.videos.iter().map(|v| v.frames).sum::<usize>(),
        written.iter().map(|v| v.frames).sum::<usize>()
    );
}

#[test]
fn bad_input_fails_only_its_video_and_names_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    let written = small_dataset(&root);
    let layout = avexpr_data::layout::Layout::discover(&root).unwrap();
    let entry = |i: usize| layout.videos.iter().find(|v| v.name == written[i].name).unwrap();
    // 0: truncated video; 2: bad annotation header; 3: out-of-range label; 4: unreadable JPEG.
    let media = entry(0).media.clone().unwrap();
    let bytes = std::fs::read(&media).unwrap();
    std::fs::write(&media, &bytes[..bytes.len() / 3]).unwrap();
    let ann2 = entry(2).annotation.clone().unwrap();
    let text = std::fs::read_to_string(&ann2).unwrap();
    std::fs::write(&ann2, text.replacen("Neutral", "Calm", 1)).unwrap();
    let ann3 = entry(3).annotation.clone().unwrap();
    let text = std::fs::read_to_string(&ann3).unwrap();
    std::fs::write(&ann3, text.replacen("\n", "\n9\n", 1)).unwrap();
    let jpeg = entry(4).crops.clone().unwrap().join("00001.jpg");
    std::fs::write(&jpeg, b"\xff\xd8\xff not a jpeg").unwrap();
    // An annotation without media.
    let orphan = ann3.with_file_name("orphan-30-160x120.txt");
    std::fs::write(&orphan, format!("{}\n0\n", avexpr_data::Expression::header())).unwrap();

    let out = tmp.path().join("shards").display().to_string();
    let report = ingest(&config(&root, &out)).unwrap();
    let failed: Vec<(&str, &str)> =
        report.manifest.failures.iter().map(|f| (f.video.as_str(), f.error.as_str())).collect();
    let find = |name: &str| {
        failed.iter().find(|(v, _)| *v == name).unwrap_or_else(|| panic!("{name} not failed: {failed:?}")).1
    };
    let media_name = media.file_name().unwrap().to_str().unwrap();
    assert!(find(&written[0].name).contains(media_name), "{failed:?}");
    assert!(find(&written[2].name).contains(":1: bad header"), "{failed:?}");
    assert!(find(&written[3].name).contains(":2:") && find(&written[3].name).contains("out of range"), "{failed:?}");
    assert!(find(&written[4].name).contains("00001.jpg: unreadable JPEG"), "{failed:?}");
    assert!(find("orphan-30-160x120").contains("no media file"), "{failed:?}");
    assert_eq!(report.manifest.videos.len(), written.len() - 4, "the other videos are ingested");
    assert!(report.lines().iter().filter(|l| l.starts_with("FAILED")).count() == 5);
    let manifest = read_manifest(&Store::open(&out).unwrap()).unwrap();
    assert_eq!(manifest.failures.len(), 5, "failures are in the manifest too");
}

#[test]
fn s3_round_trip_through_the_cli_with_aws_environment() {
    let garage = garage::Garage::start();
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    let written = small_dataset(&root);
    let uri = format!("s3://{}/runs/synth", garage::BUCKET);
    let out = garage::ingest_with_cli(&garage, &root, &uri);
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "{stdout}\n{stderr}");
    assert!(
        !stdout.contains(garage::SECRET_KEY) && !stderr.contains(garage::SECRET_KEY),
        "the secret is never printed"
    );
    let store = garage.store(&uri);
    check_round_trip(&store, &written);
    // A missing object is an error naming its key.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let e = rt.block_on(store.get("shards/train/absent.tar")).unwrap_err().to_string();
    assert!(e.contains("shards/train/absent.tar") && e.contains("not found"), "{e}");
}

/// `data ingest` shows a progress bar on a terminal (run under `script`, which gives it a pseudo-terminal), and
/// writes a progress line per interval into a log otherwise (`AVEXPR_PROGRESS_S=0`: every video).
#[test]
fn progress_is_a_bar_on_a_terminal_and_log_lines_otherwise() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    small_dataset(&root);
    let data = env!("CARGO_BIN_EXE_data");
    let command = format!("{data} ingest --root {} --out {}", root.display(), tmp.path().join("a").display());
    let out = std::process::Command::new("script").args(["-qec", &command, "/dev/null"]).output().unwrap();
    let terminal = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{terminal}");
    // 6 annotated videos, one of them a _left/_right pair: 7 entries.
    assert!(terminal.contains("/7 videos (") && terminal.contains("ingest \u{2588}"), "a bar:\n{terminal}");
    assert!(
        !terminal.contains("ingest: ") && !terminal.contains("video ingested"),
        "no log lines through the bar:\n{terminal}"
    );

    let out = std::process::Command::new(data)
        .args(["ingest", "--root"])
        .arg(&root)
        .arg("--out")
        .arg(tmp.path().join("b"))
        .env("AVEXPR_PROGRESS_S", "0")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(!log.contains('\u{1b}'), "no terminal control codes in a log:\n{log}");
    for k in 1..=7 {
        assert!(log.contains(&format!("ingest: {k}/7 videos (")), "a line per video:\n{log}");
    }
}
