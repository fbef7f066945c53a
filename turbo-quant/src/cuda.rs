//! Launchers of the W8A8 kernels (`turbo-kernels/kernels/w8a8.cu`, and
//! `w8a8_sm90a.cu` for the wgmma GEMM) behind [`Int8Matmul`](crate::Int8Matmul)'s `cuda_fwd`.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::sys::{
    self, CUdevice_attribute, CUfunction_attribute,
};
use candle_core::cuda_backend::cudarc::driver::{
    CudaSlice, CudaView, DevicePtr, DeviceRepr, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDType, CudaDevice, DeviceId, WrapErr};
use candle_core::{CudaStorage, DType, Result, Shape, Tensor};
use half::bf16;
use turbo_core::cuda::{cuda_view, tensor_from_cuda, PerDevice, Swizzle, TensorMap};

use crate::op::GemmKernel;
use crate::tile::{tile_grid, TILE};
use crate::timing;

const MODULE: &str = "turbo_quant_w8a8";
const THREADS: u32 = 256;

/// One GEMM kernel: its compiled module, the name of its f32 / bf16-output functions less the
/// `_f32` / `_bf16` suffix, its CTA size, its dynamic shared memory (as its .cu file computes
/// it), how it takes the int8 operands and the rows of its output tiles.
struct GemmVariant {
    module: &'static str,
    image: &'static [u8],
    function: &'static str,
    threads: u32,
    smem_bytes: u32,
    operands: Operands,
    /// One CTA per SM at most, each walking its share of the tiles, instead of one per tile.
    persistent: bool,
    /// Rows of an output tile (and of the activations' TMA box); it is [`TILE`] columns wide.
    block_m: usize,
}

/// How a GEMM kernel takes the int8 activations and weights.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Operands {
    /// Device pointers.
    Pointers,
    /// TMA tensor maps ([`TensorMap`]).
    TensorMaps,
}

/// A ring of 128×128 activation and weight tiles per stage.
const STAGE_BYTES: u32 = 2 * (TILE * TILE) as u32;

/// `kernels/w8a8.cu`: 8 warps, 4 stages.
const MMA_SYNC: GemmVariant = GemmVariant {
    module: MODULE,
    image: turbo_kernels::W8A8,
    function: "w8a8_gemm",
    threads: THREADS,
    smem_bytes: 4 * STAGE_BYTES,
    operands: Operands::Pointers,
    persistent: false,
    block_m: TILE,
};

/// [`MMA_SYNC`] with 3 stages, for GPUs that give a CTA less than 128 KiB of shared memory.
const MMA_SYNC_3_STAGES: GemmVariant = GemmVariant {
    function: "w8a8_gemm_s3",
    smem_bytes: 3 * STAGE_BYTES,
    ..MMA_SYNC
};

/// Dynamic shared memory of a `w8a8_sm90a.cu` GEMM (its `Geometry::SMEM_BYTES`): 128 bytes of
/// mbarriers, up to 1024 of alignment, then `stages` stages of a `block_m`-row activation tile
/// and a 128-row weight tile.
const fn wgmma_smem_bytes(stages: usize, block_m: usize) -> u32 {
    (128 + 1024 + stages * (block_m + TILE) * TILE) as u32
}
// The sizes that `w8a8_sm90a.cu` asserts for its `Geometry<2>` and `Geometry<3>`.
const _: () = assert!(wgmma_smem_bytes(6, TILE) == 193 * 1024 + 128);
const _: () = assert!(wgmma_smem_bytes(5, 192) == 201 * 1024 + 128);

/// `kernels/w8a8_sm90a.cu`: a producer (TMA) and two consumer warpgroups, 6 stages.
const WGMMA: GemmVariant = GemmVariant {
    module: "turbo_quant_w8a8_sm90a",
    image: turbo_kernels::W8A8_SM90A,
    function: "w8a8_gemm_wgmma",
    threads: 3 * 128,
    smem_bytes: wgmma_smem_bytes(6, TILE),
    operands: Operands::TensorMaps,
    persistent: false,
    block_m: TILE,
};

