//! File bytes to pixels, with bounded memory.
//!
//! Two decoders: the `image` crate for every format at full size ([`decode_image`]), and
//! libjpeg-turbo (the `mozjpeg` crate) for sequential JPEGs that are much larger than the model
//! input ([`decode_at_least`]). A camera photo is 12 megapixels for a 224-pixel input; decoding
//! it whole and then shrinking it costs most of the photo-to-label time. libjpeg-turbo can run
//! its inverse DCT at 1/2, 1/4 or 1/8 of the size (Pillow's "draft" mode), so a 4000x3000 photo
//! comes out 500x375 at a fraction of the work, and the resize that follows has little left to
//! do. The scale chosen is the smallest that keeps the shorter side at least as long as the
//! resize needs, so the resize never enlarges what the decoder shrank.

use std::io::Cursor;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use image::metadata::Orientation;
use image::{DynamicImage, ImageDecoder, ImageReader, RgbImage};

use crate::error::{Error, Result};

/// Largest width or height accepted from an image file.
pub const MAX_IMAGE_SIDE: u32 = 16_384;
/// Largest buffer an image decoder may allocate.
pub const MAX_DECODE_BYTES: u64 = 512 << 20;
/// Largest number of pixels decoded (64 megapixels, e.g. 8192x8192): a 1 KB JPEG can declare
/// 15000x8000 pixels and take seconds and gigabytes to decode.
pub const MAX_PIXELS: u64 = 64 << 20;

/// The error for `path` with `reason`.
fn failure(path: &Path, reason: impl Into<String>) -> Error {
    Error::ImageDecode {
        path: path.to_path_buf(),
        reason: reason.into().trim_end().to_string(),
    }
}

/// Checks a declared size against [`MAX_IMAGE_SIDE`] and [`MAX_PIXELS`].
fn check_size(w: u64, h: u64, path: &Path) -> Result<()> {
    if w == 0 || h == 0 {
        return Err(failure(path, format!("image is {w}x{h} pixels")));
    }
    if w > MAX_IMAGE_SIDE as u64 || h > MAX_IMAGE_SIDE as u64 {
        return Err(failure(path, "Image size exceeds limit"));
    }
    if w * h > MAX_PIXELS {
        return Err(failure(
            path,
            format!(
                "image is {w}x{h} pixels, more than the {} megapixel limit",
                MAX_PIXELS >> 20
            ),
        ));
    }
    Ok(())
}

/// Decodes image bytes (format sniffed from content) at full size with bounded memory, applies
/// the EXIF orientation, and returns the image. `path` is used in error messages only.
pub fn decode_image(bytes: &[u8], path: &Path) -> Result<DynamicImage> {
    let fail = |reason: String| failure(path, reason);
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| fail(e.to_string()))?;
    if reader.format().is_none() {
        return Err(fail("unrecognised image format".into()));
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_IMAGE_SIDE);
    limits.max_image_height = Some(MAX_IMAGE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let mut decoder = reader.into_decoder().map_err(|e| fail(e.to_string()))?;
    let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
    let (w, h) = decoder.dimensions();
    check_size(w as u64, h as u64, path)?;
    let mut image = DynamicImage::from_decoder(decoder).map_err(|e| fail(e.to_string()))?;
    image.apply_orientation(orientation);
    Ok(image)
}

/// Reads and decodes the image at `path` at full size (see [`decode_image`]).
pub fn load_image(path: &Path) -> Result<DynamicImage> {
    let bytes = crate::read::read_image_file(path)?;
    decode_image(&bytes, path)
}

/// Decodes image bytes like [`decode_image`], except that a sequential JPEG (baseline or
/// extended, gray or colour) is decoded by libjpeg-turbo at the smallest DCT scale whose
/// shorter side is still at least `shorter` pixels (full size when the image is not that
/// large). Progressive, CMYK and arithmetic-coded JPEGs and other formats go to
/// [`decode_image`].
pub fn decode_at_least(bytes: &[u8], path: &Path, shorter: u32) -> Result<DynamicImage> {
    match sequential_jpeg(bytes) {
        Some(jpeg) => decode_jpeg(bytes, path, jpeg, shorter),
        None => decode_image(bytes, path),
    }
}

