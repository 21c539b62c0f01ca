//! `worker embed`: runs the frozen encoders on a user's files and writes the embeddings to one safetensors
//! file: how a user checks that their checkpoints load and what they produce.
//!
//! Output tensors (f32): `image_embeds` `[images, projection_dim]`, `text_embeds` `[8, projection_dim]` for the
//! class prompts (when the CLIP directory has `tokenizer.json`), and per audio file `k`
//! `audio.k.last_hidden_state` `[frames, hidden]` and `audio.k.hidden_states` `[layers + 1, frames, hidden]`.
//! The metadata records the input files and prompts. The file is written atomically.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use avexpr_data::Expression;
use avexpr_model::EncoderOptions;
use avexpr_model::clip::{ClipConfig, ClipImageProcessor, ClipTextEncoder, ClipVisionEncoder};
use avexpr_model::prompt::class_prompts;
use avexpr_model::wav2vec2::Wav2Vec2Encoder;
use tch::{Kind, Tensor};

/// The paper's prompt template; `{}` is replaced by the lower-case class name.
pub const DEFAULT_TEMPLATE: &str = "A face expressing {}";

#[derive(Debug, Clone)]
pub struct EmbedRequest {
    pub clip: Option<PathBuf>,
    pub wav2vec2: Option<PathBuf>,
    pub images: Vec<PathBuf>,
    pub audio: Vec<PathBuf>,
    pub template: String,
    pub options: EncoderOptions,
    pub out: PathBuf,
}

/// What was written, for the summary and for tests.
#[derive(Debug, Default)]
pub struct EmbedSummary {
    pub tensors: Vec<(String, Vec<i64>)>,
    /// For each image, the class whose prompt embedding is the most similar (cosine), and that similarity.
    pub nearest_prompt: Vec<(PathBuf, Expression, f64)>,
    pub lines: Vec<String>,
}