/// [`WGMMA`] folding with a conversion instruction.
const WGMMA_CVT: GemmVariant = GemmVariant {
    function: "w8a8_gemm_wgmma_cvt",
    ..WGMMA
};

/// [`WGMMA`] on a persistent grid.
const WGMMA_PERSISTENT: GemmVariant = GemmVariant {
    function: "w8a8_gemm_wgmma_persistent",
    persistent: true,
    ..WGMMA
};

/// [`WGMMA_PERSISTENT`] folding with a conversion instruction.
const WGMMA_PERSISTENT_CVT: GemmVariant = GemmVariant {
    function: "w8a8_gemm_wgmma_persistent_cvt",
    ..WGMMA_PERSISTENT
};

/// [`WGMMA_PERSISTENT_CVT`] with its consumers issuing in no fixed order.
const WGMMA_PERSISTENT_CVT_UNORDERED: GemmVariant = GemmVariant {
    function: "w8a8_gemm_wgmma_persistent_cvt_unordered",
    ..WGMMA_PERSISTENT
};

/// [`WGMMA_PERSISTENT_CVT`] with three consumer warpgroups and 192-row tiles, 5 stages.
const WGMMA_M192_PERSISTENT_CVT: GemmVariant = GemmVariant {
    function: "w8a8_gemm_wgmma_m192_persistent_cvt",
    threads: 4 * 128,
    smem_bytes: wgmma_smem_bytes(5, 192),
    block_m: 192,
    ..WGMMA_PERSISTENT
};

/// Whether `dev` runs the wgmma kernels: sm_90a code runs on compute capability 9.0 alone.
fn runs_wgmma(dev: &CudaDevice) -> Result<bool> {
    Ok(dev.cuda_stream().context().compute_capability().w()? == (9, 0))
}

/// The wgmma variant of `kernel` (none for `MmaSync`, and for `Fastest`, which is resolved
/// first: [`fastest_kernel`]).
fn wgmma_variant(kernel: GemmKernel) -> Option<&'static GemmVariant> {
    match kernel {
        GemmKernel::Wgmma => Some(&WGMMA),
        GemmKernel::WgmmaCvt => Some(&WGMMA_CVT),
        GemmKernel::WgmmaPersistent => Some(&WGMMA_PERSISTENT),
        GemmKernel::WgmmaPersistentCvt => Some(&WGMMA_PERSISTENT_CVT),
        GemmKernel::WgmmaPersistentCvtUnordered => Some(&WGMMA_PERSISTENT_CVT_UNORDERED),
        GemmKernel::WgmmaM192PersistentCvt => Some(&WGMMA_M192_PERSISTENT_CVT),
        GemmKernel::MmaSync | GemmKernel::Fastest => None,
    }
}

/// The mma.sync variant with as many stages as `dev`'s shared memory per CTA allows.
fn mma_sync_variant(dev: &CudaDevice) -> Result<&'static GemmVariant> {
    let smem_per_cta = dev
        .cuda_stream()
        .context()
        .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK_OPTIN)
        .w()?;
    Ok(if smem_per_cta >= MMA_SYNC.smem_bytes as i32 {
        &MMA_SYNC
    } else {
        &MMA_SYNC_3_STAGES
    })
}

