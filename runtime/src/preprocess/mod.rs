//! Image decoding and preprocessing: file bytes to the model's input tensor.
//!
//! The compiler and the runtime both call [`Preprocessing::load`] / [`Preprocessing::decode`] and
//! [`Preprocessing::apply`], and the parameters travel inside the artifact, so an image is turned
//! into exactly the same tensor at training and at deployment.
//!
//! Steps: decode (JPEG, PNG, GIF first frame, WebP) with bounded memory, apply the EXIF orientation,
//! convert to 8-bit RGB, resize so the shorter side is `resize_shorter` (aspect kept), crop the
//! centre to `crop`, reorder channels, normalise `(pixel - mean) / std` per channel (pixel in
//! 0..=255), lay out as NCHW. How the decode and the resize are done is the [`Pipeline`], recorded
//! with the parameters: [`Pipeline::Fast`] decodes large JPEGs at reduced DCT scale and resamples
//! only the crop with SIMD (`decode.rs`, `resize.rs`); [`Pipeline::Reference`] is the full-size path
//! that artifacts written before it still record, and still get.

mod decode;
pub mod raw;
mod resize;

use std::path::Path;
use std::str::FromStr;

use image::{DynamicImage, RgbImage};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

pub use decode::{
    decode_at_least, decode_image, decode_reduced, load_image, MAX_DECODE_BYTES, MAX_IMAGE_SIDE,
    MAX_PIXELS,
};

/// How an image becomes the model's input tensor; recorded in every artifact.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Preprocessing {
    /// The shorter image side is resized to this many pixels, keeping the aspect ratio.
    pub resize_shorter: u32,
    /// Centre crop taken after resizing, `[height, width]`.
    pub crop: [u32; 2],
    /// Resampling filter used for the resize.
    pub filter: ResizeFilter,
    /// Channel order of the input tensor.
    pub channel_order: ChannelOrder,
    /// Per-channel normalisation.
    pub normalization: Normalization,
    /// How the image is decoded and resized (absent from artifacts made before it existed:
    /// those keep the reference pipeline they were made with).
    #[serde(default)]
    pub pipeline: Pipeline,
}

/// The implementation of decoding and resizing; part of the preprocessing's identity (artifacts
/// and feature caches record it), because the two give slightly different pixels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Pipeline {
    /// Full-size decode by the `image` crate, its resampler over the whole image, then the crop.
    #[default]
    #[serde(rename = "reference")]
    Reference,
    /// Sequential JPEGs large enough to be decoded at a reduced DCT scale (1/8, 1/4 or 1/2, the
    /// smallest whose shorter side is at least `resize_shorter`) decoded so by libjpeg-turbo;
    /// every other image decoded as the reference pipeline does; the crop resampled straight
    /// from the decoded image by `fast_image_resize`; one pass to the normalised planar tensor.
    /// (Full-scale decodes go through the reference decoder because libjpeg-turbo's pixels cost
    /// flowers5, whose photos are 128x128, 0.38 points of val accuracy on average over five
    /// seeds; docs/PERFORMANCE.md.)
    #[serde(rename = "fast-v2")]
    Fast,
    /// The first fast pipeline (2026-11-28): libjpeg-turbo for every sequential JPEG, at full
    /// scale too; otherwise as [`Pipeline::Fast`]. Artifacts that record it keep it.
    #[serde(rename = "fast-v1")]
    FastV1,
}

/// Resampling filter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ResizeFilter {
    /// Nearest neighbour.
    Nearest,
    /// Bilinear (triangle) with antialiasing when shrinking.
    Bilinear,
    /// Bicubic (Catmull-Rom) with antialiasing when shrinking.
    Bicubic,
}

/// Channel order of the input tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChannelOrder {
    /// Red, green, blue (ONNX exports of PyTorch and TF models).
    Rgb,
    /// Blue, green, red (Caffe-era models).
    Bgr,
}

/// `value = (pixel - mean) / std`, with `pixel` in 0..=255, per channel in tensor channel order.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    /// Preset name (`imagenet`, `tf`, `unit`, `none`) or `custom`.
    pub name: String,
    /// Per-channel mean, in pixel units.
    pub mean: [f32; 3],
    /// Per-channel standard deviation, in pixel units.
    pub std: [f32; 3],
}

