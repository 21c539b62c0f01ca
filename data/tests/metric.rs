//! The metric against scikit-learn, the predictions.txt format, and `data score` as a user runs it.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use avexpr_data::predictions::{Predictions, header, read_predictions, score, write_predictions};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures").join(name)
}

#[derive(serde::Deserialize)]
struct Sklearn {
    f1: Vec<f64>,
    macro_f1: f64,
    frames: u64,
}

fn sklearn() -> Sklearn {
    serde_json::from_str(&std::fs::read_to_string(fixture("sklearn_f1.json")).unwrap()).unwrap()
}

#[test]
fn macro_f1_equals_scikit_learn() {
    let reference = sklearn();
    let confusion = score(&fixture("predictions.txt"), &fixture("Validation_Set")).unwrap();
    assert_eq!(confusion.frames(), reference.frames, "frames labelled -1 are ignored");
    for (c, (ours, theirs)) in confusion.f1_per_class().iter().zip(&reference.f1).enumerate() {
        assert!((ours - theirs).abs() < 1e-12, "class {c}: {ours} vs scikit-learn {theirs}");
    }
    assert!((confusion.macro_f1() - reference.macro_f1).abs() < 1e-12);
    assert_eq!(confusion.f1(3), 0.0, "Fear: absent from labels and predictions, counted as 0");
}

#[test]
fn predictions_round_trip_through_the_official_file() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("predictions.txt");
    let predictions: Predictions =
        BTreeMap::from([("video1".into(), vec![0, 7, 3]), ("122-60-1920x1080-4".into(), vec![4])]);
    write_predictions(&path, &predictions).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    assert!(text.starts_with(&format!("{}\n122-60-1920x1080-4/00001.jpg,4\nvideo1/00001.jpg,0\n", header())), "{text}");
    let expected = BTreeMap::from([("video1".to_string(), 3), ("122-60-1920x1080-4".to_string(), 1)]);
    assert_eq!(read_predictions(&path, Some(&expected)).unwrap(), predictions);
}

#[test]
fn the_reader_names_the_line_of_each_problem() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("predictions.txt");
    let expected = BTreeMap::from([("v".to_string(), 2)]);
    let err = |body: &str| {
        std::fs::write(&path, body).unwrap();
        read_predictions(&path, Some(&expected)).unwrap_err().to_string()
    };
    let h = header();
    let cases = [
        ("image,label\nv/00001.jpg,0\n".to_string(), ":1:", "bad header"),
        (format!("{h}\nv/00001.jpg,0\nv/00002.jpg,9\n"), ":3:", "label `9`"),
        (format!("{h}\nv/00001.jpg,x\n"), ":2:", "label `x`"),
        (format!("{h}\nw/00001.jpg,1\n"), ":2:", "unknown video `w`"),
        (format!("{h}\nv/00003.jpg,1\n"), ":2:", "frame 3 of `v`, which has 2 frames"),
        (format!("{h}\nv/00001.jpg,1\nv/00001.jpg,2\n"), ":3:", "already predicted on line 2"),
        (format!("{h}\nv/frame1.png,1\n"), ":2:", "not a frame file name"),
        (format!("{h}\nv-00001.jpg,1\n"), ":2:", "is not `<video>/<frame>.jpg`"),
    ];
    for (body, line, reason) in cases {
        let e = err(&body);
        assert!(e.contains(&format!("predictions.txt{line}")) && e.contains(reason), "{e}");
    }
    let e = err(&format!("{h}\nv/00002.jpg,1\n"));
    assert!(e.contains("`v` has 1 of its 2 frames predicted (first missing: frame 1)"), "{e}");
}

#[test]
fn scoring_requires_every_labelled_frame() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("predictions.txt");
    let full = std::fs::read_to_string(fixture("predictions.txt")).unwrap();
    let cut: Vec<&str> = full.lines().filter(|l| !l.starts_with("video59/")).collect();
    std::fs::write(&path, cut.join("\n")).unwrap();
    let e = score(&path, &fixture("Validation_Set")).unwrap_err().to_string();
    assert!(e.contains("`video59` has 150 labelled frames but 0 predictions"), "{e}");
}

#[test]
fn data_score_cli_prints_the_table_and_json() {
    let run = |json: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_data"));
        cmd.arg("score").arg("--pred").arg(fixture("predictions.txt")).arg("--labels").arg(fixture("Validation_Set"));
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).unwrap()
    };
    let table = run(false);
    // No training set at hand: the ratio column is the scored frames' own class shares.
    assert!(table.contains("Share(%)") && table.contains(&format!("Macro F1 {:.4}", sklearn().macro_f1)), "{table}");
    let json: serde_json::Value = serde_json::from_str(&run(true)).unwrap();
    assert!((json["macro_f1"].as_f64().unwrap() - sklearn().macro_f1).abs() < 1e-12);
}