/// Decodes image bytes like [`decode_image`], except that a sequential JPEG large enough to be
/// decoded at a reduced DCT scale (its shorter side at least twice `shorter`) is decoded so by
/// libjpeg-turbo ([`decode_at_least`]): the pixels of every full-scale decode are the reference
/// decoder's.
pub fn decode_reduced(bytes: &[u8], path: &Path, shorter: u32) -> Result<DynamicImage> {
    match sequential_jpeg(bytes) {
        Some(jpeg) if scale_eighths(jpeg.width, jpeg.height, shorter) < 8 => {
            decode_jpeg(bytes, path, jpeg, shorter)
        }
        _ => decode_image(bytes, path),
    }
}

/// What the frame header of a sequential JPEG says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Frame {
    width: u32,
    height: u32,
}

/// The frame of `bytes` when they are a Huffman-coded sequential JPEG (SOF0 or SOF1) with one or
/// three components; `None` for anything else, including progressive JPEGs (whose coefficients
/// must all be held in memory, and which the `image` decoder handles) and malformed headers
/// (whose errors the `image` decoder reports).
fn sequential_jpeg(bytes: &[u8]) -> Option<Frame> {
    if !bytes.starts_with(&[0xFF, 0xD8]) {
        return None;
    }
    let mut at = 2;
    loop {
        // A marker: 0xFF (possibly repeated as fill), then its code.
        if *bytes.get(at)? != 0xFF {
            return None;
        }
        while *bytes.get(at)? == 0xFF {
            at += 1;
        }
        let code = *bytes.get(at)?;
        at += 1;
        if matches!(code, 0x01 | 0xD0..=0xD7) {
            continue;
        }
        let length = u16::from_be_bytes([*bytes.get(at)?, *bytes.get(at + 1)?]) as usize;
        let segment = bytes.get(at + 2..at + length.max(2))?;
        match code {
            0xC0 | 0xC1 => {
                // precision, height, width, components
                let &[8, h1, h0, w1, w0, components, ..] = segment else {
                    return None;
                };
                let (height, width) = (
                    u16::from_be_bytes([h1, h0]) as u32,
                    u16::from_be_bytes([w1, w0]) as u32,
                );
                return matches!(components, 1 | 3).then_some(Frame { width, height });
            }
            // Other frame types, or the scan before any frame.
            0xC2..=0xC3 | 0xC5..=0xC7 | 0xC9..=0xCB | 0xCD..=0xCF | 0xDA | 0xD9 => return None,
            _ => at += length,
        }
    }
}

/// Eighths of the full size to decode a `w x h` JPEG at: the smallest of 1, 2, 4 and 8 whose
/// shorter side (rounded up, as libjpeg does) is at least `shorter`.
fn scale_eighths(w: u32, h: u32, shorter: u32) -> u8 {
    [1u8, 2, 4]
        .into_iter()
        .find(|&n| (w.min(h) as u64 * n as u64).div_ceil(8) >= shorter as u64)
        .unwrap_or(8)
}

