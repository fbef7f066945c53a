//! Multi-GPU runs of the pipeline: the ranks of a communicator, how the DiT's work is split
//! between them, the checks that every rank gets a share (before any stage), and the agreement
//! of all ranks that their checks passed.
//!
//! Every rank runs the whole pipeline on the same request: it encodes the prompts (and the
//! image) itself, draws the same noise, and drives the same sampler; only the DiT's velocities
//! and the VAE decode are computed together. The sampled latent is therefore the same on every
//! rank, and so is the decoded video (the parallel decode gathers it on every rank).

use std::fmt;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use turbo_core::parallel::{Communicator, LaunchEnv, Partition};
use turbo_core::{Error, Result, VideoGeometry};
use turbo_models::wan::QuantPolicy;

use super::{Pipeline, WeightSource};

/// A communicator that a pipeline, and its clones on other threads, can hold: a
/// `turbo_core::parallel::NcclCommunicator` (one process per GPU) or one rank of a
/// `turbo_core::parallel::simulated_group` (ranks as threads, for tests).
pub type SharedCommunicator = Arc<dyn Communicator + Send + Sync>;

/// This process's place in a multi-GPU launch, joined: the communicator of all ranks and this
/// rank's GPU, `cuda:LOCAL_RANK`.
#[derive(Clone)]
pub struct Launched {
    pub comm: SharedCommunicator,
    pub device: Device,
}

impl fmt::Debug for Launched {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Launched")
            .field("rank", &self.comm.rank())
            .field("world_size", &self.comm.world_size())
            .field("device", &self.device)
            .finish()
    }
}

impl Launched {
    /// Joins the multi-GPU launch the environment describes (`RANK`, `WORLD_SIZE`,
    /// `LOCAL_RANK`, `MASTER_ADDR` / `MASTER_PORT` or `TURBO_NCCL_ID_FILE`, as
    /// `scripts/multi-gpu.sh` sets them; see [`LaunchEnv`]), blocking until every rank has
    /// joined; `None` for one process (`WORLD_SIZE` unset or 1). Several processes need the
    /// `nccl` feature: without it this is an [`Error::Launch`] that says so.
    pub fn from_env() -> Result<Option<Self>> {
        let env = LaunchEnv::from_env()?;
        if env.world_size == 1 {
            return Ok(None);
        }
        join_nccl(&env).map(Some)
    }

    pub fn rank(&self) -> usize {
        self.comm.rank()
    }

    pub fn world_size(&self) -> usize {
        self.comm.world_size()
    }
}

#[cfg(feature = "nccl")]
fn join_nccl(env: &LaunchEnv) -> Result<Launched> {
    let comm = turbo_core::parallel::NcclCommunicator::from_launch(env)?;
    let device = comm.device().clone();
    Ok(Launched {
        comm: Arc::new(comm),
        device,
    })
}

#[cfg(not(feature = "nccl"))]
fn join_nccl(env: &LaunchEnv) -> Result<Launched> {
    Err(Error::Launch {
        var: "WORLD_SIZE",
        value: env.world_size.to_string(),
        reason: "several processes need NCCL, and this program was built without it: build \
                 it with `--features nccl` (libnccl.so on LIBRARY_PATH; docs/usage.md, Several \
                 GPUs), or unset WORLD_SIZE"
            .into(),
    })
}

/// The ranks a pipeline runs on: one device, or those of a communicator.
#[derive(Clone, Default)]
pub(super) struct Ranks(Option<SharedCommunicator>);

impl fmt::Debug for Ranks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Ranks")
            .field("rank", &self.rank())
            .field("world_size", &self.world_size())
            .finish()
    }
}

impl Ranks {
    pub(super) fn new(comm: SharedCommunicator) -> Self {
        Self(Some(comm))
    }

    /// The communicator of a run on several ranks; `None` for one device (a communicator of
    /// one rank included: that run is exactly the one-device run).
    pub(super) fn several(&self) -> Option<&dyn Communicator> {
        self.0
            .as_deref()
            .filter(|comm| comm.world_size() > 1)
            .map(|comm| comm as &dyn Communicator)
    }

    pub(super) fn rank(&self) -> usize {
        self.0.as_ref().map_or(0, |comm| comm.rank())
    }

    pub(super) fn world_size(&self) -> usize {
        self.0.as_ref().map_or(1, |comm| comm.world_size())
    }

