//! The trainable model: TCN (against a PyTorch reference block, causality, receptive field), losses (against
//! torch.nn.functional), masks, gradients reaching exactly the four groups, raw vs feature inputs, learning
//! sanity, configuration errors.

mod common;

use std::path::Path;

use avexpr_model::config::{
    Adapt, AdaptMode, AudioLayers, ClassWeights, ClassificationLoss, EncoderConfig, ImageEncoder, LogitAdjustment,
    LogitAdjustmentMode, LossConfig, ModalityDropout, ModelConfig, Pooling, Target, TcnConfig,
};
use avexpr_model::expr::{EncoderDims, GROUPS, parameter_counts};
use avexpr_model::hf::{KeyMap, load_into};
use avexpr_model::lora::LoraSpec;
use avexpr_model::loss::{ExprLoss, class_weights, focal_loss};
use avexpr_model::prompt::{LOGIT_SCALE_INIT, cosine_logits};
use avexpr_model::tcn::{Tcn, TemporalBlock};
use avexpr_model::{EncoderOptions, Encoders, ExprModel, FeatureBatch, RawBatch, fixtures};
use common::{assert_close, expected, fixture, max_abs_diff};
use tch::{Device, Kind, Tensor, nn};

fn tiny_config() -> ModelConfig {
    let mut cfg = ModelConfig::default();
    cfg.clip.checkpoint = fixtures::clip_tiny_with_tokenizer().unwrap().display().to_string();
    cfg.wav2vec2.checkpoint = fixture("wav2vec2-tiny-group").display().to_string();
    cfg.tcn = TcnConfig { channels: vec![16, 24], kernel_size: 3, dropout: 0.0 };
    cfg.adapter.bottleneck = 8;
    cfg.adapter.dropout = 0.0;
    cfg.fusion.dim = 16;
    cfg.fusion.layers = 1;
    cfg.fusion.heads = 2;
    cfg.fusion.ff_dim = 32;
    cfg.fusion.dropout = 0.0;
    cfg.head.hidden = 16;
    cfg.head.dropout = 0.0;
    cfg
}

fn tiny_model(cfg: &ModelConfig) -> ExprModel {
    tch::manual_seed(0);
    let encoders = Encoders::load(cfg, EncoderOptions::default()).unwrap();
    ExprModel::new(cfg, encoders, None, Device::Cpu).unwrap()
}

/// Random clips: `frames` video frames at 25 fps, the matching 16 kHz audio; the second clip has its first
/// two frames without a face and its audio cut short (padded).
fn raw_batch(batch: i64, frames: i64) -> RawBatch {
    let samples = frames * 16_000 / 25;
    let face_mask = Tensor::ones([batch, frames], (Kind::Bool, Device::Cpu));
    let audio_mask = Tensor::ones([batch, samples], (Kind::Bool, Device::Cpu));
    if batch > 1 {
        let _ = face_mask.get(1).narrow(0, 0, 2).fill_(0);
        let _ = audio_mask.get(1).narrow(0, samples * 3 / 4, samples - samples * 3 / 4).fill_(0);
    }
    RawBatch {
        frames: Tensor::randint(256, [batch, frames, 3, 40, 48], (Kind::Uint8, Device::Cpu)),
        face_mask,
        audio: Tensor::randn([batch, samples], (Kind::Float, Device::Cpu)) * 0.1,
        audio_mask,
        fps: vec![25.0; batch as usize],
    }
}

#[test]
fn tcn_block_equals_the_pytorch_reference_block() {
    let exp = expected();
    let vs = nn::VarStore::new(Device::Cpu);
    let block = TemporalBlock::new(vs.root(), 6, 10, 3, 2, 0.0);
    load_into(&vs, &fixture("tcn_block.safetensors"), &KeyMap::default()).unwrap();
    let ours = tch::no_grad(|| block.forward_t(&exp["tcn.input"], false));
    assert_close("TemporalBlock output", &ours, &exp["tcn.output"], 1e-5);
}

#[test]
fn tcn_is_causal_and_its_receptive_field_matches_the_formula() {
    let cfg = TcnConfig { channels: vec![8, 8, 8], kernel_size: 3, dropout: 0.0 };
    assert_eq!(cfg.receptive_field(), 1 + 2 * 2 * 7);
    let vs = nn::VarStore::new(Device::Cpu);
    let tcn = Tcn::new(&vs.root(), 6, &cfg);
    assert_eq!(tcn.receptive_field(), 29);
    // Larger weights than the N(0, 0.01) init, and large positive biases so that every ReLU is active: the
    // network is then linear and every tap of every conv carries signal, so the receptive field is exact.
    tch::no_grad(|| {
        for (name, v) in vs.variables() {
            let value = if name.ends_with("bias") { v.ones_like() * 50.0 } else { v.randn_like() * 0.5 };
            v.shallow_clone().copy_(&value);
        }
    });
    let xs = Tensor::randn([1, 64, 6], (Kind::Float, Device::Cpu));
    let ys = tch::no_grad(|| tcn.forward_t(&xs, false));
    let t = 40;
    let changed = xs.copy();
    let _ = changed.narrow(1, t + 1, 64 - t - 1).normal_(0.0, 3.0);
    let ys2 = tch::no_grad(|| tcn.forward_t(&changed, false));
    assert!(
        ys.narrow(1, 0, t + 1).equal(&ys2.narrow(1, 0, t + 1)),
        "a change after frame {t} leaked into frames <= {t}"
    );
    assert!(!ys.narrow(1, t + 1, 1).equal(&ys2.narrow(1, t + 1, 1)));
    // Frame t sees frame t - 28 but not frame t - 29.
    let at = |frame: i64| {
        let xs2 = xs.copy();
        let _ = xs2.narrow(1, frame, 1).fill_(5.0);
        !tch::no_grad(|| tcn.forward_t(&xs2, false)).narrow(1, t, 1).equal(&ys.narrow(1, t, 1))
    };
    assert!(at(t - 28), "frame {} should reach frame {t}", t - 28);
    assert!(!at(t - 29), "frame {} is outside the receptive field of frame {t}", t - 29);
}

