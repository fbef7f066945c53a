//! The DiT block's row and elementwise ops, each beside its reference: on CUDA one kernel
//! (`turbo_kernels::FUSED`) replaces the chain of candle broadcast ops, which make several
//! strided passes over the `[L, D]` residual stream; elsewhere the reference runs.

use candle_core::{DType, Tensor, D};
use turbo_core::Result;

/// LayerNorm over the last dimension of f32 `x`, then `· mul + add` per column when given
/// (`[D]`-sized, any leading shape), returned in `out_dtype` (f32 or bf16).
pub fn layer_norm_affine(
    x: &Tensor,
    mul: Option<&Tensor>,
    add: Option<&Tensor>,
    eps: f64,
    out_dtype: DType,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::applies(x, out_dtype) {
        return cuda::layer_norm_affine(x, mul, add, eps, out_dtype);
    }
    layer_norm_affine_reference(x, mul, add, eps, out_dtype)
}

/// [`layer_norm_affine`] as candle ops: two-pass mean and variance in f32.
pub fn layer_norm_affine_reference(
    x: &Tensor,
    mul: Option<&Tensor>,
    add: Option<&Tensor>,
    eps: f64,
    out_dtype: DType,
) -> Result<Tensor> {
    let x = x.to_dtype(DType::F32)?;
    let centred = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let variance = centred.sqr()?.mean_keepdim(D::Minus1)?;
    let mut y = centred.broadcast_div(&(variance + eps)?.sqrt()?)?;
    if let Some(mul) = mul {
        y = y.broadcast_mul(&columns(mul)?)?;
    }
    if let Some(add) = add {
        y = y.broadcast_add(&columns(add)?)?;
    }
    Ok(y.to_dtype(out_dtype)?)
}

/// `x + (y + bias) · gate` for the f32 residual stream `x`, a branch output `y` (f32 or bf16)
/// of the same shape still without its linear's `bias`, and a `[D]`-sized f32 gate; `bias`
/// and `gate` may be absent (0 and 1). f32 out.
pub fn gated_residual(
    x: &Tensor,
    y: &Tensor,
    bias: Option<&Tensor>,
    gate: Option<&Tensor>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::applies(x, y.dtype()) && x.dims() == y.dims() && last_dim(x)? % 2 == 0 {
        return cuda::gated_residual(x, y, bias, gate);
    }
    gated_residual_reference(x, y, bias, gate)
}

/// [`gated_residual`] as candle ops: the bias added in the dtype of `y` (as the linear does).
pub fn gated_residual_reference(
    x: &Tensor,
    y: &Tensor,
    bias: Option<&Tensor>,
    gate: Option<&Tensor>,
) -> Result<Tensor> {
    let branch = with_bias_reference(y, bias)?.to_dtype(DType::F32)?;
    let branch = match gate {
        Some(gate) => branch.broadcast_mul(&columns(gate)?)?,
        None => branch,
    };
    Ok((x + branch)?)
}

/// `gelu(y + bias)` (tanh approximation) in the dtype of `y`: the first FFN linear's bias and
/// activation in one pass.
pub fn bias_gelu(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::applies_to_branch(y) {
        return cuda::bias_gelu(y, bias);
    }
    bias_gelu_reference(y, bias)
}

/// [`bias_gelu`] as candle ops.
pub fn bias_gelu_reference(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(with_bias_reference(y, bias)?.gelu()?)
}

/// The cosines and sines of the rotary angles, `[tokens, 1, D_head/2]` (or `[tokens,
/// D_head/2]`) f32: pair p of every head of token t turns by the angle at `[t, p]`.
#[derive(Debug, Clone, Copy)]
pub struct RopeTables<'a> {
    pub cos: &'a Tensor,
    pub sin: &'a Tensor,
}

impl RopeTables<'_> {
    fn tokens(&self) -> Result<usize> {
        Ok(self.cos.dim(0)?)
    }

    fn head_dim(&self) -> Result<usize> {
        Ok(2 * self.cos.dim(candle_core::D::Minus1)?)
    }
}

/// Wan's q/k path on a linear's output `y` `[.., D]` still without its `bias`: RMSNorm over
/// the whole row (all heads) with the f32 `weight`, then, when given, RoPE on the interleaved
/// pairs of every head; in the dtype of `y`. Rows are tokens, in the order of the tables'
/// (repeating for a batch).
pub fn rms_norm_rope(
    y: &Tensor,
    bias: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    rope: Option<RopeTables>,
) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::applies_to_branch(y) && last_dim(y)? % 2 == 0 {
        return cuda::rms_norm_rope(y, bias, weight, eps, rope);
    }
    rms_norm_rope_reference(y, bias, weight, eps, rope)
}

