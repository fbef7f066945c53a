//! The W8A8 product as a candle custom op, so that a CUDA kernel can slot in as its `cuda_fwd`.

use std::sync::atomic::{AtomicU8, Ordering};

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Shape, Tensor};
use half::{bf16, f16};

use crate::gemm::int8_gemm;
use crate::linear::Int8Weight;
use crate::tile::{tile_grid, TileMatrix};

/// `x · Wᵀ` for float activations `x` `[M, K]` (f32, bf16 or f16) and int8 weights `[N, K]`
/// (stored as `U8` bytes) with their f32 tile scales `[⌈N/128⌉, ⌈K/128⌉]`: quantises `x` into
/// 128×128 tiles, runs the block-scaled int8 GEMM and returns `[M, N]` in the dtype of `x`.
/// No bias.
pub fn int8_matmul(
    x: &Tensor,
    int8_weight: &Tensor,
    scale: &Tensor,
) -> candle_core::Result<Tensor> {
    int8_matmul_with(x, int8_weight, scale, gemm_kernel())
}

/// [`int8_matmul`] with the given CUDA GEMM kernel (the other devices ignore it).
pub fn int8_matmul_with(
    x: &Tensor,
    int8_weight: &Tensor,
    scale: &Tensor,
    kernel: GemmKernel,
) -> candle_core::Result<Tensor> {
    int8_matmul_tiles(
        &quantize_activations(x)?,
        x.dtype(),
        int8_weight,
        scale,
        kernel,
    )
}

/// Activations `x` `[M, K]` (f32, bf16 or f16) quantised into 128×128 tiles, as the int8 GEMM
/// reads them.
pub(crate) fn quantize_activations(x: &Tensor) -> candle_core::Result<Int8Weight> {
    if x.rank() != 2 {
        candle_core::bail!("int8-matmul: activations must be 2-D, got {:?}", x.dims());
    }
    if !matches!(x.dtype(), DType::F32 | DType::BF16 | DType::F16) {
        candle_core::bail!(
            "int8-matmul: activations must be f32, bf16 or f16, got {:?}",
            x.dtype()
        );
    }
    Int8Weight::quantize(&x.contiguous()?).map_err(candle_core::Error::wrap)
}

/// The block-scaled int8 GEMM of activations already quantised into 128×128 tiles (`x`, by
/// [`Int8Weight::quantize`]; layers that read the same activations share them) against int8
/// weights `[N, K]` with their tile scales: `[M, N]` in `dtype` (f32, bf16, or f16 on the
/// CPU). No bias.
pub fn int8_matmul_tiles(
    x: &Int8Weight,
    dtype: DType,
    int8_weight: &Tensor,
    scale: &Tensor,
    kernel: GemmKernel,
) -> candle_core::Result<Tensor> {
    let op = Int8Matmul {
        x_scale: x.scale().clone(),
        dtype,
        kernel,
    };
    x.int8_weight().apply_op3_no_bwd(int8_weight, scale, &op)
}