#[test]
fn losses_equal_torch_nn_functional() {
    let exp = expected();
    let (logits, targets) = (&exp["loss.logits"], &exp["loss.targets"]);
    let weights = &exp["loss.weights"];
    let ce =
        |w: Option<&Tensor>, smoothing: f64| logits.cross_entropy_loss(targets, w, tch::Reduction::Mean, -1, smoothing);
    // ExprLoss wiring: class weights from counts give ExprLoss's weighted CE; the formulas themselves:
    assert_close("cross_entropy", &ce(None, 0.0), &exp["loss.ce"], 1e-6);
    assert_close("weighted cross_entropy", &ce(Some(weights), 0.0), &exp["loss.ce_weighted"], 1e-6);
    assert_close("smoothed", &ce(Some(weights), 0.1), &exp["loss.ce_weighted_smoothed"], 1e-6);
    assert_close("focal gamma 2", &focal_loss(logits, targets, Some(weights), 2.0), &exp["loss.focal_gamma2"], 1e-6);
    assert_close(
        "focal gamma 0 = weighted CE",
        &focal_loss(logits, targets, Some(weights), 0.0),
        &exp["loss.ce_weighted"],
        1e-6,
    );

    let scale = Tensor::from(LOGIT_SCALE_INIT);
    let sims = cosine_logits(&exp["contrastive.features"], &exp["contrastive.classes"], &scale);
    assert_close("contrastive logits", &sims, &exp["contrastive.logits"], 1e-5);
    let loss = ExprLoss::new(&LossConfig::default(), &[1.0; 8], Device::Cpu);
    assert_close(
        "contrastive loss",
        &loss.contrastive(&sims, &exp["contrastive.targets"]),
        &exp["contrastive.loss"],
        1e-6,
    );
    // The clamp: a scale above ln(100) acts as ln(100).
    let big = cosine_logits(&exp["contrastive.features"], &exp["contrastive.classes"], &Tensor::from(9.0));
    let hundred = cosine_logits(&exp["contrastive.features"], &exp["contrastive.classes"], &Tensor::from(100f64.ln()));
    assert_close("clamped scale", &big, &hundred, 1e-4);
}

#[test]
fn class_weights_inverse_frequency_and_effective_number() {
    let counts = [100.0, 10.0, 0.0, 50.0, 100.0, 100.0, 100.0, 100.0];
    let w = class_weights(ClassWeights::InverseFrequency, &counts, 0.0).unwrap();
    assert_eq!(w[2], 0.0, "an absent class gets weight 0");
    assert!((w.iter().sum::<f64>() - 7.0).abs() < 1e-9, "mean 1 over the 7 present classes");
    assert!((w[1] / w[0] - 10.0).abs() < 1e-9 && (w[3] / w[0] - 2.0).abs() < 1e-9);
    let beta: f64 = 0.99;
    let w = class_weights(ClassWeights::EffectiveNumber, &counts, beta).unwrap();
    let e = |n: f64| (1.0 - beta) / (1.0 - beta.powf(n));
    assert!((w[1] / w[0] - e(10.0) / e(100.0)).abs() < 1e-9);
    assert!(class_weights(ClassWeights::None, &counts, beta).is_none());
    // Weighted CE through ExprLoss equals torch's with these weights.
    let exp = expected();
    let cfg = LossConfig { class_weights: ClassWeights::InverseFrequency, ..Default::default() };
    let loss = ExprLoss::new(&cfg, &counts, Device::Cpu);
    let w =
        Tensor::from_slice(&class_weights(ClassWeights::InverseFrequency, &counts, 0.0).unwrap()).to_kind(Kind::Float);
    let want = exp["loss.logits"].cross_entropy_loss(&exp["loss.targets"], Some(&w), tch::Reduction::Mean, -1, 0.0);
    assert_close("ExprLoss weighted CE", &loss.classification(&exp["loss.logits"], &exp["loss.targets"]), &want, 1e-6);
    let focal = LossConfig { classification: ClassificationLoss::Focal, focal_gamma: 0.0, ..cfg };
    let loss = ExprLoss::new(&focal, &counts, Device::Cpu);
    assert_close("ExprLoss focal(0)", &loss.classification(&exp["loss.logits"], &exp["loss.targets"]), &want, 1e-6);
}

#[test]
fn trainable_variables_are_exactly_the_four_groups() {
    let model = tiny_model(&tiny_config());
    let groups = model.trainable_groups();
    assert_eq!(groups.keys().copied().collect::<Vec<_>>(), {
        // Frozen encoders: no `backbone` group.
        let mut g: Vec<&str> = GROUPS.iter().copied().filter(|g| *g != "backbone").collect();
        g.sort();
        g
    });
    assert!(groups.values().all(|vars| !vars.is_empty()));
    let total: usize = groups.values().map(Vec::len).sum();
    assert_eq!(total, model.var_store().variables().len());
    assert_eq!(model.trainable_variables().len(), total);
    // No frozen encoder variable is among them (distinct storage), and they all require grad.
    let frozen: Vec<Tensor> = model.encoders().vision.var_store().variables().into_values().collect();
    for var in model.trainable_variables() {
        assert!(var.requires_grad());
        assert!(frozen.iter().all(|f| f.data_ptr() != var.data_ptr()));
    }
    let counts = model.parameter_counts();
    assert_eq!(counts, parameter_counts(model.config(), &model.encoders().dims()).unwrap());
}