/// [`rms_norm_rope`] as candle ops: the bias added in the dtype of `y`, RMSNorm in f32 back to
/// that dtype, the rotation in f32 back to it.
pub fn rms_norm_rope_reference(
    y: &Tensor,
    bias: Option<&Tensor>,
    weight: &Tensor,
    eps: f64,
    rope: Option<RopeTables>,
) -> Result<Tensor> {
    let y = with_bias_reference(y, bias)?;
    let normed = candle_nn::ops::rms_norm(&y.to_dtype(DType::F32)?, weight, eps as f32)?
        .to_dtype(y.dtype())?;
    match rope {
        Some(tables) => rotate_pairs_reference(&normed, tables),
        None => Ok(normed),
    }
}

/// RoPE on the interleaved pairs `(x[2p], x[2p+1])` of every head of `x` `[.., D]`, in f32,
/// returning the dtype of `x`.
pub(crate) fn rotate_pairs_reference(x: &Tensor, tables: RopeTables) -> Result<Tensor> {
    let (dim, head_dim, tokens) = (last_dim(x)?, tables.head_dim()?, tables.tokens()?);
    let rows = x.elem_count() / dim.max(1);
    if head_dim == 0 || dim % head_dim != 0 || rows % tokens != 0 {
        return Err(turbo_core::Error::Shape {
            what: "RoPE input (rows a multiple of the tables' tokens, D of their head dim)".into(),
            expected: format!("[k·{tokens}, h·{head_dim}]"),
            got: x.dims().to_vec(),
        });
    }
    let pairs = head_dim / 2;
    let repeat = |t: &Tensor| -> Result<Tensor> {
        let t = t.reshape((tokens, 1, pairs))?;
        Ok(Tensor::cat(&vec![t; rows / tokens], 0)?)
    };
    // rope_i wants [B, H, T, D] with per-batch tables [B, T, D/2]: every token is a batch
    // entry of one position, so no transpose is needed.
    let per_token = x
        .to_dtype(DType::F32)?
        .reshape((rows, dim / head_dim, 1, head_dim))?;
    let rotated =
        candle_nn::rotary_emb::rope_i(&per_token, &repeat(tables.cos)?, &repeat(tables.sin)?)?;
    Ok(rotated.reshape(x.shape())?.to_dtype(x.dtype())?)
}

/// `y + bias` in the dtype of `y`, as the linears add it.
fn with_bias_reference(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
    Ok(match bias {
        Some(bias) => turbo_quant::add_bias_reference(y, &bias.to_dtype(y.dtype())?)?,
        None => y.clone(),
    })
}

fn last_dim(x: &Tensor) -> Result<usize> {
    Ok(x.dim(candle_core::D::Minus1)?)
}

