//! `ExprModel`: the paper's model. Frozen encoders (CLIP vision per frame, Wav2Vec 2.0, CLIP text for the
//! prompts) and the trainable parts in exactly four groups, which are what data-parallel ranks all-reduce:
//! `tcn` (temporal model over CLIP frame embeddings), `adapter` (audio adapter and alignment), `fusion`
//! (bi-directional cross-attention, pooling, classifier) and `prompt` (projection, logit scale, CoOp context).
//!
//! It runs from raw inputs (face frames + audio) or from precomputed encoder outputs (a feature cache):
//! [`ExprModel::forward_raw_t`] is [`ExprModel::encode`] followed by [`ExprModel::forward_t`]. The trainable
//! part alone, with its loss, is [`ExprHead`].

use std::collections::BTreeMap;
use std::rc::Rc;

use avexpr_data::NUM_CLASSES;
use avexpr_data::affwild2::PAPER_TRAIN_RATIOS;
use serde::{Deserialize, Serialize};
use tch::{Device, Kind, Tensor, nn};

use crate::EncoderOptions;
use crate::adapter::{AudioAdapter, AudioTiming};
use crate::clip::{ClipTextConfig, ClipTextEncoder, ClipVisionConfig};
use crate::config::{AdaptMode, AudioLayers, Modalities, ModelConfig, Target};
use crate::error::{ModelError, Result};
use crate::fusion::BiCrossAttention;
use crate::head::Head;
use crate::locate::locate_encoders;
use crate::loss::{ExprLoss, LossTerms};
use crate::prompt::{ClassPrompts, PromptHead};
use crate::tcn::Tcn;
use crate::vision::VisionEncoder;
use crate::wav2vec2::{Wav2Vec2Config, Wav2Vec2Encoder};

/// The trainable groups, in a fixed order (the order buckets are all-reduced in); `backbone` (an adapted
/// encoder's variables) exists only when some `model.<encoder>.adapt` is not `frozen`.
pub const GROUPS: [&str; 5] = ["tcn", "adapter", "fusion", "prompt", "backbone"];

/// The frozen encoders.
#[derive(Debug)]
pub struct Encoders {
    /// The face-frame encoder (`model.image_encoder`).
    pub vision: VisionEncoder,
    pub text: Rc<ClipTextEncoder>,
    pub audio: Wav2Vec2Encoder,
}

impl Encoders {
    pub fn load(cfg: &ModelConfig, options: EncoderOptions) -> Result<Self> {
        let (clip, wav2vec2) = locate_encoders(cfg)?;
        let image = crate::locate::locate_image_encoder(cfg)?;
        Ok(Self {
            vision: VisionEncoder::load(cfg.image_encoder, &image, options)?,
            text: Rc::new(ClipTextEncoder::load(&clip, options)?),
            audio: Wav2Vec2Encoder::load(&wav2vec2, options)?,
        })
    }

    pub fn dims(&self) -> EncoderDims {
        EncoderDims::new(
            self.vision.image_dim(),
            &self.text.config,
            &self.audio.config,
            self.audio.feature_extractor.sampling_rate,
        )
    }
}

/// The widths of the frozen encoders' outputs: all the trainable parts need to know about them.
#[derive(Debug, Clone, PartialEq)]
pub struct EncoderDims {
    pub image_dim: i64,
    pub text_dim: i64,
    pub text_hidden: i64,
    pub audio_hidden: i64,
    pub audio_layers: i64,
    pub audio_timing: AudioTiming,
}

impl EncoderDims {
    /// `image_dim`: the image encoder's embedding width (CLIP's projection, DINOv2's hidden size).
    pub fn new(image_dim: i64, text: &ClipTextConfig, audio: &Wav2Vec2Config, sample_rate: u32) -> Self {
        Self {
            image_dim,
            text_dim: text.projection_dim,
            text_hidden: text.hidden_size,
            audio_hidden: audio.hidden_size,
            audio_layers: audio.num_hidden_layers,
            audio_timing: AudioTiming::from_conv(&audio.conv_kernel, &audio.conv_stride, sample_rate as f64),
        }
    }

    /// The paper's encoders: CLIP ViT-B/32 and wav2vec2-base.
    pub fn paper() -> Self {
        let image_dim = ClipVisionConfig::vit_b32().projection_dim;
        Self::new(image_dim, &ClipTextConfig::vit_b32(), &Wav2Vec2Config::base(), 16_000)
    }
}

