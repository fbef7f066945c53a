//! The block's self-attention (through `turbo-attention`) and its dense text cross-attention.

use candle_core::{DType, Tensor};
use candle_nn::VarBuilder;
use turbo_attention::{Attention, DenseAttention, LoadAttention};
use turbo_core::parallel::SequenceParallel;
use turbo_core::Result;
use turbo_quant::{Linear, LinearInput};

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
    pub(crate) fn of(linear: &'a Linear, input: &LinearInput<'_>) -> Result<Self> {
        Ok(Self {
            y: linear.forward_unbiased(input)?,
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

    /// `linear(input)` through `norm` (and RoPE when given), split into heads.
    fn normed(
        &self,
        linear: &Linear,
        norm: &RmsNorm,
        input: &LinearInput<'_>,
        rope: Option<&Rope3d>,
    ) -> Result<Tensor> {
        let y = Unbiased::of(linear, input)?;
        let tables = rope.map(Rope3d::tables);
        self.split_heads(&fused::rms_norm_rope(
            &y.y,
            y.bias,
            &norm.weight,
            norm.eps,
            tables,
        )?)
    }

    fn query(&self, input: &LinearInput<'_>, rope: Option<&Rope3d>) -> Result<Tensor> {
        self.normed(&self.q, &self.norm_q, input, rope)
    }

    fn key(&self, input: &LinearInput<'_>, rope: Option<&Rope3d>) -> Result<Tensor> {
        self.normed(&self.k, &self.norm_k, input, rope)
    }

    fn value(&self, input: &LinearInput<'_>) -> Result<Tensor> {
        self.split_heads(&self.v.forward_input(input)?)
    }

    /// `[1, L, H, D/H]` → the output projection `[1, L, D]`, its bias still to add.
    fn output(&self, attended: &Tensor) -> Result<Unbiased<'_>> {
        let (b, l, h, d) = attended.dims4()?;
        let attended = attended.reshape((b, l, h * d))?;
        Unbiased::of(&self.o, &LinearInput::new(&attended))
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
    /// `attn_op.local_attn`. A checkpoint without them (the official Wan releases) gives the
    /// backend zeros: SLA's linear branch is then zero and SLA is its sparse branch alone.
    pub(crate) fn load(
        vb: VarBuilder,
        cfg: &WanConfig,
        attention: &A::Config,
        quant_linear: QuantPolicy,
    ) -> Result<Self> {
        let weights = vb.pp("attn_op.local_attn");
        let stored = A::weights(cfg.head_dim(), attention)
            .iter()
            .all(|(name, _)| weights.contains_tensor(name));
        let weights = if stored {
            weights
        } else {
            VarBuilder::zeros(DType::F32, vb.device())
        };
        Ok(Self {
            proj: Projections::load(&vb, cfg, quant_linear)?,
            attention: A::load(weights, cfg.head_dim(), attention)?,
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
    ///
    /// With `sp` (Ulysses sequence parallelism), `x` holds this rank's tokens and `rope` their
    /// global positions: q, k and v go through an all-to-all that gives this rank every token of
    /// its share of the heads, the backend attends over all tokens as on one device, and a
    /// second all-to-all returns this rank's tokens of every head.
    pub(crate) fn forward(
        &self,
        x: Tensor,
        rope: &Rope3d,
        sp: Option<&SequenceParallel<'_>>,
    ) -> Result<Unbiased<'_>> {
        // q, k and v read x quantised once (for int8 projections), freed with `input`.
        let input = LinearInput::new(&x);
        let q = self.proj.query(&input, Some(rope))?;
        let k = self.proj.key(&input, Some(rope))?;
        let v = self.proj.value(&input)?;
        drop(input);
        drop(x);
        let attended = match sp {
            None => {
                let attended = self.attention.forward(&q, &k, &v)?;
                drop((q, k, v));
                attended
            }
            Some(sp) => self.attend_by_heads(sp, q, k, v)?,
        };
        self.proj.output(&attended)
    }

    /// The attention of this rank's heads over all tokens, back in this rank's tokens.
    fn attend_by_heads(
        &self,
        sp: &SequenceParallel<'_>,
        q: Tensor,
        k: Tensor,
        v: Tensor,
    ) -> Result<Tensor> {
        let heads = self.proj.heads;
        let (q, k, v) = (
            sp.scatter_heads(&q)?,
            sp.scatter_heads(&k)?,
            sp.scatter_heads(&v)?,
        );
        // More ranks than heads leaves a rank none: it only takes part in the exchanges.
        let attended = if q.dim(2)? == 0 {
            q.clone()
        } else {
            self.attention.forward(&q, &k, &v)?
        };
        drop((q, k, v));
        sp.gather_heads(&attended, heads)
    }
}

/// What the cross-attention attends to: the embedded text (`[1, text_len, D]`) and, for the
/// Wan2.1 I2V / FLF2V models, the embedded CLIP tokens (`[1, N, D]`). Upstream prepends the
/// image tokens to the text and splits them again in every block; keeping them apart is the
/// same computation.
#[derive(Debug, Clone)]
pub(crate) struct CrossContext {
    pub(crate) text: Tensor,
    pub(crate) image: Option<Tensor>,
}

/// `k_img`, `v_img` and `norm_k_img` of a Wan2.1 I2V / FLF2V cross-attention.
#[derive(Debug, Clone)]
struct ImageKeyValue {
    k_img: Linear,
    v_img: Linear,
    norm_k_img: RmsNorm,
}

/// `cross_attn`: dense attention of the video tokens over the (padded, unmasked) text tokens,
/// plus, for Wan2.1 I2V / FLF2V, a second attention of the same queries over the image tokens,
/// summed with the first before the output projection.
#[derive(Debug, Clone)]
pub(crate) struct CrossAttention {
    proj: Projections,
    image: Option<ImageKeyValue>,
    attention: DenseAttention,
}

impl CrossAttention {
    pub(crate) fn load(vb: VarBuilder, cfg: &WanConfig, quant_linear: QuantPolicy) -> Result<Self> {
        let d = cfg.dim;
        let image = if cfg.model_type.uses_clip() {
            Some(ImageKeyValue {
                k_img: block_linear(vb.pp("k_img"), d, d, quant_linear)?,
                v_img: block_linear(vb.pp("v_img"), d, d, quant_linear)?,
                norm_k_img: RmsNorm::load(vb.pp("norm_k_img"), d, cfg.eps)?,
            })
        } else {
            None
        };
        Ok(Self {
            proj: Projections::load(&vb, cfg, quant_linear)?,
            image,
            attention: DenseAttention::default(),
        })
    }

    /// q, k, v, o, then `k_img` and `v_img` when present.
    pub(crate) fn linears(&self) -> Vec<&Linear> {
        let mut linears = self.proj.linears().to_vec();
        if let Some(image) = &self.image {
            linears.extend([&image.k_img, &image.v_img]);
        }
        linears
    }

    pub(crate) fn linears_mut(&mut self) -> Vec<&mut Linear> {
        let mut linears: Vec<&mut Linear> = self.proj.linears_mut().into_iter().collect();
        if let Some(image) = &mut self.image {
            linears.extend([&mut image.k_img, &mut image.v_img]);
        }
        linears
    }

    pub(crate) fn lora_slots(&mut self, prefix: &str) -> Vec<(String, Slot<'_>)> {
        let mut slots = self.proj.lora_slots(prefix);
        if let Some(image) = &mut self.image {
            slots.extend([
                (format!("{prefix}.k_img"), Slot::Block(&mut image.k_img)),
                (format!("{prefix}.v_img"), Slot::Block(&mut image.v_img)),
                (
                    format!("{prefix}.norm_k_img"),
                    Slot::Tensor(&mut image.norm_k_img.weight),
                ),
            ]);
        }
        slots
    }

    pub(crate) fn forward(&self, x: &Tensor, context: &CrossContext) -> Result<Unbiased<'_>> {
        let q = self.proj.query(&LinearInput::new(x), None)?;
        let text = LinearInput::new(&context.text);
        let k = self.proj.key(&text, None)?;
        let v = self.proj.value(&text)?;
        drop(text);
        let mut attended = self.attention.forward(&q, &k, &v)?;
        drop((k, v));
        match (&self.image, &context.image) {
            (Some(branch), Some(image)) => {
                let image = LinearInput::new(image);
                let k = self
                    .proj
                    .normed(&branch.k_img, &branch.norm_k_img, &image, None)?;
                let v = self
                    .proj
                    .split_heads(&branch.v_img.forward_input(&image)?)?;
                attended = (attended + self.attention.forward(&q, &k, &v)?)?;
            }
            (None, None) => {}
            (Some(_), None) => {
                return Err(turbo_core::Error::Shape {
                    what: "CLIP image context of a Wan2.1 I2V / FLF2V cross-attention".into(),
                    expected: "embedded image tokens".into(),
                    got: vec![],
                })
            }
            (None, Some(image)) => {
                return Err(turbo_core::Error::Shape {
                    what: "CLIP image context given to a model without `k_img` / `v_img`".into(),
                    expected: "no image tokens".into(),
                    got: image.dims().to_vec(),
                })
            }
        }
        self.proj.output(&attended)
    }
}
