//! `convert::to_safetensors`: a `.pth` with int8 tensors and a float checkpoint quantised on the
//! way both load back to the same model.

mod common;
mod pth_writer;

use std::path::PathBuf;

use candle_core::{DType, Device};
use turbo_attention::Attention;
use turbo_models::wan::{QuantPolicy, WanModel};
use turbo_models::{convert, Checkpoint};

use common::DitCase;

fn scratch(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "turbo-convert-{name}-{}.safetensors",
        std::process::id()
    ))
}

fn load(case: &DitCase, path: &PathBuf, quant: QuantPolicy) -> WanModel<Box<dyn Attention>> {
    WanModel::from_checkpoint_with_quant(
        path,
        Some(&case.cfg),
        &case.attention,
        quant,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap()
}

#[test]
fn int8_pth_converts_to_the_same_model() {
    let case = DitCase::open("dit_t2v_sla");
    // The committed fixture, or one written from the golden file in use (TURBO_GOLDEN_DIR).
    let scratch_pth = scratch("fixture").with_extension("pth");
    let pth = pth_writer::quant_dit_fixture(&case.weights(), &scratch_pth);
    let out = scratch("pth");
    let converted = convert::to_safetensors(&Checkpoint::open(&pth).unwrap(), &out, false).unwrap();
    assert_eq!(converted.quantized, 0);
    let written = Checkpoint::open(&out).unwrap();
    assert!(written.tensors().any(|t| t.dtype == "I8"));
    let (from_pth, from_safetensors) = (
        load(&case, &pth, QuantPolicy::KeepFloat),
        load(&case, &out, QuantPolicy::KeepFloat),
    );
    let diff = (case.velocity(&from_pth) - case.velocity(&from_safetensors))
        .unwrap()
        .abs()
        .unwrap();
    assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    std::fs::remove_file(out).ok();
    std::fs::remove_file(scratch_pth).ok();
}

#[test]
fn quantising_on_the_way_equals_quantising_at_load() {
    let case = DitCase::open("dit_t2v_sla");
    let float = scratch("float");
    candle_core::safetensors::save(&case.weights(), &float).unwrap();
    let quant = scratch("quant");
    let converted =
        convert::to_safetensors(&Checkpoint::open(&float).unwrap(), &quant, true).unwrap();
    assert_eq!(converted.quantized, 10 * case.cfg.num_layers);
    let at_load = load(&case, &float, QuantPolicy::Quantize);
    let converted = load(&case, &quant, QuantPolicy::KeepFloat);
    assert_eq!(converted.int8_linears(), 10 * case.cfg.num_layers);
    let diff = (case.velocity(&at_load) - case.velocity(&converted))
        .unwrap()
        .abs()
        .unwrap();
    assert_eq!(diff.max_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    std::fs::remove_file(float).ok();
    std::fs::remove_file(quant).ok();
}