#[test]
fn gradients_reach_every_group_and_no_frozen_variable() {
    let adapt = |mode| Adapt { mode, rank: 2, alpha: 4.0, mlp: true, blocks: 1, lr_scale: 1.0 };
    let frozen = Adapt::default();
    let (clip, dinov2) = (ImageEncoder::Clip, ImageEncoder::Dinov2);
    let cases = [
        (0, clip, frozen, frozen),
        (4, clip, frozen, frozen),
        (0, clip, adapt(AdaptMode::Lora), frozen),
        (0, clip, adapt(AdaptMode::LastBlocks), frozen),
        (0, clip, frozen, adapt(AdaptMode::Lora)),
        (0, clip, frozen, adapt(AdaptMode::LastBlocks)),
        (0, dinov2, frozen, frozen),
        (0, dinov2, adapt(AdaptMode::Lora), frozen),
        (0, dinov2, adapt(AdaptMode::LastBlocks), frozen),
    ];
    for (context_vectors, image_encoder, image, wav2vec2) in cases {
        let mut cfg = tiny_config();
        cfg.prompt.context_vectors = context_vectors;
        cfg.image_encoder = image_encoder;
        let tower = if image_encoder == dinov2 {
            cfg.dinov2 = EncoderConfig::new(fixture("dinov2-tiny").display().to_string());
            cfg.dinov2.adapt = image;
            ".dinov2."
        } else {
            cfg.clip.adapt = image;
            ".clip."
        };
        cfg.wav2vec2.adapt = wav2vec2;
        let model = tiny_model(&cfg);
        let groups = model.trainable_groups();
        let adapted = |tower: &str| groups.get("backbone").is_some_and(|v| v.iter().any(|(n, _)| n.contains(tower)));
        assert_eq!((adapted(tower), adapted(".wav2vec2.")), (!image.is_frozen(), !wav2vec2.is_frozen()));
        if image_encoder == dinov2 {
            assert_eq!(model.encoders().dims().image_dim, 16, "the TCN takes DINOv2's hidden size");
        }
        let raw = raw_batch(2, 6);
        let out = model.forward_raw_t(&raw, true).unwrap();
        let labels = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 7]).view([2, 6]);
        let loss = model.loss(&out, &labels);
        loss.total.backward();
        for (group, vars) in model.trainable_groups() {
            let grad_norm: f64 = vars.iter().map(|(_, v)| v.grad().abs().sum(Kind::Double).double_value(&[])).sum();
            assert!(
                grad_norm > 0.0,
                "group {group}: no gradient ({context_vectors}, {image_encoder:?} {image:?}, {wav2vec2:?})"
            );
        }
        if context_vectors > 0 {
            let groups = model.trainable_groups();
            let (_, ctx) = groups["prompt"].iter().find(|(n, _)| n == "prompt.context").unwrap();
            assert!(ctx.grad().abs().sum(Kind::Double).double_value(&[]) > 0.0, "CoOp context vectors train");
        }
        let enc = model.encoders();
        for vs in [enc.vision.var_store(), enc.text.var_store(), enc.audio.var_store()] {
            for (name, var) in vs.variables() {
                assert!(!var.grad().defined(), "frozen {name} has a gradient");
            }
        }
    }
}

/// bf16 autocast of the trainable part (what CUDA training runs; CPU autocast exercises the same code): the
/// loss and every gradient agree with f32 to bf16 precision, the gradients are f32, and some op did run in
/// bf16 (the results differ).
#[test]
fn bf16_autocast_head_matches_f32_to_bf16_precision() {
    let model = tiny_model(&tiny_config());
    let raw = raw_batch(4, 6);
    let feats = model.encode(&raw).unwrap();
    let labels = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 7]).repeat([2]).view([4, 6]);
    let run = |mixed: bool| {
        let mut vars: Vec<(String, Tensor)> = model.trainable_groups().into_values().flatten().collect();
        for (_, v) in &mut vars {
            v.zero_grad();
        }
        tch::manual_seed(3);
        let loss = avexpr_model::autocast::bf16(tch::Device::Cpu, mixed, || {
            let out = model.forward_t(&feats, true);
            model.loss(&out, &labels)
        });
        assert_eq!(loss.total.kind(), Kind::Float);
        loss.total.backward();
        let grads: Vec<(String, Tensor)> = vars.iter().map(|(n, v)| (n.clone(), v.grad().copy())).collect();
        (loss.total.double_value(&[]), grads)
    };
    let (loss32, grads32) = run(false);
    let (loss16, grads16) = run(true);
    assert!((loss32 - loss16).abs() < 2e-2 * loss32.abs().max(1.0), "loss f32 {loss32} vs bf16 {loss16}");
    assert!(loss32 != loss16, "autocast changed nothing: the head did not run in bf16");
    let (mut num, mut den) = (0.0, 0.0);
    for ((name, g32), (_, g16)) in grads32.iter().zip(&grads16) {
        assert_eq!(g16.kind(), Kind::Float, "{name}: gradient of an f32 variable must be f32");
        num += (g32 - g16).square().sum(Kind::Double).double_value(&[]);
        den += g32.square().sum(Kind::Double).double_value(&[]);
    }
    let rel = (num / den).sqrt();
    assert!(rel < 5e-2, "gradients differ by {rel} (relative L2) under bf16 autocast");
}

