//! [`Video`]: the u8 RGB frames of a generated clip, and the conversion from the VAE's output.

use candle_core::{DType, Tensor};
use turbo_core::{Error, Result};

/// Frames per second of a video: a finite, positive number.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct Fps(f64);

impl Fps {
    /// TurboDiffusion's frame rate: 16 fps (81 frames make five seconds).
    pub const DEFAULT: Self = Self(16.0);

    /// A frame rate; errors unless `fps` is finite and positive.
    pub fn new(fps: f64) -> Result<Self> {
        if fps.is_finite() && fps > 0.0 {
            Ok(Self(fps))
        } else {
            Err(Error::Media {
                what: "frame rate".into(),
                reason: format!("{fps} fps: it must be a finite positive number"),
            })
        }
    }

    /// The rate in frames per second.
    pub fn get(self) -> f64 {
        self.0
    }
}

impl Default for Fps {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// A video: frames of interleaved 8-bit RGB (row-major, `width · height · 3` bytes each), all of
/// one size, played at `fps`. It always holds at least one frame.
#[derive(Debug, Clone, PartialEq)]
pub struct Video {
    width: usize,
    height: usize,
    fps: Fps,
    frames: Vec<Vec<u8>>,
}

impl Video {
    /// A video from RGB frames; errors if there is no frame, a side is zero, or a frame's length
    /// is not `width · height · 3`.
    pub fn new(width: usize, height: usize, fps: Fps, frames: Vec<Vec<u8>>) -> Result<Self> {
        if width == 0 || height == 0 {
            return Err(Error::Media {
                what: "video".into(),
                reason: format!("frame size {width}x{height}: both sides must be positive"),
            });
        }
        if frames.is_empty() {
            return Err(Error::Media {
                what: "video".into(),
                reason: "a video needs at least one frame".into(),
            });
        }
        for (index, frame) in frames.iter().enumerate() {
            check_frame_len(frame, width, height, index)?;
        }
        Ok(Self {
            width,
            height,
            fps,
            frames,
        })
    }

    /// A video from a decoded tensor `[3, T, H, W]` with values in [−1, 1], converted as
    /// TurboDiffusion does (see [`rgb_frames`]).
    pub fn from_tensor(video: &Tensor, fps: Fps) -> Result<Self> {
        let (_, height, width) = decoded_dims(video)?;
        Self::new(width, height, fps, rgb_frames(video)?)
    }

    /// Frame width in pixels.
    pub fn width(&self) -> usize {
        self.width
    }

    /// Frame height in pixels.
    pub fn height(&self) -> usize {
        self.height
    }

    /// The frame rate.
    pub fn fps(&self) -> Fps {
        self.fps
    }

    /// The same frames played at another rate.
    pub fn with_fps(self, fps: Fps) -> Self {
        Self { fps, ..self }
    }

    /// Number of frames (at least one).
    pub fn len(&self) -> usize {
        self.frames.len()
    }

    /// Always false: a video holds at least one frame.
    pub fn is_empty(&self) -> bool {
        self.frames.is_empty()
    }

    /// The frames in order, each `width · height · 3` RGB bytes.
    pub fn frames(&self) -> &[Vec<u8>] {
        &self.frames
    }