/// The operands of [`int8_matmul`]: each a storage and the element offset where its data
/// starts.
pub(crate) struct GemmOperands<'a> {
    /// The activations' int8 values (`U8`, `[M, K]`).
    pub(crate) x: (&'a CudaStorage, usize),
    /// Their f32 tile scales.
    pub(crate) x_scale: (&'a CudaStorage, usize),
    /// The weight's int8 values (`U8`, `[N, K]`).
    pub(crate) weight: (&'a CudaStorage, usize),
    /// Its f32 tile scales.
    pub(crate) scale: (&'a CudaStorage, usize),
}

/// `x_q · W_qᵀ` with the tile scales of both, `[M, N]` in `dtype` (f32 or bf16); every operand
/// contiguous.
pub(crate) fn int8_matmul(
    operands: GemmOperands<'_>,
    [m, n, k]: [usize; 3],
    dtype: DType,
    kernel: GemmKernel,
) -> Result<(CudaStorage, Shape)> {
    for (what, (_, offset)) in [("activations", operands.x), ("weight", operands.weight)] {
        if offset % 16 != 0 {
            candle_core::bail!("int8-matmul: the int8 {what} must start on a 16-byte boundary");
        }
    }
    let dev = operands.x.0.device().clone();
    let (x_q, weight) = (view::<u8>(operands.x)?, view::<u8>(operands.weight)?);
    let (x_scales, weight_scales) = (view::<f32>(operands.x_scale)?, view::<f32>(operands.scale)?);
    let args = GemmArgs {
        x_q: &x_q,
        x_scales: &x_scales,
        weight: &weight,
        weight_scales: &weight_scales,
        m,
        n,
        k,
    };
    let y = match dtype {
        DType::F32 => {
            CudaStorage::wrap_cuda_slice(run::<f32>(&dev, kernel, "f32", &args)?, dev.clone())
        }
        DType::BF16 => {
            CudaStorage::wrap_cuda_slice(run::<bf16>(&dev, kernel, "bf16", &args)?, dev.clone())
        }
        other => candle_core::bail!("int8-matmul on CUDA: no {other:?} output (f32 or bf16)"),
    };
    Ok((y, Shape::from((m, n))))
}

/// Tile quantisation of a float `[N, K]` CUDA tensor (f32 or bf16, K a multiple of 16) on
/// the device: the `U8` int8 bytes and the `[⌈N/128⌉, ⌈K/128⌉]` f32 scales.
pub(crate) fn quantize_tensor(x: &Tensor) -> turbo_core::Result<(Tensor, Tensor)> {
    // bf16 is read as is; any other float dtype goes through f32, which holds it exactly.
    let x = match x.dtype() {
        DType::BF16 => x.contiguous()?,
        _ => x.to_dtype(DType::F32)?.contiguous()?,
    };
    let (rows, cols) = x.dims2()?;
    let dev = x.device().as_cuda_device()?;
    let (storage, layout) = x.storage_and_layout();
    let offset = layout.start_offset();
    let (values, scales) = match x.dtype() {
        DType::BF16 => {
            let view = cuda_view::<bf16>(&storage, offset, "weight")?;
            quantize(dev, "quantize_tiles_bf16", &view, rows, cols)?
        }
        _ => {
            let view = cuda_view::<f32>(&storage, offset, "weight")?;
            quantize(dev, "quantize_tiles_f32", &view, rows, cols)?
        }
    };
    Ok((
        tensor_from_cuda(values, dev, (rows, cols)),
        tensor_from_cuda(scales, dev, tile_grid(rows, cols).to_vec()),
    ))
}

fn view<T: CudaDType>((storage, offset): (&CudaStorage, usize)) -> Result<CudaView<'_, T>> {
    Ok(storage.as_cuda_slice::<T>()?.slice(offset..))
}

/// Int8 tiles of `x` `[m, k]` and their `[⌈m/128⌉, ⌈k/128⌉]` scales.
fn quantize<T>(
    dev: &CudaDevice,
    kernel: &str,
    x: &CudaView<'_, T>,
    m: usize,
    k: usize,
) -> Result<(CudaSlice<u8>, CudaSlice<f32>)> {
    let [row_tiles, col_tiles] = tile_grid(m, k);
    let values = unsafe { dev.alloc::<u8>(m * k) }?;
    let scales = unsafe { dev.alloc::<f32>(row_tiles * col_tiles) }?;
    let func = turbo_core::cuda::kernel(dev, kernel, MODULE, turbo_kernels::W8A8)?;
    let (m_arg, k_arg) = (m as i32, k as i32);
    let mut launch = func.builder();
    launch
        .arg(x)
        .arg(&values)
        .arg(&scales)
        .arg(&m_arg)
        .arg(&k_arg);
    let cfg = LaunchConfig {
        grid_dim: (col_tiles as u32, row_tiles as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: 0,
    };
    unsafe { launch.launch(cfg) }.w()?;
    Ok((values, scales))
}

struct GemmArgs<'a> {
    x_q: &'a CudaView<'a, u8>,
    x_scales: &'a CudaView<'a, f32>,
    weight: &'a CudaView<'a, u8>,
    weight_scales: &'a CudaView<'a, f32>,
    m: usize,
    n: usize,
    k: usize,
}

/// The GEMM with `kernel` and output dtype `T`, whose name is `out` (`f32` or `bf16`): the wgmma
/// kernels on compute capability 9.0 (with [`GemmKernel::Fastest`], the shape's fastest of
/// them), mma.sync elsewhere and for [`GemmKernel::MmaSync`].
fn run<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    kernel: GemmKernel,
    out: &'static str,
    args: &GemmArgs<'_>,
) -> Result<CudaSlice<T>> {
    let wgmma = if !runs_wgmma(dev)? {
        None
    } else if kernel == GemmKernel::Fastest {
        wgmma_variant(fastest_kernel::<T>(dev, out, args)?)
    } else {
        wgmma_variant(kernel)
    };
    let variant = match wgmma {
        Some(variant) => variant,
        None => mma_sync_variant(dev)?,
    };
    gemm::<T>(dev, variant, out, args)
}

/// The wgmma kernel that runs this product's shape (and output dtype) fastest on `dev`: each
/// of [`GemmKernel::WGMMA`] timed on these operands the first time the shape is seen, the
/// choice kept for the process. They give the same output bit for bit, so the choice changes
/// no result.
fn fastest_kernel<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    out: &'static str,
    args: &GemmArgs<'_>,
) -> Result<GemmKernel> {
    static CHOSEN: PerDevice<(DeviceId, [usize; 3], &'static str), GemmKernel> = PerDevice::new();
    let shape = [args.m, args.n, args.k];
    CHOSEN.get_or_try_insert((dev.id(), shape, out), || {
        let times = timing::time_candidates(&dev.cuda_stream(), &GemmKernel::WGMMA, |&kernel| {
            let Some(variant) = wgmma_variant(kernel) else {
                candle_core::bail!("int8-matmul: {} is no wgmma kernel", kernel.name());
            };
            gemm::<T>(dev, variant, out, args).map(drop)
        })?;
        let Some(fastest) = timing::fastest(&times) else {
            candle_core::bail!("int8-matmul: no wgmma kernel ran [m, n, k] = {shape:?}");
        };
        let chosen = GemmKernel::WGMMA[fastest];
        tracing::debug!(
            ?shape,
            out,
            chosen = chosen.name(),
            ms_per_kernel = ?GemmKernel::WGMMA.iter().map(|k| k.name()).zip(&times).collect::<Vec<_>>(),
            "W8A8 GEMM kernel timed"
        );
        Ok(chosen)
    })
}

/// `variant`'s GEMM with output dtype `T`, whose name is `out` (`f32` or `bf16`).
fn gemm<T: CudaDType + DeviceRepr>(
    dev: &CudaDevice,
    variant: &GemmVariant,
    out: &str,
    args: &GemmArgs<'_>,
) -> Result<CudaSlice<T>> {
    let y = unsafe { dev.alloc::<T>(args.m * args.n) }?;
    let name = format!("{}_{out}", variant.function);
    let func = turbo_core::cuda::kernel(dev, &name, variant.module, variant.image)?;
    // Above 48 KiB of dynamic shared memory a kernel must opt in.
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        variant.smem_bytes as i32,
    )
    .w()?;
    let dims = [args.m, args.n, args.k].map(|d| d as i32);
    let stream = dev.cuda_stream();
    // The maps hold the operands' raw addresses: their read guards live until the launch is
    // queued.
    let (maps, _reads) = match variant.operands {
        Operands::TensorMaps => {
            let (x_ptr, x_read) = args.x_q.device_ptr(&stream);
            let (w_ptr, w_read) = args.weight.device_ptr(&stream);
            let maps = [
                int8_tiles(x_ptr, args.m, args.k, variant.block_m)?,
                int8_tiles(w_ptr, args.n, args.k, TILE)?,
            ];
            (Some(maps), Some((x_read, w_read)))
        }
        Operands::Pointers => (None, None),
    };
    let mut launch = func.builder();
    match &maps {
        Some([x_map, w_map]) => launch
            .arg(x_map)
            .arg(args.x_scales)
            .arg(w_map)
            .arg(args.weight_scales),
        None => launch
            .arg(args.x_q)
            .arg(args.x_scales)
            .arg(args.weight)
            .arg(args.weight_scales),
    };
    launch.arg(&y).arg(&dims[0]).arg(&dims[1]).arg(&dims[2]);
    // One CTA per output tile (persistent: at most one per SM), in a 1-D grid that the kernel
    // rasters in groups of m tiles.
    let tiles = args.m.div_ceil(variant.block_m) * args.n.div_ceil(TILE);
    let ctas = if variant.persistent {
        let sms = stream
            .context()
            .attribute(CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
            .w()?;
        tiles.min(sms as usize)
    } else {
        tiles
    };
    let cfg = LaunchConfig {
        grid_dim: (ctas as u32, 1, 1),
        block_dim: (variant.threads, 1, 1),
        shared_mem_bytes: variant.smem_bytes,
    };
    unsafe { launch.launch(cfg) }.w()?;
    Ok(y)
}

/// The TMA map of the row-major int8 `[rows, cols]` matrix at `ptr` (16-byte aligned, `cols` a
/// multiple of 16) in boxes of `box_rows` × 128 bytes with the 128-byte swizzle: one TMA copy
/// is one swizzled tile of `kernels/w8a8.cuh` (or a stack of them). Boxes past the edges read
/// zeros.
fn int8_tiles(
    ptr: sys::CUdeviceptr,
    rows: usize,
    cols: usize,
    box_rows: usize,
) -> Result<TensorMap> {
    TensorMap::swizzled(
        ptr,
        sys::CUtensorMapDataType::CU_TENSOR_MAP_DATA_TYPE_UINT8,
        &[cols as u64, rows as u64],
        &[cols as u64],
        &[TILE as u32, box_rows as u32],
        Swizzle::Bytes128,
    )
    .map_err(candle_core::Error::wrap)
}

/// `y + bias[column]` for contiguous-able `y` `[.., N]` and `bias` `[N]`, f32 or bf16.
pub(crate) fn add_bias(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    let (y, bias) = (y.contiguous()?, bias.contiguous()?);
    let dev = y.device().as_cuda_device()?;
    let total = y.elem_count();
    let n = bias.elem_count() as i32;
    let (ys, yl) = y.storage_and_layout();
    let (bs, bl) = bias.storage_and_layout();
    macro_rules! launch {
        ($t:ty, $kernel:literal) => {{
            let out = unsafe { dev.alloc::<$t>(total) }?;
            let y_view = cuda_view::<$t>(&ys, yl.start_offset(), "linear output")
                .map_err(candle_core::Error::wrap)?;
            let bias_view = cuda_view::<$t>(&bs, bl.start_offset(), "bias")
                .map_err(candle_core::Error::wrap)?;
            let func = turbo_core::cuda::kernel(dev, $kernel, "turbo_fused", turbo_kernels::FUSED)?;
            let mut launch = func.builder();
            launch.arg(&y_view).arg(&bias_view).arg(&out).arg(&n);
            let cfg = LaunchConfig {
                grid_dim: ((total / bias.elem_count().max(1)) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            };
            unsafe { launch.launch(cfg) }.w()?;
            tensor_from_cuda(out, dev, y.shape().clone())
        }};
    }
    Ok(match y.dtype() {
        DType::BF16 => launch!(bf16, "add_bias_bf16"),
        _ => launch!(f32, "add_bias_f32"),
    })
}
