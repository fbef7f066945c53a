//! LoRA adapters against the golden files computed by the upstream DiT with the merge rule in
//! the base file's config: every adapter file the config lists, its strength, rank and α read
//! from the files, nothing hard-coded.

mod common;

use candle_core::{DType, Tensor};
use turbo_attention::Attention;
use turbo_core::golden::golden_dir;
use turbo_core::Error;
use turbo_models::lora::{LoraAdapter, LoraLayout, LoraMode, ScaledLora};
use turbo_models::wan::{QuantPolicy, WanModel};

use common::{max_abs_diff, relative_error, DitCase};

type Dit = WanModel<Box<dyn Attention>>;

/// The base DiT file; its config lists the adapter files and their expected outputs.
const BASE: &str = "lora";

struct LoraCase {
    base: DitCase,
    strength: f64,
    /// Each adapter file with the output it must reproduce.
    files: Vec<(String, String)>,
}

impl LoraCase {
    fn open() -> Self {
        let base = DitCase::open(BASE);
        let strength = base.file.config_f64(&["lora_strength"]).unwrap();
        let files = base
            .file
            .config_value(&["files"])
            .unwrap()
            .as_object()
            .unwrap()
            .iter()
            .map(|(file, output)| (file.clone(), expected_output(output.as_str().unwrap())))
            .collect();
        Self {
            base,
            strength,
            files,
        }
    }

    fn adapter(&self, file: &str) -> LoraAdapter {
        LoraAdapter::open(golden_dir().join(file)).unwrap()
    }

    fn velocity(&self, model: &Dit) -> Tensor {
        self.base.velocity(model)
    }

    fn error_against(&self, model: &Dit, output: &str) -> f64 {
        relative_error(&self.velocity(model), &self.base.input(output))
    }

    fn quantized_model(&self) -> Dit {
        WanModel::load_with_quant(
            self.base.var_builder(DType::F32),
            &self.base.cfg,
            &self.base.attention,
            QuantPolicy::Quantize,
        )
        .unwrap()
    }
}

/// The output a `files` entry names last (`"out.velocity_lora (… see out.velocity_lora_no_diff)"`
/// → `out.velocity_lora_no_diff`: the entry's final word on which output the file reproduces).
fn expected_output(entry: &str) -> String {
    entry
        .split(|c: char| c.is_whitespace() || "():,;".contains(c))
        .rfind(|word| word.starts_with("out."))
        .unwrap_or_else(|| panic!("no output named in `{entry}`"))
        .to_owned()
}

/// Every adapter file of the config, applied to the base model in `dtype` by `mode` at the
/// config's strength, reproduces its output within `bound` (and moves away from the base output);
/// returns the layouts met.
fn check_every_file(dtype: DType, mode: LoraMode, bound: f64) -> Vec<LoraLayout> {
    let case = LoraCase::open();
    let mut model = case.base.model(dtype);
    let mut layouts = Vec::new();
    for (file, output) in &case.files {
        let adapter = case.adapter(file);
        layouts.push(adapter.layout());
        model.set_loras(&[adapter.at(case.strength)], mode).unwrap();
        let err = case.error_against(&model, output);
        println!(
            "{file} ({:?}), {dtype:?}, {mode:?}, strength {}: relative error {err:.3e} against {output}",
            layouts.last().unwrap(),
            case.strength
        );
        assert!(err <= bound, "{file}: relative error {err:e}");
        // Closer to the adapted output than to the base one by far: the adapter did act.
        assert!(
            case.error_against(&model, "out.velocity_base") > 10.0 * err,
            "{file}"
        );
    }
    layouts
}

#[test]
fn every_layout_matches_upstream_in_f32() {
    let layouts = check_every_file(DType::F32, LoraMode::Merge, 1e-4);
    for layout in [LoraLayout::Comfy, LoraLayout::Peft, LoraLayout::Diffusers] {
        assert!(
            layouts.contains(&layout),
            "no {layout:?} file in {BASE}'s config"
        );
    }
}

#[test]
fn branch_mode_matches_upstream_in_f32() {
    check_every_file(DType::F32, LoraMode::Branch, 1e-4);
}

