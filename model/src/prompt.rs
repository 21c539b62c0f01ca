//! Label-prompt supervision: class prompts ("A face expressing {}", several templates averaged) encoded once
//! by the frozen CLIP text encoder; a trainable projection of the pooled fused representation into the CLIP
//! embedding space; CLIP's learnable temperature (initialised to ln(1/0.07), clamped at ln(100)); logits are
//! the scaled cosine similarities. Optionally (CoOp, Zhou et al. 2022) learnable context vectors replace the
//! template words and go through the frozen text encoder at every step, so they train too.

use std::rc::Rc;

use avexpr_data::Expression;
use tch::{Kind, Tensor, nn};

use crate::clip::ClipTextEncoder;
use crate::config::PromptConfig;
use crate::error::{ModelError, Result};

/// CLIP's initial logit scale, ln(1 / 0.07).
pub const LOGIT_SCALE_INIT: f64 = 2.659_260_036_932_778_5;
/// CLIP clamps the logit scale at ln(100).
pub const LOGIT_SCALE_MAX: f64 = 4.605_170_185_988_092;

/// The class prompts of a template, in label order.
pub fn class_prompts(template: &str) -> Vec<String> {
    Expression::ALL.iter().map(|e| template.replace("{}", &e.name().to_lowercase())).collect()
}