pub fn run(req: &EmbedRequest) -> Result<EmbedSummary> {
    anyhow::ensure!(
        req.clip.is_some() || req.wav2vec2.is_some(),
        "nothing to do: give --clip DIR and/or --wav2vec2 DIR"
    );
    anyhow::ensure!(req.template.contains("{}"), "--template `{}` must contain {{}} for the class name", req.template);
    anyhow::ensure!(req.images.is_empty() || req.clip.is_some(), "--images need a CLIP checkpoint (--clip DIR)");
    anyhow::ensure!(
        req.audio.is_empty() || req.wav2vec2.is_some(),
        "--audio needs a Wav2Vec 2.0 checkpoint (--wav2vec2 DIR)"
    );
    let mut out: Vec<(String, Tensor)> = Vec::new();
    let mut summary = EmbedSummary::default();
    let mut metadata = HashMap::new();

    if let Some(dir) = &req.clip {
        let mut image_embeds = None;
        if !req.images.is_empty() {
            let vision = ClipVisionEncoder::load(dir, req.options)?;
            tracing::info!(checkpoint = %dir.display(), images = req.images.len(), "CLIP vision tower loaded");
            let images = req.images.iter().map(|p| ClipImageProcessor::open(p)).collect::<Result<Vec<_>, _>>()?;
            let embeds = vision.encode_images(&images).to_device(tch::Device::Cpu);
            metadata.insert("images".into(), serde_json::to_string(&req.images)?);
            image_embeds = Some(embeds.shallow_clone());
            out.push(("image_embeds".into(), embeds));
        }
        let has_text_tower = ClipConfig::from_file(&dir.join("config.json"))?.text.is_some();
        let text = if has_text_tower { Some(ClipTextEncoder::load(dir, req.options)?) } else { None };
        if let Some(text) = text.as_ref().filter(|t| t.tokenizer.is_some()) {
            let prompts = class_prompts(&req.template);
            let text_embeds =
                text.encode_texts(&prompts.iter().map(String::as_str).collect::<Vec<_>>())?.to_device(tch::Device::Cpu);
            tracing::info!(prompts = prompts.len(), "class prompts encoded");
            if let Some(images) = &image_embeds {
                // Cosine similarity [images, 8].
                let sim = normalize(images).matmul(&normalize(&text_embeds).tr());
                let (best, idx) = sim.max_dim(1, false);
                for (k, path) in req.images.iter().enumerate() {
                    let class = Expression::ALL[idx.int64_value(&[k as i64]) as usize];
                    summary.nearest_prompt.push((path.clone(), class, best.double_value(&[k as i64])));
                }
            }
            metadata.insert("prompts".into(), serde_json::to_string(&prompts)?);
            out.push(("text_embeds".into(), text_embeds));
        } else if has_text_tower {
            tracing::warn!(checkpoint = %dir.display(), "no tokenizer.json: class prompt embeddings skipped");
        } else {
            tracing::warn!(checkpoint = %dir.display(), "vision-only checkpoint: class prompt embeddings skipped");
        }
    }

    if let Some(dir) = &req.wav2vec2 {
        let audio = Wav2Vec2Encoder::load(dir, req.options)?;
        tracing::info!(checkpoint = %dir.display(), files = req.audio.len(), "Wav2Vec 2.0 loaded");
        for (k, path) in req.audio.iter().enumerate() {
            let wave = audio.feature_extractor.read_wav(path)?;
            let min = audio.config.conv_kernel.iter().copied().max().unwrap_or(0) as usize;
            anyhow::ensure!(
                wave.len() >= min,
                "{}: only {} samples, too short for the encoder",
                path.display(),
                wave.len()
            );
            let result = audio.encode_waveforms(&[&wave]);
            let hidden = Tensor::stack(&result.hidden_states, 0).squeeze_dim(1).to_device(tch::Device::Cpu);
            summary.lines.push(format!(
                "audio.{k}: {} ({:.2} s) -> {} frames x {} hidden, {} hidden states",
                path.display(),
                wave.len() as f64 / audio.feature_extractor.sampling_rate as f64,
                hidden.size()[1],
                hidden.size()[2],
                hidden.size()[0]
            ));
            out.push((
                format!("audio.{k}.last_hidden_state"),
                result.last_hidden_state.squeeze_dim(0).to_device(tch::Device::Cpu),
            ));
            out.push((format!("audio.{k}.hidden_states"), hidden));
        }
        metadata.insert("audio".into(), serde_json::to_string(&req.audio)?);
    }

    summary.tensors = out.iter().map(|(n, t)| (n.clone(), t.size())).collect();
    write_safetensors(&req.out, &out, metadata)?;
    tracing::info!(out = %req.out.display(), tensors = out.len(), "embeddings written");
    Ok(summary)
}

fn normalize(xs: &Tensor) -> Tensor {
    xs / xs.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-12)
}

/// Writes f32 tensors with metadata to `path` through a temporary file and a rename, so an existing file is
/// replaced only by a complete one.
pub fn write_safetensors(path: &Path, tensors: &[(String, Tensor)], metadata: HashMap<String, String>) -> Result<()> {
    let buffers: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, t)| {
            let t = t.to_kind(Kind::Float).contiguous();
            let values = Vec::<f32>::try_from(t.flatten(0, -1))?;
            let shape = t.size().iter().map(|&d| d as usize).collect();
            Ok((name.clone(), shape, values.iter().flat_map(|v| v.to_le_bytes()).collect()))
        })
        .collect::<Result<_>>()?;
    let views = buffers
        .iter()
        .map(|(name, shape, bytes)| {
            Ok((name.as_str(), safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)?))
        })
        .collect::<Result<Vec<_>>>()?;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).with_context(|| format!("{}: cannot create directory", dir.display()))?;
    avexpr_data::files::replace_with(path, |tmp| {
        safetensors::serialize_to_file(views, Some(metadata), tmp).map_err(|e| anyhow::anyhow!("{e}"))
    })
    .with_context(|| format!("{}: cannot write", path.display()))
}
