//! The umT5-XXL text encoder (`models_t5_umt5-xxl-enc-bf16.pth`; `spec/wan-model.md` §7).
//!
//! A T5 encoder with the umT5 property that every layer has its own relative-position bias
//! table. Attention scores are not scaled by 1/√d, the feed-forward is gated GELU (tanh), and
//! the norms are T5 RMS norms (no mean, no bias). Norms and softmax are computed in f32 whatever
//! the weight dtype; everything else runs in the dtype the weights were loaded in.

use std::sync::Arc;

use crate::checkpoint::Checkpoint;
use crate::tokenizer::TokenizedPrompt;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::ops::softmax_last_dim;
use candle_nn::{Embedding, Linear, Module, VarBuilder};
use turbo_core::{Error, Result};

/// The construction parameters of a umT5 encoder (`T5Encoder` upstream).
#[derive(Debug, Clone, PartialEq)]
pub struct Umt5Config {
    /// Token vocabulary size.
    pub vocab: usize,
    /// Model width.
    pub dim: usize,
    /// Width of q, k, v (heads × head dim).
    pub dim_attn: usize,
    /// Hidden width of the gated feed-forward.
    pub dim_ffn: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Encoder layers.
    pub num_layers: usize,
    /// Relative-position buckets (half for each direction).
    pub num_buckets: usize,
    /// Distances at or beyond this share the last bucket.
    pub max_distance: usize,
    /// RMS-norm epsilon.
    pub eps: f64,
}

impl Umt5Config {
    /// umT5-XXL as Wan uses it.
    pub fn umt5_xxl() -> Self {
        Self {
            vocab: 256_384,
            dim: 4096,
            dim_attn: 4096,
            dim_ffn: 10_240,
            num_heads: 64,
            num_layers: 24,
            num_buckets: 32,
            max_distance: 128,
            eps: 1e-6,
        }
    }

    fn head_dim(&self) -> usize {
        self.dim_attn / self.num_heads
    }

    fn validate(&self) -> Result<()> {
        let valid = self.num_heads > 0
            && self.dim_attn % self.num_heads == 0
            && self.num_buckets >= 4
            && self.num_buckets % 4 == 0
            && self.max_distance > self.num_buckets / 4;
        if valid {
            Ok(())
        } else {
            Err(Error::Shape {
                what: "umT5 configuration (dim_attn, num_heads, num_buckets, max_distance)".into(),
                expected: "dim_attn divisible by num_heads, num_buckets a positive multiple of 4, \
                           max_distance above num_buckets / 4"
                    .into(),
                got: vec![
                    self.dim_attn,
                    self.num_heads,
                    self.num_buckets,
                    self.max_distance,
                ],
            })
        }
    }
}

/// The bucket of a relative position `key − query` (bidirectional T5 bucketing): half the
/// buckets per direction, exact below a quarter of the buckets, logarithmic up to
/// `max_distance`. Computed in f32 as upstream does.
pub fn relative_position_bucket(relative: i64, num_buckets: usize, max_distance: usize) -> usize {
    let half = (num_buckets / 2) as i64;
    let exact = half / 2;
    let direction = if relative > 0 { half } else { 0 };
    let distance = relative.abs();
    if distance < exact {
        return (direction + distance) as usize;
    }
    let log_ratio =
        (distance as f32 / exact as f32).ln() / ((max_distance as f64 / exact as f64).ln() as f32);
    let large = exact + (log_ratio * (half - exact) as f32) as i64;
    (direction + large.min(half - 1)) as usize
}

/// The `[L, L]` bucket indices of a sequence of length `len`.
fn bucket_table(len: usize, cfg: &Umt5Config, device: &Device) -> Result<Tensor> {
    let buckets: Vec<u32> = (0..len as i64)
        .flat_map(|q| {
            (0..len as i64).map(move |k| {
                relative_position_bucket(k - q, cfg.num_buckets, cfg.max_distance) as u32
            })
        })
        .collect();
    Ok(Tensor::from_vec(buckets, (len, len), device)?)
}

/// T5 RMS norm: `x · rsqrt(mean(x²) + eps) · w`, in f32.
#[derive(Debug, Clone)]
struct T5Norm {
    weight: Tensor,
    eps: f64,
}