    /// Only rank 0 writes output files: the other ranks hold the same frames.
    pub(super) fn writes_output(&self) -> bool {
        self.rank() == 0
    }

    /// `local` (this rank's checks before any work) when every rank's checks passed. Checks
    /// that depend on the device (free memory, files on a host's disk) can fail on one rank
    /// only; without this exchange the others would wait for it in their first collective
    /// forever. Every rank must call it at the same point of a run.
    pub(super) fn agree<T>(&self, device: &Device, local: Result<T>) -> Result<T> {
        let Some(comm) = self.several() else {
            return local;
        };
        let failed = raised_flags(comm, device, local.is_err())?;
        let local = local?;
        match failed.first() {
            Some(rank) => Err(Error::Communication {
                op: "checks before the run",
                rank: comm.rank(),
                world_size: comm.world_size(),
                reason: format!("rank {rank} failed its checks (its own error says why)"),
            }),
            None => Ok(local),
        }
    }

    /// Whether any rank raised its flag (`raised` on this one); every rank gets the same
    /// answer. On one device: `raised`.
    pub(super) fn any(&self, device: &Device, raised: bool) -> Result<bool> {
        match self.several() {
            Some(comm) => Ok(!raised_flags(comm, device, raised)?.is_empty()),
            None => Ok(raised),
        }
    }
}

/// The ranks of `comm` whose flag is raised (`raised`: this rank's), exchanged as one `f32` per
/// rank on `device` (NCCL moves device memory only).
fn raised_flags(comm: &dyn Communicator, device: &Device, raised: bool) -> Result<Vec<usize>> {
    let flag = Tensor::new(&[f32::from(u8::from(raised))], device)?;
    let shapes = vec![flag.shape().clone(); comm.world_size()];
    let flags = comm.all_gather(&flag, &shapes)?;
    let mut raised_by = Vec::new();
    for (rank, flag) in flags.iter().enumerate() {
        if flag.to_vec1::<f32>()?[0] != 0.0 {
            raised_by.push(rank);
        }
    }
    Ok(raised_by)
}

impl Pipeline {
    /// Every rank gets a share of the DiT's tokens (sequence parallel) and a band of the
    /// decode's latent rows, or [`Error::TooManyRanks`].
    pub(super) fn check_split(&self, split: DitSplit, geometry: VideoGeometry) -> Result<()> {
        let world_size = self.ranks.world_size();
        if world_size == 1 {
            return Ok(());
        }
        let latent = self.models.vae.latent_shape(geometry);
        check_token_split(
            split,
            world_size,
            latent.token_count(),
            self.token_alignment(),
        )?;
        check_row_split(world_size, latent.height)
    }

    /// See [`token_alignment`].
    pub(super) fn token_alignment(&self) -> usize {
        let any_file = std::iter::once(&self.models.dit_weights)
            .chain(&self.models.dit_low_noise_weights)
            .any(|source| matches!(source, WeightSource::File(_)));
        token_alignment(self.quant_linear == QuantPolicy::Quantize, any_file)
    }
}

/// How the DiT's work is shared between the ranks of a run.
///
/// The rule: on one device, nothing is shared. A guided teacher (two passes per step) on an
/// even number of ranks runs CFG-parallel: the conditional pass on the first half of the
/// ranks, the unconditional one on the second, one velocity exchanged per step between
/// partner ranks. On two ranks each rank runs whole forwards, against the two all-to-alls per
/// block of sequence parallelism (80 per forward at 14B), so it scales better, at the cost of
/// each rank holding a whole forward's activations; on four or more, each half runs its pass
/// sequence parallel. Every other run on several ranks (rCM, teachers with guidance 1,
/// teachers on an odd number of ranks) runs the DiT sequence parallel (Ulysses) over all
/// ranks, which also divides the activation memory by the ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DitSplit {
    OneDevice,
    /// Ulysses: every rank holds a shard of the tokens.
    Sequence,
    /// The two passes of classifier-free guidance on the two halves of the ranks, each half
    /// sequence parallel when it has more than one rank.
    Cfg,
}

impl DitSplit {
    /// The split of a run on `world_size` ranks; `guided`: two model passes per step.
    pub(super) fn choose(world_size: usize, guided: bool) -> Self {
        match world_size {
            0 | 1 => Self::OneDevice,
            n if guided && n % 2 == 0 => Self::Cfg,
            _ => Self::Sequence,
        }
    }

