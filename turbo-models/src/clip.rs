//! The CLIP ViT image encoder of Wan2.1 I2V / FLF2V (the `visual.*` half of
//! `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`; `spec/wan-model.md` §8).
//!
//! A pre-norm ViT: patch convolution (no bias), a class token, learned positions, a LayerNorm
//! before the blocks, then attention + MLP blocks. Wan keeps every token after the
//! second-to-last block: the last block, `post_norm` and `head` are in the checkpoint but unused
//! (they are still read, so a file of the wrong shape is refused). LayerNorm and softmax run in
//! f32 whatever the weight dtype.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, Linear, Module, VarBuilder};
use turbo_attention::DenseAttention;
use turbo_core::{Attention, Error, Result};

use crate::checkpoint::Checkpoint;

/// Where the vision encoder's tensors sit in the released CLIP checkpoint (beside the text
/// encoder's `textual.*`).
const VISUAL_PREFIX: &str = "visual.";

/// The MLP activation of the blocks (`activation` upstream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipActivation {
    /// Exact (erf) GELU, `nn.GELU()`: what the released ViT-H/14 uses.
    Gelu,
    /// `x·sigmoid(1.702x)`, the original OpenAI CLIP activation.
    QuickGelu,
}

/// The construction parameters of the vision tower (`VisionTransformer` upstream) and its
/// preprocessing constants.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    /// Side of the square input the model sees; images are resized to it.
    pub image_size: usize,
    pub patch_size: usize,
    /// Token width.
    pub dim: usize,
    /// MLP hidden width = `dim · mlp_ratio`.
    pub mlp_ratio: usize,
    /// Width of the (unused) projection head.
    pub out_dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub activation: ClipActivation,
    pub norm_eps: f64,
    /// Per-channel normalisation of the [0, 1] image.
    pub mean: [f64; 3],
    pub std: [f64; 3],
}

impl ClipConfig {
    /// From a JSON config with upstream's `VisionTransformer` arguments (`image_size`,
    /// `patch_size`, `dim`, `mlp_ratio`, `out_dim`, `num_heads`, `num_layers`, `activation`,
    /// `norm_eps`, `mean`, `std`); the tower must be the released kind (class-token pooling,
    /// pre-norm, no post-norm), else an error naming the field.
    pub fn from_value(value: &serde_json::Value) -> Result<Self> {
        let fields = crate::config_fields::ConfigFields(value);
        let require = |field: &str, ok: bool, expected: &str| {
            ok.then_some(()).ok_or_else(|| Error::InvalidConfig {
                field: field.into(),
                reason: format!("only {expected} is implemented"),
            })
        };
        require(
            "pool_type",
            fields.str("pool_type")? == "token",
            "\"token\"",
        )?;
        require("pre_norm", fields.bool("pre_norm")?, "true")?;
        require("post_norm", !fields.bool("post_norm")?, "false")?;
        let activation = match fields.str("activation")? {
            "gelu" => ClipActivation::Gelu,
            "quick_gelu" => ClipActivation::QuickGelu,
            other => {
                return Err(Error::InvalidConfig {
                    field: "activation".into(),
                    reason: format!("{other:?}: expected \"gelu\" or \"quick_gelu\""),
                })
            }
        };
        Ok(Self {
            image_size: fields.usize("image_size")?,
            patch_size: fields.usize("patch_size")?,
            dim: fields.usize("dim")?,
            mlp_ratio: fields.usize("mlp_ratio")?,
            out_dim: fields.usize("out_dim")?,
            num_heads: fields.usize("num_heads")?,
            num_layers: fields.usize("num_layers")?,
            activation,
            norm_eps: fields.f64("norm_eps")?,
            mean: fields.rgb("mean")?,
            std: fields.rgb("std")?,
        })
    }

    /// The released open-clip XLM-RoBERTa-large ViT-H/14 vision tower.
    pub fn vit_h14() -> Self {
        Self {
            image_size: 224,
            patch_size: 14,
            dim: 1280,
            mlp_ratio: 4,
            out_dim: 1024,
            num_heads: 16,
            num_layers: 32,
            activation: ClipActivation::Gelu,
            norm_eps: 1e-5,
            mean: [0.48145466, 0.4578275, 0.40821073],
            std: [0.26862954, 0.26130258, 0.27577711],
        }
    }

    /// Patches along one side of the resized image.
    pub fn grid(&self) -> usize {
        self.image_size / self.patch_size
    }

    /// Tokens of the output: the class token and one per patch.
    pub fn num_tokens(&self) -> usize {
        1 + self.grid() * self.grid()
    }

