//! Multi-GPU work sharing: the [`Communicator`] the ranks exchange tensors through and the
//! sharding plans the DiT, the VAE and the guided samplers call.
//!
//! Three kinds of parallelism build on it, each exact (the same numbers as one device, up to
//! the float rounding of a reordered sum):
//! - **Ulysses sequence parallelism** of the DiT ([`SequenceParallel`]): every rank holds a
//!   contiguous shard of the tokens; around each self-attention an all-to-all gives every rank
//!   all tokens of a share of the heads, and a second one returns its own tokens of all heads.
//!   Attention is computed per head over all tokens, so SLA's block selection and linear branch
//!   see exactly what they see on one device.
//! - **Spatial VAE decode**: one band of latent rows per rank, each with the halo the tiled
//!   decode computes, the frames gathered at the end ([`Partition`] splits the rows).
//! - **CFG parallelism**: the conditional and unconditional passes of a guided teacher on two
//!   halves of the ranks, the velocities exchanged and combined identically on both; with
//!   more than one rank per half, each half runs its pass sequence parallel in a [`Group`].
//!
//! Communicators: [`SimulatedCommunicator`] (ranks as threads of one process, for tests and for
//! checking the plans on the CPU) and, under the `nccl` feature, `NcclCommunicator` (one
//! process per GPU, launched with `RANK` / `WORLD_SIZE` / `LOCAL_RANK`, see [`LaunchEnv`]).
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use turbo_core::parallel::{simulate, Communicator, SequenceParallel};
//!
//! // Three ranks, 10 tokens of 4 heads: every rank ends with all tokens of its heads.
//! let x = Tensor::arange(0f32, 80.0, &Device::Cpu)?.reshape((1, 10, 4, 2))?;
//! let shards = simulate(3, |comm| {
//!     let sp = SequenceParallel::new(comm, 10, 1)?;
//!     let local = sp.shard_tokens(&x, 1)?;
//!     let by_heads = sp.scatter_heads(&local)?;
//!     assert_eq!(by_heads.dim(1)?, 10);
//!     sp.gather_heads(&by_heads, 4)
//! })?;
//! let whole = Tensor::cat(&shards, 1)?;
//! let diff = (whole - &x)?.abs()?.sum_all()?.to_scalar::<f32>()?;
//! assert_eq!(diff, 0.0);
//! # Ok::<(), turbo_core::Error>(())
//! ```

mod group;
mod launch;
#[cfg(feature = "nccl")]
mod nccl;
mod partition;
mod sequence;
mod simulated;

pub use group::Group;
pub use launch::{LaunchEnv, Rendezvous, UNIQUE_ID_BYTES};
#[cfg(feature = "nccl")]
pub use nccl::NcclCommunicator;
pub use partition::Partition;
pub use sequence::SequenceParallel;
pub use simulated::{simulate, simulated_group, SimulatedCommunicator};

use candle_core::{Shape, Tensor};

use crate::{Error, Result};

/// The ranks of one multi-device run and the collective operations between them.
///
/// Every rank calls the same operations in the same order (as NCCL requires); the shapes each
/// rank receives are known from the sharding plan, so they are passed in rather than sent.
/// Tensors keep their dtype; a received tensor lives on the rank's device.
pub trait Communicator {
    /// This rank, in `0..world_size()`.
    fn rank(&self) -> usize;

    /// The number of ranks.
    fn world_size(&self) -> usize;

    /// Sends `sends[j]` to rank `j` and returns what every rank sent to this one, `received[j]`
    /// from rank `j` with shape `recv_shapes[j]` (the dtype of `sends`). Both lists hold one
    /// entry per rank. Empty parts are allowed and never transferred: both sides know them
    /// from the plan.
    fn all_to_all(&self, sends: &[Tensor], recv_shapes: &[Shape]) -> Result<Vec<Tensor>>;

    /// Every rank's `local`, in rank order; rank `j`'s has shape `shapes[j]`.
    fn all_gather(&self, local: &Tensor, shapes: &[Shape]) -> Result<Vec<Tensor>> {
        let sends = vec![local.clone(); self.world_size()];
        self.all_to_all(&sends, shapes)
    }