impl T5Norm {
    fn load(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?.to_dtype(DType::F32)?,
            eps,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let xf = x.to_dtype(DType::F32)?;
        let rms = (xf.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?;
        Ok(xf
            .broadcast_div(&rms)?
            .broadcast_mul(&self.weight)?
            .to_dtype(x.dtype())?)
    }
}

fn linear(vb: VarBuilder, in_dim: usize, out_dim: usize) -> Result<Linear> {
    Ok(Linear::new(vb.get((out_dim, in_dim), "weight")?, None))
}

/// One encoder layer: self-attention with this layer's own relative bias, then the gated FFN.
#[derive(Debug, Clone)]
struct Umt5Block {
    norm1: T5Norm,
    q: Linear,
    k: Linear,
    v: Linear,
    o: Linear,
    /// `[num_buckets, num_heads]`.
    position_bias: Embedding,
    norm2: T5Norm,
    gate: Linear,
    fc1: Linear,
    fc2: Linear,
}

impl Umt5Block {
    fn load(vb: VarBuilder, cfg: &Umt5Config) -> Result<Self> {
        let attn = vb.pp("attn");
        let ffn = vb.pp("ffn");
        let table = vb
            .pp("pos_embedding")
            .pp("embedding")
            .get((cfg.num_buckets, cfg.num_heads), "weight")?;
        Ok(Self {
            norm1: T5Norm::load(vb.pp("norm1"), cfg.dim, cfg.eps)?,
            q: linear(attn.pp("q"), cfg.dim, cfg.dim_attn)?,
            k: linear(attn.pp("k"), cfg.dim, cfg.dim_attn)?,
            v: linear(attn.pp("v"), cfg.dim, cfg.dim_attn)?,
            o: linear(attn.pp("o"), cfg.dim_attn, cfg.dim)?,
            position_bias: Embedding::new(table, cfg.num_heads),
            norm2: T5Norm::load(vb.pp("norm2"), cfg.dim, cfg.eps)?,
            gate: linear(ffn.pp("gate").pp("0"), cfg.dim, cfg.dim_ffn)?,
            fc1: linear(ffn.pp("fc1"), cfg.dim, cfg.dim_ffn)?,
            fc2: linear(ffn.pp("fc2"), cfg.dim_ffn, cfg.dim)?,
        })
    }

    fn keys(prefix: &str, cfg: &Umt5Config) -> Vec<(String, Vec<usize>)> {
        let (dim, attn, ffn) = (cfg.dim, cfg.dim_attn, cfg.dim_ffn);
        let key = |name: &str, shape: Vec<usize>| (format!("{prefix}.{name}"), shape);
        vec![
            key("norm1.weight", vec![dim]),
            key("attn.q.weight", vec![attn, dim]),
            key("attn.k.weight", vec![attn, dim]),
            key("attn.v.weight", vec![attn, dim]),
            key("attn.o.weight", vec![dim, attn]),
            key("norm2.weight", vec![dim]),
            key("ffn.gate.0.weight", vec![ffn, dim]),
            key("ffn.fc1.weight", vec![ffn, dim]),
            key("ffn.fc2.weight", vec![dim, ffn]),
            key(
                "pos_embedding.embedding.weight",
                vec![cfg.num_buckets, cfg.num_heads],
            ),
        ]
    }

    /// `x` `[B, L, dim]`; `buckets` `[L, L]`; `padding` `[B, 1, 1, L]` f32, 0 for real keys and
    /// a large negative number for padded ones.
    fn forward(
        &self,
        x: &Tensor,
        buckets: &Tensor,
        padding: &Tensor,
        cfg: &Umt5Config,
    ) -> Result<Tensor> {
        let x = (x + self.attention(&self.norm1.forward(x)?, buckets, padding, cfg)?)?;
        let h = self.norm2.forward(&x)?;
        let gated = self.fc1.forward(&h)?.mul(&self.gate.forward(&h)?.gelu()?)?;
        Ok((&x + self.fc2.forward(&gated)?)?)
    }

