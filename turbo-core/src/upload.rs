//! Host bytes (a tensor's slice of a mapped weight file) onto a device.
//!
//! A CUDA copy from pageable memory goes through the driver's own staging buffer one piece at a
//! time, and from a mapped file it also takes the faults of the file's pages inside the copy,
//! on one thread. A large tensor instead goes through two page-locked buffers kept per device:
//! several threads fill one from the source while the device reads the other.

use candle_core::{DType, Device, Tensor};

use crate::{Error, Result};

/// Tensors of at least this many bytes go through the page-locked buffers; a smaller one is
/// copied directly (two event waits would cost more than they save). On an H100 the buffers
/// moved the 1.3B `-quant.pth` at 29 GB/s against 9.8 GB/s for pageable copies (bench `e2e`):
/// at those rates a MiB takes 36 against 107 µs, well above the waits, so the 2.4 MB q/k/v/o
/// weights of the 1.3B DiT take them too.
pub const STAGED_MIN_BYTES: usize = 1 << 20;

/// The tensor of `dtype` and `shape` on `device` whose elements are `bytes` (little-endian, in
/// row-major order, nothing between them).
pub fn tensor_from_bytes(
    bytes: &[u8],
    dtype: DType,
    shape: &[usize],
    device: &Device,
) -> Result<Tensor> {
    let elements: usize = shape.iter().product();
    if elements.checked_mul(dtype.size_in_bytes()) != Some(bytes.len()) {
        return Err(Error::Candle(candle_core::Error::Msg(format!(
            "{} bytes are not a {dtype:?} tensor of shape {shape:?}",
            bytes.len()
        ))));
    }
    #[cfg(feature = "cuda")]
    if let (Device::Cuda(cuda), true) = (device, bytes.len() >= STAGED_MIN_BYTES) {
        if let Some(tensor) = staged::upload(bytes, dtype, shape, cuda)? {
            return Ok(tensor);
        }
    }
    Ok(Tensor::from_raw_buffer(bytes, dtype, shape, device)?)
}

#[cfg(feature = "cuda")]
mod staged {
    use std::sync::{Arc, Mutex, PoisonError};

    use candle_core::cuda_backend::cudarc::driver::{
        result, CudaEvent, CudaSlice, CudaStream, DevicePtrMut, DeviceRepr, PinnedHostSlice,
    };
    use candle_core::cuda_backend::{CudaDType, CudaDevice, CudaStorage, DeviceId};
    use candle_core::op::BackpropOp;
    use candle_core::{DType, Storage, Tensor};

    use crate::cuda::PerDevice;
    use crate::{Error, Result};

    /// Bytes of each page-locked buffer: two per device, kept for the process.
    const CHUNK_BYTES: usize = 32 << 20;
    /// Threads that copy a chunk into its buffer, so that the source's page faults and
    /// memory reads proceed in parallel.
    const COPY_THREADS: usize = 4;

    /// A page-locked buffer and the event after the device's last read of it.
    struct Buffer {
        host: PinnedHostSlice<u8>,
        read: CudaEvent,
    }

    struct Staging {
        buffers: [Buffer; 2],
    }

    fn driver_error(e: impl std::fmt::Display) -> Error {
        Error::Candle(candle_core::Error::Msg(format!("CUDA upload: {e}")))
    }

    impl Staging {
        fn new(stream: &CudaStream) -> Result<Self> {
            let buffer = || -> Result<Buffer> {
                let ctx = stream.context();
                // SAFETY: only ever written before the device reads it.
                let host = unsafe { ctx.alloc_pinned::<u8>(CHUNK_BYTES) }.map_err(driver_error)?;
                let read = ctx.new_event(None).map_err(driver_error)?;
                Ok(Buffer { host, read })
            };
            Ok(Self {
                buffers: [buffer()?, buffer()?],
            })
        }
    }

    /// The staging buffers of `device`, allocated by its first upload.
    fn staging_of(device: &CudaDevice) -> Result<Arc<Mutex<Staging>>> {
        static ALL: PerDevice<DeviceId, Arc<Mutex<Staging>>> = PerDevice::new();
        ALL.get_or_try_insert(device.id(), || {
            Ok(Arc::new(Mutex::new(Staging::new(&device.cuda_stream())?)))
        })
    }