impl Normalization {
    /// torchvision's ImageNet statistics: mean (0.485, 0.456, 0.406), std (0.229, 0.224, 0.225)
    /// of pixel / 255.
    pub fn imagenet() -> Normalization {
        Normalization {
            name: "imagenet".into(),
            mean: [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0],
            std: [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0],
        }
    }

    /// TensorFlow's `(pixel - 127) / 128`, the range [-1, 1] that EfficientNet-Lite was trained on.
    pub fn tf() -> Normalization {
        Normalization {
            name: "tf".into(),
            mean: [127.0; 3],
            std: [128.0; 3],
        }
    }

    /// `pixel / 255`, the range [0, 1].
    pub fn unit() -> Normalization {
        Normalization {
            name: "unit".into(),
            mean: [0.0; 3],
            std: [255.0; 3],
        }
    }

    /// Raw pixel values 0..=255.
    pub fn none() -> Normalization {
        Normalization {
            name: "none".into(),
            mean: [0.0; 3],
            std: [1.0; 3],
        }
    }
}

impl FromStr for Normalization {
    type Err = String;

    /// Parses a preset name, or custom statistics in the [0, 1] pixel range as torchvision writes
    /// them: `M,S` (one mean and std for all channels) or `M1,M2,M3,S1,S2,S3`.
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "imagenet" => return Ok(Normalization::imagenet()),
            "tf" => return Ok(Normalization::tf()),
            "unit" => return Ok(Normalization::unit()),
            "none" => return Ok(Normalization::none()),
            _ => {}
        }
        let values = s
            .split(',')
            .map(|v| v.trim().parse::<f32>())
            .collect::<std::result::Result<Vec<f32>, _>>()
            .map_err(|_| {
                format!("unknown normalization {s:?}: expected imagenet, tf, unit, none, M,S or M1,M2,M3,S1,S2,S3")
            })?;
        let (mean, std) = match values[..] {
            [m, s] => ([m; 3], [s; 3]),
            [m1, m2, m3, s1, s2, s3] => ([m1, m2, m3], [s1, s2, s3]),
            _ => {
                return Err(format!(
                    "normalization {s:?} needs 2 or 6 numbers, found {}",
                    values.len()
                ))
            }
        };
        if std.iter().any(|s| !s.is_finite() || *s <= 0.0) || mean.iter().any(|m| !m.is_finite()) {
            return Err(format!(
                "normalization {s:?}: std must be positive and every value finite"
            ));
        }
        Ok(Normalization {
            name: "custom".into(),
            mean: mean.map(|m| m * 255.0),
            std: std.map(|s| s * 255.0),
        })
    }
}

impl FromStr for Pipeline {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "fast" => Ok(Pipeline::Fast),
            "fast-v1" => Ok(Pipeline::FastV1),
            "reference" => Ok(Pipeline::Reference),
            _ => Err(format!(
                "unknown preprocessing pipeline {s:?}: expected fast, fast-v1 or reference"
            )),
        }
    }
}

impl std::fmt::Display for Pipeline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Pipeline::Fast => "fast (reduced-scale decode of large JPEGs, SIMD resize)",
            Pipeline::FastV1 => "fast-v1 (libjpeg-turbo decode of every JPEG, SIMD resize)",
            Pipeline::Reference => "reference (full-size decode)",
        })
    }
}

impl std::fmt::Display for ResizeFilter {
    /// The name `--filter` takes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ResizeFilter::Nearest => "nearest",
            ResizeFilter::Bilinear => "bilinear",
            ResizeFilter::Bicubic => "bicubic",
        })
    }
}

impl std::fmt::Display for ChannelOrder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChannelOrder::Rgb => "RGB",
            ChannelOrder::Bgr => "BGR",
        })
    }
}

impl FromStr for ResizeFilter {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "nearest" => Ok(ResizeFilter::Nearest),
            "bilinear" => Ok(ResizeFilter::Bilinear),
            "bicubic" => Ok(ResizeFilter::Bicubic),
            _ => Err(format!(
                "unknown resize filter {s:?}: expected nearest, bilinear or bicubic"
            )),
        }
    }
}

