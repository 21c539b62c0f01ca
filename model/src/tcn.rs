//! Temporal Convolutional Network (Bai, Kolter, Koltun 2018, "An Empirical Evaluation of Generic Convolutional
//! and Recurrent Networks for Sequence Modeling", `TemporalBlock` of locuslab/TCN): residual blocks of two
//! dilated causal Conv1d with weight normalisation, ReLU and dropout, a 1x1 conv on the residual when the
//! width changes; the dilation doubles per level. Causal: the input is padded on the left only, so output
//! frame t sees frames `t - receptive_field + 1 ..= t`.

use tch::{Tensor, nn};

use crate::config::TcnConfig;
use crate::weight_norm::{WeightNormConv1d, WeightNormConv1dConfig};

#[derive(Debug)]
pub struct TemporalBlock {
    conv1: WeightNormConv1d,
    conv2: WeightNormConv1d,
    downsample: Option<nn::Conv1D>,
    left_pad: i64,
    dropout: f64,
}

impl TemporalBlock {
    pub fn new(vs: nn::Path, in_ch: i64, out_ch: i64, kernel: i64, dilation: i64, dropout: f64) -> Self {
        let cfg = WeightNormConv1dConfig { dim: 0, dilation, ..Default::default() };
        Self {
            // The reference initialises conv weights with N(0, 0.01).
            conv1: WeightNormConv1d::new(&vs / "conv1", in_ch, out_ch, kernel, 0.01, cfg),
            conv2: WeightNormConv1d::new(&vs / "conv2", out_ch, out_ch, kernel, 0.01, cfg),
            downsample: (in_ch != out_ch).then(|| {
                let ds = nn::conv1d(&vs / "downsample", in_ch, out_ch, 1, Default::default());
                tch::no_grad(|| {
                    let _ = ds.ws.shallow_clone().normal_(0.0, 0.01);
                });
                ds
            }),
            left_pad: (kernel - 1) * dilation,
            dropout,
        }
    }

    /// `xs`: `[batch, channels, frames]`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let causal = |conv: &WeightNormConv1d, xs: &Tensor| conv.forward(&xs.constant_pad_nd([self.left_pad, 0]));
        let out = causal(&self.conv1, xs).relu().dropout(self.dropout, train);
        let out = causal(&self.conv2, &out).relu().dropout(self.dropout, train);
        let residual = match &self.downsample {
            Some(ds) => xs.apply(ds),
            None => xs.shallow_clone(),
        };
        (out + residual).relu()
    }
}

#[derive(Debug)]
pub struct Tcn {
    blocks: Vec<TemporalBlock>,
    receptive_field: i64,
}

impl Tcn {
    /// `vs` is the `tcn` group; `input_dim` the CLIP image embedding width.
    pub fn new(vs: &nn::Path, input_dim: i64, cfg: &TcnConfig) -> Self {
        let mut in_ch = input_dim;
        let blocks = cfg
            .channels
            .iter()
            .enumerate()
            .map(|(level, &out_ch)| {
                let block = TemporalBlock::new(
                    vs / "blocks" / level as i64,
                    in_ch,
                    out_ch,
                    cfg.kernel_size,
                    1 << level,
                    cfg.dropout,
                );
                in_ch = out_ch;
                block
            })
            .collect();
        let receptive_field = cfg.receptive_field();
        tracing::info!(levels = cfg.channels.len(), kernel = cfg.kernel_size, receptive_field, "TCN built");
        Self { blocks, receptive_field }
    }

    pub fn receptive_field(&self) -> i64 {
        self.receptive_field
    }

    /// `[batch, frames, input_dim]` -> `[batch, frames, channels.last()]`.
    pub fn forward_t(&self, xs: &Tensor, train: bool) -> Tensor {
        let mut ys = xs.transpose(1, 2);
        for block in &self.blocks {
            ys = block.forward_t(&ys, train);
        }
        ys.transpose(1, 2)
    }
}
