//! Key coverage of the released DiT sizes, checked without allocating their weights: the key
//! list a config expects equals `fixtures/keys/*.tsv` (the upstream constructors' parameters),
//! and the loader reads exactly that list.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use common::{key_list, KeyShapes};
use turbo_attention::{Attention, AttentionConfig, AttentionKind};
use turbo_models::wan::{
    expected_tensors, int8_block_linears, PatchLayout, TensorSpec, WanConfig, WanModel,
};

fn as_map(specs: &[TensorSpec]) -> KeyShapes {
    specs
        .iter()
        .map(|s| (s.name.clone(), s.shape.clone()))
        .collect()
}

fn released() -> [(&'static str, WanConfig); 7] {
    [
        ("wan21_t2v_1.3B", WanConfig::wan21_t2v_1_3b()),
        ("wan21_t2v_14B", WanConfig::wan21_t2v_14b()),
        ("wan22_i2v_A14B_expert", WanConfig::wan22_i2v_a14b()),
        ("wan21_i2v_14B", WanConfig::wan21_i2v_14b()),
        ("wan21_flf2v_14B", WanConfig::wan21_flf2v_14b()),
        ("wan22_t2v_A14B_expert", WanConfig::wan22_t2v_a14b()),
        ("wan22_ti2v_5B", WanConfig::wan22_ti2v_5b()),
    ]
}

/// The block linears W8A8 applies to: q, k, v, o of both attentions and the FFN's two, plus
/// `k_img` / `v_img` in the Wan2.1 I2V / FLF2V cross-attention.
fn block_linears(cfg: &WanConfig) -> usize {
    if cfg.model_type.uses_clip() {
        12
    } else {
        10
    }
}

fn sla() -> AttentionConfig {
    AttentionConfig::new(AttentionKind::sla(0.1).unwrap())
}

/// What a TurboDiffusion release of the same model holds: the 2-D patch embedding and a
/// `proj_l` per block.
fn turbodiffusion_keys(official: &KeyShapes, cfg: &WanConfig) -> KeyShapes {
    let mut keys = official.clone();
    keys.insert(
        "patch_embedding.weight".into(),
        vec![cfg.dim, cfg.in_dim * 4],
    );
    for i in 0..cfg.num_layers {
        let prefix = format!("blocks.{i}.self_attn.attn_op.local_attn.proj_l");
        keys.insert(format!("{prefix}.weight"), vec![128, 128]);
        keys.insert(format!("{prefix}.bias"), vec![128]);
    }
    keys
}

#[test]
fn official_layout_expects_exactly_the_upstream_keys() {
    for (file, cfg) in released() {
        let original = AttentionConfig::new(AttentionKind::Original);
        let expected = expected_tensors::<Box<dyn Attention>>(
            &cfg,
            PatchLayout::Conv3d,
            &original,
            DType::BF16,
        );
        assert_eq!(expected.len(), key_list(file).len(), "{file}");
        assert_eq!(as_map(&expected), key_list(file), "{file}");
    }
}

#[test]
fn turbodiffusion_layout_adds_proj_l_and_the_linear_patch_embedding() {
    for (file, cfg) in released() {
        let expected =
            expected_tensors::<Box<dyn Attention>>(&cfg, PatchLayout::Linear, &sla(), DType::BF16);
        assert_eq!(
            as_map(&expected),
            turbodiffusion_keys(&key_list(file), &cfg),
            "{file}"
        );
    }
}

/// What a TurboDiffusion `-quant` release holds (spec §4.2): each block linear's `weight`
/// `[N, K]` becomes `int8_weight` `[N, K]` and `scale` `[⌈N/128⌉, ⌈K/128⌉]`; biases, `proj_l`
/// and everything outside the blocks are unchanged.
fn quant_keys(turbo: &KeyShapes) -> KeyShapes {
    let mut keys = KeyShapes::new();
    for (key, shape) in turbo {
        let parts: Vec<&str> = key.split('.').collect();
        let quantized = matches!(
            parts.as_slice(),
            [
                "blocks",
                _,
                "self_attn" | "cross_attn",
                "q" | "k" | "v" | "o" | "k_img" | "v_img",
                "weight"
            ] | ["blocks", _, "ffn", "0" | "2", "weight"]
        );
        if quantized {
            let layer = key.strip_suffix(".weight").unwrap();
            let tiles = shape.iter().map(|d| d.div_ceil(128)).collect();
            keys.insert(format!("{layer}.int8_weight"), shape.clone());
            keys.insert(format!("{layer}.scale"), tiles);
        } else {
            keys.insert(key.clone(), shape.clone());
        }
    }
    keys
}

#[test]
fn quant_layout_replaces_block_weights_with_int8_and_scale() {
    for (file, cfg) in released() {
        let specs =
            expected_tensors::<Box<dyn Attention>>(&cfg, PatchLayout::Linear, &sla(), DType::BF16);
        let quant = int8_block_linears(specs);
        let expected = quant_keys(&turbodiffusion_keys(&key_list(file), &cfg));
        assert_eq!(as_map(&quant), expected, "{file}");
        let int8 = quant.iter().filter(|s| s.name.ends_with(".int8_weight"));
        assert!(int8.clone().all(|s| s.dtype == DType::U8), "{file}");
        assert_eq!(int8.count(), block_linears(&cfg) * cfg.num_layers, "{file}");
    }
}

/// A checkpoint stand-in that holds only names and shapes: every tensor is one broadcast zero,
/// so even the 14B models load in a few kilobytes. It records what the loader asks for.
struct ShapeOnly {
    shapes: KeyShapes,
    requested: Arc<Mutex<BTreeSet<String>>>,
}

impl ShapeOnly {
    fn tensor(&self, name: &str, dtype: DType, device: &Device) -> candle_core::Result<Tensor> {
        self.requested.lock().unwrap().insert(name.to_owned());
        let shape = self
            .shapes
            .get(name)
            .ok_or_else(|| candle_core::Error::Msg(format!("no tensor `{name}`")))?;
        Tensor::zeros((), dtype, device)?.broadcast_as(shape.as_slice())
    }
}

impl SimpleBackend for ShapeOnly {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        turbo_models::checkpoint::check_shape(self.tensor(name, dtype, dev)?, name, shape)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name, dtype, dev)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.shapes.contains_key(name)
    }
}

