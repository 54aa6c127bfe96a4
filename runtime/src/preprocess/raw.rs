//! Raw pixel buffers (camera frames, NumPy arrays, the C API's buffers) as images: 8-bit RGB, BGR,
//! RGBA, BGRA or grayscale rows with a stride, checked against their declared size and turned into
//! the RGB image the artifact's preprocessing runs on. Alpha is dropped (camera frames are
//! opaque); gray is replicated to three channels, as the `image` crate converts it.

use image::{DynamicImage, RgbImage};

use crate::error::{Error, Result};

/// How the bytes of one pixel are laid out (`GraftPixelFormat` in the C API, whose `format`
/// arguments take these values).
#[repr(u32)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PixelFormat {
    /// 3 bytes a pixel: red, green, blue.
    Rgb8 = 0,
    /// 3 bytes a pixel: blue, green, red (OpenCV's order).
    Bgr8 = 1,
    /// 4 bytes a pixel: red, green, blue, alpha (ignored).
    Rgba8 = 2,
    /// 4 bytes a pixel: blue, green, red, alpha (ignored).
    Bgra8 = 3,
    /// 1 byte a pixel: gray, used for all three channels.
    Gray8 = 4,
}

impl PixelFormat {
    /// The format with C code `code` (the enum's discriminant), if any.
    pub fn from_code(code: u32) -> Option<PixelFormat> {
        [
            PixelFormat::Rgb8,
            PixelFormat::Bgr8,
            PixelFormat::Rgba8,
            PixelFormat::Bgra8,
            PixelFormat::Gray8,
        ]
        .into_iter()
        .find(|f| *f as u32 == code)
    }

    /// Bytes per pixel.
    pub fn channels(self) -> usize {
        match self {
            PixelFormat::Rgb8 | PixelFormat::Bgr8 => 3,
            PixelFormat::Rgba8 | PixelFormat::Bgra8 => 4,
            PixelFormat::Gray8 => 1,
        }
    }

    /// The RGB value of one pixel's bytes.
    #[inline]
    fn rgb(self, px: &[u8]) -> [u8; 3] {
        match self {
            PixelFormat::Rgb8 | PixelFormat::Rgba8 => [px[0], px[1], px[2]],
            PixelFormat::Bgr8 | PixelFormat::Bgra8 => [px[2], px[1], px[0]],
            PixelFormat::Gray8 => [px[0]; 3],
        }
    }
}

/// A borrowed image: `height` rows `stride` bytes apart, each starting with `width` pixels.
#[derive(Debug, Clone, Copy)]
pub struct RawImage<'a> {
    /// The bytes, at least `stride * (height - 1) + width * channels` of them.
    pub pixels: &'a [u8],
    /// Pixels per row.
    pub width: u32,
    /// Rows.
    pub height: u32,
    /// Bytes from one row to the next.
    pub stride: usize,
    /// Layout of one pixel.
    pub format: PixelFormat,
}

impl RawImage<'_> {
    /// The bytes a `width` x `height` image with `stride` and `format` needs, or an error naming
    /// what is wrong with the geometry.
    pub fn required_len(
        width: u32,
        height: u32,
        stride: usize,
        format: PixelFormat,
    ) -> Result<usize> {
        let row = width as usize * format.channels();
        if width == 0 || height == 0 {
            return Err(Error::InvalidOption(format!(
                "image is {width}x{height}: both sides must be at least 1 pixel"
            )));
        }
        if stride < row {
            return Err(Error::InvalidOption(format!(
                "stride {stride} is less than a row of {width} {format:?} pixels ({row} bytes)"
            )));
        }
        stride
            .checked_mul(height as usize - 1)
            .and_then(|n| n.checked_add(row))
            .ok_or_else(|| Error::InvalidOption("image size overflows".into()))
    }

    /// The image as RGB, after checking that the buffer holds it.
    pub fn to_image(&self) -> Result<DynamicImage> {
        let needed = Self::required_len(self.width, self.height, self.stride, self.format)?;
        if self.pixels.len() < needed {
            return Err(Error::InvalidOption(format!(
                "a {}x{} {:?} image with stride {} needs {needed} bytes, the buffer has {}",
                self.width,
                self.height,
                self.format,
                self.stride,
                self.pixels.len()
            )));
        }
        let (width, channels) = (self.width as usize, self.format.channels());
        let mut rgb = Vec::with_capacity(3 * width * self.height as usize);
        for y in 0..self.height as usize {
            let row = &self.pixels[y * self.stride..y * self.stride + width * channels];
            if self.format == PixelFormat::Rgb8 {
                rgb.extend_from_slice(row);
            } else {
                rgb.extend(
                    row.chunks_exact(channels)
                        .flat_map(|px| self.format.rgb(px)),
                );
            }
        }
        let image = RgbImage::from_raw(self.width, self.height, rgb).expect("buffer size matches");
        Ok(DynamicImage::ImageRgb8(image))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_format_gives_the_same_rgb_image() {
        let rgb: Vec<u8> = (0..2 * 3 * 3).map(|v| (v * 7) as u8).collect();
        let reference = RawImage {
            pixels: &rgb,
            width: 3,
            height: 2,
            stride: 9,
            format: PixelFormat::Rgb8,
        }
        .to_image()
        .unwrap();
        for format in [PixelFormat::Bgr8, PixelFormat::Rgba8, PixelFormat::Bgra8] {
            let stride = 3 * format.channels() + 5; // padded rows
            let mut bytes = vec![0u8; stride * 2];
            for y in 0..2 {
                for x in 0..3 {
                    let [r, g, b] = [0, 1, 2].map(|c| rgb[y * 9 + x * 3 + c]);
                    let px = match format {
                        PixelFormat::Bgr8 => vec![b, g, r],
                        PixelFormat::Rgba8 => vec![r, g, b, 255],
                        _ => vec![b, g, r, 255],
                    };
                    let at = y * stride + x * format.channels();
                    bytes[at..at + px.len()].copy_from_slice(&px);
                }
            }
            let image = RawImage {
                pixels: &bytes,
                width: 3,
                height: 2,
                stride,
                format,
            }
            .to_image()
            .unwrap();
            assert_eq!(image, reference, "{format:?}");
        }
        let gray = RawImage {
            pixels: &[10, 20],
            width: 2,
            height: 1,
            stride: 2,
            format: PixelFormat::Gray8,
        }
        .to_image()
        .unwrap();
        assert_eq!(gray.to_rgb8().into_raw(), [10, 10, 10, 20, 20, 20]);
    }

    #[test]
    fn short_buffers_and_bad_geometry_are_errors() {
        let raw = |pixels: &'static [u8], width, stride| RawImage {
            pixels,
            width,
            height: 2,
            stride,
            format: PixelFormat::Rgb8,
        };
        let message = |r: RawImage| r.to_image().unwrap_err().to_string();
        assert!(raw(&[0; 6], 1, 3).to_image().is_ok());
        assert_eq!(
            message(raw(&[0; 5], 1, 3)),
            "a 1x2 Rgb8 image with stride 3 needs 6 bytes, the buffer has 5"
        );
        assert_eq!(
            message(raw(&[0; 12], 2, 5)),
            "stride 5 is less than a row of 2 Rgb8 pixels (6 bytes)"
        );
        assert_eq!(
            message(raw(&[0; 12], 0, 5)),
            "image is 0x2: both sides must be at least 1 pixel"
        );
        assert_eq!(PixelFormat::from_code(4), Some(PixelFormat::Gray8));
        assert_eq!(PixelFormat::from_code(5), None);
    }
}
