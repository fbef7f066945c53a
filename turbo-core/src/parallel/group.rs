//! Some of a communicator's ranks as a communicator of their own: the ranks of a guided
//! teacher that compute one of its two passes, sequence parallel among themselves.

use candle_core::{Shape, Tensor};

use super::{check_lists, empty_part, Communicator};
use crate::{Error, Result};

/// The ranks `members` of a parent communicator, renumbered from 0 in the order given.
///
/// An exchange of the group is one of the parent with empty parts for the ranks outside the
/// group, which no communicator transfers: groups of disjoint ranks exchange side by side,
/// each without waiting for the others. Every member must make the group's exchanges in the
/// same order, as with any communicator.
///
/// ```
/// use candle_core::{Device, Shape, Tensor};
/// use turbo_core::parallel::{simulate, Communicator, Group};
///
/// // Four ranks in two groups, {0, 1} and {2, 3}: each gathers its own members' ranks.
/// let gathered = simulate(4, |comm| {
///     let members = if comm.rank() < 2 { vec![0, 1] } else { vec![2, 3] };
///     let group = Group::new(comm, members)?;
///     let mine = Tensor::new(&[comm.rank() as f32], &Device::Cpu)?;
///     let parts = group.all_gather(&mine, &[Shape::from(1), Shape::from(1)])?;
///     Ok(Tensor::cat(&parts, 0)?.to_vec1::<f32>()?)
/// })?;
/// assert_eq!(gathered, [[0.0, 1.0], [0.0, 1.0], [2.0, 3.0], [2.0, 3.0]]);
/// # Ok::<(), turbo_core::Error>(())
/// ```
pub struct Group<'a> {
    parent: &'a dyn Communicator,
    members: Vec<usize>,
    rank: usize,
}

impl std::fmt::Debug for Group<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("members", &self.members)
            .field("rank", &self.rank)
            .finish_non_exhaustive()
    }
}

impl<'a> Group<'a> {
    /// Fails with [`Error::InvalidConfig`] when a member is not a rank of `parent` or is
    /// listed twice, or when the calling rank is not a member.
    pub fn new(parent: &'a dyn Communicator, members: Vec<usize>) -> Result<Self> {
        let invalid = |reason: String| Error::InvalidConfig {
            field: "communicator group".into(),
            reason,
        };
        let world = parent.world_size();
        if let Some(rank) = members.iter().find(|&&rank| rank >= world) {
            return Err(invalid(format!(
                "rank {rank} of {members:?} is not a rank of a group of {world}"
            )));
        }
        let mut sorted = members.clone();
        sorted.sort_unstable();
        if sorted.windows(2).any(|pair| pair[0] == pair[1]) {
            return Err(invalid(format!("{members:?} lists a rank twice")));
        }
        let rank = members
            .iter()
            .position(|&rank| rank == parent.rank())
            .ok_or_else(|| {
                invalid(format!(
                    "rank {} is not one of the members {members:?}",
                    parent.rank()
                ))
            })?;
        Ok(Self {
            parent,
            members,
            rank,
        })
    }

    /// The parent's ranks of the members, in the group's order.
    pub fn members(&self) -> &[usize] {
        &self.members
    }
}

impl Communicator for Group<'_> {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.members.len()
    }

    fn all_to_all(&self, sends: &[Tensor], recv_shapes: &[Shape]) -> Result<Vec<Tensor>> {
        check_lists(self, "all_to_all", sends.len(), recv_shapes.len())?;
        let nothing = Shape::from(0);
        let empty = empty_part(&sends[self.rank], &nothing)?;
        let mut parent_sends = vec![empty; self.parent.world_size()];
        let mut parent_shapes = vec![nothing; self.parent.world_size()];
        for ((&member, part), shape) in self.members.iter().zip(sends).zip(recv_shapes) {
            parent_sends[member] = part.clone();
            parent_shapes[member] = shape.clone();
        }
        let received = self.parent.all_to_all(&parent_sends, &parent_shapes)?;
        Ok(self
            .members
            .iter()
            .map(|&member| received[member].clone())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::parallel::{simulate, SequenceParallel};

    #[test]
    fn groups_of_disjoint_ranks_exchange_side_by_side() {
        // Six ranks in groups {0, 2, 4} and {5, 3, 1} (listed out of order): a sequence
        // parallel round trip in each gives back every member's own shard.
        let x = Tensor::arange(0f32, 7.0 * 5.0 * 2.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 7, 5, 2))
            .unwrap();
        let results = simulate(6, |comm| {
            let members = if comm.rank() % 2 == 0 {
                vec![0, 2, 4]
            } else {
                vec![5, 3, 1]
            };
            let group = Group::new(comm, members)?;
            let sp = SequenceParallel::new(&group, 7, 1)?;
            let local = sp.shard_tokens(&x, 1)?;
            let by_heads = sp.scatter_heads(&local)?;
            let back = sp.gather_heads(&by_heads, 5)?;
            let diff = (back - &local)?.abs()?.sum_all()?.to_scalar::<f32>()?;
            Ok((group.rank(), diff))
        })
        .unwrap();
        let group_ranks: Vec<usize> = results.iter().map(|(rank, _)| *rank).collect();
        assert_eq!(group_ranks, [0, 2, 1, 1, 2, 0]);
        assert!(results.iter().all(|(_, diff)| *diff == 0.0));
    }

    #[test]
    fn members_are_checked() {
        let errors = simulate(2, |comm| {
            let reason = |members: Vec<usize>| match Group::new(comm, members) {
                Err(Error::InvalidConfig { reason, .. }) => reason,
                other => panic!("expected an invalid group, got {other:?}"),
            };
            Ok([
                reason(vec![0, 2]),
                reason(vec![1, 1, 0]),
                reason(vec![1 - comm.rank()]),
            ])
        })
        .unwrap();
        assert!(errors[0][0].contains("rank 2 of [0, 2] is not a rank"));
        assert!(errors[0][1].contains("lists a rank twice"));
        assert!(errors[0][2].contains("rank 0 is not one of the members [1]"));
    }
}
