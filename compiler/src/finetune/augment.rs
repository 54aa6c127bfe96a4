//! Augment: seeded random variations of training images for fine-tuning.
//!
//! Each training image is shown differently every epoch: a random resized crop (a random part of
//! the image, of a random area and aspect ratio, resized to the input size), a horizontal flip
//! half of the time, and a small brightness / contrast / saturation jitter. The randomness of one
//! image in one epoch depends only on the seed, the epoch and the image's position, so results do
//! not depend on thread scheduling. Validation and calibration images are never augmented: they
//! go through the artifact's own [`Preprocessing`].

use graft_runtime::preprocess::{Preprocessing, ResizeFilter};
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};

use crate::util::rng::Rng;

/// Ranges of the random changes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augmentation {
    /// Fraction of the image area the crop covers, `(min, max)`.
    pub area: (f32, f32),
    /// Aspect ratio (width / height) of the crop, `(min, max)`.
    pub aspect: (f32, f32),
    /// Flip horizontally half of the time.
    pub flip: bool,
    /// Brightness, contrast and saturation factors are drawn from `1 ± jitter`.
    pub jitter: f32,
}

impl Default for Augmentation {
    /// Crops of 35-100 % of the area (milder than ImageNet training's 8 %: small datasets have
    /// their subject off-centre less often), 3:4 to 4:3, flips, ±20 % colour jitter.
    fn default() -> Self {
        Augmentation {
            area: (0.35, 1.0),
            aspect: (0.75, 4.0 / 3.0),
            flip: true,
            jitter: 0.2,
        }
    }
}

impl Augmentation {
    /// The input tensor (as [`Preprocessing::apply`] makes it) of a random variation of `image`.
    /// `stream` identifies the image and epoch: the same stream gives the same variation.
    pub fn apply(
        &self,
        image: &DynamicImage,
        preprocessing: &Preprocessing,
        seed: u64,
        stream: u64,
    ) -> Vec<f32> {
        let mut rng = Rng::new(seed ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15), "augment");
        let rgb = image.to_rgb8();
        let (w, h) = rgb.dimensions();
        let (x, y, cw, ch) = self.crop_box(w, h, &mut rng);
        let cropped = image::imageops::crop_imm(&rgb, x, y, cw, ch).to_image();
        let [out_h, out_w] = preprocessing.crop;
        let filter = match preprocessing.filter {
            ResizeFilter::Nearest => FilterType::Nearest,
            ResizeFilter::Bilinear => FilterType::Triangle,
            ResizeFilter::Bicubic => FilterType::CatmullRom,
        };
        let mut resized = image::imageops::resize(&cropped, out_w, out_h, filter);
        if self.flip && rng.next_f32() < 0.5 {
            image::imageops::flip_horizontal_in_place(&mut resized);
        }
        self.jitter_colours(&mut resized, &mut rng);
        let exact = Preprocessing {
            resize_shorter: out_h.min(out_w),
            ..preprocessing.clone()
        };
        exact.apply(&DynamicImage::ImageRgb8(resized))
    }

    /// `(left, top, width, height)` of a random crop of a `w x h` image; the centred square when
    /// ten draws do not fit.
    fn crop_box(&self, w: u32, h: u32, rng: &mut Rng) -> (u32, u32, u32, u32) {
        let area = (w * h) as f32;
        let uniform = |rng: &mut Rng, (lo, hi): (f32, f32)| lo + (hi - lo) * rng.next_f32();
        for _ in 0..10 {
            let target = area * uniform(rng, self.area);
            let aspect = uniform(rng, (self.aspect.0.ln(), self.aspect.1.ln())).exp();
            let cw = (target * aspect).sqrt().round() as u32;
            let ch = (target / aspect).sqrt().round() as u32;
            if (1..=w).contains(&cw) && (1..=h).contains(&ch) {
                let x = rng.below((w - cw + 1) as usize) as u32;
                let y = rng.below((h - ch + 1) as usize) as u32;
                return (x, y, cw, ch);
            }
        }
        let side = w.min(h);
        ((w - side) / 2, (h - side) / 2, side, side)
    }

    fn jitter_colours(&self, image: &mut RgbImage, rng: &mut Rng) {
        if self.jitter <= 0.0 {
            return;
        }
        let mut factor = || 1.0 + self.jitter * (2.0 * rng.next_f32() - 1.0);
        let (brightness, contrast, saturation) = (factor(), factor(), factor());
        let gray = |p: &[f32; 3]| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
        let pixels = image.pixels().count().max(1) as f32;
        let mean_gray = image
            .pixels()
            .map(|p| gray(&p.0.map(|v| v as f32)))
            .sum::<f32>()
            / pixels
            * brightness;
        for p in image.pixels_mut() {
            let mut v = p.0.map(|c| c as f32 * brightness);
            let g = gray(&v);
            for c in v.iter_mut() {
                *c = g + (*c - g) * saturation;
                *c = mean_gray + (*c - mean_gray) * contrast;
            }
            p.0 = v.map(|c| c.round().clamp(0.0, 255.0) as u8);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use graft_runtime::preprocess::Normalization;

    fn gradient_image() -> DynamicImage {
        DynamicImage::ImageRgb8(RgbImage::from_fn(90, 60, |x, y| {
            image::Rgb([(x * 2) as u8, (y * 3) as u8, ((x + y) % 256) as u8])
        }))
    }

    #[test]
    fn same_stream_same_variation_and_streams_differ() {
        let preprocessing = Preprocessing::for_input(32, 32, Normalization::unit());
        let aug = Augmentation::default();
        let image = gradient_image();
        let a = aug.apply(&image, &preprocessing, 1, 5);
        assert_eq!(a.len(), 3 * 32 * 32);
        assert_eq!(a, aug.apply(&image, &preprocessing, 1, 5));
        assert_ne!(a, aug.apply(&image, &preprocessing, 1, 6));
        assert_ne!(a, aug.apply(&image, &preprocessing, 2, 5));
    }

    #[test]
    fn crops_fit_inside_the_image() {
        let aug = Augmentation::default();
        let mut rng = Rng::new(3, "t");
        for _ in 0..500 {
            let (x, y, w, h) = aug.crop_box(90, 60, &mut rng);
            assert!(w >= 1 && h >= 1 && x + w <= 90 && y + h <= 60);
            let area = (w * h) as f32 / (90.0 * 60.0);
            assert!(area > 0.3, "area fraction {area}");
        }
    }

    #[test]
    fn no_change_without_randomness_is_plain_preprocessing_of_the_resized_image() {
        let preprocessing = Preprocessing::for_input(60, 90, Normalization::unit());
        let aug = Augmentation {
            area: (1.0, 1.0),
            aspect: (1.5, 1.5),
            flip: false,
            jitter: 0.0,
        };
        let image = gradient_image();
        let got = aug.apply(&image, &preprocessing, 9, 0);
        let exact = Preprocessing {
            resize_shorter: 60,
            ..preprocessing
        };
        assert_eq!(got, exact.apply(&image));
    }
}
