use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use candle_core::Tensor;

use crate::{Error, Result};

/// The top-k fraction TurboDiffusion uses when none is given (`--sla_topk 0.1`).
pub const DEFAULT_SLA_TOPK: f64 = 0.1;

/// Which self-attention backend a Wan DiT runs.
///
/// Parsed from `original`, `sla` or `sagesla`, optionally followed by `:<topk>` (for example
/// `sla:0.15`); without it the top-k fraction is [`DEFAULT_SLA_TOPK`]. `Display` writes the form
/// that parses back to the same value.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum AttentionKind {
    /// Exact softmax attention over all keys.
    Original,
    /// Sparse-linear attention: exact softmax over the top-k fraction of key blocks plus a
    /// linear-attention branch over all keys, projected by the layer's `proj_l`.
    Sla { topk: f64 },
    /// SLA whose sparse branch is computed with INT8 Q·Kᵀ and FP8 (E4M3) P·V.
    SageSla { topk: f64 },
}

impl AttentionKind {
    /// SLA with a validated top-k fraction.
    pub fn sla(topk: f64) -> Result<Self> {
        Ok(Self::Sla {
            topk: validate_topk(topk)?,
        })
    }

    /// SageSLA with a validated top-k fraction.
    pub fn sagesla(topk: f64) -> Result<Self> {
        Ok(Self::SageSla {
            topk: validate_topk(topk)?,
        })
    }

    /// The backend name without its top-k: `original`, `sla` or `sagesla`.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Original => "original",
            Self::Sla { .. } => "sla",
            Self::SageSla { .. } => "sagesla",
        }
    }

    /// The fraction of key blocks attended exactly, or `None` for dense attention.
    pub fn topk(&self) -> Option<f64> {
        match *self {
            Self::Original => None,
            Self::Sla { topk } | Self::SageSla { topk } => Some(topk),
        }
    }

    /// Checks the invariants the constructors enforce, for values built field by field.
    pub fn validate(&self) -> Result<()> {
        self.topk()
            .map_or(Ok(()), |topk| validate_topk(topk).map(drop))
    }
}

fn validate_topk(topk: f64) -> Result<f64> {
    if topk > 0.0 && topk <= 1.0 {
        Ok(topk)
    } else {
        Err(Error::InvalidTopk {
            value: topk.to_string(),
        })
    }
}

impl FromStr for AttentionKind {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let (name, topk) = match s.trim().split_once(':') {
            Some((name, topk)) => (name, Some(topk.trim())),
            None => (s.trim(), None),
        };
        if topk.is_some_and(|topk| topk.contains(':')) {
            return Err(Error::InvalidConfig {
                field: "attention".into(),
                reason: format!(
                    "`{s}` carries block sizes, which are part of an AttentionConfig, not of \
                     the kind: parse it as `turbo_attention::AttentionConfig`"
                ),
            });
        }
        let parse_topk = || match topk {
            None => Ok(DEFAULT_SLA_TOPK),
            Some(text) => text.parse::<f64>().map_err(|_| Error::InvalidTopk {
                value: text.to_owned(),
            }),
        };
        match name.to_ascii_lowercase().as_str() {
            "original" | "dense" if topk.is_none() => Ok(Self::Original),
            "sla" => Self::sla(parse_topk()?),
            "sagesla" => Self::sagesla(parse_topk()?),
            _ => Err(Error::UnknownAttentionKind { name: s.to_owned() }),
        }
    }
}

impl fmt::Display for AttentionKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.topk() {
            None => f.write_str(self.name()),
            Some(topk) => write!(f, "{}:{topk}", self.name()),
        }
    }
}

/// One layer's attention operator.
///
/// `forward` takes `q` as `[B, Lq, H, D]` and `k`, `v` as `[B, Lk, H, D]` (Wan's native layout,
/// after q/k RMSNorm and RoPE) and returns `[B, Lq, H, D]` in the dtype of `q`. Implementations
/// hold their layer's weights (SLA's `proj_l`), so there is one instance per layer.
///
/// The trait is object safe: choose the backend at run time with `Box<dyn Attention>`, or at
/// compile time with a generic parameter `A: Attention`; both forward to the same code.
pub trait Attention: Send + Sync + std::fmt::Debug {
    /// Attends `q` over `k` and `v`.
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;

    /// The backend this operator implements, with its top-k fraction.
    fn kind(&self) -> AttentionKind;

    /// Sets the top-k fraction of key blocks attended exactly by the forwards that follow, so
    /// that a sampler can change it between denoising steps. Fails with [`Error::InvalidTopk`]
    /// outside (0, 1]. Dense attention has no top-k: the default ignores the call.
    fn set_topk(&mut self, _topk: f64) -> Result<()> {
        Ok(())
    }
}

impl<A: Attention + ?Sized> Attention for Box<A> {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        (**self).forward(q, k, v)
    }

    fn kind(&self) -> AttentionKind {
        (**self).kind()
    }

    fn set_topk(&mut self, topk: f64) -> Result<()> {
        (**self).set_topk(topk)
    }
}

impl<A: Attention + ?Sized> Attention for Arc<A> {
    fn forward(&self, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        (**self).forward(q, k, v)
    }