/// A test-time view of a face crop (averaged with the crop itself by [`ExprModel::encode_image_views`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ImageView {
    /// Mirrored left to right.
    Flip,
    /// The centre 90% of the crop, scaled back up to the crop's size (bilinear).
    Zoom,
}

impl std::str::FromStr for ImageView {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flip" => Ok(ImageView::Flip),
            "zoom" => Ok(ImageView::Zoom),
            other => Err(format!("`{other}`: the views are flip and zoom")),
        }
    }
}

impl ImageView {
    /// The view of `frames` `[n, 3, H, W]` (any dtype; 0..255 values), as f32.
    pub fn apply(self, frames: &Tensor) -> Tensor {
        let frames = frames.to_kind(Kind::Float);
        match self {
            ImageView::Flip => frames.flip([3]),
            ImageView::Zoom => {
                let size = frames.size();
                let (h, w) = (size[2], size[3]);
                let (mh, mw) = ((h as f64 * 0.05).round() as i64, (w as f64 * 0.05).round() as i64);
                frames.narrow(2, mh, h - 2 * mh).narrow(3, mw, w - 2 * mw).upsample_bilinear2d(
                    [h, w],
                    false,
                    None,
                    None,
                )
            }
        }
    }
}

/// The trainable part of the model in the four groups under a VarStore path, with its loss: everything but
/// the frozen encoders. [`ExprModel`] wraps it with the encoders; a trainer working from cached features (or a
/// benchmark) can use it alone.
#[derive(Debug)]
pub struct ExprHead {
    cfg: ModelConfig,
    tcn: Tcn,
    adapter: AudioAdapter,
    fusion: BiCrossAttention,
    head: Head,
    prompt: PromptHead,
    loss: ExprLoss,
}

impl ExprHead {
    /// `class_counts` (training frames per class) set the class weights; `None` uses the paper's ratios.
    pub fn new(
        root: &nn::Path,
        cfg: &ModelConfig,
        dims: &EncoderDims,
        classes: ClassPrompts,
        class_counts: Option<[f64; NUM_CLASSES]>,
    ) -> Result<Self> {
        cfg.validate()?;
        let states = match cfg.adapter.layers {
            AudioLayers::Last => 1,
            AudioLayers::WeightedSum => dims.audio_layers + 1,
        };
        let video_dim = *cfg.tcn.channels.last().expect("validated: at least one level");
        let fusion_vs = root / "fusion";
        let adapter_vs = root / "adapter";
        let pooled_dim = 2 * cfg.fusion.dim;
        Ok(Self {
            cfg: cfg.clone(),
            tcn: Tcn::new(&(root / "tcn"), dims.image_dim, &cfg.tcn),
            adapter: AudioAdapter::new(
                &adapter_vs,
                dims.audio_hidden,
                states,
                cfg.fusion.dim,
                &cfg.adapter,
                dims.audio_timing,
            ),
            fusion: BiCrossAttention::new(&fusion_vs, video_dim, &cfg.fusion),
            head: Head::new(&(&fusion_vs / "head"), cfg.fusion.dim, &cfg.head),
            prompt: PromptHead::new(
                &(root / "prompt"),
                pooled_dim,
                (dims.text_dim, dims.text_hidden),
                &cfg.prompt,
                classes,
            )?,
            loss: ExprLoss::new(&cfg.loss, &class_counts.unwrap_or(PAPER_TRAIN_RATIOS), root.device()),
        })
    }

    pub fn receptive_field(&self) -> i64 {
        self.tcn.receptive_field()
    }

