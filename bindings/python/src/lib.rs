//! `graft_runtime`, the Python module: load a `.graft` artifact (memory-mapped) and classify
//! image files or NumPy arrays with the preprocessing the artifact records. A thin layer over the
//! `graft-runtime` crate (the runtime the `graft-run` binary and the C API use, built without its
//! CLI): the answers are the runtime's, bit for bit.
//!
//! The GIL is released while images are decoded, preprocessed and run, so Python threads
//! classify in parallel. Errors are `graft_runtime.GraftError` with the message `graft-run`
//! prints after "error: "; a malformed array is a `ValueError` (wrong shape) or `TypeError`
//! (not `uint8`).

use std::path::PathBuf;

use graft_runtime::preprocess::raw::{PixelFormat, RawImage};
use graft_runtime::{Classification, Model as RuntimeModel};
use image::DynamicImage;
use numpy::{PyArray1, PyReadonlyArrayDyn, PyUntypedArrayMethods};
use pyo3::exceptions::{PyException, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};
use pyo3::IntoPyObjectExt;

pyo3::create_exception!(
    graft_runtime,
    GraftError,
    PyException,
    "A graft artifact or image could not be loaded or run; the message names the file."
);

fn graft_error(e: graft_runtime::Error) -> PyErr {
    GraftError::new_err(e.to_string())
}

/// A graft artifact, memory-mapped and ready to classify. Safe to share between threads.
#[pyclass(frozen, module = "graft_runtime")]
struct Model {
    model: RuntimeModel,
    path: PathBuf,
}

/// A top-k answer: (label, probability) pairs, most probable first.
type TopK = Vec<(String, f32)>;

impl Model {
    fn top_k(&self, result: &Classification, k: usize) -> TopK {
        result
            .top_k(k, self.model.labels())
            .into_iter()
            .map(|s| (s.label, s.probability))
            .collect()
    }

    /// Classifies image files with the GIL released.
    fn classify_paths(&self, py: Python<'_>, paths: &[PathBuf]) -> PyResult<Vec<Classification>> {
        py.detach(|| {
            paths
                .iter()
                .map(|p| self.model.classify_path(p).map_err(graft_error))
                .collect()
        })
    }

    /// Classifies a decoded image with the GIL released.
    fn classify_image(&self, py: Python<'_>, image: &DynamicImage) -> PyResult<Classification> {
        py.detach(|| self.model.classify(image).map_err(graft_error))
    }
}

/// The image in a NumPy array: HxWx3 (RGB, or BGR with `bgr`), HxWx4 (RGBA / BGRA, alpha
/// ignored) or HxW (gray), `uint8`. Rows are read in place when each row's pixels are contiguous
/// (any C-contiguous array, or a crop of one); other layouts are copied first.
fn array_image(array: &PyReadonlyArrayDyn<'_, u8>, bgr: bool) -> PyResult<DynamicImage> {
    let shape = array.shape().to_vec();
    let format = match (&shape[..], bgr) {
        ([_, _, 3], false) => PixelFormat::Rgb8,
        ([_, _, 3], true) => PixelFormat::Bgr8,
        ([_, _, 4], false) => PixelFormat::Rgba8,
        ([_, _, 4], true) => PixelFormat::Bgra8,
        ([_, _], _) => PixelFormat::Gray8,
        _ => {
            return Err(PyValueError::new_err(format!(
            "expected an HxWx3 (RGB), HxWx4 (RGBA) or HxW (gray) uint8 array, got shape {shape:?}"
        )))
        }
    };
    let (height, width) = (shape[0], shape[1]);
    let too_large =
        |n: usize| u32::try_from(n).map_err(|_| PyValueError::new_err("array too large"));
    let (width32, height32) = (too_large(width)?, too_large(height)?);
    let view = array.as_array();
    let channels = format.channels() as isize;
    let strides = view.strides();
    let rows_contiguous = strides.len() >= 2
        && strides[0] >= 0
        && strides[1] == channels
        && (strides.len() == 2 || strides[2] == 1);
    let owned;
    let (pixels, stride) = if rows_contiguous && height > 0 && width > 0 {
        let stride = strides[0] as usize;
        let len = RawImage::required_len(width32, height32, stride, format).map_err(graft_error)?;
        // SAFETY: the array's first row starts at as_ptr(), its rows are `stride` bytes apart
        // with `width * channels` contiguous bytes each, so the `len` bytes from the start up to
        // the end of the last row lie inside the array's buffer; the readonly borrow keeps it
        // alive and unchanged while this function runs.
        (
            unsafe { std::slice::from_raw_parts(view.as_ptr(), len) },
            stride,
        )
    } else {
        owned = view.iter().copied().collect::<Vec<u8>>();
        (&owned[..], width * format.channels())
    };
    RawImage {
        pixels,
        width: width32,
        height: height32,
        stride,
        format,
    }
    .to_image()
    .map_err(graft_error)
}

