//! Helpers for the crates that launch their own CUDA kernels on candle tensors.

use candle_core::cuda_backend::cudarc::driver::{CudaSlice, CudaView};
use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage};
use candle_core::op::BackpropOp;
use candle_core::{Shape, Storage, Tensor};

use crate::{Error, Result};

/// The device elements of a CUDA tensor's storage from element `offset` on (`what` names the
/// tensor in the error when the storage is not on CUDA or not of type `T`).
pub fn cuda_view<'a, T: CudaDType>(
    storage: &'a Storage,
    offset: usize,
    what: &str,
) -> Result<CudaView<'a, T>> {
    match storage {
        Storage::Cuda(cuda) => Ok(cuda.as_cuda_slice::<T>()?.slice(offset..)),
        _ => Err(Error::Candle(candle_core::Error::Msg(format!(
            "{what}: a CUDA kernel needs a CUDA tensor"
        )))),
    }
}

/// A contiguous tensor of `shape` over a kernel's output buffer.
pub fn tensor_from_cuda<T: CudaDType>(
    slice: CudaSlice<T>,
    device: &CudaDevice,
    shape: impl Into<Shape>,
) -> Tensor {
    let storage = Storage::Cuda(CudaStorage::wrap_cuda_slice(slice, device.clone()));
    Tensor::from_storage(storage, shape, BackpropOp::none(), false)
}
