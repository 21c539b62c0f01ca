//! Bad input gets an error naming the file and the key or field at fault.

mod common;

use std::path::Path;

use avexpr_model::clip::{ClipImageProcessor, ClipTextEncoder, ClipVisionEncoder};
use avexpr_model::wav2vec2::{Wav2Vec2Encoder, Wav2Vec2FeatureExtractor};
use avexpr_model::{EncoderOptions, ModelError};
use common::{copy_fixture, edit_config, fixture};
use tch::Tensor;

fn edit_weights(dir: &Path, edit: impl FnOnce(&mut Vec<(String, Tensor)>)) {
    let path = dir.join("model.safetensors");
    let mut tensors = Tensor::read_safetensors(&path).unwrap();
    edit(&mut tensors);
    Tensor::write_safetensors(&tensors, &path).unwrap();
}

fn w2v_err(dir: &Path) -> String {
    Wav2Vec2Encoder::load(dir, EncoderOptions::default()).unwrap_err().to_string()
}

#[track_caller]
fn assert_mentions(message: &str, parts: &[&str]) {
    for part in parts {
        assert!(message.contains(part), "error {message:?} does not mention {part:?}");
    }
}

#[test]
fn missing_tensor_names_file_and_key() {
    let (_tmp, dir) = copy_fixture("wav2vec2-tiny-group");
    edit_weights(&dir, |t| t.retain(|(k, _)| k != "encoder.layer_norm.weight"));
    assert_mentions(&w2v_err(&dir), &["model.safetensors", "missing tensor `encoder.layer_norm.weight`"]);
}

#[test]
fn wrong_shape_names_key_and_both_shapes() {
    let (_tmp, dir) = copy_fixture("wav2vec2-tiny-group");
    edit_weights(&dir, |t| {
        let entry = t.iter_mut().find(|(k, _)| k == "feature_projection.projection.weight").unwrap();
        entry.1 = Tensor::zeros([16, 8], tch::kind::FLOAT_CPU);
    });
    assert_mentions(
        &w2v_err(&dir),
        &["model.safetensors", "`feature_projection.projection.weight`", "[16, 8]", "expected [16, 16]"],
    );
}

#[test]
fn truncated_checkpoints_are_reported() {
    let (_tmp, dir) = copy_fixture("wav2vec2-tiny-group");
    let path = dir.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&w2v_err(&dir), &["model.safetensors", "not a valid checkpoint"]);

    let (_tmp, dir) = copy_fixture("wav2vec2-tiny-stable");
    let path = dir.join("pytorch_model.bin");
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
    assert_mentions(&w2v_err(&dir), &["pytorch_model.bin", "not a valid checkpoint"]);
}

#[test]
fn missing_weights_file() {
    let (_tmp, dir) = copy_fixture("wav2vec2-tiny-group");
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    assert_mentions(&w2v_err(&dir), &["no checkpoint found", "model.safetensors", "pytorch_model.bin"]);
}

#[test]
fn unsupported_model_type() {
    let (_tmp, dir) = copy_fixture("wav2vec2-tiny-group");
    edit_config(&dir, |c| c["model_type"] = "hubert".into());
    assert_mentions(&w2v_err(&dir), &["config.json", "unsupported model_type `hubert`"]);

    let (_tmp, dir) = copy_fixture("clip-tiny");
    edit_config(&dir, |c| c["model_type"] = "siglip".into());
    let err = ClipVisionEncoder::load(&dir, EncoderOptions::default()).unwrap_err();
    assert!(matches!(err, ModelError::UnsupportedModelType { .. }), "{err}");
    assert_mentions(&err.to_string(), &["config.json", "`siglip`"]);
}

#[test]
fn malformed_config_json() {
    let (_tmp, dir) = copy_fixture("clip-tiny");
    std::fs::write(dir.join("config.json"), "{\"model_type\": \"clip\", \"vision_config\": {").unwrap();
    let err = ClipVisionEncoder::load(&dir, EncoderOptions::default()).unwrap_err().to_string();
    assert_mentions(&err, &["config.json", "malformed JSON"]);
}

