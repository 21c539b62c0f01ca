//! Temporal pooling and the classifier: masked mean pooling (or attention pooling) of each fused stream,
//! concatenated, an MLP to the 8 expression logits; or, as an option, the same MLP on every frame of the
//! concatenated streams (per-frame logits). Lives in the `fusion` group.

use avexpr_data::NUM_CLASSES;
use tch::{Kind, Tensor, nn};

use crate::config::{HeadConfig, Pooling};

#[derive(Debug)]
pub struct Head {
    video_score: Option<nn::Linear>,
    audio_score: Option<nn::Linear>,
    fc1: nn::Linear,
    fc2: nn::Linear,
    dropout: f64,
    per_frame: bool,
}

/// Mean over the frames where `mask` is true; zeros for a clip without any.
pub fn masked_mean(xs: &Tensor, mask: &Tensor) -> Tensor {
    let m = mask.to_kind(xs.kind()).unsqueeze(-1); // [batch, frames, 1]
    (xs * &m).sum_dim_intlist(1, false, None) / m.sum_dim_intlist(1, false, None).clamp_min(1.0)
}

/// Softmax-weighted sum with scores `[batch, frames]`, restricted to `mask`; zeros for a clip without any.
fn attention_pool(xs: &Tensor, scores: &Tensor, mask: &Tensor) -> Tensor {
    let any = mask.any_dim(1, true);
    let scores = scores.masked_fill(&mask.logical_not(), f64::NEG_INFINITY).masked_fill(&any.logical_not(), 0.0);
    let weights = scores.softmax(1, Kind::Float).to_kind(xs.kind()) * any.to_kind(xs.kind());
    (xs * weights.unsqueeze(-1)).sum_dim_intlist(1, false, None)
}

impl Head {
    /// `vs` is `fusion/head`; `dim` the width of each fused stream.
    pub fn new(vs: &nn::Path, dim: i64, cfg: &HeadConfig) -> Self {
        let score = |name: &str| nn::linear(vs / name, dim, 1, Default::default());
        let attention = cfg.pooling == Pooling::Attention;
        Self {
            video_score: attention.then(|| score("video_score")),
            audio_score: attention.then(|| score("audio_score")),
            fc1: nn::linear(vs / "fc1", 2 * dim, cfg.hidden, Default::default()),
            fc2: nn::linear(vs / "fc2", cfg.hidden, NUM_CLASSES as i64, Default::default()),
            dropout: cfg.dropout,
            per_frame: cfg.per_frame,
        }
    }

    fn pool(&self, xs: &Tensor, mask: &Tensor, score: &Option<nn::Linear>) -> Tensor {
        match score {
            Some(score) => attention_pool(xs, &xs.apply(score).squeeze_dim(-1), mask),
            None => masked_mean(xs, mask),
        }
    }

    fn classify(&self, xs: &Tensor, train: bool) -> Tensor {
        xs.apply(&self.fc1).gelu("none").dropout(self.dropout, train).apply(&self.fc2)
    }

    /// Returns `(logits, pooled)`: logits `[batch, 8]` (or `[batch, frames, 8]` per frame) and the pooled
    /// representation `[batch, 2 * dim]` that the prompt head aligns with the class prompts.
    pub fn forward_t(
        &self,
        video: &Tensor,
        audio: &Tensor,
        video_mask: &Tensor,
        audio_mask: &Tensor,
        train: bool,
    ) -> (Tensor, Tensor) {
        let pooled = Tensor::cat(
            &[self.pool(video, video_mask, &self.video_score), self.pool(audio, audio_mask, &self.audio_score)],
            -1,
        );
        let logits = if self.per_frame {
            // Per frame: a frame without audio contributes zeros for the audio half.
            let audio = audio * audio_mask.to_kind(audio.kind()).unsqueeze(-1);
            self.classify(&Tensor::cat(&[video, &audio], -1), train)
        } else {
            self.classify(&pooled, train)
        };
        (logits, pooled)
    }
}
