//! Parity with the `int8_linear` golden file (the W8A8 scheme computed with exact integer
//! arithmetic). Every shape is read from the file's tensors, so any file of the same schema
//! (`$TURBO_GOLDEN_DIR/int8_linear.safetensors`) passes unchanged, partial tiles included.

use std::collections::HashMap;

use candle_core::{DType, Device, Module, Tensor};
use candle_nn::VarBuilder;
use turbo_core::golden::GoldenFile;
use turbo_quant::{
    int8_gemm, int8_tensor, quantize_tiles, Int8Weight, Linear, QuantPolicy, TileMatrix,
};

/// The largest relative error allowed on `y` (‖y − ref‖ / ‖ref‖).
const Y_TOLERANCE: f64 = 1e-5;

struct Golden {
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    x_q: Vec<i8>,
    x_scale: Tensor,
    int8_weight: Vec<i8>,
    int8_weight_shape: Vec<usize>,
    scale: Tensor,
    y: Tensor,
}

fn golden() -> Golden {
    let file = GoldenFile::open("int8_linear").unwrap();
    let t = |name: &str| file.tensor(name).unwrap();
    let (x_q, x_q_shape) = file.i8_values("out.x_q").unwrap();
    let (int8_weight, int8_weight_shape) = file.i8_values("out.int8_weight").unwrap();
    let golden = Golden {
        x: t("in.x"),
        weight: t("in.weight"),
        bias: t("in.bias"),
        x_q,
        x_scale: t("out.x_scale"),
        int8_weight,
        int8_weight_shape,
        scale: t("out.scale"),
        y: t("out.y"),
    };
    assert_eq!(x_q_shape, golden.x.dims());
    assert_eq!(golden.int8_weight_shape, golden.weight.dims());
    golden
}

fn f32_values(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn relative_error(got: &Tensor, want: &Tensor) -> f64 {
    turbo_core::golden::relative_error(got, want).unwrap()
}

fn assert_bits_equal(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (a, b)) in got.iter().zip(want).enumerate() {
        assert_eq!(a.to_bits(), b.to_bits(), "{what}[{i}]: {a} vs {b}");
    }
}

fn matrix_dims(t: &Tensor) -> (usize, usize) {
    t.dims2().unwrap()
}

#[test]
fn activation_quantisation_is_bit_exact() {
    let g = golden();
    let (rows, cols) = matrix_dims(&g.x);
    let q = quantize_tiles(&f32_values(&g.x), rows, cols).unwrap();
    assert_eq!(q.values, g.x_q);
    assert_bits_equal(&q.scales, &f32_values(&g.x_scale), "x_scale");
}

#[test]
fn weight_quantisation_is_bit_exact() {
    let g = golden();
    let weight = Int8Weight::quantize(&g.weight).unwrap();
    assert_eq!(weight.int8_values().unwrap(), g.int8_weight);
    assert_eq!(weight.scale().dims(), g.scale.dims());
    assert_bits_equal(&f32_values(weight.scale()), &f32_values(&g.scale), "scale");
}

#[test]
fn gemm_on_the_golden_operands_matches_y() {
    let g = golden();
    let (m, k) = matrix_dims(&g.x);
    let n = g.int8_weight_shape[0];
    let (x_scale, w_scale) = (f32_values(&g.x_scale), f32_values(&g.scale));
    let x = TileMatrix::new(&g.x_q, &x_scale, m, k).unwrap();
    let w = TileMatrix::new(&g.int8_weight, &w_scale, n, k).unwrap();
    let y = Tensor::from_vec(int8_gemm(x, w).unwrap(), (m, n), &Device::Cpu).unwrap();
    let y = y
        .broadcast_add(&g.bias.to_dtype(DType::F32).unwrap())
        .unwrap();
    let error = relative_error(&y, &g.y);
    assert!(error <= Y_TOLERANCE, "relative error {error:e}");
}

/// The golden `y` is f32, so the layers are fed the (exactly representable) bf16 input as f32.
fn check_layer(layer: &Linear, g: &Golden, what: &str) {
    assert!(layer.is_int8(), "{what}: not int8");
    let y = layer.forward(&g.x.to_dtype(DType::F32).unwrap()).unwrap();
    assert_eq!(y.dtype(), DType::F32);
    let error = relative_error(&y, &g.y);
    assert!(error <= Y_TOLERANCE, "{what}: relative error {error:e}");
}

#[test]
fn linear_from_checkpoint_tensors_matches_y() {
    let g = golden();
    let int8_weight = int8_tensor(&g.int8_weight, g.int8_weight_shape.clone(), &Device::Cpu);
    let layer = Linear::from_int8(int8_weight.unwrap(), g.scale.clone(), Some(g.bias.clone()));
    check_layer(&layer.unwrap(), &g, "from_int8");
}

#[test]
fn linear_quantised_at_load_matches_y() {
    let g = golden();
    let layer = Linear::quantize(&g.weight, Some(g.bias.clone())).unwrap();
    check_layer(&layer, &g, "quantize");
}

#[test]
fn linear_load_detects_both_storages() {
    let g = golden();
    let (out_dim, in_dim) = matrix_dims(&g.weight);
    let int8_weight = int8_tensor(&g.int8_weight, g.int8_weight_shape.clone(), &Device::Cpu);
    let quant_file = HashMap::from([
        ("layer.int8_weight".to_owned(), int8_weight.unwrap()),
        ("layer.scale".to_owned(), g.scale.clone()),
        ("layer.bias".to_owned(), g.bias.clone()),
    ]);
    let float_file = HashMap::from([
        ("layer.weight".to_owned(), g.weight.clone()),
        ("layer.bias".to_owned(), g.bias.clone()),
    ]);
    for policy in [QuantPolicy::KeepFloat, QuantPolicy::Quantize] {
        let vb = VarBuilder::from_tensors(quant_file.clone(), DType::F32, &Device::Cpu);
        let layer = Linear::load(vb.pp("layer"), in_dim, out_dim, policy).unwrap();
        check_layer(&layer, &g, &format!("-quant file, {policy:?}"));
    }
    let vb = VarBuilder::from_tensors(float_file.clone(), DType::F32, &Device::Cpu);
    let layer = Linear::load(vb.pp("layer"), in_dim, out_dim, QuantPolicy::Quantize).unwrap();
    check_layer(&layer, &g, "float file, Quantize");

    let vb = VarBuilder::from_tensors(float_file, DType::F32, &Device::Cpu);
    let layer = Linear::load(vb.pp("layer"), in_dim, out_dim, QuantPolicy::KeepFloat).unwrap();
    assert!(!layer.is_int8());
    assert_eq!(layer.float_weight().unwrap().dtype(), DType::F32);
}

#[test]
fn bf16_input_gives_bf16_output_close_to_y() {
    let g = golden();
    let layer = Linear::quantize(&g.weight, Some(g.bias.clone())).unwrap();
    let y = layer.forward(&g.x).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    // Rounding the product and the bias sum to bf16 costs at most a few 2^-9 relative errors.
    let error = relative_error(&y, &g.y);
    assert!(error <= 4e-3, "relative error {error:e}");
}