/// The CUDA GEMM behind [`Int8Matmul`]. Each computes the same block-scaled product with the
/// same tile sums; `mma.sync` and the `wgmma` ones differ in the last bit of some f32 outputs
/// (see each variant). The `wgmma` kernels all give the same output bit for bit, so which of
/// them runs is only a matter of speed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum GemmKernel {
    /// `mma.sync` tensor-core GEMM for compute capability 8.0 and later; its f32 output equals
    /// the CPU's bit for bit.
    MmaSync,
    /// Hopper `wgmma` GEMM on compute capability 9.0 devices (the `mma.sync` one elsewhere),
    /// one CTA per tile: 1.3–1.5× the `mma.sync` kernel on an H200. It folds each k tile's
    /// sum with one fused multiply-add, so an f32 output may differ from the CPU's in its last
    /// bits; it converts the sum to float exactly with an integer add and a float subtract.
    Wgmma,
    /// [`GemmKernel::Wgmma`] converting each k tile's int32 sums into floats with one
    /// instruction instead of two: fewer instructions, but not a full-rate one.
    WgmmaCvt,
    /// [`GemmKernel::Wgmma`] on a persistent grid of one CTA per SM, each walking its share of
    /// the tiles, so that a tile's first k tiles load while the last tile is still multiplied
    /// and stored.
    WgmmaPersistent,
    /// [`GemmKernel::WgmmaPersistent`] converting like [`GemmKernel::WgmmaCvt`].
    WgmmaPersistentCvt,
    /// [`GemmKernel::WgmmaPersistentCvt`] without the named barriers that make its two
    /// consumer warpgroups take turns issuing their k tiles: each issues as soon as its k tile
    /// has landed (the barriers were the top stall reason under `ncu`, `docs/kernels.md` v17).
    WgmmaPersistentCvtUnordered,
    /// [`GemmKernel::WgmmaPersistentCvt`] with three consumer warpgroups and 192-row output
    /// tiles instead of two and 128: a third warp per scheduler to fold while the others wait
    /// for their wgmmas (`ncu` found the two-consumer kernels' schedulers idle half of the
    /// cycles, so their folds wait on latency more than on issue slots), and one weight tile
    /// loaded per 192 activation rows instead of 128.
    WgmmaM192PersistentCvt,
    /// The default: on compute capability 9.0, whichever of the [`GemmKernel::WGMMA`] kernels
    /// runs a shape fastest, timed on the device at the shape's first product (a few launches
    /// of each, logged at debug level) and kept for the process; elsewhere `mma.sync`. On an
    /// H100 no one kernel was the fastest at every Wan shape (`docs/performance.md` v16).
    #[default]
    Fastest,
}

impl GemmKernel {
    /// Every kernel, for checks and benchmarks that compare them.
    pub const ALL: [GemmKernel; 8] = [
        GemmKernel::MmaSync,
        GemmKernel::Wgmma,
        GemmKernel::WgmmaCvt,
        GemmKernel::WgmmaPersistent,
        GemmKernel::WgmmaPersistentCvt,
        GemmKernel::WgmmaPersistentCvtUnordered,
        GemmKernel::WgmmaM192PersistentCvt,
        GemmKernel::Fastest,
    ];

    /// The `wgmma` kernels that [`GemmKernel::Fastest`] chooses from.
    /// [`GemmKernel::WgmmaPersistentCvtUnordered`] and [`GemmKernel::WgmmaM192PersistentCvt`]
    /// join them once `gpu_check` has passed them on a GPU and the bench has timed them (they
    /// were written in a session that had no device: `docs/kernels.md` v18).
    pub const WGMMA: [GemmKernel; 4] = [
        GemmKernel::Wgmma,
        GemmKernel::WgmmaCvt,
        GemmKernel::WgmmaPersistent,
        GemmKernel::WgmmaPersistentCvt,
    ];

    /// A short name for tables: `mma.sync`, `wgmma`, `wgmma cvt`, `wgmma persistent`,
    /// `wgmma persistent cvt`, `wgmma persistent cvt unordered`, `wgmma m192 persistent cvt`
    /// or `fastest`.
    pub fn name(self) -> &'static str {
        match self {
            GemmKernel::MmaSync => "mma.sync",
            GemmKernel::Wgmma => "wgmma",
            GemmKernel::WgmmaCvt => "wgmma cvt",
            GemmKernel::WgmmaPersistent => "wgmma persistent",
            GemmKernel::WgmmaPersistentCvt => "wgmma persistent cvt",
            GemmKernel::WgmmaPersistentCvtUnordered => "wgmma persistent cvt unordered",
            GemmKernel::WgmmaM192PersistentCvt => "wgmma m192 persistent cvt",
            GemmKernel::Fastest => "fastest",
        }
    }
}

impl std::str::FromStr for GemmKernel {
    type Err = String;

