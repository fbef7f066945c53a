//! Where the weights of each model come from: the released files, or seeded random weights.

use std::path::{Path, PathBuf};

use turbo_core::{Error, Result};

use super::random::RandomCheckpoint;

/// The weights of one model.
#[derive(Debug, Clone)]
pub enum WeightSource {
    /// A checkpoint file or folder (any container `turbo_models::Checkpoint` opens).
    File(PathBuf),
    /// Seeded random weights of the right names and shapes (the built-in demo, tests).
    Random(RandomCheckpoint),
}

/// The released model families a pipeline can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Wan2.1 T2V 1.3B (TurboWan2.1-T2V-1.3B-480P).
    Wan21T2V1_3B,
    /// Wan2.1 T2V 14B (TurboWan2.1-T2V-14B-480P / -720P).
    Wan21T2V14B,
    /// Wan2.2 I2V A14B, two experts (TurboWan2.2-I2V-A14B-{high,low}-720P).
    Wan22I2VA14B,
}

impl ModelKind {
    /// Short name used in output file names (`t2v_{seed}_{model}_{timestamp}.mp4`).
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Wan21T2V1_3B => "Wan2.1-T2V-1.3B",
            Self::Wan21T2V14B => "Wan2.1-T2V-14B",
            Self::Wan22I2VA14B => "Wan2.2-I2V-A14B",
        }
    }

    /// The DiT (or high-noise expert) file names TurboDiffusion publishes for this model,
    /// preferred first (`quant` picks the `-quant` releases first).
    fn dit_file_names(self, quant: bool) -> Vec<String> {
        let stems: &[&str] = match self {
            Self::Wan21T2V1_3B => &["TurboWan2.1-T2V-1.3B-480P"],
            Self::Wan21T2V14B => &["TurboWan2.1-T2V-14B-720P", "TurboWan2.1-T2V-14B-480P"],
            Self::Wan22I2VA14B => &["TurboWan2.2-I2V-A14B-high-720P"],
        };
        release_names(stems, quant)
    }

    /// The low-noise expert's file names (Wan2.2 A14B).
    fn low_noise_file_names(self, quant: bool) -> Vec<String> {
        release_names(&["TurboWan2.2-I2V-A14B-low-720P"], quant)
    }
}

/// `<stem>.pth` and `<stem>-quant.pth` for every stem, in order of preference, each preceded
/// by its `.safetensors` twin (what `examples/convert` writes; memory-mapped, so preferred).
fn release_names(stems: &[&str], quant: bool) -> Vec<String> {
    let variants = if quant {
        ["-quant", ""]
    } else {
        ["", "-quant"]
    };
    stems
        .iter()
        .flat_map(|stem| {
            variants
                .iter()
                .map(move |variant| format!("{stem}{variant}"))
        })
        .flat_map(|name| with_safetensors_twin(&format!("{name}.pth")))
        .collect()
}

/// `name` with its `.pth` extension replaced by `.safetensors`, then `name` itself.
fn with_safetensors_twin(name: &str) -> Vec<String> {
    match name.strip_suffix(".pth") {
        Some(stem) => vec![format!("{stem}.safetensors"), name.to_owned()],
        None => vec![name.to_owned()],
    }
}

/// The files of a text-to-video model set.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The DiT, or for Wan2.2 A14B its high-noise expert.
    pub dit: PathBuf,
    /// The low-noise expert of Wan2.2 A14B.
    pub dit_low_noise: Option<PathBuf>,
    pub text_encoder: PathBuf,
    pub tokenizer: PathBuf,
    pub vae: PathBuf,
}

/// umT5-XXL encoder weights as Wan ships them.
pub const TEXT_ENCODER_FILE: &str = "models_t5_umt5-xxl-enc-bf16.pth";
/// The Wan2.1 VAE (also used by Wan2.2 A14B).
pub const VAE_FILE: &str = "Wan2.1_VAE.pth";
/// Where the umT5 tokenizer sits in a Wan checkpoint folder, or beside the weights.
pub const TOKENIZER_FILES: [&str; 2] = ["google/umt5-xxl/tokenizer.json", "tokenizer.json"];

impl ModelFiles {
    /// Finds the upstream file names in `dir` (DiT, `models_t5_umt5-xxl-enc-bf16.pth`,
    /// `Wan2.1_VAE.pth`, `google/umt5-xxl/tokenizer.json`), each weight file also under its
    /// `.safetensors` name (as `examples/convert` writes it, preferred when both exist); the
    /// error names the file looked for and the folder.
    pub fn find(dir: &Path, kind: ModelKind, quant: bool) -> Result<Self> {
        let first = |names: &[String], what: &str| {
            names
                .iter()
                .map(|n| dir.join(n))
                .find(|p| p.exists())
                .ok_or_else(|| Error::Checkpoint {
                    path: dir.to_owned(),
                    reason: format!("no {what} here (looked for {})", names.join(", ")),
                })
        };
        let own = |names: &[&str]| {
            names
                .iter()
                .flat_map(|&name| with_safetensors_twin(name))
                .collect::<Vec<_>>()
        };
        let dit_low_noise = match kind {
            ModelKind::Wan22I2VA14B => Some(first(
                &kind.low_noise_file_names(quant),
                "low-noise expert",
            )?),
            _ => None,
        };
        Ok(Self {
            dit: first(&kind.dit_file_names(quant), "DiT checkpoint")?,
            dit_low_noise,
            text_encoder: first(&own(&[TEXT_ENCODER_FILE]), "umT5 text encoder")?,
            tokenizer: first(&own(&TOKENIZER_FILES), "umT5 tokenizer")?,
            vae: first(&own(&[VAE_FILE]), "Wan VAE")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A folder of converted `.safetensors` files is found like the released `.pth` ones, and
    /// the converted file wins when both are there.
    #[test]
    fn converted_safetensors_files_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let names = [
            "TurboWan2.1-T2V-1.3B-480P.safetensors",
            "TurboWan2.1-T2V-1.3B-480P.pth",
            "models_t5_umt5-xxl-enc-bf16.safetensors",
            "Wan2.1_VAE.safetensors",
            "tokenizer.json",
        ];
        for name in names {
            std::fs::write(dir.path().join(name), b"").unwrap();
        }
        let files = ModelFiles::find(dir.path(), ModelKind::Wan21T2V1_3B, false).unwrap();
        assert_eq!(files.dit, dir.path().join(names[0]));
        assert_eq!(files.text_encoder, dir.path().join(names[2]));
        assert_eq!(files.vae, dir.path().join(names[3]));
        let quant = ModelFiles::find(dir.path(), ModelKind::Wan21T2V1_3B, true).unwrap();
        assert_eq!(quant.dit, dir.path().join(names[0]));
    }
}