    /// The trainable part on encoder outputs.
    pub fn forward_t(&self, feats: &FeatureBatch, train: bool) -> ExprOutput {
        let frames = feats.image_embeds.size()[1];
        // Masked frames (no face, or padding before the video starts) enter the causal TCN as zeros, as its own
        // left padding does, so whatever values they hold cannot leak into later frames.
        let image_embeds = &feats.image_embeds * feats.face_mask.to_kind(feats.image_embeds.kind()).unsqueeze(-1);
        // Ablations: a modality left out reaches the head as zeros (its masks unchanged, so no attention row is
        // empty).
        let image_embeds =
            if self.cfg.modalities == Modalities::Audio { image_embeds.zeros_like() } else { image_embeds };
        let audio_states = if self.cfg.modalities == Modalities::Video {
            feats.audio_states.zeros_like()
        } else {
            feats.audio_states.shallow_clone()
        };
        // Modality dropout (training only): one uniform draw per clip, below `video` drops its video, in
        // [video, video + audio) its audio.
        let drop = self.cfg.modality_dropout;
        let (image_embeds, audio_states) = if train && drop.video + drop.audio > 0.0 {
            let batch = image_embeds.size()[0];
            let u = Tensor::rand([batch], (Kind::Float, image_embeds.device()));
            let keep_video = u.ge(drop.video).to_kind(image_embeds.kind()).view([batch, 1, 1]);
            let keep_audio = u.lt(drop.video).logical_or(&u.ge(drop.video + drop.audio));
            let keep_audio = keep_audio.to_kind(audio_states.kind()).view([batch, 1, 1, 1]);
            (image_embeds * keep_video, audio_states * keep_audio)
        } else {
            (image_embeds, audio_states)
        };
        let video = self.tcn.forward_t(&image_embeds, train);
        let (audio, audio_mask) = self.adapter.forward_t(&audio_states, &feats.audio_mask, &feats.fps, frames, train);
        let (video, audio) = self.fusion.forward_t(&video, &audio, &feats.face_mask, &audio_mask, train);
        let (logits, pooled) = self.head.forward_t(&video, &audio, &feats.face_mask, &audio_mask, train);
        let prompt_logits = self.prompt.logits(&pooled);
        // Post-hoc logit adjustment: predictions (not the training loss) take `logits - tau * log pi`.
        let logits = match self.loss.inference_adjustment() {
            Some(adjustment) if !train => {
                let kind = logits.kind();
                logits - adjustment.to_kind(kind)
            }
            _ => logits,
        };
        ExprOutput { logits, prompt_logits, pooled }
    }

    /// The clip targets from per-frame labels `[batch, frames]` (-1 = ignore): the last or centre frame.
    pub fn clip_targets(&self, frame_labels: &Tensor) -> Tensor {
        let frames = frame_labels.size()[1];
        let index = match self.cfg.head.target {
            Target::Last => frames - 1,
            Target::Center => frames / 2,
        };
        frame_labels.select(1, index)
    }

    /// Loss terms from per-frame labels `[batch, frames]`: the pooled head learns the clip target, the
    /// per-frame head every labelled frame; the prompt term always uses the clip target. Logits are taken in
    /// f32 (under bf16 autocast they arrive in bf16; CPU autocast would keep log-softmax in bf16).
    pub fn loss(&self, out: &ExprOutput, frame_labels: &Tensor) -> LossTerms {
        let frame_labels = frame_labels.to_device(out.logits.device()).to_kind(Kind::Int64);
        let clip_targets = self.clip_targets(&frame_labels);
        let (logits, prompt_logits) = (out.logits.to_kind(Kind::Float), out.prompt_logits.to_kind(Kind::Float));
        if self.cfg.head.per_frame {
            let logits = logits.reshape([-1, NUM_CLASSES as i64]);
            self.loss.terms(&logits, &prompt_logits, &frame_labels.reshape([-1]), &clip_targets)
        } else {
            self.loss.terms(&logits, &prompt_logits, &clip_targets, &clip_targets)
        }
    }

    pub fn class_weights(&self) -> Option<&Tensor> {
        self.loss.class_weights()
    }
}

/// Trainable parameters per group of a configuration, without loading any checkpoint.
pub fn parameter_counts(cfg: &ModelConfig, dims: &EncoderDims) -> Result<Vec<(&'static str, i64)>> {
    cfg.validate()?;
    let vs = nn::VarStore::new(Device::Cpu);
    let _head = ExprHead::new(&vs.root(), cfg, dims, ClassPrompts::VariablesOnly, None)?;
    Ok(count_by_group(&vs))
}

fn count_by_group(vs: &nn::VarStore) -> Vec<(&'static str, i64)> {
    let variables = vs.variables();
    GROUPS
        .iter()
        .map(|g| {
            let count =
                variables.iter().filter(|(name, _)| group_of(name) == Some(*g)).map(|(_, t)| t.numel() as i64).sum();
            (*g, count)
        })
        .filter(|(g, count)| *count > 0 || *g != "backbone")
        .collect()
}

