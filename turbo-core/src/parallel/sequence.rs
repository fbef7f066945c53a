//! Ulysses sequence parallelism: the token shards of the ranks and the two all-to-alls around
//! an attention.

use std::ops::Range;

use candle_core::{Shape, Tensor};

use super::{empty_part, Communicator, Partition};
use crate::{Error, Result};

/// The token axis of `[B, L, H, D]` attention inputs.
const TOKENS: usize = 1;
/// The head axis of `[B, L, H, D]` attention inputs.
const HEADS: usize = 2;

/// One rank's view of a sequence split over the ranks of `comm`: this rank holds the
/// contiguous tokens [`SequenceParallel::local_tokens`] of every layer's hidden state.
///
/// Around an attention, [`SequenceParallel::scatter_heads`] turns this rank's tokens of all
/// heads (`[B, L_r, H, D]`) into all tokens of its share of the heads (`[B, L, H_r, D]`), and
/// [`SequenceParallel::gather_heads`] turns the attention's output back. Heads are split as
/// evenly as they go ([`Partition::balanced`]: 40 heads on 3 ranks are 14, 13, 13); nothing is
/// padded, and a rank with no head (more ranks than heads) exchanges empty tensors.
pub struct SequenceParallel<'a> {
    comm: &'a dyn Communicator,
    tokens: Partition,
}

impl std::fmt::Debug for SequenceParallel<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SequenceParallel")
            .field("rank", &self.comm.rank())
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl<'a> SequenceParallel<'a> {
    /// `tokens` tokens over the ranks of `comm`, each shard starting at a multiple of `align`
    /// (see [`Partition::aligned`]).
    pub fn new(comm: &'a dyn Communicator, tokens: usize, align: usize) -> Result<Self> {
        Ok(Self {
            comm,
            tokens: Partition::aligned(tokens, comm.world_size(), align)?,
        })
    }

    /// The communicator the shards are exchanged through.
    pub fn communicator(&self) -> &'a dyn Communicator {
        self.comm
    }

    /// The token split over the ranks.
    pub fn tokens(&self) -> &Partition {
        &self.tokens
    }

    /// The global positions of this rank's tokens.
    pub fn local_tokens(&self) -> Range<usize> {
        self.tokens.range(self.comm.rank())
    }

    /// This rank's tokens of `x` along `dim` (which holds all tokens), as a contiguous copy.
    pub fn shard_tokens(&self, x: &Tensor, dim: usize) -> Result<Tensor> {
        self.check_axis(x, dim, self.tokens.total(), "tensor to shard")?;
        let range = self.local_tokens();
        Ok(x.narrow(dim, range.start, range.len())?.contiguous()?)
    }

    /// Every rank's tokens of `local` (this rank's shard along `dim`), joined in token order.
    pub fn gather_tokens(&self, local: &Tensor, dim: usize) -> Result<Tensor> {
        let me = self.comm.rank();
        self.check_axis(local, dim, self.tokens.len(me), "token shard to gather")?;
        let shapes = self.shapes_along(local, dim, &self.tokens);
        let parts = self.comm.all_gather(local, &shapes)?;
        Ok(Tensor::cat(&parts, dim)?)
    }

    /// `[B, L_r, H, D]` (this rank's tokens, all heads) → `[B, L, H_r, D]` (all tokens, this
    /// rank's heads, in head order).
    pub fn scatter_heads(&self, local: &Tensor) -> Result<Tensor> {
        let me = self.comm.rank();
        let (_, tokens, heads, _) = local.dims4()?;
        self.check_axis(local, TOKENS, self.tokens.len(me), "attention input shard")?;
        let head_split = Partition::balanced(heads, self.comm.world_size())?;
        let sends = (0..head_split.parts())
            .map(|rank| narrow_copy(local, HEADS, head_split.range(rank)))
            .collect::<Result<Vec<_>>>()?;
        let mine = local.shape().dims().to_vec();
        let shapes = (0..self.tokens.parts())
            .map(|rank| {
                let mut dims = mine.clone();
                dims[TOKENS] = self.tokens.len(rank);
                dims[HEADS] = head_split.len(me);
                Shape::from(dims)
            })
            .collect::<Vec<_>>();
        debug_assert_eq!(tokens, self.tokens.len(me));
        let parts = self.comm.all_to_all(&sends, &shapes)?;
        Ok(Tensor::cat(&parts, TOKENS)?)
    }

    /// The inverse of [`SequenceParallel::scatter_heads`]: `[B, L, H_r, D]` → `[B, L_r, H, D]`
    /// for a tensor of `heads` heads in all.
    pub fn gather_heads(&self, by_heads: &Tensor, heads: usize) -> Result<Tensor> {
        let me = self.comm.rank();
        let head_split = Partition::balanced(heads, self.comm.world_size())?;
        self.check_axis(by_heads, TOKENS, self.tokens.total(), "attention output")?;
        self.check_axis(by_heads, HEADS, head_split.len(me), "attention output")?;
        let sends = (0..self.tokens.parts())
            .map(|rank| narrow_copy(by_heads, TOKENS, self.tokens.range(rank)))
            .collect::<Result<Vec<_>>>()?;
        let mine = by_heads.shape().dims().to_vec();
        let shapes = (0..head_split.parts())
            .map(|rank| {
                let mut dims = mine.clone();
                dims[TOKENS] = self.tokens.len(me);
                dims[HEADS] = head_split.len(rank);
                Shape::from(dims)
            })
            .collect::<Vec<_>>();
        let parts = self.comm.all_to_all(&sends, &shapes)?;
        Ok(Tensor::cat(&parts, HEADS)?)
    }

    /// The shapes of every rank's part of `local` along `dim`, split as `split`.
    fn shapes_along(&self, local: &Tensor, dim: usize, split: &Partition) -> Vec<Shape> {
        (0..split.parts())
            .map(|rank| {
                let mut dims = local.dims().to_vec();
                dims[dim] = split.len(rank);
                Shape::from(dims)
            })
            .collect()
    }

    /// `x` has `expected` entries along `dim`.
    fn check_axis(&self, x: &Tensor, dim: usize, expected: usize, what: &str) -> Result<()> {
        match x.dims().get(dim) {
            Some(&len) if len == expected => Ok(()),
            _ => Err(Error::Shape {
                what: format!(
                    "{what} of rank {} of {} (axis {dim})",
                    self.comm.rank(),
                    self.comm.world_size()
                ),
                expected: format!("{expected} along axis {dim}"),
                got: x.dims().to_vec(),
            }),
        }
    }
}

