//! Bi-directional cross-attention fusion (the paper's fusion, after Praveen & Alam 2024): in each of L layers
//! the video stream queries the audio stream and the audio stream queries the video stream, both from the
//! layer's inputs, each followed by residual + LayerNorm and a feed-forward block (post-LN, as Vaswani et al.),
//! with key-padding masks for frames without a face and frames without audio. The attention has no key bias
//! (softmax ignores it; see [`crate::attention::SelfAttention::without_key_bias`]).

use tch::{Tensor, nn, nn::Module};

use crate::attention::SelfAttention as MultiHeadAttention;
use crate::config::FusionConfig;

#[derive(Debug)]
struct Stream {
    cross: MultiHeadAttention,
    norm1: nn::LayerNorm,
    fc1: nn::Linear,
    fc2: nn::Linear,
    norm2: nn::LayerNorm,
}

impl Stream {
    fn new(vs: nn::Path, cfg: &FusionConfig) -> Self {
        Self {
            cross: MultiHeadAttention::without_key_bias(&vs / "cross_attn", cfg.dim, cfg.heads),
            norm1: nn::layer_norm(&vs / "norm1", vec![cfg.dim], Default::default()),
            fc1: nn::linear(&vs / "fc1", cfg.dim, cfg.ff_dim, Default::default()),
            fc2: nn::linear(&vs / "fc2", cfg.ff_dim, cfg.dim, Default::default()),
            norm2: nn::layer_norm(&vs / "norm2", vec![cfg.dim], Default::default()),
        }
    }

    /// `xs` queries `context` (keys allowed by `context_mask`).
    fn forward_t(&self, xs: &Tensor, context: &Tensor, context_mask: &Tensor, dropout: f64, train: bool) -> Tensor {
        let attended = self.cross.forward_cross(xs, context, Some(context_mask)).dropout(dropout, train);
        let xs = (xs + attended).apply(&self.norm1);
        let ff = xs.apply(&self.fc1).gelu("none").dropout(dropout, train).apply(&self.fc2).dropout(dropout, train);
        (xs + ff).apply(&self.norm2)
    }
}

#[derive(Debug)]
struct FusionLayer {
    video: Stream,
    audio: Stream,
}

#[derive(Debug)]
pub struct BiCrossAttention {
    video_in: Option<nn::Linear>,
    layers: Vec<FusionLayer>,
    dropout: f64,
}

impl BiCrossAttention {
    /// `vs` is the `fusion` group; `video_dim` the TCN's output width (projected to `cfg.dim` when different).
    pub fn new(vs: &nn::Path, video_dim: i64, cfg: &FusionConfig) -> Self {
        Self {
            video_in: (video_dim != cfg.dim)
                .then(|| nn::linear(vs / "video_in", video_dim, cfg.dim, Default::default())),
            layers: (0..cfg.layers)
                .map(|i| {
                    let layer = vs / "layers" / i;
                    FusionLayer { video: Stream::new(&layer / "video", cfg), audio: Stream::new(&layer / "audio", cfg) }
                })
                .collect(),
            dropout: cfg.dropout,
        }
    }

    /// `video` `[batch, frames, video_dim]`, `audio` `[batch, frames, dim]` (aligned), masks `[batch, frames]`
    /// bool. Returns both fused streams `[batch, frames, dim]`.
    pub fn forward_t(
        &self,
        video: &Tensor,
        audio: &Tensor,
        video_mask: &Tensor,
        audio_mask: &Tensor,
        train: bool,
    ) -> (Tensor, Tensor) {
        let mut v = match &self.video_in {
            Some(proj) => proj.forward(video),
            None => video.shallow_clone(),
        };
        let mut a = audio.shallow_clone();
        for layer in &self.layers {
            let next_v = layer.video.forward_t(&v, &a, audio_mask, self.dropout, train);
            let next_a = layer.audio.forward_t(&a, &v, video_mask, self.dropout, train);
            (v, a) = (next_v, next_a);
        }
        (v, a)
    }
}
