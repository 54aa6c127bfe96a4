//! Decoded image to the crop's 8-bit RGB pixels: resize the shorter side, take the centre.
//!
//! Two implementations, chosen by the artifact's [`Pipeline`]:
//! - [`reference()`], the `image` crate's resampler over the whole image, then the crop (what
//!   artifacts recorded before the fast pipeline existed, and still run with);
//! - [`fast()`], `fast_image_resize` (SIMD convolution: AVX2, SSE4.1 or NEON, chosen at run time)
//!   straight from the part of the source that lands in the crop to the crop's size, so no pixel
//!   outside the crop is computed. Same filter, same geometry; the sums are rounded differently.

use std::cell::RefCell;

use fast_image_resize as fir;
use image::imageops::FilterType;
use image::{DynamicImage, RgbImage};

use super::{Pipeline, ResizeFilter};

/// Size after resizing `w x h` so that its shorter side is `shorter`.
pub(super) fn resized_dims(w: u32, h: u32, shorter: u32) -> (u32, u32) {
    let scale = |long: u32, short: u32| {
        ((long as u64 * shorter as u64 + short as u64 / 2) / short as u64).max(shorter as u64)
            as u32
    };
    if w <= h {
        (shorter, scale(h, w))
    } else {
        (scale(w, h), shorter)
    }
}

/// The image as 8-bit RGB, borrowed when it already is.
fn rgb(image: &DynamicImage) -> std::borrow::Cow<'_, RgbImage> {
    match image {
        DynamicImage::ImageRgb8(rgb) => std::borrow::Cow::Borrowed(rgb),
        other => std::borrow::Cow::Owned(other.to_rgb8()),
    }
}

/// Where the crop lies: a `w x h` image resized to `rw x rh`, its centre `cw x ch` taken from
/// `(left, top)` of the resized image.
struct Geometry {
    w: u32,
    h: u32,
    rw: u32,
    rh: u32,
    left: u32,
    top: u32,
    cw: u32,
    ch: u32,
}

impl Geometry {
    fn new(image: &RgbImage, resize_shorter: u32, [ch, cw]: [u32; 2]) -> Geometry {
        let (w, h) = image.dimensions();
        let (rw, rh) = resized_dims(w, h, resize_shorter);
        let (left, top) = ((rw - cw) / 2, (rh - ch) / 2);
        Geometry {
            w,
            h,
            rw,
            rh,
            left,
            top,
            cw,
            ch,
        }
    }

    /// Pixels of the whole resized image.
    fn resized_pixels(&self) -> u64 {
        self.rw as u64 * self.rh as u64
    }

    /// Whether the resize keeps the size (only the crop is left).
    fn same_size(&self) -> bool {
        (self.rw, self.rh) == (self.w, self.h)
    }

    /// The crop of `image` (already at the resized size).
    fn crop(&self, image: &RgbImage) -> RgbImage {
        image::imageops::crop_imm(image, self.left, self.top, self.cw, self.ch).to_image()
    }
}

/// The centre `crop` (`[height, width]`) of the image resized to `resize_shorter` with
/// `filter`, by `pipeline`'s resampler.
pub(super) fn resize_and_crop(
    image: &DynamicImage,
    resize_shorter: u32,
    crop: [u32; 2],
    filter: ResizeFilter,
    pipeline: Pipeline,
) -> RgbImage {
    let rgb = rgb(image);
    let g = Geometry::new(&rgb, resize_shorter, crop);
    if g.same_size() {
        return g.crop(&rgb);
    }
    match pipeline {
        Pipeline::Reference if g.resized_pixels() <= MAX_REFERENCE_RESIZED_PIXELS => {
            reference(&rgb, &g, filter)
        }
        // An extreme aspect ratio (a 1x16000 strip resizes to 256 x 4,096,000 pixels, 3 GB):
        // only the crop is resampled, as the fast pipeline always does.
        Pipeline::Reference | Pipeline::Fast | Pipeline::FastV1 => fast(&rgb, &g, filter),
    }
}

/// Largest whole resized image the reference pipeline computes before cropping (16 megapixels,
/// 48 MB): every photo-like aspect ratio stays far below it (a 4:1 panorama is 1024x256), and
/// images beyond it are resampled crop-only (bounded memory whatever the aspect ratio).
const MAX_REFERENCE_RESIZED_PIXELS: u64 = 16 << 20;

/// The `image` crate's resize of the whole image, then the crop.
fn reference(rgb: &RgbImage, g: &Geometry, filter: ResizeFilter) -> RgbImage {
    let filter = match filter {
        ResizeFilter::Nearest => FilterType::Nearest,
        ResizeFilter::Bilinear => FilterType::Triangle,
        ResizeFilter::Bicubic => FilterType::CatmullRom,
    };
    g.crop(&image::imageops::resize(rgb, g.rw, g.rh, filter))
}

