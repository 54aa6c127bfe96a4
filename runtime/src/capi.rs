//! C ABI for embedding the runtime in C and C++ applications (`include/graft.h`, example in
//! `examples/c/classify.c`).
//!
//! Conventions: functions that can fail return `NULL` or a negative number, and
//! [`graft_last_error`] then describes the failure (per thread). Strings returned by the library
//! are owned by it; nothing returned needs freeing except the model itself. No Rust panic crosses
//! the boundary.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::Path;

use image::DynamicImage;

use crate::artifact::Artifact;
use crate::model::{Classification, Model};
use crate::preprocess::raw::{PixelFormat, RawImage};

/// A loaded artifact. Opaque to C; safe to share between threads.
pub struct GraftModel {
    model: Model,
    labels: Vec<CString>,
}

impl GraftModel {
    fn new(model: Model) -> *mut GraftModel {
        let labels = model
            .labels()
            .iter()
            .map(|l| CString::new(l.replace('\0', " ")).expect("no NUL"))
            .collect();
        Box::into_raw(Box::new(GraftModel { model, labels }))
    }
}

/// Version of this C interface: raised when a function changes or goes away (not when one is
/// added). A program built against `graft.h` can compare it with [`graft_abi_version`].
pub const GRAFT_ABI_VERSION: u32 = 2;

/// The pixel layouts of [`graft_classify_pixels`] and [`graft_logits_pixels`] (their `format`
/// argument): `GraftPixelFormat` in `graft.h`.
pub use crate::preprocess::raw::PixelFormat as GraftPixelFormat;

/// One entry of a top-k answer.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct GraftLabelScore {
    /// Index of the class; its name is `graft_model_label(model, index)`.
    pub index: u32,
    /// Probability of the class.
    pub probability: f32,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

fn set_error(message: impl Into<String>) {
    let message = message.into().replace('\0', " ");
    LAST_ERROR.with(|e| *e.borrow_mut() = CString::new(message).expect("no NUL"));
}

/// Runs `f`, turning an error or a panic into the thread's last error and `fallback`.
fn guarded<T>(fallback: T, f: impl FnOnce() -> Result<T, String>) -> T {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(v)) => v,
        Ok(Err(message)) => {
            set_error(message);
            fallback
        }
        Err(_) => {
            set_error("internal error: graft panicked");
            fallback
        }
    }
}

/// The message of the last failed call on this thread ("" if none). Valid until the next failing
/// call on the same thread.
#[no_mangle]
pub extern "C" fn graft_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ptr())
}

/// The version of this C interface the library implements ([`GRAFT_ABI_VERSION`] of the
/// `graft.h` it was built with).
#[no_mangle]
pub extern "C" fn graft_abi_version() -> u32 {
    GRAFT_ABI_VERSION
}

/// The library's version ("0.1.0"), a static string.
#[no_mangle]
pub extern "C" fn graft_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// Loads and prepares the artifact at `path` (a NUL-terminated UTF-8 path), memory-mapped.
/// Returns `NULL` on failure.
///
/// # Safety
/// `path` must be a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn graft_model_load(path: *const c_char) -> *mut GraftModel {
    guarded(std::ptr::null_mut(), || {
        // SAFETY: NULL or a NUL-terminated string, per the contract.
        let path = unsafe { path_argument("graft_model_load", path) }?;
        let model = Model::load(path).map_err(|e| e.to_string())?;
        Ok(GraftModel::new(model))
    })
}

/// Loads and prepares an artifact held in memory (`len` bytes at `data`: read from flash, or
/// embedded in the program), with the same checks as [`graft_model_load`]. The bytes are
/// copied: the buffer may be freed once this returns. Returns `NULL` on failure.
///
/// # Safety
/// `data` must point to `len` readable bytes.
#[no_mangle]
pub unsafe extern "C" fn graft_model_load_buffer(data: *const u8, len: usize) -> *mut GraftModel {
    guarded(std::ptr::null_mut(), || {
        if data.is_null() {
            return Err("graft_model_load_buffer: data is NULL".into());
        }
        // SAFETY: the caller promises len readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(data, len) }.to_vec();
        let artifact = Artifact::from_bytes(bytes, "(memory buffer)").map_err(|e| e.to_string())?;
        let model = Model::from_artifact(artifact).map_err(|e| e.to_string())?;
        Ok(GraftModel::new(model))
    })
}