impl Preprocessing {
    /// The usual evaluation transform for an `height x width` input: shorter side resized to
    /// `max(height, width) / 0.875` (256 for 224), bilinear, centre crop, RGB.
    pub fn for_input(height: u32, width: u32, normalization: Normalization) -> Preprocessing {
        Preprocessing {
            resize_shorter: (height.max(width) as f32 / 0.875).round() as u32,
            crop: [height, width],
            filter: ResizeFilter::Bilinear,
            channel_order: ChannelOrder::Rgb,
            normalization,
            pipeline: Pipeline::Fast,
        }
    }

    /// Decodes image bytes as this pipeline does: at full size ([`decode_image`]) for the
    /// reference pipeline, and for the fast one large sequential JPEGs at the reduced scale the
    /// resize still has enough pixels for ([`decode_reduced`]). `path` names the image in errors.
    pub fn decode(&self, bytes: &[u8], path: &Path) -> Result<DynamicImage> {
        match self.pipeline {
            Pipeline::Reference => decode_image(bytes, path),
            Pipeline::Fast => decode_reduced(bytes, path, self.resize_shorter),
            Pipeline::FastV1 => decode_at_least(bytes, path, self.resize_shorter),
        }
    }

    /// Reads the image file at `path` and decodes it (see [`Self::decode`]).
    pub fn load(&self, path: &Path) -> Result<DynamicImage> {
        let bytes = crate::read::read_image_file(path)?;
        self.decode(&bytes, path)
    }

    /// Checks that the parameters describe a valid transform.
    pub fn validate(&self) -> Result<()> {
        let [h, w] = self.crop;
        if h == 0 || w == 0 || h > MAX_IMAGE_SIDE || w > MAX_IMAGE_SIDE {
            return Err(Error::InvalidPreprocessing(format!(
                "crop {h}x{w} must be between 1 and {MAX_IMAGE_SIDE} pixels per side"
            )));
        }
        if self.resize_shorter < h.max(w) || self.resize_shorter > MAX_IMAGE_SIDE {
            return Err(Error::InvalidPreprocessing(format!(
                "resize_shorter {} must be at least the crop size {} and at most {MAX_IMAGE_SIDE}",
                self.resize_shorter,
                h.max(w)
            )));
        }
        let n = &self.normalization;
        if n.std.iter().any(|s| !s.is_finite() || *s <= 0.0)
            || n.mean.iter().any(|m| !m.is_finite())
        {
            return Err(Error::InvalidPreprocessing(
                "normalization std must be positive and every value finite".into(),
            ));
        }
        Ok(())
    }

    /// Number of `f32` values in one preprocessed image (`3 * height * width`).
    pub fn tensor_len(&self) -> usize {
        3 * self.crop[0] as usize * self.crop[1] as usize
    }

    /// Turns a decoded image into a CHW tensor of [`Self::tensor_len`] values.
    pub fn apply(&self, image: &DynamicImage) -> Vec<f32> {
        let mut out = vec![0.0; self.tensor_len()];
        self.apply_into(image, &mut out);
        out
    }

    /// Like [`Self::apply`], writing into `out` (which must hold [`Self::tensor_len`] values):
    /// the resized crop goes to the normalised planar tensor in one pass.
    pub fn apply_into(&self, image: &DynamicImage, out: &mut [f32]) {
        assert_eq!(out.len(), self.tensor_len(), "output buffer size");
        let rgb = self.resize_and_crop(image);
        let plane = self.tensor_len() / 3;
        let (first, rest) = out.split_at_mut(plane);
        let (second, third) = rest.split_at_mut(plane);
        for (((px, a), b), c) in rgb
            .as_raw()
            .chunks_exact(3)
            .zip(first)
            .zip(second)
            .zip(third)
        {
            let [p0, p1, p2] = self.ordered([px[0], px[1], px[2]]);
            (*a, *b, *c) = (self.normal(0, p0), self.normal(1, p1), self.normal(2, p2));
        }
    }

