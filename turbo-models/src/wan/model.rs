use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use turbo_attention::{Attention, AttentionKind, LoadAttention};
use turbo_core::{Denoiser, Error, Result, Timestep, PATCH_SIZE};

use super::block::{modulate, LayerNorm, WanBlock};
use super::embeddings::{PatchEmbedding, PatchLayout, TextEmbedding, TimeEmbedding, PATCH_VOLUME};
use super::keys::BLOCK_LINEARS;
use super::rope::Rope3d;
use super::{linear, ModelType, QuantPolicy, WanConfig};
use crate::lora::{LoraMode, LoraSummary, ScaledLora, Slot, Unadapted};

/// The largest model time (`1000 · s` at s = 1, pure noise).
const MAX_MODEL_TIME: f64 = 1000.0;

/// Where a block's self-attention backend keeps its weights (SLA's `proj_l`).
pub(crate) const ATTENTION_WEIGHTS: &str = "self_attn.attn_op.local_attn";

/// What the loader found in a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointLayout {
    pub patch: PatchLayout,
    /// Per-block SLA `proj_l` weights are present (TurboDiffusion releases).
    pub has_proj_l: bool,
}

/// `head`: modulated LayerNorm and the projection to patches of `out_dim` channels, in f32.
#[derive(Debug, Clone)]
struct Head {
    /// `[1, 2, D]`: shift, scale.
    modulation: Tensor,
    norm: LayerNorm,
    proj: Linear,
}

impl Head {
    /// `vb` is `head`, in f32.
    fn load(vb: VarBuilder, cfg: &WanConfig) -> Result<Self> {
        Ok(Self {
            modulation: vb.get((1, 2, cfg.dim), "modulation")?,
            norm: LayerNorm::plain(cfg.eps),
            proj: linear(vb.pp("head"), cfg.dim, cfg.out_dim * PATCH_VOLUME)?,
        })
    }

    fn lora_slots(&mut self) -> Vec<(String, Slot<'_>)> {
        vec![
            ("head.modulation".into(), Slot::Tensor(&mut self.modulation)),
            ("head.head".into(), Slot::Plain(&mut self.proj)),
        ]
    }

    /// `x` `[1, L, D]` f32 and the raw time embedding `e` `[1, D]` (no SiLU) → `[1, L, 4·C]`.
    fn forward(&self, x: &Tensor, e: &Tensor) -> Result<Tensor> {
        let m = self
            .modulation
            .broadcast_add(&e.unsqueeze(1)?)?
            .chunk(2, 1)?;
        Ok(self
            .proj
            .forward(&modulate(&self.norm, x, &m[0], &m[1], DType::F32)?)?)
    }
}

/// The Wan DiT (`WanModel`), generic over its self-attention backend.
///
/// `WanModel<Box<dyn Attention>>` (plain `WanModel`, the default) picks the backend at run
/// time from an [`turbo_attention::AttentionConfig`]; `WanModel<SlaAttention>` (or any other
/// [`LoadAttention`]) fixes it at compile time. Weights load from a `VarBuilder` whose dtype is
/// the compute dtype of the block linears and embeddings; the time embedding, modulation, norms,
/// residual stream and head stay f32, as upstream keeps them. The block linears are
/// [`turbo_quant::Linear`]s: float, or W8A8 int8 when the checkpoint stores them so or
/// [`WanModel::load_with_quant`] quantises them.
#[derive(Debug, Clone)]
pub struct WanModel<A = Box<dyn Attention>> {
    cfg: WanConfig,
    layout: CheckpointLayout,
    patch_embedding: PatchEmbedding,
    time_embedding: TimeEmbedding,
    text_embedding: TextEmbedding,
    blocks: Vec<WanBlock<A>>,
    head: Head,
    /// The base values of the modules [`WanModel::set_loras`] has changed.
    unadapted: Unadapted,
}

impl<A: LoadAttention> WanModel<A> {
    /// Loads a DiT of shape `cfg` from `vb` (keys as in the official or TurboDiffusion layout,
    /// detected from `patch_embedding.weight`), each block's self-attention built from
    /// `attention`.
    ///
    /// `original` attention on a checkpoint with `proj_l` ignores those weights (logged once);
    /// `sla` / `sagesla` on a checkpoint without them fails with [`Error::MissingProjL`].
    ///
    /// Block linears stored in float stay in float; those stored as W8A8 int8 (`-quant` files)
    /// run in int8. [`WanModel::load_with_quant`] can also quantise float ones.
    pub fn load(vb: VarBuilder, cfg: &WanConfig, attention: &A::Config) -> Result<Self> {
        Self::load_with_quant(vb, cfg, attention, QuantPolicy::KeepFloat)
    }

