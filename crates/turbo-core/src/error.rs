use std::path::PathBuf;

use candle_core::DType;

/// The error type of every turbodiffusion-rs crate.
///
/// Variants name what was wrong (the value, the shape, the file) so that a caller can show the
/// message to a user as it is.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A tensor operation failed inside candle.
    #[error(transparent)]
    Candle(#[from] candle_core::Error),

    /// An attention backend name that is not `original`, `sla` or `sagesla`.
    #[error(
        "unknown attention kind `{name}`: expected `original`, `sla` or `sagesla`, \
         optionally with a top-k fraction as in `sla:0.1`"
    )]
    UnknownAttentionKind { name: String },

    /// A top-k fraction outside (0, 1] (or not a number).
    #[error("invalid SLA top-k fraction {value}: it must lie in (0, 1]")]
    InvalidTopk { value: String },

    /// A block size of zero.
    #[error("invalid {what} block size {value}: it must be at least 1")]
    InvalidBlockSize { what: &'static str, value: usize },

    /// A tensor whose shape does not fit the operation.
    #[error("{what}: expected shape {expected}, got {got:?}")]
    Shape {
        what: String,
        expected: String,
        got: Vec<usize>,
    },

    /// A dtype an operation does not accept.
    #[error("{what}: dtype {dtype:?} is not supported (expected {expected})")]
    UnsupportedDType {
        what: String,
        dtype: DType,
        expected: &'static str,
    },

    /// A frame count that the Wan VAE cannot take (it needs 4n + 1).
    #[error(
        "{frames} frames: Wan needs 4n + 1 frames (nearest valid counts: {below} and {above})"
    )]
    InvalidFrameCount {
        frames: usize,
        below: usize,
        above: usize,
    },

    /// A frame size that is not a positive multiple of 16 (VAE stride 8 × patch 2).
    #[error("frame size {width}x{height}: width and height must be positive multiples of 16")]
    InvalidFrameSize { width: usize, height: usize },

    /// A resolution name that is not in the table.
    #[error("unknown resolution `{name}`: expected `480p` or `720p`")]
    UnknownResolution { name: String },

    /// An aspect ratio name that is not in the table.
    #[error("unknown aspect ratio `{name}`: expected one of 16:9, 9:16, 1:1, 4:3, 3:4")]
    UnknownAspectRatio { name: String },

    /// A device name that is neither `cpu` nor `cuda[:N]`.
    #[error("unknown device `{name}`: expected `cpu`, `cuda` or `cuda:N`")]
    UnknownDevice { name: String },

    /// A dtype name that is not one of the supported floating-point types.
    #[error("unknown dtype `{name}`: expected `f32`, `bf16` or `f16`")]
    UnknownDType { name: String },

    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    /// A reference (golden) file that lacks what a test needs.
    #[error("golden file {path}: {reason}")]
    Golden { path: PathBuf, reason: String },

    /// Video or image data that cannot be encoded, decoded or used as given; `what` names the
    /// file or the value at fault.
    #[error("{what}: {reason}")]
    Media { what: String, reason: String },
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
