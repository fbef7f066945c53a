//! The float linears' product on CUDA: `y = x·Wᵀ (+ b)` for bf16 and f16 through cuBLASLt.
//!
//! Why not candle's `matmul`: it runs cuBLAS's strided-batched GEMM on `x · Wᵀ` with the
//! algorithm cuBLAS picks by default, and adds the bias in a second pass over `y`. Here the
//! weight is read in the layout it is stored in (`W` `[N, K]` row-major is a column-major
//! `K × N` matrix, transposed by the GEMM), the bias is added in the epilogue before `y` is
//! rounded, and the algorithm is chosen once per shape by timing cuBLASLt's heuristic
//! candidates on the first call (as PyTorch's `F.linear` does on Hopper, where this closes
//! most of the gap `docs/performance.md` measured).
//!
//! f32 linears stay on candle's path: cuBLASLt's f32 GEMM would run in TF32 here, and the f32
//! path is the one checked against the CPU reference at 1e-4.

use std::cell::RefCell;
use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::ffi::c_void;
use std::sync::{Arc, Mutex};

use candle_core::cuda_backend::cudarc::cublaslt::{result, sys};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaStream, DevicePtr, DevicePtrMut, DeviceRepr,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::{DType, Result, Tensor};
use half::{bf16, f16};
use turbo_core::cuda::{cuda_view, tensor_from_cuda, PerDevice};

use crate::timing;

/// cuBLASLt's recommended workspace on Hopper (it takes less on older GPUs).
const WORKSPACE_BYTES: usize = 32 << 20;
/// How many of the heuristic's candidates are timed for a new shape.
const CANDIDATES: usize = 8;
/// `x · weightᵀ (+ bias)` for contiguous-able `x` `[M, K]`, `weight` `[N, K]` and `bias` `[N]`,
/// all bf16 or all f16 on one CUDA device: `[M, N]` in that dtype.
pub(crate) fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    match x.dtype() {
        DType::BF16 => linear_typed::<bf16>(x, weight, bias),
        DType::F16 => linear_typed::<f16>(x, weight, bias),
        other => candle_core::bail!("cuBLASLt linear: bf16 or f16 inputs, got {other:?}"),
    }
}

/// Whether [`linear`] takes these operands.
pub(crate) fn supports(x: &Tensor, weight: &Tensor) -> bool {
    x.device().is_cuda()
        && matches!(x.dtype(), DType::BF16 | DType::F16)
        && weight.dtype() == x.dtype()
}

fn linear_typed<T: CudaDType + DeviceRepr>(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    let ((m, k), (n, weight_k)) = (x.dims2()?, weight.dims2()?);
    if k != weight_k {
        candle_core::bail!("cuBLASLt linear: x [{m}, {k}] against weight [{n}, {weight_k}]");
    }
    let bias = bias.map(aligned_bias).transpose()?;
    if let Some(bias) = &bias {
        if bias.dims() != [n] || bias.dtype() != x.dtype() {
            candle_core::bail!(
                "cuBLASLt linear: bias {:?} {:?} for {n} outputs in {:?}",
                bias.dims(),
                bias.dtype(),
                x.dtype()
            );
        }
    }
    let dev = x.device().as_cuda_device()?;
    let (xs, xl) = x.storage_and_layout();
    let (ws, wl) = weight.storage_and_layout();
    let x_view =
        cuda_view::<T>(&xs, xl.start_offset(), "linear input").map_err(candle_core::Error::wrap)?;
    let w_view = cuda_view::<T>(&ws, wl.start_offset(), "linear weight")
        .map_err(candle_core::Error::wrap)?;
    let bias_storage = bias.as_ref().map(|b| b.storage_and_layout());
    let bias_view = match &bias_storage {
        Some((bs, bl)) => Some(
            cuda_view::<T>(bs, bl.start_offset(), "linear bias")
                .map_err(candle_core::Error::wrap)?,
        ),
        None => None,
    };
    let stream = dev.cuda_stream();
    let mut y = unsafe { dev.alloc::<T>(m * n) }?;
    let shape = GemmShape {
        m,
        n,
        k,
        data_type: data_type(x.dtype()),
        bias: bias.is_some(),
        alignments: [0; 3],
    };
    let context = LtContext::of(dev)?;
    {
        let (x_ptr, _x_read) = x_view.device_ptr(&stream);
        let (w_ptr, _w_read) = w_view.device_ptr(&stream);
        let bias_ptr = bias_view.as_ref().map(|b| b.device_ptr(&stream));
        let (y_ptr, _y_write) = y.device_ptr_mut(&stream);
        let operands = Operands {
            x: x_ptr,
            weight: w_ptr,
            bias: bias_ptr.as_ref().map(|(ptr, _)| *ptr),
            y: y_ptr,
        };
        let shape = GemmShape {
            alignments: [w_ptr, x_ptr, y_ptr].map(alignment),
            ..shape
        };
        with_thread_workspace(dev, &stream, |workspace| {
            context.run(&stream, shape, workspace, &operands)
        })?;
    }
    Ok(tensor_from_cuda(y, dev, (m, n)))
}