    /// Refuses a configuration the model cannot be built from.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: &str| {
            Err(Error::InvalidConfig {
                field: field.into(),
                reason: reason.into(),
            })
        };
        if self.patch_size == 0 || self.image_size < self.patch_size {
            return invalid("patch_size", "must be positive and at most image_size");
        }
        if self.num_heads == 0 || self.dim % self.num_heads != 0 {
            return invalid("num_heads", "must be positive and divide dim");
        }
        // Wan drops the last block, so there must be one to drop.
        if self.num_layers == 0 {
            return invalid("num_layers", "must be at least 1");
        }
        if self.mlp_ratio == 0 || self.out_dim == 0 {
            return invalid("mlp_ratio", "mlp_ratio and out_dim must be positive");
        }
        if self.std.iter().any(|s| *s == 0.0 || !s.is_finite()) {
            return invalid("std", "every channel's std must be finite and non-zero");
        }
        Ok(())
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Ok(Linear::new(weight, Some(bias)))
}

/// LayerNorm with weight and bias, computed in f32 whatever the weight dtype (upstream's
/// `LayerNorm` subclass does the same for half-precision runs).
#[derive(Debug, Clone)]
struct ClipNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl ClipNorm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?.to_dtype(DType::F32)?,
            bias: vb.get(dim, "bias")?.to_dtype(DType::F32)?,
            eps: eps as f32,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let normed = candle_nn::ops::layer_norm(&xf, &self.weight, &self.bias, self.eps)?;
        Ok(normed.to_dtype(x.dtype())?)
    }
}

fn norm_keys(prefix: &str, dim: usize) -> Vec<(String, Vec<usize>)> {
    vec![
        (format!("{prefix}.weight"), vec![dim]),
        (format!("{prefix}.bias"), vec![dim]),
    ]
}

fn linear_keys(prefix: &str, in_dim: usize, out_dim: usize) -> Vec<(String, Vec<usize>)> {
    vec![
        (format!("{prefix}.weight"), vec![out_dim, in_dim]),
        (format!("{prefix}.bias"), vec![out_dim]),
    ]
}

/// One pre-norm block: `x + attn(norm1(x))`, then `x + mlp(norm2(x))`.
#[derive(Debug, Clone)]
struct ClipBlock {
    norm1: ClipNorm,
    to_qkv: Linear,
    proj: Linear,
    norm2: ClipNorm,
    fc1: Linear,
    fc2: Linear,
    num_heads: usize,
    activation: ClipActivation,
}

impl ClipBlock {
    fn load(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        let (dim, hidden) = (cfg.dim, cfg.dim * cfg.mlp_ratio);
        let attn = vb.pp("attn");
        let mlp = vb.pp("mlp");
        Ok(Self {
            norm1: ClipNorm::load(vb.pp("norm1"), dim, cfg.norm_eps)?,
            to_qkv: linear(attn.pp("to_qkv"), dim, 3 * dim)?,
            proj: linear(attn.pp("proj"), dim, dim)?,
            norm2: ClipNorm::load(vb.pp("norm2"), dim, cfg.norm_eps)?,
            // `mlp` is an `nn.Sequential`: 0 = Linear, 1 = activation, 2 = Linear.
            fc1: linear(mlp.pp("0"), dim, hidden)?,
            fc2: linear(mlp.pp("2"), hidden, dim)?,
            num_heads: cfg.num_heads,
            activation: cfg.activation,
        })
    }

    fn keys(prefix: &str, cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
        let (dim, hidden) = (cfg.dim, cfg.dim * cfg.mlp_ratio);
        let mut keys = norm_keys(&format!("{prefix}.norm1"), dim);
        keys.extend(linear_keys(&format!("{prefix}.attn.to_qkv"), dim, 3 * dim));
        keys.extend(linear_keys(&format!("{prefix}.attn.proj"), dim, dim));
        keys.extend(norm_keys(&format!("{prefix}.norm2"), dim));
        keys.extend(linear_keys(&format!("{prefix}.mlp.0"), dim, hidden));
        keys.extend(linear_keys(&format!("{prefix}.mlp.2"), hidden, dim));
        keys
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let x = (x + self.attention(&self.norm1.forward(x)?)?)?;
        let x = (&x + self.mlp(&self.norm2.forward(&x)?)?)?;
        Ok(x)
    }

    /// Full bidirectional attention (the project's dense operator: `softmax(q·kᵀ/√d)·v` in
    /// f32); `to_qkv`'s output is q | k | v, each split into heads.
    fn attention(&self, x: &Tensor) -> Result<Tensor> {
        let (batch, len, dim) = x.dims3()?;
        let qkv = self.to_qkv.forward(x)?.reshape((
            batch,
            len,
            3,
            self.num_heads,
            dim / self.num_heads,
        ))?;
        let part =
            |i: usize| -> Result<Tensor> { Ok(qkv.narrow(2, i, 1)?.squeeze(2)?.contiguous()?) };
        let out = DenseAttention::default().forward(&part(0)?, &part(1)?, &part(2)?)?;
        Ok(self.proj.forward(&out.reshape((batch, len, dim))?)?)
    }

    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let h = match self.activation {
            ClipActivation::Gelu => h.gelu_erf()?,
            ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
        };
        Ok(self.fc2.forward(&h)?)
    }
}

