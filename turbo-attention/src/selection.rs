use candle_core::{Device, Tensor};
use turbo_core::{Error, Result};

use crate::SlaConfig;

/// The key blocks each query block attends exactly: for every (batch, head, query block) the
/// indices of the T key blocks with the largest pooled scores, in ascending order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockSelection {
    batch: usize,
    heads: usize,
    query_blocks: usize,
    key_blocks: usize,
    per_row: usize,
    indices: Vec<u32>,
}

impl BlockSelection {
    /// The selected key blocks of query block `query_block` of the flattened `batch · heads`
    /// index `head`.
    pub fn row(&self, head: usize, query_block: usize) -> &[u32] {
        let start = (head * self.query_blocks + query_block) * self.per_row;
        &self.indices[start..start + self.per_row]
    }

    /// Key blocks selected per query block (T).
    pub fn per_row(&self) -> usize {
        self.per_row
    }

    pub fn query_blocks(&self) -> usize {
        self.query_blocks
    }

    pub fn key_blocks(&self) -> usize {
        self.key_blocks
    }

    /// Fraction of key blocks computed exactly.
    pub fn density(&self) -> f64 {
        self.per_row as f64 / self.key_blocks as f64
    }

    /// The indices as a `[B, H, n_q, T]` u32 tensor.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let shape = (self.batch, self.heads, self.query_blocks, self.per_row);
        Ok(Tensor::from_slice(&self.indices, shape, device)?)
    }
}

/// Selects the key blocks of SLA's sparse branch (`get_block_map` upstream) from heads-first
/// `[B, H, L, D]` f32 `q` and `k`.
///
/// The pooled score of query block i and key block j is `mean(q_i) · mean(k_j − mean(k))`,
/// without scale or softmax (both are monotone along a row, so they would select the same
/// blocks). Partial last blocks are averaged over their real length. Ties go to the lower
/// block index.
pub fn select_blocks(q: &Tensor, k: &Tensor, cfg: &SlaConfig) -> Result<BlockSelection> {
    let (batch, heads, q_len, _) = q.dims4()?;
    let scores = pooled_scores(q, k, cfg)?.to_vec2::<f32>()?;
    let query_blocks = q_len.div_ceil(cfg.blocks.query);
    let key_blocks = k.dim(2)?.div_ceil(cfg.blocks.key);
    let per_row = cfg.selected_blocks(key_blocks);
    let indices = scores
        .iter()
        .flat_map(|row| top_blocks(row, per_row))
        .collect();
    Ok(BlockSelection {
        batch,
        heads,
        query_blocks,
        key_blocks,
        per_row,
        indices,
    })
}

/// The pooled scores `mean(q_i) · mean(k_j − mean(k))` as `[B·H·n_q, n_k]` f32.
fn pooled_scores(q: &Tensor, k: &Tensor, cfg: &SlaConfig) -> Result<Tensor> {
    let k_smooth = k.broadcast_sub(&k.mean_keepdim(2)?)?;
    let pooled_q = block_means(q, cfg.blocks.query)?;
    let pooled_k = block_means(&k_smooth, cfg.blocks.key)?;
    Ok(pooled_q.matmul(&pooled_k.t()?)?.flatten_to(2)?)
}

/// Indices of the `count` largest scores, ascending.
fn top_blocks(scores: &[f32], count: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..scores.len() as u32).collect();
    order.sort_by(|&a, &b| {
        scores[b as usize]
            .total_cmp(&scores[a as usize])
            .then(a.cmp(&b))
    });
    order.truncate(count);
    order.sort_unstable();
    order
}

/// Mean over each block of `block` tokens of `[B, H, L, D]` → `[B, H, ⌈L/block⌉, D]`; the last
/// block divides by its real length.
pub(crate) fn block_means(x: &Tensor, block: usize) -> Result<Tensor> {
    let (batch, heads, len, dim) = x.dims4()?;
    if len == 0 {
        return Err(Error::Shape {
            what: "block pooling input".into(),
            expected: "[B, H, L > 0, D]".into(),
            got: x.dims().to_vec(),
        });
    }
    let blocks = len.div_ceil(block);
    let padded = x.pad_with_zeros(2, 0, blocks * block - len)?;
    let sums = padded.reshape((batch, heads, blocks, block, dim))?.sum(3)?;
    let counts: Vec<f32> = (0..blocks)
        .map(|i| block.min(len - i * block) as f32)
        .collect();
    let counts = Tensor::from_vec(counts, (1, 1, blocks, 1), x.device())?;
    Ok(sums.broadcast_div(&counts)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn top_blocks_are_sorted_and_prefer_lower_index_on_ties() {
        assert_eq!(top_blocks(&[0.1, 0.9, 0.5, 0.9], 2), vec![1, 3]);
        assert_eq!(top_blocks(&[1.0, 1.0, 1.0], 2), vec![0, 1]);
        assert_eq!(top_blocks(&[3.0, -1.0, 2.0, 5.0], 3), vec![0, 2, 3]);
    }

    #[test]
    fn partial_blocks_average_their_real_length() {
        let x = Tensor::arange(0f32, 5.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 5, 1))
            .unwrap();
        let means = block_means(&x, 2)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(means, vec![0.5, 2.5, 4.0]);
    }
}
