//! The causal conv3d (one conv2d over stacked time windows) against its plain-loop twin, and
//! the chunked form with remembered frames against a pass over the whole sequence.

mod common;

use candle_core::{Device, Tensor};
use common::max_abs_diff;
use proptest::prelude::*;
use turbo_models::vae::{causal_conv3d_reference, CausalConv3d, Conv3dSpec};

fn random(dims: &[usize], seed: u64) -> Tensor {
    // A small deterministic generator keeps proptest's shrinking meaningful.
    let count: usize = dims.iter().product();
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

#[derive(Debug, Clone, Copy)]
struct Case {
    spec: Conv3dSpec,
    batch: usize,
    frames: usize,
    height: usize,
    width: usize,
    seed: u64,
}

fn cases() -> impl Strategy<Value = Case> {
    (
        (
            1usize..4,
            1usize..4,
            prop_oneof![Just(1usize), Just(3)],
            prop_oneof![Just(1usize), Just(3)],
        ),
        (1usize..3, 1usize..7, 1usize..6, 1usize..6),
        (1usize..3, any::<u64>()),
    )
        .prop_map(
            |((cin, cout, kt, ks), (batch, frames, height, width), (stride, seed))| {
                // Upstream's causal convs pad by kernel/2 in every axis; time_conv has no spatial kernel.
                let pad_t = kt / 2;
                Case {
                    spec: Conv3dSpec {
                        in_channels: cin,
                        out_channels: cout,
                        kernel: (kt, ks, ks),
                        padding: (pad_t, ks / 2),
                        time_stride: stride,
                    },
                    batch,
                    frames,
                    height,
                    width,
                    seed,
                }
            },
        )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn conv3d_matches_plain_loops(case in cases()) {
        let (kt, kh, kw) = case.spec.kernel;
        let x = random(&[case.batch, case.frames, case.spec.in_channels, case.height, case.width], case.seed);
        let weight = random(&[case.spec.out_channels, case.spec.in_channels, kt, kh, kw], case.seed ^ 1);
        let bias = random(&[case.spec.out_channels], case.seed ^ 2);
        let conv = CausalConv3d::new(&weight, &bias, case.spec).unwrap();
        let out = conv.forward(&x, None).unwrap();
        let reference = causal_conv3d_reference(&x, &weight, &bias, case.spec).unwrap();
        prop_assert_eq!(out.dims(), reference.dims());
        prop_assert!(max_abs_diff(&out, &reference) < 1e-5);
    }

    #[test]
    fn chunks_with_remembered_frames_equal_the_whole_sequence(
        case in cases(),
        split in 1usize..6,
    ) {
        let spec = Conv3dSpec { kernel: (3, case.spec.kernel.1, case.spec.kernel.2), padding: (1, case.spec.padding.1), time_stride: 1, ..case.spec };
        let frames = case.frames.max(2);
        let split = split.min(frames - 1);
        let x = random(&[case.batch, frames, spec.in_channels, case.height, case.width], case.seed);
        let weight = random(&[spec.out_channels, spec.in_channels, 3, spec.kernel.1, spec.kernel.2], case.seed ^ 1);
        let bias = random(&[spec.out_channels], case.seed ^ 2);
        let conv = CausalConv3d::new(&weight, &bias, spec).unwrap();
        let whole = conv.forward(&x, None).unwrap();
        let head = x.narrow(1, 0, split).unwrap();
        let tail = x.narrow(1, split, frames - split).unwrap();
        let remembered = head.narrow(1, split.saturating_sub(2), split.min(2)).unwrap();
        let chunked = Tensor::cat(&[
            conv.forward(&head, None).unwrap(),
            conv.forward(&tail, Some(&remembered)).unwrap(),
        ], 1).unwrap();
        prop_assert!(max_abs_diff(&whole, &chunked) < 1e-5);
    }
}
