//! Invariants of the three attention modes on random inputs.

mod common;

use common::{gaussian, max_abs_diff};

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use turbo_attention::{
    dense_attention_reference, select_blocks, Attention, BlockSizes, DenseAttention, DenseConfig,
    ProjL, SageSlaAttention, SlaAttention, SlaConfig,
};

fn cosine_similarity(a: &Tensor, b: &Tensor) -> f64 {
    let sum = |x: Tensor| x.sum_all().unwrap().to_scalar::<f32>().unwrap() as f64;
    sum((a * b).unwrap()) / (sum(a.sqr().unwrap()) * sum(b.sqr().unwrap())).sqrt()
}

/// Block sizes that are not all multiples of each other, so partial blocks of every kind occur.
fn block_sizes() -> impl Strategy<Value = BlockSizes> {
    prop_oneof![
        Just((128, 64)),
        Just((64, 128)),
        Just((64, 64)),
        Just((16, 24)),
        Just((7, 5))
    ]
    .prop_map(|(q, k)| BlockSizes::new(q, k).unwrap())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn dense_matches_the_naive_formula(
        batch in 1usize..3, len in 1usize..200, kv_len in 1usize..200, heads in 1usize..3,
        head_dim in prop_oneof![Just(64usize), Just(128)], chunk in 1usize..64, seed: u64,
    ) {
        let q = gaussian((batch, len, heads, head_dim), seed);
        let k = gaussian((batch, kv_len, heads, head_dim), seed ^ 1);
        let v = gaussian((batch, kv_len, heads, head_dim), seed ^ 2);
        let chunked = DenseAttention::new(DenseConfig { query_chunk: chunk, ..DenseConfig::default() }).forward(&q, &k, &v).unwrap();
        let naive = dense_attention_reference(&q, &k, &v).unwrap();
        prop_assert_eq!(chunked.dims(), q.dims());
        prop_assert!(max_abs_diff(&chunked, &naive) < 1e-5);
    }

    #[test]
    fn sla_with_all_blocks_and_zero_proj_l_is_dense(
        batch in 1usize..3, len in 1usize..300, heads in 1usize..3,
        head_dim in prop_oneof![Just(64usize), Just(128)], blocks in block_sizes(), seed: u64,
    ) {
        let dims = (batch, len, heads, head_dim);
        let (q, k, v) = (gaussian(dims, seed), gaussian(dims, seed ^ 1), gaussian(dims, seed ^ 2));
        let cfg = SlaConfig::with_blocks(1.0, blocks).unwrap();
        let sla = SlaAttention::new(cfg, ProjL::zeros(head_dim, &Device::Cpu).unwrap());
        let dense = dense_attention_reference(&q, &k, &v).unwrap();
        prop_assert!(max_abs_diff(&sla.forward(&q, &k, &v).unwrap(), &dense) < 1e-5);
    }

    #[test]
    fn every_mode_is_finite_and_shape_preserving(
        batch in 1usize..3, len in 1usize..300, heads in 1usize..4,
        head_dim in prop_oneof![Just(64usize), Just(128)], blocks in block_sizes(),
        topk in 0.01f64..=1.0, bf16: bool, seed: u64,
    ) {
        let dims = (batch, len, heads, head_dim);
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        let input = |s| gaussian(dims, s).to_dtype(dtype).unwrap();
        let (q, k, v) = (input(seed), input(seed ^ 1), input(seed ^ 2));
        let cfg = SlaConfig::with_blocks(topk, blocks).unwrap();
        let proj_l = || ProjL::new(
            &(gaussian((1, 1, head_dim, head_dim), seed ^ 3).squeeze(0).unwrap().squeeze(0).unwrap() * 0.05).unwrap(),
            &Tensor::full(0.01f32, head_dim, &Device::Cpu).unwrap(),
        ).unwrap();
        let modes: [Box<dyn Attention>; 3] = [
            Box::new(DenseAttention::default()),
            Box::new(SlaAttention::new(cfg, proj_l())),
            Box::new(SageSlaAttention::new(cfg, proj_l())),
        ];
        for mode in &modes {
            let out = mode.forward(&q, &k, &v).unwrap();
            prop_assert_eq!(out.dims(), q.dims());
            prop_assert_eq!(out.dtype(), dtype);
            let values = out.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            prop_assert!(values.iter().all(|x| x.is_finite()), "{} produced non-finite values", mode.kind());
        }
    }

    #[test]
    fn selection_rows_hold_t_distinct_ascending_blocks(
        len in 1usize..400, heads in 1usize..3, blocks in block_sizes(), topk in 0.01f64..=1.0, seed: u64,
    ) {
        let dims = (1, heads, len, 64);
        let cfg = SlaConfig::with_blocks(topk, blocks).unwrap();
        let selection = select_blocks(&gaussian(dims, seed), &gaussian(dims, seed ^ 1), &cfg).unwrap();
        prop_assert_eq!(selection.key_blocks(), len.div_ceil(blocks.key));
        prop_assert_eq!(selection.per_row(), cfg.selected_blocks(selection.key_blocks()));
        for head in 0..heads {
            for i in 0..selection.query_blocks() {
                let row = selection.row(head, i);
                prop_assert!(row.windows(2).all(|w| w[0] < w[1]));
                prop_assert!(row.iter().all(|&j| (j as usize) < selection.key_blocks()));
            }
        }
    }

    /// SageSLA's quantisation keeps it close to exact attention on keys with a shared offset (as
    /// real keys have; the K smoothing removes it before int8).
    #[test]
    fn sagesla_with_all_blocks_is_close_to_dense(len in 64usize..300, offset in -4f32..4.0, seed: u64) {
        let dims = (1, len, 2, 64);
        let q = gaussian(dims, seed);
        let k = (gaussian(dims, seed ^ 1) + offset as f64).unwrap();
        let v = gaussian(dims, seed ^ 2);
        let cfg = SlaConfig::new(1.0).unwrap();
        let sage = SageSlaAttention::new(cfg, ProjL::zeros(64, &Device::Cpu).unwrap());
        let cos = cosine_similarity(&sage.forward(&q, &k, &v).unwrap(), &dense_attention_reference(&q, &k, &v).unwrap());
        prop_assert!(cos >= 0.995, "cosine similarity {}", cos);
    }
}
