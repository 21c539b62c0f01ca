//! `worker embed` as a user runs it: real files in, one safetensors file out, equal to the library's (and so
//! the reference's) embeddings; bad input fails with the file named and leaves an earlier output intact.

use std::path::Path;

use avexpr_model::EncoderOptions;
use avexpr_model::clip::ClipTextEncoder;
use avexpr_model::fixtures;
use avexpr_tests::binary;
use tch::Tensor;

fn write_tone(path: &Path, rate: u32, seconds: f64) {
    let spec =
        hound::WavSpec { channels: 1, sample_rate: rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    for i in 0..(rate as f64 * seconds) as usize {
        let t = i as f64 / rate as f64;
        w.write_sample(((t * 220.0 * std::f64::consts::TAU).sin() * 8000.0) as i16).unwrap();
    }
    w.finalize().unwrap();
}

#[test]
fn embed_writes_image_prompt_and_audio_embeddings() {
    let tmp = tempfile::tempdir().unwrap();
    let clip = fixtures::clip_tiny_with_tokenizer().unwrap();
    let wav = tmp.path().join("speech.wav");
    write_tone(&wav, 16_000, 1.0);
    let out = tmp.path().join("out").join("emb.safetensors");
    let fx = fixtures::dir();
    let output = binary("worker")
        .args(["embed", "--device", "cpu", "--clip"])
        .arg(&clip)
        .arg("--wav2vec2")
        .arg(fx.join("wav2vec2-tiny-group"))
        .arg("--images")
        .args([fx.join("image0.png"), fx.join("image1.png")])
        .arg("--audio")
        .arg(&wav)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "worker embed failed: {stderr}");
    assert!(
        stderr.lines().filter(|l| !l.is_empty()).all(|l| l.starts_with("[rank 0/1]")),
        "log lines carry the rank:\n{stderr}"
    );

    let got: std::collections::HashMap<String, Tensor> = Tensor::read_safetensors(&out).unwrap().into_iter().collect();
    let expected: std::collections::HashMap<String, Tensor> =
        Tensor::read_safetensors(fx.join("expected.safetensors")).unwrap().into_iter().collect();
    // Image embeddings equal the reference's from the same PNGs (up to the one-level resize rounding).
    for k in 0..2 {
        let diff = (got["image_embeds"].get(k) - &expected[&format!("clip.image{k}.image_embeds")]).abs().max();
        assert!(diff.double_value(&[]) < 0.05, "image {k}: {diff:?}");
    }
    // Prompt embeddings equal the text encoder's on the 8 class prompts.
    let text = ClipTextEncoder::load(&clip, EncoderOptions::default()).unwrap();
    let prompts = avexpr_model::prompt::class_prompts(avexpr_worker::embed::DEFAULT_TEMPLATE);
    let want = text.encode_texts(&prompts.iter().map(String::as_str).collect::<Vec<_>>()).unwrap();
    assert_eq!(got["text_embeds"].size(), [8, 12]);
    assert!(got["text_embeds"].allclose(&want, 1e-6, 1e-6, false));
    // Audio: 16000 samples through kernels (10, 3, 3) / strides (5, 2, 2) -> 799 frames of 16; 2 layers.
    assert_eq!(got["audio.0.last_hidden_state"].size(), [799, 16]);
    assert_eq!(got["audio.0.hidden_states"].size(), [3, 799, 16]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("image0.png: nearest class prompt"), "{stdout}");
}

#[test]
fn bad_audio_fails_naming_the_file_and_keeps_the_previous_output() {
    let tmp = tempfile::tempdir().unwrap();
    let wav = tmp.path().join("interview-44k.wav");
    write_tone(&wav, 44_100, 0.5);
    let out = tmp.path().join("emb.safetensors");
    std::fs::write(&out, b"previous result").unwrap();
    let output = binary("worker")
        .args(["embed", "--device", "cpu", "--wav2vec2"])
        .arg(fixtures::dir().join("wav2vec2-tiny-group"))
        .arg("--audio")
        .arg(&wav)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("interview-44k.wav") && stderr.contains("44100 Hz"), "{stderr}");
    assert_eq!(std::fs::read(&out).unwrap(), b"previous result");
}

/// An image whose size would make the resize allocate gigabytes (a 1x65535 strip: ~10 GB at 224 px) fails
/// naming the file, at once; the previous output stays.
#[test]
fn an_image_that_would_take_gigabytes_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let strip = tmp.path().join("strip.png");
    image::RgbImage::new(1, 65_535).save(&strip).unwrap();
    let out = tmp.path().join("emb.safetensors");
    std::fs::write(&out, b"earlier output").unwrap();
    let started = std::time::Instant::now();
    let output = binary("worker")
        .args(["embed", "--device", "cpu", "--clip"])
        .arg(fixtures::clip_tiny_with_tokenizer().unwrap())
        .arg("--images")
        .arg(&strip)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{stderr}");
    assert!(stderr.contains("strip.png") && stderr.contains("1x65535 pixels: an aspect ratio beyond 64:1"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(30), "took {:?}", started.elapsed());
    assert_eq!(std::fs::read(&out).unwrap(), b"earlier output");
}