    /// The image resized, cropped and reordered into planar 8-bit pixels in tensor channel
    /// order ([`Self::tensor_len`] bytes, a quarter of the tensor): what [`Self::normalize_into`]
    /// turns into the model input. For holding many preprocessed images in memory.
    pub fn pixels(&self, image: &DynamicImage) -> Vec<u8> {
        let rgb = self.resize_and_crop(image);
        let plane = self.tensor_len() / 3;
        let mut out = vec![0; self.tensor_len()];
        for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
            for (c, value) in self.ordered([px[0], px[1], px[2]]).into_iter().enumerate() {
                out[c * plane + i] = value;
            }
        }
        out
    }

    /// Normalizes planar pixels from [`Self::pixels`] into `out`; both hold
    /// [`Self::tensor_len`] values. The same arithmetic as [`Self::apply_into`].
    pub fn normalize_into(&self, pixels: &[u8], out: &mut [f32]) {
        assert_eq!(pixels.len(), self.tensor_len(), "pixel buffer size");
        assert_eq!(out.len(), self.tensor_len(), "output buffer size");
        let plane = self.tensor_len() / 3;
        for (c, (pixels, out)) in pixels
            .chunks_exact(plane)
            .zip(out.chunks_exact_mut(plane))
            .enumerate()
        {
            for (o, &p) in out.iter_mut().zip(pixels) {
                *o = self.normal(c, p);
            }
        }
    }

    /// The model-input value of `pixel` in tensor channel `channel`: `(pixel - mean) / std`.
    #[inline(always)]
    fn normal(&self, channel: usize, pixel: u8) -> f32 {
        let n = &self.normalization;
        (pixel as f32 - n.mean[channel]) / n.std[channel]
    }

    /// RGB values in tensor channel order (the order the normalisation's values are in).
    fn ordered<T: Copy>(&self, rgb: [T; 3]) -> [T; 3] {
        match self.channel_order {
            ChannelOrder::Rgb => rgb,
            ChannelOrder::Bgr => [rgb[2], rgb[1], rgb[0]],
        }
    }

    /// The centre crop of the resized image, 8-bit RGB, by this pipeline's resampler.
    fn resize_and_crop(&self, image: &DynamicImage) -> RgbImage {
        resize::resize_and_crop(
            image,
            self.resize_shorter,
            self.crop,
            self.filter,
            self.pipeline,
        )
    }
}

#[cfg(test)]
mod tests {
    use std::io::Cursor;

    use super::*;

    fn png_bytes(image: &DynamicImage) -> Vec<u8> {
        let mut bytes = Vec::new();
        image
            .write_to(&mut Cursor::new(&mut bytes), image::ImageFormat::Png)
            .unwrap();
        bytes
    }

    /// Artifacts record the pipeline by name: the current fast one is `fast-v2`; the first fast
    /// one (`fast-v1`) keeps its meaning, and `--pipeline fast` means the current one.
    #[test]
    fn fast_pipelines_are_recorded_by_version() {
        let name = |p: Pipeline| serde_json::to_string(&p).unwrap();
        assert_eq!(name(Pipeline::Fast), "\"fast-v2\"");
        assert_eq!(name(Pipeline::FastV1), "\"fast-v1\"");
        assert_eq!(name(Pipeline::Reference), "\"reference\"");
        let read = |s: &str| serde_json::from_str::<Pipeline>(s).unwrap();
        assert_eq!(read("\"fast-v1\""), Pipeline::FastV1);
        assert_eq!(read("\"fast-v2\""), Pipeline::Fast);
        assert_eq!("fast".parse::<Pipeline>(), Ok(Pipeline::Fast));
        assert_eq!("fast-v1".parse::<Pipeline>(), Ok(Pipeline::FastV1));
        assert!("fast-v3".parse::<Pipeline>().is_err());
    }

