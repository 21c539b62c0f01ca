//! CLIP's text tower: `CLIPTextEmbeddings`, `CLIPTextTransformer` and `CLIPTextModelWithProjection` of
//! `transformers/models/clip/modeling_clip.py`. Variable paths: `text_model.*`, `text_projection.weight`.

use tch::{Kind, Tensor, nn};

use super::config::ClipTextConfig;
use super::encoder::ClipEncoder;
use crate::activation::Activation;

#[derive(Debug)]
pub struct ClipTextTransformer {
    token_embedding: nn::Embedding,
    position_embedding: nn::Embedding,
    encoder: ClipEncoder,
    final_layer_norm: nn::LayerNorm,
    eos_token_id: Option<i64>,
}

impl ClipTextTransformer {
    /// `vs` is the `text_model` path.
    pub fn new(vs: nn::Path, cfg: &ClipTextConfig, activation: Activation) -> Self {
        let emb = &vs / "embeddings";
        Self {
            token_embedding: nn::embedding(
                &emb / "token_embedding",
                cfg.vocab_size,
                cfg.hidden_size,
                Default::default(),
            ),
            position_embedding: nn::embedding(
                &emb / "position_embedding",
                cfg.max_position_embeddings,
                cfg.hidden_size,
                Default::default(),
            ),
            encoder: ClipEncoder::new(
                &vs / "encoder",
                cfg.hidden_size,
                cfg.intermediate_size,
                cfg.num_attention_heads,
                cfg.num_hidden_layers,
                cfg.layer_norm_eps,
                activation,
            ),
            final_layer_norm: nn::layer_norm(
                &vs / "final_layer_norm",
                vec![cfg.hidden_size],
                nn::LayerNormConfig { eps: cfg.layer_norm_eps, ..Default::default() },
            ),
            eos_token_id: cfg.eos_token_id,
        }
    }

    /// The token embeddings of `input_ids` `[batch, seq]` -> `[batch, seq, hidden]`; prompt learning replaces
    /// some of them before [`ClipTextTransformer::forward_embeds`].
    pub fn embed_tokens(&self, input_ids: &Tensor) -> Tensor {
        input_ids.apply(&self.token_embedding)
    }

    /// Returns `(last_hidden_state [batch, seq, hidden], pooled [batch, hidden])`.
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> (Tensor, Tensor) {
        self.forward_embeds(&self.embed_tokens(input_ids), input_ids, attention_mask)
    }

    /// Like `forward` from given token embeddings; `input_ids` still decides where the EOS token is pooled.
    pub fn forward_embeds(
        &self,
        token_embeds: &Tensor,
        input_ids: &Tensor,
        attention_mask: Option<&Tensor>,
    ) -> (Tensor, Tensor) {
        let seq = input_ids.size()[1];
        let xs = token_embeds + self.position_embedding.ws.narrow(0, 0, seq);
        // [batch, seq] -> [batch, 1, 1, seq]: padded keys are masked, on top of the causal mask.
        let mask = attention_mask.map(|m| m.to_kind(Kind::Bool).unsqueeze(1).unsqueeze(1));
        let last_hidden_state = self.encoder.forward(&xs, mask.as_ref(), true).apply(&self.final_layer_norm);
        let eos_position = match self.eos_token_id {
            // Checkpoints from before transformers PR #24773 say eos_token_id = 2 and pool at the largest id.
            Some(eos) if eos != 2 => input_ids.eq(eos).to_kind(Kind::Int).argmax(-1, false),
            _ => input_ids.to_kind(Kind::Int).argmax(-1, false),
        };
        let batch = Tensor::arange(input_ids.size()[0], (Kind::Int64, input_ids.device()));
        let pooled = last_hidden_state.index(&[Some(batch), Some(eos_position)]);
        (last_hidden_state, pooled)
    }

    pub(crate) fn fuse_qkv(&mut self) {
        self.encoder.fuse_qkv();
    }
}

/// `CLIPTextModelWithProjection`: the tower plus `text_projection` (no bias).
#[derive(Debug)]
pub struct ClipTextModelWithProjection {
    pub text_model: ClipTextTransformer,
    text_projection: nn::Linear,
}

impl ClipTextModelWithProjection {
    /// `vs` is the checkpoint root (holding `text_model` and `text_projection`).
    pub fn new(vs: &nn::Path, cfg: &ClipTextConfig, activation: Activation) -> Self {
        Self {
            text_model: ClipTextTransformer::new(vs / "text_model", cfg, activation),
            text_projection: nn::linear(
                vs / "text_projection",
                cfg.hidden_size,
                cfg.projection_dim,
                nn::LinearConfig { bias: false, ..Default::default() },
            ),
        }
    }

    pub fn fuse_qkv(&mut self) {
        self.text_model.fuse_qkv();
    }

    /// `text_embeds` `[batch, projection_dim]` (not normalised, as `get_text_features`).
    pub fn forward(&self, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        self.text_model.forward(input_ids, attention_mask).1.apply(&self.text_projection)
    }

    /// `text_embeds` from token embeddings (see [`ClipTextTransformer::forward_embeds`]).
    pub fn forward_embeds(&self, token_embeds: &Tensor, input_ids: &Tensor, attention_mask: Option<&Tensor>) -> Tensor {
        self.text_model.forward_embeds(token_embeds, input_ids, attention_mask).1.apply(&self.text_projection)
    }
}
