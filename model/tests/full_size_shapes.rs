//! The full-size configurations (presets) build exactly the variables of the reference state dicts: same
//! names, same shapes (`full_size_shapes.json`, written by generate.py from transformers on the meta device).

use std::collections::BTreeMap;

use avexpr_model::activation::Activation;
use avexpr_model::clip::{
    ClipTextConfig, ClipTextModelWithProjection, ClipVisionConfig, ClipVisionModelWithProjection,
};
use avexpr_model::wav2vec2::{Wav2Vec2Config, Wav2Vec2Model};
use tch::nn::VarStore;

type Shapes = BTreeMap<String, Vec<i64>>;

fn reference(name: &str) -> Shapes {
    let path = avexpr_model::fixtures::dir().join("full_size_shapes.json");
    let mut all: BTreeMap<String, Shapes> = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    all.remove(name).unwrap_or_else(|| panic!("no reference for {name}"))
}

fn ours(vs: &VarStore) -> Shapes {
    vs.variables().into_iter().map(|(k, v)| (k, v.size())).collect()
}

fn assert_same(name: &str, ours: &Shapes, reference: &Shapes) {
    let missing: Vec<_> = reference.keys().filter(|k| !ours.contains_key(*k)).collect();
    let extra: Vec<_> = ours.keys().filter(|k| !reference.contains_key(*k)).collect();
    assert!(missing.is_empty() && extra.is_empty(), "{name}: missing {missing:?}, extra {extra:?}");
    for (k, shape) in reference {
        assert_eq!(&ours[k], shape, "{name}: shape of {k}");
    }
}

fn check_clip(name: &str, vision: ClipVisionConfig, text: ClipTextConfig) {
    let vs = VarStore::new(tch::Device::Cpu);
    let _v = ClipVisionModelWithProjection::new(&vs.root(), &vision, Activation::QuickGelu);
    let _t = ClipTextModelWithProjection::new(&vs.root(), &text, Activation::QuickGelu);
    let mut reference = reference(name);
    // CLIP's learned temperature is not part of either frozen tower; the prompt head trains its own.
    assert!(reference.remove("logit_scale").is_some());
    assert_same(name, &ours(&vs), &reference);
}

#[test]
fn clip_vit_b32() {
    check_clip("clip-vit-base-patch32", ClipVisionConfig::vit_b32(), ClipTextConfig::vit_b32());
}

#[test]
fn clip_vit_b16() {
    check_clip("clip-vit-base-patch16", ClipVisionConfig::vit_b16(), ClipTextConfig::vit_b32());
}

#[test]
fn clip_vit_l14() {
    check_clip("clip-vit-large-patch14", ClipVisionConfig::vit_l14(), ClipTextConfig::vit_l14());
}

fn check_wav2vec2(name: &str, cfg: Wav2Vec2Config) {
    let vs = VarStore::new(tch::Device::Cpu);
    let _m = Wav2Vec2Model::new(&vs.root(), &cfg, Activation::Gelu, Activation::Gelu);
    assert_same(name, &ours(&vs), &reference(name));
}

#[test]
fn wav2vec2_base() {
    check_wav2vec2("wav2vec2-base", Wav2Vec2Config::base());
}

#[test]
fn wav2vec2_large_lv60() {
    check_wav2vec2("wav2vec2-large-lv60", Wav2Vec2Config::large_lv60());
}

/// The full-size towers also run: one 224x224 frame through B/16 and L/14 (random weights), one second of
/// audio through wav2vec2-large-lv60, with the output sizes of the real models.
#[test]
fn full_size_forward_passes() {
    use avexpr_model::EncoderOptions;
    use avexpr_model::clip::ClipVisionEncoder;
    use avexpr_model::wav2vec2::Wav2Vec2Encoder;
    let pixels = tch::Tensor::randn([1, 3, 224, 224], tch::kind::FLOAT_CPU);
    for (cfg, dim) in [(ClipVisionConfig::vit_b16(), 512), (ClipVisionConfig::vit_l14(), 768)] {
        let enc = ClipVisionEncoder::from_config(&cfg, EncoderOptions::default()).unwrap();
        let embeds = enc.encode_pixels(&pixels);
        assert_eq!(embeds.size(), [1, dim]);
        assert!(embeds.isfinite().all().int64_value(&[]) == 1);
    }
    let enc = Wav2Vec2Encoder::from_config(&Wav2Vec2Config::large_lv60(), EncoderOptions::default()).unwrap();
    let out = enc.encode(&tch::Tensor::randn([1, 16_000], tch::kind::FLOAT_CPU), None);
    // 16000 samples -> 49 frames (the 320-sample stride, 400-sample receptive field); 24 layers + input.
    assert_eq!(out.last_hidden_state.size(), [1, 49, 1024]);
    assert_eq!(out.hidden_states.len(), 25);
}