fn group_of(name: &str) -> Option<&'static str> {
    let first = name.split('.').next()?;
    GROUPS.iter().copied().find(|g| *g == first)
}

/// Adapts the encoders as `model.<encoder>.adapt` asks, their trainable variables under `backbone/<encoder>`
/// of `vs` (`clip` or `dinov2`, and `wav2vec2`).
fn adapt_encoders(vs: &nn::VarStore, cfg: &ModelConfig, encoders: &mut Encoders) -> Result<()> {
    let copied = |name: &str| vs.variables().keys().filter(|k| k.starts_with(name)).count();
    let (tower, image) = cfg.image_tower();
    let path = vs.root() / "backbone" / tower;
    let a = image.adapt;
    match a.mode {
        AdaptMode::Frozen => {}
        AdaptMode::Lora => encoders.vision.attach_lora(&path, a.lora()),
        AdaptMode::LastBlocks => {
            let field = format!("model.{tower}.adapt");
            let first = a.first_trainable_layer(&field, encoders.vision.num_layers())?;
            let n = encoders.vision.adapt_last_blocks(&path, first);
            assert_eq!(n, copied(&format!("backbone.{tower}.")), "every unfrozen {tower} variable has its value");
        }
    }
    let wav2vec2 = vs.root() / "backbone" / "wav2vec2";
    let a = cfg.wav2vec2.adapt;
    match a.mode {
        AdaptMode::Frozen => {}
        AdaptMode::Lora => encoders.audio.attach_lora(&wav2vec2, a.lora()),
        AdaptMode::LastBlocks => {
            let first = a.first_trainable_layer("model.wav2vec2.adapt", encoders.audio.model().num_layers())?;
            let n = encoders.audio.adapt_last_blocks(&wav2vec2, first);
            assert_eq!(n, copied("backbone.wav2vec2."), "every unfrozen Wav2Vec 2.0 variable has its value");
        }
    }
    Ok(())
}

/// Raw clips: what the streaming loader delivers.
#[derive(Debug)]
pub struct RawBatch {
    /// `[batch, frames, 3, H, W]` uint8 face crops.
    pub frames: Tensor,
    /// `[batch, frames]` bool, false where the frame had no face crop.
    pub face_mask: Tensor,
    /// `[batch, samples]` f32, 16 kHz mono, the audio of the clip's frames.
    pub audio: Tensor,
    /// `[batch, samples]` bool, false on padding.
    pub audio_mask: Tensor,
    /// Each clip's video frame rate.
    pub fps: Vec<f64>,
}

/// Frozen-encoder outputs of a batch: what a feature cache stores.
#[derive(Debug)]
pub struct FeatureBatch {
    /// `[batch, frames, image_dim]` CLIP image embeddings.
    pub image_embeds: Tensor,
    pub face_mask: Tensor,
    /// `[batch, S, audio_frames, hidden]`: S = 1 (last hidden state) or layers + 1 (all hidden states), as
    /// `model.adapter.layers` asks.
    pub audio_states: Tensor,
    /// `[batch, audio_frames]` bool.
    pub audio_mask: Tensor,
    pub fps: Vec<f64>,
}

#[derive(Debug)]
pub struct ExprOutput {
    /// `[batch, 8]`, or `[batch, frames, 8]` with the per-frame head.
    pub logits: Tensor,
    /// `[batch, 8]` scaled cosine similarities to the class prompts.
    pub prompt_logits: Tensor,
    /// `[batch, 2 * fusion.dim]`.
    pub pooled: Tensor,
}

#[derive(Debug)]
pub struct ExprModel {
    vs: nn::VarStore,
    cfg: ModelConfig,
    encoders: Encoders,
    head: ExprHead,
}

