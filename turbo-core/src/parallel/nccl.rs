//! NCCL between processes, one per GPU (feature `nccl`): candle's re-export of cudarc's
//! `nccl` module, on the candle device's own stream so that transfers are ordered with the
//! kernels around them.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use candle_core::cuda_backend::cudarc::nccl::{Comm, Id, NcclType};
use candle_core::cuda_backend::{CudaDType, CudaDevice};
use std::sync::Mutex;

use candle_core::{DType, Device, Shape, Storage, Tensor};
use half::{bf16, f16};

use super::launch::{LaunchEnv, UNIQUE_ID_BYTES};
use super::{check_lists, check_received, communication_error, empty_part, Communicator};
use crate::cuda::tensor_from_cuda;
use crate::Result;

/// One rank of an NCCL communicator, on GPU `LOCAL_RANK` of its host.
///
/// ```no_run
/// use turbo_core::parallel::{Communicator, LaunchEnv, NcclCommunicator};
///
/// // Started once per GPU with RANK, WORLD_SIZE, LOCAL_RANK and MASTER_ADDR / MASTER_PORT
/// // (or TURBO_NCCL_ID_FILE) set, as scripts/multi-gpu.sh does.
/// let comm = NcclCommunicator::from_launch(&LaunchEnv::from_env()?)?;
/// println!("rank {} of {} on {:?}", comm.rank(), comm.world_size(), comm.device());
/// # Ok::<(), turbo_core::Error>(())
/// ```
#[derive(Debug)]
pub struct NcclCommunicator {
    /// Behind a mutex so that the communicator is `Sync` (a pipeline shared between threads
    /// holds it) while NCCL sees one caller at a time, as it requires of a communicator.
    comm: Mutex<MovableComm>,
    rank: usize,
    world_size: usize,
    device: Device,
}

/// cudarc's `Comm`, which is not `Send` only because it holds NCCL's raw handle. NCCL does not
/// tie a communicator to the thread that created it (it may be used from any thread, one at a
/// time: the mutex above sees to that), and the stream it enqueues on is `Send` and `Sync`.
#[derive(Debug)]
struct MovableComm(Comm);

// SAFETY: see `MovableComm`; every use goes through `NcclCommunicator::comm`'s mutex.
unsafe impl Send for MovableComm {}

impl NcclCommunicator {
    /// Opens GPU `env.local_rank`, shares rank 0's unique id through `env.rendezvous` and
    /// joins the communicator (blocking until every rank has joined).
    pub fn from_launch(env: &LaunchEnv) -> Result<Self> {
        let device = crate::DeviceSpec::Cuda(env.local_rank).open()?;
        let fail = |reason: String| crate::Error::Communication {
            op: "init",
            rank: env.rank,
            world_size: env.world_size,
            reason,
        };
        let id = env.share_unique_id(|| {
            let id = Id::new().map_err(|e| fail(format!("ncclGetUniqueId: {e:?}")))?;
            Ok(id.internal().map(|c| c as u8))
        })?;
        let stream = device.as_cuda_device()?.cuda_stream();
        let comm = Comm::from_rank(stream, env.rank, env.world_size, Id::uninit(id_chars(&id)))
            .map_err(|e| fail(format!("ncclCommInitRank: {e:?}")))?;
        Ok(Self {
            rank: comm.rank(),
            world_size: comm.world_size(),
            comm: Mutex::new(MovableComm(comm)),
            device,
        })
    }

