//! A whole rCM sample with the SLA DiT against `rcm_t2v_sla` (upstream sampler and network in
//! float32, with the file's injected noise).

mod common;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use turbo_attention::Attention;
use turbo_core::golden::GoldenFile;
use turbo_models::wan::{DitCondition, WanConfig, WanModel};
use turbo_sampler::golden::RcmGolden;

#[test]
fn rcm_sample_with_the_sla_dit_matches_upstream() {
    let file = GoldenFile::open("rcm_t2v_sla").unwrap();
    let cfg = WanConfig::from_value(file.config()).unwrap();
    let attention = common::attention_config(&file);
    let vb = VarBuilder::from_tensors(file.weights().unwrap(), DType::F32, &Device::Cpu);
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
