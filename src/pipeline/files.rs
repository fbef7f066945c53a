//! Where the weights of each model come from: the released files, or seeded random weights.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use turbo_core::{Error, Result};
use turbo_models::wan::WanConfig;
use turbo_models::Checkpoint;
use turbo_sampler::WanTask;

use super::random::RandomCheckpoint;

/// The weights of a [`WeightSource`] opened for reading: a file's checkpoint (whose
/// `VarBuilder` and row lookups read one mapping of it), or the random weights.
pub(super) enum OpenedWeights {
    File(Checkpoint),
    Random(RandomCheckpoint),
}

impl OpenedWeights {
    /// A `VarBuilder` over the weights, converting them to `dtype` on `device` as they are read.
    pub(super) fn var_builder(&self, dtype: DType, device: &Device) -> Result<VarBuilder<'static>> {
        match self {
            Self::File(checkpoint) => checkpoint.var_builder(dtype, device),
            Self::Random(random) => Ok(random.clone().var_builder(dtype, device)),
        }
    }
}

/// The weights of one model.
#[derive(Debug, Clone)]
pub enum WeightSource {
    /// A checkpoint file or folder (any container `turbo_models::Checkpoint` opens).
    File(PathBuf),
    /// Seeded random weights of the right names and shapes (the built-in demo, tests).
    Random(RandomCheckpoint),
}

impl WeightSource {
    /// Opens a file's checkpoint (reading its tensor list); random weights open as they are.
    pub(super) fn open(&self) -> Result<OpenedWeights> {
        Ok(match self {
            Self::File(path) => OpenedWeights::File(Checkpoint::open(path)?),
            Self::Random(random) => OpenedWeights::Random(random.clone()),
        })
    }
}

/// The released model families a pipeline can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelKind {
    /// Wan2.1 T2V 1.3B (TurboWan2.1-T2V-1.3B-480P).
    Wan21T2V1_3B,
    /// Wan2.1 T2V 14B (TurboWan2.1-T2V-14B-480P / -720P).
    Wan21T2V14B,
    /// Wan2.2 I2V A14B, two experts (TurboWan2.2-I2V-A14B-{high,low}-720P, or the official
    /// `high_noise_model/` and `low_noise_model/`).
    Wan22I2VA14B,
    /// Wan2.2 T2V A14B, two experts (official `Wan-AI/Wan2.2-T2V-A14B`: `high_noise_model/`,
    /// `low_noise_model/`).
    Wan22T2VA14B,
    /// Wan2.1 I2V 14B 480P (official `Wan-AI/Wan2.1-I2V-14B-480P`), with CLIP.
    Wan21I2V14B480P,
    /// Wan2.1 I2V 14B 720P (official `Wan-AI/Wan2.1-I2V-14B-720P`), with CLIP.
    Wan21I2V14B720P,
    /// Wan2.1 FLF2V 14B 720P (official `Wan-AI/Wan2.1-FLF2V-14B-720P`): first and last frame.
    Wan21Flf2v14B,
    /// Wan2.2 TI2V 5B (official `Wan-AI/Wan2.2-TI2V-5B`): text or text + image, Wan2.2 VAE.
    Wan22Ti2v5B,
}

/// The official Wan DiT files in a model folder: the sharded index first, else one file.
const OFFICIAL_DIT_FILES: [&str; 2] = [
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
];

impl ModelKind {
    /// Every kind, in declaration order.
    pub const ALL: [Self; 8] = [
        Self::Wan21T2V1_3B,
        Self::Wan21T2V14B,
        Self::Wan22I2VA14B,
        Self::Wan22T2VA14B,
        Self::Wan21I2V14B480P,
        Self::Wan21I2V14B720P,
        Self::Wan21Flf2v14B,
        Self::Wan22Ti2v5B,
    ];

