//! Parity of SLA and SageSLA with the `sla_attention` golden file (the official SLA kernel run in
//! float32). Every shape and setting is read from the file, so any file of the same schema
//! (`$TURBO_GOLDEN_DIR/sla_attention.safetensors`) passes unchanged.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use turbo_attention::{
    load_attention, select_blocks, Attention, AttentionConfig, AttentionKind, BlockSizes, ProjL,
    SageSlaAttention, SlaAttention, SlaConfig,
};
use turbo_core::golden::GoldenFile;

struct Case {
    name: String,
    cfg: SlaConfig,
    /// Inputs in the file's heads-first `[B, H, L, D]` layout.
    q: Tensor,
    k: Tensor,
    v: Tensor,
    proj_weight: Tensor,
    proj_bias: Tensor,
    expected: Tensor,
    expected_blocks: Vec<u32>,
}

impl Case {
    fn proj_l(&self) -> ProjL {
        ProjL::new(&self.proj_weight, &self.proj_bias).unwrap()
    }

    /// Runs `attention` through the public `[B, L, H, D]` contract and returns heads-first f32.
    fn run(&self, attention: &dyn Attention) -> Tensor {
        let tokens_first = |x: &Tensor| x.transpose(1, 2).unwrap().contiguous().unwrap();
        let out = attention
            .forward(
                &tokens_first(&self.q),
                &tokens_first(&self.k),
                &tokens_first(&self.v),
            )
            .unwrap();
        tokens_first(&out)
    }
}

fn cases() -> Vec<Case> {
    let file = GoldenFile::open("sla_attention").unwrap();
    let topk = file.config_f64(&["topk"]).unwrap();
    let blocks = file
        .config_value(&["blocks"])
        .unwrap()
        .as_object()
        .unwrap()
        .clone();
    assert!(!blocks.is_empty(), "no cases in {}", file.path().display());
    blocks
        .iter()
        .map(|(name, sizes)| {
            let size = |i: usize| sizes[i].as_u64().unwrap() as usize;
            let blocks = BlockSizes::new(size(0), size(1)).unwrap();
            let t = |key: &str| file.tensor(&format!("{name}.{key}")).unwrap();
            let index = t("out.block_index").to_dtype(DType::I64).unwrap();
            Case {
                name: name.clone(),
                cfg: SlaConfig::with_blocks(topk, blocks).unwrap(),
                q: t("in.q"),
                k: t("in.k"),
                v: t("in.v"),
                proj_weight: t("proj_l.weight"),
                proj_bias: t("proj_l.bias"),
                expected: t("out.o"),
                expected_blocks: index
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<i64>()
                    .unwrap()
                    .iter()
                    .map(|&i| i as u32)
                    .collect(),
            }
        })
        .collect()
}

fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    let diff = (got - want)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let norm = want
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    (diff as f64 / norm as f64).sqrt()
}

fn cosine_similarity(a: &Tensor, b: &Tensor) -> f64 {
    let dot = (a * b)
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap() as f64;
    let norm = |x: &Tensor| {
        (x.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap() as f64)
            .sqrt()
    };
    dot / (norm(a) * norm(b))
}

#[test]
fn selected_blocks_match_exactly() {
    for case in cases() {
        let selection = select_blocks(&case.q, &case.k, &case.cfg).unwrap();
        let got = selection
            .to_tensor(&Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<u32>()
            .unwrap();
        assert_eq!(got, case.expected_blocks, "case {}", case.name);
    }
}

#[test]
fn sla_output_matches_within_1e_4() {
    for case in cases() {
        let sla = SlaAttention::new(case.cfg, case.proj_l());
        let err = relative_error(&case.run(&sla), &case.expected);
        println!("{}: sla vs golden relative error {err:.3e}", case.name);
        assert!(err <= 1e-4, "case {}: relative error {err:e}", case.name);
    }
}

#[test]
fn run_time_path_loads_proj_l_from_a_var_builder() {
    for case in cases() {
        let tensors = HashMap::from([
            ("proj_l.weight".to_owned(), case.proj_weight.clone()),
            ("proj_l.bias".to_owned(), case.proj_bias.clone()),
        ]);
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &Device::Cpu);
        let config = AttentionConfig {
            kind: AttentionKind::sla(case.cfg.topk).unwrap(),
            blocks: case.cfg.blocks,
        };
        let attention = load_attention(vb, case.q.dim(3).unwrap(), &config).unwrap();
        assert_eq!(attention.kind(), config.kind);
        let err = relative_error(&case.run(attention.as_ref()), &case.expected);
        assert!(err <= 1e-4, "case {}: relative error {err:e}", case.name);
    }
}

#[test]
fn bf16_inputs_stay_close_to_the_f32_golden() {
    for case in cases() {
        let sla = SlaAttention::new(case.cfg, case.proj_l());
        let to_bf16 = |x: &Tensor| x.transpose(1, 2).unwrap().to_dtype(DType::BF16).unwrap();
        let out = sla
            .forward(&to_bf16(&case.q), &to_bf16(&case.k), &to_bf16(&case.v))
            .unwrap();
        assert_eq!(out.dtype(), DType::BF16);
        let out = out
            .to_dtype(DType::F32)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .contiguous()
            .unwrap();
        let err = relative_error(&out, &case.expected);
        println!("{}: sla bf16 vs golden relative error {err:.3e}", case.name);
        assert!(
            err <= 2e-2,
            "case {}: bf16 relative error {err:e}",
            case.name
        );
    }
}

/// SageSLA differs from SLA only by the INT8 / FP8 quantisation of its sparse branch.
/// Measured on the golden inputs: cosine similarity 0.99945 and relative error 3.3e-2 (both
/// cases), so the bounds below leave room for other files of the schema.
#[test]
fn sagesla_stays_within_the_quantisation_bound_of_sla() {
    for case in cases() {
        let sage = case.run(&SageSlaAttention::new(case.cfg, case.proj_l()));
        let cos = cosine_similarity(&sage, &case.expected);
        let err = relative_error(&sage, &case.expected);
        println!(
            "{}: sagesla vs sla cosine {cos:.6}, relative error {err:.3e}",
            case.name
        );
        assert!(cos >= 0.99, "case {}: cosine similarity {cos}", case.name);
        assert!(err <= 5e-2, "case {}: relative error {err:e}", case.name);
    }
}