    fn attention(
        &self,
        x: &Tensor,
        buckets: &Tensor,
        padding: &Tensor,
        cfg: &Umt5Config,
    ) -> Result<Tensor> {
        let (batch, len, _) = x.dims3()?;
        let heads = |proj: &Linear| -> Result<Tensor> {
            Ok(proj
                .forward(x)?
                .reshape((batch, len, cfg.num_heads, cfg.head_dim()))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (q, k, v) = (heads(&self.q)?, heads(&self.k)?, heads(&self.v)?);
        // `[L, L, H]` → `[1, H, L, L]`.
        let bias = self
            .position_bias
            .forward(buckets)?
            .permute((2, 0, 1))?
            .unsqueeze(0)?
            .to_dtype(DType::F32)?;
        // T5 does not scale the scores by 1/√d.
        let scores = q
            .matmul(&k.t()?)?
            .to_dtype(DType::F32)?
            .broadcast_add(&bias)?
            .broadcast_add(padding)?;
        let weights = softmax_last_dim(&scores)?.to_dtype(v.dtype())?;
        let out = weights
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, len, cfg.dim_attn))?;
        Ok(self.o.forward(&out)?)
    }
}

/// The umT5 encoder: token embedding, the layers, and a final RMS norm.
#[derive(Debug, Clone)]
pub struct Umt5Encoder {
    cfg: Umt5Config,
    token_embedding: Embedding,
    blocks: Vec<Umt5Block>,
    norm: T5Norm,
}

impl Umt5Encoder {
    /// Loads the weights under `vb` by their checkpoint names (`token_embedding`,
    /// `blocks.{i}.*`, `norm`). The model runs in `vb`'s dtype (bf16 for the released file).
    pub fn load(vb: VarBuilder, cfg: &Umt5Config) -> Result<Self> {
        cfg.validate()?;
        let table = vb.get((cfg.vocab, cfg.dim), TOKEN_EMBEDDING_KEY)?;
        let blocks = (0..cfg.num_layers)
            .map(|i| Umt5Block::load(vb.pp("blocks").pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            token_embedding: Embedding::new(table, cfg.dim),
            blocks,
            norm: T5Norm::load(vb.pp("norm"), cfg.dim, cfg.eps)?,
            cfg: cfg.clone(),
        })
    }

    /// Opens a checkpoint (any container [`Checkpoint::open`] reads), checks that it holds
    /// exactly the tensors of `cfg`, and loads it to compute in `dtype` on `device`.
    pub fn from_checkpoint(
        path: impl AsRef<std::path::Path>,
        cfg: &Umt5Config,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let checkpoint = Checkpoint::open(path)?;
        let vb = checkpoint.checked_var_builder(&Self::expected_keys(cfg), dtype, device)?;
        Self::load(vb, cfg)
    }

    /// Every checkpoint tensor the encoder reads, with its shape, in checkpoint order.
    pub fn expected_keys(cfg: &Umt5Config) -> Vec<(String, Vec<usize>)> {
        let mut keys = vec![(TOKEN_EMBEDDING_KEY.to_owned(), vec![cfg.vocab, cfg.dim])];
        for i in 0..cfg.num_layers {
            keys.extend(Umt5Block::keys(&format!("blocks.{i}"), cfg));
        }
        keys.push(("norm.weight".to_owned(), vec![cfg.dim]));
        keys
    }

    /// The configuration the encoder was built with.
    pub fn config(&self) -> &Umt5Config {
        &self.cfg
    }

    /// Hidden states `[B, L, dim]` of token ids `[B, L]` (u32 or i64). `mask` `[B, L]` (any
    /// numeric dtype, 0 for padding) hides padded keys; padded rows are computed but
    /// meaningless.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        let inputs = EncoderInputs::new(ids, mask, &self.cfg, ids.device())?;
        let mut x = self.token_embedding.forward(ids)?;
        for block in &self.blocks {
            x = inputs.run_block(block, &x)?;
        }
        self.norm.forward(&x)
    }