/// The CLIP vision tower as Wan uses it: image in, every token of the second-to-last block out.
#[derive(Debug, Clone)]
pub struct ClipVisionEncoder {
    cfg: ClipConfig,
    patch_embedding: Conv2d,
    /// `[1, 1, dim]`.
    cls_embedding: Tensor,
    /// `[1, 1 + patches, dim]`.
    pos_embedding: Tensor,
    pre_norm: ClipNorm,
    /// Only the blocks Wan runs: all but the last.
    blocks: Vec<ClipBlock>,
}

impl ClipVisionEncoder {
    /// Loads the weights under `vb` by the released checkpoint's names (`visual.*`). The model
    /// runs in `vb`'s dtype.
    pub fn load(vb: VarBuilder, cfg: &ClipConfig) -> Result<Self> {
        cfg.validate()?;
        let vb = vb.pp("visual");
        let (dim, p) = (cfg.dim, cfg.patch_size);
        let conv = Conv2dConfig {
            stride: p,
            ..Default::default()
        };
        let patch_weight = vb.pp("patch_embedding").get((dim, 3, p, p), "weight")?;
        // Read, unused: a checkpoint whose head or post-norm has the wrong shape is not ours.
        vb.get((dim, cfg.out_dim), "head")?;
        ClipNorm::load(vb.pp("post_norm"), dim, cfg.norm_eps)?;
        let transformer = vb.pp("transformer");
        // The last block is read for the same reason, but not kept.
        ClipBlock::load(transformer.pp(cfg.num_layers - 1), cfg)?;
        let blocks = (0..cfg.num_layers - 1)
            .map(|i| ClipBlock::load(transformer.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            patch_embedding: Conv2d::new(patch_weight, None, conv),
            cls_embedding: vb.get((1, 1, dim), "cls_embedding")?,
            pos_embedding: vb.get((1, cfg.num_tokens(), dim), "pos_embedding")?,
            pre_norm: ClipNorm::load(vb.pp("pre_norm"), dim, cfg.norm_eps)?,
            blocks,
            cfg: cfg.clone(),
        })
    }

    /// Opens a checkpoint (any container [`Checkpoint::open`] reads: the released
    /// `models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`, or a conversion), checks that
    /// its `visual.*` tensors are exactly those of `cfg` (the text encoder's `textual.*` and
    /// `log_scale`, which Wan does not use, are neither checked nor read), and loads the vision
    /// encoder to compute in `dtype` on `device`. Only the visual tensors are read.
    pub fn from_checkpoint(
        path: impl AsRef<std::path::Path>,
        cfg: &ClipConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        checkpoint.expect_keys_under(VISUAL_PREFIX, &Self::expected_keys(cfg))?;
        Self::load(checkpoint.var_builder(dtype, device)?, cfg)
    }

    /// Every `visual.*` tensor of the checkpoint, with its shape, in module order.
    pub fn expected_keys(cfg: &ClipConfig) -> Vec<(String, Vec<usize>)> {
        let (dim, p) = (cfg.dim, cfg.patch_size);
        let mut keys = vec![
            (
                "visual.patch_embedding.weight".to_owned(),
                vec![dim, 3, p, p],
            ),
            ("visual.cls_embedding".to_owned(), vec![1, 1, dim]),
            (
                "visual.pos_embedding".to_owned(),
                vec![1, cfg.num_tokens(), dim],
            ),
        ];
        keys.extend(norm_keys("visual.pre_norm", dim));
        for i in 0..cfg.num_layers {
            keys.extend(ClipBlock::keys(&format!("visual.transformer.{i}"), cfg));
        }
        keys.extend(norm_keys("visual.post_norm", dim));
        keys.push(("visual.head".to_owned(), vec![dim, cfg.out_dim]));
        keys
    }

    /// The configuration the encoder was built with.
    pub fn config(&self) -> &ClipConfig {
        &self.cfg
    }