#[test]
fn bf16_merge_stays_close() {
    check_every_file(DType::BF16, LoraMode::Merge, 3e-2);
}

#[test]
fn strength_zero_is_the_base_model() {
    let case = LoraCase::open();
    let mut base = case.base.model(DType::F32);
    let want = case.velocity(&base);
    for (file, _) in &case.files {
        for mode in [LoraMode::Merge, LoraMode::Branch] {
            base.set_loras(&[case.adapter(file).at(0.0)], mode).unwrap();
            assert_eq!(
                max_abs_diff(&case.velocity(&base), &want),
                0.0,
                "{file} {mode:?}"
            );
        }
    }
    assert!(case.error_against(&base, "out.velocity_base") <= 1e-4);
}

/// Switching adapters and strengths on a resident model gives exactly what a fresh load with
/// that setting gives, in both modes, and clearing them gives back the base model exactly.
#[test]
fn switching_on_a_resident_model_matches_a_fresh_load() {
    let case = LoraCase::open();
    let adapters: Vec<LoraAdapter> = case.files.iter().map(|(f, _)| case.adapter(f)).collect();
    let mut resident = case.base.model(DType::F32);
    let base_velocity = case.velocity(&resident);
    let settings = [
        (vec![adapters[0].clone().at(1.0)], LoraMode::Merge),
        (vec![adapters[0].clone().at(case.strength)], LoraMode::Merge),
        (vec![adapters[1].clone().at(-0.5)], LoraMode::Branch),
        (
            vec![adapters[0].clone().at(0.3), adapters[2].clone().at(0.6)],
            LoraMode::Merge,
        ),
        (
            vec![adapters[2].clone().at(case.strength)],
            LoraMode::Branch,
        ),
    ];
    for (loras, mode) in &settings {
        resident.set_loras(loras, *mode).unwrap();
        assert!(resident.has_loras());
        let mut fresh = case.base.model(DType::F32);
        fresh.apply_loras(loras, *mode).unwrap();
        assert_eq!(
            max_abs_diff(&case.velocity(&resident), &case.velocity(&fresh)),
            0.0
        );
    }
    resident.set_loras(&[], LoraMode::Merge).unwrap();
    assert!(!resident.has_loras());
    assert_eq!(max_abs_diff(&case.velocity(&resident), &base_velocity), 0.0);
}

/// Two adapters add up: the same LoRA in two layouts at half the strength each is the LoRA at
/// the whole strength.
#[test]
fn adapters_add_up() {
    let case = LoraCase::open();
    let mut base = case.base.model(DType::F32);
    let (file, output) = case
        .files
        .iter()
        .find(|(_, output)| case.files.iter().filter(|(_, o)| o == output).count() >= 2)
        .expect("two files reproducing the same output");
    let halves: Vec<ScaledLora> = case
        .files
        .iter()
        .filter(|(_, o)| o == output)
        .take(2)
        .map(|(f, _)| case.adapter(f).at(case.strength / 2.0))
        .collect();
    base.set_loras(&halves, LoraMode::Merge).unwrap();
    let err = case.error_against(&base, output);
    println!("two halves ({file} and another): f32 relative error {err:.3e}");
    assert!(err <= 1e-4, "relative error {err:e}");
}

/// W8A8 with a LoRA, both ways, against the float model with the LoRA merged (the golden
/// output): merging into the float weights before quantising, and quantising first then running
/// the low-rank term beside the int8 GEMM (what a `-quant` file allows). Either error must stay
/// of the order of W8A8's own error on the base model.
#[test]
fn w8a8_merge_before_quantising_and_low_rank_branch_track_the_float_result() {
    let case = LoraCase::open();
    let int8_base_err = case.error_against(&case.quantized_model(), "out.velocity_base");
    for (file, output) in &case.files {
        let lora = case.adapter(file).at(case.strength);
        let mut merged_then_quantized = case.base.model(DType::F32);
        merged_then_quantized
            .apply_loras(std::slice::from_ref(&lora), LoraMode::Merge)
            .unwrap();
        merged_then_quantized.quantize_block_linears().unwrap();
        let mut branch = case.quantized_model();
        let summary = branch.apply_loras(&[lora], LoraMode::Merge).unwrap();
        assert!(
            summary.low_rank > 0,
            "int8 linears take the LoRA as a branch"
        );
        let merge_err = case.error_against(&merged_then_quantized, output);
        let branch_err = case.error_against(&branch, output);
        println!(
            "{file}: W8A8 base {int8_base_err:.3e}; merged then quantised {merge_err:.3e}; \
             int8 + low-rank branch {branch_err:.3e}"
        );
        assert!(
            merge_err <= 2.0 * int8_base_err + 1e-4,
            "{file}: {merge_err:e}"
        );
        assert!(
            branch_err <= 2.0 * int8_base_err + 1e-4,
            "{file}: {branch_err:e}"
        );
    }
}

