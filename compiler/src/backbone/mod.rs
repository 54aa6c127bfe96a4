//! Backbone: the pretrained ONNX network, read and checked ([`import`]), where it can be cut and
//! which blocks it has ([`points`]), cut before its classifier or earlier ([`cut`]), and asked
//! which input normalisation its weights were trained with ([`probe`]).

pub mod import;

pub mod points;

pub mod cut;

pub mod probe;
