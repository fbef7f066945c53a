//! Invariants of the tile quantisation and of the int8 `Linear` on random Gaussian data.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use proptest::prelude::*;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use turbo_core::Error;
use turbo_quant::{int8_tensor, quantize_tiles, tile_grid, Int8Weight, Linear, QuantPolicy, TILE};

/// Bound on ‖y_int8 − y_f32‖ / ‖y_f32‖ for standard normal x, W and bias (shapes below, partial
/// tiles included). Over 300 cases the measured error ranged from 0.0046 to 0.0145, close to the
/// ≈0.014 that two independent uniform rounding errors of amax/128 ≈ σ/30 per tile predict.
const INT8_RELATIVE_ERROR_BOUND: f64 = 0.02;

/// Standard normal values drawn from `seed`, times `scale`.
fn gaussian(count: usize, scale: f32, seed: u64) -> Vec<f32> {
    StandardNormal
        .sample_iter(StdRng::seed_from_u64(seed))
        .take(count)
        .map(|v: f32| v * scale)
        .collect()
}

fn tensor(values: Vec<f32>, dims: &[usize]) -> Tensor {
    Tensor::from_vec(values, dims, &Device::Cpu).unwrap()
}

fn f64_values(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    turbo_core::golden::relative_error(got, want).unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// Every value is within half a step of its tile's grid, except those rounded up to 128
    /// steps and clamped to 127 (the values near +amax), which are within one step.
    #[test]
    fn dequantised_weights_are_within_half_a_scale(
        rows in 1usize..300,
        cols in 1usize..300,
        magnitude in prop_oneof![Just(1e-3f32), Just(1.0), Just(1e3)],
        seed: u64,
    ) {
        let values = gaussian(rows * cols, magnitude, seed);
        let quantized = quantize_tiles(&values, rows, cols).unwrap();
        let [_, col_tiles] = tile_grid(rows, cols);
        for (i, (&v, &q)) in values.iter().zip(&quantized.values).enumerate() {
            let (r, c) = (i / cols, i % cols);
            let scale = f64::from(quantized.scales[(r / TILE) * col_tiles + c / TILE]);
            let steps = if q == 127 { 1.0 } else { 0.5 };
            let error = (f64::from(v) - f64::from(q) * scale).abs();
            prop_assert!(
                // Slack for the f32 division v·128/amax (relative 2^-24 of up to 128 steps).
                error <= (steps + 1e-5) * scale,
                "({r}, {c}): {v} → {q}, error {error} > {steps} × scale {scale}"
            );
        }
    }

    #[test]
    fn int8_linear_tracks_f32_linear(
        m in 1usize..300, n in 1usize..200, k in 1usize..400, seed: u64,
    ) {
        let weight = tensor(gaussian(n * k, 1.0, seed), &[n, k]);
        let bias = tensor(gaussian(n, 1.0, seed ^ 1), &[n]);
        let x = tensor(gaussian(m * k, 1.0, seed ^ 2), &[m, k]);
        let float = Linear::from_float(weight.clone(), Some(bias.clone())).unwrap();
        let int8 = Linear::quantize(&weight, Some(bias)).unwrap();
        let error = relative_error(&int8.forward(&x).unwrap(), &float.forward(&x).unwrap());
        prop_assert!(error <= INT8_RELATIVE_ERROR_BOUND, "relative error {error}");
    }

    /// Rows are the flattened leading dimensions, so a `[B, L, K]` input gives exactly the rows
    /// of the `[B·L, K]` one, in the input's dtype.
    #[test]
    fn forward_flattens_leading_dimensions(
        batch in 1usize..3, len in 1usize..150, k in 1usize..200, n in 1usize..64, seed: u64,
        bf16 in any::<bool>(),
    ) {
        let dtype = if bf16 { DType::BF16 } else { DType::F32 };
        let layer = Linear::quantize(
            &tensor(gaussian(n * k, 1.0, seed), &[n, k]),
            Some(tensor(gaussian(n, 1.0, seed ^ 1), &[n])),
        )
        .unwrap();
        let x = tensor(gaussian(batch * len * k, 1.0, seed ^ 2), &[batch, len, k])
            .to_dtype(dtype)
            .unwrap();
        let y = layer.forward(&x).unwrap();
        prop_assert_eq!(y.dims(), &[batch, len, n]);
        prop_assert_eq!(y.dtype(), dtype);
        let flat = layer.forward(&x.reshape((batch * len, k)).unwrap()).unwrap();
        prop_assert_eq!(f64_values(&y), f64_values(&flat));
    }
}