    /// [`WanModel::load`], with TurboDiffusion's `--quant_linear` as `quant_linear`: with
    /// [`QuantPolicy::Quantize`], the block linears (q, k, v, o of both attentions, `ffn.0`,
    /// `ffn.2`; never `proj_l`, embeddings, head, modulation or norms) stored in float are
    /// quantised to W8A8 int8 at load. Block linears stored as int8 (`int8_weight` + `scale`,
    /// the `-quant` releases) are loaded as int8 whatever `quant_linear` says: unlike upstream,
    /// a mismatch between the setting and the file is not an error. One line through `tracing`
    /// says what was done.
    pub fn load_with_quant(
        vb: VarBuilder,
        cfg: &WanConfig,
        attention: &A::Config,
        quant_linear: QuantPolicy,
    ) -> Result<Self> {
        cfg.validate()?;
        let f32_vb = vb.to_dtype(DType::F32);
        let (patch_embedding, patch) = PatchEmbedding::load(vb.pp("patch_embedding"), cfg)?;
        let layout = CheckpointLayout {
            patch,
            has_proj_l: vb.contains_tensor(&format!("blocks.0.{ATTENTION_WEIGHTS}.proj_l.weight")),
        };
        let missing_attention_weight = A::weights(cfg.head_dim(), attention)
            .into_iter()
            .map(|(name, _)| format!("blocks.0.{ATTENTION_WEIGHTS}.{name}"))
            .find(|key| !vb.contains_tensor(key));
        if let Some(key) = missing_attention_weight {
            return Err(Error::MissingProjL { key });
        }
        let blocks = (0..cfg.num_layers)
            .map(|i| WanBlock::load(vb.pp("blocks").pp(i), cfg, attention, quant_linear))
            .collect::<Result<Vec<_>>>()?;
        let model = Self {
            cfg: cfg.clone(),
            layout,
            patch_embedding,
            time_embedding: TimeEmbedding::load(f32_vb.clone(), cfg)?,
            text_embedding: TextEmbedding::load(vb.pp("text_embedding"), cfg)?,
            blocks,
            head: Head::load(f32_vb.pp("head"), cfg)?,
            unadapted: Unadapted::default(),
        };
        let stored_int8 = (0..cfg.num_layers)
            .flat_map(|i| BLOCK_LINEARS.map(|linear| format!("blocks.{i}.{linear}.int8_weight")))
            .filter(|key| vb.contains_tensor(key))
            .count();
        model.log_linear_precision(stored_int8, quant_linear);
        if layout.has_proj_l && model.attention_kind() == Some(AttentionKind::Original) {
            tracing::info!(
                "checkpoint has SLA proj_l weights; `original` attention does not use them"
            );
        }
        Ok(model)
    }
}

impl<A> WanModel<A> {
    /// How many block linears run in W8A8 int8 (stored so, or quantised at load).
    pub fn int8_linears(&self) -> usize {
        self.block_linears().filter(|l| l.is_int8()).count()
    }

    fn block_linears(&self) -> impl Iterator<Item = &turbo_quant::Linear> {
        self.blocks.iter().flat_map(WanBlock::linears)
    }

    /// Quantises every float block linear to W8A8 int8 (as [`QuantPolicy::Quantize`] does at
    /// load): after [`WanModel::apply_loras`] in [`LoraMode::Merge`], this merges adapters into
    /// a float checkpoint *before* quantising it.
    pub fn quantize_block_linears(&mut self) -> Result<()> {
        for linear in self.blocks.iter_mut().flat_map(WanBlock::linears_mut) {
            *linear = linear.quantized()?;
        }
        Ok(())
    }

    /// Applies `loras` (each at its strength) in place: float tensors merged, int8 block
    /// linears given a run-time low-rank term (see [`crate::lora`]). Every adapter is checked
    /// against the model before anything changes: a target the model does not have (for a
    /// strict adapter) or a shape that does not fit is an [`Error::Lora`] naming the file and
    /// the keys, and leaves the model as it was.
    pub fn apply_loras(&mut self, loras: &[ScaledLora], mode: LoraMode) -> Result<LoraSummary> {
        let summary = crate::lora::apply_loras(self.lora_slots(), loras, mode)?;
        tracing::info!(
            "{} LoRA(s): {} modules merged, {} linears with a run-time low-rank term",
            loras.len(),
            summary.merged,
            summary.low_rank
        );
        Ok(summary)
    }