impl ExprModel {
    /// Builds the trainable parts on `device` around loaded encoders. `class_counts` (training-set frames per
    /// class) set the class weights; `None` uses the paper's reported ratios.
    pub fn new(
        cfg: &ModelConfig,
        mut encoders: Encoders,
        class_counts: Option<[f64; NUM_CLASSES]>,
        device: Device,
    ) -> Result<Self> {
        let vs = nn::VarStore::new(device);
        let classes = ClassPrompts::Encoder(encoders.text.clone());
        let head = ExprHead::new(&vs.root(), cfg, &encoders.dims(), classes, class_counts)?;
        // After the head, so that the head starts from the same draws as with a frozen encoder (and with
        // LoRA's B at zero, the whole model starts where the frozen one does).
        adapt_encoders(&vs, cfg, &mut encoders)?;
        let model = Self { vs, cfg: cfg.clone(), encoders, head };
        for (group, count) in model.parameter_counts() {
            tracing::info!(group, parameters = count, "trainable group");
        }
        Ok(model)
    }

    pub fn config(&self) -> &ModelConfig {
        &self.cfg
    }

    pub fn encoders(&self) -> &Encoders {
        &self.encoders
    }

    /// The trainable VarStore: every variable's path starts with one of [`GROUPS`].
    pub fn var_store(&self) -> &nn::VarStore {
        &self.vs
    }

    pub fn var_store_mut(&mut self) -> &mut nn::VarStore {
        &mut self.vs
    }

    pub fn receptive_field(&self) -> i64 {
        self.head.receptive_field()
    }

    pub fn head(&self) -> &ExprHead {
        &self.head
    }

