//! The parameter-free reshapes of the Wan2.2 VAE (`spec/wan-model.md` §6.2), on time-major
//! activations `[B, T, C, H, W]`: the 2×2 pixel (un)shuffle around the whole model, and the
//! shortcuts `AvgDown3D` / `DupUp3D` of its down and up blocks.

use candle_core::Tensor;
use turbo_core::{Error, Result};

/// Side of the pixel patch folded into channels before the encoder (and unfolded after the
/// decoder).
pub const PATCH: usize = 2;

/// `b t c (h q) (w r) → b t (c r q) h w`: channel `c·4 + r·2 + q`, the width offset `r` more
/// significant than the height offset `q`, as upstream's `rearrange` writes it.
pub fn patchify(x: &Tensor) -> Result<Tensor> {
    let (b, t, c, height, width) = x.dims5()?;
    let (h, w) = (height / PATCH, width / PATCH);
    Ok(x.reshape(&[b, t, c, h, PATCH, w, PATCH][..])?
        .permute(&[0, 1, 2, 6, 4, 3, 5][..])?
        .reshape((b, t, c * PATCH * PATCH, h, w))?)
}

/// The inverse of [`patchify`]: `b t (c r q) h w → b t c (h q) (w r)`.
pub fn unpatchify(x: &Tensor) -> Result<Tensor> {
    let (b, t, channels, h, w) = x.dims5()?;
    let c = channels / (PATCH * PATCH);
    Ok(x.reshape(&[b, t, c, PATCH, PATCH, h, w][..])?
        .permute(&[0, 1, 2, 5, 4, 6, 3][..])?
        .reshape((b, t, c, h * PATCH, w * PATCH))?)
}

/// Time and space factors of a shortcut: `(f_t, f_s)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Factors {
    pub time: usize,
    pub space: usize,
}

impl Factors {
    fn volume(self) -> usize {
        self.time * self.space * self.space
    }
}

/// `AvgDown3D`: `x` `[B, T, C_in, H, W]` front-padded with zero frames to a multiple of
/// `f_t`, each `f_t × f_s × f_s` block folded into channels (`c·(f_t f_s²) + (i_t·f_s + i_h)·f_s
/// + i_w`), and consecutive channels averaged into `out_channels` groups:
/// `[B, T/f_t, C_out, H/f_s, W/f_s]`.
pub fn avg_down(x: &Tensor, out_channels: usize, factors: Factors) -> Result<Tensor> {
    let (b, t, c, height, width) = x.dims5()?;
    let (ft, fs) = (factors.time, factors.space);
    let folded = c * factors.volume();
    if folded % out_channels != 0 {
        return Err(shortcut_error("AvgDown3D", c, out_channels, factors));
    }
    let pad = (ft - t % ft) % ft;
    let x = x.pad_with_zeros(1, pad, 0)?;
    let (t, h, w) = ((t + pad) / ft, height / fs, width / fs);
    let group = folded / out_channels;
    Ok(x.reshape(&[b, t, ft, c, h, fs, w, fs][..])?
        .permute(&[0, 1, 3, 2, 5, 7, 4, 6][..])?
        .reshape(&[b, t, out_channels, group, h, w][..])?
        .mean(3)?)
}

/// `DupUp3D`: each of the `C_in` channels of `x` `[B, T, C_in, H, W]` repeated
/// `C_out·f_t·f_s²/C_in` times, the result read as `(C_out, f_t, f_s, f_s)` and unfolded into
/// time and space: `[B, T·f_t, C_out, H·f_s, W·f_s]`. On the first chunk the first `f_t − 1`
/// frames are dropped, so that one latent frame gives one frame.
pub fn dup_up(
    x: &Tensor,
    out_channels: usize,
    factors: Factors,
    first_chunk: bool,
) -> Result<Tensor> {
    let (b, t, c, h, w) = x.dims5()?;
    let (ft, fs) = (factors.time, factors.space);
    let unfolded = out_channels * factors.volume();
    if unfolded % c != 0 {
        return Err(shortcut_error("DupUp3D", c, out_channels, factors));
    }
    let repeats = unfolded / c;
    let y = x
        .unsqueeze(3)?
        .broadcast_as(&[b, t, c, repeats, h, w][..])?
        .reshape(&[b, t, out_channels, ft, fs, fs, h, w][..])?
        .permute(&[0, 1, 3, 2, 6, 4, 7, 5][..])?
        .reshape((b, t * ft, out_channels, h * fs, w * fs))?;
    Ok(if first_chunk && ft > 1 {
        y.narrow(1, ft - 1, t * ft - (ft - 1))?
    } else {
        y
    })
}

fn shortcut_error(name: &str, c_in: usize, c_out: usize, factors: Factors) -> Error {
    Error::Shape {
        what: format!("Wan2.2 VAE {name} shortcut channels (in, out, f_t, f_s)"),
        expected: "in · f_t · f_s² and out dividing one another".into(),
        got: vec![c_in, c_out, factors.time, factors.space],
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    #[test]
    fn unpatchify_inverts_patchify_and_orders_width_first() {
        let x = Tensor::arange(0f32, 2.0 * 3.0 * 4.0 * 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 3, 4, 6))
            .unwrap();
        let folded = patchify(&x).unwrap();
        assert_eq!(folded.dims(), [1, 2, 12, 2, 3]);
        // Channel 1 = (c 0, r 0, q 1): the pixel one row down.
        let v = |t: &Tensor, idx: [usize; 5]| {
            t.get(idx[0])
                .unwrap()
                .get(idx[1])
                .unwrap()
                .get(idx[2])
                .unwrap()
                .get(idx[3])
                .unwrap()
                .get(idx[4])
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert_eq!(v(&folded, [0, 0, 1, 0, 0]), v(&x, [0, 0, 0, 1, 0]));
        assert_eq!(v(&folded, [0, 0, 2, 0, 0]), v(&x, [0, 0, 0, 0, 1]));
        let back = unpatchify(&folded).unwrap();
        let diff = (back - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0);
    }

    #[test]
    fn avg_down_of_dup_up_is_the_identity() {
        // DupUp repeats each value over its block; AvgDown of the same layout averages them
        // back (the first-chunk frame drop aside).
        let factors = Factors { time: 2, space: 2 };
        let x = Tensor::randn(0f32, 1.0, (1, 3, 8, 2, 3), &Device::Cpu).unwrap();
        let up = dup_up(&x, 4, factors, false).unwrap();
        assert_eq!(up.dims(), [1, 6, 4, 4, 6]);
        let down = avg_down(&up, 8, factors).unwrap();
        let diff = (down - &x).unwrap().abs().unwrap().max_all().unwrap();
        assert!(diff.to_scalar::<f32>().unwrap() < 1e-6);
        let first = dup_up(&x, 4, factors, true).unwrap();
        assert_eq!(first.dim(1).unwrap(), 5);
    }
}
