//! graft-runtime: load a graft artifact and classify images with it.
//!
//! An artifact is one file produced by `graft compile`: a tract graph (backbone and trained head
//! folded together, serialized as NNEF), the labels, the preprocessing and provenance. This crate
//! depends on tract-core and tract-nnef only, never on the ONNX importer or on candle, so edge
//! builds stay small.
//!
//! ```no_run
//! let model = graft_runtime::Model::load("model.graft")?;
//! let result = model.classify_path(std::path::Path::new("bee.jpg"))?;
//! for s in result.top_k(3, model.labels()) {
//!     println!("{} {:.3}", s.label, s.probability);
//! }
//! # Ok::<(), graft_runtime::Error>(())
//! ```

pub mod artifact;
pub mod commands;
pub mod dataset;
pub mod error;
pub mod eval;
pub mod model;
pub mod preprocess;
pub mod progress;

pub use artifact::{Artifact, Manifest};
pub use error::{Error, Result};
pub use model::{Classification, LabelScore, Model};
pub use preprocess::{Normalization, Preprocessing};