    /// Short name used in output file names (`t2v_{seed}_{model}_{timestamp}.mp4`).
    pub fn short_name(self) -> &'static str {
        match self {
            Self::Wan21T2V1_3B => "Wan2.1-T2V-1.3B",
            Self::Wan21T2V14B => "Wan2.1-T2V-14B",
            Self::Wan22I2VA14B => "Wan2.2-I2V-A14B",
            Self::Wan22T2VA14B => "Wan2.2-T2V-A14B",
            Self::Wan21I2V14B480P => "Wan2.1-I2V-14B-480P",
            Self::Wan21I2V14B720P => "Wan2.1-I2V-14B-720P",
            Self::Wan21Flf2v14B => "Wan2.1-FLF2V-14B",
            Self::Wan22Ti2v5B => "Wan2.2-TI2V-5B",
        }
    }

    /// The Wan task whose published teacher settings (steps, shift, guidance, frames, fps)
    /// this model samples with.
    pub fn task(self) -> WanTask {
        match self {
            Self::Wan21T2V1_3B => WanTask::Wan21T2v1_3b,
            Self::Wan21T2V14B => WanTask::Wan21T2v14b,
            Self::Wan22I2VA14B => WanTask::Wan22I2vA14b,
            Self::Wan22T2VA14B => WanTask::Wan22T2vA14b,
            Self::Wan21I2V14B480P | Self::Wan21I2V14B720P => WanTask::Wan21I2v14b,
            Self::Wan21Flf2v14B => WanTask::Wan21Flf2v14b,
            Self::Wan22Ti2v5B => WanTask::Wan22Ti2v5b,
        }
    }

    /// The DiT's (or each expert's) configuration.
    pub fn dit_config(self) -> WanConfig {
        match self {
            Self::Wan21T2V1_3B => WanConfig::wan21_t2v_1_3b(),
            Self::Wan21T2V14B => WanConfig::wan21_t2v_14b(),
            Self::Wan22I2VA14B => WanConfig::wan22_i2v_a14b(),
            Self::Wan22T2VA14B => WanConfig::wan22_t2v_a14b(),
            Self::Wan21I2V14B480P | Self::Wan21I2V14B720P => WanConfig::wan21_i2v_14b(),
            Self::Wan21Flf2v14B => WanConfig::wan21_flf2v_14b(),
            Self::Wan22Ti2v5B => WanConfig::wan22_ti2v_5b(),
        }
    }

    /// Two experts switched at a boundary (Wan2.2 A14B).
    pub fn has_experts(self) -> bool {
        self.task().boundary().is_some()
    }

    /// TurboDiffusion publishes rCM students of this model; the others run the teachers.
    pub fn has_rcm_students(self) -> bool {
        matches!(
            self,
            Self::Wan21T2V1_3B | Self::Wan21T2V14B | Self::Wan22I2VA14B
        )
    }

    /// The Wan2.2 VAE (TI2V-5B) rather than the Wan2.1 one.
    pub fn uses_wan22_vae(self) -> bool {
        self == Self::Wan22Ti2v5B
    }

    /// The DiT (or high-noise expert) file names, preferred first: TurboDiffusion's releases
    /// (`quant` picks the `-quant` ones first), then the official Wan layout.
    fn dit_file_names(self, quant: bool) -> Vec<String> {
        let stems: &[&str] = match self {
            Self::Wan21T2V1_3B => &["TurboWan2.1-T2V-1.3B-480P"],
            Self::Wan21T2V14B => &["TurboWan2.1-T2V-14B-720P", "TurboWan2.1-T2V-14B-480P"],
            Self::Wan22I2VA14B => &["TurboWan2.2-I2V-A14B-high-720P"],
            _ => &[],
        };
        let mut names = release_names(stems, quant);
        names.extend(official_names(
            self.has_experts().then_some("high_noise_model"),
        ));
        names
    }

    /// The low-noise expert's file names (Wan2.2 A14B).
    fn low_noise_file_names(self, quant: bool) -> Vec<String> {
        let stems: &[&str] = match self {
            Self::Wan22I2VA14B => &["TurboWan2.2-I2V-A14B-low-720P"],
            _ => &[],
        };
        let mut names = release_names(stems, quant);
        names.extend(official_names(Some("low_noise_model")));
        names
    }
}

/// The official DiT file names, under `folder` when given.
fn official_names(folder: Option<&str>) -> Vec<String> {
    OFFICIAL_DIT_FILES
        .iter()
        .map(|name| match folder {
            Some(folder) => format!("{folder}/{name}"),
            None => (*name).to_owned(),
        })
        .collect()
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

/// The files of a model set.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    /// The DiT, or for Wan2.2 A14B its high-noise expert: a file, a sharded folder or its
    /// `*.safetensors.index.json`.
    pub dit: PathBuf,
    /// The low-noise expert of Wan2.2 A14B.
    pub dit_low_noise: Option<PathBuf>,
    pub text_encoder: PathBuf,
    pub tokenizer: PathBuf,
    /// `Wan2.1_VAE.pth`, or `Wan2.2_VAE.pth` for TI2V-5B.
    pub vae: PathBuf,
    /// The CLIP image encoder of Wan2.1 I2V-14B and FLF2V-14B.
    pub clip: Option<PathBuf>,
}

/// umT5-XXL encoder weights as Wan ships them.
pub const TEXT_ENCODER_FILE: &str = "models_t5_umt5-xxl-enc-bf16.pth";
/// The Wan2.1 VAE (also used by Wan2.2 A14B).
pub const VAE_FILE: &str = "Wan2.1_VAE.pth";
/// The Wan2.2 VAE of TI2V-5B.
pub const VAE22_FILE: &str = "Wan2.2_VAE.pth";
/// The open-clip XLM-RoBERTa ViT-H/14 of Wan2.1 I2V and FLF2V (its `visual.*` tensors are read).
pub const CLIP_FILE: &str = "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth";
/// Where the umT5 tokenizer sits in a Wan checkpoint folder, or beside the weights.
pub const TOKENIZER_FILES: [&str; 2] = ["google/umt5-xxl/tokenizer.json", "tokenizer.json"];

