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

    /// A model configuration value that cannot work.
    #[error("invalid model config `{field}`: {reason}")]
    InvalidConfig { field: String, reason: String },

    /// `sla` or `sagesla` asked of a checkpoint that has no SLA projection.
    #[error(
        "the checkpoint has no `{key}`: `sla` and `sagesla` need a TurboDiffusion checkpoint \
         with per-block proj_l weights; use `original` attention for this file"
    )]
    MissingProjL { key: String },

    /// A checkpoint that cannot be opened or read as the format its name says.
    #[error("checkpoint {path}: {reason}")]
    Checkpoint { path: PathBuf, reason: String },

    /// A checkpoint whose tensor names or shapes differ from what the model expects.
    #[error("checkpoint {path} does not fit the model: {}", describe_key_problems(.problems))]
    CheckpointKeys {
        path: PathBuf,
        problems: KeyProblems,
    },

    /// A LoRA file that cannot be read, holds keys no layout names, targets weights the model
    /// does not have, or has factors whose shapes do not fit: `keys` lists every key at fault.
    #[error("LoRA {path}: {reason}{}", describe_keys(.keys))]
    Lora {
        path: PathBuf,
        reason: String,
        keys: Vec<String>,
    },

    /// A tokenizer file that cannot be loaded, or a text it cannot encode.
    #[error("tokenizer {path}: {reason}")]
    Tokenizer { path: PathBuf, reason: String },

    /// A prompt with no text left after whitespace cleaning.
    #[error("the prompt is empty (nothing is left after whitespace cleaning)")]
    EmptyPrompt,

    /// A sampler setting outside what the sampler supports.
    #[error("invalid sampler setting `{setting}` = {value}: {expected}")]
    InvalidSamplerSetting {
        setting: &'static str,
        value: String,
        expected: &'static str,
    },

    /// A replaying noise source was asked for more tensors than it was given.
    #[error(
        "replayed noise exhausted: tensor {draw} was requested but only {available} were given"
    )]
    NoiseExhausted { draw: usize, available: usize },

    /// The run stopped because the progress observer asked it to (at a sampling step, or
    /// between decoded chunks after the last step).
    #[error("cancelled by the caller after sampling step {completed} of {total}")]
    Cancelled { completed: usize, total: usize },

    /// A two-expert model was asked for an expert that is not loaded.
    #[error("the {expert} expert is needed at s = {s} but is not loaded")]
    ExpertNotLoaded { expert: &'static str, s: f64 },

    /// Video or image data that cannot be encoded, decoded or used as given; `what` names the
    /// file or the value at fault.
    #[error("{what}: {reason}")]
    Media { what: String, reason: String },

    /// A stage whose estimated peak device memory exceeds the memory budget, found before any
    /// model is loaded. `help` lists what would lower the need.
    #[error(
        "the {stage} stage needs about {} of device memory but {} are available ({} short); \
         what would help: {}",
        human_bytes(*.needed),
        human_bytes(*.available),
        human_bytes(.needed.saturating_sub(*.available)),
        .help.join("; ")
    )]
    MemoryBudgetExceeded {
        stage: String,
        needed: u64,
        available: u64,
        help: Vec<String>,
    },

    /// A value outside the range the library supports (a frame count or side above the upper
    /// bound, a timestep outside `[0, 1000]`, a prompt longer than the model's text length, a
    /// degenerate aspect ratio); `expected` says what is accepted.
    #[error("{what} = {value} is out of range: {expected}")]
    OutOfRange {
        what: String,
        value: String,
        expected: String,
    },

    /// A stage produced NaN or infinite values: the run stops there instead of writing a black
    /// or gray video. Usually non-finite weights in a checkpoint or an extreme setting.
    #[error(
        "the {stage} stage produced non-finite values (NaN or infinity) in {what}: check the \
         checkpoint's weights and extreme settings such as the guidance scale or sigma_max"
    )]
    NonFinite { stage: String, what: String },

    /// A multi-GPU launch setting (an environment variable such as `RANK` or `WORLD_SIZE`)
    /// that is missing, malformed or inconsistent with the others.
    #[error("multi-GPU launch: {var} = {value:?}: {reason}")]
    Launch {
        var: &'static str,
        value: String,
        reason: String,
    },

    /// A collective operation between the ranks of a multi-GPU run that failed, or whose data
    /// did not have the shape the sharding plan expects.
    #[error("rank {rank} of {world_size}, {op}: {reason}")]
    Communication {
        op: &'static str,
        rank: usize,
        world_size: usize,
        reason: String,
    },

    /// A multi-GPU run with more ranks than a split of the work has parts (DiT tokens, latent
    /// rows): some rank would be left without work. Found before any stage runs.
    #[error("{world_size} ranks, but {what} splits into at most {parts}: {help}")]
    TooManyRanks {
        world_size: usize,
        what: String,
        parts: usize,
        help: String,
    },

    /// An output file that exists and may not be replaced.
    #[error("{path} already exists: choose another output name or allow overwriting")]
    OutputExists { path: PathBuf },
}

