//! What the DiT golden tests share: a golden DiT file with its configuration, attention
//! settings, weights and inputs, every one of them read from the file.

#![allow(dead_code)] // each test crate uses its own subset

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use turbo_attention::{Attention, AttentionConfig, AttentionKind, BlockSizes};
use turbo_core::golden::GoldenFile;
use turbo_models::vae::{Vae22Config, VaeConfig, WAN21_LATENT_MEAN, WAN21_LATENT_STD};
use turbo_models::wan::{TokenTimesteps, WanConfig, WanModel};

pub struct DitCase {
    pub file: GoldenFile,
    pub cfg: WanConfig,
    pub attention: AttentionConfig,
}

impl DitCase {
    pub fn open(name: &str) -> Self {
        let file = GoldenFile::open(name).unwrap();
        // A Wan2.1 I2V file says "i2v" as a Wan2.2 expert does; its `img_emb` tells them apart.
        let has_img_emb = file.names().iter().any(|n| n == "img_emb.proj.0.weight");
        let cfg = WanConfig::from_value(file.config())
            .unwrap()
            .with_image_embedding(has_img_emb);
        let attention = attention_config(&file);
        Self {
            file,
            cfg,
            attention,
        }
    }

    /// Every tensor of the file that is not an input or an output.
    pub fn weights(&self) -> HashMap<String, Tensor> {
        self.file.weights().unwrap()
    }

    pub fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        VarBuilder::from_tensors(self.weights(), dtype, &Device::Cpu)
    }

    pub fn model(&self, dtype: DType) -> WanModel<Box<dyn Attention>> {
        WanModel::load(self.var_builder(dtype), &self.cfg, &self.attention).unwrap()
    }

    pub fn input(&self, name: &str) -> Tensor {
        self.file.tensor(name).unwrap()
    }

    /// The file's model time `in.t` (`[1]`).
    pub fn timestep(&self) -> f64 {
        self.input("in.t").to_vec1::<f32>().unwrap()[0] as f64
    }

    /// The file's `in.t`: one time for every token (`[1]`), or one per token (`[1, L]`).
    pub fn timesteps(&self) -> TokenTimesteps {
        let t = self.input("in.t");
        if t.elem_count() == 1 {
            TokenTimesteps::Uniform(self.timestep())
        } else {
            TokenTimesteps::from_tensor(&t).unwrap()
        }
    }

    /// An optional input of the file (`in.y`, `in.clip`).
    pub fn optional_input(&self, name: &str) -> Option<Tensor> {
        self.file
            .names()
            .iter()
            .any(|n| n == name)
            .then(|| self.input(name))
    }

    /// The I2V condition `in.y`, when the file has one.
    pub fn condition(&self) -> Option<Tensor> {
        self.optional_input("in.y")
    }

    /// The model's velocity on the file's inputs: `in.x`, `in.t` (one or per token),
    /// `in.context`, and `in.y` and `in.clip` when present.
    pub fn velocity(&self, model: &WanModel<Box<dyn Attention>>) -> Tensor {
        self.velocity_at(model, &self.timesteps())
    }

    /// [`DitCase::velocity`] at `timesteps` instead of the file's.
    pub fn velocity_at(
        &self,
        model: &WanModel<Box<dyn Attention>>,
        timesteps: &TokenTimesteps,
    ) -> Tensor {
        model
            .forward_with(
                &self.input("in.x"),
                timesteps,
                &self.input("in.context"),
                self.condition().as_ref(),
                self.optional_input("in.clip").as_ref(),
            )
            .unwrap()
    }

    /// Relative error of `got` against the file's `out.velocity`.
    pub fn velocity_error(&self, got: &Tensor) -> f64 {
        relative_error(got, &self.input("out.velocity"))
    }
}

/// `original`, or `sla` with the file's top-k and block sizes.
pub fn attention_config(file: &GoldenFile) -> AttentionConfig {
    match file.config_value(&["attention"]).unwrap().as_str().unwrap() {
        "original" => AttentionConfig::new(AttentionKind::Original),
        "sla" => AttentionConfig {
            kind: AttentionKind::sla(file.config_f64(&["sla_topk"]).unwrap()).unwrap(),
            blocks: BlockSizes::new(
                file.config_f64(&["sla_block_q"]).unwrap() as usize,
                file.config_f64(&["sla_block_k"]).unwrap() as usize,
            )
            .unwrap(),
        },
        other => panic!("unexpected attention `{other}`"),
    }
}

/// The largest |a − b| (0 for bitwise-equal f32 tensors).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

pub fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    turbo_core::golden::relative_error(got, want).unwrap()
}

/// Asserts that the golden file holds exactly the tensors `expected` lists, beside its own
/// `in.*` inputs and `out.*` references.
pub fn assert_golden_holds_exactly(file: &GoldenFile, expected: &[(String, Vec<usize>)]) {
    let checkpoint = turbo_models::Checkpoint::open(file.path()).unwrap();
    for problem in turbo_models::checkpoint::key_problems(checkpoint.tensors(), expected) {
        match problem {
            turbo_core::KeyProblem::Unexpected { key, .. }
                if key.starts_with("in.") || key.starts_with("out.") => {}
            other => panic!("{other}"),
        }
    }
}

/// Tensor name → shape.
pub type KeyShapes = BTreeMap<String, Vec<usize>>;

/// The `name<TAB>[d0, d1, …]` lines of `fixtures/keys/<name>.tsv` (the key lists of the released
/// checkpoints); `[]` is a scalar.
pub fn key_list(name: &str) -> KeyShapes {
    let path = format!("{}/../fixtures/keys/{name}.tsv", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let (key, shape) = line.split_once('\t').unwrap();
            let dims = shape
                .trim()
                .trim_matches(|c| c == '[' || c == ']')
                .split(',')
                .filter(|d| !d.trim().is_empty())
                .map(|d| d.trim().parse().unwrap())
                .collect();
            (key.to_owned(), dims)
        })
        .collect()
}

/// The Wan2.1 VAE of a `vae` golden file: every dimension from its `config`, the latent
/// statistics Wan2.1's where it says `wan2.1`.
pub fn vae_config(file: &GoldenFile) -> VaeConfig {
    let cfg = file.config();
    let usize_of = |v: &serde_json::Value| v.as_u64().unwrap() as usize;
    let constants = |key: &str, wan21: &[f32]| match cfg[key].as_str() {
        Some("wan2.1") => wan21.to_vec(),
        _ => cfg[key]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap() as f32)
            .collect(),
    };
    VaeConfig {
        dim: usize_of(&cfg["dim"]),
        z_dim: usize_of(&cfg["z_dim"]),
        dim_mult: cfg["dim_mult"]
            .as_array()
            .unwrap()
            .iter()
            .map(usize_of)
            .collect(),
        num_res_blocks: usize_of(&cfg["num_res_blocks"]),
        temporal_downsample: cfg["temperal_downsample"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_bool().unwrap())
            .collect(),
        latent_mean: constants("latent_mean", &WAN21_LATENT_MEAN),
        latent_std: constants("latent_std", &WAN21_LATENT_STD),
    }
}

/// The Wan2.2 VAE of a `vae22` golden file: its `config` and latent statistics.
pub fn vae22_config(file: &GoldenFile) -> Vae22Config {
    // Attention sits only in the middle blocks, as in the release.
    assert_eq!(
        file.config()["attn_scales"].as_array().map(Vec::len),
        Some(0)
    );
    let list = |name: &str| file.tensor(name).unwrap().to_vec1::<f32>().unwrap();
    Vae22Config::from_value(file.config(), list("in.latent_mean"), list("in.latent_std")).unwrap()
}