    #[test]
    fn tf_normalization_is_exact_and_channels_are_planar() {
        let mut img = RgbImage::new(4, 4);
        for p in img.pixels_mut() {
            *p = image::Rgb([255, 127, 0]);
        }
        let pre = Preprocessing {
            resize_shorter: 4,
            crop: [2, 2],
            filter: ResizeFilter::Bilinear,
            channel_order: ChannelOrder::Rgb,
            normalization: Normalization::tf(),
            pipeline: Pipeline::Fast,
        };
        let t = pre.apply(&DynamicImage::ImageRgb8(img.clone()));
        assert_eq!(t, [[1.0; 4], [0.0; 4], [-127.0 / 128.0; 4]].concat());
        let reference = Preprocessing {
            pipeline: Pipeline::Reference,
            ..pre.clone()
        };
        assert_eq!(reference.apply(&DynamicImage::ImageRgb8(img)), t);
        let bgr = Preprocessing {
            channel_order: ChannelOrder::Bgr,
            ..pre
        };
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(4, 4, image::Rgb([255, 127, 0])));
        assert_eq!(bgr.apply(&img)[..4], [-127.0 / 128.0; 4]);
    }

    #[test]
    fn centre_crop_takes_the_middle() {
        let img = RgbImage::from_fn(6, 4, |x, _| image::Rgb([x as u8 * 10, 0, 0]));
        let pre = Preprocessing {
            resize_shorter: 4,
            crop: [2, 2],
            filter: ResizeFilter::Nearest,
            channel_order: ChannelOrder::Rgb,
            normalization: Normalization::none(),
            pipeline: Pipeline::Reference,
        };
        let img = DynamicImage::ImageRgb8(img);
        assert_eq!(&pre.apply(&img)[..4], &[20.0, 30.0, 20.0, 30.0]);
        let fast = Preprocessing {
            pipeline: Pipeline::Fast,
            ..pre
        };
        assert_eq!(&fast.apply(&img)[..4], &[20.0, 30.0, 20.0, 30.0]);
    }

    #[test]
    fn grayscale_and_rgba_become_rgb() {
        let pre = Preprocessing::for_input(8, 8, Normalization::none());
        let gray = DynamicImage::ImageLuma8(image::GrayImage::from_pixel(9, 9, image::Luma([77])));
        assert!(pre.apply(&gray).iter().all(|v| *v == 77.0));
        let rgba = DynamicImage::ImageRgba8(image::RgbaImage::from_pixel(
            9,
            9,
            image::Rgba([1, 2, 3, 0]),
        ));
        let t = pre.apply(&rgba);
        assert_eq!((t[0], t[64], t[128]), (1.0, 2.0, 3.0));
    }

    #[test]
    fn decode_rejects_garbage_with_the_path() {
        let err = decode_image(b"not an image", Path::new("x.jpg")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "x.jpg: cannot decode image: unrecognised image format"
        );
        let png = png_bytes(&DynamicImage::ImageRgb8(RgbImage::new(3, 2)));
        let err = decode_image(&png[..png.len() / 2], Path::new("t.png")).unwrap_err();
        assert!(err.to_string().starts_with("t.png: cannot decode image"));
    }

    #[test]
    fn exif_orientation_is_applied() {
        use image::ImageEncoder;
        // TIFF header + one IFD entry: Orientation (0x0112) = 6, "rotate 90 degrees clockwise".
        let exif = [
            0x49, 0x49, 0x2A, 0, 8, 0, 0, 0, 1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0,
            0, 0,
        ];
        let wide = RgbImage::from_pixel(40, 20, image::Rgb([200, 100, 50]));
        let mut jpeg = Vec::new();
        let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95);
        encoder.set_exif_metadata(exif.to_vec()).unwrap();
        encoder
            .write_image(wide.as_raw(), 40, 20, image::ExtendedColorType::Rgb8)
            .unwrap();
        let decoded = decode_image(&jpeg, Path::new("rotated.jpg")).unwrap();
        assert_eq!((decoded.width(), decoded.height()), (20, 40));
    }

    /// The odd encodings in `fixtures/odd-images` (made by `fixtures/make_fixtures.py` from a
    /// 64x48 gradient whose pixel (x, y) is (4x, 5y, 2(x+y))) all decode to that gradient.
    #[test]
    fn odd_encodings_decode_to_the_same_picture() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/odd-images");
        let expected = |x: u32, y: u32| [4 * x, 5 * y, 2 * (x + y)].map(|v| v as i32);
        for (file, color) in [
            ("cmyk.jpg", true),
            ("rgba.png", true),
            ("palette.gif", true),
            ("animated.gif", true),
            ("image.webp", true),
            ("exif-rotate90.jpg", true),
            ("gray.jpg", false),
            ("gray16.png", false),
        ] {
            let image = load_image(&dir.join(file)).unwrap().to_rgb8();
            let (x, y) = (40, 20);
            let (w, h, px) = if file.starts_with("exif") {
                // Rotated 90 degrees clockwise: source (x, y) lands at (h - 1 - y, x).
                (48, 64, image.get_pixel(47 - y, x).0)
            } else {
                (64, 48, image.get_pixel(x, y).0)
            };
            assert_eq!(image.dimensions(), (w, h), "{file}");
            if color {
                let want = expected(x, y);
                for c in 0..3 {
                    assert!(
                        (px[c] as i32 - want[c]).abs() <= 24,
                        "{file}: {px:?} vs {want:?}"
                    );
                }
            } else {
                assert!(
                    px[0] == px[1] && px[1] == px[2],
                    "{file}: gray expected, got {px:?}"
                );
            }
        }
        let tiny = load_image(&dir.join("tiny-1x1.png")).unwrap();
        let pre = Preprocessing::for_input(224, 224, Normalization::none());
        assert!(pre
            .apply(&tiny)
            .chunks(224 * 224)
            .zip([200.0, 100.0, 50.0])
            .all(|(plane, v)| plane.iter().all(|p| *p == v)));
        let slow = dir.join("../fuzz-regressions/cmyk-jpeg-118-megapixels.jpg");
        let err = load_image(&slow).unwrap_err().to_string();
        assert!(
            err.ends_with(
                "cannot decode image: image is 14912x7936 pixels, more than the 64 megapixel limit"
            ),
            "{err}"
        );
        let bomb = dir.join("bomb-20000x20000.png");
        let err = load_image(&bomb).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: cannot decode image: Image size exceeds limit",
                bomb.display()
            )
        );
    }

    #[test]
    fn decode_round_trips_png() {
        let img = DynamicImage::ImageRgb8(RgbImage::from_pixel(3, 2, image::Rgb([9, 8, 7])));
        let back = decode_image(&png_bytes(&img), Path::new("a.png")).unwrap();
        assert_eq!(back.to_rgb8(), img.to_rgb8());
    }

    #[test]
    fn normalization_parses_presets_and_custom_values() {
        assert_eq!("tf".parse::<Normalization>().unwrap(), Normalization::tf());
        let n: Normalization = "0.5,0.25".parse().unwrap();
        assert_eq!((n.mean, n.std), ([127.5; 3], [63.75; 3]));
        assert!("0.5,0".parse::<Normalization>().is_err());
        assert!("fancy".parse::<Normalization>().is_err());
    }

    #[test]
    fn preprocessing_recorded_without_a_pipeline_keeps_the_reference_one() {
        let old = r#"{"resize_shorter": 256, "crop": [224, 224], "filter": "bilinear",
            "channel_order": "rgb",
            "normalization": {"name": "tf", "mean": [127, 127, 127], "std": [128, 128, 128]}}"#;
        let old: Preprocessing = serde_json::from_str(old).unwrap();
        assert_eq!(old.pipeline, Pipeline::Reference);
        let new = Preprocessing::for_input(224, 224, Normalization::tf());
        assert_eq!(serde_json::to_value(&new).unwrap()["pipeline"], "fast-v2");
        assert_eq!(
            Preprocessing {
                pipeline: Pipeline::Fast,
                ..old.clone()
            },
            new
        );
        // The reference pipeline decodes a large JPEG whole and resamples it with the `image`
        // crate; the fast one decodes it at 1/2 scale (1/4 would leave 250 < 256 rows).
        let mut jpeg = Vec::new();
        DynamicImage::ImageRgb8(RgbImage::from_fn(1200, 1000, |x, y| {
            image::Rgb([(x / 5) as u8, (y / 4) as u8, 60])
        }))
        .write_to(&mut Cursor::new(&mut jpeg), image::ImageFormat::Jpeg)
        .unwrap();
        let path = Path::new("photo.jpg");
        let full = old.decode(&jpeg, path).unwrap();
        assert_eq!((full.width(), full.height()), (1200, 1000));
        assert_eq!(
            old.apply(&full),
            old.apply(&decode_image(&jpeg, path).unwrap())
        );
        let small = new.decode(&jpeg, path).unwrap();
        assert_eq!((small.width(), small.height()), (600, 500));
    }

    #[test]
    fn validate_rejects_crop_larger_than_resize() {
        let mut pre = Preprocessing::for_input(224, 224, Normalization::tf());
        assert!(pre.validate().is_ok());
        pre.resize_shorter = 200;
        assert!(pre.validate().is_err());
    }
}