    fn kind(&self) -> AttentionKind {
        (**self).kind()
    }

    /// Fails when the operator is shared with another `Arc`, rather than change it for every
    /// holder.
    fn set_topk(&mut self, topk: f64) -> Result<()> {
        Arc::get_mut(self)
            .ok_or_else(|| Error::InvalidConfig {
                field: "attention top-k".into(),
                reason: "the attention operator is shared through an Arc; \
                         only a sole owner can change its top-k"
                    .into(),
            })?
            .set_topk(topk)
    }
}

/// The dimensions of an attention call, checked once for every backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QkvShape {
    pub batch: usize,
    pub q_len: usize,
    pub kv_len: usize,
    pub heads: usize,
    pub head_dim: usize,
}

impl QkvShape {
    /// Reads the dimensions of `q` `[B, Lq, H, D]` and `k`, `v` `[B, Lk, H, D]`, and fails with a
    /// [`Error::Shape`] naming the offending tensor when they do not agree.
    pub fn of(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Self> {
        let (batch, q_len, heads, head_dim) =
            q.dims4().map_err(|_| shape_error("q", q, "[B, L, H, D]"))?;
        let expected_kv = format!("[{batch}, Lk, {heads}, {head_dim}]");
        let kv_dims = |name: &str, t: &Tensor| match t.dims4() {
            Ok((b, l, h, d)) if (b, h, d) == (batch, heads, head_dim) => Ok(l),
            _ => Err(shape_error(name, t, &expected_kv)),
        };
        let kv_len = kv_dims("k", k)?;
        if kv_dims("v", v)? != kv_len {
            return Err(shape_error(
                "v",
                v,
                &format!("[{batch}, {kv_len}, {heads}, {head_dim}] (as k)"),
            ));
        }
        if q_len == 0 || kv_len == 0 || heads == 0 || head_dim == 0 {
            return Err(shape_error("q", q, "non-empty [B, L, H, D]"));
        }
        Ok(Self {
            batch,
            q_len,
            kv_len,
            heads,
            head_dim,
        })
    }
}

fn shape_error(name: &str, t: &Tensor, expected: &str) -> Error {
    Error::Shape {
        what: format!("attention input `{name}`"),
        expected: expected.to_owned(),
        got: t.dims().to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    #[test]
    fn kinds_parse_with_default_topk() {
        assert_eq!(
            "original".parse::<AttentionKind>().unwrap(),
            AttentionKind::Original
        );
        assert_eq!(
            "sla".parse::<AttentionKind>().unwrap(),
            AttentionKind::Sla { topk: 0.1 }
        );
        assert_eq!(
            " SageSLA:0.15 ".parse::<AttentionKind>().unwrap(),
            AttentionKind::SageSla { topk: 0.15 }
        );
    }

    #[test]
    fn kinds_round_trip_through_display() {
        for kind in [
            AttentionKind::Original,
            AttentionKind::sla(0.05).unwrap(),
            AttentionKind::sagesla(1.0).unwrap(),
        ] {
            assert_eq!(kind.to_string().parse::<AttentionKind>().unwrap(), kind);
        }
        assert_eq!(AttentionKind::sla(0.25).unwrap().to_string(), "sla:0.25");
    }

    #[test]
    fn bad_kinds_and_topk_are_typed_errors() {
        for text in ["sparse", "", "original:0.1"] {
            assert!(matches!(
                text.parse::<AttentionKind>(),
                Err(Error::UnknownAttentionKind { .. })
            ));
        }
        for text in ["sla:0", "sla:1.5", "sagesla:-0.1", "sla:abc", "sla:NaN"] {
            assert!(
                matches!(
                    text.parse::<AttentionKind>(),
                    Err(Error::InvalidTopk { .. })
                ),
                "{text}"
            );
        }
        assert!(AttentionKind::Sla { topk: 2.0 }.validate().is_err());
        assert!(AttentionKind::Sla { topk: 1.0 }.validate().is_ok());
    }

    #[test]
    fn qkv_shape_checks_every_tensor() {
        let dev = Device::Cpu;
        let t = |dims: &[usize]| Tensor::zeros(dims, DType::F32, &dev).unwrap();
        let shape = QkvShape::of(&t(&[2, 5, 3, 8]), &t(&[2, 7, 3, 8]), &t(&[2, 7, 3, 8])).unwrap();
        assert_eq!(
            (shape.q_len, shape.kv_len, shape.heads, shape.head_dim),
            (5, 7, 3, 8)
        );

        let err =
            QkvShape::of(&t(&[2, 5, 3, 8]), &t(&[2, 7, 4, 8]), &t(&[2, 7, 4, 8])).unwrap_err();
        assert!(err.to_string().contains("`k`"), "{err}");
        let err =
            QkvShape::of(&t(&[2, 5, 3, 8]), &t(&[2, 7, 3, 8]), &t(&[2, 6, 3, 8])).unwrap_err();
        assert!(err.to_string().contains("`v`"), "{err}");
        assert!(QkvShape::of(&t(&[5, 3, 8]), &t(&[2, 7, 3, 8]), &t(&[2, 7, 3, 8])).is_err());
    }
}