    /// A kernel by its [`GemmKernel::name`], with `-` for the spaces (`wgmma-persistent-cvt`)
    /// or not.
    fn from_str(name: &str) -> Result<Self, Self::Err> {
        let wanted = name.replace('-', " ");
        GemmKernel::ALL
            .into_iter()
            .find(|kernel| kernel.name() == wanted)
            .ok_or_else(|| {
                let names: Vec<String> = GemmKernel::ALL
                    .iter()
                    .map(|kernel| kernel.name().replace(' ', "-"))
                    .collect();
                format!(
                    "unknown W8A8 GEMM kernel `{name}`; one of: {}",
                    names.join(", ")
                )
            })
    }
}

/// The process's choice of GEMM kernel, as its index in [`GemmKernel::ALL`]; `u8::MAX` until
/// [`set_gemm_kernel`] makes one.
static CHOSEN_GEMM_KERNEL: AtomicU8 = AtomicU8::new(u8::MAX);

/// The kernel that [`int8_matmul`] and every W8A8 [`Linear`](crate::Linear) run:
/// [`GemmKernel::default`] unless [`set_gemm_kernel`] chose another.
pub fn gemm_kernel() -> GemmKernel {
    let chosen = CHOSEN_GEMM_KERNEL.load(Ordering::Relaxed) as usize;
    GemmKernel::ALL.get(chosen).copied().unwrap_or_default()
}

/// Makes every later W8A8 product of this process run `kernel` (so a benchmark can compare
/// the kernels inside a whole model); returns the one chosen before.
pub fn set_gemm_kernel(kernel: GemmKernel) -> GemmKernel {
    let index = GemmKernel::ALL
        .iter()
        .position(|&k| k == kernel)
        .expect("ALL lists every kernel") as u8;
    let before = CHOSEN_GEMM_KERNEL.swap(index, Ordering::Relaxed) as usize;
    GemmKernel::ALL.get(before).copied().unwrap_or_default()
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

/// The custom op behind [`int8_matmul_tiles`]; arguments in the order `(x_q, int8_weight,
/// scale)`: the activations' int8 values (`U8`, `[M, K]`), the weight's (`[N, K]`) and the
/// weight's tile scales.
#[derive(Debug, Clone)]
pub struct Int8Matmul {
    /// The activations' f32 tile scales, `[⌈M/128⌉, ⌈K/128⌉]`, on the values' device.
    x_scale: Tensor,
    /// The dtype of the product.
    dtype: DType,
    /// The GEMM kernel on CUDA devices (only those read it).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    kernel: GemmKernel,
}

impl Int8Matmul {
    /// `[m, n, k]` of the product, checked: both int8 matrices share K and each scale tensor
    /// has the tile grid of its matrix.
    fn dims(
        &self,
        x_layout: &Layout,
        weight_layout: &Layout,
        scale_layout: &Layout,
    ) -> candle_core::Result<[usize; 3]> {
        let (m, k) = matrix_dims("activations", x_layout)?;
        let (n, weight_k) = matrix_dims("int8 weight", weight_layout)?;
        if weight_k != k {
            candle_core::bail!(
                "int8-matmul: weight is [{n}, {weight_k}] but the activations have {k} features"
            );
        }
        for (what, dims, grid) in [
            ("scale", scale_layout.dims(), tile_grid(n, k)),
            ("activation scale", self.x_scale.dims(), tile_grid(m, k)),
        ] {
            if dims != grid {
                candle_core::bail!("int8-matmul: {what} is {dims:?}, expected {grid:?}");
            }
        }
        Ok([m, n, k])
    }
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
        let [m, n, k] = self.dims(x_layout, weight_layout, scale_layout)?;
        let weight_scales: &[f32] = contiguous(scale.as_slice()?, scale_layout, "scale")?;
        let x_scales = self.x_scale.flatten_all()?.to_vec1::<f32>()?;
        let y = int8_gemm(
            cpu_tiles(x, x_layout, &x_scales, [m, k], "activations")?,
            cpu_tiles(weight, weight_layout, weight_scales, [n, k], "int8 weight")?,
        )
        .map_err(candle_core::Error::wrap)?;
        Ok((storage_in(self.dtype, y)?, Shape::from((m, n))))
    }

    /// The block-scaled int8 GEMM of `turbo_kernels::W8A8` (or its `wgmma` variant) with the
    /// scale epilogue, output f32 or bf16.
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
        let [m, n, k] = self.dims(x_layout, weight_layout, scale_layout)?;
        if k % 16 != 0 {
            candle_core::bail!("int8-matmul on CUDA: K = {k} must be a multiple of 16");
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
        let x_scale = self.x_scale.contiguous()?;
        let (x_scale_storage, x_scale_layout) = x_scale.storage_and_layout();
        let candle_core::Storage::Cuda(x_scale_storage) = &*x_scale_storage else {
            candle_core::bail!("int8-matmul: the activation scales are not on the CUDA device");
        };
        crate::cuda::int8_matmul(
            crate::cuda::GemmOperands {
                x: (x, x_layout.start_offset()),
                x_scale: (x_scale_storage, x_scale_layout.start_offset()),
                weight: (weight, weight_layout.start_offset()),
                scale: (scale, scale_layout.start_offset()),
            },
            [m, n, k],
            self.dtype,
            self.kernel,
        )
    }
}

