//! The compiler's one error type.

use std::path::PathBuf;

/// Errors raised by the compiler stages.
#[derive(Debug, thiserror::Error)]
pub enum CompileError {
    /// An error from the runtime crate (image decoding, dataset scanning, artifact I/O).
    #[error(transparent)]
    Runtime(#[from] graft_runtime::Error),

    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// The ONNX file could not be parsed, or describes a graph graft cannot use.
    #[error("{}: {reason}", path.display())]
    InvalidBackbone {
        /// The ONNX file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The ONNX graph uses an operator that tract does not implement.
    #[error("{}: unsupported ONNX operator {op:?} at node {node:?}", path.display())]
    UnsupportedOperator {
        /// The ONNX file.
        path: PathBuf,
        /// Operator type.
        op: String,
        /// Node name.
        node: String,
    },

    /// The requested cut point does not exist or cannot feed a head.
    #[error("{}: cannot cut at {cut:?}: {reason}", path.display())]
    InvalidCut {
        /// The ONNX file.
        path: PathBuf,
        /// The requested cut tensor.
        cut: String,
        /// Why it cannot be used.
        reason: String,
    },

    /// Not enough usable images to train and validate.
    #[error("{0}")]
    NotEnoughData(String),

    /// A command-line option has an invalid value.
    #[error("{0}")]
    InvalidOption(String),

    /// Training with candle failed; a bug, not bad input.
    #[error("training failed: {0}")]
    Training(#[from] candle_core::Error),

    /// Part of the backbone chosen for training cannot be translated to candle.
    #[error("cannot train node {node:?}: {reason}")]
    Untrainable {
        /// ONNX node (or tensor) name.
        node: String,
        /// Why, and what to do instead.
        reason: String,
    },

    /// Two measurements that must agree do not (the artifact run end to end against the head on
    /// its features): the inputs behind one of them, usually the feature cache, are wrong.
    #[error("{0}")]
    Inconsistent(String),

    /// The user pressed Ctrl-C; nothing was written but the features computed so far.
    #[error("interrupted: no artifact written")]
    Interrupted,

    /// Building, folding or serializing the graph failed; a bug, not bad input.
    #[error("{stage} failed: {reason}")]
    Graph {
        /// The compiler stage.
        stage: &'static str,
        /// The message from tract.
        reason: String,
    },
}

impl CompileError {
    /// Whether the error is caused by the user's input (exit code 1) rather than by graft itself
    /// (exit code 2).
    pub fn is_user_error(&self) -> bool {
        match self {
            CompileError::Runtime(e) => e.is_user_error(),
            CompileError::Training(_) | CompileError::Graph { .. } => false,
            _ => true,
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> CompileError {
        CompileError::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn graph(stage: &'static str) -> impl Fn(tract_onnx::prelude::TractError) -> Self {
        move |e| CompileError::Graph {
            stage,
            reason: format!("{e:#}"),
        }
    }
}

/// Result alias for the compiler.
pub type Result<T, E = CompileError> = std::result::Result<T, E>;
