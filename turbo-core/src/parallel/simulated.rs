//! Ranks as threads of one process, exchanging tensors through channels: the communicator the
//! tests check the sharding plans with (on the CPU, or on one GPU standing in for several).
//!
//! On a GPU each thread's work goes to its own stream (candle's CUDA device enqueues on the
//! calling thread's default stream), so a tensor crossing threads is not ordered with the
//! receiver's work by the stream. The exchange therefore waits for the sender's stream before
//! sending, and the receiver copies what it received onto its own stream and waits for that
//! copy: afterwards neither thread's work touches memory the other may reuse.

use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Mutex;

use candle_core::{Shape, Tensor};

use super::{check_lists, check_received, communication_error, empty_part, Communicator};
use crate::{Error, Result};

/// One rank of a group made by [`simulated_group`]: a channel to and from every rank (itself
/// included). Sends never block; a receive waits for the peer, and fails with
/// [`Error::Communication`] once the peer is gone (its thread ended or failed), so a failing
/// rank does not leave the others waiting forever.
#[derive(Debug)]
pub struct SimulatedCommunicator {
    rank: usize,
    to: Vec<Sender<Tensor>>,
    /// Behind a mutex only so that the communicator is `Sync`; one thread uses it at a time.
    from: Vec<Mutex<Receiver<Tensor>>>,
}

/// `world_size` connected ranks, rank `r` at index `r`: move each to a thread of its own.
pub fn simulated_group(world_size: usize) -> Vec<SimulatedCommunicator> {
    // links[i][j]: the channel from rank i to rank j.
    let mut senders: Vec<Vec<Sender<Tensor>>> = (0..world_size).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<Option<Receiver<Tensor>>>> = (0..world_size)
        .map(|_| (0..world_size).map(|_| None).collect())
        .collect();
    for (from, links) in senders.iter_mut().enumerate() {
        for to_receivers in receivers.iter_mut() {
            let (tx, rx) = channel();
            links.push(tx);
            to_receivers[from] = Some(rx);
        }
    }
    senders
        .into_iter()
        .zip(receivers)
        .enumerate()
        .map(|(rank, (to, from))| SimulatedCommunicator {
            rank,
            to,
            from: from
                .into_iter()
                .map(|rx| Mutex::new(rx.expect("every link was made")))
                .collect(),
        })
        .collect()
}

/// Runs `work` on `world_size` simulated ranks, each on a thread of its own, and returns their
/// results in rank order (the first error if any rank failed).
pub fn simulate<T, F>(world_size: usize, work: F) -> Result<Vec<T>>
where
    T: Send,
    F: Fn(&SimulatedCommunicator) -> Result<T> + Sync,
{
    std::thread::scope(|scope| {
        let handles: Vec<_> = simulated_group(world_size)
            .into_iter()
            .map(|comm| {
                let work = &work;
                // The communicator moves into its thread and is dropped when the thread ends,
                // which is what lets the other ranks see a failed peer.
                scope.spawn(move || work(&comm))
            })
            .collect();
        let results: Vec<Result<T>> = handles
            .into_iter()
            .enumerate()
            .map(|(rank, handle)| {
                handle.join().unwrap_or_else(|_| {
                    Err(Error::Communication {
                        op: "simulate",
                        rank,
                        world_size,
                        reason: "the rank's thread panicked".into(),
                    })
                })
            })
            .collect();
        first_failure_or_all(results)
    })
}

/// The results, or the error of the rank that failed first on its own: a rank's
/// `Communication` error that only reports a peer gone comes after the peer's own error.
fn first_failure_or_all<T>(results: Vec<Result<T>>) -> Result<Vec<T>> {
    let is_peer_gone =
        |e: &Error| matches!(e, Error::Communication { reason, .. } if reason.contains(PEER_GONE));
    let failed_first = results
        .iter()
        .position(|r| matches!(r, Err(e) if !is_peer_gone(e)))
        .or_else(|| results.iter().position(Result::is_err));
    match failed_first {
        Some(rank) => Err(results
            .into_iter()
            .nth(rank)
            .and_then(Result::err)
            .expect("an error at this rank")),
        None => results.into_iter().collect(),
    }
}

const PEER_GONE: &str = "has left the group";