/// A clip's encoder features do not depend on the clips it is batched with (each clip's audio is encoded at
/// its own length, not padded to the longest): what makes a per-clip feature cache exact.
#[test]
fn a_clips_features_do_not_depend_on_its_batch_mates() {
    let model = tiny_model(&tiny_config());
    let raw = raw_batch(2, 6); // clip 1's audio is cut short: padded in the batch
    let both = model.encode(&raw).unwrap();
    let alone_raw = RawBatch {
        frames: raw.frames.narrow(0, 1, 1),
        face_mask: raw.face_mask.narrow(0, 1, 1),
        audio: raw.audio.narrow(0, 1, 1),
        audio_mask: raw.audio_mask.narrow(0, 1, 1),
        fps: vec![raw.fps[1]],
    };
    let alone = model.encode(&alone_raw).unwrap();
    let valid = alone.audio_mask.sum(Kind::Int64).int64_value(&[]);
    assert!(valid > 0 && valid < both.audio_mask.size()[1], "clip 1 is shorter than the batch");
    assert_eq!(both.audio_mask.get(1).narrow(0, 0, valid).sum(Kind::Int64).int64_value(&[]), valid);
    let diff = |a: &Tensor, b: &Tensor| (a - b).abs().max().double_value(&[]);
    let frames = alone.audio_states.size()[2];
    assert!(frames >= valid);
    let batched = both.audio_states.get(1).narrow(1, 0, valid);
    assert!(diff(&batched, &alone.audio_states.get(0).narrow(1, 0, valid)) < 1e-6, "audio states depend on the batch");
    assert!(diff(&both.image_embeds.get(1), &alone.image_embeds.get(0)) < 1e-6);
}

#[test]
fn raw_inputs_and_precomputed_features_give_identical_outputs() {
    let model = tiny_model(&tiny_config());
    let raw = raw_batch(2, 5);
    let from_raw = tch::no_grad(|| model.forward_raw_t(&raw, false)).unwrap();
    let feats = model.encode(&raw).unwrap();
    assert_eq!(feats.image_embeds.size(), [2, 5, 12]);
    assert_eq!(feats.audio_states.size()[..2], [2, 3]); // weighted sum: every hidden state
    let from_feats = tch::no_grad(|| model.forward_t(&feats, false));
    assert!(from_raw.logits.equal(&from_feats.logits));
    assert!(from_raw.prompt_logits.equal(&from_feats.prompt_logits));
    assert_eq!(from_raw.logits.size(), [2, 8]);
}

#[test]
fn values_under_masks_do_not_change_the_outputs() {
    let model = tiny_model(&tiny_config());
    let raw = raw_batch(2, 6);
    let before = tch::no_grad(|| model.forward_raw_t(&raw, false)).unwrap();
    // Scribble over the faceless frames and the padded audio of clip 1.
    let frames = raw.frames.copy();
    let _ = frames.get(1).narrow(0, 0, 2).fill_(7);
    let audio = raw.audio.copy();
    let samples = audio.size()[1];
    let _ = audio.get(1).narrow(0, samples * 3 / 4, samples - samples * 3 / 4).fill_(0.9);
    let changed = RawBatch { frames, audio, ..raw_batch_like(&raw) };
    let after = tch::no_grad(|| model.forward_raw_t(&changed, false)).unwrap();
    assert!(before.logits.allclose(&after.logits, 1e-6, 1e-6, false), "masked values changed the logits");
    assert!(before.prompt_logits.allclose(&after.prompt_logits, 1e-6, 1e-6, false));
    // And the same on features: audio frames past the valid length.
    let feats = model.encode(&raw).unwrap();
    let out = tch::no_grad(|| model.forward_t(&feats, false));
    let states = feats.audio_states.copy();
    let valid = feats.audio_mask.get(1).sum(Kind::Int64).int64_value(&[]);
    let frames = states.size()[2];
    let _ = states.get(1).narrow(1, valid, frames - valid).fill_(100.0);
    let feats2 = FeatureBatch { audio_states: states, ..feature_batch_like(&feats) };
    let out2 = tch::no_grad(|| model.forward_t(&feats2, false));
    assert!(out.logits.allclose(&out2.logits, 1e-6, 1e-6, false));
}

fn raw_batch_like(raw: &RawBatch) -> RawBatch {
    RawBatch {
        frames: raw.frames.shallow_clone(),
        face_mask: raw.face_mask.shallow_clone(),
        audio: raw.audio.shallow_clone(),
        audio_mask: raw.audio_mask.shallow_clone(),
        fps: raw.fps.clone(),
    }
}

fn feature_batch_like(f: &FeatureBatch) -> FeatureBatch {
    FeatureBatch {
        image_embeds: f.image_embeds.shallow_clone(),
        face_mask: f.face_mask.shallow_clone(),
        audio_states: f.audio_states.shallow_clone(),
        audio_mask: f.audio_mask.shallow_clone(),
        fps: f.fps.clone(),
    }
}

#[test]
fn options_per_frame_head_attention_pooling_centre_target_last_layer() {
    let mut cfg = tiny_config();
    cfg.head.per_frame = true;
    cfg.head.pooling = Pooling::Attention;
    cfg.head.target = Target::Center;
    cfg.adapter.layers = AudioLayers::Last;
    cfg.prompt.templates = vec!["A face expressing {}".into(), "a photo of a {} face".into()];
    let model = tiny_model(&cfg);
    let raw = raw_batch(2, 6);
    let feats = model.encode(&raw).unwrap();
    assert_eq!(feats.audio_states.size()[1], 1);
    let out = model.forward_t(&feats, true);
    assert_eq!(out.logits.size(), [2, 6, 8]);
    let labels = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, -1, -1, 2, 3, 4, 7]).view([2, 6]);
    assert_eq!(Vec::<i64>::try_from(model.clip_targets(&labels)).unwrap(), vec![4, 3]);
    let loss = model.loss(&out, &labels);
    assert!(loss.total.double_value(&[]).is_finite() && loss.classification.double_value(&[]) > 0.0);
}

