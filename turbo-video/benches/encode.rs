//! Encoding speed of the default output: 81 frames of 832×480 (TurboDiffusion's 480p clip) to
//! H.264 MP4, and the conversion from the VAE's tensor. The figures are in `docs/performance.md`.

use candle_core::{Device, Tensor};
use criterion::{criterion_group, criterion_main, Criterion};
use turbo_video::{Fps, Mp4Options, Video};

const WIDTH: usize = 832;
const HEIGHT: usize = 480;
const FRAMES: usize = 81;

/// Smooth gradients that drift and a blob that moves: content an encoder has to work on.
fn synthetic_tensor() -> candle_core::Result<Tensor> {
    let mut values = vec![0f32; 3 * FRAMES * HEIGHT * WIDTH];
    for (i, value) in values.iter_mut().enumerate() {
        let x = i % WIDTH;
        let y = i / WIDTH % HEIGHT;
        let t = i / (WIDTH * HEIGHT) % FRAMES;
        let c = i / (WIDTH * HEIGHT * FRAMES);
        let (cx, cy) = ((100 + 6 * t) as f32, (120 + 3 * t) as f32);
        let blob = (-((x as f32 - cx).powi(2) + (y as f32 - cy).powi(2)) / 3000.0).exp();
        let wave = ((x as f32 * 0.02 + t as f32 * 0.1 + c as f32).sin() * 0.5
            + (y as f32 * 0.03).cos() * 0.3)
            * 0.6;
        *value = (wave + blob).clamp(-1.0, 1.0);
    }
    Tensor::from_vec(values, (3, FRAMES, HEIGHT, WIDTH), &Device::Cpu)
}

fn bench_encode(c: &mut Criterion) {
    let tensor = synthetic_tensor().expect("synthetic video");
    let video = Video::from_tensor(&tensor, Fps::DEFAULT).expect("video from tensor");
    let dir = tempfile::tempdir().expect("temporary directory");
    let path = dir.path().join("bench.mp4");

    let mut group = c.benchmark_group("video_832x480x81");
    group.sample_size(10);
    group.bench_function("write_mp4", |b| {
        b.iter(|| {
            video
                .write_mp4(&path, Mp4Options::default())
                .expect("write")
        })
    });
    group.bench_function("from_tensor", |b| {
        b.iter(|| Video::from_tensor(&tensor, Fps::DEFAULT).expect("convert"))
    });
    group.finish();
}

criterion_group!(benches, bench_encode);
criterion_main!(benches);