#[test]
fn invalid_config_fields_are_named() {
    let (_tmp, dir) = copy_fixture("clip-tiny");
    edit_config(&dir, |c| c["vision_config"]["num_attention_heads"] = 5.into());
    let err = ClipVisionEncoder::load(&dir, EncoderOptions::default()).unwrap_err().to_string();
    assert_mentions(&err, &["config.json", "`vision_config.num_attention_heads`", "divide hidden_size (32)"]);

    let (_tmp, dir) = copy_fixture("clip-tiny");
    edit_config(&dir, |c| c["text_config"]["hidden_act"] = "swiglu".into());
    let err = ClipTextEncoder::load(&dir, EncoderOptions::default()).unwrap_err().to_string();
    assert_mentions(&err, &["config.json", "`text_config.hidden_act`", "swiglu"]);

    let (_tmp, dir) = copy_fixture("wav2vec2-tiny-group");
    edit_config(&dir, |c| c["conv_stride"] = serde_json::json!([5, 2]));
    assert_mentions(&w2v_err(&dir), &["config.json", "`conv_dim`", "conv_stride (2)"]);

    // A zero stride once divided by zero when counting output frames.
    let (_tmp, dir) = copy_fixture("wav2vec2-tiny-group");
    edit_config(&dir, |c| c["conv_stride"][1] = 0.into());
    assert_mentions(&w2v_err(&dir), &["config.json", "`conv_stride`", "0: every entry must be positive"]);

    let (_tmp, dir) = copy_fixture("wav2vec2-tiny-group");
    edit_config(&dir, |c| c["hidden_size"] = "wide".into());
    assert_mentions(&w2v_err(&dir), &["config.json", "invalid type"]);
}

#[test]
fn vision_only_checkpoint_has_no_text_tower() {
    let err = ClipTextEncoder::load(&fixture("clip-tiny-vision"), EncoderOptions::default()).unwrap_err().to_string();
    assert_mentions(&err, &["clip-tiny-vision", "config.json", "no text tower"]);
}

#[test]
fn texts_without_tokenizer_json() {
    let enc = ClipTextEncoder::load(&fixture("clip-tiny"), EncoderOptions::default()).unwrap();
    let err = enc.encode_texts(&["a face"]).unwrap_err().to_string();
    assert_mentions(&err, &["tokenizer.json", "file not found"]);

    let (_tmp, dir) = copy_fixture("clip-tiny");
    std::fs::write(dir.join("tokenizer.json"), "{\"version\": ").unwrap();
    let err = ClipTextEncoder::load(&dir, EncoderOptions::default()).unwrap_err().to_string();
    assert_mentions(&err, &["tokenizer.json", "tokenizer:"]);
}

#[test]
fn unreadable_and_missing_images() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("frame.jpg");
    std::fs::write(&path, b"\xff\xd8\xff\xe0 this is not really a jpeg").unwrap();
    let err = ClipImageProcessor::open(&path).unwrap_err().to_string();
    assert_mentions(&err, &["frame.jpg", "cannot decode image"]);
    let err = ClipImageProcessor::open(&tmp.path().join("absent.png")).unwrap_err().to_string();
    assert_mentions(&err, &["absent.png", "cannot read"]);
}

fn write_wav(path: &Path, rate: u32, channels: u16, samples: &[i16]) {
    let spec =
        hound::WavSpec { channels, sample_rate: rate, bits_per_sample: 16, sample_format: hound::SampleFormat::Int };
    let mut w = hound::WavWriter::create(path, spec).unwrap();
    samples.iter().for_each(|&s| w.write_sample(s).unwrap());
    w.finalize().unwrap();
}

#[test]
fn audio_at_the_wrong_sample_rate_or_corrupt() {
    let tmp = tempfile::tempdir().unwrap();
    let fe = Wav2Vec2FeatureExtractor::default();
    let path = tmp.path().join("speech44k.wav");
    write_wav(&path, 44_100, 1, &[0; 441]);
    let err = fe.read_wav(&path).unwrap_err().to_string();
    assert_mentions(&err, &["speech44k.wav", "44100 Hz", "expects 16000 Hz"]);

    let path = tmp.path().join("garbage.wav");
    std::fs::write(&path, b"RIFF\x10\x00\x00\x00WAVEjunkjunk").unwrap();
    assert_mentions(&fe.read_wav(&path).unwrap_err().to_string(), &["garbage.wav", "not a readable WAV file"]);

    // Stereo 16 kHz is accepted and averaged to mono.
    let path = tmp.path().join("stereo.wav");
    write_wav(&path, 16_000, 2, &[16384, 0, -16384, 0]);
    assert_eq!(fe.read_wav(&path).unwrap(), vec![0.25, -0.25]);
}
