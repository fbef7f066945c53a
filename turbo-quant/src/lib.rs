//! W8A8 int8 linears for the Wan DiT, as TurboDiffusion's `--quant_linear` computes them
//! (`spec/turbodiffusion.md` §12).
//!
//! # The scheme
//! Weights and activations are both quantised symmetrically with one f32 scale per 128×128 tile:
//! `amax = max(1e-8, max|v|)` over the tile, `scale = amax / 128` and
//! `q = clamp(round_half_even(v · (128 / amax)), −128, 127)`, the reciprocal rounded to f32 first
//! as upstream computes it. The product accumulates each
//! 128-wide k tile exactly in i32 and adds it, times `scale_x · scale_w` of that tile pair, to an
//! f32 accumulator: `Y[m, n] = Σ_kb X_s[m/128, kb] · W_s[n/128, kb] · Σ_{k∈kb} X_q[m,k]·W_q[n,k]`.
//! Shapes need not be multiples of 128: edge tiles are partial.
//!
//! # The API
//! - [`Linear`]: one layer type, float or int8, implementing candle's [`Module`] on `[.., K]`
//!   inputs with any leading dimensions, returning the input's dtype. Build it with
//!   [`Linear::from_float`], [`Linear::quantize`] (quantise a float weight at load),
//!   [`Linear::from_int8`] (the `int8_weight`, `scale`, `bias` tensors of a `-quant`
//!   checkpoint), or [`Linear::load`], which detects from the keys under a `VarBuilder` whether
//!   the layer is stored quantised and applies a [`QuantPolicy`] to float layers.
//! - [`Int8Weight`]: int8 values and tile scales of one weight; [`int8_tensor`] wraps int8 values
//!   as the `U8` tensor in which they travel through candle.
//! - The pieces, on plain slices: [`quantize_tiles`] (→ [`TileQuantized`]), [`TileMatrix`] (a
//!   borrowed int8 matrix with its scales, and its dequantisation) and [`int8_gemm`].
//! - [`int8_matmul`]: activation quantisation ([`Int8Weight::quantize`]) plus the GEMM, which
//!   [`int8_matmul_tiles`] runs alone on activations quantised before (as a candle `CustomOp3`,
//!   [`Int8Matmul`], with CUDA kernels as its `cuda_fwd`); [`int8_matmul_with`] picks the CUDA
//!   GEMM ([`GemmKernel`]: by default the fastest of the Hopper `wgmma` kernels for each
//!   shape, timed once per process; `mma.sync` elsewhere).
//! - [`LinearInput`]: an input several layers read (an attention's q, k and v), quantised once.
//!
//! ```
//! use candle_core::{DType, Device, Tensor};
//! use turbo_quant::{Linear, Module};
//!
//! # fn main() -> turbo_core::Result<()> {
//! let weight = Tensor::randn(0f32, 1.0, (300, 200), &Device::Cpu)?;
//! let bias = Tensor::zeros(300, DType::F32, &Device::Cpu)?;
//! let float = Linear::from_float(weight.clone(), Some(bias.clone()))?;
//! let int8 = Linear::quantize(&weight, Some(bias))?;
//! assert!(int8.is_int8());
//!
//! // Any leading dimensions; the output has the input's dtype.
//! let x = Tensor::randn(0f32, 1.0, (2, 50, 200), &Device::Cpu)?.to_dtype(DType::BF16)?;
//! let y = int8.forward(&x)?;
//! assert_eq!(y.dims(), &[2, 50, 300]);
//! assert_eq!(y.dtype(), DType::BF16);
//!
//! // Close to the float layer: about 1.4 % relative error on Gaussian data.
//! let reference = float.forward(&x)?.to_dtype(DType::F32)?;
//! let diff = (y.to_dtype(DType::F32)? - &reference)?;
//! let relative = (diff.sqr()?.sum_all()?.sqrt()? / reference.sqr()?.sum_all()?.sqrt()?)?;
//! assert!(relative.to_scalar::<f32>()? < 0.02);
//! # Ok(())
//! # }
//! ```
//!
//! # Int8 tensors in candle
//! candle has no int8 dtype, so int8 values travel as `U8` tensors holding their
//! two's-complement bytes. A `VarBuilder` over safetensors files cannot read the `I8` dtype:
//! read such files' int8 tensors as bytes and hand them over as `U8` tensors (for example in a
//! `VarBuilder::from_tensors` map).
//!
//! The int8 product runs on the CPU (parallel over output rows with rayon) and, with the `cuda`
//! feature, on CUDA devices; on other devices [`Int8Matmul`] reports that it has no kernel yet.

#[cfg(feature = "cuda")]
mod cublaslt;
#[cfg(feature = "cuda")]
mod cuda;
mod gemm;
mod linear;
mod op;
mod tile;
#[cfg(feature = "cuda")]
mod timing;

pub use candle_core::Module;
pub use gemm::int8_gemm;
pub use linear::{
    int8_tensor, Int8Weight, Linear, LinearInput, LowRank, QuantPolicy, BIAS_KEY, INT8_WEIGHT_KEY,
    SCALE_KEY, WEIGHT_KEY,
};
pub use op::{
    add_bias, add_bias_reference, gemm_kernel, int8_matmul, int8_matmul_tiles, int8_matmul_with,
    set_gemm_kernel, GemmKernel, Int8Matmul,
};
pub use tile::{quantize_tiles, tile_grid, TileMatrix, TileQuantized, TILE};
