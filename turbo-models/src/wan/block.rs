use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use turbo_attention::{Attention, AttentionKind, LoadAttention};
use turbo_core::parallel::SequenceParallel;
use turbo_core::Result;
use turbo_quant::{Linear, LinearInput};

use super::attention::{CrossAttention, CrossContext, SelfAttention, Unbiased};
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

/// Consecutive tokens that share one timestep, with its time embedding.
#[derive(Debug, Clone)]
pub(crate) struct TimeRun {
    pub(crate) tokens: usize,
    /// `[1, D]` f32: the raw time embedding (the head's modulation input).
    pub(crate) e: Tensor,
    /// `[1, 6, D]` f32: the time projection (the blocks' modulation input).
    pub(crate) e0: Tensor,
}

/// The time embeddings of a forward, as runs of consecutive tokens in token order.
///
/// Wan2.2's per-token timesteps (`spec/wan-model.md` §2.6) give every token its own modulation;
/// upstream materialises `e0` as `[L, 6, D]` (2 GB in f32 for TI2V-5B at 720p). The timesteps
/// of every released use are constant over long runs (TI2V holds the image's latent frame, a
/// prefix of the tokens, at 0), so each run is modulated with its own `[1, 1, D]` vectors:
/// one run is exactly the Wan2.1 computation, two cost one extra copy of the rows.
#[derive(Debug, Clone)]
pub(crate) struct TimeRuns(pub(crate) Vec<TimeRun>);

impl TimeRuns {
    /// The runs of the tokens `range` alone (a sequence-parallel rank's shard), in order.
    pub(crate) fn shard(&self, range: std::ops::Range<usize>) -> Self {
        let mut start = 0;
        let mut runs = Vec::with_capacity(self.0.len());
        for run in &self.0 {
            let end = start + run.tokens;
            let overlap = end.min(range.end).saturating_sub(start.max(range.start));
            if overlap > 0 {
                runs.push(TimeRun {
                    tokens: overlap,
                    ..run.clone()
                });
            }
            start = end;
        }
        Self(runs)
    }

    /// `f(i, rows)` on the rows `[1, tokens, ..]` of each run `i` taken from every tensor of
    /// `xs` (all `[1, L, ..]`), the results joined along the tokens.
    pub(crate) fn per_run(
        &self,
        xs: &[&Tensor],
        f: impl Fn(usize, &[Tensor]) -> Result<Tensor>,
    ) -> Result<Tensor> {
        if self.0.len() == 1 {
            let whole: Vec<Tensor> = xs.iter().map(|x| (*x).clone()).collect();
            return f(0, &whole);
        }
        let mut start = 0;
        let mut parts = Vec::with_capacity(self.0.len());
        for (i, run) in self.0.iter().enumerate() {
            let rows = xs
                .iter()
                .map(|x| Ok(x.narrow(1, start, run.tokens)?))
                .collect::<Result<Vec<_>>>()?;
            parts.push(f(i, &rows)?);
            start += run.tokens;
        }
        Ok(Tensor::cat(&parts, 1)?)
    }
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
                let up = Unbiased::of(&self.up, &LinearInput::new(&rows))?;
                let hidden = fused::bias_gelu(&up.y, up.bias)?;
                Ok(self.down.forward_unbiased(&LinearInput::new(&hidden))?)
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

    /// `x` `[1, L, D]` f32 residual stream; `time` the runs of its timesteps; `context` the
    /// embedded text `[1, text_len, D]` (and CLIP tokens). Under sequence parallelism (`sp`),
    /// `x`, `time` and `rope` are this rank's token shard: only the self-attention exchanges
    /// data; the modulation, cross-attention and FFN act on each token alone.
    pub(crate) fn forward(
        &self,
        x: &Tensor,
        time: &TimeRuns,
        context: &CrossContext,
        rope: &Rope3d,
        sp: Option<&SequenceParallel<'_>>,
    ) -> Result<Tensor> {
        // Each temporary is dropped as soon as it is used (a shadowed binding would live to
        // the end of the function): at 720p a residual stream is 1.5 GB, a bf16 copy 0.8 GB.
        let dtype = context.text.dtype();
        // The six modulation chunks `[1, 1, D]` of each run, in run order.
        let m = time
            .0
            .iter()
            .map(|run| Ok(self.modulation.broadcast_add(&run.e0)?.chunk(6, 1)?))
            .collect::<Result<Vec<_>>>()?;
        let modulated = |x: &Tensor, shift: usize, scale: usize| {
            time.per_run(&[x], |i, rows| {
                let m = &m[i];
                modulate(&self.norm, &rows[0], &m[shift], &m[scale], dtype)
            })
        };
        let gated = |x: &Tensor, branch: &Unbiased<'_>, gate: usize| {
            time.per_run(&[x, &branch.y], |i, rows| {
                let m = &m[i];
                fused::gated_residual(&rows[0], &rows[1], branch.bias, Some(&m[gate]))
            })
        };
        let attended = self.self_attn.forward(modulated(x, 0, 1)?, rope, sp)?;
        let after_self = gated(x, &attended, 2)?;
        drop(attended);
        let attended = self
            .cross_attn
            .forward(&self.norm3.forward(&after_self, dtype)?, context)?;
        let after_cross = fused::gated_residual(&after_self, &attended.y, attended.bias, None)?;
        drop((attended, after_self));
        let ffn = self.ffn.forward(&modulated(&after_cross, 3, 4)?)?;
        gated(&after_cross, &ffn, 5)
    }
}