/// `x`'s entries `range` along `dim`, contiguous (the layout a transfer needs). An empty range
/// (a rank without heads) copies nothing.
fn narrow_copy(x: &Tensor, dim: usize, range: Range<usize>) -> Result<Tensor> {
    let part = x.narrow(dim, range.start, range.len())?;
    if range.is_empty() {
        return empty_part(x, part.shape());
    }
    Ok(part.contiguous()?)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::super::simulate;
    use super::*;

    /// `[1, L, H, 2]` whose every element names its token and head.
    fn labelled(tokens: usize, heads: usize) -> Tensor {
        let values: Vec<f32> = (0..tokens)
            .flat_map(|l| (0..heads).flat_map(move |h| [l as f32, h as f32]))
            .collect();
        Tensor::from_vec(values, (1, tokens, heads, 2), &Device::Cpu).unwrap()
    }

    /// For each world size and uneven split, every rank gets all tokens of exactly its heads,
    /// and the way back restores its shard.
    #[test]
    fn all_to_all_layout_round_trips_for_uneven_tokens_and_heads() {
        for world in 1..=4 {
            for (tokens, heads) in [(10, 4), (7, 3), (13, 12), (5, 2)] {
                let x = labelled(tokens, heads);
                let back = simulate(world, |comm| {
                    let sp = SequenceParallel::new(comm, tokens, 1)?;
                    let local = sp.shard_tokens(&x, 1)?;
                    let by_heads = sp.scatter_heads(&local)?;
                    let my_heads = Partition::balanced(heads, world)?.range(comm.rank());
                    let expected = x.narrow(2, my_heads.start, my_heads.len())?;
                    let diff = (&by_heads - &expected)?
                        .abs()?
                        .sum_all()?
                        .to_scalar::<f32>()?;
                    assert_eq!(diff, 0.0, "world {world}, rank {}", comm.rank());
                    let restored = sp.gather_heads(&by_heads, heads)?;
                    sp.gather_tokens(&restored, 1)
                })
                .unwrap();
                for whole in back {
                    let diff = (&whole - &x).unwrap().abs().unwrap().sum_all().unwrap();
                    assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
                }
            }
        }
    }

    #[test]
    fn a_shard_of_the_wrong_length_is_a_shape_error() {
        let err = simulate(2, |comm| {
            let sp = SequenceParallel::new(comm, 10, 1)?;
            sp.scatter_heads(&Tensor::zeros((1, 4, 2, 2), DType::F32, &Device::Cpu)?)
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::Shape { what, .. } if what.contains("attention input shard")),
            "{err}"
        );
    }
}