#[test]
fn usage_errors_are_reported() {
    let output = binary("worker").args(["embed", "--out", "x.safetensors"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("give --clip DIR and/or --wav2vec2 DIR"));
    let output = binary("worker").args(["embed", "--device", "tpu", "--out", "x"]).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("'--device <DEVICE>': `tpu` is not one of auto, cpu, cuda, cuda:N"), "{stderr}");
}

/// The quickstart's pretrained CLIP (model/quickstart) knows the look-alike's expressions as a real CLIP knows
/// faces: zero-shot, through `worker embed`'s nearest class prompt, on faces of a look-alike it never saw
/// (seed 41), it is right far above chance (1/8; Anger and Disgust look alike, so they count as one).
#[test]
fn the_quickstart_clip_recognises_unseen_faces_zero_shot() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("affwild2");
    let out = binary("data")
        .args(["synth", "--videos", "5", "--min-seconds", "4", "--max-seconds", "5", "--seed", "41", "--out"])
        .arg(&root)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    // Up to 6 faces per class, each well inside a segment of its label (the drawn face takes a few frames to
    // change expression).
    let mut picked: Vec<(std::path::PathBuf, i8)> = Vec::new();
    let annotations = root.join("7th ABAW Annotations").join("EXPR_Recognition_Challenge");
    for set in ["Train_Set", "Validation_Set"] {
        for entry in std::fs::read_dir(annotations.join(set)).unwrap() {
            let path = entry.unwrap().path();
            let person = path.file_stem().unwrap().to_str().unwrap().to_string();
            let labels = avexpr_data::annotation::read_annotation(&path).unwrap();
            for f in (10..labels.len()).step_by(7) {
                let crop = root.join("cropped_aligned").join(&person).join(format!("{:05}.jpg", f + 1));
                let class = labels[f];
                if class >= 0
                    && labels[f - 10..=f].iter().all(|&l| l == class)
                    && crop.is_file()
                    && picked.iter().filter(|p| p.1 == class).count() < 6
                {
                    picked.push((crop, class));
                }
            }
        }
    }
    assert!(picked.len() >= 24, "only {} faces picked", picked.len());
    let (clip, _) = fixtures::quickstart_encoders().unwrap();
    let output = binary("worker")
        .args(["embed", "--device", "cpu", "--clip"])
        .arg(&clip)
        .arg("--images")
        .args(picked.iter().map(|p| &p.0))
        .arg("--out")
        .arg(tmp.path().join("emb.safetensors"))
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", String::from_utf8_lossy(&output.stderr));
    let stdout = String::from_utf8_lossy(&output.stdout);
    let look = |class: &str| if class == "Disgust" { "Anger".to_string() } else { class.to_string() };
    let right = picked
        .iter()
        .filter(|(path, class)| {
            let line = stdout.lines().find(|l| l.starts_with(&format!("{}:", path.display()))).unwrap();
            let predicted = line.split("nearest class prompt ").nth(1).unwrap().split_whitespace().next().unwrap();
            look(predicted) == look(avexpr_data::Expression::ALL[*class as usize].name())
        })
        .count();
    let accuracy = right as f64 / picked.len() as f64;
    eprintln!("zero-shot accuracy {accuracy:.3} over {} faces (Anger = Disgust)", picked.len());
    assert!(accuracy >= 0.6, "zero-shot accuracy {accuracy:.3} over {} faces", picked.len());
}

