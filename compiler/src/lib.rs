//! graft-compiler: turn an ImageNet-pretrained ONNX backbone and a folder of labelled images into
//! one deployable graft artifact.
//!
//! The stages, one module each, data flowing one way:
//! [`import`] (read and check the ONNX) -> [`cut`] (frozen graph up to the feature tensor) ->
//! [`extract`] (features of every image, cached) -> [`train`] (new head with candle) ->
//! [`fold`] (head appended to the graph, one NNEF graph) -> [`quantize`] (optional int8 rewrite)
//! -> [`artifact`] (manifest + graph in one file, read by `graft_runtime`). [`pipeline`] wires
//! them together; [`check`] looks at a data folder before any of it.

pub mod advise;
pub mod artifact;
pub mod augment;
pub mod check;
pub mod cut;
pub mod error;
pub mod extract;
pub mod finetune;
pub mod fold;
pub mod import;
pub mod interrupt;
pub mod linear;
pub mod pipeline;
pub mod probe;
pub mod quantize;
pub mod report;
pub mod rng;
pub mod splits;
pub mod svg;
pub mod train;
pub mod translate;
pub mod ui;

#[cfg(test)]
mod testing;

pub use error::{CompileError, Result};
pub use pipeline::{compile, CompileOptions, CompileReport};