/// libjpeg-turbo's decode of a sequential JPEG at the scale [`scale_eighths`] picks, with its
/// EXIF orientation applied. libjpeg-turbo reports fatal errors by unwinding (caught here, without
/// the panic hook) and decodes a truncated file with its missing rows gray, as it does for Pillow.
fn decode_jpeg(bytes: &[u8], path: &Path, frame: Frame, shorter: u32) -> Result<DynamicImage> {
    check_size(frame.width as u64, frame.height as u64, path)?;
    let decoded = catch_unwind(AssertUnwindSafe(
        || -> std::io::Result<(RgbImage, Orientation)> {
            let mut jpeg =
                mozjpeg::Decompress::with_markers(&[mozjpeg::Marker::APP(1)]).from_mem(bytes)?;
            let (w, h) = jpeg.size();
            // libjpeg's own reading of the frame, in case it differs from ours (two frames).
            if (w as u64) * (h as u64) > MAX_PIXELS || w.max(h) > MAX_IMAGE_SIDE as usize {
                return Err(std::io::Error::other("Image size exceeds limit"));
            }
            jpeg.scale(scale_eighths(w as u32, h as u32, shorter));
            let orientation = jpeg
                .markers()
                .find_map(|m| {
                    m.data
                        .strip_prefix(b"Exif\0\0")
                        .and_then(Orientation::from_exif_chunk)
                })
                .unwrap_or(Orientation::NoTransforms);
            let mut rgb = jpeg.rgb()?;
            let (w, h) = (rgb.width() as u32, rgb.height() as u32);
            let pixels: Vec<u8> = rgb.read_scanlines()?;
            rgb.finish()?;
            let image = RgbImage::from_raw(w, h, pixels).ok_or_else(|| {
                std::io::Error::other(format!("libjpeg returned too few pixels for {w}x{h}"))
            })?;
            Ok((image, orientation))
        },
    ));
    let (image, orientation) = match decoded {
        Ok(Ok(decoded)) => decoded,
        Ok(Err(e)) => return Err(failure(path, e.to_string())),
        Err(panic) => {
            let reason = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg failed".into());
            return Err(failure(path, reason));
        }
    };
    let mut image = DynamicImage::ImageRgb8(image);
    image.apply_orientation(orientation);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jpeg(w: u32, h: u32, quality: u8, exif: Option<Vec<u8>>) -> Vec<u8> {
        use image::ImageEncoder;
        let image = RgbImage::from_fn(w, h, |x, y| {
            image::Rgb([(x * 255 / w) as u8, (y * 255 / h) as u8, 90])
        });
        let mut bytes = Vec::new();
        let mut encoder = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut bytes, quality);
        if let Some(exif) = exif {
            encoder.set_exif_metadata(exif).unwrap();
        }
        encoder
            .write_image(image.as_raw(), w, h, image::ExtendedColorType::Rgb8)
            .unwrap();
        bytes
    }

    #[test]
    fn the_scale_keeps_the_shorter_side_long_enough() {
        assert_eq!(scale_eighths(4000, 3000, 256), 1);
        assert_eq!(scale_eighths(4000, 3000, 376), 2);
        assert_eq!(scale_eighths(500, 375, 256), 8);
        assert_eq!(scale_eighths(1024, 2048, 256), 2);
        assert_eq!(scale_eighths(2040, 2040, 256), 2);
        assert_eq!(scale_eighths(2041, 2041, 256), 1, "255.1 rounds up to 256");
        assert_eq!(scale_eighths(2048, 2048, 256), 1);
        assert_eq!(scale_eighths(100, 100, 256), 8);
    }

    #[test]
    fn sequential_jpegs_are_recognised_and_others_are_not() {
        assert_eq!(
            sequential_jpeg(&jpeg(40, 30, 90, None)),
            Some(Frame {
                width: 40,
                height: 30
            })
        );
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures/odd-images");
        let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
        assert_eq!(sequential_jpeg(&read("cmyk.jpg")), None, "four components");
        assert!(sequential_jpeg(&read("gray.jpg")).is_some());
        assert_eq!(sequential_jpeg(&read("rgba.png")), None);
        assert_eq!(sequential_jpeg(b"\xFF\xD8\xFF"), None, "cut in a marker");
        assert_eq!(
            sequential_jpeg(b"\xFF\xD8\xFF\xE0\xFF\xFF"),
            None,
            "overlong segment"
        );
    }

    #[test]
    fn a_large_jpeg_is_decoded_at_reduced_scale_close_to_the_full_decode() {
        let bytes = jpeg(1600, 1200, 92, None);
        let path = Path::new("big.jpg");
        let small = decode_at_least(&bytes, path, 256).unwrap();
        assert_eq!(
            (small.width(), small.height()),
            (400, 300),
            "1/4 of the size"
        );
        let full = decode_at_least(&bytes, path, 1200).unwrap();
        assert_eq!((full.width(), full.height()), (1600, 1200));
        // The reduced decode is the full image averaged over 4x4 blocks, within JPEG's error.
        let (small, full) = (small.to_rgb8(), full.to_rgb8());
        for (x, y) in [(10, 10), (200, 150), (390, 290)] {
            for c in 0..3 {
                let block: u32 = (0..16)
                    .map(|i| full.get_pixel(x * 4 + i % 4, y * 4 + i / 4).0[c] as u32)
                    .sum();
                let want = block as i32 / 16;
                let got = small.get_pixel(x, y).0[c] as i32;
                assert!(
                    (got - want).abs() <= 6,
                    "({x}, {y}) channel {c}: {got} vs {want}"
                );
            }
        }
    }

    /// The current fast pipeline's decode: a JPEG that can only be decoded at full scale gets the
    /// reference decoder's pixels exactly; a large one is decoded at reduced scale, as the first
    /// fast pipeline does.
    #[test]
    fn only_reduced_scale_decodes_leave_the_reference_decoder() {
        let path = Path::new("x.jpg");
        let small = jpeg(500, 375, 90, None);
        let reference = decode_image(&small, path).unwrap().to_rgb8();
        let reduced = decode_reduced(&small, path, 256).unwrap().to_rgb8();
        assert_eq!(reduced.dimensions(), (500, 375));
        assert_eq!(reduced.as_raw(), reference.as_raw());
        let large = jpeg(2400, 1800, 90, None);
        let (now, v1) = (
            decode_reduced(&large, path, 256).unwrap().to_rgb8(),
            decode_at_least(&large, path, 256).unwrap().to_rgb8(),
        );
        assert_eq!(now.dimensions(), (600, 450));
        assert_eq!(now.as_raw(), v1.as_raw());
    }

    #[test]
    fn the_reduced_decode_applies_the_exif_orientation() {
        // TIFF header + one IFD entry: Orientation (0x0112) = 6, "rotate 90 degrees clockwise".
        let exif = vec![
            0x49, 0x49, 0x2A, 0, 8, 0, 0, 0, 1, 0, 0x12, 0x01, 3, 0, 1, 0, 0, 0, 6, 0, 0, 0, 0, 0,
            0, 0,
        ];
        let bytes = jpeg(1600, 800, 90, Some(exif));
        let image = decode_at_least(&bytes, Path::new("r.jpg"), 200).unwrap();
        assert_eq!((image.width(), image.height()), (200, 400));
    }

    #[test]
    fn reduced_decoding_keeps_the_limits_and_errors() {
        let path = Path::new("x.jpg");
        let mut bytes = jpeg(64, 48, 90, None);
        // Declare 16385 x 48: over the side limit, rejected before any decoding.
        let sof = bytes.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        bytes[sof + 7..sof + 9].copy_from_slice(&16_385u16.to_be_bytes());
        let err = decode_at_least(&bytes, path, 16).unwrap_err().to_string();
        assert_eq!(err, "x.jpg: cannot decode image: Image size exceeds limit");
        // A truncated scan still decodes, the missing rows gray.
        let good = jpeg(640, 480, 90, None);
        let image = decode_at_least(&good[..good.len() / 3], path, 100).unwrap();
        assert_eq!((image.width(), image.height()), (160, 120));
        // Garbage after a valid frame header: libjpeg's error, with the path.
        let mut broken = good[..sof_end(&good)].to_vec();
        broken.extend_from_slice(&[0xFF, 0xDA, 0, 2, 1, 2, 3]);
        let err = decode_at_least(&broken, path, 100).unwrap_err().to_string();
        assert!(err.starts_with("x.jpg: cannot decode image: "), "{err}");
    }

    /// Seeded mutations of a JPEG (bytes overwritten, runs deleted, cut short) through the
    /// reduced-scale path: each decodes or is an error, never a panic or an abort.
    #[test]
    fn mutated_jpegs_decode_or_fail_cleanly() {
        let good = jpeg(320, 240, 85, None);
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = |below: usize| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % below as u64) as usize
        };
        let (mut decoded, mut failed) = (0, 0);
        for _ in 0..400 {
            let mut bytes = good.clone();
            for _ in 0..1 + next(8) {
                let at = next(bytes.len());
                match next(3) {
                    0 => bytes[at] = next(256) as u8,
                    1 => {
                        let end = (at + 1 + next(64)).min(bytes.len());
                        bytes.drain(at..end);
                    }
                    _ => bytes.truncate(at.max(2)),
                }
            }
            match decode_at_least(&bytes, Path::new("m.jpg"), 60) {
                Ok(image) => {
                    decoded += 1;
                    assert!(image.width() <= 16_384 && image.height() <= 16_384);
                }
                Err(e) => {
                    failed += 1;
                    assert!(
                        e.to_string().starts_with("m.jpg: cannot decode image: "),
                        "{e}"
                    );
                }
            }
        }
        assert!(
            decoded > 0 && failed > 0,
            "{decoded} decoded, {failed} failed"
        );
    }

    /// The end of the frame header of `jpeg`.
    fn sof_end(jpeg: &[u8]) -> usize {
        let sof = jpeg.windows(2).position(|w| w == [0xFF, 0xC0]).unwrap();
        sof + 2 + u16::from_be_bytes([jpeg[sof + 2], jpeg[sof + 3]]) as usize
    }
}