/// Bytes in GiB or MiB with two decimals (plain bytes below 1 MiB), for messages.
fn human_bytes(bytes: u64) -> String {
    const MIB: u64 = 1 << 20;
    const GIB: u64 = 1 << 30;
    match bytes {
        b if b >= GIB => format!("{:.2} GiB", b as f64 / GIB as f64),
        b if b >= MIB => format!("{:.2} MiB", b as f64 / MIB as f64),
        b => format!("{b} bytes"),
    }
}

/// One difference between a checkpoint's tensors and the ones a model expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyProblem {
    /// The model needs `key` with shape `expected`; the file lacks it.
    Missing { key: String, expected: Vec<usize> },
    /// The file holds `key`, which the model does not use.
    Unexpected { key: String, shape: Vec<usize> },
    /// Both have `key`, with different shapes.
    WrongShape {
        key: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
}

impl std::fmt::Display for KeyProblem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Missing { key, expected } => write!(f, "missing `{key}` {expected:?}"),
            Self::Unexpected { key, shape } => write!(f, "unexpected `{key}` {shape:?}"),
            Self::WrongShape { key, expected, got } => {
                write!(f, "`{key}` has shape {got:?}, expected {expected:?}")
            }
        }
    }
}

/// Every difference between a checkpoint and a model's key list ([`Error::CheckpointKeys`]):
/// a list of [`KeyProblem`]s (it dereferences to a slice) whose `Debug` summarises, as its
/// `Display` does, so that `fn main() -> Result<()>` does not print thousands of keys.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct KeyProblems(Vec<KeyProblem>);

impl KeyProblems {
    pub fn into_inner(self) -> Vec<KeyProblem> {
        self.0
    }
}

impl From<Vec<KeyProblem>> for KeyProblems {
    fn from(problems: Vec<KeyProblem>) -> Self {
        Self(problems)
    }
}

impl std::ops::Deref for KeyProblems {
    type Target = [KeyProblem];

    fn deref(&self) -> &[KeyProblem] {
        &self.0
    }
}

impl PartialEq<Vec<KeyProblem>> for KeyProblems {
    fn eq(&self, other: &Vec<KeyProblem>) -> bool {
        &self.0 == other
    }
}

impl std::fmt::Debug for KeyProblems {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "[{} problems: {}]",
            self.0.len(),
            describe_key_problems(&self.0)
        )
    }
}

/// At most this many problems are spelt out in an error message; the rest are counted.
const KEY_PROBLEMS_SHOWN: usize = 8;

fn describe_key_problems(problems: &[KeyProblem]) -> String {
    let mut text = problems
        .iter()
        .take(KEY_PROBLEMS_SHOWN)
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("; ");
    if problems.len() > KEY_PROBLEMS_SHOWN {
        text.push_str(&format!(
            "; and {} more",
            problems.len() - KEY_PROBLEMS_SHOWN
        ));
    }
    text
}

/// `: key, key, …` (at most [`KEY_PROBLEMS_SHOWN`], the rest counted), or nothing.
fn describe_keys(keys: &[String]) -> String {
    if keys.is_empty() {
        return String::new();
    }
    let mut text = format!(
        ": `{}`",
        keys.iter()
            .take(KEY_PROBLEMS_SHOWN)
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("`, `")
    );
    if keys.len() > KEY_PROBLEMS_SHOWN {
        text.push_str(&format!(" and {} more", keys.len() - KEY_PROBLEMS_SHOWN));
    }
    text
}

/// `Result` with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;

    /// What `fn main() -> Result<()>` prints for a checkpoint that misses every key of a big
    /// model stays a few lines long.
    #[test]
    fn debug_of_many_key_problems_is_a_summary() {
        let problems: Vec<KeyProblem> = (0..2000)
            .map(|i| KeyProblem::Missing {
                key: format!("blocks.{i}.self_attn.q.weight"),
                expected: vec![5120, 5120],
            })
            .collect();
        let error = Error::CheckpointKeys {
            path: "model.safetensors".into(),
            problems: problems.into(),
        };
        let debug = format!("{error:?}");
        assert!(debug.len() < 1500, "{} bytes: {debug}", debug.len());
        assert!(debug.contains("2000 problems"), "{debug}");
        assert!(debug.contains("and 1992 more"), "{debug}");
        assert!(debug.contains("blocks.0.self_attn.q.weight"), "{debug}");
    }
}