    /// Sets the adapters of a resident model, replacing those set before: the model starts from
    /// its unadapted values (kept since the first call), so switching adapters or strengths
    /// reads nothing from disk and gives exactly what a fresh load with `loras` applied gives.
    /// An empty `loras` puts the base model back and frees the kept values. Errors as
    /// [`WanModel::apply_loras`]; after one, the model is left without adapters.
    pub fn set_loras(&mut self, loras: &[ScaledLora], mode: LoraMode) -> Result<LoraSummary> {
        let mut unadapted = std::mem::take(&mut self.unadapted);
        unadapted.restore(self.lora_slots());
        unadapted.save_targets(self.lora_slots(), loras);
        self.unadapted = unadapted;
        self.apply_loras(loras, mode)
    }

    /// Whether adapters set by [`WanModel::set_loras`] are active.
    pub fn has_loras(&self) -> bool {
        !self.unadapted.is_empty()
    }

    /// Every tensor a LoRA can change, by checkpoint key (without `.weight` / `.bias`).
    fn lora_slots(&mut self) -> Vec<(String, Slot<'_>)> {
        let mut slots = self.text_embedding.lora_slots();
        slots.extend(self.time_embedding.lora_slots());
        slots.extend(self.head.lora_slots());
        for (i, block) in self.blocks.iter_mut().enumerate() {
            slots.extend(block.lora_slots(&format!("blocks.{i}")));
        }
        slots
    }

    /// One summary line for all block linears (`turbo_quant::Linear` logs each at debug level).
    fn log_linear_precision(&self, stored_int8: usize, quant_linear: QuantPolicy) {
        let total = self.block_linears().count();
        let int8 = self.int8_linears();
        if int8 == 0 {
            tracing::debug!("all {total} block linears in float");
        } else {
            tracing::info!(
                "{int8} of {total} block linears run in W8A8 int8: {stored_int8} stored as int8 \
                 in the checkpoint, {} quantised at load (quant_linear: {quant_linear:?})",
                int8 - stored_int8
            );
        }
    }
}

impl<A: Attention> WanModel<A> {
    pub fn config(&self) -> &WanConfig {
        &self.cfg
    }

    pub fn layout(&self) -> CheckpointLayout {
        self.layout
    }

    /// The self-attention backend of the blocks (`None` for a model without blocks).
    pub fn attention_kind(&self) -> Option<AttentionKind> {
        self.blocks.first().map(|b| b.attention_kind())
    }

    /// Sets the SLA / SageSLA top-k fraction of every block's self-attention for the forwards
    /// that follow (a top-k schedule changes it between denoising steps). Fails with
    /// [`Error::InvalidTopk`] outside (0, 1], before any block is changed. Dense attention
    /// has no top-k and is left as it is.
    pub fn set_attention_topk(&mut self, topk: f64) -> Result<()> {
        AttentionKind::sla(topk)?;
        self.blocks
            .iter_mut()
            .try_for_each(|block| block.set_attention_topk(topk))
    }

    /// The flow-matching velocity for latent `x` `[C, F, H, W]` (C = `out_dim`) at model time `t`
    /// (0..1000), conditioned on `context` `[L_text ≤ text_len, text_dim]` and, for the I2V
    /// experts, on `condition` `[in_dim − C, F, H, W]` (mask and image latent). Returns f32
    /// `[C, F, H, W]`.
    ///
    /// A batched `x` (rank 5), `H` or `W` not even, `t` outside `[0, 1000]` (or not finite), or
    /// a context of another width or longer than `text_len` is a typed error naming the input
    /// ([`Error::Shape`], [`Error::OutOfRange`]).
    pub fn forward(
        &self,
        x: &Tensor,
        t: f64,
        context: &Tensor,
        condition: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.check_forward_inputs(x, t, context)?;
        let (_, frames, height, width) = x.dims4()?;
        let input = self.model_input(x, condition)?;
        let (pt, ph, pw) = PATCH_SIZE;
        let grid = (frames / pt, height / ph, width / pw);
        let tokens = self.patch_embedding.forward(&input)?.to_dtype(DType::F32)?;
        let (e, e0) = self.time_embedding.forward(t, x.device())?;
        let context = self.text_embedding.forward(context)?;
        let rope = Rope3d::new(grid, self.cfg.head_dim(), x.device())?;
        let hidden = self
            .blocks
            .iter()
            .try_fold(tokens, |h, block| block.forward(&h, &e0, &context, &rope))?;
        self.unpatchify(&self.head.forward(&hidden, &e)?, grid)
    }

