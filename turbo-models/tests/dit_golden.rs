//! Parity of the Wan DiT with the golden files computed by the upstream PyTorch modules in
//! float32. Every dimension, the timestep and the attention settings come from the file.

use std::collections::HashMap;

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use turbo_attention::{Attention, AttentionConfig, AttentionKind};
use turbo_models::wan::{ModelType, PatchLayout, TokenTimesteps, WanModel};

use common::{max_abs_diff, relative_error, DitCase};

fn check_parity(name: &str, expected_layout: PatchLayout) {
    let case = DitCase::open(name);
    let model = case.model(DType::F32);
    assert_eq!(model.layout().patch, expected_layout, "{name}");
    let want = case.input("out.velocity");
    let got = case.velocity(&model);
    assert_eq!(got.dims(), want.dims(), "{name}");
    let err = relative_error(&got, &want);
    println!("{name}: f32 relative error {err:.3e}");
    assert!(err <= 1e-4, "{name}: relative error {err:e}");
}

#[test]
fn t2v_dense_matches_upstream() {
    check_parity("dit_t2v_dense", PatchLayout::Conv3d);
}

#[test]
fn t2v_sla_turbodiffusion_layout_matches_upstream() {
    check_parity("dit_t2v_sla", PatchLayout::Linear);
}

#[test]
fn i2v_expert_matches_upstream() {
    check_parity("dit_i2v_dense", PatchLayout::Conv3d);
}

/// Wan2.1 I2V: `img_emb` over the CLIP tokens and a `k_img` / `v_img` branch in every
/// cross-attention.
#[test]
fn i2v_clip_matches_upstream() {
    let case = DitCase::open("dit_i2v_clip");
    assert_eq!(case.cfg.model_type, ModelType::I2vClip);
    check_parity("dit_i2v_clip", PatchLayout::Conv3d);
}

/// Wan2.2 TI2V: per-token timesteps (the image's latent frame at t = 0).
#[test]
fn ti2v_per_token_timesteps_match_upstream() {
    let case = DitCase::open("dit_ti2v");
    assert_eq!(case.cfg.model_type, ModelType::Ti2v);
    assert!(matches!(case.timesteps(), TokenTimesteps::PerToken(_)));
    check_parity("dit_ti2v", PatchLayout::Conv3d);
}

/// The schema's per-token times are 0 on latent frame 0 and the config's `timestep` elsewhere:
/// [`TokenTimesteps::HeldFrames`] (what a sampler hands the model through `DitCondition`) is
/// that same input, and gives the same velocity bit for bit.
#[test]
fn held_first_frame_is_the_per_token_input_of_the_file() {
    let case = DitCase::open("dit_ti2v");
    let model = case.model(DType::F32);
    let t = case.file.config_f64(&["timestep"]).unwrap();
    let held = TokenTimesteps::HeldFrames { frames: 1, t };
    let per_token = case.velocity(&model);
    assert_eq!(
        relative_error(&case.velocity_at(&model, &held), &per_token),
        0.0
    );
    // One time for every token differs from the held frame (the frame-0 modulation matters),
    // and equals per-token times that are all that one time.
    let uniform = case.velocity_at(&model, &TokenTimesteps::Uniform(t));
    assert!(relative_error(&uniform, &per_token) > 1e-4);
    let tokens = case.input("in.t").elem_count();
    let all_t = TokenTimesteps::PerToken(vec![t; tokens]);
    assert_eq!(
        relative_error(&case.velocity_at(&model, &all_t), &uniform),
        0.0
    );
    // Per-token times that do not cover the tokens, or leave [0, 1000], are typed errors.
    let forward = |timesteps: &TokenTimesteps| {
        model.forward_with(
            &case.input("in.x"),
            timesteps,
            &case.input("in.context"),
            None,
            None,
        )
    };
    assert!(matches!(
        forward(&TokenTimesteps::PerToken(vec![t; tokens + 1])),
        Err(turbo_core::Error::Shape { .. })
    ));
    let mut out_of_range = vec![t; tokens];
    out_of_range[tokens - 1] = 1000.5;
    assert!(matches!(
        forward(&TokenTimesteps::PerToken(out_of_range)),
        Err(turbo_core::Error::OutOfRange { .. })
    ));
}

