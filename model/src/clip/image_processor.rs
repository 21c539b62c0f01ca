//! `CLIPImageProcessor`: resize the shortest side (bicubic), centre crop, rescale to [0, 1], normalise with the
//! checkpoint's `image_mean` / `image_std`, read from `preprocessor_config.json`.

use std::path::Path;

use image::{DynamicImage, RgbImage, imageops::FilterType};

/// The largest image side `open` decodes.
pub const MAX_SIDE: u32 = 16_384;
/// The most elongated image `open` accepts (long side : short side).
pub const MAX_ASPECT: u32 = 64;
use serde::Deserialize;
use tch::{Kind, Tensor};

use crate::error::{ModelError, Result};

/// OpenAI CLIP's normalisation constants (`OPENAI_CLIP_MEAN`, `OPENAI_CLIP_STD`).
pub const OPENAI_CLIP_MEAN: [f64; 3] = [0.48145466, 0.4578275, 0.40821073];
pub const OPENAI_CLIP_STD: [f64; 3] = [0.26862954, 0.26130258, 0.27577711];

#[derive(Debug, Clone, PartialEq)]
pub struct ClipImageProcessor {
    pub shortest_edge: u32,
    pub crop_height: u32,
    pub crop_width: u32,
    pub rescale_factor: f64,
    pub image_mean: [f64; 3],
    pub image_std: [f64; 3],
}

#[derive(Deserialize)]
#[serde(untagged)]
enum SizeField {
    Int(u32),
    Map { shortest_edge: Option<u32>, height: Option<u32>, width: Option<u32> },
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct RawProcessorConfig {
    size: Option<SizeField>,
    crop_size: Option<SizeField>,
    rescale_factor: Option<f64>,
    image_mean: Option<Vec<f64>>,
    image_std: Option<Vec<f64>>,
    resample: Option<u32>,
}

impl ClipImageProcessor {
    /// The processor of the OpenAI checkpoints for a given input resolution.
    pub fn openai(image_size: u32) -> Self {
        Self {
            shortest_edge: image_size,
            crop_height: image_size,
            crop_width: image_size,
            rescale_factor: 1.0 / 255.0,
            image_mean: OPENAI_CLIP_MEAN,
            image_std: OPENAI_CLIP_STD,
        }
    }

    /// The published DINOv2 checkpoints' processor (a `BitImageProcessor`): shortest side 256, centre crop 224,
    /// ImageNet's mean and std.
    pub fn imagenet() -> Self {
        Self {
            shortest_edge: 256,
            crop_height: 224,
            crop_width: 224,
            rescale_factor: 1.0 / 255.0,
            image_mean: [0.485, 0.456, 0.406],
            image_std: [0.229, 0.224, 0.225],
        }
    }

    /// Reads `dir/preprocessor_config.json`, or uses OpenAI's settings at `image_size` when it is absent.
    pub fn from_dir(dir: &Path, image_size: u32) -> Result<Self> {
        Self::from_dir_or(dir, Self::openai(image_size))
    }

    /// Reads `dir/preprocessor_config.json` (a CLIP or Bit image processor: the same steps), its absent fields
    /// (or the whole file) taken from `defaults`.
    pub fn from_dir_or(dir: &Path, defaults: Self) -> Result<Self> {
        let path = dir.join("preprocessor_config.json");
        let mut p = defaults;
        if !path.is_file() {
            return Ok(p);
        }
        let raw: RawProcessorConfig = crate::hf::read_json(&path)?;
        match raw.size {
            Some(SizeField::Int(s)) | Some(SizeField::Map { shortest_edge: Some(s), .. }) => p.shortest_edge = s,
            Some(SizeField::Map { .. }) => {
                return Err(ModelError::config(&path, "size", "expected an integer or {\"shortest_edge\": N}"));
            }
            None => {}
        }
        match raw.crop_size {
            Some(SizeField::Int(s)) => (p.crop_height, p.crop_width) = (s, s),
            Some(SizeField::Map { height: Some(h), width: Some(w), .. }) => (p.crop_height, p.crop_width) = (h, w),
            Some(SizeField::Map { .. }) => {
                return Err(ModelError::config(
                    &path,
                    "crop_size",
                    "expected an integer or {\"height\": H, \"width\": W}",
                ));
            }
            None => {}
        }
        if let Some(r) = raw.resample
            && r != 3
        {
            return Err(ModelError::config(&path, "resample", format!("{r} is not supported (only 3, bicubic)")));
        }
        p.rescale_factor = raw.rescale_factor.unwrap_or(p.rescale_factor);
        for (field, src, dst) in
            [("image_mean", raw.image_mean, &mut p.image_mean), ("image_std", raw.image_std, &mut p.image_std)]
        {
            if let Some(v) = src {
                *dst = v.try_into().map_err(|v: Vec<f64>| {
                    ModelError::config(&path, field, format!("expected 3 values, got {}", v.len()))
                })?;
            }
        }
        Ok(p)
    }

