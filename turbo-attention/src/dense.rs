use candle_core::Tensor;
use candle_nn::ops::softmax_last_dim;
use candle_nn::VarBuilder;
use turbo_core::{Attention, AttentionKind, QkvShape, Result};

use crate::layout::{heads_first_f32, tokens_first};
use crate::{DenseConfig, LoadAttention};

/// Exact softmax attention, `softmax(q·kᵀ/√D)·v`, computed `query_chunk` query rows at a time so
/// that no L × L score matrix exists at once.
#[derive(Debug, Clone, Default)]
pub struct DenseAttention {
    cfg: DenseConfig,
}

impl DenseAttention {
    pub fn new(cfg: DenseConfig) -> Self {
        Self { cfg }
    }
}

impl LoadAttention for DenseAttention {
    type Config = DenseConfig;

    /// Dense attention has no weights; `vb` and `head_dim` are not read.
    fn load(_vb: VarBuilder, _head_dim: usize, cfg: &DenseConfig) -> Result<Self> {
        Ok(Self::new(*cfg))
    }

    fn weights(_head_dim: usize, _cfg: &DenseConfig) -> Vec<(String, Vec<usize>)> {
        Vec::new()
    }
}

impl Attention for DenseAttention {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        QkvShape::of(q, k, v)?;
        #[cfg(feature = "cuda")]
        if crate::cuda::flash_applies(q, k) {
            return crate::cuda::flash_attention(q, k, v, self.cfg.kernel);
        }
        let out = dense_heads_first(
            &heads_first_f32(q)?,
            &heads_first_f32(k)?,
            &heads_first_f32(v)?,
            self.cfg.query_chunk.max(1),
        )?;
        tokens_first(&out, q.dtype())
    }

    fn kind(&self) -> AttentionKind {
        AttentionKind::Original
    }
}

/// Chunked dense attention on heads-first `[B, H, L, D]` f32 tensors.
pub(crate) fn dense_heads_first(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    query_chunk: usize,
) -> Result<Tensor> {
    let (_, _, q_len, head_dim) = q.dims4()?;
    let scale = 1.0 / (head_dim as f64).sqrt();
    let k_t = k.t()?;
    let chunks = (0..q_len)
        .step_by(query_chunk)
        .map(|start| {
            let rows = q.narrow(2, start, query_chunk.min(q_len - start))?;
            let probs = softmax_last_dim(&(rows.matmul(&k_t)? * scale)?)?;
            Ok(probs.matmul(v)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(Tensor::cat(&chunks, 2)?)
}

/// The plain formula `softmax(q·kᵀ/√D)·v` on `[B, L, H, D]`, materialising the whole score
/// matrix: the reference twin of [`DenseAttention`], for tests.
pub fn dense_attention_reference(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let shape = QkvShape::of(q, k, v)?;
    let (qh, kh, vh) = (
        heads_first_f32(q)?,
        heads_first_f32(k)?,
        heads_first_f32(v)?,
    );
    let scores = (qh.matmul(&kh.t()?)? / (shape.head_dim as f64).sqrt())?;
    let max = scores.max_keepdim(3)?;
    let exp = scores.broadcast_sub(&max)?.exp()?;
    let probs = exp.broadcast_div(&exp.sum_keepdim(3)?)?;
    tokens_first(&probs.matmul(&vh)?, q.dtype())
}