/// FLF2V is the I2V model with `img_emb.emb_pos` added to the two frames' CLIP tokens, read as
/// one sequence: checked against the I2V model of the same weights fed those sums.
#[test]
fn flf2v_adds_emb_pos_over_both_frames() {
    let case = DitCase::open("dit_i2v_clip");
    let clip = case.input("in.clip");
    let (_, tokens, width) = clip.dims3().unwrap();
    // The two frames: the file's tokens and a scaled copy.
    let frames = Tensor::cat(&[&clip, &(&clip * 0.5).unwrap()], 0).unwrap();
    let emb_pos =
        (Tensor::randn(0f32, 1.0, (1, 2 * tokens, width), &Device::Cpu).unwrap() * 0.1).unwrap();
    let mut weights = case.weights();
    weights.insert("img_emb.emb_pos".into(), emb_pos.clone());
    let mut cfg = case.cfg.clone();
    cfg.model_type = ModelType::Flf2v;
    let flf2v = WanModel::<Box<dyn Attention>>::load(
        VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu),
        &cfg,
        &case.attention,
    )
    .unwrap();
    let i2v = case.model(DType::F32);
    let t = TokenTimesteps::Uniform(case.timestep());
    let run = |model: &WanModel<Box<dyn Attention>>, clip: &Tensor| {
        model
            .forward_with(
                &case.input("in.x"),
                &t,
                &case.input("in.context"),
                case.condition().as_ref(),
                Some(clip),
            )
            .unwrap()
    };
    let summed = frames
        .reshape((1, 2 * tokens, width))
        .unwrap()
        .broadcast_add(&emb_pos)
        .unwrap();
    let err = relative_error(&run(&flf2v, &frames), &run(&i2v, &summed));
    assert!(err <= 1e-6, "relative error {err:e}");
    // One frame's tokens do not fit `emb_pos`.
    let one_frame = flf2v.forward_with(
        &case.input("in.x"),
        &t,
        &case.input("in.context"),
        case.condition().as_ref(),
        Some(&clip),
    );
    assert!(matches!(one_frame, Err(turbo_core::Error::Shape { .. })));
}

/// CLIP tokens are required by the Wan2.1 I2V model and refused by the others.
#[test]
fn clip_tokens_only_go_to_a_clip_model() {
    let case = DitCase::open("dit_i2v_clip");
    let model = case.model(DType::F32);
    let missing = model.forward(
        &case.input("in.x"),
        case.timestep(),
        &case.input("in.context"),
        case.condition().as_ref(),
    );
    assert!(
        matches!(&missing, Err(turbo_core::Error::Shape { what, .. }) if what.contains("CLIP")),
        "{missing:?}"
    );
    let expert = DitCase::open("dit_i2v_dense");
    let unexpected = expert.model(DType::F32).forward_with(
        &expert.input("in.x"),
        &TokenTimesteps::Uniform(expert.timestep()),
        &expert.input("in.context"),
        expert.condition().as_ref(),
        Some(&case.input("in.clip")),
    );
    assert!(
        matches!(&unexpected, Err(turbo_core::Error::Shape { what, .. }) if what.contains("CLIP")),
        "{unexpected:?}"
    );
}

/// bf16 weights and activations with the f32 islands stay close to the f32 reference.
#[test]
fn bf16_forward_stays_close() {
    for name in [
        "dit_t2v_dense",
        "dit_t2v_sla",
        "dit_i2v_dense",
        "dit_i2v_clip",
        "dit_ti2v",
    ] {
        let case = DitCase::open(name);
        let err = relative_error(
            &case.velocity(&case.model(DType::BF16)),
            &case.input("out.velocity"),
        );
        println!("{name}: bf16 relative error {err:.3e}");
        assert!(err <= 3e-2, "{name}: bf16 relative error {err:e}");
    }
}

