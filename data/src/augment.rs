//! Train-time augmentation of a clip's faces, drawn once per clip and applied to every frame alike (a face
//! track should not jump between frames): random resized crop (torchvision's RandomResizedCrop, bilinear with
//! antialiasing), horizontal flip, and colour jitter as torchvision's ColorJitter on PIL images (PIL's
//! ImageEnhance) with brightness, contrast and saturation in that fixed order and no hue. The output is CHW
//! uint8, what the loader's batches hold.

use fast_image_resize::{FilterType, ResizeAlg, ResizeOptions, Resizer};
use image::RgbImage;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Train-time augmentation settings (`data.augment`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AugmentConfig {
    /// Random resized crop: share of the face's area kept, range.
    pub scale: [f32; 2],
    /// Random resized crop: aspect ratio (width / height) range.
    pub ratio: [f32; 2],
    /// Probability of a horizontal flip.
    pub flip: f32,
    /// Colour jitter: factors drawn from [1 - x, 1 + x].
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
}

impl Default for AugmentConfig {
    fn default() -> Self {
        Self { scale: [0.8, 1.0], ratio: [0.75, 4.0 / 3.0], flip: 0.5, brightness: 0.3, contrast: 0.3, saturation: 0.3 }
    }
}

/// One clip's augmentation: a crop (as fractions of the face), a flip and colour factors.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// x, y, width, height.
    pub crop: [f32; 4],
    pub flip: bool,
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
}

impl Augmentation {
    /// As torchvision's RandomResizedCrop (10 tries, then the whole face) and ColorJitter, on a unit square.
    pub fn draw(cfg: &AugmentConfig, rng: &mut ChaCha8Rng) -> Augmentation {
        let mut crop = [0.0, 0.0, 1.0, 1.0];
        let (lr0, lr1) = (cfg.ratio[0].ln(), cfg.ratio[1].ln());
        for _ in 0..10 {
            let area = rng.random_range(cfg.scale[0]..=cfg.scale[1]);
            let ratio = rng.random_range(lr0..=lr1).exp();
            let (w, h) = ((area * ratio).sqrt(), (area / ratio).sqrt());
            if w <= 1.0 && h <= 1.0 {
                crop = [rng.random_range(0.0..=1.0 - w), rng.random_range(0.0..=1.0 - h), w, h];
                break;
            }
        }
        let mut factor = |x: f32| if x > 0.0 { rng.random_range(1.0 - x..=1.0 + x) } else { 1.0 };
        let (brightness, contrast, saturation) = (factor(cfg.brightness), factor(cfg.contrast), factor(cfg.saturation));
        Augmentation { crop, flip: rng.random::<f32>() < cfg.flip, brightness, contrast, saturation }
    }

    /// Crop and resize (one bilinear pass, sub-pixel crop box), then flip and jitter while writing CHW.
    pub fn apply(&self, image: &RgbImage, size: u32, resizer: &mut Resizer, out: &mut [u8]) {
        let (w, h) = (image.width() as f64, image.height() as f64);
        let [x, y, cw, ch] = self.crop.map(f64::from);
        let mut resized = RgbImage::new(size, size);
        let options = bilinear().crop(x * w, y * h, cw * w, ch * h);
        resizer.resize(image, &mut resized, &options).expect("same pixel type");
        to_chw(&resized, self.flip, Some((self.brightness, self.contrast, self.saturation)), out);
    }
}

pub fn bilinear() -> ResizeOptions {
    ResizeOptions::new().resize_alg(ResizeAlg::Convolution(FilterType::Bilinear))
}

/// PIL's `convert("L")`: ITU-R 601-2 luma in 16-bit fixed point.
fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// PIL's `Image.blend(degenerate, image, factor)` on one 8-bit value: computed in f32, clipped to 0..=255,
/// truncated (which is what Rust's saturating float-to-int cast does).
fn blend(degenerate: f32, value: f32, factor: f32) -> u8 {
    (degenerate + factor * (value - degenerate)) as u8
}

/// Brightness then contrast: each acts on a channel value alone, so together they are one table.
fn brightness_contrast_table(pixels: &[u8], brightness: f32, contrast: f32) -> [u8; 256] {
    let bright: [u8; 256] = std::array::from_fn(|v| blend(0.0, v as f32, brightness));
    // ImageEnhance.Contrast: the mean of the brightened image's luma, rounded to an integer grey.
    let total: u64 = pixels
        .chunks_exact(3)
        .map(|p| luma(bright[p[0] as usize], bright[p[1] as usize], bright[p[2] as usize]) as u64)
        .sum();
    let mean = (total as f64 / (pixels.len() / 3).max(1) as f64 + 0.5).floor() as f32;
    bright.map(|b| blend(mean, b as f32, contrast))
}

/// ColorJitter's brightness, contrast and saturation factors applied to an RGB image exactly as PIL's
/// ImageEnhance does (what torchvision runs on PIL images).
pub fn color_jitter(image: &RgbImage, brightness: f32, contrast: f32, saturation: f32) -> RgbImage {
    let table = brightness_contrast_table(image.as_raw(), brightness, contrast);
    let mut out = image.clone();
    for p in out.pixels_mut() {
        let [r, g, b] = p.0.map(|c| table[c as usize]);
        let grey = luma(r, g, b) as f32;
        p.0 = [r, g, b].map(|c| blend(grey, c as f32, saturation));
    }
    out
}

/// HWC -> CHW, optionally mirrored and colour-jittered as [`color_jitter`] (same values), in two passes:
/// table lookups while transposing, then saturation on the planes.
pub fn to_chw(image: &RgbImage, flip: bool, jitter: Option<(f32, f32, f32)>, out: &mut [u8]) {
    let (w, h) = (image.width() as usize, image.height() as usize);
    let plane = w * h;
    let raw = image.as_raw();
    let (table, saturation) = match jitter {
        Some((brightness, contrast, saturation)) => (brightness_contrast_table(raw, brightness, contrast), saturation),
        None => (std::array::from_fn(|v| v as u8), 1.0),
    };
    let (r, rest) = out[..3 * plane].split_at_mut(plane);
    let (g, b) = rest.split_at_mut(plane);
    for y in 0..h {
        let row = &raw[3 * y * w..3 * (y + 1) * w];
        for x in 0..w {
            let sx = if flip { w - 1 - x } else { x };
            let i = y * w + x;
            r[i] = table[row[3 * sx] as usize];
            g[i] = table[row[3 * sx + 1] as usize];
            b[i] = table[row[3 * sx + 2] as usize];
        }
    }
    if saturation != 1.0 {
        for ((r, g), b) in r.iter_mut().zip(g.iter_mut()).zip(b.iter_mut()) {
            let grey = luma(*r, *g, *b) as f32;
            (*r, *g, *b) = (
                blend(grey, *r as f32, saturation),
                blend(grey, *g as f32, saturation),
                blend(grey, *b as f32, saturation),
            );
        }
    }
}