/// Lays out a Hugging Face hub cache with `huggingface_hub`'s own functions (blobs, snapshots of symlinks,
/// refs), as a download leaves it: `openai/clip-vit-base-patch32` at two commits, `main` the tiny test CLIP
/// and tag `v0` the quickstart CLIP. Prints what `huggingface_hub` resolves offline (the folders `transformers`
/// loads with `local_files_only=True`).
const HUB_LAYOUT: &str = r#"
import hashlib, json, os, sys
from huggingface_hub import scan_cache_dir, snapshot_download, try_to_load_from_cache
from huggingface_hub.file_download import _cache_commit_hash_for_specific_revision, _create_symlink, repo_folder_name
cache, repo, main_src, v0_src = sys.argv[1:5]
storage = os.path.join(cache, repo_folder_name(repo_id=repo, repo_type="model"))
commits = {}
for ref, src in [("main", main_src), ("v0", v0_src)]:
    commit = commits[ref] = hashlib.sha1(ref.encode()).hexdigest()
    for name in sorted(os.listdir(src)):
        data = open(os.path.join(src, name), "rb").read()
        blob = os.path.join(storage, "blobs", hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        open(blob, "wb").write(data)
        pointer = os.path.join(storage, "snapshots", commit, name)
        os.makedirs(os.path.dirname(pointer), exist_ok=True)
        _create_symlink(blob, pointer, new_blob=False)
    _cache_commit_hash_for_specific_revision(storage, ref, commit)
found = {
    "main": snapshot_download(repo, local_files_only=True, cache_dir=cache),
    "v0": snapshot_download(repo, revision="v0", local_files_only=True, cache_dir=cache),
    "commit": snapshot_download(repo, revision=commits["v0"], local_files_only=True, cache_dir=cache),
    "commit_hash": commits["v0"],
    "config": try_to_load_from_cache(repo, "config.json", cache_dir=cache),
    "revisions": sum(len(r.revisions) for r in scan_cache_dir(cache).repos),
}
print(json.dumps(found))
"#;

/// `--clip openai/clip-vit-base-patch32` is found offline in the local hub cache where `huggingface_hub` finds
/// it (HF_HUB_CACHE, HF_HOME, ~/.cache/huggingface/hub; `refs/main`, a tag, a commit hash) and embeds exactly
/// as the directory does; a model that is not in the cache is an error naming where it looked.
#[test]
fn a_hugging_face_model_id_is_found_in_the_local_hub_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let home = tmp.path().join("home");
    let cache = home.join(".cache/huggingface/hub");
    let repo = "openai/clip-vit-base-patch32";
    let clip = fixtures::clip_tiny_with_tokenizer().unwrap();
    let (quickstart_clip, _) = fixtures::quickstart_encoders().unwrap();
    let python = std::env::var("AVEXPR_PYTHON").expect("AVEXPR_PYTHON (set by scripts/setup)");
    let out = std::process::Command::new(python)
        .args(["-c", HUB_LAYOUT])
        .arg(&cache)
        .arg(repo)
        .arg(&clip)
        .arg(&quickstart_clip)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let found: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(found["revisions"], 2, "huggingface_hub's cache scan accepts the layout: {found}");
    assert_eq!(
        Path::new(found["config"].as_str().unwrap()),
        Path::new(found["main"].as_str().unwrap()).join("config.json")
    );

    let image = fixtures::dir().join("image0.png");
    let embed = |checkpoint: &Path, revision: Option<&str>, env: &[(&str, &Path)]| {
        let out_file = tmp.path().join(format!("emb-{}.safetensors", rand_name()));
        let mut cmd = binary("worker");
        cmd.args(["embed", "--device", "cpu", "--clip"]).arg(checkpoint).arg("--images").arg(&image);
        cmd.arg("--out").arg(&out_file);
        if let Some(r) = revision {
            cmd.args(["--clip-revision", r]);
        }
        for var in ["HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"] {
            cmd.env_remove(var);
        }
        cmd.env("HOME", tmp.path().join("elsewhere"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let output = cmd.output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
        let embeds = output.status.success().then(|| {
            Tensor::read_safetensors(&out_file).unwrap().into_iter().find(|(n, _)| n == "image_embeds").unwrap().1
        });
        (embeds, stderr)
    };
    let (direct, stderr) = embed(&clip, None, &[]);
    let direct = direct.unwrap_or_else(|| panic!("{stderr}"));
    let (direct_v0, stderr) = embed(&quickstart_clip, None, &[]);
    let direct_v0 = direct_v0.unwrap_or_else(|| panic!("{stderr}"));
    let id = Path::new(repo);
    let hf_home = home.join(".cache/huggingface");
    for (revision, want_dir, want) in [(None, "main", &direct), (Some("v0"), "v0", &direct_v0)] {
        for env in [[("HF_HUB_CACHE", cache.as_path())], [("HF_HOME", hf_home.as_path())], [("HOME", home.as_path())]] {
            let (got, stderr) = embed(id, revision, &env);
            let got = got.unwrap_or_else(|| panic!("{revision:?} {env:?}: {stderr}"));
            let dir = found[want_dir].as_str().unwrap();
            assert!(stderr.contains(&format!("checkpoint={dir} ")), "{revision:?} {env:?} loads {dir}:\n{stderr}");
            assert!(got.equal(want), "{revision:?} {env:?}: the embeddings of the directory");
        }
    }
    let commit = found["commit_hash"].as_str().unwrap();
    let (got, stderr) = embed(id, Some(commit), &[("HF_HUB_CACHE", &cache)]);
    assert!(stderr.contains(&format!("checkpoint={} ", found["commit"].as_str().unwrap())), "{stderr}");
    assert!(got.unwrap().equal(&direct_v0));

    let (got, stderr) = embed(Path::new("openai/clip-vit-large-patch14"), None, &[("HF_HUB_CACHE", &cache)]);
    assert!(got.is_none());
    let missing = cache.join("models--openai--clip-vit-large-patch14/refs/main");
    assert!(stderr.contains(&format!("is not in the Hugging Face cache: no {}", missing.display())), "{stderr}");
}

fn rand_name() -> String {
    use std::sync::atomic::{AtomicUsize, Ordering};
    static N: AtomicUsize = AtomicUsize::new(0);
    N.fetch_add(1, Ordering::Relaxed).to_string()
}