impl ModelFiles {
    /// Finds the upstream file names in `dir`: the DiT (TurboDiffusion's release names, else
    /// the official `diffusion_pytorch_model.safetensors.index.json` or
    /// `diffusion_pytorch_model.safetensors`, under `high_noise_model/` and `low_noise_model/`
    /// for the A14B experts), `models_t5_umt5-xxl-enc-bf16.pth`, `Wan2.1_VAE.pth` (TI2V-5B:
    /// `Wan2.2_VAE.pth`), the CLIP file for Wan2.1 I2V / FLF2V, and
    /// `google/umt5-xxl/tokenizer.json`; each weight file also under its `.safetensors` name
    /// (as `examples/convert` writes it, preferred when both exist). The error names the files
    /// looked for and the folder.
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
        let dit_low_noise = kind
            .has_experts()
            .then(|| first(&kind.low_noise_file_names(quant), "low-noise expert"))
            .transpose()?;
        let clip = kind
            .dit_config()
            .model_type
            .uses_clip()
            .then(|| first(&own(&[CLIP_FILE]), "CLIP image encoder"))
            .transpose()?;
        let (vae_file, vae_name) = if kind.uses_wan22_vae() {
            (VAE22_FILE, "Wan2.2 VAE")
        } else {
            (VAE_FILE, "Wan VAE")
        };
        Ok(Self {
            dit: first(&kind.dit_file_names(quant), "DiT checkpoint")?,
            dit_low_noise,
            text_encoder: first(&own(&[TEXT_ENCODER_FILE]), "umT5 text encoder")?,
            tokenizer: first(&own(&TOKENIZER_FILES), "umT5 tokenizer")?,
            vae: first(&own(&[vae_file]), vae_name)?,
            clip,
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

    fn touch(dir: &Path, names: &[&str]) {
        for name in names {
            let path = dir.join(name);
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(path, b"").unwrap();
        }
    }

    const SHARED: [&str; 2] = [TEXT_ENCODER_FILE, "google/umt5-xxl/tokenizer.json"];

    /// The official repositories' layouts: sharded DiTs by their index, the A14B experts in
    /// their subfolders, the Wan2.2 VAE for TI2V, the CLIP file for I2V / FLF2V.
    #[test]
    fn official_layouts_are_found() {
        let index = "diffusion_pytorch_model.safetensors.index.json";
        let cases: [(ModelKind, &[&str]); 4] = [
            (
                ModelKind::Wan22T2VA14B,
                &[
                    "high_noise_model/diffusion_pytorch_model.safetensors.index.json",
                    "low_noise_model/diffusion_pytorch_model.safetensors.index.json",
                    VAE_FILE,
                ],
            ),
            (ModelKind::Wan21I2V14B480P, &[index, VAE_FILE, CLIP_FILE]),
            (ModelKind::Wan21Flf2v14B, &[index, VAE_FILE, CLIP_FILE]),
            (ModelKind::Wan22Ti2v5B, &[index, VAE22_FILE]),
        ];
        for (kind, names) in cases {
            let dir = tempfile::tempdir().unwrap();
            touch(dir.path(), &SHARED);
            touch(dir.path(), names);
            let files = ModelFiles::find(dir.path(), kind, false).unwrap();
            assert_eq!(files.dit, dir.path().join(names[0]), "{kind:?}");
            let vae = if kind.uses_wan22_vae() {
                VAE22_FILE
            } else {
                VAE_FILE
            };
            assert_eq!(files.vae, dir.path().join(vae), "{kind:?}");
            assert_eq!(
                files.dit_low_noise.is_some(),
                kind.has_experts(),
                "{kind:?}"
            );
            assert_eq!(
                files.clip.is_some(),
                kind.dit_config().model_type.uses_clip()
            );
        }
    }

    /// A missing file names what was looked for: the Wan2.2 VAE for TI2V, the CLIP file, the
    /// low-noise expert's folder.
    #[test]
    fn missing_files_are_named() {
        let index = "diffusion_pytorch_model.safetensors.index.json";
        let cases: [(ModelKind, &[&str], &str); 3] = [
            (ModelKind::Wan22Ti2v5B, &[index, VAE_FILE], VAE22_FILE),
            (ModelKind::Wan21I2V14B720P, &[index, VAE_FILE], CLIP_FILE),
            (
                ModelKind::Wan22T2VA14B,
                &[
                    "high_noise_model/diffusion_pytorch_model.safetensors",
                    VAE_FILE,
                ],
                "low_noise_model/diffusion_pytorch_model.safetensors.index.json",
            ),
        ];
        for (kind, names, missing) in cases {
            let dir = tempfile::tempdir().unwrap();
            touch(dir.path(), &SHARED);
            touch(dir.path(), names);
            let error = ModelFiles::find(dir.path(), kind, false).unwrap_err();
            assert!(error.to_string().contains(missing), "{kind:?}: {error}");
        }
    }
}
