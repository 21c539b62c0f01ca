//! The audio adapter: Wav2Vec 2.0 hidden states (the last layer, or a learned softmax-weighted sum of all
//! layers) -> a projection to the fusion width -> a residual bottleneck MLP with LayerNorm -> alignment of the
//! ~50 Hz audio frames to the clip's video frames, using the clip's own fps: video frame `i` covers audio time
//! `[i / fps, (i + 1) / fps)` and receives the mean of the audio frames centred in that span (the nearest one
//! when the video runs faster than 50 fps).

use tch::{Kind, Tensor, nn};

use crate::config::{AdapterConfig, AudioLayers};

/// Where Wav2Vec 2.0's output frames sit in time: frame `j` covers samples
/// `[j * stride, j * stride + receptive_field)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AudioTiming {
    pub stride: i64,
    pub receptive_field: i64,
    pub sample_rate: f64,
}

impl AudioTiming {
    /// From the conv feature encoder's kernels and strides.
    pub fn from_conv(kernels: &[i64], strides: &[i64], sample_rate: f64) -> Self {
        let (mut receptive_field, mut jump) = (1, 1);
        for (k, s) in kernels.iter().zip(strides) {
            receptive_field += (k - 1) * jump;
            jump *= s;
        }
        Self { stride: jump, receptive_field, sample_rate }
    }

    fn centre_seconds(&self, j: i64) -> f64 {
        (j * self.stride) as f64 / self.sample_rate + self.receptive_field as f64 / 2.0 / self.sample_rate
    }

    /// `[frames, audio_frames]` averaging weights of one clip with `valid` real audio frames, and per video
    /// frame whether it received any audio.
    pub fn alignment(&self, frames: i64, audio_frames: i64, valid: i64, fps: f64) -> (Vec<f32>, Vec<bool>) {
        let mut weights = vec![0f32; (frames * audio_frames) as usize];
        let mut has_audio = vec![false; frames as usize];
        let valid = valid.min(audio_frames);
        if valid == 0 {
            return (weights, has_audio);
        }
        let audio_end = ((valid - 1) * self.stride + self.receptive_field) as f64 / self.sample_rate;
        for i in 0..frames {
            let (t0, t1) = (i as f64 / fps, (i + 1) as f64 / fps);
            let members: Vec<i64> = (0..valid).filter(|&j| (t0..t1).contains(&self.centre_seconds(j))).collect();
            let members = if members.is_empty() {
                let mid = (t0 + t1) / 2.0;
                if mid > audio_end {
                    continue;
                }
                let nearest =
                    ((mid * self.sample_rate - self.receptive_field as f64 / 2.0) / self.stride as f64).round();
                vec![(nearest as i64).clamp(0, valid - 1)]
            } else {
                members
            };
            for &j in &members {
                weights[(i * audio_frames + j) as usize] = 1.0 / members.len() as f32;
            }
            has_audio[i as usize] = true;
        }
        (weights, has_audio)
    }
}

#[derive(Debug)]
pub struct AudioAdapter {
    layer_logits: Option<Tensor>,
    projection: nn::Linear,
    norm: nn::LayerNorm,
    down: nn::Linear,
    up: nn::Linear,
    dropout: f64,
    timing: AudioTiming,
}

impl AudioAdapter {
    /// `vs` is the `adapter` group; `hidden` the encoder width, `states` its number of hidden states (layers + 1).
    pub fn new(vs: &nn::Path, hidden: i64, states: i64, dim: i64, cfg: &AdapterConfig, timing: AudioTiming) -> Self {
        Self {
            layer_logits: (cfg.layers == AudioLayers::WeightedSum)
                .then(|| vs.var("layer_logits", &[states], nn::Init::Const(0.0))),
            projection: nn::linear(vs / "projection", hidden, dim, Default::default()),
            norm: nn::layer_norm(vs / "norm", vec![dim], Default::default()),
            down: nn::linear(vs / "down", dim, cfg.bottleneck, Default::default()),
            up: nn::linear(vs / "up", cfg.bottleneck, dim, Default::default()),
            dropout: cfg.dropout,
            timing,
        }
    }

    pub fn timing(&self) -> AudioTiming {
        self.timing
    }