/// Frees a model returned by [`graft_model_load`]. `NULL` is ignored.
///
/// # Safety
/// `model` must come from `graft_model_load` and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn graft_model_free(model: *mut GraftModel) {
    if !model.is_null() {
        // SAFETY: the pointer came from Box::into_raw in graft_model_load.
        drop(unsafe { Box::from_raw(model) });
    }
}

/// Number of classes, or 0 if `model` is `NULL`.
///
/// # Safety
/// `model` must be `NULL` or a live model.
#[no_mangle]
pub unsafe extern "C" fn graft_model_num_labels(model: *const GraftModel) -> usize {
    // SAFETY: NULL or a live model, per the contract.
    unsafe { model.as_ref() }.map_or(0, |m| m.labels.len())
}

/// Name of class `index`, owned by the model, or `NULL` when out of range.
///
/// # Safety
/// `model` must be `NULL` or a live model.
#[no_mangle]
pub unsafe extern "C" fn graft_model_label(
    model: *const GraftModel,
    index: usize,
) -> *const c_char {
    // SAFETY: NULL or a live model, per the contract.
    unsafe { model.as_ref() }
        .and_then(|m| m.labels.get(index))
        .map_or(std::ptr::null(), |l| l.as_ptr())
}

/// Writes the model's input size (the centre crop every image is resized to) to `width` and
/// `height`. Returns 0, or -1 when an argument is `NULL`.
///
/// # Safety
/// `model` must be `NULL` or a live model; `width` and `height` `NULL` or writable.
#[no_mangle]
pub unsafe extern "C" fn graft_model_input_size(
    model: *const GraftModel,
    width: *mut u32,
    height: *mut u32,
) -> c_int {
    guarded(-1, || {
        // SAFETY: NULL or a live model, per the contract.
        let model = unsafe { model.as_ref() }.ok_or("graft_model_input_size: model is NULL")?;
        if width.is_null() || height.is_null() {
            return Err("graft_model_input_size: width or height is NULL".into());
        }
        let [h, w] = model.model.manifest().preprocessing.crop;
        // SAFETY: both checked non-NULL; the caller promises they are writable.
        unsafe {
            *width = w;
            *height = h;
        }
        Ok(0)
    })
}

fn write_top_k(
    function: &str,
    model: &GraftModel,
    image: &DynamicImage,
    out: *mut GraftLabelScore,
    k: usize,
) -> Result<c_int, String> {
    if out.is_null() || k == 0 {
        return Err(format!("{function}: the output array is NULL or k is 0"));
    }
    let result = model.model.classify(image).map_err(|e| e.to_string())?;
    let top = result.top_k(k, model.model.labels());
    // SAFETY: the caller provides room for k entries; top has at most k.
    let out = unsafe { std::slice::from_raw_parts_mut(out, k) };
    for (slot, score) in out.iter_mut().zip(&top) {
        *slot = GraftLabelScore {
            index: score.index as u32,
            probability: score.probability,
        };
    }
    Ok(top.len() as c_int)
}

/// The image in a caller's buffer, checked.
///
/// # Safety
/// `pixels` must be `NULL` or point to `stride * (height - 1) + width * channels` readable bytes.
unsafe fn raw_image(
    function: &str,
    pixels: *const u8,
    (width, height, stride): (u32, u32, usize),
    format: u32,
) -> Result<DynamicImage, String> {
    let format = PixelFormat::from_code(format)
        .ok_or_else(|| format!("{function}: unknown pixel format {format}"))?;
    if pixels.is_null() {
        return Err(format!("{function}: pixels is NULL"));
    }
    let len = RawImage::required_len(width, height, stride, format)
        .map_err(|e| format!("{function}: {e}"))?;
    // SAFETY: the caller guarantees the bytes of a stride x height image.
    let pixels = unsafe { std::slice::from_raw_parts(pixels, len) };
    RawImage {
        pixels,
        width,
        height,
        stride,
        format,
    }
    .to_image()
    .map_err(|e| format!("{function}: {e}"))
}

