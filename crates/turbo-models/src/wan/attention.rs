//! The block's self-attention (through `turbo-attention`) and its dense text cross-attention.

use candle_core::{DType, Tensor};
use candle_nn::{Module, VarBuilder};
use turbo_attention::{Attention, DenseAttention, LoadAttention};
use turbo_core::Result;
use turbo_quant::Linear;

use super::rope::Rope3d;
use super::{block_linear, QuantPolicy, WanConfig};

/// RMSNorm over the whole hidden vector (all heads together), statistics in f32.
#[derive(Debug, Clone)]
pub(crate) struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    pub(crate) fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints_dtype(dim, "weight", Default::default(), DType::F32)?,
            eps: eps as f32,
        })
    }

    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let normed = candle_nn::ops::rms_norm(&x.to_dtype(DType::F32)?, &self.weight, self.eps)?;
        Ok(normed.to_dtype(x.dtype())?)
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

    /// `[1, L, D]` → `[1, L, H, D/H]`.
    fn split_heads(&self, x: &Tensor) -> Result<Tensor> {
        let (b, l, d) = x.dims3()?;
        Ok(x.reshape((b, l, self.heads, d / self.heads))?)
    }

    fn query(&self, x: &Tensor) -> Result<Tensor> {
        self.split_heads(&self.norm_q.forward(&self.q.forward(x)?)?)
    }

    fn key(&self, x: &Tensor) -> Result<Tensor> {
        self.split_heads(&self.norm_k.forward(&self.k.forward(x)?)?)
    }

    fn value(&self, x: &Tensor) -> Result<Tensor> {
        self.split_heads(&self.v.forward(x)?)
    }

    /// `[1, L, H, D/H]` → output projection `[1, L, D]`.
    fn output(&self, attended: &Tensor) -> Result<Tensor> {
        let (b, l, h, d) = attended.dims4()?;
        Ok(self.o.forward(&attended.reshape((b, l, h * d))?)?)
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
}

impl<A: Attention> SelfAttention<A> {
    pub(crate) fn kind(&self) -> turbo_attention::AttentionKind {
        self.attention.kind()
    }

    pub(crate) fn set_topk(&mut self, topk: f64) -> Result<()> {
        self.attention.set_topk(topk)
    }

    pub(crate) fn forward(&self, x: &Tensor, rope: &Rope3d) -> Result<Tensor> {
        let q = rope.apply(&self.proj.query(x)?)?;
        let k = rope.apply(&self.proj.key(x)?)?;
        let v = self.proj.value(x)?;
        self.proj.output(&self.attention.forward(&q, &k, &v)?)
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

    pub(crate) fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let q = self.proj.query(x)?;
        let k = self.proj.key(context)?;
        let v = self.proj.value(context)?;
        self.proj.output(&self.attention.forward(&q, &k, &v)?)
    }
}