#[test]
fn float_linear_is_x_times_w_transposed_plus_bias() {
    let (m, n, k) = (5, 3, 4);
    let weight = gaussian(n * k, 1.0, 1);
    let bias = gaussian(n, 1.0, 2);
    let x = gaussian(2 * m * k, 1.0, 3);
    let layer = Linear::from_float(
        tensor(weight.clone(), &[n, k]),
        Some(tensor(bias.clone(), &[n])),
    )
    .unwrap();
    let y = f64_values(&layer.forward(&tensor(x.clone(), &[2, m, k])).unwrap());
    for (row, x_row) in x.chunks(k).enumerate() {
        for col in 0..n {
            let expected: f64 = x_row
                .iter()
                .zip(&weight[col * k..(col + 1) * k])
                .map(|(&a, &b)| f64::from(a) * f64::from(b))
                .sum::<f64>()
                + f64::from(bias[col]);
            assert!((y[row * n + col] - expected).abs() < 1e-5, "({row}, {col})");
        }
    }
}

#[test]
fn float_linear_returns_the_input_dtype() {
    let layer = Linear::from_float(tensor(gaussian(12, 1.0, 1), &[3, 4]), None).unwrap();
    let x = tensor(gaussian(8, 1.0, 2), &[2, 4])
        .to_dtype(DType::BF16)
        .unwrap();
    assert_eq!(layer.forward(&x).unwrap().dtype(), DType::BF16);
}

#[test]
fn dequantised_layer_agrees_with_the_int8_one() {
    let (m, n, k) = (70, 40, 260);
    let weight = tensor(gaussian(n * k, 1.0, 4), &[n, k]);
    let int8 = Linear::quantize(&weight, None).unwrap();
    let float = int8.to_float(DType::F32).unwrap();
    let x = tensor(gaussian(m * k, 1.0, 5), &[m, k]);
    // Only the activations' quantisation separates the two.
    let error = relative_error(&int8.forward(&x).unwrap(), &float.forward(&x).unwrap());
    assert!(error < 0.015, "relative error {error}");
}

#[test]
fn int8_weight_round_trips_through_u8_tensors() {
    let values: Vec<i8> = vec![-128, -1, 0, 1, 127, 42];
    let weight = Int8Weight::new(
        int8_tensor(&values, (2, 3), &Device::Cpu).unwrap(),
        tensor(vec![0.5], &[1, 1]),
    )
    .unwrap();
    assert_eq!(weight.int8_values().unwrap(), values);
    assert_eq!(
        f64_values(&weight.dequantize().unwrap()),
        vec![-64.0, -0.5, 0.0, 0.5, 63.5, 21.0]
    );
}

#[test]
fn wrong_dtype_and_shapes_are_rejected() {
    let scale = tensor(vec![1.0], &[1, 1]);
    let floats = tensor(vec![0.0; 6], &[2, 3]);
    assert!(matches!(
        Int8Weight::new(floats.clone(), scale.clone()),
        Err(Error::UnsupportedDType { .. })
    ));
    let bytes = int8_tensor(&[0; 6], (2, 3), &Device::Cpu).unwrap();
    assert!(Int8Weight::new(bytes.clone(), tensor(vec![1.0; 2], &[1, 2])).is_err());
    assert!(Linear::from_int8(bytes, scale, Some(tensor(vec![0.0; 3], &[3]))).is_err());
    let layer = Linear::from_float(floats, None).unwrap();
    assert!(layer.forward(&tensor(vec![0.0; 4], &[1, 4])).is_err());
}

/// A `-quant` layer whose tensors do not have the requested shapes: the error names the full
/// key and both shapes.
#[test]
fn load_names_the_key_and_both_shapes() {
    let (out_dim, in_dim) = (3, 5);
    let file = HashMap::from([
        (
            "blocks.0.ffn.0.int8_weight".to_owned(),
            int8_tensor(&[0; 12], (3, 4), &Device::Cpu).unwrap(),
        ),
        (
            "blocks.0.ffn.0.scale".to_owned(),
            tensor(vec![1.0], &[1, 1]),
        ),
    ]);
    let vb = VarBuilder::from_tensors(file, DType::F32, &Device::Cpu);
    let error = Linear::load(
        vb.pp("blocks.0.ffn.0"),
        in_dim,
        out_dim,
        QuantPolicy::Quantize,
    )
    .unwrap_err()
    .to_string();
    assert!(error.contains("blocks.0.ffn.0.int8_weight"), "{error}");
    assert!(
        error.contains("[3, 5]") && error.contains("[3, 4]"),
        "{error}"
    );
}

#[test]
fn load_without_weights_names_the_missing_key() {
    let vb = VarBuilder::from_tensors(HashMap::new(), DType::F32, &Device::Cpu);
    let error = Linear::load(vb.pp("head"), 4, 2, QuantPolicy::KeepFloat)
        .unwrap_err()
        .to_string();
    assert!(error.contains("head.weight"), "{error}");
}