    /// The GPU this rank computes on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    fn cuda(&self) -> Result<&CudaDevice> {
        Ok(self.device.as_cuda_device()?)
    }

    /// The exchange of [`Communicator::all_to_all`] for element type `T`: one NCCL group of a
    /// send and a receive per peer (none for empty parts; this rank's own part is kept as is).
    /// Nothing of zero size is allocated or copied: CUDA refuses zero-byte allocations.
    fn exchange<T>(&self, sends: &[Tensor], recv_shapes: &[Shape]) -> Result<Vec<Tensor>>
    where
        T: CudaDType + NcclType + DeviceRepr + ValidAsZeroBits,
    {
        let me = self.rank();
        let transferred = |peer: usize, elements: usize| peer != me && elements > 0;
        let outgoing = sends
            .iter()
            .enumerate()
            .map(|(peer, t)| {
                transferred(peer, t.elem_count())
                    .then(|| t.contiguous())
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<Option<Tensor>>>>()?;
        let cuda = self.cuda()?;
        let mut incoming = recv_shapes
            .iter()
            .enumerate()
            .map(|(peer, shape)| {
                transferred(peer, shape.elem_count())
                    .then(|| cuda.alloc_zeros::<T>(shape.elem_count()))
                    .transpose()
            })
            .collect::<candle_core::Result<Vec<Option<CudaSlice<T>>>>>()?;
        self.transfer(&outgoing, &mut incoming)?;
        incoming
            .into_iter()
            .zip(recv_shapes)
            .enumerate()
            .map(|(peer, (buffer, shape))| match buffer {
                Some(buffer) => Ok(tensor_from_cuda(buffer, cuda, shape.clone())),
                None if peer == me => {
                    check_received(self, "all_to_all", me, &sends[me], shape)?;
                    Ok(sends[me].clone())
                }
                None => empty_part(&sends[me], shape),
            })
            .collect()
    }

    /// Queues the sends and receives of one exchange as one NCCL group on the device's stream.
    fn transfer<T>(
        &self,
        outgoing: &[Option<Tensor>],
        incoming: &mut [Option<CudaSlice<T>>],
    ) -> Result<()>
    where
        T: CudaDType + NcclType + DeviceRepr,
    {
        let storages: Vec<_> = outgoing
            .iter()
            .map(|t| t.as_ref().map(Tensor::storage_and_layout))
            .collect();
        let views = storages
            .iter()
            .map(|part| {
                part.as_ref()
                    .map(|(storage, layout)| {
                        let len = layout.shape().elem_count();
                        device_elements::<T>(storage, layout.start_offset(), len, self)
                    })
                    .transpose()
            })
            .collect::<Result<Vec<Option<CudaView<'_, T>>>>>()?;
        let comm = self.comm.lock().map_err(|_| {
            communication_error(self, "all_to_all", "an earlier exchange panicked".into())
        })?;
        let nccl = |e| communication_error(self, "all_to_all", format!("{e:?}"));
        let mut group = comm.0.group();
        for (peer, (view, buffer)) in views.into_iter().zip(incoming.iter_mut()).enumerate() {
            if let Some(view) = view {
                group.send(view, peer as i32).map_err(nccl)?;
            }
            if let Some(buffer) = buffer {
                group
                    .recv(buffer.slice_mut(..), peer as i32)
                    .map_err(nccl)?;
            }
        }
        // Dropping the group ends it: the transfers are queued on the device's stream.
        Ok(())
    }
}

/// `len` elements from `offset` of a CUDA storage of `T`.
fn device_elements<'a, T: CudaDType>(
    storage: &'a Storage,
    offset: usize,
    len: usize,
    comm: &NcclCommunicator,
) -> Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(cuda) => Ok(cuda.as_cuda_slice::<T>()?.slice(offset..offset + len)),
        _ => Err(communication_error(
            comm,
            "all_to_all",
            "a tensor to send is not on the GPU".into(),
        )),
    }
}

/// The id's bytes as NCCL's `char` array.
fn id_chars(id: &[u8; UNIQUE_ID_BYTES]) -> [std::ffi::c_char; UNIQUE_ID_BYTES] {
    id.map(|b| b as std::ffi::c_char)
}

impl Communicator for NcclCommunicator {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_to_all(&self, sends: &[Tensor], recv_shapes: &[Shape]) -> Result<Vec<Tensor>> {
        check_lists(self, "all_to_all", sends.len(), recv_shapes.len())?;
        let dtype = sends[self.rank()].dtype();
        if let Some(other) = sends.iter().find(|t| t.dtype() != dtype) {
            return Err(communication_error(
                self,
                "all_to_all",
                format!("parts of dtypes {dtype:?} and {:?}", other.dtype()),
            ));
        }
        match dtype {
            DType::F32 => self.exchange::<f32>(sends, recv_shapes),
            DType::BF16 => self.exchange::<bf16>(sends, recv_shapes),
            DType::F16 => self.exchange::<f16>(sends, recv_shapes),
            other => Err(communication_error(
                self,
                "all_to_all",
                format!("dtype {other:?}: NCCL transfers here take f32, bf16 or f16"),
            )),
        }
    }
}

/// A pipeline shared between threads holds its communicator, which must therefore be both.
const _: fn() = || {
    fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<NcclCommunicator>();
};
