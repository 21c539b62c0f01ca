//! Multi-head attention (self and cross) with the Hugging Face layout shared by CLIP (`CLIPAttention`) and Wav2Vec 2.0
//! (`Wav2Vec2Attention`): `q_proj`, `k_proj`, `v_proj`, `out_proj`, all with bias, scale `head_dim^-0.5`.
//!
//! DINOv2 keeps the original ViT names ([`VIT_PROJECTIONS`]).
//!
//! For inference the three input projections are fused into one matmul once the weights are loaded
//! ([`SelfAttention::fuse_qkv`]); the variables themselves keep their HF names.

use tch::{Tensor, nn};

use crate::lora::{Lora, LoraSpec};

/// Where the four projections live under an attention module's path.
#[derive(Debug, Clone, Copy)]
pub struct ProjectionNames {
    pub q: &'static [&'static str],
    pub k: &'static [&'static str],
    pub v: &'static [&'static str],
    pub out: &'static [&'static str],
}

/// CLIP's and Wav2Vec 2.0's `q_proj`, `k_proj`, `v_proj`, `out_proj`.
pub const HF_PROJECTIONS: ProjectionNames =
    ProjectionNames { q: &["q_proj"], k: &["k_proj"], v: &["v_proj"], out: &["out_proj"] };

/// The original ViT layout of DINOv2 checkpoints: `attention.{query,key,value}`, `output.dense`.
pub const VIT_PROJECTIONS: ProjectionNames = ProjectionNames {
    q: &["attention", "query"],
    k: &["attention", "key"],
    v: &["attention", "value"],
    out: &["output", "dense"],
};

fn at<'a>(vs: &nn::Path<'a>, names: &[&str]) -> nn::Path<'a> {
    names.iter().fold(vs.clone(), |p, n| p.sub(*n))
}

#[derive(Debug)]
pub struct SelfAttention {
    q_proj: nn::Linear,
    k_proj: nn::Linear,
    v_proj: nn::Linear,
    out_proj: nn::Linear,
    num_heads: i64,
    head_dim: i64,
    fused_qkv: Option<(Tensor, Tensor)>,
    names: ProjectionNames,
    /// LoRA on the query and value projections (peft's default targets for CLIP), when the encoder adapts.
    lora: Option<(Lora, Lora)>,
}

impl SelfAttention {
    pub fn new(vs: nn::Path, hidden_size: i64, num_heads: i64) -> Self {
        Self::build(vs, hidden_size, num_heads, true, HF_PROJECTIONS)
    }

    /// With the projections at other paths (DINOv2's [`VIT_PROJECTIONS`]).
    pub fn with_names(vs: nn::Path, hidden_size: i64, num_heads: i64, names: ProjectionNames) -> Self {
        Self::build(vs, hidden_size, num_heads, true, names)
    }

    fn build(vs: nn::Path, hidden_size: i64, num_heads: i64, key_bias: bool, names: ProjectionNames) -> Self {
        let linear = |name: &[&str], bias: bool| {
            nn::linear(at(&vs, name), hidden_size, hidden_size, nn::LinearConfig { bias, ..Default::default() })
        };
        Self {
            q_proj: linear(names.q, true),
            k_proj: linear(names.k, key_bias),
            v_proj: linear(names.v, true),
            out_proj: linear(names.out, true),
            num_heads,
            head_dim: hidden_size / num_heads,
            fused_qkv: None,
            names,
            lora: None,
        }
    }

    /// Adds LoRA of `spec`'s rank and alpha to the query and value projections, its variables under `vs` at their
    /// paths (`<vs>/q_proj/lora_A`, ...).
    pub fn attach_lora(&mut self, vs: &nn::Path, spec: LoraSpec) {
        let hidden = self.num_heads * self.head_dim;
        let lora = |name: &[&str]| Lora::new(&at(vs, name), hidden, hidden, spec.rank, spec.alpha);
        self.lora = Some((lora(self.names.q), lora(self.names.v)));
    }

    /// The same without a key bias, for attention that is trained: softmax ignores a bias shared by all of a
    /// query's logits, so a key bias gets a zero gradient up to rounding, which Adam turns into lr-sized random
    /// steps (results would then hang on summation order, e.g. batch sizes). No `k_proj.bias` variable.
    pub fn without_key_bias(vs: nn::Path, hidden_size: i64, num_heads: i64) -> Self {
        Self::build(vs, hidden_size, num_heads, false, HF_PROJECTIONS)
    }

