use candle_core::Tensor;
use candle_nn::ops::softmax_last_dim;
use candle_nn::VarBuilder;
use turbo_core::{Attention, AttentionKind, Error, QkvShape, Result};

use crate::config::proj_l_weights;
use crate::layout::{heads_first_f32, tokens_first};
use crate::{
    linear_attention, sage_sparse_attention, select_blocks, BlockSelection, BlockSizes,
    LoadAttention, ProjL, SlaConfig,
};

/// Sparse-Linear Attention as in the released TurboDiffusion checkpoints.
///
/// `O = Oˢ + proj_l(Oˡ)`: `Oˢ` is exact softmax attention of each query block over its top-k key
/// blocks only (renormalised over them), `Oˡ` the linear branch over all keys
/// ([`linear_attention`]).
#[derive(Debug, Clone)]
pub struct SlaAttention {
    core: SlaCore,
}

impl SlaAttention {
    pub fn new(cfg: SlaConfig, proj_l: ProjL) -> Self {
        Self {
            core: SlaCore {
                cfg,
                proj_l,
                branch: SparseBranch::Exact,
            },
        }
    }

    pub fn config(&self) -> &SlaConfig {
        &self.core.cfg
    }
}

impl LoadAttention for SlaAttention {
    type Config = SlaConfig;

    fn load(vb: VarBuilder, head_dim: usize, cfg: &SlaConfig) -> Result<Self> {
        Ok(Self::new(*cfg, ProjL::load(vb.pp("proj_l"), head_dim)?))
    }

    fn weights(head_dim: usize, _cfg: &SlaConfig) -> Vec<(String, Vec<usize>)> {
        proj_l_weights(head_dim)
    }
}

impl Attention for SlaAttention {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.core.forward(q, k, v)
    }

    fn kind(&self) -> AttentionKind {
        AttentionKind::Sla {
            topk: self.core.cfg.topk,
        }
    }

    fn set_topk(&mut self, topk: f64) -> Result<()> {
        self.core.cfg = self.core.cfg.with_topk(topk)?;
        Ok(())
    }
}

/// How the sparse branch computes: SLA's exact softmax or SageSLA's quantised one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SparseBranch {
    Exact,
    Sage,
}

impl SparseBranch {
    /// The reference implementation on heads-first f32 tensors.
    fn reference(
        self,
    ) -> fn(&Tensor, &Tensor, &Tensor, &BlockSelection, BlockSizes) -> Result<Tensor> {
        match self {
            Self::Exact => sparse_attention,
            Self::Sage => sage_sparse_attention,
        }
    }
}

/// What SLA and SageSLA share: block selection, the linear branch, `proj_l` and the sum.
#[derive(Debug, Clone)]
pub(crate) struct SlaCore {
    pub(crate) cfg: SlaConfig,
    pub(crate) proj_l: ProjL,
    pub(crate) branch: SparseBranch,
}

impl SlaCore {
    pub(crate) fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let shape = QkvShape::of(q, k, v)?;
        if shape.head_dim != self.proj_l.dim() {
            return Err(Error::Shape {
                what: "SLA input (head dim must match proj_l)".into(),
                expected: format!("[B, L, H, {}]", self.proj_l.dim()),
                got: q.dims().to_vec(),
            });
        }
        #[cfg(feature = "cuda")]
        if crate::cuda::sparse_applies(q, k, self.cfg.blocks) {
            return crate::cuda::sla_attention(q, k, v, &self.cfg, &self.proj_l, self.branch);
        }
        let (qh, kh, vh) = (
            heads_first_f32(q)?,
            heads_first_f32(k)?,
            heads_first_f32(v)?,
        );
        let linear_out =
            self.proj_l
                .forward(&linear_attention(&qh, &kh, &vh, SlaConfig::LINEAR_EPS)?)?;
        let selection = select_blocks(&qh, &kh, &self.cfg)?;
        let sparse_out = self.branch.reference()(&qh, &kh, &vh, &selection, self.cfg.blocks)?;
        tokens_first(&(sparse_out + linear_out)?, q.dtype())
    }
}

/// SLA's sparse branch on heads-first `[B, H, L, D]` f32 tensors: each query block attends
/// exactly, with scale 1/√D, over the tokens of its selected key blocks only.
pub fn sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    selection: &BlockSelection,
    blocks: BlockSizes,
) -> Result<Tensor> {
    let scale = 1.0 / (q.dim(3)? as f64).sqrt();
    map_query_blocks(q, k, v, selection, blocks, |block| {
        let probs = softmax_last_dim(&(block.q.matmul(&block.k.t()?)? * scale)?)?;
        Ok(probs.matmul(&block.v)?)
    })
}

/// One query block and the keys and values of its selected key blocks.
pub(crate) struct QueryBlock<'a> {
    /// Flattened batch · heads index.
    pub head: usize,
    /// Index of the query block.
    pub index: usize,
    /// `[rows, D]` query rows.
    pub q: Tensor,
    /// `[n, D]`: the selected key blocks' tokens, block after block in ascending order.
    pub k: Tensor,
    pub v: Tensor,
    /// The selected key block indices and their lengths in tokens (the last block may be short).
    pub key_blocks: &'a [u32],
    pub key_block_lens: Vec<usize>,
}

/// Runs `attend` on every query block of every head and assembles `[B, H, Lq, D]`.
pub(crate) fn map_query_blocks(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    selection: &BlockSelection,
    blocks: BlockSizes,
    mut attend: impl FnMut(QueryBlock<'_>) -> Result<Tensor>,
) -> Result<Tensor> {
    let (batch, heads, q_len, dim) = q.dims4()?;
    let kv_len = k.dim(2)?;
    let (q, k, v) = (q.flatten_to(1)?, k.flatten_to(1)?, v.flatten_to(1)?);
    let mut outputs = Vec::with_capacity(batch * heads);
    for head in 0..batch * heads {
        let (qh, kh, vh) = (q.get(head)?, k.get(head)?, v.get(head)?);
        let mut rows = Vec::with_capacity(selection.query_blocks());
        for index in 0..selection.query_blocks() {
            let start = index * blocks.query;
            let key_blocks = selection.row(head, index);
            let key_block_lens: Vec<usize> = key_blocks
                .iter()
                .map(|&j| blocks.key.min(kv_len - j as usize * blocks.key))
                .collect();
            let tokens: Vec<u32> = key_blocks
                .iter()
                .zip(&key_block_lens)
                .flat_map(|(&j, &len)| (0..len as u32).map(move |t| j * blocks.key as u32 + t))
                .collect();
            let tokens =
                Tensor::from_vec(tokens, key_block_lens.iter().sum::<usize>(), q.device())?;
            rows.push(attend(QueryBlock {
                head,
                index,
                q: qh.narrow(0, start, blocks.query.min(q_len - start))?,
                k: kh.index_select(&tokens, 0)?,
                v: vh.index_select(&tokens, 0)?,
                key_blocks,
                key_block_lens,
            })?);
        }
        outputs.push(Tensor::cat(&rows, 0)?);
    }
    Ok(Tensor::stack(&outputs, 0)?.reshape((batch, heads, q_len, dim))?)
}
