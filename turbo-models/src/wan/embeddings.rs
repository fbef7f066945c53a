//! The DiT's input embeddings: patches, timestep and text.

use candle_core::{Device, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

use crate::lora::Slot;
use turbo_core::{Error, Result, PATCH_SIZE};

use super::{linear, WanConfig};

/// Elements of one patch per input channel: 1 · 2 · 2.
pub(crate) const PATCH_VOLUME: usize = PATCH_SIZE.0 * PATCH_SIZE.1 * PATCH_SIZE.2;

/// `patch_embedding`: a Conv3d with kernel = stride = (1, 2, 2), applied as a Linear over
/// flattened patches.
///
/// Both checkpoint layouts load here: the official Conv3d weight `[D, C, 1, 2, 2]` flattened in
/// (c, kt, kh, kw) order is exactly TurboDiffusion's 2-D `[D, C·4]`.
#[derive(Debug, Clone)]
pub(crate) struct PatchEmbedding {
    proj: Linear,
    in_dim: usize,
}

/// Which checkpoint layout a patch embedding weight came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PatchLayout {
    /// Official Wan: Conv3d `[D, C, 1, 2, 2]`.
    Conv3d,
    /// TurboDiffusion release: Linear `[D, C·4]`.
    Linear,
}

impl PatchEmbedding {
    pub(crate) fn load(vb: VarBuilder, cfg: &WanConfig) -> Result<(Self, PatchLayout)> {
        let weight = vb.get_unchecked("weight")?;
        let (pt, ph, pw) = PATCH_SIZE;
        let layout = match weight.dims() {
            [d, c, t, h, w] if (*d, *c, *t, *h, *w) == (cfg.dim, cfg.in_dim, pt, ph, pw) => {
                PatchLayout::Conv3d
            }
            [d, k] if (*d, *k) == (cfg.dim, cfg.in_dim * PATCH_VOLUME) => PatchLayout::Linear,
            dims => {
                return Err(Error::Shape {
                    what: "checkpoint key `patch_embedding.weight`".into(),
                    expected: format!(
                        "[{d}, {c}, {pt}, {ph}, {pw}] (official) or [{d}, {k}] (TurboDiffusion)",
                        d = cfg.dim,
                        c = cfg.in_dim,
                        k = cfg.in_dim * PATCH_VOLUME
                    ),
                    got: dims.to_vec(),
                })
            }
        };
        let weight = weight.reshape((cfg.dim, cfg.in_dim * PATCH_VOLUME))?;
        let bias = vb.get(cfg.dim, "bias")?;
        let proj = Linear::new(weight, Some(bias));
        Ok((
            Self {
                proj,
                in_dim: cfg.in_dim,
            },
            layout,
        ))
    }

    /// `[C, F, H, W]` → tokens `[1, F·(H/2)·(W/2), D]` in (f, h, w) order.
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (c, f, h, w) = x.dims4()?;
        let (pt, ph, pw) = PATCH_SIZE;
        if c != self.in_dim || f % pt != 0 || h % ph != 0 || w % pw != 0 {
            return Err(Error::Shape {
                what: "DiT input latent".into(),
                expected: format!("[{}, F, H, W] with H and W even", self.in_dim),
                got: x.dims().to_vec(),
            });
        }
        let (gf, gh, gw) = (f / pt, h / ph, w / pw);
        let patches = x
            .reshape(&[c, gf, pt, gh, ph, gw, pw][..])?
            .permute(&[1, 3, 5, 0, 2, 4, 6][..])?
            .reshape((1, gf * gh * gw, c * PATCH_VOLUME))?;
        Ok(self
            .proj
            .forward(&patches.to_dtype(self.proj.weight().dtype())?)?)
    }
}

/// `[cos(t·ω), sin(t·ω)]` with ω_j = 10000^(−j/half), computed in f64 and returned as f32
/// `[1, dim]` (cosine first).
pub(crate) fn sinusoidal_embedding(t: f64, dim: usize, device: &Device) -> Result<Tensor> {
    let half = dim / 2;
    let angles: Vec<f64> = (0..half)
        .map(|j| t * 10000f64.powf(-(j as f64) / half as f64))
        .collect();
    let values: Vec<f32> = angles
        .iter()
        .map(|a| a.cos() as f32)
        .chain(angles.iter().map(|a| a.sin() as f32))
        .collect();
    Ok(Tensor::from_vec(values, (1, dim), device)?)
}

