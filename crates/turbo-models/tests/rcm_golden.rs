//! A whole rCM sample with the SLA DiT against `rcm_t2v_sla` (upstream sampler and network in
//! float32, with the file's injected noise).

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use turbo_attention::{Attention, AttentionConfig, AttentionKind, BlockSizes};
use turbo_core::golden::GoldenFile;
use turbo_models::wan::{DitCondition, WanConfig, WanModel};
use turbo_sampler::golden::RcmGolden;

#[test]
fn rcm_sample_with_the_sla_dit_matches_upstream() {
    let file = GoldenFile::open("rcm_t2v_sla").unwrap();
    let cfg = WanConfig::from_value(file.config()).unwrap();
    let number = |key: &str| file.config_f64(&[key]).unwrap();
    let attention = AttentionConfig {
        kind: AttentionKind::sla(number("sla_topk")).unwrap(),
        blocks: BlockSizes::new(
            number("sla_block_q") as usize,
            number("sla_block_k") as usize,
        )
        .unwrap(),
    };
    let weights = file
        .names()
        .into_iter()
        .filter(|n| !n.starts_with("in.") && !n.starts_with("out."))
        .map(|n| {
            let t = file.tensor(&n).unwrap();
            (n, t)
        })
        .collect();
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let dit = WanModel::<Box<dyn Attention>>::load(vb, &cfg, &attention).unwrap();
    let condition = DitCondition::text(file.tensor("in.context").unwrap());
    let outcome = RcmGolden::from_file(&file)
        .unwrap()
        .run(&dit, &condition)
        .unwrap();
    println!("rcm_t2v_sla: relative error {:.3e}", outcome.relative_error);
    assert!(
        outcome.relative_error <= 1e-4,
        "relative error {}",
        outcome.relative_error
    );
}
