//! The block's self-attention (through `turbo-attention`) and its dense text cross-attention.

use candle_core::{DType, Tensor};
use candle_nn::{Module, VarBuilder};
use turbo_attention::{Attention, DenseAttention, LoadAttention};
use turbo_core::Result;
use turbo_quant::Linear;

use super::fused;
use super::rope::Rope3d;
use super::{block_linear, QuantPolicy, WanConfig};
use crate::lora::Slot;

/// RMSNorm over the whole hidden vector (all heads together), statistics in f32.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    pub(crate) fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints_dtype(dim, "weight", Default::default(), DType::F32)?,
            eps,
        })
    }
}

/// A linear's output whose bias the next fused op adds.
pub(crate) struct Unbiased<'a> {
    pub(crate) y: Tensor,
    pub(crate) bias: Option<&'a Tensor>,
}

impl<'a> Unbiased<'a> {
    pub(crate) fn of(linear: &'a Linear, x: &Tensor) -> Result<Self> {
        Ok(Self {
            y: linear.forward_unbiased(x)?,
            bias: linear.bias(),
        })
    }
}

/// The q, k, v, o projections and q/k norms both attentions share.
#[derive(Debug, Clone)]
struct Projections {
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    norm_q: RmsNorm,
    norm_k: RmsNorm,
    heads: usize,
}

impl Projections {
    fn load(vb: &VarBuilder, cfg: &WanConfig, quant_linear: QuantPolicy) -> Result<Self> {
        let d = cfg.dim;
        Ok(Self {
            q: block_linear(vb.pp("q"), d, d, quant_linear)?,
            k: block_linear(vb.pp("k"), d, d, quant_linear)?,
            v: block_linear(vb.pp("v"), d, d, quant_linear)?,
            o: block_linear(vb.pp("o"), d, d, quant_linear)?,
            norm_q: RmsNorm::load(vb.pp("norm_q"), d, cfg.eps)?,
            norm_k: RmsNorm::load(vb.pp("norm_k"), d, cfg.eps)?,
            heads: cfg.num_heads,
        })
    }

    fn linears(&self) -> [&Linear; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }

    fn linears_mut(&mut self) -> [&mut Linear; 4] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o]
    }

    /// The projections and norm weights a LoRA can change, under `prefix` (`blocks.N.self_attn`).
    fn lora_slots(&mut self, prefix: &str) -> Vec<(String, Slot<'_>)> {
        let linears = ["q", "k", "v", "o"]
            .into_iter()
            .zip([&mut self.q, &mut self.k, &mut self.v, &mut self.o])
            .map(|(name, linear)| (format!("{prefix}.{name}"), Slot::Block(linear)));
        let norms = [
            (
                format!("{prefix}.norm_q"),
                Slot::Tensor(&mut self.norm_q.weight),
            ),
            (
                format!("{prefix}.norm_k"),
                Slot::Tensor(&mut self.norm_k.weight),
            ),
        ];
        linears.chain(norms).collect()
    }

    /// `[1, L, D]` → `[1, L, H, D/H]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, d / self.heads))?)
    }

    /// `linear(x)` through `norm` (and RoPE when given), split into heads.
    fn normed(
        &self,
        linear: &Linear,
        norm: &RmsNorm,
        x: &Tensor,
        rope: Option<&Rope3d>,
    ) -> Result<Tensor> {
        let y = Unbiased::of(linear, x)?;
        let tables = rope.map(Rope3d::tables);
        self.split_heads(&fused::rms_norm_rope(
            &y.y,
            y.bias,
            &norm.weight,
            norm.eps,
            tables,
        )?)
    }

    fn query(&self, x: &Tensor, rope: Option<&Rope3d>) -> Result<Tensor> {
        self.normed(&self.q, &self.norm_q, x, rope)
    }

    fn key(&self, x: &Tensor, rope: Option<&Rope3d>) -> Result<Tensor> {
        self.normed(&self.k, &self.norm_k, x, rope)
    }

    fn value(&self, x: &Tensor) -> Result<Tensor> {
        self.split_heads(&self.v.forward(x)?)
    }

    /// `[1, L, H, D/H]` → the output projection `[1, L, D]`, its bias still to add.
    fn output(&self, attended: &Tensor) -> Result<Unbiased<'_>> {
        let (b, l, h, d) = attended.dims4()?;
        Unbiased::of(&self.o, &attended.reshape((b, l, h * d))?)
    }
}

/// `self_attn`: q/k RMSNorm, 3-D RoPE, then the layer's attention backend `A`.
#[derive(Debug, Clone)]
pub(crate) struct SelfAttention<A> {
    proj: Projections,
    attention: A,
}

impl<A: LoadAttention> SelfAttention<A> {
    /// `vb` is `blocks.N.self_attn`; the backend reads its weights (`proj_l`) from
    /// `attn_op.local_attn`.
    pub(crate) fn load(
        vb: VarBuilder,
        cfg: &WanConfig,
        attention: &A::Config,
        quant_linear: QuantPolicy,
    ) -> Result<Self> {
        Ok(Self {
            proj: Projections::load(&vb, cfg, quant_linear)?,
            attention: A::load(vb.pp("attn_op.local_attn"), cfg.head_dim(), attention)?,
        })
    }
}

impl<A> SelfAttention<A> {
    pub(crate) fn linears(&self) -> [&Linear; 4] {
        self.proj.linears()
    }

    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 4] {
        self.proj.linears_mut()
    }

    pub(crate) fn lora_slots(&mut self, prefix: &str) -> Vec<(String, Slot<'_>)> {
        self.proj.lora_slots(prefix)
    }
}

impl<A: Attention> SelfAttention<A> {
    pub(crate) fn kind(&self) -> turbo_attention::AttentionKind {
        self.attention.kind()
    }

    pub(crate) fn set_topk(&mut self, topk: f64) -> Result<()> {
        self.attention.set_topk(topk)
    }

    /// Takes `x` by value to free it once q, k and v are projected, before the attention.
    pub(crate) fn forward(&self, x: Tensor, rope: &Rope3d) -> Result<Unbiased<'_>> {
        let q = self.proj.query(&x, Some(rope))?;
        let k = self.proj.key(&x, Some(rope))?;
        let v = self.proj.value(&x)?;
        drop(x);
        let attended = self.attention.forward(&q, &k, &v)?;
        drop((q, k, v));
        self.proj.output(&attended)
    }
}

/// `cross_attn`: dense attention of the video tokens over the (padded, unmasked) text tokens.
#[derive(Debug, Clone)]
pub(crate) struct CrossAttention {
    proj: Projections,
    attention: DenseAttention,
}

impl CrossAttention {
    pub(crate) fn load(vb: VarBuilder, cfg: &WanConfig, quant_linear: QuantPolicy) -> Result<Self> {
        Ok(Self {
            proj: Projections::load(&vb, cfg, quant_linear)?,
            attention: DenseAttention::default(),
        })
    }

    pub(crate) fn linears(&self) -> [&Linear; 4] {
        self.proj.linears()
    }

    pub(crate) fn linears_mut(&mut self) -> [&mut Linear; 4] {
        self.proj.linears_mut()
    }

    pub(crate) fn lora_slots(&mut self, prefix: &str) -> Vec<(String, Slot<'_>)> {
        self.proj.lora_slots(prefix)
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Unbiased<'_>> {
        let q = self.proj.query(x, None)?;
        let k = self.proj.key(context, None)?;
        let v = self.proj.value(context)?;
        self.proj.output(&self.attention.forward(&q, &k, &v)?)
    }
}
