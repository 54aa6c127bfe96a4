//! graft-compiler: turn an ImageNet-pretrained ONNX backbone and a folder of labelled images into
//! one deployable graft artifact.
//!
//! One folder per pipeline stage, listed below in pipeline order, data flowing one way (a stage
//! uses the ones above it, never one below):
//! [`data`] (the folder's images, checked, and which images make which choice) -> [`backbone`]
//! (read and check the ONNX, cut it before its classifier, find its input normalisation) ->
//! [`features`] (features of every image through the frozen cut, cached) -> [`head`] (new head
//! on the features) -> [`finetune`] (upper blocks and head together, with candle) -> [`fold`]
//! (head appended to the graph: one NNEF graph, and its manifest) -> [`quantize`] (optional int8
//! rewrite). [`pipeline`] runs the stages in order (`compile`) and decides what to transfer
//! (`advise`); [`report`] renders what a compile or an evaluation measured. The artifact file
//! itself is `graft_runtime::artifact`, the runtime's reader.

// Data: what a folder holds, and which images make which choice.
pub mod data;

// Backbone: read and check the ONNX, cut it, ask it for its input normalisation.
pub mod backbone;

// Features of every image through the frozen backbone, cached.
pub mod features;

// Training: heads on cached features; fine-tuning with candle.
pub mod head;

pub mod finetune;

// The artifact: head folded into the graph, optional int8 rewrite.
pub mod fold;

pub mod quantize;

// Orchestration and reporting.
pub mod pipeline;
pub mod report;

// Shared: errors, seeded random numbers, test helpers.
pub mod error;
pub mod util;

pub use error::{CompileError, Result};
pub use pipeline::{compile, CompileOptions, CompileReport};