    /// The contract of [`WanModel::forward`], checked before any work.
    fn check_forward_inputs(&self, x: &Tensor, t: f64, context: &Tensor) -> Result<()> {
        let (_, ph, pw) = PATCH_SIZE;
        let unbatched = match x.dims() {
            &[_, _, h, w] => h % ph == 0 && w % pw == 0 && h > 0 && w > 0,
            _ => false,
        };
        if !unbatched {
            return Err(Error::Shape {
                what: "DiT input latent `x` (one unbatched latent; H and W even)".into(),
                expected: format!("[{}, F, H, W]", self.cfg.out_dim),
                got: x.dims().to_vec(),
            });
        }
        if !(0.0..=MAX_MODEL_TIME).contains(&t) {
            return Err(Error::OutOfRange {
                what: "DiT timestep `t`".into(),
                value: t.to_string(),
                expected: format!("model time in [0, {MAX_MODEL_TIME}] (1000 · s)"),
            });
        }
        match context.dims() {
            &[len, dim] if (1..=self.cfg.text_len).contains(&len) && dim == self.cfg.text_dim => {
                Ok(())
            }
            got => Err(Error::Shape {
                what: "DiT text context".into(),
                expected: format!("[1..={}, {}]", self.cfg.text_len, self.cfg.text_dim),
                got: got.to_vec(),
            }),
        }
    }

    /// `x` alone for T2V, `cat[x, condition]` on channels for I2V.
    fn model_input(&self, x: &Tensor, condition: Option<&Tensor>) -> Result<Tensor> {
        let (c, f, h, w) = x.dims4()?;
        if c != self.cfg.out_dim {
            return Err(Error::Shape {
                what: "DiT input latent `x`".into(),
                expected: format!("[{}, F, H, W]", self.cfg.out_dim),
                got: x.dims().to_vec(),
            });
        }
        match (self.cfg.model_type, condition) {
            (ModelType::T2v, None) => Ok(x.clone()),
            (ModelType::I2v, Some(y)) if y.dims() == [self.cfg.condition_channels(), f, h, w] => {
                Ok(Tensor::cat(&[x, &y.to_dtype(x.dtype())?], 0)?)
            }
            (ModelType::T2v, Some(y)) => Err(Error::Shape {
                what: "I2V condition `y` given to a T2V model".into(),
                expected: "no condition".into(),
                got: y.dims().to_vec(),
            }),
            (ModelType::I2v, y) => Err(Error::Shape {
                what: "I2V condition `y` (mask and image latent)".into(),
                expected: format!("[{}, {f}, {h}, {w}]", self.cfg.condition_channels()),
                got: y.map(|y| y.dims().to_vec()).unwrap_or_default(),
            }),
        }
    }

    /// `[1, L, (kt, kh, kw, c)]` → `[c, F, H, W]`.
    fn unpatchify(&self, patches: &Tensor, grid: (usize, usize, usize)) -> Result<Tensor> {
        let (f, h, w) = grid;
        let (pt, ph, pw) = PATCH_SIZE;
        let c = self.cfg.out_dim;
        Ok(patches
            .reshape(&[f, h, w, pt, ph, pw, c][..])?
            .permute(&[6, 0, 3, 1, 4, 2, 5][..])?
            .reshape((c, f * pt, h * ph, w * pw))?)
    }
}

/// What a Wan DiT is conditioned on: the text encoder's output, and for the I2V experts the
/// mask and image latent.
#[derive(Debug, Clone)]
pub struct DitCondition {
    /// `[L_text ≤ text_len, text_dim]`, trimmed to the real tokens.
    pub context: Tensor,
    /// `[in_dim − out_dim, F, H, W]` for the I2V experts (mask(4) and image latent(16)).
    pub image: Option<Tensor>,
}

impl DitCondition {
    /// A text-only condition.
    pub fn text(context: Tensor) -> Self {
        Self {
            context,
            image: None,
        }
    }
}

impl<A: Attention> Denoiser for WanModel<A> {
    type Condition = DitCondition;

    /// Feeds the network `t.model_time` (the sampler decides its rounding).
    fn velocity(&self, x: &Tensor, t: Timestep, cond: &DitCondition) -> Result<Tensor> {
        self.forward(x, t.model_time, &cond.context, cond.image.as_ref())
    }
}
