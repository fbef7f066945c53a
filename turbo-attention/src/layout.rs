//! Conversions between Wan's `[B, L, H, D]` layout and the heads-first f32 layout the CPU
//! reference computes in.

use candle_core::{DType, Tensor};
use turbo_core::Result;

/// `[B, L, H, D]` in any float dtype → contiguous `[B, H, L, D]` f32.
pub(crate) fn heads_first_f32(x: &Tensor) -> Result<Tensor> {
    Ok(x.transpose(1, 2)?.to_dtype(DType::F32)?.contiguous()?)
}

/// `[B, H, L, D]` → contiguous `[B, L, H, D]` in `dtype`.
pub(crate) fn tokens_first(x: &Tensor, dtype: DType) -> Result<Tensor> {
    Ok(x.transpose(1, 2)?.to_dtype(dtype)?.contiguous()?)
}