/// Classifies an 8-bit RGB image (`height` rows of `stride` bytes, the first `3 * width` of each
/// holding R, G, B), writing the `k` most probable classes to `out` (most probable first).
/// Returns how many entries were written (at most `k`), or -1 on failure. The same as
/// [`graft_classify_pixels`] with `GRAFT_PIXEL_FORMAT_RGB8`.
///
/// # Safety
/// `model` must be a live model, `rgb` must point to `stride * height` readable bytes and `out`
/// to `k` writable entries.
#[no_mangle]
pub unsafe extern "C" fn graft_classify_rgb(
    model: *const GraftModel,
    rgb: *const u8,
    width: u32,
    height: u32,
    stride: usize,
    out: *mut GraftLabelScore,
    k: usize,
) -> c_int {
    // SAFETY: the same contract, with the RGB layout.
    unsafe {
        graft_classify_pixels(
            model,
            rgb,
            width,
            height,
            stride,
            PixelFormat::Rgb8 as u32,
            out,
            k,
        )
    }
}

/// Classifies an 8-bit image in any [`GraftPixelFormat`] (`height` rows of `stride` bytes, the
/// first `width * channels` of each holding the pixels; alpha is ignored, gray is used for all
/// three channels), writing the `k` most probable classes to `out` (most probable first).
/// Returns how many entries were written (at most `k`), or -1 on failure.
///
/// # Safety
/// `model` must be a live model, `pixels` must point to the image's bytes and `out` to `k`
/// writable entries.
#[no_mangle]
pub unsafe extern "C" fn graft_classify_pixels(
    model: *const GraftModel,
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
    format: u32,
    out: *mut GraftLabelScore,
    k: usize,
) -> c_int {
    guarded(-1, || {
        // SAFETY: NULL or a live model, per the contract.
        let model = unsafe { model.as_ref() }.ok_or("graft_classify_pixels: model is NULL")?;
        // SAFETY: the caller's buffer, per the contract.
        let image = unsafe {
            raw_image(
                "graft_classify_pixels",
                pixels,
                (width, height, stride),
                format,
            )
        }?;
        write_top_k("graft_classify_pixels", model, &image, out, k)
    })
}

/// Writes the raw scores before the softmax (one per class, in label order) to `out`, which
/// holds `len` floats. Returns the number of classes, or -1 on failure (`len` smaller than the
/// number of classes included).
fn write_logits(
    function: &str,
    result: Classification,
    out: *mut f32,
    len: usize,
) -> Result<c_int, String> {
    if out.is_null() {
        return Err(format!("{function}: out is NULL"));
    }
    let n = result.logits.len();
    if len < n {
        return Err(format!(
            "{function}: out holds {len} floats, the model has {n} classes"
        ));
    }
    // SAFETY: the caller provides room for len >= n floats.
    unsafe { std::slice::from_raw_parts_mut(out, n) }.copy_from_slice(&result.logits);
    Ok(n as c_int)
}

/// The logits (raw scores before the softmax, in label order) of an image in a caller's
/// buffer, as [`graft_classify_pixels`] takes it, written to `out` (room for `len` floats, at
/// least [`graft_model_num_labels`]). Returns the number of classes, or -1 on failure.
///
/// # Safety
/// `model` must be a live model, `pixels` must point to the image's bytes and `out` to `len`
/// writable floats.
#[no_mangle]
pub unsafe extern "C" fn graft_logits_pixels(
    model: *const GraftModel,
    pixels: *const u8,
    width: u32,
    height: u32,
    stride: usize,
    format: u32,
    out: *mut f32,
    len: usize,
) -> c_int {
    guarded(-1, || {
        let function = "graft_logits_pixels";
        // SAFETY: NULL or a live model, per the contract.
        let model = unsafe { model.as_ref() }.ok_or(format!("{function}: model is NULL"))?;
        // SAFETY: the caller's buffer, per the contract.
        let image = unsafe { raw_image(function, pixels, (width, height, stride), format) }?;
        let result = model.model.classify(&image).map_err(|e| e.to_string())?;
        write_logits(function, result, out, len)
    })
}

