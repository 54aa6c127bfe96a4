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

use image::{DynamicImage, RgbImage};

use crate::model::Model;

/// A loaded artifact. Opaque to C; safe to share between threads.
pub struct GraftModel {
    model: Model,
    labels: Vec<CString>,
}

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

/// Loads and prepares the artifact at `path` (a NUL-terminated UTF-8 path). Returns `NULL` on
/// failure.
///
/// # Safety
/// `path` must be a valid NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn graft_model_load(path: *const c_char) -> *mut GraftModel {
    guarded(std::ptr::null_mut(), || {
        if path.is_null() {
            return Err("graft_model_load: path is NULL".into());
        }
        // SAFETY: the caller promises a NUL-terminated string.
        let path = unsafe { CStr::from_ptr(path) }
            .to_str()
            .map_err(|_| "graft_model_load: path is not UTF-8".to_string())?;
        let model = Model::load(path).map_err(|e| e.to_string())?;
        let labels = model
            .labels()
            .iter()
            .map(|l| CString::new(l.replace('\0', " ")).expect("no NUL"))
            .collect();
        Ok(Box::into_raw(Box::new(GraftModel { model, labels })))
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

fn write_top_k(
    model: &GraftModel,
    image: &DynamicImage,
    out: *mut GraftLabelScore,
    k: usize,
) -> Result<c_int, String> {
    if out.is_null() || k == 0 {
        return Err("the output array is NULL or k is 0".into());
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

/// Classifies an 8-bit RGB image (`height` rows of `stride` bytes, the first `3 * width` of each
/// holding R, G, B), writing the `k` most probable classes to `out` (most probable first).
/// Returns how many entries were written (at most `k`), or -1 on failure.
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
    guarded(-1, || {
        // SAFETY: NULL or a live model, per the contract.
        let model = unsafe { model.as_ref() }.ok_or("graft_classify_rgb: model is NULL")?;
        if rgb.is_null() || width == 0 || height == 0 || stride < 3 * width as usize {
            return Err(format!(
                "graft_classify_rgb: invalid image ({width}x{height}, stride {stride})"
            ));
        }
        let row = 3 * width as usize;
        let len = stride
            .checked_mul(height as usize - 1)
            .and_then(|n| n.checked_add(row))
            .ok_or("graft_classify_rgb: image size overflows")?;
        // SAFETY: the caller guarantees stride * height readable bytes.
        let bytes = unsafe { std::slice::from_raw_parts(rgb, len) };
        let mut pixels = Vec::with_capacity(row * height as usize);
        for y in 0..height as usize {
            pixels.extend_from_slice(&bytes[y * stride..y * stride + row]);
        }
        let image = RgbImage::from_raw(width, height, pixels).expect("buffer size matches");
        write_top_k(model, &DynamicImage::ImageRgb8(image), out, k)
    })
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
        if path.is_null() {
            return Err("graft_classify_file: path is NULL".into());
        }
        // SAFETY: the caller promises a NUL-terminated string.
        let path = unsafe { CStr::from_ptr(path) }
            .to_str()
            .map_err(|_| "graft_classify_file: path is not UTF-8".to_string())?;
        let image = model
            .model
            .manifest()
            .preprocessing
            .load(Path::new(path))
            .map_err(|e| e.to_string())?;
        write_top_k(model, &image, out, k)
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
}
