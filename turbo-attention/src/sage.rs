use candle_core::Tensor;
use candle_nn::VarBuilder;
use turbo_core::{Attention, AttentionKind, Result};

use crate::config::proj_l_weights;
use crate::quant::{quantize_fp8_channels, quantize_int8_blocks, round_to_e4m3};
use crate::sla::{map_query_blocks, SlaCore, SparseBranch};
use crate::{BlockSelection, BlockSizes, LoadAttention, ProjL, SlaConfig};

/// log₂ 448: P̃ is exponentiated against the running max plus this offset, so it spans
/// [0, 448], the E4M3 range.
const P_FP8_OFFSET: f32 = 8.807_355;

/// SageSLA: SLA's block selection, linear branch and `proj_l`, with the sparse branch computed
/// the SageAttention way ([`sage_sparse_attention`]).
#[derive(Debug, Clone)]
pub struct SageSlaAttention {
    core: SlaCore,
}

impl SageSlaAttention {
    pub fn new(cfg: SlaConfig, proj_l: ProjL) -> Self {
        Self {
            core: SlaCore {
                cfg,
                proj_l,
                branch: SparseBranch::Sage,
            },
        }
    }

    pub fn config(&self) -> &SlaConfig {
        &self.core.cfg
    }
}

impl LoadAttention for SageSlaAttention {
    type Config = SlaConfig;

    fn load(vb: VarBuilder, head_dim: usize, cfg: &SlaConfig) -> Result<Self> {
        Ok(Self::new(*cfg, ProjL::load(vb.pp("proj_l"), head_dim)?))
    }

    fn weights(head_dim: usize, _cfg: &SlaConfig) -> Vec<(String, Vec<usize>)> {
        proj_l_weights(head_dim)
    }
}

impl Attention for SageSlaAttention {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.core.forward(q, k, v)
    }

    fn kind(&self) -> AttentionKind {
        AttentionKind::SageSla {
            topk: self.core.cfg.topk,
        }
    }

    fn set_topk(&mut self, topk: f64) -> Result<()> {
        self.core.cfg = self.core.cfg.with_topk(topk)?;
        Ok(())
    }
}

/// SageSLA's sparse branch on heads-first `[B, H, L, D]` f32 tensors, emulating the quantised
/// kernel:
/// - Q in int8 per query block, K − mean(K) in int8 per key block (scale amax/127 + 1e-7);
///   Q·Kᵀ exact in integers, then × δ_Q·δ_K·(1/√D)·log₂e;
/// - online softmax in base 2 over the selected key blocks in ascending order, with
///   P̃ = exp2(s − m + log₂448) rounded to E4M3 and the row sum l taken before rounding;
/// - V in E4M3 per channel (scale amax/2.25), applied after P̃·V̂ / l.
///
/// The integer products are exact in f32 for head dims up to 1040 (|Σ| < 2²⁴).
pub fn sage_sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    selection: &BlockSelection,
    blocks: BlockSizes,
) -> Result<Tensor> {
    let score_scale = std::f32::consts::LOG2_E / (q.dim(3)? as f32).sqrt();
    let q8 = quantize_int8_blocks(q, blocks.query)?;
    let k8 = quantize_int8_blocks(&k.broadcast_sub(&k.mean_keepdim(2)?)?, blocks.key)?;
    let v8 = quantize_fp8_channels(v)?;
    let out = map_query_blocks(
        &q8.values,
        &k8.values,
        &v8.values,
        selection,
        blocks,
        |block| {
            let products = block.q.matmul(&block.k.t()?)?;
            let (rows, keys) = products.dims2()?;
            let q_scale = q8.scale(block.head, block.index) * score_scale;
            let segments: Vec<(usize, f32)> = block
                .key_blocks
                .iter()
                .zip(&block.key_block_lens)
                .map(|(&j, &len)| (len, q_scale * k8.scale(block.head, j as usize)))
                .collect();
            let (weights, row_sums) =
                fp8_online_softmax(&products.flatten_all()?.to_vec1()?, keys, &segments);
            let weights = Tensor::from_vec(weights, (rows, keys), products.device())?;
            let row_sums = Tensor::from_vec(row_sums, (rows, 1), products.device())?;
            Ok(weights.matmul(&block.v)?.broadcast_div(&row_sums)?)
        },
    )?;
    Ok(out.broadcast_mul(&v8.scales)?)
}

/// The softmax weights of the FP8 P·V product for `products` (`rows × keys`, row-major integer
/// Q·K dot products), whose keys come in `segments` of (length, base-2 score scale), one per key
/// block, in the order the kernel visits them.
///
/// Within each segment P̃ = e4m3(exp2(s − m + log₂448)) with m the running row max after that
/// segment; the kernel then rescales its accumulator by exp2(m_old − m_new) at each later
/// block, which is applied here as one factor exp2(m_segment − m_final) per segment. Returns
/// the weights and, per row, l = Σ P̃ before rounding, relative to the final max.
fn fp8_online_softmax(
    products: &[f32],
    keys: usize,
    segments: &[(usize, f32)],
) -> (Vec<f32>, Vec<f32>) {
    let mut weights = vec![0f32; products.len()];
    let mut row_sums = Vec::with_capacity(products.len() / keys.max(1));
    let mut segment_max = vec![0f32; segments.len()];
    for (row, out) in products.chunks(keys).zip(weights.chunks_mut(keys)) {
        let (mut max, mut sum, mut start) = (f32::NEG_INFINITY, 0f32, 0);
        for (seg, &(len, scale)) in segments.iter().enumerate() {
            let range = start..start + len;
            let block_max = row[range.clone()]
                .iter()
                .fold(f32::NEG_INFINITY, |m, &p| m.max(p * scale));
            let new_max = max.max(block_max);
            let mut block_sum = 0f32;
            for (w, &p) in out[range.clone()].iter_mut().zip(&row[range]) {
                let p_tilde = (p * scale - new_max + P_FP8_OFFSET).exp2();
                block_sum += p_tilde;
                *w = round_to_e4m3(p_tilde);
            }
            sum = sum * (max - new_max).exp2() + block_sum;
            max = new_max;
            segment_max[seg] = new_max;
            start += len;
        }
        let mut start = 0;
        for (&(len, _), &seg_max) in segments.iter().zip(&segment_max) {
            let rescale = (seg_max - max).exp2();
            out[start..start + len]
                .iter_mut()
                .for_each(|w| *w *= rescale);
            start += len;
        }
        row_sums.push(sum);
    }
    (weights, row_sums)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fp8_softmax_matches_plain_softmax_up_to_fp8_rounding() {
        // One row, two key blocks; scores chosen so the max moves in the second block.
        let products = [1.0f32, 2.0, 4.0, 3.0];
        let segments = [(2, 1.0f32), (2, 1.0f32)];
        let (weights, sums) = fp8_online_softmax(&products, 4, &segments);
        let exact: Vec<f32> = products.iter().map(|s| (s - 4.0).exp2()).collect();
        let exact_sum: f32 = exact.iter().sum();
        let normalised: Vec<f32> = weights.iter().map(|w| w / sums[0]).collect();
        for (got, want) in normalised.iter().zip(&exact) {
            let want = want / exact_sum;
            assert!((got - want).abs() <= want * 0.07, "{got} vs {want}");
        }
        assert!((sums[0] / 448.0 - exact_sum).abs() < 1e-5);
        // The max block's top weight is exactly 448 (its exponent is the offset).
        assert_eq!(weights[2], 448.0);
    }
}