/// 32 random clips (random frame and audio features) are learnable to 100% training accuracy.
#[test]
fn a_small_model_overfits_32_random_clips() {
    let mut cfg = tiny_config();
    cfg.loss.contrastive_weight = 0.1;
    let model = tiny_model(&cfg);
    tch::manual_seed(1);
    let (batch, frames) = (32, 8);
    let feats = FeatureBatch {
        image_embeds: Tensor::randn([batch, frames, 12], (Kind::Float, Device::Cpu)),
        face_mask: Tensor::ones([batch, frames], (Kind::Bool, Device::Cpu)),
        audio_states: Tensor::randn([batch, 3, 40, 16], (Kind::Float, Device::Cpu)),
        audio_mask: Tensor::ones([batch, 40], (Kind::Bool, Device::Cpu)),
        fps: vec![25.0; batch as usize],
    };
    let targets = Tensor::arange(batch, (Kind::Int64, Device::Cpu)).remainder(8);
    let labels = targets.unsqueeze(1).expand([batch, frames], false).contiguous();
    let mut opt = nn::OptimizerConfig::build(nn::Adam::default(), model.var_store(), 3e-3).unwrap();
    let mut accuracy = 0.0;
    for step in 0..400 {
        let out = model.forward_t(&feats, true);
        let loss = model.loss(&out, &labels);
        opt.backward_step(&loss.total);
        if step % 20 == 19 {
            let predicted = tch::no_grad(|| model.forward_t(&feats, false)).logits.argmax(-1, false);
            accuracy = predicted.eq_tensor(&targets).to_kind(Kind::Double).mean(Kind::Double).double_value(&[]);
            if accuracy == 1.0 {
                break;
            }
        }
    }
    assert_eq!(accuracy, 1.0, "training accuracy after 400 steps");
}

#[test]
fn bad_configs_name_the_field() {
    let err = |yaml: &str| ModelConfig::from_yaml(yaml, Path::new("job.yaml")).unwrap_err().to_string();
    let e = err("tcn: {channels: [64, -4]}");
    assert!(e.contains("job.yaml") && e.contains("model.tcn.channels[1]") && e.contains("-4"), "{e}");
    let e = err("tcn: {channels: []}");
    assert!(e.contains("model.tcn.channels"), "{e}");
    let e = err("fusion: {dim: 256, heads: 3}");
    assert!(e.contains("model.fusion.heads") && e.contains("must divide model.fusion.dim (256)"), "{e}");
    let e = err("head: {pooling: max}");
    assert!(e.contains("model.head.pooling") && e.contains("unknown variant `max`"), "{e}");
    // The field is named once (serde_yaml's message starts with its own copy of the path).
    assert!(e.contains("`model.head.pooling`: unknown variant `max`"), "{e}");
    let e = err("tcn: {dilations: [1, 2]}");
    assert!(e.contains("model.tcn") && e.contains("unknown field `dilations`"), "{e}");
    let e = err("loss: {classification: focal, label_smoothing: 0.1}");
    assert!(e.contains("model.loss.label_smoothing"), "{e}");
    let e = err("prompt: {templates: [\"a face\"]}");
    assert!(e.contains("model.prompt.templates[0]"), "{e}");
    let e = err("adapter: {dropout: 1.5}");
    assert!(e.contains("model.adapter.dropout"), "{e}");
    let e = err("wav2vec2: {checkpoint: w, adapt: {mode: last_blocks, blocks: 0}}");
    assert!(e.contains("model.wav2vec2.adapt.blocks") && e.contains("must be positive"), "{e}");
    let e = err("clip: {checkpoint: c, adapt: {mode: lora, rank: 0}}");
    assert!(e.contains("model.clip.adapt") && e.contains("rank 0"), "{e}");
    let e = err("image_encoder: dinov2\nclip: {checkpoint: c, adapt: {mode: lora}}");
    assert!(e.contains("model.clip.adapt") && e.contains("adapt model.dinov2 instead"), "{e}");
    let e = err("dinov2: {checkpoint: d, adapt: {mode: lora}}");
    assert!(e.contains("model.dinov2.adapt") && e.contains("DINOv2 is not used"), "{e}");
    let e = err("image_encoder: vit");
    assert!(e.contains("model.image_encoder") && e.contains("unknown variant `vit`"), "{e}");
    // More blocks than the encoder has: known once it is loaded.
    let mut cfg = tiny_config();
    cfg.clip.adapt = Adapt { mode: AdaptMode::LastBlocks, blocks: 3, ..Adapt::default() };
    let encoders = Encoders::load(&cfg, EncoderOptions::default()).unwrap();
    let e = ExprModel::new(&cfg, encoders, None, Device::Cpu).unwrap_err().to_string();
    assert!(e.contains("model.clip.adapt.blocks") && e.contains("3 is more than the encoder's 2 layers"), "{e}");
}

#[test]
fn the_paper_config_parses_and_counts_parameters() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/paper.yaml");
    let cfg = ModelConfig::from_job_file(&path).unwrap();
    assert_eq!(cfg, ModelConfig::default(), "configs/paper.yaml and ModelConfig::default() describe the same model");
    assert_eq!(cfg.tcn.receptive_field(), 61);
    let counts = parameter_counts(&cfg, &EncoderDims::paper()).unwrap();
    assert_eq!(counts.iter().map(|(g, _)| *g).collect::<Vec<_>>(), GROUPS[..4].to_vec());
    assert!(counts.iter().all(|(_, n)| *n > 0));
}

