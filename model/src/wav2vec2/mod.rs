//! Wav2Vec 2.0 (Baevski et al. 2020), ported from `transformers/models/wav2vec2`, and the frozen audio encoder
//! built on it.

pub mod config;
pub mod feature_extractor;
pub mod model;

use std::path::Path;

use tch::{Tensor, nn::VarStore};

pub use config::{FeatExtractNorm, Wav2Vec2Config};
pub use feature_extractor::{AudioBatch, Wav2Vec2FeatureExtractor};
pub use model::{KEY_MAP, Wav2Vec2Model, Wav2Vec2Output};

use crate::encoders::{EncoderOptions, Tower, build_frozen};
use crate::error::Result;

/// The Wav2Vec 2.0 encoder, frozen unless adapted: its own parameters never require grad; forward runs in eval
/// mode (no dropout), under no_grad unless adapted.
#[derive(Debug)]
pub struct Wav2Vec2Encoder {
    tower: Tower<Wav2Vec2Model>,
    pub config: Wav2Vec2Config,
    pub feature_extractor: Wav2Vec2FeatureExtractor,
}

impl Wav2Vec2Encoder {
    /// Loads an HF checkpoint directory of a `Wav2Vec2Model` or a task model with the `wav2vec2.` prefix
    /// (`Wav2Vec2ForCTC`, ...).
    pub fn load(dir: &Path, options: EncoderOptions) -> Result<Self> {
        let config_path = dir.join("config.json");
        let config = Wav2Vec2Config::from_file(&config_path)?;
        let feature_extractor = Wav2Vec2FeatureExtractor::from_dir(dir)?;
        let (feat_act, hidden_act) =
            (config.feat_extract_activation(&config_path)?, config.hidden_activation(&config_path)?);
        let weights = crate::hf::weights_file(dir)?;
        let mut tower = Tower::new(
            build_frozen(Some((&weights, &KEY_MAP)), &options, |p| {
                Wav2Vec2Model::new(p, &config, feat_act, hidden_act)
            })?,
            options,
        );
        tower.model.prepare_inference();
        Ok(Self { tower, config, feature_extractor })
    }

    /// A randomly initialised encoder (benchmarks, shape checks).
    pub fn from_config(config: &Wav2Vec2Config, options: EncoderOptions) -> Result<Self> {
        let here = Path::new("<config>");
        config.validate(here)?;
        let (feat_act, hidden_act) = (config.feat_extract_activation(here)?, config.hidden_activation(here)?);
        let mut tower =
            Tower::new(build_frozen(None, &options, |p| Wav2Vec2Model::new(p, config, feat_act, hidden_act))?, options);
        tower.model.prepare_inference();
        Ok(Self { tower, config: config.clone(), feature_extractor: Default::default() })
    }

    pub fn var_store(&self) -> &VarStore {
        &self.tower.vs
    }

    /// The underlying module, for callers that manage no_grad and masks themselves.
    pub fn model(&self) -> &Wav2Vec2Model {
        &self.tower.model
    }

    pub fn options(&self) -> &EncoderOptions {
        &self.tower.options
    }

    /// `input_values` `[batch, samples]` as the feature extractor makes them. The attention mask is passed to
    /// the model only when the checkpoint's feature extractor asks for it (`return_attention_mask`), as the HF
    /// pipeline does: group-norm models were trained on zero-padded audio without one. Outputs are f32.
    pub fn encode(&self, input_values: &Tensor, attention_mask: Option<&Tensor>) -> Wav2Vec2Output {
        let mask = attention_mask.filter(|_| self.feature_extractor.return_attention_mask);
        let mask = mask.map(|m| m.to_device(self.tower.options.device));
        self.tower.run(input_values, |model, xs| {
            let out = model.forward(xs, mask.as_ref());
            Wav2Vec2Output {
                last_hidden_state: out.last_hidden_state.to_kind(tch::Kind::Float),
                hidden_states: out.hidden_states.into_iter().map(|h| h.to_kind(tch::Kind::Float)).collect(),
                frame_mask: out.frame_mask,
            }
        })
    }

    /// LoRA of `rank` and `alpha` on every layer's query and value projections, its variables (trainable) under
    /// `vs` with the checkpoint's paths: `<vs>/encoder/layers/<i>/attention/q_proj/lora_A`, ...
    pub fn attach_lora(&mut self, vs: &tch::nn::Path, spec: crate::lora::LoraSpec) {
        self.tower.attach_lora(vs, spec);
    }

    /// Unfreezes the layers from `first` on (and the stable variant's final layer norm): trainable copies with
    /// the checkpoint's values under `vs` with the checkpoint's paths (`<vs>/encoder/layers/<i>/...`). Returns
    /// how many variables were copied.
    pub fn adapt_last_blocks(&mut self, vs: &tch::nn::Path, first: i64) -> usize {
        self.tower.adapt_last_blocks(vs, &self.config, first)
    }

    /// Normalises, pads and encodes raw 16 kHz waveforms.
    pub fn encode_waveforms(&self, waves: &[&[f32]]) -> Wav2Vec2Output {
        let batch = self.feature_extractor.batch(waves);
        self.encode(&batch.input_values, Some(&batch.attention_mask))
    }
}