    /// `states`: `[batch, S, audio_frames, hidden]` (S = 1 for the last layer, layers + 1 for the weighted
    /// sum); `audio_mask`: `[batch, audio_frames]` bool; `fps` per clip. Returns the aligned stream
    /// `[batch, frames, dim]` and its mask `[batch, frames]`.
    pub fn forward_t(
        &self,
        states: &Tensor,
        audio_mask: &Tensor,
        fps: &[f64],
        frames: i64,
        train: bool,
    ) -> (Tensor, Tensor) {
        let xs = match &self.layer_logits {
            // [S] softmax weights -> sum over S.
            Some(logits) => {
                (states * logits.softmax(0, Kind::Float).view([1, -1, 1, 1])).sum_dim_intlist(1, false, None)
            }
            None => states.select(1, states.size()[1] - 1),
        };
        let xs = xs.apply(&self.projection);
        let bottleneck =
            xs.apply(&self.norm).apply(&self.down).gelu("none").dropout(self.dropout, train).apply(&self.up);
        let xs = xs + bottleneck; // [batch, audio_frames, dim]

        let (batch, audio_frames) = (xs.size()[0], xs.size()[1]);
        let valid: Vec<i64> =
            Vec::try_from(audio_mask.sum_dim_intlist(1, false, Kind::Int64).to_device(tch::Device::Cpu))
                .expect("mask lengths");
        let mut weights = Vec::with_capacity((batch * frames * audio_frames) as usize);
        let mut mask = Vec::with_capacity((batch * frames) as usize);
        for b in 0..batch as usize {
            let (w, m) = self.timing.alignment(frames, audio_frames, valid[b], fps[b]);
            weights.extend(w);
            mask.extend(m);
        }
        let align =
            Tensor::from_slice(&weights).view([batch, frames, audio_frames]).to_device(xs.device()).to_kind(xs.kind());
        let mask = Tensor::from_slice(&mask).view([batch, frames]).to_device(xs.device());
        (align.matmul(&xs), mask)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> AudioTiming {
        AudioTiming::from_conv(&[10, 3, 3, 3, 3, 2, 2], &[5, 2, 2, 2, 2, 2, 2], 16_000.0)
    }

    #[test]
    fn wav2vec2_base_frames_are_20_ms_apart_and_25_ms_wide() {
        assert_eq!(base(), AudioTiming { stride: 320, receptive_field: 400, sample_rate: 16_000.0 });
    }

    fn row(weights: &[f32], audio_frames: i64, i: i64) -> Vec<f32> {
        weights[(i * audio_frames) as usize..((i + 1) * audio_frames) as usize].to_vec()
    }

    #[test]
    fn at_25_fps_each_video_frame_averages_the_two_audio_frames_centred_in_it() {
        // Audio frame j is centred at 12.5 ms + 20 ms * j; video frame i spans [40 i, 40 (i + 1)) ms.
        let (w, has) = base().alignment(4, 8, 8, 25.0);
        assert!(has.iter().all(|&h| h));
        for i in 0..4 {
            let mut want = vec![0.0; 8];
            want[(2 * i) as usize] = 0.5;
            want[(2 * i + 1) as usize] = 0.5;
            assert_eq!(row(&w, 8, i), want, "frame {i}");
        }
    }

    #[test]
    fn faster_video_takes_the_nearest_audio_frame_and_frames_past_the_audio_get_none() {
        // 60 fps: frames are 16.7 ms long, shorter than the 20 ms audio stride, so some contain no centre.
        let (w, has) = base().alignment(10, 6, 6, 60.0);
        for i in 0..10 {
            let r = row(&w, 6, i);
            if has[i as usize] {
                assert!((r.iter().sum::<f32>() - 1.0).abs() < 1e-6, "frame {i} weights sum to 1: {r:?}");
            }
        }
        // Frame 1 spans [16.7, 33.3) ms and holds the centre 32.5 ms of audio frame 1.
        assert_eq!(row(&w, 6, 1)[1], 1.0);
        // Only 3 valid audio frames (they end at 2 * 20 + 25 = 65 ms): frame 5 (83-100 ms) has no audio.
        let (_, has) = base().alignment(10, 6, 3, 60.0);
        assert!(has[2] && !has[5]);
        let (w, has) = base().alignment(3, 6, 0, 25.0);
        assert!(has.iter().all(|&h| !h) && w.iter().all(|&x| x == 0.0));
    }
}
