use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use turbo_attention::{Attention, AttentionKind, LoadAttention};
use turbo_core::Result;
use turbo_quant::Linear;

use super::attention::{CrossAttention, SelfAttention, Unbiased};
use super::fused;
use super::rope::Rope3d;
use super::{block_linear, QuantPolicy, WanConfig};
use crate::lora::Slot;

/// LayerNorm over the last dimension in f32, with an optional affine part.
#[derive(Debug, Clone)]
pub(crate) struct LayerNorm {
    affine: Option<(Tensor, Tensor)>,
    eps: f64,
}

impl LayerNorm {
    pub(crate) fn plain(eps: f64) -> Self {
        Self { affine: None, eps }
    }

    /// `weight` and `bias` `[dim]` under `vb`, held in f32.
    pub(crate) fn affine(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let vb = vb.to_dtype(DType::F32);
        Ok(Self {
            affine: Some((vb.get(dim, "weight")?, vb.get(dim, "bias")?)),
            eps,
        })
    }

    /// Normalises `x` (f32) and returns `out_dtype`.
    pub(crate) fn forward(&self, x: &Tensor, out_dtype: DType) -> Result<Tensor> {
        let (weight, bias) = match &self.affine {
            Some((weight, bias)) => (Some(weight), Some(bias)),
            None => (None, None),
        };
        fused::layer_norm_affine(x, weight, bias, self.eps, out_dtype)
    }
}

/// `LN(x)·(1 + scale) + shift` of the f32 residual stream, each modulation `[1, 1, D]`, in
/// `out_dtype`.
pub(crate) fn modulate(
    norm: &LayerNorm,
    x: &Tensor,
    shift: &Tensor,
    scale: &Tensor,
    out_dtype: DType,
) -> Result<Tensor> {
    debug_assert!(
        norm.affine.is_none(),
        "modulation follows a plain LayerNorm"
    );
    fused::layer_norm_affine(x, Some(&(scale + 1.0)?), Some(shift), norm.eps, out_dtype)
}

/// Tokens per pass of the FFN: at 16 384 the 14B's hidden state of a pass is 0.45 GB in bf16
/// instead of 2.1 GB for the 75 600 tokens of 720p (a multiple of 128, so that W8A8's
/// activation tiles are those of the whole).
pub const FFN_TOKENS_PER_PASS: usize = 16_384;

/// `ffn`: Linear → GELU(tanh) → Linear.
#[derive(Debug, Clone)]
struct FeedForward {
    up: Linear,
    down: Linear,
}

impl FeedForward {
    fn load(vb: VarBuilder, cfg: &WanConfig, quant_linear: QuantPolicy) -> Result<Self> {
        Ok(Self {
            up: block_linear(vb.pp("0"), cfg.dim, cfg.ffn_dim, quant_linear)?,
            down: block_linear(vb.pp("2"), cfg.ffn_dim, cfg.dim, quant_linear)?,
        })
    }

    /// `x` `[1, L, D]`, in passes of at most [`FFN_TOKENS_PER_PASS`] tokens so that the
    /// hidden activations (`ffn_dim` wide) stay bounded at any resolution.
    fn forward(&self, x: &Tensor) -> Result<Unbiased<'_>> {
        let tokens = x.dim(1)?;
        let mut passes = (0..tokens)
            .step_by(FFN_TOKENS_PER_PASS)
            .map(|start| {
                let rows = x.narrow(1, start, FFN_TOKENS_PER_PASS.min(tokens - start))?;
                let up = Unbiased::of(&self.up, &rows)?;
                Ok(self
                    .down
                    .forward_unbiased(&fused::bias_gelu(&up.y, up.bias)?)?)
            })
            .collect::<Result<Vec<_>>>()?;
        let y = match passes.len() {
            1 => passes.remove(0),
            _ => Tensor::cat(&passes, 1)?,
        };
        Ok(Unbiased {
            y,
            bias: self.down.bias(),
        })
    }
}

/// One `WanAttentionBlock`: modulated self-attention, cross-attention, modulated FFN, each added
/// to the f32 residual stream.
#[derive(Debug, Clone)]
pub(crate) struct WanBlock<A> {
    /// `[1, 6, D]` f32: shift, scale, gate of the self-attention, then of the FFN.
    modulation: Tensor,
    norm: LayerNorm,
    self_attn: SelfAttention<A>,
    norm3: LayerNorm,
    cross_attn: CrossAttention,
    ffn: FeedForward,
}