/// The logits of the image file at `path`, like [`graft_logits_pixels`].
///
/// # Safety
/// `model` must be a live model, `path` a NUL-terminated string, `out` `len` writable floats.
#[no_mangle]
pub unsafe extern "C" fn graft_logits_file(
    model: *const GraftModel,
    path: *const c_char,
    out: *mut f32,
    len: usize,
) -> c_int {
    guarded(-1, || {
        let function = "graft_logits_file";
        // SAFETY: NULL or a live model, per the contract.
        let model = unsafe { model.as_ref() }.ok_or(format!("{function}: model is NULL"))?;
        // SAFETY: NULL or a NUL-terminated string, per the contract.
        let path = unsafe { path_argument(function, path) }?;
        let result = model
            .model
            .classify_path(Path::new(path))
            .map_err(|e| e.to_string())?;
        write_logits(function, result, out, len)
    })
}

/// A `const char *` path argument as UTF-8.
///
/// # Safety
/// `path` must be `NULL` or a NUL-terminated string that outlives the returned reference.
unsafe fn path_argument<'a>(function: &str, path: *const c_char) -> Result<&'a str, String> {
    if path.is_null() {
        return Err(format!("{function}: path is NULL"));
    }
    // SAFETY: the caller promises a NUL-terminated string.
    unsafe { CStr::from_ptr(path) }
        .to_str()
        .map_err(|_| format!("{function}: path is not UTF-8"))
}

