//! The face path, end to end, as a user runs it: with the quickstart's pretrained encoders, a video-only model
//! (`model.modalities: video`) learns the look-alike's expressions from the faces, and it loses a stated
//! margin of validation macro F1 when the faces reach it broken in one of the ways a pipeline can break them:
//! channels in BGR order, faces a clip length ahead of their labels, every face masked. So a slip of that kind
//! anywhere between the crops on disk and the TCN (decode, shard, loader, tensor layout, normalisation, masks)
//! cannot pass the baseline's floor unnoticed.
//!
//! Each fault is made in the dataset before ingest (the same bytes reach the system as if a stage of it had
//! made the mistake): crops re-encoded with R and B swapped; crop files renumbered so that frame f shows the
//! face of frame f - 16 (a clip length late, cyclic per person: the window that ends at a labelled frame then
//! holds none of its faces; a face track a clip length *early* would still put the next frame's face in that
//! window, which the TCN learns to use); every crop but the first removed, so every other frame has no face of
//! its own (masked). Everything else (audio, labels, splits, training) is the baseline's.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use avexpr_tests::binary;
use avexpr_tests::jobs::ok;

/// Validation macro F1 the baseline must reach (chance is 0.125; Anger and Disgust look alike, so faces alone
/// cannot separate them).
const BASELINE_FLOOR: f64 = 0.55;
/// What each fault must cost at least, in validation macro F1.
const MARGIN: f64 = 0.3;
const CLIP: usize = 16;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Fault {
    None,
    Bgr,
    Shifted,
    Masked,
}

struct Lookalike {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

fn lookalike() -> &'static Lookalike {
    static DATA: OnceLock<Lookalike> = OnceLock::new();
    DATA.get_or_init(|| {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("affwild2");
        ok(binary("data")
            .args(["synth", "--videos", "15", "--min-seconds", "4", "--max-seconds", "6", "--seed", "31", "--out"])
            .arg(&root)
            .output()
            .unwrap());
        Lookalike { _tmp: tmp, root }
    })
}

/// The crop files of a person's folder by frame number.
fn crops(dir: &Path) -> Vec<(u32, PathBuf)> {
    let mut crops: Vec<(u32, PathBuf)> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .map(|p| (p.file_stem().unwrap().to_str().unwrap().parse().unwrap(), p))
        .collect();
    crops.sort();
    crops
}

/// A copy of the look-alike with `fault` made in its crops.
fn with_fault(fault: Fault, out: &Path) {
    let status = std::process::Command::new("cp").arg("-r").arg(&lookalike().root).arg(out).status().unwrap();
    assert!(status.success());
    for person in std::fs::read_dir(out.join("cropped_aligned")).unwrap() {
        let dir = person.unwrap().path();
        let files = crops(&dir);
        match fault {
            Fault::None => {}
            Fault::Bgr => {
                for (_, path) in &files {
                    let mut img = image::open(path).unwrap().to_rgb8();
                    img.pixels_mut().for_each(|p| p.0.swap(0, 2));
                    img.save_with_format(path, image::ImageFormat::Jpeg).unwrap();
                }
            }
            Fault::Shifted => {
                let frames = files.last().unwrap().0;
                let moved = dir.with_extension("moved");
                std::fs::create_dir(&moved).unwrap();
                for (f, path) in &files {
                    // Frame f shows the face of frame f - CLIP: the crop of frame f moves to frame f + CLIP.
                    let to = (f - 1 + CLIP as u32) % frames + 1;
                    std::fs::rename(path, moved.join(format!("{to:05}.jpg"))).unwrap();
                }
                std::fs::remove_dir(&dir).unwrap();
                std::fs::rename(&moved, &dir).unwrap();
            }
            Fault::Masked => {
                for (_, path) in &files[1..] {
                    std::fs::remove_file(path).unwrap();
                }
            }
        }
    }
}

/// Ingests the look-alike with `fault`, trains the video-only quickstart model on it and returns the final
/// validation macro F1.
fn validation_f1(fault: Fault) -> f64 {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    with_fault(fault, &root);
    let shards = tmp.path().join("shards");
    ok(binary("data").args(["ingest", "--root"]).arg(&root).arg("--out").arg(&shards).output().unwrap());

    let (clip, wav2vec2) = avexpr_model::fixtures::quickstart_encoders().unwrap();
    let quickstart = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("configs").join("quickstart.yaml");
    let mut job: serde_yaml::Value = serde_yaml::from_str(&std::fs::read_to_string(quickstart).unwrap()).unwrap();
    let run = tmp.path().join("run");
    job["run_dir"] = run.display().to_string().into();
    job["data"]["shards"] = shards.display().to_string().into();
    job["model"]["clip"]["checkpoint"] = clip.display().to_string().into();
    job["model"]["wav2vec2"]["checkpoint"] = wav2vec2.display().to_string().into();
    job["model"]["modalities"] = "video".into();
    job["train"]["steps"] = 150.into();
    job["train"]["global_batch"] = 8.into();
    job["train"]["eval_every"] = 0.into();
    job["train"]["threads"] = 1.into();
    job["checkpoint"]["uri"] = run.join("checkpoints").display().to_string().into();
    job["checkpoint"]["every"] = 1000.into();
    let config = tmp.path().join("job.yaml");
    std::fs::write(&config, serde_yaml::to_string(&job).unwrap()).unwrap();

    let out = binary("worker").args(["train", "--config"]).arg(&config).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    let f1 = stdout
        .lines()
        .find_map(|l| l.split_once("macro F1 ").filter(|_| l.starts_with("validation after step")))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no validation line in {stdout}"));
    eprintln!("{fault:?}: validation macro F1 {f1:.4}\n{stdout}");
    f1
}

/// The correct pipeline's F1, trained once for every test of this binary.
fn baseline() -> f64 {
    static BASELINE: OnceLock<f64> = OnceLock::new();
    let f1 = *BASELINE.get_or_init(|| validation_f1(Fault::None));
    assert!(f1 >= BASELINE_FLOOR, "the video-only baseline reached macro F1 {f1:.4} < {BASELINE_FLOOR}");
    f1
}

fn assert_costs_margin(fault: Fault) {
    let (base, broken) = (baseline(), validation_f1(fault));
    assert!(
        broken <= base - MARGIN,
        "{fault:?}: validation macro F1 {broken:.4} vs {base:.4} for the correct pipeline: the face path's \
         breakage costs less than {MARGIN}"
    );
}

#[test]
fn faces_in_bgr_order_cost_f1() {
    assert_costs_margin(Fault::Bgr);
}

#[test]
fn faces_shifted_by_a_clip_against_their_labels_cost_f1() {
    assert_costs_margin(Fault::Shifted);
}

#[test]
fn every_face_masked_costs_f1() {
    assert_costs_margin(Fault::Masked);
}
