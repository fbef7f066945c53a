//! The quantisation steps of SageSLA's sparse branch, emulated exactly on the CPU
//! (`spec/attention.md` §2 and §4.2). Quantised values are held as f32 tensors: every int8
//! and E4M3 value is exactly representable in f32.

use candle_core::Tensor;
use float8::F8E4M3;
use turbo_core::Result;

/// The largest int8 magnitude of the symmetric Q/K quantisation.
const INT8_MAX: f32 = 127.0;
/// Added to every Q/K block scale, as upstream does, so an all-zero block divides safely.
const INT8_SCALE_EPS: f32 = 1e-7;
/// V is scaled so that its per-channel absolute maximum becomes this value before the E4M3
/// cast (SageAttention2++'s `quant_v_scale_max`, used by SageSLA on every architecture).
pub const V_SCALE_MAX: f32 = 2.25;

/// Rounds to the nearest E4M3 value (ties to even, saturating at ±448, NaN preserved): the
/// conversion of `cvt.rn.satfinite.e4m3x2.f32`.
pub fn round_to_e4m3(x: f32) -> f32 {
    F8E4M3::from_f32(x).to_f32()
}

/// Int8 values and their scale per block of tokens.
#[derive(Debug, Clone)]
pub struct Int8Blocks {
    /// `[B, H, L, D]` f32 holding integers in [−127, 127].
    pub values: Tensor,
    /// One scale per (flattened batch · head, block): `scales[head * blocks + j]`.
    pub scales: Vec<f32>,
    pub blocks: usize,
}

impl Int8Blocks {
    pub fn scale(&self, head: usize, block: usize) -> f32 {
        self.scales[head * self.blocks + block]
    }
}

/// Symmetric per-block int8 quantisation of heads-first `[B, H, L, D]` f32 `x` over blocks of
/// `block` tokens: scale = max|x|/127 + 1e-7, q = x/scale rounded half away from zero (by adding
/// ±0.5 and truncating, as the Triton quantiser does).
pub fn quantize_int8_blocks(x: &Tensor, block: usize) -> Result<Int8Blocks> {
    let (_, _, len, dim) = x.dims4()?;
    let blocks = len.div_ceil(block);
    let mut values = x.flatten_all()?.to_vec1::<f32>()?;
    let mut scales = Vec::with_capacity(values.len() / (len * dim) * blocks);
    for head in values.chunks_mut(len * dim) {
        for chunk in head.chunks_mut(block * dim) {
            let amax = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            let scale = amax / INT8_MAX + INT8_SCALE_EPS;
            for v in chunk.iter_mut() {
                let scaled = *v / scale;
                *v = (scaled + 0.5f32.copysign(scaled))
                    .trunc()
                    .clamp(-INT8_MAX, INT8_MAX);
            }
            scales.push(scale);
        }
    }
    Ok(Int8Blocks {
        values: Tensor::from_vec(values, x.shape(), x.device())?,
        scales,
        blocks,
    })
}

/// E4M3 values of V and their per-channel scales.
#[derive(Debug, Clone)]
pub struct Fp8Channels {
    /// `[B, H, L, D]` f32 holding E4M3 values.
    pub values: Tensor,
    /// `[B, H, 1, D]`: multiply the attention output by these.
    pub scales: Tensor,
}

/// Per-(batch, head, channel) E4M3 quantisation of heads-first `[B, H, L, D]` f32 `v`:
/// scale = max_t|v| / 2.25, value = e4m3(v / scale). An all-zero channel gets scale 0 and zero
/// values (upstream would divide 0 by 0).
pub fn quantize_fp8_channels(v: &Tensor) -> Result<Fp8Channels> {
    let (batch, heads, len, dim) = v.dims4()?;
    let mut values = v.flatten_all()?.to_vec1::<f32>()?;
    let mut scales = Vec::with_capacity(batch * heads * dim);
    for head in values.chunks_mut(len * dim) {
        let mut amax = vec![0f32; dim];
        for token in head.chunks(dim) {
            amax.iter_mut()
                .zip(token)
                .for_each(|(m, x)| *m = m.max(x.abs()));
        }
        let head_scales: Vec<f32> = amax.iter().map(|m| m / V_SCALE_MAX).collect();
        for token in head.chunks_mut(dim) {
            for (x, &scale) in token.iter_mut().zip(&head_scales) {
                *x = if scale > 0.0 {
                    round_to_e4m3(*x / scale)
                } else {
                    0.0
                };
            }
        }
        scales.extend(head_scales);
    }
    Ok(Fp8Channels {
        values: Tensor::from_vec(values, v.shape(), v.device())?,
        scales: Tensor::from_vec(scales, (batch, heads, 1, dim), v.device())?,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn e4m3_rounding_matches_the_format() {
        assert_eq!(round_to_e4m3(1.0), 1.0);
        assert_eq!(round_to_e4m3(1.0625), 1.0); // tie between 1.0 and 1.125 → even
        assert_eq!(round_to_e4m3(1.1875), 1.25); // tie between 1.125 and 1.25 → even
        assert_eq!(round_to_e4m3(1000.0), 448.0); // saturates
        assert_eq!(round_to_e4m3(-1000.0), -448.0);
        assert_eq!(round_to_e4m3(2f32.powi(-9)), 2f32.powi(-9)); // smallest subnormal
        assert_eq!(round_to_e4m3(2f32.powi(-11)), 0.0);
        assert!(round_to_e4m3(f32::NAN).is_nan());
    }

    #[test]
    fn int8_blocks_round_half_away_from_zero() {
        // Block 0 has amax 254 → scale exactly 2 (the 1e-7 is below half an ulp of 2), so ±5
        // and 0.8 land on the ties ±2.5 and on 0.4.
        let x = Tensor::new(&[254f32, 5.0, -5.0, 0.8, 10.0, -5.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 3, 2))
            .unwrap();
        let q = quantize_int8_blocks(&x, 2).unwrap();
        let values = q.values.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&values[..4], &[127.0, 3.0, -3.0, 0.0]);
        // −5 / (10/127 + 1e-7) = −63.49992 → −63.
        assert_eq!(&values[4..], &[127.0, -63.0]);
        assert_eq!(q.scales.len(), 2);
        assert!((q.scale(0, 1) - (10.0 / 127.0 + 1e-7)).abs() < 1e-9);
    }

    #[test]
    fn fp8_channels_scale_to_2_25() {
        let v = Tensor::new(&[4.5f32, 0.0, -9.0, 0.0], &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 2, 2))
            .unwrap();
        let q = quantize_fp8_channels(&v).unwrap();
        assert_eq!(
            q.values.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![1.125, 0.0, -2.25, 0.0]
        );
        assert_eq!(
            q.scales.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            vec![4.0, 0.0]
        );
    }
}