/// The compile-time path: a model whose backend is a concrete type.
#[test]
fn compile_time_backend_matches_upstream() {
    let case = DitCase::open("dit_t2v_sla");
    let AttentionKind::Sla { topk } = case.attention.kind else {
        panic!("dit_t2v_sla is an SLA file")
    };
    let sla = turbo_attention::SlaConfig::with_blocks(topk, case.attention.blocks).unwrap();
    let model: WanModel<turbo_attention::SlaAttention> =
        WanModel::load(case.var_builder(DType::F32), &case.cfg, &sla).unwrap();
    let t = case.input("in.t").to_vec1::<f32>().unwrap()[0] as f64;
    let got = model
        .forward(&case.input("in.x"), t, &case.input("in.context"), None)
        .unwrap();
    assert!(relative_error(&got, &case.input("out.velocity")) <= 1e-4);
}

/// Upstream fails to load a TurboDiffusion checkpoint with `original` attention; here the
/// `proj_l` weights are ignored and the model runs.
#[test]
fn original_attention_runs_a_checkpoint_with_proj_l() {
    let mut case = DitCase::open("dit_t2v_sla");
    case.attention = AttentionConfig::new(AttentionKind::Original);
    let model = case.model(DType::F32);
    assert!(model.layout().has_proj_l);
    let out = case.velocity(&model);
    let max = out
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(max.is_finite() && max > 0.0);
}

/// SLA on an official checkpoint (no `proj_l`) runs with a zero linear branch: exactly the
/// model whose file stores zero `proj_l` weights, and not the dense model.
#[test]
fn sla_on_a_checkpoint_without_proj_l_has_a_zero_linear_branch() {
    let mut case = DitCase::open("dit_t2v_dense");
    case.attention = AttentionConfig::new(AttentionKind::sla(0.5).unwrap());
    let without = case.velocity(&case.model(DType::F32));
    let mut weights = case.weights();
    let head_dim = case.cfg.head_dim();
    for i in 0..case.cfg.num_layers {
        let prefix = format!("blocks.{i}.self_attn.attn_op.local_attn.proj_l");
        let zeros = |shape: &[usize]| Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap();
        weights.insert(format!("{prefix}.weight"), zeros(&[head_dim, head_dim]));
        weights.insert(format!("{prefix}.bias"), zeros(&[head_dim]));
    }
    let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
    let zero_proj_l = WanModel::<Box<dyn Attention>>::load(vb, &case.cfg, &case.attention).unwrap();
    let with_zeros = case.velocity(&zero_proj_l);
    assert_eq!(max_abs_diff(&without, &with_zeros), 0.0);
    let dense = case.input("out.velocity");
    assert!(
        relative_error(&without, &dense) > 1e-3,
        "top-k 0.5 must drop blocks"
    );
}

#[test]
fn missing_and_misshapen_keys_are_named() {
    let case = DitCase::open("dit_t2v_dense");
    let weights = |edit: &dyn Fn(&mut HashMap<String, Tensor>)| {
        let mut map = case.file.weights().unwrap();
        edit(&mut map);
        VarBuilder::from_tensors(map, DType::F32, &Device::Cpu)
    };
    let load = |vb| {
        WanModel::<Box<dyn Attention>>::load(vb, &case.cfg, &case.attention)
            .unwrap_err()
            .to_string()
    };

    let err = load(weights(&|m| {
        m.remove("blocks.1.ffn.2.weight");
    }));
    assert!(err.contains("blocks.1.ffn.2.weight"), "{err}");

    let err = load(weights(&|m| {
        m.insert(
            "blocks.0.self_attn.q.weight".into(),
            Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap(),
        );
    }));
    assert!(
        err.contains("blocks.0.self_attn.q.weight") && err.contains("[3, 5]"),
        "{err}"
    );

    let err = load(weights(&|m| {
        m.insert(
            "patch_embedding.weight".into(),
            Tensor::zeros((7, 64), DType::F32, &Device::Cpu).unwrap(),
        );
    }));
    assert!(
        err.contains("patch_embedding.weight") && err.contains("[7, 64]"),
        "{err}"
    );
}