fn l2_normalize(xs: &Tensor) -> Tensor {
    xs / xs.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

#[derive(Debug)]
struct Coop {
    context: Tensor,
    input_ids: Tensor,
    attention_mask: Tensor,
    text: Rc<ClipTextEncoder>,
}

/// Where the class embeddings come from.
#[derive(Debug)]
pub enum ClassPrompts {
    /// Encode the configured templates (or CoOp prompts) with the frozen CLIP text encoder.
    Encoder(Rc<ClipTextEncoder>),
    /// Precomputed class embeddings `[8, text_dim]` (e.g. cached with a feature cache); templates only.
    Embeddings(Tensor),
    /// Create the variables only (parameter counting); `logits` must not be called.
    VariablesOnly,
}

#[derive(Debug)]
pub struct PromptHead {
    projection: nn::Linear,
    logit_scale: Tensor,
    /// `[8, text_dim]`, L2-normalised, fixed (templates mode).
    class_embeds: Option<Tensor>,
    coop: Option<Coop>,
}

impl PromptHead {
    /// `vs` is the `prompt` group; `pooled_dim` the width of the pooled fused representation; `text_dims` the
    /// text encoder's (projection, hidden) widths.
    pub fn new(
        vs: &nn::Path,
        pooled_dim: i64,
        text_dims: (i64, i64),
        cfg: &PromptConfig,
        classes: ClassPrompts,
    ) -> Result<Self> {
        let (text_dim, text_hidden) = text_dims;
        let projection = nn::linear(vs / "projection", pooled_dim, text_dim, Default::default());
        let logit_scale = vs.var("logit_scale", &[], nn::Init::Const(LOGIT_SCALE_INIT));
        let text = match classes {
            ClassPrompts::Encoder(text) => text,
            ClassPrompts::Embeddings(embeds) => {
                if cfg.context_vectors > 0 {
                    return Err(ModelError::InvalidInput(
                        "model.prompt.context_vectors needs the CLIP text encoder, not fixed class embeddings".into(),
                    ));
                }
                if embeds.size() != [Expression::ALL.len() as i64, text_dim] {
                    return Err(ModelError::InvalidInput(format!(
                        "class embeddings must be [8, {text_dim}], got {:?}",
                        embeds.size()
                    )));
                }
                let embeds = l2_normalize(&embeds.to_kind(Kind::Float).to_device(vs.device()));
                return Ok(Self { projection, logit_scale, class_embeds: Some(embeds), coop: None });
            }
            ClassPrompts::VariablesOnly => {
                if cfg.context_vectors > 0 {
                    let _context = vs.var("context", &[cfg.context_vectors, text_hidden], nn::Init::Const(0.0));
                }
                return Ok(Self { projection, logit_scale, class_embeds: None, coop: None });
            }
        };
        if cfg.context_vectors > 0 {
            let tokenizer = text.tokenizer.as_ref().ok_or_else(|| {
                ModelError::InvalidInput(
                    "model.prompt.context_vectors needs the CLIP checkpoint's tokenizer.json".into(),
                )
            })?;
            let n = cfg.context_vectors;
            let placeholder = vec!["X"; n as usize].join(" ");
            let prompts: Vec<String> =
                Expression::ALL.iter().map(|e| format!("{placeholder} {}.", e.name().to_lowercase())).collect();
            let batch = tokenizer.encode_batch(&prompts.iter().map(String::as_str).collect::<Vec<_>>())?;
            // Each placeholder must be one token, at positions 1..=n (after <|startoftext|>).
            let x_id = batch.input_ids.int64_value(&[0, 1]);
            let placeholders = batch.input_ids.narrow(1, 1, n);
            if placeholders.ne(x_id).any().int64_value(&[]) != 0 {
                return Err(ModelError::InvalidInput(
                    "the tokenizer splits the CoOp placeholder `X` unexpectedly".into(),
                ));
            }
            let device = vs.device();
            let context = vs.var("context", &[n, text_hidden], nn::Init::Randn { mean: 0.0, stdev: 0.02 });
            let coop = Coop {
                context,
                input_ids: batch.input_ids.to_device(device),
                attention_mask: batch.attention_mask.to_device(device),
                text,
            };
            Ok(Self { projection, logit_scale, class_embeds: None, coop: Some(coop) })
        } else {
            // Zero-shot ensembling as CLIP does: normalise per template, average, normalise again.
            let mut sum = Tensor::zeros([Expression::ALL.len() as i64, text_dim], (Kind::Float, vs.device()));
            for template in &cfg.templates {
                let prompts = class_prompts(template);
                let embeds = text.encode_texts(&prompts.iter().map(String::as_str).collect::<Vec<_>>())?;
                sum += l2_normalize(&embeds.to_device(vs.device()));
            }
            Ok(Self { projection, logit_scale, class_embeds: Some(l2_normalize(&sum)), coop: None })
        }
    }

    /// The class embeddings `[8, text_dim]`, normalised: fixed, or recomputed from the context vectors.
    pub fn class_embeddings(&self) -> Tensor {
        match (&self.class_embeds, &self.coop) {
            (Some(fixed), _) => fixed.shallow_clone(),
            (None, Some(coop)) => {
                let model = coop.text.model();
                let tokens = model.text_model.embed_tokens(&coop.input_ids);
                let n = coop.context.size()[0];
                let classes = tokens.size()[0];
                let context = coop.context.unsqueeze(0).expand([classes, n, -1], false).to_kind(tokens.kind());
                let embeds = Tensor::cat(
                    &[tokens.narrow(1, 0, 1), context, tokens.narrow(1, 1 + n, tokens.size()[1] - 1 - n)],
                    1,
                );
                l2_normalize(
                    &model.forward_embeds(&embeds, &coop.input_ids, Some(&coop.attention_mask)).to_kind(Kind::Float),
                )
            }
            (None, None) => panic!("PromptHead built without a text encoder has no class embeddings"),
        }
    }

    /// Scaled cosine similarities of `pooled` `[batch, pooled_dim]` to the classes: `[batch, 8]`.
    pub fn logits(&self, pooled: &Tensor) -> Tensor {
        cosine_logits(&pooled.apply(&self.projection), &self.class_embeddings(), &self.logit_scale)
    }
}

/// CLIP's logits: `exp(min(logit_scale, ln 100)) * cos(features, classes)`, `[batch, classes]`.
pub fn cosine_logits(features: &Tensor, classes: &Tensor, logit_scale: &Tensor) -> Tensor {
    let scale = logit_scale.clamp_max(LOGIT_SCALE_MAX).exp();
    l2_normalize(features).matmul(&l2_normalize(classes).tr()) * scale
}