impl<A: LoadAttention> WanBlock<A> {
    pub(crate) fn load(
        vb: VarBuilder,
        cfg: &WanConfig,
        attention: &A::Config,
        quant_linear: QuantPolicy,
    ) -> Result<Self> {
        Ok(Self {
            modulation: vb.to_dtype(DType::F32).get((1, 6, cfg.dim), "modulation")?,
            norm: LayerNorm::plain(cfg.eps),
            self_attn: SelfAttention::load(vb.pp("self_attn"), cfg, attention, quant_linear)?,
            norm3: LayerNorm::affine(vb.pp("norm3"), cfg.dim, cfg.eps)?,
            cross_attn: CrossAttention::load(vb.pp("cross_attn"), cfg, quant_linear)?,
            ffn: FeedForward::load(vb.pp("ffn"), cfg, quant_linear)?,
        })
    }
}

impl<A> WanBlock<A> {
    /// The block's ten linears: q, k, v, o of both attentions, `ffn.0`, `ffn.2`.
    pub(crate) fn linears(&self) -> impl Iterator<Item = &Linear> {
        let ffn = [&self.ffn.up, &self.ffn.down];
        self.self_attn
            .linears()
            .into_iter()
            .chain(self.cross_attn.linears())
            .chain(ffn)
    }

    /// The same ten linears, to change them.
    pub(crate) fn linears_mut(&mut self) -> impl Iterator<Item = &mut Linear> {
        let ffn = [&mut self.ffn.up, &mut self.ffn.down];
        self.self_attn
            .linears_mut()
            .into_iter()
            .chain(self.cross_attn.linears_mut())
            .chain(ffn)
    }

    /// Everything a LoRA can change in the block, under `prefix` (`blocks.N`).
    pub(crate) fn lora_slots(&mut self, prefix: &str) -> Vec<(String, Slot<'_>)> {
        let mut slots = vec![(
            format!("{prefix}.modulation"),
            Slot::Tensor(&mut self.modulation),
        )];
        if let Some((weight, bias)) = &mut self.norm3.affine {
            slots.push((format!("{prefix}.norm3"), Slot::Affine { weight, bias }));
        }
        slots.extend(self.self_attn.lora_slots(&format!("{prefix}.self_attn")));
        slots.extend(self.cross_attn.lora_slots(&format!("{prefix}.cross_attn")));
        slots.push((format!("{prefix}.ffn.0"), Slot::Block(&mut self.ffn.up)));
        slots.push((format!("{prefix}.ffn.2"), Slot::Block(&mut self.ffn.down)));
        slots
    }
}

impl<A: Attention> WanBlock<A> {
    pub(crate) fn attention_kind(&self) -> AttentionKind {
        self.self_attn.kind()
    }

    pub(crate) fn set_attention_topk(&mut self, topk: f64) -> Result<()> {
        self.self_attn.set_topk(topk)
    }

    /// `x` `[1, L, D]` f32 residual stream; `e0` `[1, 6, D]`; `context` `[1, text_len, D]`.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        e0: &Tensor,
        context: &Tensor,
        rope: &Rope3d,
    ) -> Result<Tensor> {
        // Each temporary is dropped as soon as it is used (a shadowed binding would live to
        // the end of the function): at 720p a residual stream is 1.5 GB, a bf16 copy 0.8 GB.
        let dtype = context.dtype();
        let m = (self.modulation.broadcast_add(e0))?.chunk(6, 1)?;
        let attended = self
            .self_attn
            .forward(modulate(&self.norm, x, &m[0], &m[1], dtype)?, rope)?;
        let after_self = fused::gated_residual(x, &attended.y, attended.bias, Some(&m[2]))?;
        drop(attended);
        let attended = self
            .cross_attn
            .forward(&self.norm3.forward(&after_self, dtype)?, context)?;
        let after_cross = fused::gated_residual(&after_self, &attended.y, attended.bias, None)?;
        drop((attended, after_self));
        let ffn = self
            .ffn
            .forward(&modulate(&self.norm, &after_cross, &m[3], &m[4], dtype)?)?;
        fused::gated_residual(&after_cross, &ffn.y, ffn.bias, Some(&m[5]))
    }
}