/// The int8 matrix `[rows, cols]` in `values` (`U8` bytes) with its tile `scales`.
fn cpu_tiles<'a>(
    values: &'a CpuStorage,
    layout: &Layout,
    scales: &'a [f32],
    [rows, cols]: [usize; 2],
    what: &str,
) -> candle_core::Result<TileMatrix<'a>> {
    let bytes: &[u8] = contiguous(values.as_slice()?, layout, what)?;
    TileMatrix::new(bytemuck::cast_slice(bytes), scales, rows, cols)
        .map_err(candle_core::Error::wrap)
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

fn storage_in(dtype: DType, values: Vec<f32>) -> candle_core::Result<CpuStorage> {
    Ok(match dtype {
        DType::F32 => CpuStorage::F32(values),
        DType::BF16 => CpuStorage::BF16(values.into_iter().map(bf16::from_f32).collect()),
        DType::F16 => CpuStorage::F16(values.into_iter().map(f16::from_f32).collect()),
        other => candle_core::bail!("int8-matmul: no output for dtype {other:?}"),
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn kernels_parse_from_their_names_and_others_are_errors_listing_them() {
        for kernel in GemmKernel::ALL {
            assert_eq!(kernel.name().parse(), Ok(kernel));
            assert_eq!(kernel.name().replace(' ', "-").parse(), Ok(kernel));
        }
        let error = "wgmma-octet".parse::<GemmKernel>().unwrap_err();
        assert!(
            error.contains("wgmma-octet") && error.contains("wgmma-persistent-cvt"),
            "{error}"
        );
    }

    #[test]
    fn the_chosen_kernel_is_the_one_in_use_until_another_is_chosen() {
        let before = set_gemm_kernel(GemmKernel::WgmmaPersistentCvt);
        assert_eq!(gemm_kernel(), GemmKernel::WgmmaPersistentCvt);
        assert_eq!(set_gemm_kernel(before), GemmKernel::WgmmaPersistentCvt);
        assert_eq!(gemm_kernel(), before);
    }

    #[test]
    fn activations_of_another_rank_or_dtype_are_errors_naming_them() -> candle_core::Result<()> {
        let weight = Int8Weight::quantize(&Tensor::ones((4, 16), DType::F32, &Device::Cpu)?)
            .map_err(candle_core::Error::wrap)?;
        let matmul = |x: &Tensor| int8_matmul(x, weight.int8_weight(), weight.scale());
        let error = matmul(&Tensor::ones((2, 3, 16), DType::F32, &Device::Cpu)?).unwrap_err();
        assert!(
            error.to_string().contains("activations must be 2-D"),
            "{error}"
        );
        let error = matmul(&Tensor::ones((3, 16), DType::U8, &Device::Cpu)?).unwrap_err();
        assert!(
            error.to_string().contains("f32, bf16 or f16, got U8"),
            "{error}"
        );
        assert_eq!(
            matmul(&Tensor::ones((3, 16), DType::F16, &Device::Cpu)?)?.dims(),
            [3, 4]
        );
        Ok(())
    }
}
