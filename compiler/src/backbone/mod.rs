//! Backbone: the pretrained ONNX network, read and checked ([`import`]), cut before its classifier
//! or earlier ([`cut`]), and asked which input normalisation its weights were trained with
//! ([`probe`]).

pub mod import;

pub mod cut;

pub mod probe;
