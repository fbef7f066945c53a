//! Helpers for the crates that launch their own CUDA kernels on candle tensors.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Instant;

use candle_core::cuda_backend::cudarc::driver::sys::{self, CUtensorMap};
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchArgs,
};
use candle_core::cuda_backend::cudarc::nvrtc::Ptx;
use candle_core::cuda_backend::{kernels, CudaDType, CudaDevice, CudaStorage, DeviceId, WrapErr};
use candle_core::op::BackpropOp;
use candle_core::{Shape, Storage, Tensor};

use crate::{Error, Result};

/// A kernel of one of our compiled modules, launched on its device's stream.
pub struct Kernel {
    function: CudaFunction,
    stream: Arc<CudaStream>,
}

impl std::ops::Deref for Kernel {
    type Target = CudaFunction;

    fn deref(&self) -> &CudaFunction {
        &self.function
    }
}

impl Kernel {
    /// A launch of the kernel on the device's stream.
    pub fn builder(&self) -> LaunchArgs<'_> {
        self.stream.launch_builder(&self.function)
    }
}

/// A process-wide map from a key (a device, or a device and a name) to a value made by its first
/// use and kept: a loaded module, a library handle, page-locked buffers. Only ever inserted
/// into, so a thread that panicked while holding it left it whole.
pub struct PerDevice<K, V> {
    values: OnceLock<Mutex<HashMap<K, V>>>,
}

impl<K: Eq + Hash, V: Clone> PerDevice<K, V> {
    pub const fn new() -> Self {
        Self {
            values: OnceLock::new(),
        }
    }

    /// The value of `key`, made by `make` if it has none yet.
    pub fn get_or_try_insert<E>(
        &self,
        key: K,
        make: impl FnOnce() -> std::result::Result<V, E>,
    ) -> std::result::Result<V, E> {
        let mut values = self
            .values
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(value) = values.get(&key) {
            return Ok(value.clone());
        }
        let value = make()?;
        values.insert(key, value.clone());
        Ok(value)
    }
}

impl<K: Eq + Hash, V: Clone> Default for PerDevice<K, V> {
    fn default() -> Self {
        Self::new()
    }
}

/// Kernel `name` of `module`, whose `image` is a fatbin of `turbo-kernels` (machine code for
/// the build's architecture, which loads without the driver's JIT, and PTX beside it for other
/// devices). Each module is loaded once per device and stays loaded.
pub fn kernel(
    dev: &CudaDevice,
    name: &str,
    module: &'static str,
    image: &'static [u8],
) -> candle_core::Result<Kernel> {
    static MODULES: PerDevice<(DeviceId, &'static str), Arc<CudaModule>> = PerDevice::new();
    let stream = dev.cuda_stream();
    let loaded = MODULES.get_or_try_insert((dev.id(), module), || {
        stream
            .context()
            .load_module(Ptx::from_binary(image.to_vec()))
            .w()
    })?;
    let function = loaded.load_function(name).w()?;
    Ok(Kernel { function, stream })
}

/// A kernel of each of candle's PTX modules that a request runs, in the order a request first
/// needs them: the casts and fills of loading, elementwise ops, reductions, indexing, selects,
/// and the strided convolutions of the VAE's encoder.
const CANDLE_MODULES: [(&str, &kernels::Module); 9] = [
    ("cast_f32_bf16", &kernels::CAST),
    ("fill_f32", &kernels::FILL),
    ("ucopy_bf16", &kernels::UNARY),
    ("badd_f32", &kernels::BINARY),
    ("affine_f32", &kernels::AFFINE),
    ("fast_sum_f32", &kernels::REDUCE),
    ("is_u32_f32", &kernels::INDEXING),
    ("where_u8_f32", &kernels::TERNARY),
    ("conv2d_f32", &kernels::CONV),
];

/// Loads candle's kernel modules onto `dev` on another thread, so that the driver's JIT
/// compilation of their PTX overlaps reading the weights instead of landing in the first stage
/// that touches each module (33–69 ms for all of them on an H100, `docs/performance.md` v16).
/// Candle keeps what is loaded. The thread logs each module's
/// time (debug) and the total (info), and returns the modules that failed to load, each with
/// its error (such a module fails again, with the same error, where candle loads it). Once
/// per device and process: `None` when it was started before.
pub fn compile_candle_kernels_ahead(
    dev: &CudaDevice,
) -> std::io::Result<Option<JoinHandle<Vec<String>>>> {
    static STARTED: Mutex<Vec<DeviceId>> = Mutex::new(Vec::new());
    let mut started = STARTED.lock().unwrap_or_else(PoisonError::into_inner);
    if started.contains(&dev.id()) {
        return Ok(None);
    }
    started.push(dev.id());
    let dev = dev.clone();
    std::thread::Builder::new()
        .name("candle-kernels-jit".into())
        .spawn(move || load_candle_modules(&dev))
        .map(Some)
}

fn load_candle_modules(dev: &CudaDevice) -> Vec<String> {
    let start = Instant::now();
    let mut failures = Vec::new();
    for (function, module) in CANDLE_MODULES {
        let module_start = Instant::now();
        match dev.get_or_load_func(function, module) {
            Ok(_) => tracing::debug!(
                ms = module_start.elapsed().as_secs_f64() * 1e3,
                "candle's module of {function} loaded"
            ),
            Err(error) => {
                tracing::warn!("loading candle's module of {function}: {error}");
                failures.push(format!("{function}: {error}"));
            }
        }
    }
    tracing::info!(
        ms = start.elapsed().as_secs_f64() * 1e3,
        "candle's kernel modules loaded ahead"
    );
    failures
}

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

/// A TMA descriptor, passed to a kernel by value (a `const __grid_constant__ CUtensorMap`
/// parameter): a tiled view of a row-major array in global memory whose boxes land in shared
/// memory in a swizzle that `wgmma` reads K-major operands in. Boxes past the array's edges
/// (negative coordinates too) read zeros.
#[repr(transparent)]
pub struct TensorMap(CUtensorMap);

// SAFETY: a plain 128-byte value that the kernel reads as its parameter.
unsafe impl DeviceRepr for TensorMap {}

/// How a [`TensorMap`]'s boxes are laid out in shared memory: the 16-byte units of each row
/// permuted within rows of 128 or 64 bytes (a box's innermost extent is at most that wide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Swizzle {
    Bytes128,
    Bytes64,
}

