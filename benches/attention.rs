//! Criterion benchmark of the three attention modes on the CPU across top-k and sequence length.
//!
//! `cargo bench --bench attention`

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use turbodiffusion::attention::{
    Attention, DenseAttention, ProjL, SageSlaAttention, SlaAttention, SlaConfig,
};

const HEADS: usize = 2;
const HEAD_DIM: usize = 128;

fn modes() -> Vec<(String, Box<dyn Attention>)> {
    let mut modes: Vec<(String, Box<dyn Attention>)> =
        vec![("original".into(), Box::new(DenseAttention::default()))];
    for topk in [0.05, 0.1, 0.15] {
        let cfg = SlaConfig::new(topk).expect("valid top-k");
        let proj_l = || ProjL::zeros(HEAD_DIM, &Device::Cpu).expect("zero proj_l");
        modes.push((
            format!("sla:{topk}"),
            Box::new(SlaAttention::new(cfg, proj_l())),
        ));
        modes.push((
            format!("sagesla:{topk}"),
            Box::new(SageSlaAttention::new(cfg, proj_l())),
        ));
    }
    modes
}

fn attention_modes(c: &mut Criterion) {
    let mut group = c.benchmark_group("attention_cpu");
    group.sample_size(10);
    for seq_len in [1024, 4096] {
        let gaussian = || {
            Tensor::randn(0f32, 1.0, (1, seq_len, HEADS, HEAD_DIM), &Device::Cpu).expect("randn")
        };
        let (q, k, v) = (gaussian(), gaussian(), gaussian());
        for (name, attention) in modes() {
            group.bench_with_input(BenchmarkId::new(name, seq_len), &seq_len, |b, _| {
                b.iter(|| attention.forward(&q, &k, &v).expect("attention forward"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, attention_modes);
criterion_main!(benches);
