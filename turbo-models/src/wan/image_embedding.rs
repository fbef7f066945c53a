//! `img_emb`: the projection of CLIP image tokens into the DiT's width (Wan2.1 I2V / FLF2V,
//! `spec/wan-model.md` §2.2–2.3): LayerNorm → Linear → GELU (erf) → Linear → LayerNorm, with
//! FLF2V's learned position embedding `emb_pos` over the first and last frames' tokens added
//! before it.

use candle_core::{DType, Tensor};
use candle_nn::{Linear, Module, VarBuilder};
use turbo_core::{Error, Result};

use super::block::LayerNorm;
use super::config::CLIP_DIM;
use super::{linear, ModelType, WanConfig};
use crate::lora::Slot;

/// `MLPProj`'s LayerNorms use PyTorch's default eps, not the DiT's 1e-6.
const IMAGE_NORM_EPS: f64 = 1e-5;

/// `img_emb` (`proj.0` … `proj.4`, and `emb_pos` for FLF2V).
#[derive(Debug, Clone)]
pub(crate) struct ImageEmbedding {
    norm_in: LayerNorm,
    proj_in: Linear,
    proj_out: Linear,
    norm_out: LayerNorm,
    /// `[1, N, CLIP_DIM]` f32 (FLF2V): added to the tokens of both frames, concatenated.
    emb_pos: Option<Tensor>,
}

impl ImageEmbedding {
    /// `vb` is `img_emb`, in the compute dtype (the LayerNorms and `emb_pos` are held in f32).
    ///
    /// `emb_pos`'s token count is read from the file (`2 · 257` in the release): it is the
    /// number of CLIP tokens an FLF2V model takes, and [`ImageEmbedding::forward`] checks it.
    pub(crate) fn load(vb: VarBuilder, cfg: &WanConfig) -> Result<Self> {
        let proj = vb.pp("proj");
        let emb_pos = match cfg.model_type {
            ModelType::Flf2v => {
                let pos = vb.to_dtype(DType::F32).get_unchecked("emb_pos")?;
                match pos.dims() {
                    &[1, tokens, CLIP_DIM] if tokens > 0 && tokens % 2 == 0 => Some(pos),
                    dims => {
                        return Err(Error::Shape {
                            what: "checkpoint key `img_emb.emb_pos`".into(),
                            expected: format!("[1, 2·N, {CLIP_DIM}] (first and last frame)"),
                            got: dims.to_vec(),
                        })
                    }
                }
            }
            _ => None,
        };
        Ok(Self {
            norm_in: LayerNorm::affine(proj.pp("0"), CLIP_DIM, IMAGE_NORM_EPS)?,
            proj_in: linear(proj.pp("1"), CLIP_DIM, CLIP_DIM)?,
            proj_out: linear(proj.pp("3"), CLIP_DIM, cfg.dim)?,
            norm_out: LayerNorm::affine(proj.pp("4"), cfg.dim, IMAGE_NORM_EPS)?,
            emb_pos,
        })
    }

    /// The linears a LoRA can change, by checkpoint key.
    pub(crate) fn lora_slots(&mut self) -> Vec<(String, Slot<'_>)> {
        vec![
            ("img_emb.proj.1".into(), Slot::Plain(&mut self.proj_in)),
            ("img_emb.proj.3".into(), Slot::Plain(&mut self.proj_out)),
        ]
    }

    /// CLIP tokens `[.., N, CLIP_DIM]` (`[N, C]`, `[1, N, C]`, or for FLF2V the two frames as
    /// `[2, 257, C]`, read in order as one sequence as upstream's `view` does) → `[1, N, D]` in
    /// `out_dtype`.
    pub(crate) fn forward(&self, clip: &Tensor, out_dtype: DType) -> Result<Tensor> {
        let tokens = match clip.dims() {
            &[n, CLIP_DIM] | &[1, n, CLIP_DIM] => n,
            &[frames, n, CLIP_DIM] => frames * n,
            _ => 0,
        };
        let expected_tokens = self.emb_pos.as_ref().map(|pos| pos.dim(1)).transpose()?;
        if tokens == 0 || expected_tokens.is_some_and(|n| n != tokens) {
            return Err(Error::Shape {
                what: "CLIP image tokens".into(),
                expected: match expected_tokens {
                    Some(n) => format!("[2, {}, {CLIP_DIM}] (first and last frame)", n / 2),
                    None => format!("[1, N, {CLIP_DIM}]"),
                },
                got: clip.dims().to_vec(),
            });
        }
        let mut tokens = clip.to_dtype(DType::F32)?.reshape((1, tokens, CLIP_DIM))?;
        if let Some(pos) = &self.emb_pos {
            tokens = tokens.broadcast_add(pos)?;
        }
        let compute = self.proj_in.weight().dtype();
        let hidden = self
            .proj_in
            .forward(&self.norm_in.forward(&tokens, compute)?)?
            .gelu_erf()?;
        let embedded = self.proj_out.forward(&hidden)?.to_dtype(DType::F32)?;
        self.norm_out.forward(&embedded, out_dtype)
    }
}
