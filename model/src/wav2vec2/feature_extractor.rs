//! `Wav2Vec2FeatureExtractor`: 16 kHz mono waveforms -> `input_values`, zero-mean unit-variance normalised per
//! utterance over its real samples when `do_normalize`, right-padded with `padding_value`, plus the attention
//! mask; and reading WAV files.

use std::path::Path;

use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct Wav2Vec2FeatureExtractor {
    pub sampling_rate: u32,
    pub do_normalize: bool,
    pub padding_value: f32,
    pub return_attention_mask: bool,
}

impl Default for Wav2Vec2FeatureExtractor {
    /// `facebook/wav2vec2-base`'s `preprocessor_config.json`.
    fn default() -> Self {
        Self { sampling_rate: 16_000, do_normalize: true, padding_value: 0.0, return_attention_mask: false }
    }
}

/// A padded batch of waveforms.
#[derive(Debug)]
pub struct AudioBatch {
    /// `[batch, samples]` f32.
    pub input_values: Tensor,
    /// `[batch, samples]` int64, 1 on real samples.
    pub attention_mask: Tensor,
}

impl Wav2Vec2FeatureExtractor {
    /// Reads `dir/preprocessor_config.json`, or the base model's settings when it is absent.
    pub fn from_dir(dir: &Path) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        if !path.is_file() {
            return Ok(Self::default());
        }
        let fe: Self = crate::hf::read_json(&path)?;
        if fe.sampling_rate == 0 {
            return Err(ModelError::config(&path, "sampling_rate", "must be positive"));
        }
        Ok(fe)
    }

    /// `zero_mean_unit_var_norm` of one waveform: `(x - mean) / sqrt(var + 1e-7)`.
    pub fn normalize(&self, wave: &[f32]) -> Vec<f32> {
        if !self.do_normalize || wave.is_empty() {
            return wave.to_vec();
        }
        let n = wave.len() as f64;
        let mean = wave.iter().map(|&x| x as f64).sum::<f64>() / n;
        let var = wave.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / n;
        let scale = 1.0 / (var + 1e-7).sqrt();
        wave.iter().map(|&x| ((x as f64 - mean) * scale) as f32).collect()
    }

    /// `normalize` on a padded batch `[batch, samples]` on any device, over the samples where `mask` is true;
    /// padding becomes `padding_value`.
    pub fn normalize_tensor(&self, values: &Tensor, mask: &Tensor) -> Tensor {
        let m = mask.to_kind(Kind::Float);
        let values = values.to_kind(Kind::Float);
        if !self.do_normalize {
            return values.where_self(
                &mask.to_kind(Kind::Bool),
                &Tensor::from(self.padding_value as f64).to_device(values.device()),
            );
        }
        let n = m.sum_dim_intlist(1, true, Kind::Float).clamp_min(1.0);
        let mean = (&values * &m).sum_dim_intlist(1, true, Kind::Float) / &n;
        let centred = (&values - &mean) * &m;
        let var = (&centred * &centred).sum_dim_intlist(1, true, Kind::Float) / &n;
        centred / (var + 1e-7).sqrt() + (1.0 - m) * self.padding_value as f64
    }

    /// Normalises each waveform and right-pads the batch to the longest.
    pub fn batch(&self, waves: &[&[f32]]) -> AudioBatch {
        let longest = waves.iter().map(|w| w.len()).max().unwrap_or(0);
        let mut values = Vec::with_capacity(waves.len() * longest);
        let mut mask = Vec::with_capacity(waves.len() * longest);
        for wave in waves {
            values.extend(self.normalize(wave));
            values.extend(std::iter::repeat_n(self.padding_value, longest - wave.len()));
            mask.extend(std::iter::repeat_n(1i64, wave.len()));
            mask.extend(std::iter::repeat_n(0i64, longest - wave.len()));
        }
        let shape = [waves.len() as i64, longest as i64];
        AudioBatch {
            input_values: Tensor::from_slice(&values).view(shape),
            attention_mask: Tensor::from_slice(&mask).view(shape).to_kind(Kind::Int64),
        }
    }

    /// Reads a WAV file as mono f32 in [-1, 1] (channels averaged); its rate must be `sampling_rate`.
    pub fn read_wav(&self, path: &Path) -> Result<Vec<f32>> {
        let bad = |reason: String| ModelError::BadAudio { path: path.to_path_buf(), reason };
        let file = std::fs::File::open(path).map_err(|e| ModelError::io(path, e))?;
        let mut reader = hound::WavReader::new(std::io::BufReader::new(file))
            .map_err(|e| bad(format!("not a readable WAV file: {e}")))?;
        let spec = reader.spec();
        if spec.sample_rate != self.sampling_rate {
            return Err(bad(format!(
                "sample rate is {} Hz, the Wav2Vec 2.0 feature extractor expects {} Hz (resample first, e.g. \
                 `ffmpeg -i in.wav -ar {} -ac 1 out.wav`)",
                spec.sample_rate, self.sampling_rate, self.sampling_rate
            )));
        }
        let samples: Vec<f32> = match spec.sample_format {
            hound::SampleFormat::Float => reader.samples::<f32>().collect::<Result<_, _>>(),
            hound::SampleFormat::Int => {
                let scale = 1.0 / (1u64 << (spec.bits_per_sample - 1)) as f32;
                reader.samples::<i32>().map(|s| s.map(|s| s as f32 * scale)).collect::<Result<_, _>>()
            }
        }
        .map_err(|e| bad(format!("corrupt sample data: {e}")))?;
        let channels = spec.channels.max(1) as usize;
        Ok(samples.chunks(channels).map(|c| c.iter().sum::<f32>() / channels as f32).collect())
    }
}