#[test]
fn bad_inputs_are_typed_errors() {
    let t2v = DitCase::open("dit_t2v_dense");
    let model = t2v.model(DType::F32);
    let (x, context) = (t2v.input("in.x"), t2v.input("in.context"));
    let shape_error = |result: turbo_core::Result<Tensor>| match result {
        Err(turbo_core::Error::Shape { what, .. }) => what,
        other => panic!("expected a shape error, got {other:?}"),
    };
    let zeros = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &Device::Cpu).unwrap();
    let (c, f, h, w) = x.dims4().unwrap();
    assert!(
        shape_error(model.forward(&zeros(&[c, f, h + 1, w]), 500.0, &context, None))
            .contains("latent")
    );
    assert!(
        shape_error(model.forward(&zeros(&[c + 1, f, h, w]), 500.0, &context, None))
            .contains("latent")
    );
    let (len, width) = context.dims2().unwrap();
    assert!(
        shape_error(model.forward(&x, 500.0, &zeros(&[len, width + 1]), None))
            .contains("text context")
    );
    let too_long = t2v.cfg.text_len + 1;
    assert!(
        shape_error(model.forward(&x, 500.0, &zeros(&[too_long, width]), None))
            .contains("text context")
    );
    assert!(shape_error(model.forward(&x, 500.0, &context, Some(&x))).contains("T2V"));
    // A batch of one is still a batch: the contract is one unbatched latent.
    let batched = x.unsqueeze(0).unwrap();
    assert!(shape_error(model.forward(&batched, 500.0, &context, None)).contains("unbatched"));
    for t in [-1.0, 1000.5, 1e9, f64::NAN] {
        match model.forward(&x, t, &context, None) {
            Err(turbo_core::Error::OutOfRange { what, .. }) => assert!(what.contains("timestep")),
            other => panic!("t = {t}: {other:?}"),
        }
    }
    model.forward(&x, 1000.0, &context, None).unwrap();

    let i2v = DitCase::open("dit_i2v_dense");
    let model = i2v.model(DType::F32);
    assert!(
        shape_error(model.forward(&i2v.input("in.x"), 500.0, &i2v.input("in.context"), None))
            .contains("condition")
    );
    let wrong_condition = zeros(&[4, f, h, w]);
    assert!(shape_error(model.forward(
        &i2v.input("in.x"),
        500.0,
        &i2v.input("in.context"),
        Some(&wrong_condition)
    ))
    .contains("condition"));
}

#[test]
fn a_changed_topk_acts_like_a_model_built_with_it() {
    let case = DitCase::open("dit_t2v_sla");
    let golden_topk = case.attention.kind.topk().expect("an SLA case");
    let mut model = case.model(DType::F32);
    model.set_attention_topk(1.0).unwrap();
    assert_eq!(
        model.attention_kind(),
        Some(AttentionKind::Sla { topk: 1.0 })
    );
    let dense_selection = WanModel::<Box<dyn Attention>>::load(
        case.var_builder(DType::F32),
        &case.cfg,
        &AttentionConfig {
            kind: AttentionKind::sla(1.0).unwrap(),
            ..case.attention
        },
    )
    .unwrap();
    let retuned = case.velocity(&model);
    assert_eq!(
        relative_error(&retuned, &case.velocity(&dense_selection)),
        0.0
    );
    assert!(
        case.velocity_error(&retuned) > 1e-4,
        "top-k 1.0 changed nothing"
    );

    assert!(matches!(
        model.set_attention_topk(0.0),
        Err(turbo_core::Error::InvalidTopk { .. })
    ));
    model.set_attention_topk(golden_topk).unwrap();
    let err = case.velocity_error(&case.velocity(&model));
    assert!(
        err <= 1e-4,
        "relative error {err} after setting the top-k back"
    );
}