/// The bias, copied out when it starts off a 16-byte boundary of its buffer (the epilogue reads
/// it in vectors; allocations themselves are 256-byte aligned).
fn aligned_bias(bias: &Tensor) -> Result<Tensor> {
    let offset_bytes = bias.layout().start_offset() * bias.dtype().size_in_bytes();
    if bias.is_contiguous() && offset_bytes % 16 == 0 {
        Ok(bias.clone())
    } else {
        bias.force_contiguous()
    }
}

/// The largest power of two up to 256 that divides `address`.
fn alignment(address: u64) -> u32 {
    1 << address.trailing_zeros().min(8)
}

fn data_type(dtype: DType) -> sys::cudaDataType_t {
    match dtype {
        DType::F16 => sys::cudaDataType_t::CUDA_R_16F,
        _ => sys::cudaDataType_t::CUDA_R_16BF,
    }
}

/// What an algorithm is chosen for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
struct GemmShape {
    m: usize,
    n: usize,
    k: usize,
    data_type: sys::cudaDataType_t,
    bias: bool,
    /// The byte alignment of the weight's, x's and y's addresses (powers of two, at most 256):
    /// cuBLASLt's heuristic assumes 256 unless told, and an algorithm chosen for aligned
    /// operands may not run on a view that starts mid-buffer.
    alignments: [u32; 3],
}

/// Raw device addresses of one product's operands (their read guards held by the caller).
struct Operands {
    x: u64,
    weight: u64,
    bias: Option<u64>,
    y: u64,
}

/// One cuBLASLt handle per candle device, and the algorithm timed fastest for each shape on it.
/// The workspace is per thread (see [`with_thread_workspace`]).
struct LtContext {
    handle: sys::cublasLtHandle_t,
    algorithms: Mutex<HashMap<GemmShape, sys::cublasLtMatmulAlgo_t>>,
}

// SAFETY: the handle is only used under the device's stream, and cuBLASLt handles may be used
// from any thread; the algorithm cache is behind a mutex.
unsafe impl Send for LtContext {}
unsafe impl Sync for LtContext {}

impl LtContext {
    fn of(dev: &CudaDevice) -> Result<Arc<Self>> {
        static CONTEXTS: PerDevice<DeviceId, Arc<LtContext>> = PerDevice::new();
        CONTEXTS.get_or_try_insert(dev.id(), || {
            Ok(Arc::new(Self {
                handle: result::create_handle().map_err(candle_core::Error::wrap)?,
                algorithms: Mutex::default(),
            }))
        })
    }

    /// Runs the product with the shape's algorithm, choosing it first on a new shape.
    fn run(
        &self,
        stream: &Arc<CudaStream>,
        shape: GemmShape,
        workspace: &CudaSlice<u8>,
        operands: &Operands,
    ) -> Result<()> {
        let plan = Plan::new(shape, operands.bias)?;
        let known = self
            .algorithms
            .lock()
            .map_err(|_| poisoned())?
            .get(&shape)
            .copied();
        let algorithm = match known {
            Some(algorithm) => algorithm,
            None => {
                let algorithm = self.fastest(stream, &plan, workspace, operands)?;
                self.algorithms
                    .lock()
                    .map_err(|_| poisoned())?
                    .insert(shape, algorithm);
                algorithm
            }
        };
        self.launch(stream, &plan, &algorithm, workspace, operands)
    }

    /// Times each of the heuristic's candidates on the real operands (the output is written
    /// again by the caller's launch) and returns the fastest. A candidate the heuristic offered
    /// may still refuse these operands: it is dropped at its first launch.
    fn fastest(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        workspace: &CudaSlice<u8>,
        operands: &Operands,
    ) -> Result<sys::cublasLtMatmulAlgo_t> {
        let candidates = self.candidates(plan)?;
        if candidates.len() == 1 {
            return Ok(candidates[0]);
        }
        let times = timing::time_candidates(stream, &candidates, |algorithm| {
            self.launch(stream, plan, algorithm, workspace, operands)
        })?;
        let Some(fastest) = timing::fastest(&times) else {
            candle_core::bail!("cuBLASLt: no algorithm ran {:?}", plan.shape);
        };
        tracing::debug!(
            shape = ?plan.shape,
            chosen = fastest,
            ms_per_candidate = ?times,
            "cuBLASLt algorithm timed (candidates in heuristic order)"
        );
        Ok(candidates[fastest])
    }