impl Swizzle {
    fn driver_mode(self) -> sys::CUtensorMapSwizzle {
        match self {
            Self::Bytes128 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_128B,
            Self::Bytes64 => sys::CUtensorMapSwizzle::CU_TENSOR_MAP_SWIZZLE_64B,
        }
    }
}

impl TensorMap {
    /// The map of the array at `ptr` with `dims` elements per dimension (innermost first) and
    /// `byte_strides` between consecutive indices of each dimension after the first (multiples
    /// of 16), read in boxes of `box_dims` elements (the innermost spanning at most the
    /// swizzle's row) that land in `swizzle`. `ptr` must stay valid while a kernel launched
    /// with the map runs.
    pub fn swizzled(
        ptr: sys::CUdeviceptr,
        data_type: sys::CUtensorMapDataType,
        dims: &[u64],
        byte_strides: &[u64],
        box_dims: &[u32],
        swizzle: Swizzle,
    ) -> Result<Self> {
        let rank = dims.len();
        if byte_strides.len() + 1 != rank || box_dims.len() != rank {
            return Err(Error::Candle(candle_core::Error::Msg(format!(
                "tensor map of rank {rank}: {} strides and {} box sizes",
                byte_strides.len(),
                box_dims.len()
            ))));
        }
        let element_strides = vec![1u32; rank];
        let mut map = std::mem::MaybeUninit::<CUtensorMap>::uninit();
        // SAFETY: every pointer is to a live array of the length the rank implies (checked
        // above); the driver writes the whole map or fails.
        unsafe {
            sys::cuTensorMapEncodeTiled(
                map.as_mut_ptr(),
                data_type,
                rank as u32,
                ptr as *mut std::ffi::c_void,
                dims.as_ptr(),
                byte_strides.as_ptr(),
                box_dims.as_ptr(),
                element_strides.as_ptr(),
                sys::CUtensorMapInterleave::CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle.driver_mode(),
                sys::CUtensorMapL2promotion::CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                sys::CUtensorMapFloatOOBfill::CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE,
            )
            .result()
            .map_err(|e| Error::Candle(candle_core::Error::wrap(e)))?;
            Ok(Self(map.assume_init()))
        }
    }
}