    /// Opens and decodes an image file. Never allocates what a hostile file declares: sides above
    /// [`MAX_SIDE`] and aspect ratios above [`MAX_ASPECT`]:1 (resizing a 1x65535 strip's short side to 224
    /// would take ~10 GB) are refused, naming the file.
    pub fn open(path: &Path) -> Result<DynamicImage> {
        let bad = |reason: String| ModelError::BadImage { path: path.to_path_buf(), reason };
        let reader = || -> Result<image::ImageReader<std::io::BufReader<std::fs::File>>> {
            image::ImageReader::open(path)
                .map_err(|e| ModelError::io(path, e))?
                .with_guessed_format()
                .map_err(|e| ModelError::io(path, e))
        };
        // The header's size first (nothing decoded), then the decode under limits.
        let (w, h) = reader()?.into_dimensions().map_err(|e| bad(e.to_string()))?;
        let (short, long) = (w.min(h), w.max(h));
        if short == 0 || long > MAX_ASPECT * short {
            return Err(bad(format!(
                "{w}x{h} pixels: an aspect ratio beyond {MAX_ASPECT}:1 is not a face image (resizing its short side \
                 to the encoder's size would take {} MB)",
                224u64 * 224 * 3 * long as u64 / short.max(1) as u64 / 1_000_000
            )));
        }
        if long > MAX_SIDE {
            return Err(bad(format!("{w}x{h} pixels: a side above {MAX_SIDE} is not a face image")));
        }
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(MAX_SIDE);
        limits.max_image_height = Some(MAX_SIDE);
        limits.max_alloc = Some(1 << 30);
        let mut reader = reader()?;
        reader.limits(limits);
        reader.decode().map_err(|e| bad(e.to_string()))
    }

    /// Resize so the shortest side is `shortest_edge` (the other side truncated, as HF does), then centre crop.
    pub fn resize_and_crop(&self, image: &DynamicImage) -> RgbImage {
        let rgb = image.to_rgb8();
        let (w, h) = rgb.dimensions();
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_long = (self.shortest_edge as u64 * long as u64 / short.max(1) as u64) as u32;
        let (new_w, new_h) = if w <= h { (self.shortest_edge, new_long) } else { (new_long, self.shortest_edge) };
        // Catmull-Rom is PIL's bicubic (a = -0.5, support widened when downscaling); PIL rounds through a uint8
        // intermediate with fixed-point weights, so a pixel can differ from HF's by one 8-bit level.
        let resized = if (new_w, new_h) == (w, h) {
            rgb
        } else {
            image::imageops::resize(&rgb, new_w, new_h, FilterType::CatmullRom)
        };
        let top = new_h.saturating_sub(self.crop_height) / 2;
        let left = new_w.saturating_sub(self.crop_width) / 2;
        image::imageops::crop_imm(&resized, left, top, self.crop_width.min(new_w), self.crop_height.min(new_h))
            .to_image()
    }

    /// `pixel_values` `[batch, 3, crop_height, crop_width]` f32.
    pub fn preprocess(&self, images: &[DynamicImage]) -> Tensor {
        let crops: Vec<Tensor> = images.iter().map(|im| self.to_tensor(&self.resize_and_crop(im))).collect();
        Tensor::stack(&crops, 0)
    }

    /// The same preprocessing on a batch of uint8 images `[n, 3, H, W]` on any device (the training path):
    /// antialiased bicubic resize of the shortest side (PIL's kernel, in floating point), centre crop, rescale
    /// and normalise. Returns f32 `[n, 3, crop_height, crop_width]`.
    pub fn preprocess_tensor(&self, images: &Tensor) -> Tensor {
        let size = images.size();
        let (h, w) = (size[2], size[3]);
        let (short, long) = if w <= h { (w, h) } else { (h, w) };
        let new_long = self.shortest_edge as i64 * long / short.max(1);
        let (new_h, new_w) =
            if w <= h { (new_long, self.shortest_edge as i64) } else { (self.shortest_edge as i64, new_long) };
        let mut xs = images.to_kind(Kind::Float) * self.rescale_factor;
        if (new_h, new_w) != (h, w) {
            // PIL clips the resized 8-bit values; bicubic overshoot is clipped the same way here (not rounded:
            // the values stay continuous, within a level of PIL's).
            xs = xs
                .internal_upsample_bicubic2d_aa([new_h, new_w], false, None, None)
                .clamp(0.0, 255.0 * self.rescale_factor);
        }
        let (ch, cw) = (self.crop_height as i64, self.crop_width as i64);
        let xs = xs.narrow(2, (new_h - ch).max(0) / 2, ch.min(new_h)).narrow(3, (new_w - cw).max(0) / 2, cw.min(new_w));
        let device = xs.device();
        let mean = Tensor::from_slice(&self.image_mean).to_kind(Kind::Float).to_device(device).view([1, 3, 1, 1]);
        let std = Tensor::from_slice(&self.image_std).to_kind(Kind::Float).to_device(device).view([1, 3, 1, 1]);
        (xs - mean) / std
    }

    /// An RGB image (already at crop size) -> normalised `[3, h, w]`.
    pub fn to_tensor(&self, rgb: &RgbImage) -> Tensor {
        let (w, h) = rgb.dimensions();
        let hwc = Tensor::from_slice(rgb.as_raw()).view([h as i64, w as i64, 3]);
        let mean = Tensor::from_slice(&self.image_mean).view([3, 1, 1]);
        let std = Tensor::from_slice(&self.image_std).view([3, 1, 1]);
        ((hwc.permute([2, 0, 1]).to_kind(Kind::Double) * self.rescale_factor - mean) / std).to_kind(Kind::Float)
    }
}