    /// Up to [`CANDIDATES`] algorithms from cuBLASLt's heuristic, best first.
    fn candidates(&self, plan: &Plan) -> Result<Vec<sys::cublasLtMatmulAlgo_t>> {
        let preference = Preference::new(WORKSPACE_BYTES, plan.shape.alignments)?;
        let mut results =
            vec![unsafe { std::mem::zeroed::<sys::cublasLtMatmulHeuristicResult_t>() }; CANDIDATES];
        let mut count = 0;
        // SAFETY: every descriptor is live; `results` has room for CANDIDATES entries.
        unsafe {
            sys::cublasLtMatmulAlgoGetHeuristic(
                self.handle,
                plan.desc.0,
                plan.weight.0,
                plan.x.0,
                plan.y.0,
                plan.y.0,
                preference.0,
                CANDIDATES as i32,
                results.as_mut_ptr(),
                &mut count,
            )
            .result()
            .map_err(candle_core::Error::wrap)?;
        }
        let algorithms: Vec<_> = results[..count.max(0) as usize]
            .iter()
            .filter(|r| r.state == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS)
            .map(|r| r.algo)
            .collect();
        if algorithms.is_empty() {
            candle_core::bail!("cuBLASLt: no algorithm for {:?}", plan.shape);
        }
        Ok(algorithms)
    }

    fn launch(
        &self,
        stream: &Arc<CudaStream>,
        plan: &Plan,
        algorithm: &sys::cublasLtMatmulAlgo_t,
        workspace: &CudaSlice<u8>,
        operands: &Operands,
    ) -> Result<()> {
        let (alpha, beta) = (1f32, 0f32);
        let (workspace, _workspace_use) = workspace.device_ptr(stream);
        // SAFETY: the descriptors describe the operands' shapes; the operands and workspace
        // stay allocated until the work is queued (their guards are held by the callers).
        unsafe {
            result::matmul(
                self.handle,
                plan.desc.0,
                (&alpha as *const f32).cast(),
                (&beta as *const f32).cast(),
                operands.weight as *const c_void,
                plan.weight.0,
                operands.x as *const c_void,
                plan.x.0,
                operands.y as *const c_void,
                plan.y.0,
                operands.y as *mut c_void,
                plan.y.0,
                algorithm,
                workspace as *mut c_void,
                WORKSPACE_BYTES,
                stream.cu_stream() as *mut _,
            )
        }
        .map_err(candle_core::Error::wrap)
    }
}

thread_local! {
    /// This thread's cuBLASLt workspace on each device.
    static WORKSPACES: RefCell<HashMap<DeviceId, CudaSlice<u8>>> = RefCell::new(HashMap::new());
}

/// `f` with this thread's workspace on `dev`, allocated on its first product. One per thread,
/// not per device: candle's CUDA device enqueues each thread's work on that thread's own
/// stream, so threads sharing one workspace could have two products write it at once. (One
/// allocated per product instead took the smallest Wan shape from 0.27 to 0.45 ms on an H100,
/// `docs/performance.md` v11.)
fn with_thread_workspace<R>(
    dev: &CudaDevice,
    stream: &Arc<CudaStream>,
    f: impl FnOnce(&CudaSlice<u8>) -> Result<R>,
) -> Result<R> {
    WORKSPACES.with(|workspaces| {
        let mut workspaces = workspaces.borrow_mut();
        let workspace = match workspaces.entry(dev.id()) {
            Entry::Occupied(entry) => entry.into_mut(),
            // SAFETY: cuBLASLt only uses the workspace as scratch.
            Entry::Vacant(entry) => {
                entry.insert(unsafe { stream.alloc::<u8>(WORKSPACE_BYTES) }.w()?)
            }
        };
        f(workspace)
    })
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("cuBLASLt: a thread panicked while holding the algorithm cache".into())
}

/// The descriptors of one product in cuBLASLt's column-major terms: the row-major `y` `[M, N]`
/// is the column-major `N × M` matrix `W · xᵀ`, with `W` (column-major `K × N`) transposed and
/// `xᵀ` (column-major `K × M`) as stored; the bias, one value per row of that matrix, is added
/// in the epilogue.
struct Plan {
    shape: GemmShape,
    desc: MatmulDesc,
    weight: Layout,
    x: Layout,
    y: Layout,
}

