//! `Conv1d` under `torch.nn.utils.parametrizations.weight_norm`: the weight is `g * v / ||v||`, the norm taken
//! over every dimension but `dim`. Variable paths follow PyTorch's parametrization:
//! `<conv>.parametrizations.weight.original0` (g), `.original1` (v), `<conv>.bias`.

use tch::{Tensor, nn};

#[derive(Debug)]
pub struct WeightNormConv1d {
    pub weight_g: Tensor,
    pub weight_v: Tensor,
    pub bias: Tensor,
    dim: i64,
    dilation: i64,
    padding: i64,
    groups: i64,
    frozen_weight: Option<Tensor>,
}

#[derive(Debug, Clone, Copy)]
pub struct WeightNormConv1dConfig {
    pub dim: i64,
    pub dilation: i64,
    pub padding: i64,
    pub groups: i64,
}

impl Default for WeightNormConv1dConfig {
    fn default() -> Self {
        Self { dim: 0, dilation: 1, padding: 0, groups: 1 }
    }
}

impl WeightNormConv1d {
    /// `v` starts as N(0, `init_std`) and `g` as `||v||`, so the initial weight equals `v`, as
    /// `weight_norm` leaves a freshly initialised conv.
    pub fn new(vs: nn::Path, in_ch: i64, out_ch: i64, kernel: i64, init_std: f64, cfg: WeightNormConv1dConfig) -> Self {
        let param = &vs / "parametrizations" / "weight";
        let weight_v = param.var(
            "original1",
            &[out_ch, in_ch / cfg.groups, kernel],
            nn::Init::Randn { mean: 0.0, stdev: init_std },
        );
        let mut g_shape = vec![1i64; 3];
        g_shape[cfg.dim as usize] = weight_v.size()[cfg.dim as usize];
        let weight_g = param.var("original0", &g_shape, nn::Init::Const(1.0));
        tch::no_grad(|| weight_g.shallow_clone().copy_(&norm_except_dim(&weight_v, cfg.dim)));
        let bound = 1.0 / ((in_ch / cfg.groups * kernel) as f64).sqrt();
        let bias = vs.var("bias", &[out_ch], nn::Init::Uniform { lo: -bound, up: bound });
        Self {
            weight_g,
            weight_v,
            bias,
            dim: cfg.dim,
            dilation: cfg.dilation,
            padding: cfg.padding,
            groups: cfg.groups,
            frozen_weight: None,
        }
    }

    pub fn weight(&self) -> Tensor {
        Tensor::internal_weight_norm(&self.weight_v, &self.weight_g, self.dim)
    }

    /// For frozen modules: compute the weight once (call after loading, moving and casting).
    pub fn freeze_weight(&mut self) {
        self.frozen_weight = Some(self.weight());
    }

    /// `xs`: `[batch, channels, time]`.
    pub fn forward(&self, xs: &Tensor) -> Tensor {
        let weight = self.frozen_weight.as_ref().map_or_else(|| self.weight(), Tensor::shallow_clone);
        xs.conv1d(&weight, Some(&self.bias), [1], [self.padding], [self.dilation], self.groups)
    }
}

fn norm_except_dim(v: &Tensor, dim: i64) -> Tensor {
    let dims: Vec<i64> = (0..v.dim() as i64).filter(|&d| d != dim).collect();
    v.norm_scalaropt_dim(2, dims.as_slice(), true)
}