    /// The `root` rank's `tensor` on every rank; the others pass a tensor of the same shape and
    /// dtype, whose values are ignored.
    fn broadcast(&self, tensor: &Tensor, root: usize) -> Result<Tensor> {
        check_rank(self, "broadcast", root)?;
        let shapes = vec![tensor.shape().clone(); self.world_size()];
        Ok(self.all_gather(tensor, &shapes)?.swap_remove(root))
    }

    /// Sends `mine` to rank `partner` and returns the partner's tensor of the same shape;
    /// `partner` must name this rank in return. The other ranks take no part: the parts for
    /// them are empty, and empty parts are never transferred.
    fn swap_with(&self, mine: &Tensor, partner: usize) -> Result<Tensor> {
        check_rank(self, "swap_with", partner)?;
        let nothing = Shape::from(0);
        let mut sends = vec![empty_part(mine, &nothing)?; self.world_size()];
        let mut shapes = vec![nothing; self.world_size()];
        sends[partner] = mine.clone();
        shapes[partner] = mine.shape().clone();
        Ok(self.all_to_all(&sends, &shapes)?.swap_remove(partner))
    }
}

/// The trivial communicator of a run on one device: every operation returns its input.
#[derive(Debug, Clone, Copy, Default)]
pub struct SingleDevice;

impl Communicator for SingleDevice {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_to_all(&self, sends: &[Tensor], recv_shapes: &[Shape]) -> Result<Vec<Tensor>> {
        check_lists(self, "all_to_all", sends.len(), recv_shapes.len())?;
        check_received(self, "all_to_all", 0, &sends[0], &recv_shapes[0])?;
        Ok(sends.to_vec())
    }
}

/// A tensor of `shape`, which holds no elements, with `like`'s dtype and device: the part a
/// rank receives from a peer that sends it nothing. A view of one allocated element, because
/// CUDA refuses zero-byte allocations.
pub(crate) fn empty_part(like: &Tensor, shape: &Shape) -> Result<Tensor> {
    debug_assert_eq!(shape.elem_count(), 0, "an empty part has no elements");
    let one = Tensor::zeros(1, like.dtype(), like.device())?;
    Ok(one.narrow(0, 0, 0)?.reshape(shape)?)
}

/// An [`Error::Communication`] from `comm`'s rank.
pub(crate) fn communication_error(
    comm: &(impl Communicator + ?Sized),
    op: &'static str,
    reason: String,
) -> Error {
    Error::Communication {
        op,
        rank: comm.rank(),
        world_size: comm.world_size(),
        reason,
    }
}

/// `rank` names a rank of `comm`.
fn check_rank(comm: &(impl Communicator + ?Sized), op: &'static str, rank: usize) -> Result<()> {
    if rank < comm.world_size() {
        return Ok(());
    }
    Err(communication_error(
        comm,
        op,
        format!("rank {rank} is not a rank of the group"),
    ))
}

/// A list of sends and one of shapes to receive, both with one entry per rank.
pub(crate) fn check_lists(
    comm: &(impl Communicator + ?Sized),
    op: &'static str,
    sends: usize,
    receives: usize,
) -> Result<()> {
    let world = comm.world_size();
    if sends == world && receives == world {
        return Ok(());
    }
    Err(communication_error(
        comm,
        op,
        format!("{sends} tensors to send and {receives} shapes to receive, expected {world} each"),
    ))
}

/// A received tensor has the shape the plan expects.
pub(crate) fn check_received(
    comm: &(impl Communicator + ?Sized),
    op: &'static str,
    from: usize,
    received: &Tensor,
    expected: &Shape,
) -> Result<()> {
    if received.shape() == expected {
        return Ok(());
    }
    Err(communication_error(
        comm,
        op,
        format!(
            "rank {from} sent shape {:?}, the plan expects {:?}",
            received.dims(),
            expected.dims()
        ),
    ))
}