/// A `[D]`-sized tensor as a flat f32 `[D]` row.
fn columns(t: &Tensor) -> Result<Tensor> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaView, LaunchArgs, LaunchConfig, PushKernelArg,
    };
    use std::ops::Deref;

    use candle_core::cuda_backend::{CudaDType, WrapErr};
    use candle_core::{DType, Layout, Storage, Tensor};
    use half::bf16;
    use turbo_core::cuda::{cuda_view, tensor_from_cuda};
    use turbo_core::Result;

    use super::{columns, RopeTables};

    const MODULE: &str = "turbo_fused";

    /// f32 `x` on CUDA, output (or second operand) in f32 or bf16.
    pub(super) fn applies(x: &Tensor, other: DType) -> bool {
        x.device().is_cuda() && x.dtype() == DType::F32 && matches!(other, DType::F32 | DType::BF16)
    }

    pub(super) fn layer_norm_affine(
        x: &Tensor,
        mul: Option<&Tensor>,
        add: Option<&Tensor>,
        eps: f64,
        out_dtype: DType,
    ) -> Result<Tensor> {
        let x = x.contiguous()?;
        let dim = x.dim(candle_core::D::Minus1)?;
        let rows = x.elem_count() / dim.max(1);
        let dev = x.device().as_cuda_device()?;
        let (mul, add) = (mul.map(columns).transpose()?, add.map(columns).transpose()?);
        let (xs, xl) = x.storage_and_layout();
        let x_view = cuda_view::<f32>(&xs, xl.start_offset(), "layer norm input")?;
        let mul_guard = mul.as_ref().map(|t| t.storage_and_layout());
        let add_guard = add.as_ref().map(|t| t.storage_and_layout());
        let mul_view = optional_view::<f32, _>(&mul_guard, "layer norm mul")?;
        let add_view = optional_view::<f32, _>(&add_guard, "layer norm add")?;
        let (rows_arg, dim_arg, eps_arg) = (rows as i32, dim as i32, eps as f32);
        // A warp per row.
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(8) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($t:ty, $kernel:literal) => {{
                let out = unsafe { dev.alloc::<$t>(x.elem_count()) }?;
                let func = turbo_core::cuda::kernel(dev, $kernel, MODULE, turbo_kernels::FUSED)?;
                let mut launch = func.builder();
                let null = 0u64;
                launch.arg(&x_view);
                push_optional(&mut launch, &mul_view, &null);
                push_optional(&mut launch, &add_view, &null);
                launch.arg(&out).arg(&rows_arg).arg(&dim_arg).arg(&eps_arg);
                unsafe { launch.launch(cfg) }.w()?;
                tensor_from_cuda(out, dev, x.shape().clone())
            }};
        }
        Ok(match out_dtype {
            DType::BF16 => launch!(bf16, "layer_norm_affine_bf16"),
            _ => launch!(f32, "layer_norm_affine_f32"),
        })
    }

    /// A branch output on CUDA in f32 or bf16.
    pub(super) fn applies_to_branch(y: &Tensor) -> bool {
        y.device().is_cuda() && matches!(y.dtype(), DType::F32 | DType::BF16)
    }

    pub(super) fn gated_residual(
        x: &Tensor,
        y: &Tensor,
        bias: Option<&Tensor>,
        gate: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (x, y) = (x.contiguous()?, y.contiguous()?);
        let gate = gate.map(columns).transpose()?;
        let bias = bias_like(bias, &y)?;
        let dim = x.dim(candle_core::D::Minus1)?;
        let dev = x.device().as_cuda_device()?;
        let out = unsafe { dev.alloc::<f32>(x.elem_count()) }?;
        let (xs, xl) = x.storage_and_layout();
        let x_view = cuda_view::<f32>(&xs, xl.start_offset(), "residual")?;
        let gate_guard = gate.as_ref().map(|t| t.storage_and_layout());
        let gate_view = optional_view::<f32, _>(&gate_guard, "gate")?;
        let (ys, yl) = y.storage_and_layout();
        let bias_guard = bias.as_ref().map(|t| t.storage_and_layout());
        macro_rules! launch {
            ($t:ty, $kernel:literal) => {{
                let y_view = cuda_view::<$t>(&ys, yl.start_offset(), "branch output")?;
                let bias_view = optional_view::<$t, _>(&bias_guard, "branch bias")?;
                let func = turbo_core::cuda::kernel(dev, $kernel, MODULE, turbo_kernels::FUSED)?;
                let mut launch = func.builder();
                let null = 0u64;
                launch.arg(&x_view).arg(&y_view);
                push_optional(&mut launch, &bias_view, &null);
                push_optional(&mut launch, &gate_view, &null);
                let dim_arg = dim as i32;
                launch.arg(&out).arg(&dim_arg);
                unsafe { launch.launch(row_launch(x.elem_count() / dim, 0)) }.w()?;
            }};
        }
        match y.dtype() {
            DType::BF16 => launch!(bf16, "gated_residual_bf16"),
            _ => launch!(f32, "gated_residual_f32"),
        }
        Ok(tensor_from_cuda(out, dev, x.shape().clone()))
    }

    pub(super) fn bias_gelu(y: &Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let y = y.contiguous()?;
        let bias = bias_like(bias, &y)?;
        let n = y.dim(candle_core::D::Minus1)?;
        let dev = y.device().as_cuda_device()?;
        let (ys, yl) = y.storage_and_layout();
        let bias_guard = bias.as_ref().map(|t| t.storage_and_layout());
        macro_rules! launch {
            ($t:ty, $kernel:literal) => {{
                let out = unsafe { dev.alloc::<$t>(y.elem_count()) }?;
                let y_view = cuda_view::<$t>(&ys, yl.start_offset(), "linear output")?;
                let bias_view = optional_view::<$t, _>(&bias_guard, "linear bias")?;
                let func = turbo_core::cuda::kernel(dev, $kernel, MODULE, turbo_kernels::FUSED)?;
                let mut launch = func.builder();
                let null = 0u64;
                launch.arg(&y_view);
                push_optional(&mut launch, &bias_view, &null);
                let n_arg = n as i32;
                launch.arg(&out).arg(&n_arg);
                unsafe { launch.launch(row_launch(y.elem_count() / n, 0)) }.w()?;
                tensor_from_cuda(out, dev, y.shape().clone())
            }};
        }
        Ok(match y.dtype() {
            DType::BF16 => launch!(bf16, "bias_gelu_bf16"),
            _ => launch!(f32, "bias_gelu_f32"),
        })
    }

    pub(super) fn rms_norm_rope(
        y: &Tensor,
        bias: Option<&Tensor>,
        weight: &Tensor,
        eps: f64,
        rope: Option<RopeTables>,
    ) -> Result<Tensor> {
        let y = y.contiguous()?;
        let bias = bias_like(bias, &y)?;
        let weight = columns(weight)?.contiguous()?;
        let dim = y.dim(candle_core::D::Minus1)?;
        let tables = match rope {
            Some(tables) => Some((
                tables.cos.to_dtype(DType::F32)?.contiguous()?,
                tables.sin.to_dtype(DType::F32)?.contiguous()?,
                tables.head_dim()?,
                tables.tokens()?,
            )),
            None => None,
        };
        let rows = y.elem_count() / dim;
        let (head_dim, tokens) = tables.as_ref().map_or((dim, rows), |t| (t.2, t.3));
        if head_dim == 0 || dim % head_dim != 0 || tokens == 0 || rows % tokens != 0 {
            return super::rms_norm_rope_reference(&y, bias.as_ref(), &weight, eps, rope);
        }
        let dev = y.device().as_cuda_device()?;
        let (ys, yl) = y.storage_and_layout();
        let (ws, wl) = weight.storage_and_layout();
        let weight_view = cuda_view::<f32>(&ws, wl.start_offset(), "norm weight")?;
        let bias_guard = bias.as_ref().map(|t| t.storage_and_layout());
        let cos_guard = tables.as_ref().map(|t| t.0.storage_and_layout());
        let sin_guard = tables.as_ref().map(|t| t.1.storage_and_layout());
        let cos_view = optional_view::<f32, _>(&cos_guard, "rope cos")?;
        let sin_view = optional_view::<f32, _>(&sin_guard, "rope sin")?;
        let args = [dim, head_dim, tokens].map(|v| v as i32);
        let eps_arg = eps as f32;
        macro_rules! launch {
            ($t:ty, $kernel:literal) => {{
                let out = unsafe { dev.alloc::<$t>(y.elem_count()) }?;
                let y_view = cuda_view::<$t>(&ys, yl.start_offset(), "linear output")?;
                let bias_view = optional_view::<$t, _>(&bias_guard, "linear bias")?;
                let func = turbo_core::cuda::kernel(dev, $kernel, MODULE, turbo_kernels::FUSED)?;
                let mut launch = func.builder();
                let null = 0u64;
                launch.arg(&y_view);
                push_optional(&mut launch, &bias_view, &null);
                launch.arg(&weight_view);
                push_optional(&mut launch, &cos_view, &null);
                push_optional(&mut launch, &sin_view, &null);
                launch
                    .arg(&out)
                    .arg(&args[0])
                    .arg(&args[1])
                    .arg(&args[2])
                    .arg(&eps_arg);
                let shared = (dim * std::mem::size_of::<f32>()) as u32;
                unsafe { launch.launch(row_launch(rows, shared)) }.w()?;
                tensor_from_cuda(out, dev, y.shape().clone())
            }};
        }
        Ok(match y.dtype() {
            DType::BF16 => launch!(bf16, "rms_norm_rope_bf16"),
            _ => launch!(f32, "rms_norm_rope_f32"),
        })
    }

    /// One CTA of 256 threads per row.
    fn row_launch(rows: usize, shared_bytes: u32) -> LaunchConfig {
        LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: shared_bytes,
        }
    }

    /// `bias` contiguous in the dtype of `y`.
    fn bias_like(bias: Option<&Tensor>, y: &Tensor) -> Result<Option<Tensor>> {
        Ok(match bias {
            Some(bias) => Some(bias.to_dtype(y.dtype())?.contiguous()?),
            None => None,
        })
    }

    /// The view of an optional operand, from its `Tensor::storage_and_layout`.
    fn optional_view<'a, T: CudaDType, G: Deref<Target = Storage>>(
        guard: &'a Option<(G, &Layout)>,
        what: &str,
    ) -> Result<Option<CudaView<'a, T>>> {
        guard
            .as_ref()
            .map(|(storage, layout)| cuda_view::<T>(storage, layout.start_offset(), what))
            .transpose()
    }

    /// Pushes the view, or a null pointer for an absent operand.
    fn push_optional<'a, T>(
        launch: &mut LaunchArgs<'a>,
        view: &'a Option<CudaView<'a, T>>,
        null: &'a u64,
    ) {
        match view {
            Some(view) => launch.arg(view),
            None => launch.arg(null),
        };
    }
}