/// Reads, decodes and classifies the image file at `path` (JPEG, PNG, GIF, WebP), like
/// [`graft_classify_rgb`].
///
/// # Safety
/// `model` must be a live model, `path` a NUL-terminated string, `out` `k` writable entries.
#[no_mangle]
pub unsafe extern "C" fn graft_classify_file(
    model: *const GraftModel,
    path: *const c_char,
    out: *mut GraftLabelScore,
    k: usize,
) -> c_int {
    guarded(-1, || {
        // SAFETY: NULL or a live model, per the contract.
        let model = unsafe { model.as_ref() }.ok_or("graft_classify_file: model is NULL")?;
        // SAFETY: NULL or a NUL-terminated string, per the contract.
        let path = unsafe { path_argument("graft_classify_file", path) }?;
        let image = model
            .model
            .manifest()
            .preprocessing
            .load(Path::new(path))
            .map_err(|e| e.to_string())?;
        write_top_k("graft_classify_file", model, &image, out, k)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_are_reported_not_panicked() {
        let path = CString::new("/no/such/model.graft").unwrap();
        // SAFETY: valid C string.
        let model = unsafe { graft_model_load(path.as_ptr()) };
        assert!(model.is_null());
        // SAFETY: graft_last_error returns a valid C string.
        let message = unsafe { CStr::from_ptr(graft_last_error()) }
            .to_str()
            .unwrap();
        assert_eq!(
            message,
            "/no/such/model.graft: No such file or directory (os error 2)"
        );
        let mut out = [GraftLabelScore::default(); 2];
        // SAFETY: a NULL model is allowed and reported.
        let n = unsafe {
            graft_classify_rgb(
                std::ptr::null(),
                [0u8; 3].as_ptr(),
                1,
                1,
                3,
                out.as_mut_ptr(),
                2,
            )
        };
        assert_eq!(n, -1);
        // SAFETY: NULL is accepted by these accessors.
        unsafe {
            assert_eq!(graft_model_num_labels(std::ptr::null()), 0);
            assert!(graft_model_label(std::ptr::null(), 0).is_null());
            graft_model_free(std::ptr::null_mut());
        }
    }

    fn last_error() -> String {
        // SAFETY: graft_last_error returns a valid C string.
        unsafe { CStr::from_ptr(graft_last_error()) }
            .to_str()
            .unwrap()
            .to_string()
    }

    #[test]
    fn the_header_declares_this_abi_version() {
        let header = include_str!("../include/graft.h");
        assert!(header.contains(&format!("#define GRAFT_ABI_VERSION {GRAFT_ABI_VERSION}\n")));
    }

    #[test]
    fn version_queries() {
        assert_eq!(graft_abi_version(), GRAFT_ABI_VERSION);
        // SAFETY: graft_version returns a static C string.
        let version = unsafe { CStr::from_ptr(graft_version()) };
        assert_eq!(version.to_str().unwrap(), env!("CARGO_PKG_VERSION"));
    }

    #[test]
    fn new_functions_refuse_null_and_wrong_sizes() {
        // SAFETY: every call below passes NULL or valid buffers of the stated sizes.
        unsafe {
            assert!(graft_model_load_buffer(std::ptr::null(), 10).is_null());
            assert_eq!(last_error(), "graft_model_load_buffer: data is NULL");
            let bytes = b"GRAFTART and then nothing";
            assert!(graft_model_load_buffer(bytes.as_ptr(), bytes.len()).is_null());
            assert!(
                last_error().starts_with("(memory buffer): artifact is truncated or corrupt"),
                "{}",
                last_error()
            );
            assert!(graft_model_load_buffer(b"JPEG".as_ptr(), 4).is_null());
            assert_eq!(
                last_error(),
                "(memory buffer): not a graft artifact (missing the GRAFTART magic bytes)"
            );

            let (mut w, mut h) = (0u32, 0u32);
            assert_eq!(graft_model_input_size(std::ptr::null(), &mut w, &mut h), -1);
            assert_eq!(last_error(), "graft_model_input_size: model is NULL");

            let mut scores = [GraftLabelScore::default(); 2];
            let pixels = [0u8; 16];
            let n = graft_classify_pixels(
                std::ptr::null(),
                pixels.as_ptr(),
                2,
                2,
                8,
                2,
                scores.as_mut_ptr(),
                2,
            );
            assert_eq!(
                (n, last_error().as_str()),
                (-1, "graft_classify_pixels: model is NULL")
            );
            let mut logits = [0f32; 4];
            let n = graft_logits_pixels(
                std::ptr::null(),
                pixels.as_ptr(),
                2,
                2,
                8,
                2,
                logits.as_mut_ptr(),
                4,
            );
            assert_eq!(
                (n, last_error().as_str()),
                (-1, "graft_logits_pixels: model is NULL")
            );
            let path = CString::new("a.jpg").unwrap();
            let n = graft_logits_file(std::ptr::null(), path.as_ptr(), logits.as_mut_ptr(), 4);
            assert_eq!(
                (n, last_error().as_str()),
                (-1, "graft_logits_file: model is NULL")
            );
        }
    }

    #[test]
    fn raw_images_are_checked_before_they_are_read() {
        let pixels = [0u8; 16];
        // SAFETY: the buffers hold what each call says, or the call is refused before reading.
        unsafe {
            let err = |r: Result<DynamicImage, String>| r.unwrap_err();
            assert_eq!(
                err(raw_image("f", pixels.as_ptr(), (2, 2, 8), 9)),
                "f: unknown pixel format 9"
            );
            assert_eq!(
                err(raw_image("f", std::ptr::null(), (2, 2, 8), 2)),
                "f: pixels is NULL"
            );
            assert_eq!(
                err(raw_image("f", pixels.as_ptr(), (2, 2, 7), 2)),
                "f: stride 7 is less than a row of 2 Rgba8 pixels (8 bytes)"
            );
            assert_eq!(
                err(raw_image("f", pixels.as_ptr(), (0, 2, 8), 2)),
                "f: image is 0x2: both sides must be at least 1 pixel"
            );
            let image = raw_image("f", pixels.as_ptr(), (2, 2, 8), 2).unwrap();
            assert_eq!((image.width(), image.height()), (2, 2));
        }
        let result = Classification {
            probabilities: vec![0.5, 0.5],
            logits: vec![1.0, 2.0],
        };
        let mut out = [0f32; 1];
        assert_eq!(
            write_logits("f", result.clone(), out.as_mut_ptr(), 1).unwrap_err(),
            "f: out holds 1 floats, the model has 2 classes"
        );
        assert_eq!(
            write_logits("f", result.clone(), std::ptr::null_mut(), 2).unwrap_err(),
            "f: out is NULL"
        );
        let mut out = [0f32; 3];
        assert_eq!(write_logits("f", result, out.as_mut_ptr(), 3), Ok(2));
        assert_eq!(out, [1.0, 2.0, 0.0]);
    }
}