impl Plan {
    fn new(shape: GemmShape, bias: Option<u64>) -> Result<Self> {
        let GemmShape {
            m, n, k, data_type, ..
        } = shape;
        let desc = MatmulDesc::new(bias)?;
        Ok(Self {
            shape,
            desc,
            weight: Layout::new(data_type, k, n)?,
            x: Layout::new(data_type, k, m)?,
            y: Layout::new(data_type, n, m)?,
        })
    }
}

/// A column-major `rows × cols` matrix layout, packed (leading dimension `rows`).
struct Layout(sys::cublasLtMatrixLayout_t);

impl Layout {
    fn new(data_type: sys::cudaDataType_t, rows: usize, cols: usize) -> Result<Self> {
        result::create_matrix_layout(data_type, rows as u64, cols as u64, rows as i64)
            .map(Self)
            .map_err(candle_core::Error::wrap)
    }
}

impl Drop for Layout {
    fn drop(&mut self) {
        // SAFETY: created by `Layout::new` and destroyed once; a failure leaks a descriptor.
        let _ = unsafe { result::destroy_matrix_layout(self.0) };
    }
}

/// `CUBLAS_OP_T` of cuBLAS's `cublasOperation_t` (which cuBLASLt's bindings do not export).
const TRANSPOSE: i32 = 1;

/// f32 accumulation and scaling, `op(A) = Aᵀ`, and the bias epilogue when there is a bias.
struct MatmulDesc(sys::cublasLtMatmulDesc_t);

impl MatmulDesc {
    fn new(bias: Option<u64>) -> Result<Self> {
        let desc = result::create_matmul_desc(
            sys::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            sys::cudaDataType_t::CUDA_R_32F,
        )
        .map(Self)
        .map_err(candle_core::Error::wrap)?;
        desc.set(
            sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_TRANSA,
            &TRANSPOSE,
        )?;
        if let Some(bias) = bias {
            desc.set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_EPILOGUE,
                &sys::cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            )?;
            desc.set(
                sys::cublasLtMatmulDescAttributes_t::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                &bias,
            )?;
        }
        Ok(desc)
    }

    fn set<V>(&self, attribute: sys::cublasLtMatmulDescAttributes_t, value: &V) -> Result<()> {
        // SAFETY: `value` is of the type cuBLASLt documents for `attribute` (a 4-byte enum or
        // an 8-byte device address), read during the call.
        unsafe {
            result::set_matmul_desc_attribute(
                self.0,
                attribute,
                (value as *const V).cast(),
                std::mem::size_of::<V>(),
            )
        }
        .map_err(candle_core::Error::wrap)
    }
}

impl Drop for MatmulDesc {
    fn drop(&mut self) {
        // SAFETY: created by `MatmulDesc::new` and destroyed once.
        let _ = unsafe { result::destroy_matmul_desc(self.0) };
    }
}

/// The heuristic's search preference: candidates that fit the workspace and the operands'
/// alignments (A = the weight, B = x, C = D = y).
struct Preference(sys::cublasLtMatmulPreference_t);

impl Preference {
    fn new(workspace_bytes: usize, [weight, x, y]: [u32; 3]) -> Result<Self> {
        use sys::cublasLtMatmulPreferenceAttributes_t as Attribute;
        let preference = result::create_matmul_pref()
            .map(Self)
            .map_err(candle_core::Error::wrap)?;
        preference.set(
            Attribute::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
            &workspace_bytes,
        )?;
        preference.set(
            Attribute::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
            &weight,
        )?;
        preference.set(Attribute::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &x)?;
        preference.set(Attribute::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &y)?;
        preference.set(Attribute::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &y)?;
        Ok(preference)
    }

    fn set<V>(
        &self,
        attribute: sys::cublasLtMatmulPreferenceAttributes_t,
        value: &V,
    ) -> Result<()> {
        // SAFETY: `value` is of the type cuBLASLt documents for `attribute` (a size_t or a
        // uint32_t), read during the call.
        unsafe {
            result::set_matmul_pref_attribute(
                self.0,
                attribute,
                (value as *const V).cast(),
                std::mem::size_of::<V>(),
            )
        }
        .map_err(candle_core::Error::wrap)
    }
}

impl Drop for Preference {
    fn drop(&mut self) {
        // SAFETY: created by `Preference::new` and destroyed once.
        let _ = unsafe { result::destroy_matmul_pref(self.0) };
    }
}