    /// Playing time in seconds.
    pub fn duration_secs(&self) -> f64 {
        self.frames.len() as f64 / self.fps.get()
    }
}

/// Checks that `frame` holds exactly one `width × height` RGB frame.
pub(crate) fn check_frame_len(
    frame: &[u8],
    width: usize,
    height: usize,
    index: usize,
) -> Result<()> {
    let expected = width * height * 3;
    if frame.len() == expected {
        Ok(())
    } else {
        Err(Error::Media {
            what: format!("frame {index}"),
            reason: format!(
                "{} bytes, expected {width}x{height}x3 = {expected} bytes of RGB",
                frame.len()
            ),
        })
    }
}

/// One decoded value in [−1, 1] to a byte: `floor(255 · (clamp(x) + 1) / 2 + 0.5)`.
/// The frames of a decoded tensor `[3, T, H, W]` with values in [−1, 1] as interleaved RGB
/// bytes, converted as TurboDiffusion does: clamp to [−1, 1], map to [0, 1], then
/// `floor(255 · v + 0.5)`; NaN becomes 0. Any float dtype and device is accepted.
///
/// The conversion runs where the tensor lies, with the roundings of [`unit_to_u8`] (its
/// reference), so a decoded chunk crosses to the host as bytes rather than as floats.
pub fn rgb_frames(video: &Tensor) -> Result<Vec<Vec<u8>>> {
    let (_, height, width) = decoded_dims(video)?;
    let x = video.to_dtype(DType::F32)?;
    let unit = x.clamp(-1f32, 1f32)?.affine(1.0, 1.0)?.affine(0.5, 0.0)?;
    // `255·v + 0.5` as two roundings, as on the host: one affine could fuse them into one.
    let levels = unit.affine(255.0, 0.0)?.affine(1.0, 0.5)?.floor()?;
    let levels = x.ne(&x)?.where_cond(&levels.zeros_like()?, &levels)?;
    let bytes = levels
        .to_dtype(DType::U8)?
        .permute((1, 2, 3, 0))?
        .flatten_all()?
        .to_vec1::<u8>()?;
    Ok(bytes
        .chunks_exact(height * width * 3)
        .map(<[u8]>::to_vec)
        .collect())
}

/// `(T, H, W)` of a decoded video tensor `[3, T, H, W]` of a float dtype.
fn decoded_dims(video: &Tensor) -> Result<(usize, usize, usize)> {
    let dims = match video.dims() {
        &[3, t, h, w] if t > 0 && h > 0 && w > 0 => (t, h, w),
        dims => {
            return Err(Error::Shape {
                what: "decoded video tensor".into(),
                expected: "[3, T, H, W] with T, H, W > 0".into(),
                got: dims.to_vec(),
            })
        }
    };
    if !video.dtype().is_float() {
        return Err(Error::UnsupportedDType {
            what: "decoded video tensor".into(),
            dtype: video.dtype(),
            expected: "a float dtype",
        });
    }
    Ok(dims)
}

/// One value of [`rgb_frames`], on the host: the reference it is tested against.
#[cfg(test)]
fn unit_to_u8(x: f32) -> u8 {
    let v = (x.clamp(-1.0, 1.0) + 1.0) / 2.0;
    // `as` saturates and sends NaN to 0.
    (255.0 * v + 0.5).floor() as u8
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn tensor_values_map_like_upstream() {
        let values = [-2.0f32, -1.0, -0.5, 0.0, 0.5, 1.0, 3.0, f32::NAN];
        let bytes: Vec<u8> = values.iter().copied().map(unit_to_u8).collect();
        // 255·0.25 + 0.5 = 64.25 → 64; 255·0.5 + 0.5 = 128 → 128; 255·0.75 + 0.5 = 191.75 → 191.
        assert_eq!(bytes, [0, 0, 64, 128, 191, 255, 255, 0]);
    }

    #[test]
    fn tensor_conversion_rounds_like_the_host_reference() -> Result<()> {
        // A dense sweep across [−1.01, 1.01], every rounding boundary of the 256 levels and
        // the floats on either side of it, and the values that are not numbers.
        let mut values: Vec<f32> = (0..=202_000).map(|i| i as f32 * 1e-5 - 1.01).collect();
        for level in 0..=256 {
            let boundary = (level as f32 - 0.5) / 255.0 * 2.0 - 1.0;
            let bits = boundary.to_bits();
            let neighbours = [bits.wrapping_sub(1), bits.wrapping_add(1)].map(f32::from_bits);
            values.extend([neighbours[0], boundary, neighbours[1]]);
        }
        values.extend([f32::NAN, f32::INFINITY, f32::NEG_INFINITY, -0.0]);
        let count = values.len();
        let tensor = Tensor::from_vec(values.clone(), (1, count), &Device::Cpu)?
            .broadcast_as((3, 1, 1, count))?;
        let frames = rgb_frames(&tensor)?;
        let expected: Vec<u8> = values.iter().flat_map(|&v| [unit_to_u8(v); 3]).collect();
        assert_eq!(frames, [expected]);
        Ok(())
    }

    #[test]
    fn from_tensor_interleaves_channels_per_frame() -> Result<()> {
        // [3, T=2, H=1, W=2]; channel c of frame t at column x holds a distinct value.
        let data: Vec<f32> = (0..12).map(|i| i as f32 / 6.0 - 1.0).collect();
        let tensor = Tensor::from_vec(data.clone(), (3, 2, 1, 2), &Device::Cpu)?;
        let video = Video::from_tensor(&tensor, Fps::DEFAULT)?;
        assert_eq!((video.width(), video.height(), video.len()), (2, 1, 2));
        for t in 0..2 {
            for x in 0..2 {
                for c in 0..3 {
                    let expected = unit_to_u8(data[c * 4 + t * 2 + x]);
                    assert_eq!(video.frames()[t][x * 3 + c], expected);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn bad_tensors_and_frames_are_rejected() -> Result<()> {
        let device = Device::Cpu;
        let four_channels = Tensor::zeros((4, 1, 2, 2), DType::F32, &device)?;
        assert!(matches!(
            Video::from_tensor(&four_channels, Fps::DEFAULT),
            Err(Error::Shape { .. })
        ));
        let ints = Tensor::zeros((3, 1, 2, 2), DType::U8, &device)?;
        assert!(matches!(
            Video::from_tensor(&ints, Fps::DEFAULT),
            Err(Error::UnsupportedDType { .. })
        ));
        assert!(Video::new(2, 2, Fps::DEFAULT, vec![]).is_err());
        assert!(Video::new(2, 2, Fps::DEFAULT, vec![vec![0; 11]]).is_err());
        assert!(Fps::new(0.0).is_err() && Fps::new(f64::NAN).is_err() && Fps::new(-1.0).is_err());
        Ok(())
    }
}