    /// The ranks that split one forward's tokens between them.
    pub(super) fn sequence_ranks(self, world_size: usize) -> usize {
        match self {
            Self::OneDevice => 1,
            Self::Sequence => world_size,
            Self::Cfg => world_size / 2,
        }
    }

    /// The tokens one rank's blocks hold: the largest shard under sequence parallelism,
    /// every token when one rank runs whole forwards.
    pub(super) fn tokens_per_rank(self, tokens: usize, world_size: usize, align: usize) -> usize {
        match self.sequence_ranks(world_size) {
            0 | 1 => tokens,
            ranks => {
                Partition::aligned(tokens, ranks, align).map_or(tokens, |shards| shards.len(0))
            }
        }
    }
}

/// The token alignment of the DiT's shards: W8A8 linears quantise 128-row activation tiles,
/// so an int8 model's shards start on them (`WanModel::forward_sequence_parallel`). Whether a
/// checkpoint file is a `-quant` one is only known once it is read, so a file counts as one:
/// the checks before the run may then ask for fewer ranks than a float file allows, never for
/// more than the DiT takes.
pub(super) fn token_alignment(quantise: bool, any_file: bool) -> usize {
    if quantise || any_file {
        turbo_quant::TILE
    } else {
        1
    }
}

/// Fails with [`Error::TooManyRanks`] when the DiT's `tokens`, in shards aligned to `align`,
/// leave a rank of a sequence-parallel forward without any.
pub(super) fn check_token_split(
    split: DitSplit,
    world_size: usize,
    tokens: usize,
    align: usize,
) -> Result<()> {
    let shards = tokens.div_ceil(align);
    let ranks = split.sequence_ranks(world_size);
    if shards >= ranks {
        return Ok(());
    }
    let per_pass = match split {
        DitSplit::Cfg => format!(" ({ranks} ranks per guidance pass)"),
        DitSplit::OneDevice | DitSplit::Sequence => String::new(),
    };
    Err(Error::TooManyRanks {
        world_size,
        what: format!("the DiT's {tokens} tokens (in shards of {align}){per_pass}"),
        parts: shards,
        help: "use fewer GPUs, or a larger or longer video".into(),
    })
}

/// Fails with [`Error::TooManyRanks`] when the parallel VAE decode's bands of latent rows
/// (one per rank) outnumber the `rows`.
pub(super) fn check_row_split(world_size: usize, rows: usize) -> Result<()> {
    if world_size <= rows {
        return Ok(());
    }
    Err(Error::TooManyRanks {
        world_size,
        what: format!("the VAE decode's {rows} latent rows"),
        parts: rows,
        help: "use fewer GPUs, or a taller video".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cfg_parallel_for_guided_runs_on_an_even_number_of_ranks() {
        assert_eq!(DitSplit::choose(1, true), DitSplit::OneDevice);
        assert_eq!(DitSplit::choose(2, true), DitSplit::Cfg);
        assert_eq!(DitSplit::choose(2, false), DitSplit::Sequence);
        assert_eq!(DitSplit::choose(3, true), DitSplit::Sequence);
        assert_eq!(DitSplit::choose(4, true), DitSplit::Cfg);
        assert_eq!(DitSplit::choose(8, false), DitSplit::Sequence);
    }

    #[test]
    fn a_rank_per_token_shard_at_most() {
        assert!(check_token_split(DitSplit::Sequence, 3, 3, 1).is_ok());
        assert!(matches!(
            check_token_split(DitSplit::Sequence, 3, 256, 128),
            Err(Error::TooManyRanks { parts: 2, .. })
        ));
        // Two CFG-parallel ranks run whole forwards: no shards to run out of. On six, each
        // pass is split in three.
        assert!(check_token_split(DitSplit::Cfg, 2, 1, 128).is_ok());
        assert!(check_token_split(DitSplit::Cfg, 4, 256, 128).is_ok());
        assert!(matches!(
            check_token_split(DitSplit::Cfg, 6, 256, 128),
            Err(Error::TooManyRanks {
                world_size: 6,
                parts: 2,
                ..
            })
        ));
        assert_eq!(DitSplit::Sequence.tokens_per_rank(300, 2, 128), 256);
        assert_eq!(DitSplit::Cfg.tokens_per_rank(300, 2, 128), 300);
        assert_eq!(DitSplit::Cfg.tokens_per_rank(300, 4, 128), 256);
    }
}
