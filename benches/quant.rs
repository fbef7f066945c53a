//! Criterion benchmark of the W8A8 linear against the f32 and bf16 linears on the CPU, at a
//! token count and widths shaped like a Wan block (scaled down for the CPU).
//!
//! `cargo bench --bench quant`

use candle_core::{DType, Device, Module, Tensor};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use turbodiffusion::quant::Linear;

fn linears(c: &mut Criterion) {
    let mut group = c.benchmark_group("linear_cpu");
    group.sample_size(10);
    for (tokens, k, n) in [(512, 1536, 1536), (512, 1536, 8960)] {
        let x = Tensor::randn(0f32, 1.0, (tokens, k), &Device::Cpu).expect("randn");
        let weight = (Tensor::randn(0f32, 1.0, (n, k), &Device::Cpu).expect("randn")
            / (k as f64).sqrt())
        .expect("scale");
        let bias = Tensor::zeros(n, DType::F32, &Device::Cpu).expect("zeros");
        let shape = format!("{tokens}x{k}x{n}");
        let cases = [
            (
                "f32",
                Linear::from_float(weight.clone(), Some(bias.clone())),
                DType::F32,
            ),
            (
                "bf16",
                Linear::from_float(
                    weight.to_dtype(DType::BF16).expect("bf16"),
                    Some(bias.to_dtype(DType::BF16).expect("bf16")),
                ),
                DType::BF16,
            ),
            (
                "w8a8",
                Linear::quantize(&weight, Some(bias.clone())),
                DType::F32,
            ),
        ];
        for (name, linear, dtype) in cases {
            let linear = linear.expect("linear");
            let input = x.to_dtype(dtype).expect("input dtype");
            group.bench_with_input(BenchmarkId::new(name, &shape), &shape, |b, _| {
                b.iter(|| linear.forward(&input).expect("forward"))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, linears);
criterion_main!(benches);