    /// Features of already preprocessed pixels `[B, 3, S, S]` (S = `image_size`, normalised
    /// with the CLIP mean/std): `[B, 1 + patches, dim]`.
    pub fn forward_preprocessed(&self, pixels: &Tensor) -> Result<Tensor> {
        let size = self.cfg.image_size;
        match pixels.dims() {
            &[_, 3, h, w] if h == size && w == size => {}
            other => {
                return Err(Error::Shape {
                    what: "CLIP pixels".into(),
                    expected: format!("[batch, 3, {size}, {size}]"),
                    got: other.to_vec(),
                })
            }
        }
        let batch = pixels.dim(0)?;
        let dtype = self.cls_embedding.dtype();
        let patches = self
            .patch_embedding
            .forward(&pixels.to_dtype(dtype)?)?
            .flatten_from(2)?
            .transpose(1, 2)?;
        let cls = self.cls_embedding.expand((batch, 1, self.cfg.dim))?;
        let tokens = Tensor::cat(&[&cls, &patches], 1)?.broadcast_add(&self.pos_embedding)?;
        let mut x = self.pre_norm.forward(&tokens)?;
        for block in &self.blocks {
            x = block.forward(&x)?;
        }
        Ok(x)
    }

    /// Features of one image `[3, H, W]` in [-1, 1], any size: `[1, 1 + patches, dim]`. Resized
    /// as Wan does (bicubic, align_corners false, no antialias), mapped to [0, 1], normalised.
    pub fn encode_image(&self, image: &Tensor) -> Result<Tensor> {
        let (channels, height, width) = match image.dims() {
            &[c, h, w] if c == 3 && h > 0 && w > 0 => (c, h, w),
            other => {
                return Err(Error::Shape {
                    what: "CLIP image".into(),
                    expected: "[3, H, W] with H, W > 0".into(),
                    got: other.to_vec(),
                })
            }
        };
        let size = self.cfg.image_size;
        let pixels: Vec<Vec<Vec<f32>>> = image
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .to_vec3()?;
        let mut data = Vec::with_capacity(channels * size * size);
        for (c, plane) in pixels.iter().enumerate() {
            let resized = bicubic_resize(plane, (height, width), (size, size));
            let (mean, std) = (self.cfg.mean[c], self.cfg.std[c]);
            data.extend(
                resized
                    .into_iter()
                    .map(|v| ((f64::from(v) * 0.5 + 0.5 - mean) / std) as f32),
            );
        }
        let batch = Tensor::from_vec(data, (1, channels, size, size), &Device::Cpu)?
            .to_device(self.cls_embedding.device())?;
        self.forward_preprocessed(&batch)
    }
}

/// PyTorch's cubic convolution weights (A = −0.75) of the four taps around a source position
/// whose fractional part is `t`.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// For each output index: the four clamped source indices and their weights, as
/// `F.interpolate(mode='bicubic', align_corners=False)` computes them (the source coordinate
/// is not clamped; only the taps are).
fn cubic_taps(input: usize, output: usize) -> Vec<([usize; 4], [f64; 4])> {
    let scale = input as f64 / output as f64;
    (0..output)
        .map(|o| {
            let src = scale * (o as f64 + 0.5) - 0.5;
            let floor = src.floor();
            let tap = |k: i64| (floor as i64 + k).clamp(0, input as i64 - 1) as usize;
            (
                [tap(-1), tap(0), tap(1), tap(2)],
                cubic_weights(src - floor),
            )
        })
        .collect()
}

/// Bicubic resize of one `[H][W]` plane to `[out_h · out_w]` (row-major).
fn bicubic_resize(
    plane: &[Vec<f32>],
    (height, width): (usize, usize),
    (out_h, out_w): (usize, usize),
) -> Vec<f32> {
    let rows = cubic_taps(height, out_h);
    let cols = cubic_taps(width, out_w);
    let mut out = Vec::with_capacity(out_h * out_w);
    for (ys, wy) in &rows {
        for (xs, wx) in &cols {
            let mut acc = 0.0;
            for (&y, &w_row) in ys.iter().zip(wy) {
                let line = &plane[y];
                let row: f64 = xs
                    .iter()
                    .zip(wx)
                    .map(|(&x, &w)| f64::from(line[x]) * w)
                    .sum();
                acc += w_row * row;
            }
            out.push(acc as f32);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resize_to_the_same_size_is_the_identity() {
        let plane = vec![vec![0.0f32, 1.0, 2.0], vec![3.0, 4.0, 5.0]];
        let out = bicubic_resize(&plane, (2, 3), (2, 3));
        assert_eq!(out, vec![0.0, 1.0, 2.0, 3.0, 4.0, 5.0]);
    }

    #[test]
    fn cubic_weights_sum_to_one() {
        for t in [0.0, 0.25, 0.5, 0.9] {
            let sum: f64 = cubic_weights(t).iter().sum();
            assert!((sum - 1.0).abs() < 1e-12);
        }
    }

    #[test]
    fn released_config_is_valid() {
        let cfg = ClipConfig::vit_h14();
        cfg.validate().unwrap();
        assert_eq!(cfg.num_tokens(), 257);
        let bad = ClipConfig {
            num_heads: 7,
            ..cfg
        };
        assert!(matches!(bad.validate(), Err(Error::InvalidConfig { .. })));
    }
}
