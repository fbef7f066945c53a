use candle_core::{DType, Device, Tensor};
use candle_nn::ops::softmax_last_dim;
use candle_nn::VarBuilder;
use turbo_core::{Error, Result};

/// SLA's linear branch on heads-first `[B, H, L, D]` f32 tensors, over all keys.
///
/// With φ = softmax over the head dimension, per (batch, head):
/// `H = φ(K)ᵀV` (D × D), `z = Σ_t φ(K)_t`, and `O_t = φ(Q)_t·H / (φ(Q)_t·z + eps)`.
pub fn linear_attention(q: &Tensor, k: &Tensor, v: &Tensor, eps: f64) -> Result<Tensor> {
    let phi_q = softmax_last_dim(q)?;
    let phi_k = softmax_last_dim(k)?;
    let kv = phi_k.t()?.matmul(v)?;
    let z = phi_k.sum_keepdim(2)?;
    let numerator = phi_q.matmul(&kv)?;
    let denominator = (phi_q.broadcast_mul(&z)?.sum_keepdim(3)? + eps)?;
    Ok(numerator.broadcast_div(&denominator)?)
}

/// SLA's learned projection of the linear branch, `y = x·Wᵀ + b` with a `D × D` weight shared by
/// all heads of a layer. Held in f32.
#[derive(Debug, Clone)]
pub struct ProjL {
    weight_t: Tensor,
    bias: Tensor,
}

impl ProjL {
    /// From a `[D, D]` weight and a `[D]` bias, in any float dtype.
    pub fn new(weight: &Tensor, bias: &Tensor) -> Result<Self> {
        let dim = match weight.dims() {
            &[rows, cols] if rows == cols => rows,
            dims => return Err(proj_shape_error("proj_l.weight", "[D, D]", dims)),
        };
        if bias.dims() != [dim] {
            return Err(proj_shape_error(
                "proj_l.bias",
                &format!("[{dim}]"),
                bias.dims(),
            ));
        }
        Ok(Self {
            weight_t: weight.to_dtype(DType::F32)?.t()?.contiguous()?,
            bias: bias.to_dtype(DType::F32)?,
        })
    }

    /// Reads `weight` `[head_dim, head_dim]` and `bias` `[head_dim]` under `vb` (the checkpoint's
    /// `…local_attn.proj_l`).
    pub fn load(vb: VarBuilder, head_dim: usize) -> Result<Self> {
        let weight = vb.get((head_dim, head_dim), "weight")?;
        let bias = vb.get(head_dim, "bias")?;
        Self::new(&weight, &bias)
    }

    /// The zero projection: SLA reduces to its sparse branch (as at the start of SLA training).
    pub fn zeros(head_dim: usize, device: &Device) -> Result<Self> {
        Self::new(
            &Tensor::zeros((head_dim, head_dim), DType::F32, device)?,
            &Tensor::zeros(head_dim, DType::F32, device)?,
        )
    }

    /// `Wᵀ`, `[D, D]` f32.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn weight_t(&self) -> &Tensor {
        &self.weight_t
    }

    /// `b`, `[D]` f32.
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn bias(&self) -> &Tensor {
        &self.bias
    }

    pub fn dim(&self) -> usize {
        self.bias.dims()[0]
    }

    /// Projects the last dimension of `x`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(x.broadcast_matmul(&self.weight_t)?
            .broadcast_add(&self.bias)?)
    }
}

fn proj_shape_error(what: &str, expected: &str, got: &[usize]) -> Error {
    Error::Shape {
        what: what.to_owned(),
        expected: expected.to_owned(),
        got: got.to_vec(),
    }
}