/// `time_embedding` (Linear → SiLU → Linear) and `time_projection` (SiLU → Linear to 6·D), in f32.
#[derive(Debug, Clone)]
pub(crate) struct TimeEmbedding {
    embedding_in: Linear,
    embedding_out: Linear,
    projection: Linear,
    freq_dim: usize,
    dim: usize,
}

impl TimeEmbedding {
    /// The linears a LoRA can change, by checkpoint key.
    pub(crate) fn lora_slots(&mut self) -> Vec<(String, Slot<'_>)> {
        vec![
            (
                "time_embedding.0".into(),
                Slot::Plain(&mut self.embedding_in),
            ),
            (
                "time_embedding.2".into(),
                Slot::Plain(&mut self.embedding_out),
            ),
            (
                "time_projection.1".into(),
                Slot::Plain(&mut self.projection),
            ),
        ]
    }

    /// `vb` is the model root, in f32.
    pub(crate) fn load(vb: VarBuilder, cfg: &WanConfig) -> Result<Self> {
        Ok(Self {
            embedding_in: linear(vb.pp("time_embedding.0"), cfg.freq_dim, cfg.dim)?,
            embedding_out: linear(vb.pp("time_embedding.2"), cfg.dim, cfg.dim)?,
            projection: linear(vb.pp("time_projection.1"), cfg.dim, 6 * cfg.dim)?,
            freq_dim: cfg.freq_dim,
            dim: cfg.dim,
        })
    }

    /// The time embedding `e` `[1, D]` (the head's modulation input) and the block modulation
    /// input `e0` `[1, 6, D]`, both f32, for model time `t` (0..1000).
    pub(crate) fn forward(&self, t: f64, device: &Device) -> Result<(Tensor, Tensor)> {
        let sinusoid = sinusoidal_embedding(t, self.freq_dim, device)?;
        let hidden = candle_nn::ops::silu(&self.embedding_in.forward(&sinusoid)?)?;
        let e = self.embedding_out.forward(&hidden)?;
        let e0 = self
            .projection
            .forward(&candle_nn::ops::silu(&e)?)?
            .reshape((1, 6, self.dim))?;
        Ok((e, e0))
    }
}

/// `text_embedding`: Linear → GELU(tanh) → Linear over the context zero-padded to `text_len`.
#[derive(Debug, Clone)]
pub(crate) struct TextEmbedding {
    proj_in: Linear,
    proj_out: Linear,
    text_len: usize,
    text_dim: usize,
}

impl TextEmbedding {
    /// The linears a LoRA can change, by checkpoint key.
    pub(crate) fn lora_slots(&mut self) -> Vec<(String, Slot<'_>)> {
        vec![
            ("text_embedding.0".into(), Slot::Plain(&mut self.proj_in)),
            ("text_embedding.2".into(), Slot::Plain(&mut self.proj_out)),
        ]
    }

    pub(crate) fn load(vb: VarBuilder, cfg: &WanConfig) -> Result<Self> {
        Ok(Self {
            proj_in: linear(vb.pp("0"), cfg.text_dim, cfg.dim)?,
            proj_out: linear(vb.pp("2"), cfg.dim, cfg.dim)?,
            text_len: cfg.text_len,
            text_dim: cfg.text_dim,
        })
    }

    /// `[L_text, text_dim]` (the encoder output trimmed to its real tokens) → `[1, text_len, D]`.
    /// The padded rows are embedded and attended like real ones, never masked, as upstream does.
    pub(crate) fn forward(&self, context: &Tensor) -> Result<Tensor> {
        let (len, width) = context.dims2().map_err(|_| self.shape_error(context))?;
        if len > self.text_len || width != self.text_dim {
            return Err(self.shape_error(context));
        }
        let padded = context
            .to_dtype(self.proj_in.weight().dtype())?
            .pad_with_zeros(0, 0, self.text_len - len)?
            .unsqueeze(0)?;
        let hidden = self.proj_in.forward(&padded)?.gelu()?;
        Ok(self.proj_out.forward(&hidden)?)
    }

    fn shape_error(&self, context: &Tensor) -> Error {
        Error::Shape {
            what: "text context".into(),
            expected: format!("[L ≤ {}, {}]", self.text_len, self.text_dim),
            got: context.dims().to_vec(),
        }
    }
}
