//! graft-compiler: turn an ImageNet-pretrained ONNX backbone and a folder of labelled images into
//! one deployable graft artifact.
//!
//! The stages, one module each, listed below in pipeline order, data flowing one way:
//! [`check`] and [`splits`] (the data folder, and which images make which choice) -> [`import`]
//! (read and check the ONNX) -> [`cut`] (frozen graph up to the feature tensor) -> [`probe`]
//! (input normalisation) -> [`extract`] (features of every image, cached) -> [`advise`] (what to
//! transfer) -> [`train`] / [`finetune`] (new head, upper blocks, with candle) -> [`fold`] (head
//! appended to the graph, one NNEF graph) -> [`quantize`] (optional int8 rewrite) ->
//! [`artifact`] (manifest + graph in one file, read by `graft_runtime`). [`pipeline`] wires them
//! together.

// Data: what a folder holds, and which images make which choice.
pub mod check;
pub mod splits;

// Backbone: read and check the ONNX, then cut it before its classifier.
pub mod import;

pub mod cut;

// Input normalisation, asked of the backbone's own classifier.
pub mod probe;

// Features of every image through the frozen backbone, cached.
pub mod extract;

// What to transfer, decided from the data.
pub mod advise;

// Training: heads on cached features; fine-tuning with candle (tract ops translated, images
// augmented).
pub mod linear;
pub mod train;

pub mod augment;
pub mod finetune;
pub mod translate;

// The artifact: head folded into the graph, optional int8 rewrite, one file.
pub mod fold;

pub mod quantize;

pub mod artifact;

// Orchestration and reporting.
pub mod pipeline;
pub mod report;
pub mod svg;

// Shared: errors, seeded random numbers, Ctrl-C, terminal output.
pub mod error;
pub mod interrupt;
pub mod rng;
pub mod ui;

#[cfg(test)]
mod testing;

pub use error::{CompileError, Result};
pub use pipeline::{compile, CompileOptions, CompileReport};