    /// `bytes` as a `dtype` tensor of `shape` on `device` (the length checked by the caller),
    /// or `None` for a dtype this path does not hold (the caller copies directly).
    pub(super) fn upload(
        bytes: &[u8],
        dtype: DType,
        shape: &[usize],
        device: &CudaDevice,
    ) -> Result<Option<Tensor>> {
        let storage = match dtype {
            DType::U8 => storage::<u8>(bytes, device)?,
            DType::BF16 => storage::<half::bf16>(bytes, device)?,
            DType::F16 => storage::<half::f16>(bytes, device)?,
            DType::F32 => storage::<f32>(bytes, device)?,
            _ => return Ok(None),
        };
        let storage = Storage::Cuda(storage);
        Ok(Some(Tensor::from_storage(
            storage,
            shape,
            BackpropOp::none(),
            false,
        )))
    }

    fn storage<T: CudaDType + DeviceRepr>(
        bytes: &[u8],
        device: &CudaDevice,
    ) -> Result<CudaStorage> {
        let stream = device.cuda_stream();
        let len = bytes.len() / std::mem::size_of::<T>();
        // SAFETY: every byte is written by the copies below before anything reads it.
        let mut slice: CudaSlice<T> = unsafe { stream.alloc(len) }.map_err(driver_error)?;
        copy_through_staging(bytes, &mut slice, device, &stream)?;
        Ok(CudaStorage::wrap_cuda_slice(slice, device.clone()))
    }

    /// Copies `bytes` into `slice` a chunk at a time, alternating the two buffers: a buffer is
    /// refilled once the device has read its previous chunk.
    fn copy_through_staging<T>(
        bytes: &[u8],
        slice: &mut CudaSlice<T>,
        device: &CudaDevice,
        stream: &Arc<CudaStream>,
    ) -> Result<()> {
        let staging = staging_of(device)?;
        // A copy that panicked left the buffers as good as any other.
        let mut staging = staging.lock().unwrap_or_else(PoisonError::into_inner);
        stream.context().bind_to_thread().map_err(driver_error)?;
        let (base, _written) = slice.device_ptr_mut(stream);
        for (index, chunk) in bytes.chunks(CHUNK_BYTES).enumerate() {
            let buffer = &mut staging.buffers[index % 2];
            buffer.read.synchronize().map_err(driver_error)?;
            let host = &mut buffer.host.as_mut_slice().map_err(driver_error)?[..chunk.len()];
            parallel_copy(chunk, host);
            let offset = (index * CHUNK_BYTES) as u64;
            // SAFETY: `base + offset` lies in `slice` with `chunk.len()` bytes after it, and
            // `host` is page-locked and is not written again before `read` says the copy ran.
            unsafe { result::memcpy_htod_async(base + offset, &*host, stream.cu_stream()) }
                .map_err(driver_error)?;
            buffer.read.record(stream).map_err(driver_error)?;
        }
        Ok(())
    }

    /// `dst.copy_from_slice(src)` on [`COPY_THREADS`] threads.
    fn parallel_copy(src: &[u8], dst: &mut [u8]) {
        let part = src.len().div_ceil(COPY_THREADS).max(1);
        std::thread::scope(|scope| {
            for (src, dst) in src.chunks(part).zip(dst.chunks_mut(part)) {
                scope.spawn(move || dst.copy_from_slice(src));
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_become_the_tensor_they_encode() {
        let values = [1.5f32, -2.0, 0.25, 8.0, 3.0, -0.5];
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let tensor = tensor_from_bytes(&bytes, DType::F32, &[2, 3], &Device::Cpu).unwrap();
        assert_eq!(tensor.dims(), [2, 3]);
        assert_eq!(
            tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            values
        );
    }

    #[test]
    fn a_length_that_is_not_the_shapes_is_an_error() {
        let error = tensor_from_bytes(&[0u8; 10], DType::F32, &[3], &Device::Cpu).unwrap_err();
        assert!(error.to_string().contains("10 bytes"), "{error}");
        assert!(tensor_from_bytes(&[0u8; 12], DType::BF16, &[3], &Device::Cpu).is_err());
    }
}
