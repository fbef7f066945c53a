//! Parity of the Wan DiT with the golden files computed by the upstream PyTorch modules in
//! float32. Every dimension, the timestep and the attention settings come from the file.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use turbo_attention::{Attention, AttentionConfig, AttentionKind, BlockSizes};
use turbo_core::golden::GoldenFile;
use turbo_models::wan::{PatchLayout, WanConfig, WanModel};

struct DitCase {
    file: GoldenFile,
    cfg: WanConfig,
    attention: AttentionConfig,
}

impl DitCase {
    fn open(name: &str) -> Self {
        let file = GoldenFile::open(name).unwrap();
        let cfg = WanConfig::from_value(file.config()).unwrap();
        let attention = attention_config(&file);
        Self {
            file,
            cfg,
            attention,
        }
    }

    /// The file's weights (every tensor that is not an input or an output) in `dtype`.
    fn var_builder(&self, dtype: DType) -> VarBuilder<'static> {
        let weights: HashMap<String, Tensor> = self
            .file
            .names()
            .into_iter()
            .filter(|name| !name.starts_with("in.") && !name.starts_with("out."))
            .map(|name| {
                let tensor = self.file.tensor(&name).unwrap();
                (name, tensor)
            })
            .collect();
        VarBuilder::from_tensors(weights, dtype, &Device::Cpu)
    }

    fn model(&self, dtype: DType) -> WanModel<Box<dyn Attention>> {
        WanModel::load(self.var_builder(dtype), &self.cfg, &self.attention).unwrap()
    }

    fn input(&self, name: &str) -> Tensor {
        self.file.tensor(name).unwrap()
    }

    fn velocity(&self, model: &WanModel<Box<dyn Attention>>) -> Tensor {
        let t = self.input("in.t").to_vec1::<f32>().unwrap()[0] as f64;
        let condition = self
            .file
            .names()
            .contains(&"in.y".to_owned())
            .then(|| self.input("in.y"));
        model
            .forward(
                &self.input("in.x"),
                t,
                &self.input("in.context"),
                condition.as_ref(),
            )
            .unwrap()
    }
}

/// `original`, or `sla` with the file's top-k and block sizes.
fn attention_config(file: &GoldenFile) -> AttentionConfig {
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

fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let sum = |x: Tensor| {
        x.sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
    };
    let got = got.to_dtype(DType::F32).unwrap();
    (sum((&got - want).unwrap().sqr().unwrap()) / sum(want.sqr().unwrap())).sqrt()
}

fn check_parity(name: &str, expected_layout: PatchLayout) {
    let case = DitCase::open(name);
    let model = case.model(DType::F32);
    assert_eq!(model.layout().patch, expected_layout, "{name}");
    let want = case.input("out.velocity");
    let got = case.velocity(&model);
    assert_eq!(got.dims(), want.dims(), "{name}");
    let err = relative_error(&got, &want);
    println!("{name}: f32 relative error {err:.3e}");
    assert!(err <= 1e-4, "{name}: relative error {err:e}");
}

#[test]
fn t2v_dense_matches_upstream() {
    check_parity("dit_t2v_dense", PatchLayout::Conv3d);
}

#[test]
fn t2v_sla_turbodiffusion_layout_matches_upstream() {
    check_parity("dit_t2v_sla", PatchLayout::Linear);
}

#[test]
fn i2v_expert_matches_upstream() {
    check_parity("dit_i2v_dense", PatchLayout::Conv3d);
}

/// bf16 weights and activations with the f32 islands stay close to the f32 reference.
#[test]
fn bf16_forward_stays_close() {
    for name in ["dit_t2v_dense", "dit_t2v_sla", "dit_i2v_dense"] {
        let case = DitCase::open(name);
        let err = relative_error(
            &case.velocity(&case.model(DType::BF16)),
            &case.input("out.velocity"),
        );
        println!("{name}: bf16 relative error {err:.3e}");
        assert!(err <= 3e-2, "{name}: bf16 relative error {err:e}");
    }
}
