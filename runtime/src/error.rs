//! The runtime's one error type.
//!
//! Every variant names the file it is about, so a message printed at the command line is enough to
//! act on. [`Error::is_user_error`] splits the variants into "your input is wrong" (exit code 1)
//! and "graft is wrong" (exit code 2).

use std::path::PathBuf;

/// Errors raised while loading artifacts, decoding images or running a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or directory could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The path that failed.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: std::io::Error,
    },

    /// A path that must name a regular file names a folder, device, FIFO or socket.
    #[error("{}: not a regular file ({kind}); expected {} {what} file", path.display(), article(what))]
    NotARegularFile {
        /// The offending path.
        path: PathBuf,
        /// What the file should have been ("image", "backbone").
        what: String,
        /// What it is instead ("a FIFO").
        kind: &'static str,
    },

    /// A file is larger than graft reads for its kind.
    #[error("{}: {what} file is {size} bytes, more than the {limit}-byte limit{}", path.display(), size_hint(what))]
    FileTooLarge {
        /// The offending file.
        path: PathBuf,
        /// What the file is ("image").
        what: String,
        /// Its size.
        size: u64,
        /// The limit.
        limit: u64,
    },

    /// The file does not start with the graft artifact magic bytes.
    #[error("{}: not a graft artifact (missing the GRAFTART magic bytes)", path.display())]
    NotAnArtifact {
        /// The offending file.
        path: PathBuf,
    },

    /// The artifact was written in a format version this runtime cannot read.
    #[error(
        "{}: artifact format version {found} is not supported (this runtime reads version {supported}); {hint}",
        path.display()
    )]
    UnsupportedVersion {
        /// The offending file.
        path: PathBuf,
        /// Version recorded in the file.
        found: u32,
        /// Version this runtime reads.
        supported: u32,
        /// What to do about it.
        hint: &'static str,
    },

    /// The file is shorter (or longer) than its header says.
    #[error(
        "{}: artifact is truncated or corrupt: its header declares {declared} bytes but the file has {actual}",
        path.display()
    )]
    SizeMismatch {
        /// The offending file.
        path: PathBuf,
        /// Size implied by the header.
        declared: u64,
        /// Actual size.
        actual: u64,
    },

    /// The checksum stored in the artifact does not match its content.
    #[error("{}: artifact is corrupt: checksum mismatch (stored {stored}, computed {computed})", path.display())]
    ChecksumMismatch {
        /// The offending file.
        path: PathBuf,
        /// Checksum recorded in the file (hex).
        stored: String,
        /// Checksum of the bytes actually present (hex).
        computed: String,
    },

    /// The manifest is not valid JSON or misses something the runtime needs.
    #[error("{}: invalid artifact manifest: {reason}", path.display())]
    InvalidManifest {
        /// The offending file.
        path: PathBuf,
        /// What is wrong.
        reason: String,
    },

    /// The embedded graph could not be deserialized or prepared for execution.
    #[error("{}: cannot load the model graph: {reason}", path.display())]
    InvalidGraph {
        /// The offending file.
        path: PathBuf,
        /// The message from tract.
        reason: String,
    },

    /// An image could not be decoded.
    #[error("{}: cannot decode image: {reason}", path.display())]
    ImageDecode {
        /// The offending image.
        path: PathBuf,
        /// What the decoder said.
        reason: String,
    },

    /// A labelled image folder does not have the expected layout.
    #[error("{}: {reason}", path.display())]
    Dataset {
        /// The folder concerned.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// An option is out of range or not supported by this build.
    #[error("{0}")]
    InvalidOption(String),

    /// Preprocessing parameters are inconsistent.
    #[error("invalid preprocessing: {0}")]
    InvalidPreprocessing(String),

    /// The model's outputs are NaN or infinite: its weights are damaged (or overflow on this
    /// input), so no label is given.
    #[error("{}: the model's output is not finite (NaN or infinity); its weights may be damaged", path.display())]
    NonFiniteOutput {
        /// The image classified, or the artifact when the input was not a file.
        path: PathBuf,
    },

    /// The model failed while running; this is a bug in graft or tract, not in the input.
    #[error("inference failed: {0}")]
    Inference(String),
}

impl Error {
    /// Whether the error is caused by the user's input (exit code 1) rather than by graft
    /// itself (exit code 2).
    pub fn is_user_error(&self) -> bool {
        !matches!(self, Error::Inference(_))
    }

    /// Whether this is a write to a closed pipe (`graft-run predict ... | head -1`): the reader
    /// has what it wanted, so the command stops quietly with success, as `cat` or `rg` do.
    pub fn is_broken_pipe(&self) -> bool {
        matches!(self, Error::Io { source, .. } if source.kind() == std::io::ErrorKind::BrokenPipe)
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
        Error::Io {
            path: path.into(),
            source,
        }
    }

    pub(crate) fn dataset(path: impl Into<PathBuf>, reason: impl Into<String>) -> Error {
        Error::Dataset {
            path: path.into(),
            reason: reason.into(),
        }
    }
}

/// "an" before a vowel, else "a".
fn article(word: &str) -> &'static str {
    if word.starts_with(['a', 'e', 'i', 'o', 'u']) {
        "an"
    } else {
        "a"
    }
}

/// How to raise the limit of [`Error::FileTooLarge`], where it can be raised.
fn size_hint(what: &str) -> &'static str {
    if what == "image" {
        " (set GRAFT_MAX_IMAGE_BYTES to raise it)"
    } else {
        ""
    }
}

/// Result alias for the runtime.
pub type Result<T, E = Error> = std::result::Result<T, E>;