    /// Trainable variables by group, each sorted by name (a deterministic order for all-reduce buckets).
    pub fn trainable_groups(&self) -> BTreeMap<&'static str, Vec<(String, Tensor)>> {
        let mut groups: BTreeMap<&'static str, Vec<(String, Tensor)>> =
            GROUPS.iter().map(|g| (*g, Vec::new())).collect();
        for (name, var) in self.vs.variables() {
            let group = group_of(&name).expect("every trainable variable lives in one of the groups");
            groups.get_mut(group).expect("group").push((name, var));
        }
        groups.values_mut().for_each(|vars| vars.sort_by(|a, b| a.0.cmp(&b.0)));
        // `backbone` only when an encoder adapts.
        groups.retain(|g, vars| !vars.is_empty() || *g != "backbone");
        groups
    }

    /// Every trainable variable, group by group. Frozen encoder variables are never among them.
    pub fn trainable_variables(&self) -> Vec<Tensor> {
        self.trainable_groups().into_values().flatten().map(|(_, t)| t).collect()
    }

    pub fn parameter_counts(&self) -> Vec<(&'static str, i64)> {
        count_by_group(&self.vs)
    }

    /// Runs the frozen encoders (under no_grad) on raw clips.
    pub fn encode(&self, raw: &RawBatch) -> Result<FeatureBatch> {
        let size = raw.frames.size();
        let [batch, frames, channels, height, width] = size[..] else {
            return Err(ModelError::InvalidInput(format!("frames must be [batch, frames, 3, H, W], got {size:?}")));
        };
        if channels != 3 || raw.fps.len() as i64 != batch || raw.audio.size()[0] != batch {
            return Err(ModelError::InvalidInput(format!(
                "batch of {batch} clips with {channels} channels, {} fps values and {} audio rows",
                raw.fps.len(),
                raw.audio.size()[0]
            )));
        }
        let device = self.vs.device();
        let image_embeds =
            self.encode_images(&raw.frames.view([batch * frames, channels, height, width])).view([batch, frames, -1]);
        let (audio_states, audio_mask) = self.encode_audio(&raw.audio, &raw.audio_mask)?;
        Ok(FeatureBatch {
            image_embeds,
            face_mask: raw.face_mask.to_device(device).to_kind(Kind::Bool),
            audio_states,
            audio_mask,
            fps: raw.fps.clone(),
        })
    }

    /// CLIP image embeddings `[n, image_dim]` (f32) of `n` face crops `[n, 3, H, W]` as stored: each frame is
    /// encoded alone, so a frame's embedding does not depend on the clip it is in.
    pub fn encode_images(&self, frames: &Tensor) -> Tensor {
        let pixels = self.encoders.vision.processor().preprocess_tensor(&frames.to_device(self.vs.device()));
        // The trainable part runs in f32 whatever precision the frozen encoders run in (bf16 on CUDA).
        self.encoders.vision.encode_pixels(&pixels).to_kind(Kind::Float)
    }

    /// Test-time augmentation: the mean of the image embeddings of `frames` (`[n, 3, H, W]`, as stored) and of
    /// each of `views` of them; `[n, image_dim]` f32. No views: [`ExprModel::encode_images`].
    pub fn encode_image_views(&self, frames: &Tensor, views: &[ImageView]) -> Tensor {
        let frames = frames.to_device(self.vs.device());
        let mut sum = self.encode_images(&frames);
        for view in views {
            sum += self.encode_images(&view.apply(&frames));
        }
        sum / (1 + views.len()) as f64
    }

    /// Wav2Vec 2.0 states `[batch, S, audio_frames, hidden]` and their mask. Each clip is encoded at its own
    /// length (its span up to the last real sample; clips of equal length share a call), never padded to its
    /// batch mates': padding would change a clip's features through the feature encoder's group norm and the
    /// normalisation, making them depend on the batch (and a feature cache inexact).
    pub fn encode_audio(&self, audio: &Tensor, audio_mask: &Tensor) -> Result<(Tensor, Tensor)> {
        let device = self.vs.device();
        let enc = &self.encoders.audio;
        let batch = audio.size()[0];
        let mask_cpu = audio_mask.to_device(Device::Cpu).to_kind(Kind::Uint8).contiguous();
        let rows: Vec<Vec<u8>> = (0..batch).map(|b| Vec::<u8>::try_from(mask_cpu.get(b))).collect::<Result<_, _>>()?;
        let span = |m: &[u8]| m.iter().rposition(|&v| v != 0).map_or(0, |i| i as i64 + 1);
        let valid_samples = |m: &[u8]| m.iter().filter(|&&v| v != 0).count() as i64;
        let mut groups: BTreeMap<i64, Vec<i64>> = BTreeMap::new();
        for (b, m) in rows.iter().enumerate() {
            groups.entry(span(m)).or_default().push(b as i64);
        }
        let longest = groups.keys().copied().max().unwrap_or(0);
        let audio_frames = enc.config.output_frames(longest).max(1);
        let states_n = match self.cfg.adapter.layers {
            AudioLayers::Last => 1,
            AudioLayers::WeightedSum => enc.config.num_hidden_layers + 1,
        };
        let hidden = enc.config.hidden_size;
        let states = Tensor::zeros([batch, states_n, audio_frames, hidden], (Kind::Float, device));
        let (audio, audio_mask) = (audio.to_device(device), audio_mask.to_device(device));
        for (&len, members) in &groups {
            if enc.config.output_frames(len) == 0 {
                continue; // no audio (or too little for one frame): zeros under a false mask
            }
            let idx = Tensor::from_slice(members).to_device(device);
            let values = audio.index_select(0, &idx).narrow(1, 0, len);
            let mask = audio_mask.index_select(0, &idx).narrow(1, 0, len);
            let values = enc.feature_extractor.normalize_tensor(&values, &mask);
            let out = enc.encode(&values, Some(&mask.to_kind(Kind::Int64)));
            let group_states = match self.cfg.adapter.layers {
                AudioLayers::Last => out.last_hidden_state.unsqueeze(1),
                AudioLayers::WeightedSum => Tensor::stack(&out.hidden_states, 1),
            }
            .to_kind(Kind::Float);
            let frames = group_states.size()[2];
            let _ = states.narrow(2, 0, frames).index_copy_(0, &idx, &group_states);
        }
        let valid: Vec<i64> = rows.iter().map(|m| enc.config.output_frames(valid_samples(m))).collect();
        Ok((states, crate::length_mask(&Tensor::from_slice(&valid).to_device(device), audio_frames)))
    }

    /// The trainable part on encoder outputs.
    pub fn forward_t(&self, feats: &FeatureBatch, train: bool) -> ExprOutput {
        self.head.forward_t(feats, train)
    }

    pub fn forward_raw_t(&self, raw: &RawBatch, train: bool) -> Result<ExprOutput> {
        Ok(self.forward_t(&self.encode(raw)?, train))
    }

    pub fn clip_targets(&self, frame_labels: &Tensor) -> Tensor {
        self.head.clip_targets(frame_labels)
    }

    pub fn loss(&self, out: &ExprOutput, frame_labels: &Tensor) -> LossTerms {
        self.head.loss(out, frame_labels)
    }

    pub fn class_weights(&self) -> Option<&Tensor> {
        self.head.class_weights()
    }
}