impl Communicator for SimulatedCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.to.len()
    }

    fn all_to_all(&self, sends: &[Tensor], recv_shapes: &[Shape]) -> Result<Vec<Tensor>> {
        check_lists(self, "all_to_all", sends.len(), recv_shapes.len())?;
        // The parts must be complete before another thread's stream reads them.
        sends[self.rank].device().synchronize()?;
        // Empty parts are not transferred, as NCCL transfers none: the plan tells the peer to
        // expect nothing. So a group of ranks exchanges without the ranks outside it.
        for (peer, tensor) in sends.iter().enumerate() {
            if tensor.elem_count() > 0 {
                // A gone peer shows as a failed receive below, with its rank named.
                let _ = self.to[peer].send(tensor.clone());
            }
        }
        let received = recv_shapes
            .iter()
            .enumerate()
            .map(|(peer, shape)| {
                if shape.elem_count() == 0 {
                    return empty_part(&sends[self.rank], shape);
                }
                let received = self.receive(peer)?;
                check_received(self, "all_to_all", peer, &received, shape)?;
                Ok(received)
            })
            .collect::<Result<Vec<_>>>()?;
        let copies = received
            .iter()
            .enumerate()
            .map(|(peer, part)| own_copy(part, peer == self.rank))
            .collect::<Result<Vec<_>>>()?;
        // The copies are done before the originals may be freed, on either thread's stream.
        sends[self.rank].device().synchronize()?;
        drop(received);
        Ok(copies)
    }
}

/// A received GPU tensor as a copy made on this thread's stream (see the module notes); this
/// rank's own part and host tensors as they are.
fn own_copy(received: &Tensor, own: bool) -> Result<Tensor> {
    if own || received.device().is_cpu() {
        return Ok(received.clone());
    }
    Ok(received.copy()?)
}

impl SimulatedCommunicator {
    fn receive(&self, peer: usize) -> Result<Tensor> {
        let link = self.from[peer]
            .lock()
            .map_err(|_| communication_error(self, "all_to_all", "a poisoned link".into()))?;
        link.recv().map_err(|_| {
            communication_error(self, "all_to_all", format!("rank {peer} {PEER_GONE}"))
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    fn filled(value: f32, len: usize) -> Tensor {
        Tensor::full(value, len, &Device::Cpu).unwrap()
    }

    #[test]
    fn all_to_all_delivers_each_part_to_its_rank() {
        // Rank i sends to rank j a vector of i + 1 elements holding 10·i + j.
        let received = simulate(4, |comm| {
            let me = comm.rank();
            let sends: Vec<Tensor> = (0..4)
                .map(|j| filled((10 * me + j) as f32, me + 1))
                .collect();
            let shapes: Vec<Shape> = (0..4).map(|i| Shape::from(i + 1)).collect();
            comm.all_to_all(&sends, &shapes)
        })
        .unwrap();
        for (me, parts) in received.iter().enumerate() {
            for (i, part) in parts.iter().enumerate() {
                assert_eq!(
                    part.to_vec1::<f32>().unwrap(),
                    vec![(10 * i + me) as f32; i + 1]
                );
            }
        }
    }

    #[test]
    fn gather_and_broadcast() {
        let out = simulate(3, |comm| {
            let mine = filled(comm.rank() as f32, 2);
            let gathered = comm.all_gather(&mine, &vec![Shape::from(2); 3])?;
            let root = comm.broadcast(&mine, 2)?;
            Ok((gathered, root))
        })
        .unwrap();
        for (gathered, root) in out {
            let values: Vec<f32> = gathered
                .iter()
                .map(|t| t.to_vec1::<f32>().unwrap()[0])
                .collect();
            assert_eq!(values, [0.0, 1.0, 2.0]);
            assert_eq!(root.to_vec1::<f32>().unwrap(), [2.0, 2.0]);
        }
    }

    #[test]
    fn a_shape_the_plan_does_not_expect_is_an_error() {
        let err = simulate(2, |comm| {
            let sends = vec![Tensor::zeros(3, DType::F32, &Device::Cpu)?; 2];
            comm.all_to_all(&sends, &[Shape::from(3), Shape::from(4)])
        })
        .unwrap_err();
        assert!(
            matches!(&err, Error::Communication { op: "all_to_all", reason, .. } if reason.contains("rank 1 sent shape [3]")),
            "{err}"
        );
    }

    #[test]
    fn a_failed_rank_fails_the_others_instead_of_hanging() {
        let err = simulate(3, |comm| {
            if comm.rank() == 1 {
                return Err(Error::InvalidConfig {
                    field: "test".into(),
                    reason: "rank 1 fails before the exchange".into(),
                });
            }
            comm.all_gather(&filled(1.0, 1), &vec![Shape::from(1); 3])
        })
        .unwrap_err();
        // The error reported is rank 1's own, not the others' "peer gone".
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    }
}