    /// The hidden states `[L, dim]` of one unpadded sequence of ids, as the Wan DiT takes its
    /// text context (trimmed to the real tokens). Identical to the first `L` rows of a padded,
    /// masked run, since relative positions do not depend on the padding.
    pub fn encode_ids(&self, ids: &[u32]) -> Result<Tensor> {
        let device = self.token_embedding.embeddings().device();
        Ok(self
            .forward(&unpadded_ids(ids, device)?, None)?
            .squeeze(0)?)
    }

    /// [`Umt5Encoder::encode_ids`] of a tokenized prompt: the text context `[L, dim]` the
    /// DiT takes, `</s>` included.
    pub fn encode_prompt(&self, prompt: &TokenizedPrompt) -> Result<Tensor> {
        self.encode_ids(&prompt.ids)
    }
}

/// The umT5 encoder that reads its weights as the forward pass reaches them and drops each
/// block after use, so the device holds one block of weights at a time (about 0.4 GB for
/// umT5-XXL in bf16, against 11 GB for the whole model). The token embedding table
/// (`256384 × 4096`) is looked up on the CPU, and only the looked-up rows move to the
/// `VarBuilder`'s device; with [`StreamingUmt5Encoder::with_embedding_rows`] only those rows
/// are read at all. Each forward reads the weights again: with a memory-mapped
/// file that is cheap, and worth it when the encoder runs once per video.
///
/// Same numbers as [`Umt5Encoder`] over the same weights.
#[derive(Clone)]
pub struct StreamingUmt5Encoder<'a> {
    vb: VarBuilder<'a>,
    cfg: Umt5Config,
    embedding_rows: Option<Arc<EmbeddingRows<'a>>>,
}

/// The checkpoint key of umT5's token embedding table, `[vocab, dim]`.
pub const TOKEN_EMBEDDING_KEY: &str = "token_embedding.weight";

/// Rows of the token embedding table for the given ids, `[ids.len(), dim]` on the CPU.
pub type EmbeddingRows<'a> = dyn Fn(&[u32]) -> Result<Tensor> + Send + Sync + 'a;