#[test]
fn modality_dropout_zeroes_one_modality_per_clip_in_training_only() {
    let mut cfg = tiny_config();
    cfg.modality_dropout = ModalityDropout { video: 0.5, audio: 0.5 };
    let model = tiny_model(&cfg);
    let feats = model.encode(&raw_batch(24, 5)).unwrap();
    let without = |video: bool| FeatureBatch {
        image_embeds: if video { feats.image_embeds.zeros_like() } else { feats.image_embeds.shallow_clone() },
        audio_states: if video { feats.audio_states.shallow_clone() } else { feats.audio_states.zeros_like() },
        ..feature_batch_like(&feats)
    };
    let (no_video, no_audio) = tch::no_grad(|| {
        (model.forward_t(&without(true), false).logits, model.forward_t(&without(false), false).logits)
    });
    // The tiny config has every other dropout at 0: in training, each clip is the clip without its video or
    // without its audio, and both happen (24 fair draws).
    let trained = tch::no_grad(|| model.forward_t(&feats, true).logits);
    let (mut videos_dropped, mut audios_dropped) = (0, 0);
    for i in 0..24 {
        let row = trained.get(i);
        if row.allclose(&no_video.get(i), 1e-6, 1e-6, false) {
            videos_dropped += 1;
        } else {
            assert!(row.allclose(&no_audio.get(i), 1e-6, 1e-6, false), "clip {i} kept both modalities");
            audios_dropped += 1;
        }
    }
    assert!(videos_dropped > 0 && audios_dropped > 0, "{videos_dropped} video / {audios_dropped} audio drops");
    // In evaluation nothing is dropped (each clip differs from both; how much depends on the random head, drawn
    // from torch's generator that the file's parallel tests share, so the bound is the dropping test's own).
    let evaluated = tch::no_grad(|| model.forward_t(&feats, false).logits);
    for i in 0..24 {
        let row = evaluated.get(i);
        for (what, other) in [("video", &no_video), ("audio", &no_audio)] {
            let diff = max_abs_diff(&row, &other.get(i));
            assert!(diff > 1e-5, "clip {i} in evaluation equals the clip without its {what} ({diff:e})");
        }
    }
    // A clip can never lose both: the probabilities must sum to at most 1, the error names the field.
    cfg.modality_dropout = ModalityDropout { video: 0.6, audio: 0.5 };
    let err = cfg.validate().unwrap_err().to_string();
    assert!(err.contains("model.modality_dropout"), "{err}");
}

#[test]
fn logit_adjustment_shifts_the_loss_or_the_predictions_by_tau_log_prior() {
    let counts = [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 0.0];
    let total: f64 = counts.iter().map(|&n: &f64| n.max(1.0)).sum();
    let want: Vec<f64> = counts.iter().map(|&n: &f64| 0.7 * (n.max(1.0) / total).ln()).collect();
    let adjustment = avexpr_model::loss::logit_adjustment(0.7, &counts);
    assert!(adjustment.iter().zip(&want).all(|(a, b)| (a - b).abs() < 1e-12), "{adjustment:?}");
    let shift = Tensor::from_slice(&want).to_kind(Kind::Float);
    tch::manual_seed(3);
    let logits = Tensor::randn([6, 8], (Kind::Float, Device::Cpu));
    let targets = Tensor::from_slice(&[0i64, 1, 2, 3, 7, -1]);
    let ce = |l: &Tensor| l.cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Mean, -1, 0.0);
    let cfg = |tau: f64, mode: LogitAdjustmentMode| LossConfig {
        logit_adjustment: LogitAdjustment { tau, mode },
        ..LossConfig::default()
    };
    // `loss`: trained on logits + tau log pi, predictions untouched.
    let loss = ExprLoss::new(&cfg(0.7, LogitAdjustmentMode::Loss), &counts, Device::Cpu);
    assert_close("loss mode", &loss.classification(&logits, &targets), &ce(&(&logits + &shift)), 1e-6);
    assert!(loss.inference_adjustment().is_none());
    // `post_hoc`: trained as usual, predictions take logits - tau log pi.
    let post = ExprLoss::new(&cfg(0.7, LogitAdjustmentMode::PostHoc), &counts, Device::Cpu);
    assert_close("post-hoc loss", &post.classification(&logits, &targets), &ce(&logits), 1e-6);
    assert_close("post-hoc shift", post.inference_adjustment().unwrap(), &shift, 1e-6);
    // Off by default.
    let off = ExprLoss::new(&LossConfig::default(), &counts, Device::Cpu);
    assert_close("off", &off.classification(&logits, &targets), &ce(&logits), 1e-6);

    // The model applies the post-hoc shift at evaluation only (same variables, copied).
    let mut with = tiny_config();
    with.loss.logit_adjustment = LogitAdjustment { tau: 1.0, mode: LogitAdjustmentMode::PostHoc };
    let (plain, mut adjusted) = (tiny_model(&tiny_config()), tiny_model(&with));
    adjusted.var_store_mut().copy(plain.var_store()).unwrap();
    let feats = plain.encode(&raw_batch(3, 5)).unwrap();
    let diff = tch::no_grad(|| plain.forward_t(&feats, false).logits - adjusted.forward_t(&feats, false).logits);
    let prior = avexpr_model::loss::logit_adjustment(1.0, &avexpr_data::affwild2::PAPER_TRAIN_RATIOS);
    let prior = Tensor::from_slice(&prior).to_kind(Kind::Float);
    for i in 0..3 {
        assert_close("evaluation shift", &diff.get(i), &prior, 1e-5);
    }
    let diff = tch::no_grad(|| plain.forward_t(&feats, true).logits - adjusted.forward_t(&feats, true).logits);
    assert!(diff.abs().max().double_value(&[]) < 1e-6, "training logits are not shifted");
}

#[test]
fn test_time_views_average_the_embeddings_of_the_crop_and_its_views() {
    use avexpr_model::expr::ImageView;
    let model = tiny_model(&tiny_config());
    let frames = raw_batch(1, 3).frames.view([3, 3, 40, 48]);
    let plain = model.encode_images(&frames);
    assert!(model.encode_image_views(&frames, &[]).allclose(&plain, 1e-6, 1e-6, false));
    let flipped = model.encode_images(&frames.flip([3]));
    let both = model.encode_image_views(&frames, &[ImageView::Flip]);
    assert!(both.allclose(&((&plain + &flipped) / 2.0), 1e-5, 1e-5, false));
    assert!(!both.allclose(&plain, 1e-3, 1e-3, false), "a flipped random crop embeds differently");
    // Zoom: the centre 90% scaled back up; a uniform crop stays the same crop.
    let grey = Tensor::full([1, 3, 40, 48], 77, (Kind::Uint8, Device::Cpu));
    let zoomed = ImageView::Zoom.apply(&grey);
    assert_eq!(zoomed.size(), [1, 3, 40, 48]);
    assert!(zoomed.allclose(&grey.to_kind(Kind::Float), 1e-4, 1e-4, false));
    assert!("zoom".parse::<ImageView>().is_ok() && "crop".parse::<ImageView>().unwrap_err().contains("flip and zoom"));
}

