//! Augmentation against its references: colour jitter equals PIL's ImageEnhance (torchvision's ColorJitter on
//! PIL images) exactly; flip and jitter on the CHW path equal the image-level functions; crops stay inside the
//! face and follow the configured ranges; the same seed draws the same augmentation.

use avexpr_data::augment::{AugmentConfig, Augmentation, color_jitter, to_chw};
use image::RgbImage;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Smooth gradients plus noise, so that every table entry and blend path is exercised.
fn image(seed: u64, w: u32, h: u32) -> RgbImage {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    RgbImage::from_fn(w, h, |x, y| {
        let n = rng.random_range(0..60) as u32;
        image::Rgb([
            ((x * 255 / w + n) % 256) as u8,
            ((y * 255 / h + 2 * n) % 256) as u8,
            ((x + y + 3 * n) % 256) as u8,
        ])
    })
}

#[test]
fn color_jitter_equals_pil_image_enhance() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<(u64, [f32; 3])> = vec![
        (1, [1.0, 1.0, 1.0]),
        (2, [0.7, 1.3, 0.7]),
        (3, [1.3, 0.7, 1.3]),
        (4, [1.25, 1.2, 0.0]),
        (5, [0.6, 1.4, 1.4]),
        (6, [1.4, 0.6, 0.6]),
    ];
    let mut script = String::from("from PIL import Image, ImageEnhance\nimport sys\n");
    for (seed, [b, c, s]) in &cases {
        let path = tmp.path().join(format!("{seed}.png"));
        image(*seed, 64, 48).save(&path).unwrap();
        script += &format!(
            "im = Image.open('{p}').convert('RGB')\n\
             im = ImageEnhance.Brightness(im).enhance({b})\n\
             im = ImageEnhance.Contrast(im).enhance({c})\n\
             im = ImageEnhance.Color(im).enhance({s})\n\
             im.save('{p}.pil.png')\n",
            p = path.display()
        );
    }
    let python = std::env::var("AVEXPR_PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python).args(["-c", &script]).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for (seed, [b, c, s]) in &cases {
        let ours = color_jitter(&image(*seed, 64, 48), *b, *c, *s);
        let pil = image::open(tmp.path().join(format!("{seed}.png.pil.png"))).unwrap().into_rgb8();
        let differ = ours.as_raw().iter().zip(pil.as_raw()).filter(|(a, b)| a != b).count();
        assert_eq!(differ, 0, "seed {seed}, factors {b} {c} {s}: {differ} values differ from PIL");
    }
}

#[test]
fn the_chw_path_flips_and_jitters_like_the_image_functions() {
    let img = image(9, 40, 30);
    let mut out = vec![0u8; 3 * 40 * 30];
    to_chw(&img, true, Some((1.2, 0.8, 1.3)), &mut out);
    let mut want = color_jitter(&img, 1.2, 0.8, 1.3);
    image::imageops::flip_horizontal_in_place(&mut want);
    for (i, p) in want.pixels().enumerate() {
        for c in 0..3 {
            assert_eq!(out[c * 1200 + i], p.0[c], "pixel {i} channel {c}");
        }
    }
    to_chw(&img, false, None, &mut out);
    assert_eq!(out[1200 + 41], img.get_pixel(1, 1).0[1], "plain transpose");
}

#[test]
fn draws_follow_the_configured_ranges_and_the_seed() {
    let cfg = AugmentConfig::default();
    let mut flips = 0;
    for seed in 0..400 {
        let a = Augmentation::draw(&cfg, &mut ChaCha8Rng::seed_from_u64(seed));
        assert_eq!(a, Augmentation::draw(&cfg, &mut ChaCha8Rng::seed_from_u64(seed)));
        let [x, y, w, h] = a.crop;
        assert!(x >= 0.0 && y >= 0.0 && x + w <= 1.0 + 1e-6 && y + h <= 1.0 + 1e-6, "{a:?}");
        let area = w * h;
        assert!(area >= cfg.scale[0] - 1e-4 && area <= cfg.scale[1] + 1e-4, "{a:?}");
        assert!(w / h >= cfg.ratio[0] - 1e-4 && w / h <= cfg.ratio[1] + 1e-4 || area == 1.0, "{a:?}");
        for f in [a.brightness, a.contrast, a.saturation] {
            assert!((0.7..=1.3).contains(&f), "{a:?}");
        }
        flips += a.flip as usize;
    }
    assert!((150..250).contains(&flips), "{flips} flips in 400 draws at p = 0.5");
    let off = AugmentConfig { flip: 0.0, brightness: 0.0, contrast: 0.0, saturation: 0.0, ..cfg };
    let a = Augmentation::draw(&off, &mut ChaCha8Rng::seed_from_u64(1));
    assert!(!a.flip && (a.brightness, a.contrast, a.saturation) == (1.0, 1.0, 1.0));
}
