//! The tensors a DiT configuration reads, listed without loading anything.

use candle_core::DType;
use turbo_attention::LoadAttention;
use turbo_core::PATCH_SIZE;

use super::config::CLIP_DIM;
use super::embeddings::{PatchLayout, PATCH_VOLUME};
use super::model::ATTENTION_WEIGHTS;
use super::WanConfig;

/// FLF2V's `img_emb.emb_pos` tokens in the release: 257 CLIP tokens of each of two frames.
pub const FLF2V_CLIP_TOKENS: usize = 2 * 257;

/// The linears of each block, under `blocks.N.`: those `quant_linear` quantises (never
/// `proj_l`). `k_img` / `v_img` exist only in the Wan2.1 I2V / FLF2V models.
pub(crate) const BLOCK_LINEARS: [&str; 12] = [
    "self_attn.q",
    "self_attn.k",
    "self_attn.v",
    "self_attn.o",
    "cross_attn.q",
    "cross_attn.k",
    "cross_attn.v",
    "cross_attn.o",
    "cross_attn.k_img",
    "cross_attn.v_img",
    "ffn.0",
    "ffn.2",
];

/// One checkpoint tensor: its key, its shape, and the dtype the model holds it in.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
}

/// Every tensor [`super::WanModel::load`] reads for `cfg` with the patch embedding stored as
/// `patch` and the self-attention backend `A` configured by `attention`, given the compute dtype
/// of the block linears. Float32 islands (time embedding, modulation, norms, head, `proj_l`)
/// are listed as `F32`. The block linears are listed in float; [`int8_block_linears`] turns the
/// list into that of a `-quant` checkpoint. FLF2V's `img_emb.emb_pos` is listed with the
/// release's [`FLF2V_CLIP_TOKENS`] (the loader takes the file's count).
pub fn expected_tensors<A: LoadAttention>(
    cfg: &WanConfig,
    patch: PatchLayout,
    attention: &A::Config,
    compute: DType,
) -> Vec<TensorSpec> {
    let d = cfg.dim;
    let mut specs = Specs::default();
    let patch_shape = match patch {
        PatchLayout::Conv3d => vec![d, cfg.in_dim, PATCH_SIZE.0, PATCH_SIZE.1, PATCH_SIZE.2],
        PatchLayout::Linear => vec![d, cfg.in_dim * PATCH_VOLUME],
    };
    specs.push("patch_embedding.weight", patch_shape, compute);
    specs.push("patch_embedding.bias", vec![d], compute);
    specs.linear("text_embedding.0", cfg.text_dim, d, compute);
    specs.linear("text_embedding.2", d, d, compute);
    specs.linear("time_embedding.0", cfg.freq_dim, d, DType::F32);
    specs.linear("time_embedding.2", d, d, DType::F32);
    specs.linear("time_projection.1", d, 6 * d, DType::F32);
    for i in 0..cfg.num_layers {
        let block = format!("blocks.{i}");
        specs.push(&format!("{block}.modulation"), vec![1, 6, d], DType::F32);
        for attn in ["self_attn", "cross_attn"] {
            for proj in ["q", "k", "v", "o"] {
                specs.linear(&format!("{block}.{attn}.{proj}"), d, d, compute);
            }
            for norm in ["norm_q", "norm_k"] {
                specs.push(
                    &format!("{block}.{attn}.{norm}.weight"),
                    vec![d],
                    DType::F32,
                );
            }
        }
        if cfg.model_type.uses_clip() {
            specs.linear(&format!("{block}.cross_attn.k_img"), d, d, compute);
            specs.linear(&format!("{block}.cross_attn.v_img"), d, d, compute);
            specs.push(
                &format!("{block}.cross_attn.norm_k_img.weight"),
                vec![d],
                DType::F32,
            );
        }
        for (name, shape) in A::weights(cfg.head_dim(), attention) {
            specs.push(
                &format!("{block}.{ATTENTION_WEIGHTS}.{name}"),
                shape,
                DType::F32,
            );
        }
        specs.push(&format!("{block}.norm3.weight"), vec![d], DType::F32);
        specs.push(&format!("{block}.norm3.bias"), vec![d], DType::F32);
        specs.linear(&format!("{block}.ffn.0"), d, cfg.ffn_dim, compute);
        specs.linear(&format!("{block}.ffn.2"), cfg.ffn_dim, d, compute);
    }
    specs.push("head.modulation", vec![1, 2, d], DType::F32);
    specs.linear("head.head", d, cfg.out_dim * PATCH_VOLUME, DType::F32);
    if cfg.model_type.uses_clip() {
        specs.push("img_emb.proj.0.weight", vec![CLIP_DIM], DType::F32);
        specs.push("img_emb.proj.0.bias", vec![CLIP_DIM], DType::F32);
        specs.linear("img_emb.proj.1", CLIP_DIM, CLIP_DIM, compute);
        specs.linear("img_emb.proj.3", CLIP_DIM, d, compute);
        specs.push("img_emb.proj.4.weight", vec![d], DType::F32);
        specs.push("img_emb.proj.4.bias", vec![d], DType::F32);
        if cfg.model_type == super::ModelType::Flf2v {
            specs.push(
                "img_emb.emb_pos",
                vec![1, FLF2V_CLIP_TOKENS, CLIP_DIM],
                DType::F32,
            );
        }
    }
    specs.0
}

/// The same tensor list with every block linear's `weight` `[N, K]` replaced by the W8A8 pair
/// of a `-quant` checkpoint: `int8_weight` `[N, K]` (held as `U8` bytes) and `scale`
/// `[⌈N/128⌉, ⌈K/128⌉]` (F32). Biases and every other tensor are unchanged.
pub fn int8_block_linears(specs: Vec<TensorSpec>) -> Vec<TensorSpec> {
    let mut out = Vec::with_capacity(specs.len() + specs.len() / 4);
    for spec in specs {
        match (block_linear_of(&spec.name), spec.shape.as_slice()) {
            (Some(layer), &[rows, cols]) => {
                out.push(TensorSpec {
                    name: format!("{layer}.int8_weight"),
                    shape: spec.shape.clone(),
                    dtype: DType::U8,
                });
                out.push(TensorSpec {
                    name: format!("{layer}.scale"),
                    shape: turbo_quant::tile_grid(rows, cols).to_vec(),
                    dtype: DType::F32,
                });
            }
            _ => out.push(spec),
        }
    }
    out
}

/// `blocks.N.<linear>` when `name` is the `weight` of one of the block linears W8A8 applies to
/// (q, k, v, o of both attentions, `ffn.0`, `ffn.2`).
pub fn block_linear_of(name: &str) -> Option<&str> {
    let layer = name.strip_suffix(".weight")?;
    let (index, linear) = layer.strip_prefix("blocks.")?.split_once('.')?;
    let is_block_linear = index.parse::<usize>().is_ok() && BLOCK_LINEARS.contains(&linear);
    is_block_linear.then_some(layer)
}

#[derive(Default)]
struct Specs(Vec<TensorSpec>);

impl Specs {
    fn push(&mut self, name: &str, shape: Vec<usize>, dtype: DType) {
        self.0.push(TensorSpec {
            name: name.to_owned(),
            shape,
            dtype,
        });
    }

    /// `prefix.weight` `[out, in]` and `prefix.bias` `[out]`.
    fn linear(&mut self, prefix: &str, in_dim: usize, out_dim: usize, dtype: DType) {
        self.push(&format!("{prefix}.weight"), vec![out_dim, in_dim], dtype);
        self.push(&format!("{prefix}.bias"), vec![out_dim], dtype);
    }
}