impl<'a> StreamingUmt5Encoder<'a> {
    /// An encoder over the weights under `vb` (the checkpoint names of [`Umt5Encoder::load`]);
    /// nothing is read yet. The blocks compute in `vb`'s dtype on `vb`'s device.
    pub fn new(vb: VarBuilder<'a>, cfg: &Umt5Config) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            vb,
            cfg: cfg.clone(),
            embedding_rows: None,
        })
    }

    /// Looks up token embeddings through `rows` (such as `Checkpoint::rows` of
    /// `token_embedding.weight`) instead of reading the whole table through the `VarBuilder`.
    pub fn with_embedding_rows(
        mut self,
        rows: impl Fn(&[u32]) -> Result<Tensor> + Send + Sync + 'a,
    ) -> Self {
        self.embedding_rows = Some(Arc::new(rows));
        self
    }

    /// The configuration the encoder reads its weights with.
    pub fn config(&self) -> &Umt5Config {
        &self.cfg
    }

    /// [`Umt5Encoder::forward`], reading the weights block by block.
    pub fn forward(&self, ids: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
        self.forward_observed(ids, mask, &mut || ())
    }

    /// [`StreamingUmt5Encoder::forward`], calling `weights_dropped` each time the weights read
    /// so far have been dropped: after the embedding lookup, after each block and after the
    /// final norm. A caller counting the bytes read between two calls gets the weights held at
    /// once.
    pub fn forward_observed(
        &self,
        ids: &Tensor,
        mask: Option<&Tensor>,
        weights_dropped: &mut dyn FnMut(),
    ) -> Result<Tensor> {
        let mut out = self.forward_many_observed(&[(ids, mask)], weights_dropped)?;
        Ok(out.remove(0))
    }

    /// Several batches of ids (each `[B, L]` with an optional mask, as
    /// [`StreamingUmt5Encoder::forward`] takes) through one read of the weights: each block is
    /// applied to every batch before it is dropped, so a prompt and its negative cost one pass
    /// over the checkpoint. Each result equals that batch's own forward. `weights_dropped` as
    /// for [`StreamingUmt5Encoder::forward_observed`].
    pub fn forward_many_observed(
        &self,
        batches: &[(&Tensor, Option<&Tensor>)],
        weights_dropped: &mut dyn FnMut(),
    ) -> Result<Vec<Tensor>> {
        let device = self.vb.device();
        let inputs = batches
            .iter()
            .map(|(ids, mask)| EncoderInputs::new(ids, *mask, &self.cfg, device))
            .collect::<Result<Vec<_>>>()?;
        let mut xs = self.embedding_rows(batches.iter().map(|(ids, _)| *ids))?;
        weights_dropped();
        for i in 0..self.cfg.num_layers {
            let block = Umt5Block::load(self.vb.pp("blocks").pp(i), &self.cfg)?;
            xs = inputs
                .iter()
                .zip(&xs)
                .map(|(inputs, x)| inputs.run_block(&block, x))
                .collect::<Result<_>>()?;
            drop(block);
            weights_dropped();
        }
        let norm = T5Norm::load(self.vb.pp("norm"), self.cfg.dim, self.cfg.eps)?;
        let out = xs.iter().map(|x| norm.forward(x)).collect();
        drop(norm);
        weights_dropped();
        out
    }

    /// [`Umt5Encoder::encode_ids`], reading the weights block by block.
    pub fn encode_ids(&self, ids: &[u32]) -> Result<Tensor> {
        Ok(self
            .forward(&unpadded_ids(ids, self.vb.device())?, None)?
            .squeeze(0)?)
    }

    /// [`Umt5Encoder::encode_prompt`], reading the weights block by block.
    pub fn encode_prompt(&self, prompt: &TokenizedPrompt) -> Result<Tensor> {
        self.encode_ids(&prompt.ids)
    }

    /// The embedding rows of each `ids` `[B, L]`, looked up on the CPU (through the row
    /// reader where one was given, else in one read of the table) and moved to the device.
    fn embedding_rows<'t>(&self, ids: impl Iterator<Item = &'t Tensor>) -> Result<Vec<Tensor>> {
        type Lookup<'l> = Box<dyn Fn(&Tensor) -> Result<Tensor> + 'l>;
        let lookup: Lookup = match &self.embedding_rows {
            Some(rows) => Box::new(move |flat| {
                let ids = flat.to_dtype(DType::U32)?.to_vec1::<u32>()?;
                Ok(rows(&ids)?.to_dtype(self.vb.dtype())?)
            }),
            None => {
                let table = self
                    .vb
                    .clone()
                    .set_device(Device::Cpu)
                    .get((self.cfg.vocab, self.cfg.dim), TOKEN_EMBEDDING_KEY)?;
                Box::new(move |flat| Ok(table.index_select(flat, 0)?))
            }
        };
        ids.map(|ids| {
            let (batch, len) = ids.dims2()?;
            let flat = ids.to_device(&Device::Cpu)?.flatten_all()?;
            Ok(lookup(&flat)?
                .reshape((batch, len, self.cfg.dim))?
                .to_device(self.vb.device())?)
        })
        .collect()
    }
}

impl std::fmt::Debug for StreamingUmt5Encoder<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamingUmt5Encoder")
            .field("cfg", &self.cfg)
            .field("dtype", &self.vb.dtype())
            .field("device", self.vb.device())
            .finish()
    }
}

/// `[1, L]` ids of one unpadded sequence.
fn unpadded_ids(ids: &[u32], device: &Device) -> Result<Tensor> {
    if ids.is_empty() {
        return Err(Error::EmptyPrompt);
    }
    Ok(Tensor::from_slice(ids, (1, ids.len()), device)?)
}

/// What every block of one forward pass shares: the relative-position buckets and the
/// padding bias, built from the checked ids and mask.
struct EncoderInputs<'c> {
    buckets: Tensor,
    padding: Tensor,
    cfg: &'c Umt5Config,
}

