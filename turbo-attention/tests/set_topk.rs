//! Changing the top-k of a built operator, as a per-step schedule does.

mod common;

use common::{gaussian, max_abs_diff};

use candle_core::Device;
use turbo_attention::{
    Attention, AttentionKind, BlockSizes, DenseAttention, DenseConfig, ProjL, SageSlaAttention,
    SlaAttention, SlaConfig,
};
use turbo_core::Error;

/// An SLA-family operator built with `topk`, and one built with 0.25 then set to `topk`.
fn built_and_retuned<A: Attention>(make: impl Fn(SlaConfig, ProjL) -> A, topk: f64) -> (A, A) {
    let blocks = BlockSizes::new(16, 16).unwrap();
    let proj_l = || ProjL::zeros(32, &Device::Cpu).unwrap();
    let built = make(SlaConfig::with_blocks(topk, blocks).unwrap(), proj_l());
    let mut retuned = make(SlaConfig::with_blocks(0.25, blocks).unwrap(), proj_l());
    retuned.set_topk(topk).unwrap();
    (built, retuned)
}

fn check_sla_family<A: Attention>(make: impl Fn(SlaConfig, ProjL) -> A + Copy) {
    let (q, k, v) = (
        gaussian((1, 128, 2, 32), 1),
        gaussian((1, 128, 2, 32), 2),
        gaussian((1, 128, 2, 32), 3),
    );
    let (built, mut retuned) = built_and_retuned(make, 0.75);
    assert_eq!(retuned.kind().topk(), Some(0.75));
    let after = retuned.forward(&q, &k, &v).unwrap();
    assert_eq!(
        max_abs_diff(&after, &built.forward(&q, &k, &v).unwrap()),
        0.0
    );

    let (original, _) = built_and_retuned(make, 0.25);
    let before = original.forward(&q, &k, &v).unwrap();
    assert!(
        max_abs_diff(&after, &before) > 1e-3,
        "the top-k changed nothing"
    );

    for bad in [0.0, 1.5, -0.1, f64::NAN] {
        assert!(matches!(
            retuned.set_topk(bad),
            Err(Error::InvalidTopk { .. })
        ));
    }
    assert_eq!(
        retuned.kind().topk(),
        Some(0.75),
        "a bad top-k changed the operator"
    );
}

#[test]
fn sla_and_sagesla_attend_with_the_new_topk() {
    check_sla_family(SlaAttention::new);
    check_sla_family(SageSlaAttention::new);
}

#[test]
fn boxed_operators_forward_the_change() {
    let mut boxed: Box<dyn Attention> = Box::new(SlaAttention::new(
        SlaConfig::new(0.1).unwrap(),
        ProjL::zeros(32, &Device::Cpu).unwrap(),
    ));
    boxed.set_topk(0.5).unwrap();
    assert_eq!(boxed.kind(), AttentionKind::Sla { topk: 0.5 });
}

#[test]
fn shared_operators_refuse_the_change() {
    let sla = SlaAttention::new(
        SlaConfig::new(0.1).unwrap(),
        ProjL::zeros(32, &Device::Cpu).unwrap(),
    );
    let mut shared = std::sync::Arc::new(sla);
    let _other = shared.clone();
    assert!(shared.set_topk(0.5).is_err());
    assert_eq!(shared.kind().topk(), Some(0.1));
}

#[test]
fn dense_attention_ignores_a_topk() {
    let mut dense = DenseAttention::new(DenseConfig::default());
    dense.set_topk(0.5).unwrap();
    assert_eq!(dense.kind(), AttentionKind::Original);
}