    /// Concatenates the q/k/v weights into one `[3*hidden, hidden]` matrix. Call after the weights are final
    /// (loaded, moved, cast); the fused copy does not follow later changes of the variables.
    pub fn fuse_qkv(&mut self) {
        let weight = Tensor::cat(&[&self.q_proj.ws, &self.k_proj.ws, &self.v_proj.ws], 0);
        let q_bias = self.q_proj.bs.as_ref().expect("q bias");
        let k_bias = self.k_proj.bs.as_ref().map_or_else(|| q_bias.zeros_like(), Tensor::shallow_clone);
        let bias = Tensor::cat(&[q_bias, &k_bias, self.v_proj.bs.as_ref().expect("v bias")], 0);
        self.fused_qkv = Some((weight, bias));
    }

    /// Cross-attention: queries from `query` `[batch, q_len, hidden]`, keys and values from `context`
    /// `[batch, kv_len, hidden]`; `key_mask` `[batch, kv_len]` bool, true for keys that may be attended. A row
    /// of the batch without any valid key gets zeros (rather than SDPA's NaN).
    pub fn forward_cross(&self, query: &Tensor, context: &Tensor, key_mask: Option<&Tensor>) -> Tensor {
        let (batch, q_len, hidden) = query.size3().expect("query must be [batch, seq, hidden]");
        let kv_len = context.size()[1];
        let heads = |t: Tensor, len: i64| t.view([batch, len, self.num_heads, self.head_dim]).transpose(1, 2);
        let q = heads(query.apply(&self.q_proj), q_len);
        let k = heads(context.apply(&self.k_proj), kv_len);
        let v = heads(context.apply(&self.v_proj), kv_len);
        let (mask, any_valid) = match key_mask {
            Some(m) => {
                let any = m.any_dim(1, true); // [batch, 1]
                (Some(m.logical_or(&any.logical_not()).view([batch, 1, 1, kv_len])), Some(any))
            }
            None => (None, None),
        };
        let ys = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, false, None, false);
        let ys = ys.transpose(1, 2).reshape([batch, q_len, hidden]).apply(&self.out_proj);
        match any_valid {
            Some(any) => ys * any.unsqueeze(-1).to_kind(query.kind()),
            None => ys,
        }
    }

    /// `xs`: `[batch, seq, hidden]`. `mask`: boolean, broadcastable to `[batch, heads, seq, seq]`, true where a
    /// query may attend a key. `causal`: add the lower-triangular mask (CLIP's text tower).
    pub fn forward(&self, xs: &Tensor, mask: Option<&Tensor>, causal: bool) -> Tensor {
        let (batch, seq, hidden) = xs.size3().expect("attention input must be [batch, seq, hidden]");
        let split = |t: Tensor| t.view([batch, seq, self.num_heads, self.head_dim]).transpose(1, 2);
        let (q, k, v) = match &self.fused_qkv {
            Some((w, b)) => {
                // [batch, seq, 3, heads, head_dim] -> 3 x [batch, heads, seq, head_dim]
                let qkv = xs.linear(w, Some(b)).view([batch, seq, 3, self.num_heads, self.head_dim]);
                let qkv = qkv.permute([2, 0, 3, 1, 4]);
                (qkv.get(0), qkv.get(1), qkv.get(2))
            }
            None => (split(xs.apply(&self.q_proj)), split(xs.apply(&self.k_proj)), split(xs.apply(&self.v_proj))),
        };
        let (q, v) = match &self.lora {
            Some((lora_q, lora_v)) => (q + split(lora_q.delta(xs)), v + split(lora_v.delta(xs))),
            None => (q, v),
        };
        // SDPA takes either a mask or is_causal: with both, fold the causal triangle into the mask.
        let (mask, causal) = match (mask, causal) {
            (Some(mask), true) => {
                let tril = Tensor::ones([seq, seq], (tch::Kind::Bool, xs.device())).tril(0);
                (Some(mask.logical_and(&tril)), false)
            }
            (mask, causal) => (mask.map(Tensor::shallow_clone), causal),
        };
        let ys = Tensor::scaled_dot_product_attention(&q, &k, &v, mask, 0.0, causal, None, false);
        // [batch, heads, seq, head_dim] -> [batch, seq, hidden]
        ys.transpose(1, 2).reshape([batch, seq, hidden]).apply(&self.out_proj)
    }
}