impl<'c> EncoderInputs<'c> {
    /// The inputs on `device`, where the blocks run.
    fn new(
        ids: &Tensor,
        mask: Option<&Tensor>,
        cfg: &'c Umt5Config,
        device: &Device,
    ) -> Result<Self> {
        let (batch, len) = ids.dims2().map_err(|_| Error::Shape {
            what: "umT5 token ids".into(),
            expected: "[B, L]".into(),
            got: ids.dims().to_vec(),
        })?;
        check_ids(ids, cfg.vocab)?;
        let padding = match mask {
            Some(mask) if mask.dims() == [batch, len] => {
                let hidden = mask.to_device(device)?.to_dtype(DType::F32)?.eq(0f64)?;
                let big_negative = Tensor::full(f32::MIN, (batch, len), device)?;
                let zeros = Tensor::zeros((batch, len), DType::F32, device)?;
                hidden.where_cond(&big_negative, &zeros)?
            }
            Some(mask) => {
                return Err(Error::Shape {
                    what: "umT5 attention mask".into(),
                    expected: format!("[{batch}, {len}] like the ids"),
                    got: mask.dims().to_vec(),
                })
            }
            None => Tensor::zeros((batch, len), DType::F32, device)?,
        }
        .reshape((batch, 1, 1, len))?;
        Ok(Self {
            buckets: bucket_table(len, cfg, device)?,
            padding,
            cfg,
        })
    }

    fn run_block(&self, block: &Umt5Block, x: &Tensor) -> Result<Tensor> {
        block.forward(x, &self.buckets, &self.padding, self.cfg)
    }
}

fn check_ids(ids: &Tensor, vocab: usize) -> Result<()> {
    let max = ids.to_dtype(DType::F64)?.max_all()?.to_scalar::<f64>()?;
    let min = ids.to_dtype(DType::F64)?.min_all()?.to_scalar::<f64>()?;
    if min < 0.0 || max >= vocab as f64 {
        return Err(Error::Shape {
            what: format!("umT5 token ids (smallest {min}, largest {max})"),
            expected: format!("ids in 0..{vocab}"),
            got: ids.dims().to_vec(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    /// The spec's formula (`spec/wan-model.md` §7) for 32 buckets and distance 128, in f64.
    fn spec_bucket(relative: i64) -> usize {
        let mut bucket = if relative > 0 { 16 } else { 0 };
        let r = relative.unsigned_abs() as f64;
        bucket += if r < 8.0 {
            r as usize
        } else {
            15.min(8 + ((r / 8.0).ln() / (128f64 / 8.0).ln() * 8.0).floor() as usize)
        };
        bucket
    }

    #[test]
    fn buckets_at_the_edges() {
        let bucket = |r| relative_position_bucket(r, 32, 128);
        assert_eq!(bucket(0), 0);
        assert_eq!(bucket(-1), 1);
        assert_eq!(bucket(1), 17);
        assert_eq!(bucket(-7), 7);
        assert_eq!(bucket(8), 24);
        assert_eq!(bucket(16), 26);
        assert_eq!(bucket(-127), 15);
        assert_eq!(bucket(128), 31);
        assert_eq!(bucket(100_000), 31);
    }

    proptest! {
        #[test]
        fn buckets_follow_the_spec_formula(relative in -600i64..600) {
            prop_assert_eq!(relative_position_bucket(relative, 32, 128), spec_bucket(relative));
        }
    }

    #[test]
    fn bad_ids_and_masks_are_typed_errors() {
        let cfg = Umt5Config {
            vocab: 10,
            dim: 8,
            dim_attn: 8,
            dim_ffn: 16,
            num_heads: 2,
            num_layers: 1,
            num_buckets: 32,
            max_distance: 128,
            eps: 1e-6,
        };
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let encoder = Umt5Encoder::load(vb, &cfg).unwrap();
        let ids = Tensor::new(&[[1u32, 2, 3]], &Device::Cpu).unwrap();
        assert_eq!(encoder.forward(&ids, None).unwrap().dims(), &[1, 3, 8]);
        let out_of_vocab = Tensor::new(&[[1u32, 10]], &Device::Cpu).unwrap();
        assert!(matches!(
            encoder.forward(&out_of_vocab, None),
            Err(Error::Shape { .. })
        ));
        let mask = Tensor::new(&[[1u32, 1]], &Device::Cpu).unwrap();
        assert!(matches!(
            encoder.forward(&ids, Some(&mask)),
            Err(Error::Shape { .. })
        ));
        assert!(matches!(encoder.encode_ids(&[]), Err(Error::EmptyPrompt)));
    }
}
