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

/// `x + y · gate` for the f32 residual stream `x`, a branch output `y` (f32 or bf16) of the
/// same shape and a `[D]`-sized f32 gate; f32 out.
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    #[cfg(feature = "cuda")]
    if cuda::applies(x, y.dtype()) && x.dims() == y.dims() {
        return cuda::gated_residual(x, y, gate);
    }
    gated_residual_reference(x, y, gate)
}

/// [`gated_residual`] as candle ops.
pub fn gated_residual_reference(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
    Ok((x + y.to_dtype(DType::F32)?.broadcast_mul(&columns(gate)?)?)?)
}

/// A `[D]`-sized tensor as a flat f32 `[D]` row.
fn columns(t: &Tensor) -> Result<Tensor> {
    Ok(t.flatten_all()?.to_dtype(DType::F32)?)
}

#[cfg(feature = "cuda")]
mod cuda {
    use candle_core::cuda_backend::cudarc::driver::{
        CudaSlice, CudaView, LaunchConfig, PushKernelArg,
    };
    use candle_core::cuda_backend::{CudaDevice, WrapErr};
    use candle_core::{DType, Tensor};
    use half::bf16;
    use turbo_core::cuda::{cuda_view, tensor_from_cuda};
    use turbo_core::Result;

    use super::columns;

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
        let mul_view = match &mul_guard {
            Some((s, l)) => Some(cuda_view::<f32>(s, l.start_offset(), "layer norm mul")?),
            None => None,
        };
        let add_view = match &add_guard {
            Some((s, l)) => Some(cuda_view::<f32>(s, l.start_offset(), "layer norm add")?),
            None => None,
        };
        let kernel = match out_dtype {
            DType::BF16 => "layer_norm_affine_bf16",
            _ => "layer_norm_affine_f32",
        };
        let func = dev.get_or_load_custom_func(kernel, MODULE, turbo_kernels::FUSED)?;
        let (null, dim_arg, eps_arg) = (0u64, dim as i32, eps as f32);
        let cfg = LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        macro_rules! launch {
            ($out:expr) => {{
                let mut launch = func.builder();
                launch.arg(&x_view);
                match &mul_view {
                    Some(view) => launch.arg(view),
                    None => launch.arg(&null),
                };
                match &add_view {
                    Some(view) => launch.arg(view),
                    None => launch.arg(&null),
                };
                launch.arg($out).arg(&dim_arg).arg(&eps_arg);
                unsafe { launch.launch(cfg) }.w()?;
            }};
        }
        Ok(match out_dtype {
            DType::BF16 => {
                let out = unsafe { dev.alloc::<bf16>(x.elem_count()) }?;
                launch!(&out);
                tensor_from_cuda(out, dev, x.shape().clone())
            }
            _ => {
                let out = unsafe { dev.alloc::<f32>(x.elem_count()) }?;
                launch!(&out);
                tensor_from_cuda(out, dev, x.shape().clone())
            }
        })
    }

    pub(super) fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor) -> Result<Tensor> {
        let (x, y, gate) = (
            x.contiguous()?,
            y.contiguous()?,
            columns(gate)?.contiguous()?,
        );
        let dim = gate.elem_count();
        let total = x.elem_count();
        let dev = x.device().as_cuda_device()?;
        let out = unsafe { dev.alloc::<f32>(total) }?;
        {
            let (xs, xl) = x.storage_and_layout();
            let (ys, yl) = y.storage_and_layout();
            let (gs, gl) = gate.storage_and_layout();
            let x_view = cuda_view::<f32>(&xs, xl.start_offset(), "residual")?;
            let gate_view = cuda_view::<f32>(&gs, gl.start_offset(), "gate")?;
            let y_offset = yl.start_offset();
            let args = (&x_view, &gate_view, &out, total, dim as i32);
            match y.dtype() {
                DType::BF16 => {
                    let y_view = cuda_view::<bf16>(&ys, y_offset, "branch output")?;
                    launch_gated_residual(dev, "gated_residual_bf16", &y_view, args)?;
                }
                _ => {
                    let y_view = cuda_view::<f32>(&ys, y_offset, "branch output")?;
                    launch_gated_residual(dev, "gated_residual_f32", &y_view, args)?;
                }
            }
        }
        Ok(tensor_from_cuda(out, dev, x.shape().clone()))
    }

    /// (x, gate, out, elements, columns) of the gated-residual kernels.
    type GatedArgs<'a> = (
        &'a CudaView<'a, f32>,
        &'a CudaView<'a, f32>,
        &'a CudaSlice<f32>,
        usize,
        i32,
    );

    fn launch_gated_residual<T>(
        dev: &CudaDevice,
        kernel: &str,
        y: &CudaView<'_, T>,
        (x, gate, out, total, dim): GatedArgs<'_>,
    ) -> Result<()> {
        let func = dev.get_or_load_custom_func(kernel, MODULE, turbo_kernels::FUSED)?;
        let mut launch = func.builder();
        launch
            .arg(x)
            .arg(y)
            .arg(gate)
            .arg(out)
            .arg(&total)
            .arg(&dim);
        unsafe { launch.launch(LaunchConfig::for_num_elems(total as u32)) }.w()?;
        Ok(())
    }
}
