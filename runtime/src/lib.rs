//! graft-runtime: load a graft artifact and classify images with it.
//!
//! An artifact is one file produced by `graft compile`: a tract graph (backbone and trained head
//! folded together, serialized as NNEF), the labels, the preprocessing and provenance. This crate
//! depends on tract-core and tract-nnef only, never on the ONNX importer or on candle, so edge
//! builds stay small. The `cli` feature (default) adds the `graft-run` binary and the clap
//! derives on the command argument structs ([`commands`], [`mod@bench`]); without it
//! (`--no-default-features`) the library has no command-line dependency.
//!
//! The modules, in the order an image flows: [`artifact`] and [`weights`] (the file) ->
//! [`model`] (the loaded graph, [`kernels`] swapped in) <- [`preprocess`] (image to tensor;
//! [`preprocess::raw`] for pixel buffers) <- [`read`] and [`dataset`] (files and labelled
//! folders); then [`eval`], [`mod@bench`], [`commands`] (graft-run's commands) and [`capi`] (the
//! C interface, `include/graft.h`; Python's module is `bindings/python`), over [`parallel`]
//! (worker threads), [`progress`], [`paths`] and [`error`].
//!
//! ```no_run
//! let model = graft_runtime::Model::load("model.graft")?;
//! let result = model.classify_path(std::path::Path::new("bee.jpg"))?;
//! for s in result.top_k(3, model.labels()) {
//!     println!("{} {:.3}", s.label, s.probability);
//! }
//! # Ok::<(), graft_runtime::Error>(())
//! ```

// The artifact file and the model it holds.
pub mod artifact;
pub mod weights;

pub mod model;

// Input: files read within bounds, images to tensors, labelled folders.
pub mod read;

pub mod preprocess;

pub mod dataset;

// graft's own kernels, swapped into the graph when it is loaded.
pub mod kernels;

// Using it: evaluation, benchmarks, the commands of graft-run, the C API.
pub mod eval;

pub mod bench;
pub mod commands;

pub mod capi;

// Shared: errors, progress, paths in output.
pub mod error;
pub mod parallel;
pub mod paths;
pub mod progress;

pub use artifact::{Artifact, Manifest};
pub use error::{Error, Result};
pub use model::{Classification, LabelScore, LoadOptions, Model};
pub use preprocess::{Normalization, Preprocessing};

/// Sets how many threads tract may use inside one matrix product (intra-op parallelism). `1` (the
/// default) keeps every inference on its calling thread, the right choice when several images run
/// concurrently. Values above 1 need the crate's `multithread` feature.
pub fn set_intra_op_threads(threads: usize) -> Result<()> {
    #[cfg(feature = "multithread")]
    {
        use tract_linalg::multithread::{set_default_executor, Executor};
        set_default_executor(if threads > 1 {
            Executor::multithread(threads)
        } else {
            Executor::SingleThread
        });
        Ok(())
    }
    #[cfg(not(feature = "multithread"))]
    {
        if threads > 1 {
            return Err(Error::InvalidOption(format!(
                "{threads} intra-op threads requested, but graft-runtime was built without the `multithread` feature"
            )));
        }
        Ok(())
    }
}