// ---- bad files -------------------------------------------------------------------------

/// The tensors of the first adapter file, to corrupt.
fn adapter_tensors(case: &LoraCase) -> (String, Vec<(String, Tensor)>) {
    let (file, _) = case
        .files
        .iter()
        .find(|(f, _)| case.adapter(f).layout() == LoraLayout::Comfy)
        .unwrap();
    let tensors =
        candle_core::safetensors::load(golden_dir().join(file), &candle_core::Device::Cpu)
            .unwrap()
            .into_iter()
            .collect();
    (file.clone(), tensors)
}

fn lora_error_keys(error: Error) -> Vec<String> {
    match error {
        Error::Lora { keys, .. } => keys,
        other => panic!("expected Error::Lora, got {other}"),
    }
}

#[test]
fn unknown_keys_are_a_typed_error_unless_lenient() {
    let case = LoraCase::open();
    let (file, mut tensors) = adapter_tensors(&case);
    let stray = "diffusion_model.blocks.0.self_attn.q.hada_w1_a".to_owned();
    tensors.push((stray.clone(), tensors[0].1.clone()));
    let error = LoraAdapter::from_tensors(&file, tensors.clone(), false).unwrap_err();
    assert!(error.to_string().contains(&stray), "{error}");
    assert_eq!(lora_error_keys(error), vec![stray.clone()]);
    let lenient = LoraAdapter::from_tensors(&file, tensors, true).unwrap();
    assert_eq!(lenient.skipped_keys(), [stray]);
}

#[test]
fn targets_the_model_lacks_are_a_typed_error_unless_lenient() {
    let case = LoraCase::open();
    let (file, tensors) = adapter_tensors(&case);
    let layers = case.base.cfg.num_layers;
    let renamed: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(name, t)| (name.replace("blocks.0.", &format!("blocks.{layers}.")), t))
        .collect();
    let mut model = case.base.model(DType::F32);
    let before = case.velocity(&model);
    let strict = LoraAdapter::from_tensors(&file, renamed.clone(), false).unwrap();
    let error = model
        .apply_loras(&[strict.at(1.0)], LoraMode::Merge)
        .unwrap_err();
    let keys = lora_error_keys(error);
    assert!(!keys.is_empty());
    assert!(
        keys.iter()
            .all(|k| k.contains(&format!("blocks.{layers}."))),
        "{keys:?}"
    );
    // Nothing was applied: the model is unchanged.
    assert_eq!(relative_error(&case.velocity(&model), &before), 0.0);
    let lenient = LoraAdapter::from_tensors(&file, renamed, true).unwrap();
    let summary = model
        .apply_loras(&[lenient.at(1.0)], LoraMode::Merge)
        .unwrap();
    assert_eq!(summary.skipped, keys.len());
}