/// One path, or a list/tuple of them.
enum Images {
    One(PathBuf),
    Many(Vec<PathBuf>),
}

fn images(arg: &Bound<'_, PyAny>) -> PyResult<Images> {
    if let Ok(path) = arg.extract::<PathBuf>() {
        return Ok(Images::One(path));
    }
    if arg.is_instance_of::<PyList>() || arg.is_instance_of::<PyTuple>() {
        return Ok(Images::Many(arg.extract::<Vec<PathBuf>>()?));
    }
    Err(PyValueError::new_err(
        "expected an image path (str or os.PathLike) or a list of them; for a NumPy array use predict_array",
    ))
}

#[pymethods]
impl Model {
    /// Loads and checks the artifact at `path` (memory-mapped).
    #[new]
    fn new(py: Python<'_>, path: PathBuf) -> PyResult<Model> {
        let model = py.detach(|| RuntimeModel::load(&path).map_err(graft_error))?;
        Ok(Model { model, path })
    }

    /// Class names, in the order of the model's outputs.
    #[getter]
    fn labels(&self) -> Vec<String> {
        self.model.labels().to_vec()
    }

    /// (height, width) of the model input: every image is resized and centre-cropped to it.
    #[getter]
    fn input_size(&self) -> (u32, u32) {
        let [height, width] = self.model.manifest().preprocessing.crop;
        (height, width)
    }

    /// The `top_k` most probable (label, probability) pairs of an image file, or a list of them
    /// for a list of files.
    #[pyo3(signature = (images, top_k = 5))]
    fn predict<'py>(
        &self,
        py: Python<'py>,
        images: &Bound<'py, PyAny>,
        top_k: usize,
    ) -> PyResult<Bound<'py, PyAny>> {
        match self::images(images)? {
            Images::One(path) => {
                let result = self.classify_paths(py, &[path])?;
                self.top_k(&result[0], top_k).into_bound_py_any(py)
            }
            Images::Many(paths) => self
                .classify_paths(py, &paths)?
                .iter()
                .map(|r| self.top_k(r, top_k))
                .collect::<Vec<_>>()
                .into_bound_py_any(py),
        }
    }

    /// The `top_k` most probable (label, probability) pairs of an image held in a NumPy
    /// `uint8` array: HxWx3 RGB (BGR with `bgr=True`, as OpenCV gives), HxWx4 RGBA (alpha
    /// ignored) or HxW gray; the artifact's resize, crop and normalisation are applied.
    #[pyo3(signature = (array, top_k = 5, bgr = false))]
    fn predict_array(
        &self,
        py: Python<'_>,
        array: PyReadonlyArrayDyn<'_, u8>,
        top_k: usize,
        bgr: bool,
    ) -> PyResult<TopK> {
        let image = array_image(&array, bgr)?;
        Ok(self.top_k(&self.classify_image(py, &image)?, top_k))
    }

    /// The raw scores before the softmax (float32, one per label) of an image file or a NumPy
    /// array (as `predict_array` takes it).
    #[pyo3(signature = (image, bgr = false))]
    fn logits<'py>(
        &self,
        py: Python<'py>,
        image: &Bound<'py, PyAny>,
        bgr: bool,
    ) -> PyResult<Bound<'py, PyArray1<f32>>> {
        let result = match image.extract::<PyReadonlyArrayDyn<'_, u8>>() {
            Ok(array) => self.classify_image(py, &array_image(&array, bgr)?)?,
            Err(_) => {
                let path = image.extract::<PathBuf>().map_err(|_| {
                    PyValueError::new_err("expected an image path or a uint8 NumPy array")
                })?;
                self.classify_paths(py, &[path])?.remove(0)
            }
        };
        Ok(PyArray1::from_vec(py, result.logits))
    }

    fn __repr__(&self) -> String {
        format!(
            "graft_runtime.Model({:?}, {} labels, input {}x{})",
            self.path.display().to_string(),
            self.model.labels().len(),
            self.input_size().0,
            self.input_size().1
        )
    }
}

/// Run graft artifacts from Python.
#[pymodule]
#[pyo3(name = "graft_runtime")]
fn graft_runtime_module(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Model>()?;
    m.add("GraftError", m.py().get_type::<GraftError>())?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