/// Loads `cfg` from a shape-only checkpoint holding `keys` and returns the keys it read.
fn keys_read(keys: &KeyShapes, cfg: &WanConfig, attention: &AttentionConfig) -> BTreeSet<String> {
    let requested = Arc::new(Mutex::new(BTreeSet::new()));
    let backend = ShapeOnly {
        shapes: keys.clone(),
        requested: requested.clone(),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), DType::BF16, Device::Cpu);
    let model = WanModel::<Box<dyn Attention>>::load(vb, cfg, attention).unwrap();
    assert_eq!(model.attention_kind(), Some(attention.kind));
    let stored_int8 = keys.keys().filter(|k| k.ends_with(".int8_weight")).count();
    assert_eq!(model.int8_linears(), stored_int8);
    let read = requested.lock().unwrap().clone();
    read
}

#[test]
fn loader_reads_every_upstream_key_and_nothing_else() {
    for (file, cfg) in released() {
        let official = key_list(file);
        let read = keys_read(
            &official,
            &cfg,
            &AttentionConfig::new(AttentionKind::Original),
        );
        assert_eq!(read, official.keys().cloned().collect(), "{file}, original");

        let turbo = turbodiffusion_keys(&official, &cfg);
        let read = keys_read(&turbo, &cfg, &sla());
        assert_eq!(read, turbo.keys().cloned().collect(), "{file}, sla");
    }
}

/// A Wan2.1 I2V `config.json` says `"i2v"`; loading from the file's tensor list alone finds
/// the CLIP modules and loads the Wan2.1 model, and the key list of the file must then match.
#[test]
fn the_released_i2v_config_is_told_apart_by_img_emb() {
    let wan21 = key_list("wan21_i2v_14B");
    let wan22 = key_list("wan22_i2v_A14B_expert");
    let parsed = WanConfig::wan22_i2v_a14b();
    for (keys, want) in [
        (&wan21, WanConfig::wan21_i2v_14b()),
        (&wan22, WanConfig::wan22_i2v_a14b()),
    ] {
        let cfg = parsed
            .clone()
            .with_image_embedding(keys.contains_key("img_emb.proj.0.weight"));
        assert_eq!(cfg, want);
        let read = keys_read(keys, &cfg, &AttentionConfig::new(AttentionKind::Original));
        assert_eq!(&read, &keys.keys().cloned().collect::<BTreeSet<_>>());
    }
}

#[test]
fn loader_reads_every_quant_key_and_nothing_else() {
    // Int8 weights are materialised at load (they are packed for the int8 GEMM), so this uses a
    // small custom size rather than the released ones; the released key lists are covered by
    // `quant_layout_replaces_block_weights_with_int8_and_scale`.
    let cfg = WanConfig {
        dim: 256,
        ffn_dim: 640,
        num_heads: 2,
        num_layers: 2,
        ..WanConfig::wan21_t2v_1_3b()
    };
    let specs =
        expected_tensors::<Box<dyn Attention>>(&cfg, PatchLayout::Linear, &sla(), DType::BF16);
    let quant = as_map(&int8_block_linears(specs));
    assert_eq!(quant["blocks.1.ffn.0.scale"], [5, 2]);
    let read = keys_read(&quant, &cfg, &sla());
    assert_eq!(read, quant.keys().cloned().collect());
}

/// Bytes of weights of the Wan2.1 1.3B DiT, from the tensor list alone: bf16 everywhere but the
/// f32 islands, against the W8A8 layout (int8 block linears with their tile scales).
/// Printed: bf16 2.88 GB, W8A8 1.48 GB (ratio 0.52).
#[test]
fn w8a8_weights_take_about_half_the_bytes_of_bf16() {
    let cfg = WanConfig::wan21_t2v_1_3b();
    let bytes = |specs: &[TensorSpec]| -> usize {
        specs
            .iter()
            .map(|s| s.shape.iter().product::<usize>() * s.dtype.size_in_bytes())
            .sum()
    };
    let float =
        expected_tensors::<Box<dyn Attention>>(&cfg, PatchLayout::Linear, &sla(), DType::BF16);
    let int8 = turbo_models::wan::int8_block_linears(float.clone());
    let (float_bytes, int8_bytes) = (bytes(&float), bytes(&int8));
    let ratio = int8_bytes as f64 / float_bytes as f64;
    println!(
        "Wan2.1 1.3B weights: bf16 {:.2} GB, W8A8 {:.2} GB (ratio {ratio:.2})",
        float_bytes as f64 / 1e9,
        int8_bytes as f64 / 1e9
    );
    assert!((0.48..0.56).contains(&ratio), "ratio {ratio}");
}