/// Runs `adapt_reference.py` (transformers, + peft for LoRA, with the project venv's Python) and returns its
/// tensors by name.
fn adapt_reference(tower: &str, mode: &str, checkpoint: &Path) -> std::collections::HashMap<String, Tensor> {
    let tmp = tempfile::tempdir().unwrap();
    let reference = tmp.path().join("reference.safetensors");
    let python = std::env::var("AVEXPR_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("adapt_reference.py"))
        .args([tower, mode])
        .arg(checkpoint)
        .arg(&reference)
        .env("TRANSFORMERS_VERBOSITY", "error")
        .output()
        .unwrap();
    assert!(out.status.success(), "the {tower} {mode} reference failed: {}", String::from_utf8_lossy(&out.stderr));
    Tensor::read_safetensors(&reference).unwrap().into_iter().collect()
}

/// Gives every adapted variable (`backbone.<tower>.<checkpoint key>`) the reference's value, then checks, after
/// `backward` was run on the same loss, that each gradient equals the reference's, and that there are as many
/// as the reference trained.
fn adapted_variables_match(vs: &nn::VarStore, r: &std::collections::HashMap<String, Tensor>, tower: &str) -> usize {
    let theirs = |name: &str| name.strip_prefix(&format!("backbone.{tower}.")).unwrap().to_string();
    let variables = vs.variables();
    assert_eq!(variables.len(), r.keys().filter(|k| k.starts_with("grad.")).count(), "the trained variables");
    for (name, var) in &variables {
        let grad = r.get(&format!("grad.{}", theirs(name))).unwrap_or_else(|| panic!("no reference for {name}"));
        assert_close(&format!("gradient of {name}"), &var.grad(), grad, 1e-4);
    }
    variables.len()
}

fn set_reference_values(vs: &nn::VarStore, r: &std::collections::HashMap<String, Tensor>, tower: &str) {
    tch::no_grad(|| {
        for (name, var) in vs.variables() {
            let theirs = name.strip_prefix(&format!("backbone.{tower}.")).unwrap();
            let value = r.get(&format!("value.{theirs}")).unwrap_or_else(|| panic!("no reference for {name}"));
            var.shallow_clone().copy_(value);
        }
    });
}

/// Adapting the CLIP vision tower against transformers (+ peft): LoRA (r 4, alpha 8 on q/v, and with `mlp` on
/// fc1/fc2 too; seeded nonzero A and B) and the last block unfrozen (with the post-layernorm and the projection, from the checkpoint's
/// values): the same embeddings and the same gradient of every adapted variable.
#[test]
fn clip_adaptation_gradients_equal_transformers() {
    for name in ["lora", "lora_mlp", "last_blocks"] {
        let r = adapt_reference("clip", name, &fixture("clip-tiny"));
        let mut encoder =
            avexpr_model::clip::ClipVisionEncoder::load(&fixture("clip-tiny"), EncoderOptions::default()).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root() / "backbone" / "clip";
        if name != "last_blocks" {
            encoder.attach_lora(&root, LoraSpec { rank: 4, alpha: 8.0, mlp: name == "lora_mlp" });
            set_reference_values(&vs, &r, "clip");
        } else {
            // From the checkpoint's values, which the reference trains from too.
            assert_eq!(encoder.adapt_last_blocks(&root, 1), vs.variables().len());
        }
        let embeds = encoder.encode_pixels(&r["pixels"]);
        assert_close(&format!("image_embeds ({name})"), &embeds, &r["output"], 1e-5);
        (embeds * &r["w"]).sum(Kind::Float).backward();
        let n = adapted_variables_match(&vs, &r, "clip");
        // LoRA: A and B of q and v in 2 layers; last block: 16 variables of a layer + 2 + 1.
        assert_eq!(
            n,
            [8, 16, 19][["lora", "lora_mlp", "last_blocks"].iter().position(|m| *m == name).unwrap()],
            "{name}"
        );
    }
}

/// The same for DINOv2 (the pooled output in the loss; the last block with the final layernorm).
#[test]
fn dinov2_adaptation_gradients_equal_transformers() {
    for name in ["lora", "lora_mlp", "last_blocks"] {
        let r = adapt_reference("dinov2", name, &fixture("dinov2-tiny"));
        let mut encoder =
            avexpr_model::dinov2::Dinov2Encoder::load(&fixture("dinov2-tiny"), EncoderOptions::default()).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root() / "backbone" / "dinov2";
        if name != "last_blocks" {
            encoder.attach_lora(&root, LoraSpec { rank: 4, alpha: 8.0, mlp: name == "lora_mlp" });
            set_reference_values(&vs, &r, "dinov2");
        } else {
            assert_eq!(encoder.adapt_last_blocks(&root, 1), vs.variables().len());
        }
        let pooled = encoder.encode_pixels(&r["pixels"]);
        assert_close(&format!("pooled output ({name})"), &pooled, &r["output"], 1e-5);
        (pooled * &r["w"]).sum(Kind::Float).backward();
        let n = adapted_variables_match(&vs, &r, "dinov2");
        // Last block: attention 8, norms 4, layer scales 2, MLP 4, + the final layernorm 2.
        assert_eq!(
            n,
            [8, 16, 18 + 2][["lora", "lora_mlp", "last_blocks"].iter().position(|m| *m == name).unwrap()],
            "{name}"
        );
    }
}

/// The same for Wav2Vec 2.0 (every hidden state in the loss, as the weighted-sum adapter takes them, and the last
/// hidden state): LoRA on the group-norm fixture, the last block on the stable-layer-norm one (its final layer
/// norm trains too).
#[test]
fn wav2vec2_adaptation_gradients_equal_transformers() {
    let cases =
        [("lora", "wav2vec2-tiny-group"), ("lora_mlp", "wav2vec2-tiny-group"), ("last_blocks", "wav2vec2-tiny-stable")];
    for (name, checkpoint) in cases {
        let r = adapt_reference("wav2vec2", name, &fixture(checkpoint));
        let mut encoder =
            avexpr_model::wav2vec2::Wav2Vec2Encoder::load(&fixture(checkpoint), EncoderOptions::default()).unwrap();
        let vs = nn::VarStore::new(Device::Cpu);
        let root = vs.root() / "backbone" / "wav2vec2";
        if name != "last_blocks" {
            encoder.attach_lora(&root, LoraSpec { rank: 4, alpha: 8.0, mlp: name == "lora_mlp" });
            set_reference_values(&vs, &r, "wav2vec2");
        } else {
            assert_eq!(encoder.adapt_last_blocks(&root, 1), vs.variables().len());
        }
        let out = encoder.encode(&r["values"], None);
        let mut states = out.hidden_states;
        states.push(out.last_hidden_state);
        let states = Tensor::stack(&states, 0);
        assert_close(&format!("hidden states ({name}, {checkpoint})"), &states, &r["output"], 1e-5);
        (states * &r["w"]).sum(Kind::Float).backward();
        let n = adapted_variables_match(&vs, &r, "wav2vec2");
        // Last block: attention 8, two layer norms 4, feed-forward 4, + the encoder's final layer norm 2.
        assert_eq!(
            n,
            [8, 16, 16 + 2][["lora", "lora_mlp", "last_blocks"].iter().position(|m| *m == name).unwrap()],
            "{name}"
        );
    }
}

/// Adaptation starts where the frozen model is: LoRA with B at zero, unfrozen blocks from the checkpoint's
/// values, so the same head gives the frozen model's outputs. (The tests of this file share torch's global
/// generator across threads, so the head's values are copied rather than drawn twice from one seed.)
#[test]
fn an_adapted_model_starts_as_the_frozen_one() {
    let frozen = tiny_model(&tiny_config());
    let raw = raw_batch(2, 5);
    let expected = tch::no_grad(|| frozen.forward_raw_t(&raw, false).unwrap()).logits;
    let heads = frozen.var_store().variables();
    for mode in [AdaptMode::Lora, AdaptMode::LastBlocks] {
        for tower in ["clip", "wav2vec2"] {
            let mut cfg = tiny_config();
            let adapt = Adapt { mode, rank: 2, alpha: 4.0, mlp: true, blocks: 2, lr_scale: 1.0 };
            if tower == "clip" {
                cfg.clip.adapt = adapt
            } else {
                cfg.wav2vec2.adapt = adapt
            }
            let adapted = tiny_model(&cfg);
            tch::no_grad(|| {
                for (name, var) in adapted.var_store().variables() {
                    match heads.get(&name) {
                        Some(value) => var.shallow_clone().copy_(value),
                        None => assert!(name.starts_with(&format!("backbone.{tower}.")), "{name}"),
                    }
                }
            });
            let logits = tch::no_grad(|| adapted.forward_raw_t(&raw, false).unwrap()).logits;
            assert!(logits.allclose(&expected, 1e-6, 1e-6, false), "{mode:?} {tower}: {logits:?} vs {expected:?}");
        }
    }
}

/// Adapted layers are f32 behind a bf16 frozen prefix (the encoders run in bf16 on CUDA; CPU bf16 takes the same
/// path): training steps run, the loss is finite, and every adapted variable, f32, gets a finite gradient.
#[test]
fn adapted_layers_train_in_f32_behind_bf16_encoders() {
    let adapt = |mode| Adapt { mode, rank: 2, alpha: 4.0, mlp: true, blocks: 1, lr_scale: 1.0 };
    for (image, wav2vec2) in [(AdaptMode::LastBlocks, AdaptMode::Lora), (AdaptMode::Lora, AdaptMode::LastBlocks)] {
        let mut cfg = tiny_config();
        (cfg.clip.adapt, cfg.wav2vec2.adapt) = (adapt(image), adapt(wav2vec2));
        let options = EncoderOptions { device: Device::Cpu, precision: avexpr_model::Precision::Bf16 };
        let model = ExprModel::new(&cfg, Encoders::load(&cfg, options).unwrap(), None, Device::Cpu).unwrap();
        let out = model.forward_raw_t(&raw_batch(2, 6), true).unwrap();
        let labels = Tensor::from_slice(&[1i64, 2, 3, 4, 5, 6, 0, 1, 2, 3, 4, 7]).view([2, 6]);
        let loss = model.loss(&out, &labels).total;
        assert!(loss.double_value(&[]).is_finite(), "{image:?} / {wav2vec2:?}");
        loss.backward();
        let groups = model.trainable_groups();
        for (name, var) in &groups["backbone"] {
            let grad = var.grad();
            assert_eq!((var.kind(), grad.kind()), (Kind::Float, Kind::Float), "{name}");
            assert!(grad.isfinite().all().int64_value(&[]) == 1, "{name}: gradient not finite");
        }
        let norm = |tower: &str| -> f64 {
            groups["backbone"]
                .iter()
                .filter(|(n, _)| n.contains(tower))
                .map(|(_, v)| v.grad().norm().double_value(&[]))
                .sum()
        };
        assert!(norm(".clip.") > 0.0 && norm(".wav2vec2.") > 0.0, "{image:?} / {wav2vec2:?}");
    }
}
