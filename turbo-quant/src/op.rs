//! The W8A8 product as a candle custom op, so that a CUDA kernel can slot in as its `cuda_fwd`.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::gemm::int8_gemm;
use crate::tile::{quantize_tiles, tile_grid, TileMatrix};

/// `x · Wᵀ` for float activations `x` `[M, K]` (f32, bf16 or f16) and int8 weights `[N, K]`
/// (stored as `U8` bytes) with their f32 tile scales `[⌈N/128⌉, ⌈K/128⌉]`: quantises `x` into
/// 128×128 tiles, runs the block-scaled int8 GEMM and returns `[M, N]` in the dtype of `x`.
/// No bias.
pub fn int8_matmul(
    x: &Tensor,
    int8_weight: &Tensor,
    scale: &Tensor,
) -> candle_core::Result<Tensor> {
    int8_matmul_with(x, int8_weight, scale, GemmKernel::default())
}

/// [`int8_matmul`] with the given CUDA GEMM kernel (the other devices ignore it).
pub fn int8_matmul_with(
    x: &Tensor,
    int8_weight: &Tensor,
    scale: &Tensor,
    kernel: GemmKernel,
) -> candle_core::Result<Tensor> {
    x.apply_op3_no_bwd(int8_weight, scale, &Int8Matmul { kernel })
}

/// The CUDA GEMM behind [`Int8Matmul`]. Both compute the same block-scaled product with the
/// same tile sums; they differ in the last bit of some f32 outputs (see each variant).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GemmKernel {
    /// `mma.sync` tensor-core GEMM for compute capability 8.0 and later; its f32 output equals
    /// the CPU's bit for bit.
    MmaSync,
    /// Hopper `wgmma` GEMM on compute capability 9.0 devices (the `mma.sync` one elsewhere),
    /// the default: 1.3–1.5× the `mma.sync` kernel on an H200. It folds each k tile's sum
    /// with one fused multiply-add, so an f32 output may differ from the CPU's in its last
    /// bits.
    #[default]
    Wgmma,
}

impl GemmKernel {
    /// Every kernel, for checks and benchmarks that compare them.
    pub const ALL: [GemmKernel; 2] = [GemmKernel::MmaSync, GemmKernel::Wgmma];

    /// A short name for tables: `mma.sync` or `wgmma`.
    pub fn name(self) -> &'static str {
        match self {
            GemmKernel::MmaSync => "mma.sync",
            GemmKernel::Wgmma => "wgmma",
        }
    }
}

/// `y + bias` for `y` `[M, N]` and `bias` `[N]` of the same dtype: on CUDA (f32, bf16) one
/// elementwise kernel, elsewhere [`add_bias_reference`].
pub fn add_bias(y: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    #[cfg(feature = "cuda")]
    if y.device().is_cuda()
        && matches!(y.dtype(), DType::F32 | DType::BF16)
        && bias.dtype() == y.dtype()
        && bias.dims() == [y.dim(candle_core::D::Minus1)?]
    {
        return crate::cuda::add_bias(y, bias);
    }
    add_bias_reference(y, bias)
}

/// [`add_bias`] as candle's broadcast add.
pub fn add_bias_reference(y: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    y.broadcast_add(bias)
}

/// The custom op behind [`int8_matmul`]; arguments in the order `(x, int8_weight, scale)`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Int8Matmul {
    /// The GEMM kernel on CUDA devices.
    pub kernel: GemmKernel,
}

impl CustomOp3 for Int8Matmul {
    fn name(&self) -> &'static str {
        "int8-matmul"
    }

    fn cpu_fwd(
        &self,
        x: &CpuStorage,
        x_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        scale: &CpuStorage,
        scale_layout: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (m, k) = matrix_dims("activations", x_layout)?;
        let (n, weight_k) = matrix_dims("int8 weight", weight_layout)?;
        if weight_k != k {
            candle_core::bail!(
                "int8-matmul: weight is [{n}, {weight_k}] but the activations have {k} features"
            );
        }
        let grid = tile_grid(n, k);
        if scale_layout.dims() != grid {
            candle_core::bail!(
                "int8-matmul: scale is {:?}, expected {grid:?} for a [{n}, {k}] weight",
                scale_layout.dims()
            );
        }
        let weight_bytes: &[u8] = contiguous(weight.as_slice()?, weight_layout, "int8 weight")?;
        let weight_scales: &[f32] = contiguous(scale.as_slice()?, scale_layout, "scale")?;
        let weight_tiles = TileMatrix::new(bytemuck::cast_slice(weight_bytes), weight_scales, n, k)
            .map_err(candle_core::Error::wrap)?;

        let activations = activations_f32(x, x_layout)?;
        let x_tiles = quantize_tiles(&activations, m, k).map_err(candle_core::Error::wrap)?;
        let y = int8_gemm(x_tiles.view(), weight_tiles).map_err(candle_core::Error::wrap)?;
        Ok((storage_in(x.dtype(), y)?, Shape::from((m, n))))
    }

    /// The kernels of `turbo_kernels::W8A8`: tile quantisation of `x`, then the block-scaled
    /// int8 GEMM with the scale epilogue, output in the dtype of `x` (f32 or bf16).
    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        x: &candle_core::CudaStorage,
        x_layout: &Layout,
        weight: &candle_core::CudaStorage,
        weight_layout: &Layout,
        scale: &candle_core::CudaStorage,
        scale_layout: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        let (m, k) = matrix_dims("activations", x_layout)?;
        let (n, weight_k) = matrix_dims("int8 weight", weight_layout)?;
        if weight_k != k || scale_layout.dims() != tile_grid(n, k) || k % 16 != 0 {
            candle_core::bail!(
                "int8-matmul on CUDA: activations [{m}, {k}], weight [{n}, {weight_k}], scale {:?} \
                 (need equal K, a multiple of 16, and scale {:?})",
                scale_layout.dims(),
                tile_grid(n, k)
            );
        }
        for (what, layout) in [
            ("activations", x_layout),
            ("int8 weight", weight_layout),
            ("scale", scale_layout),
        ] {
            if !layout.is_contiguous() {
                candle_core::bail!("int8-matmul: {what} must be contiguous");
            }
        }
        crate::cuda::int8_matmul(
            (x, x_layout.start_offset()),
            (weight, weight_layout.start_offset()),
            (scale, scale_layout.start_offset()),
            [m, n, k],
            self.kernel,
        )
    }
}

fn matrix_dims(what: &str, layout: &Layout) -> candle_core::Result<(usize, usize)> {
    match *layout.dims() {
        [rows, cols] => Ok((rows, cols)),
        ref dims => candle_core::bail!("int8-matmul: {what} must be 2-D, got {dims:?}"),
    }
}

/// The elements of a contiguous tensor.
fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("int8-matmul: {what} must be contiguous"),
    }
}

fn activations_f32(x: &CpuStorage, layout: &Layout) -> candle_core::Result<Vec<f32>> {
    Ok(match x {
        CpuStorage::F32(data) => contiguous(data, layout, "activations")?.to_vec(),
        CpuStorage::BF16(data) => contiguous(data, layout, "activations")?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        CpuStorage::F16(data) => contiguous(data, layout, "activations")?
            .iter()
            .map(|v| v.to_f32())
            .collect(),
        other => candle_core::bail!(
            "int8-matmul: activations must be f32, bf16 or f16, got {:?}",
            other.dtype()
        ),
    })
}

fn storage_in(dtype: DType, values: Vec<f32>) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        other => candle_core::bail!("int8-matmul: no output for dtype {other:?}"),
    })
}
