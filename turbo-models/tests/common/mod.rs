//! What the DiT golden tests share: a golden DiT file with its configuration, attention
//! settings, weights and inputs, every one of them read from the file.

#![allow(dead_code)] // each test crate uses its own subset

use std::collections::{BTreeMap, HashMap};

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use turbo_attention::{Attention, AttentionConfig, AttentionKind, BlockSizes};
use turbo_core::golden::GoldenFile;
use turbo_models::wan::{WanConfig, WanModel};

pub struct DitCase {
    pub file: GoldenFile,
    pub cfg: WanConfig,
    pub attention: AttentionConfig,
}

impl DitCase {
    pub fn open(name: &str) -> Self {
        let file = GoldenFile::open(name).unwrap();
        let cfg = WanConfig::from_value(file.config()).unwrap();
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

    /// The file's model time `in.t`.
    pub fn timestep(&self) -> f64 {
        self.input("in.t").to_vec1::<f32>().unwrap()[0] as f64
    }

    /// The I2V condition `in.y`, when the file has one.
    pub fn condition(&self) -> Option<Tensor> {
        self.file
            .names()
            .iter()
            .any(|n| n == "in.y")
            .then(|| self.input("in.y"))
    }

    pub fn velocity(&self, model: &WanModel<Box<dyn Attention>>) -> Tensor {
        let condition = self.condition();
        model
            .forward(
                &self.input("in.x"),
                self.timestep(),
                &self.input("in.context"),
                condition.as_ref(),
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