#[test]
fn misshapen_or_unpaired_factors_are_typed_errors_naming_the_key() {
    let case = LoraCase::open();
    let (file, tensors) = adapter_tensors(&case);
    let up_key = tensors
        .iter()
        .map(|(name, _)| name.clone())
        .find(|name| name.ends_with(".lora_up.weight"))
        .unwrap();
    let module = up_key.trim_end_matches(".lora_up.weight").to_owned();

    let unpaired: Vec<_> = tensors
        .iter()
        .filter(|(n, _)| *n != up_key)
        .cloned()
        .collect();
    let error = LoraAdapter::from_tensors(&file, unpaired, false).unwrap_err();
    assert_eq!(lora_error_keys(error), vec![module.clone()]);

    // A factor of the right rank for another width: found when applied, the model unchanged.
    let widened: Vec<_> = tensors
        .iter()
        .map(|(n, t)| match n == &up_key {
            true => (n.clone(), Tensor::cat(&[t, t], 0).unwrap()),
            false => (n.clone(), t.clone()),
        })
        .collect();
    let adapter = LoraAdapter::from_tensors(&file, widened, false).unwrap();
    let mut model = case.base.model(DType::F32);
    let error = model
        .apply_loras(&[adapter.at(1.0)], LoraMode::Merge)
        .unwrap_err();
    assert!(error.to_string().contains(&module), "{error}");
    assert_eq!(lora_error_keys(error), vec![module]);
}

#[test]
fn a_file_that_is_not_safetensors_is_a_typed_error() {
    let path =
        std::env::temp_dir().join(format!("turbo-lora-bad-{}.safetensors", std::process::id()));
    std::fs::write(&path, b"not a safetensors file").unwrap();
    let error = LoraAdapter::open(&path).unwrap_err();
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(error, Error::Lora { .. }), "{error}");
    assert!(matches!(
        LoraAdapter::open(golden_dir().join("no-such-lora.safetensors")),
        Err(Error::Io { .. })
    ));
}

/// A full weight difference cannot go into an int8 weight: a typed error, not a silent skip.
#[test]
fn a_weight_difference_on_an_int8_linear_is_a_typed_error() {
    let case = LoraCase::open();
    let (file, _) = adapter_tensors(&case);
    let weights = case.base.weights();
    let (key, weight) = weights
        .iter()
        .find(|(name, _)| name.ends_with("self_attn.q.weight"))
        .unwrap();
    let diff_name = format!("diffusion_model.{}.diff", key.trim_end_matches(".weight"));
    let diff = weight.zeros_like().unwrap();
    let adapter = LoraAdapter::from_tensors(&file, [(diff_name, diff)], false).unwrap();
    let mut float = case.base.model(DType::F32);
    float
        .apply_loras(&[adapter.clone().at(1.0)], LoraMode::Merge)
        .unwrap();
    let error = case
        .quantized_model()
        .apply_loras(&[adapter.at(1.0)], LoraMode::Merge)
        .unwrap_err();
    assert_eq!(lora_error_keys(error).len(), 1);
}

/// kohya / musubi-tuner names (`lora_unet_blocks_0_self_attn_q.lora_down.weight`, the Wan keys
/// with `_` for `.`): the ComfyUI file renamed so reproduces the same output.
#[test]
fn kohya_names_match_upstream_in_f32() {
    let case = LoraCase::open();
    let (file, tensors) = adapter_tensors(&case);
    let output = &case.files.iter().find(|(f, _)| *f == file).unwrap().1;
    let kohya: Vec<(String, Tensor)> = tensors
        .into_iter()
        .map(|(name, t)| (kohya_name(&name), t))
        .collect();
    let adapter = LoraAdapter::from_tensors(&file, kohya, false).unwrap();
    assert_eq!(adapter.layout(), LoraLayout::Kohya);
    let mut model = case.base.model(DType::F32);
    model
        .set_loras(&[adapter.at(case.strength)], LoraMode::Merge)
        .unwrap();
    let err = case.error_against(&model, output);
    println!("{file} renamed to kohya names: f32 relative error {err:.3e}");
    assert!(err <= 1e-4, "relative error {err:e}");
}

/// `diffusion_model.blocks.0.self_attn.q.lora_down.weight` →
/// `lora_unet_blocks_0_self_attn_q.lora_down.weight` (the part after the module kept).
fn kohya_name(comfy: &str) -> String {
    let name = comfy.trim_start_matches("diffusion_model.");
    let (module, part) = [
        ".lora_down.weight",
        ".lora_up.weight",
        ".alpha",
        ".bias.diff_b",
        ".diff_b",
    ]
    .iter()
    .find_map(|suffix| name.strip_suffix(suffix).map(|m| (m, *suffix)))
    .unwrap_or_else(|| panic!("unexpected name `{comfy}`"));
    format!("lora_unet_{}{part}", module.replace('.', "_"))
}