thread_local! {
    /// The resizer keeps its scratch buffers between calls on a thread.
    static RESIZER: RefCell<fir::Resizer> = RefCell::new(fir::Resizer::new());
}

/// The crop computed directly: its rectangle mapped back into the source is resampled to the
/// crop's size by `fast_image_resize`.
fn fast(rgb: &RgbImage, g: &Geometry, filter: ResizeFilter) -> RgbImage {
    let (sx, sy) = (g.w as f64 / g.rw as f64, g.h as f64 / g.rh as f64);
    let algorithm = match filter {
        ResizeFilter::Nearest => fir::ResizeAlg::Nearest,
        ResizeFilter::Bilinear => fir::ResizeAlg::Convolution(fir::FilterType::Bilinear),
        ResizeFilter::Bicubic => fir::ResizeAlg::Convolution(fir::FilterType::CatmullRom),
    };
    let options = fir::ResizeOptions::new().resize_alg(algorithm).crop(
        g.left as f64 * sx,
        g.top as f64 * sy,
        g.cw as f64 * sx,
        g.ch as f64 * sy,
    );
    let source = fir::images::ImageRef::new(g.w, g.h, rgb.as_raw(), fir::PixelType::U8x3)
        .expect("an RgbImage holds w * h * 3 bytes");
    let mut out = fir::images::Image::new(g.cw, g.ch, fir::PixelType::U8x3);
    RESIZER
        .with(|resizer| resizer.borrow_mut().resize(&source, &mut out, &options))
        .expect("same pixel type, crop inside the source");
    RgbImage::from_raw(g.cw, g.ch, out.into_vec()).expect("cw * ch * 3 bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorter_side_is_resized_keeping_aspect() {
        assert_eq!(resized_dims(500, 375, 256), (341, 256));
        assert_eq!(resized_dims(375, 500, 256), (256, 341));
        assert_eq!(resized_dims(32, 32, 256), (256, 256));
        assert_eq!(resized_dims(4000, 10, 256), (102_400, 256));
    }

    /// A 1x16000 strip resizes to 256 x 4,096,000 pixels; the reference pipeline must not
    /// compute them all (3 GB) but still give the crop, as the fast one does.
    #[test]
    fn extreme_aspect_ratios_are_cropped_without_resizing_the_whole_strip() {
        for (w, h) in [(1, 16_000), (16_000, 1), (3, 16_000)] {
            let image = DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
                image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
            }));
            let g = Geometry::new(&image.to_rgb8(), 256, [224, 224]);
            assert!(g.resized_pixels() > MAX_REFERENCE_RESIZED_PIXELS);
            for pipeline in [Pipeline::Reference, Pipeline::Fast] {
                let crop =
                    resize_and_crop(&image, 256, [224, 224], ResizeFilter::Bilinear, pipeline);
                assert_eq!(crop.dimensions(), (224, 224));
            }
        }
    }

    /// A smooth picture: both resamplers agree on it within rounding, for every filter, when
    /// shrinking, enlarging and keeping the size.
    #[test]
    fn fast_and_reference_agree_on_a_smooth_image() {
        for (w, h) in [(500, 375), (128, 128), (300, 700), (256, 300)] {
            let image = DynamicImage::ImageRgb8(RgbImage::from_fn(w, h, |x, y| {
                let (fx, fy) = (x as f32 / w as f32, y as f32 / h as f32);
                image::Rgb([
                    (255.0 * fx) as u8,
                    (255.0 * fy) as u8,
                    (127.0 + 100.0 * (6.0 * fx).sin() * (4.0 * fy).cos()) as u8,
                ])
            }));
            for filter in [
                ResizeFilter::Bilinear,
                ResizeFilter::Bicubic,
                ResizeFilter::Nearest,
            ] {
                let a = resize_and_crop(&image, 256, [224, 224], filter, Pipeline::Reference);
                let b = resize_and_crop(&image, 256, [224, 224], filter, Pipeline::Fast);
                assert_eq!(b.dimensions(), (224, 224));
                let worst = a
                    .as_raw()
                    .iter()
                    .zip(b.as_raw())
                    .map(|(x, y)| (*x as i32 - *y as i32).abs())
                    .max()
                    .unwrap();
                let limit = if filter == ResizeFilter::Nearest {
                    12
                } else {
                    3
                };
                assert!(worst <= limit, "{w}x{h} {filter:?}: differ by {worst}");
            }
        }
    }
}