/// A `-quant` file (the base written out and quantised by `convert`) loads with int8 linears,
/// which take the adapters as run-time low-rank terms: the same output as the model quantised
/// at load, within W8A8's error of the float result.
#[test]
fn a_quant_file_takes_the_adapters_beside_its_int8_weights() {
    let case = LoraCase::open();
    let dir = std::env::temp_dir();
    let float_file = dir.join(format!(
        "turbo-lora-base-{}.safetensors",
        std::process::id()
    ));
    let quant_file = dir.join(format!(
        "turbo-lora-base-{}-quant.safetensors",
        std::process::id()
    ));
    candle_core::safetensors::save(&case.base.weights(), &float_file).unwrap();
    let checkpoint = turbo_models::Checkpoint::open(&float_file).unwrap();
    turbo_models::convert::to_safetensors(&checkpoint, &quant_file, true).unwrap();
    let load = || -> Dit {
        WanModel::from_checkpoint(
            &quant_file,
            Some(&case.base.cfg),
            &case.base.attention,
            DType::F32,
            &candle_core::Device::Cpu,
        )
        .unwrap()
    };
    let (mut from_file, mut at_load) = (load(), case.quantized_model());
    std::fs::remove_file(&float_file).unwrap();
    std::fs::remove_file(&quant_file).unwrap();
    assert_eq!(from_file.int8_linears(), 10 * case.base.cfg.num_layers);
    let int8_base_err = case.error_against(&from_file, "out.velocity_base");
    for (file, output) in &case.files {
        let lora = [case.adapter(file).at(case.strength)];
        let summary = from_file.set_loras(&lora, LoraMode::Merge).unwrap();
        assert_eq!(summary.low_rank, from_file.int8_linears(), "{file}");
        at_load.set_loras(&lora, LoraMode::Merge).unwrap();
        let from_file_velocity = case.velocity(&from_file);
        assert_eq!(
            max_abs_diff(&from_file_velocity, &case.velocity(&at_load)),
            0.0
        );
        let err = relative_error(&from_file_velocity, &case.base.input(output));
        println!("{file} on the -quant file: {err:.3e} (W8A8 base {int8_base_err:.3e})");
        assert!(err <= 2.0 * int8_base_err + 1e-4, "{file}: {err:e}");
    }
}

/// `LoraAdapter::check_fits` finds the same misfits from a tensor list alone, before any model
/// is loaded.
#[test]
fn adapters_are_checked_against_a_tensor_list_without_a_model() {
    let case = LoraCase::open();
    let tensors: Vec<(String, Vec<usize>)> =
        turbo_models::wan::expected_tensors::<Box<dyn Attention>>(
            &case.base.cfg,
            turbo_models::wan::PatchLayout::Conv3d,
            &case.base.attention,
            DType::F32,
        )
        .into_iter()
        .map(|spec| (spec.name, spec.shape))
        .collect();
    for (file, _) in &case.files {
        case.adapter(file).check_fits(&tensors).unwrap();
    }
    let (file, adapter_tensors) = adapter_tensors(&case);
    let layers = case.base.cfg.num_layers;
    let renamed = adapter_tensors.iter().map(|(name, t)| {
        (
            name.replace("blocks.0.", &format!("blocks.{layers}.")),
            t.clone(),
        )
    });
    let absent = LoraAdapter::from_tensors(&file, renamed, false).unwrap();
    let keys = lora_error_keys(absent.check_fits(&tensors).unwrap_err());
    assert!(
        keys.iter()
            .all(|k| k.contains(&format!("blocks.{layers}."))),
        "{keys:?}"
    );
    let widened = adapter_tensors
        .iter()
        .map(|(name, t)| match name.ends_with(".diff_b") {
            true => (name.clone(), Tensor::cat(&[t, t], 0).unwrap()),
            false => (name.clone(), t.clone()),
        });
    let misfit = LoraAdapter::from_tensors(&file, widened, false).unwrap();
    let keys = lora_error_keys(misfit.check_fits(&tensors).unwrap_err());
    assert!(keys.iter().all(|k| k.ends_with(".diff_b")), "{keys:?}");
}
