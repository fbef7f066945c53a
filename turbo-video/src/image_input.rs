//! Image input for image-to-video: loading, the adaptive resolution rule, resizing, and the
//! conversion to a tensor in [−1, 1] (`spec/turbodiffusion.md` §7.2 and §8.2).

use std::path::Path;

use candle_core::{Device, Tensor};
use image::imageops::{self, FilterType};
use image::{ImageReader, RgbImage};
use turbo_core::{AspectRatio, Error, FrameSize, Resolution, Result, PATCH_SIZE, VAE_STRIDE};

/// Pixel stride of a frame side: VAE stride × patch size (16).
const SIZE_STRIDE: usize = VAE_STRIDE.1 * PATCH_SIZE.1;

/// How an image is brought to a frame size of another aspect ratio.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ImageFit {
    /// Resize to the frame size, distorting the aspect ratio: what TurboDiffusion does.
    #[default]
    Stretch,
    /// Cut the largest centred region of the frame's aspect ratio, then resize it.
    CenterCrop,
}

/// An RGB image that conditions image-to-video generation.
#[derive(Debug, Clone, PartialEq)]
pub struct InputImage {
    image: RgbImage,
}

impl InputImage {
    /// Loads a PNG, JPEG or WebP file (the format is read from the content), converted to RGB.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let decode_error = |reason: String| Error::Media {
            what: path.display().to_string(),
            reason,
        };
        let image = ImageReader::open(path)
            .map_err(|source| Error::Io {
                path: path.to_owned(),
                source,
            })?
            .with_guessed_format()
            .map_err(|source| Error::Io {
                path: path.to_owned(),
                source,
            })?
            .decode()
            .map_err(|e| decode_error(format!("cannot decode image (PNG, JPEG or WebP): {e}")))?;
        Ok(Self {
            image: image.into_rgb8(),
        })
    }

    /// Decodes a PNG, JPEG or WebP image held in memory (an upload), the format read from the
    /// content, refusing one whose width or height exceeds `max_side` pixels before its pixels
    /// are decoded (so a small file that claims a huge image allocates nothing).
    pub fn decode(bytes: &[u8], max_side: u32) -> Result<Self> {
        let decode_error = |reason: String| Error::Media {
            what: "the image".into(),
            reason,
        };
        let mut reader = ImageReader::new(std::io::Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| decode_error(e.to_string()))?;
        let mut limits = image::Limits::default();
        limits.max_image_width = Some(max_side);
        limits.max_image_height = Some(max_side);
        reader.limits(limits);
        let image = reader
            .decode()
            .map_err(|e| decode_error(format!("cannot decode image (PNG, JPEG or WebP): {e}")))?;
        Ok(Self {
            image: image.into_rgb8(),
        })
    }

    /// An image from interleaved RGB bytes, row-major.
    pub fn from_rgb(width: u32, height: u32, rgb: Vec<u8>) -> Result<Self> {
        let len = rgb.len();
        let image = RgbImage::from_raw(width, height, rgb)
            .filter(|_| width > 0 && height > 0)
            .ok_or_else(|| Error::Media {
                what: "input image".into(),
                reason: format!(
                    "{len} bytes do not make a {width}x{height} RGB image (positive sides, \
                     width · height · 3 bytes)"
                ),
            })?;
        Ok(Self { image })
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.image.width()
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.image.height()
    }

    /// The interleaved RGB bytes, row-major.
    pub fn rgb(&self) -> &[u8] {
        self.image.as_raw()
    }

    /// The frame size for this image: [`adaptive_frame_size`] when `adaptive`, else the table's
    /// entry for `resolution` and `aspect`.
    pub fn frame_size(
        &self,
        resolution: Resolution,
        aspect: AspectRatio,
        adaptive: bool,
    ) -> Result<FrameSize> {
        if adaptive {
            adaptive_frame_size(resolution, aspect, self.width(), self.height())
        } else {
            Ok(resolution.frame_size(aspect))
        }
    }

    /// The image resized to `size` with a bilinear filter that antialiases when shrinking (as
    /// torchvision's `Resize(antialias=True)`), after a centre crop for [`ImageFit::CenterCrop`].
    pub fn resize(&self, size: FrameSize, fit: ImageFit) -> Result<Self> {
        let (width, height) = side_u32(size)?;
        let resized = match fit {
            ImageFit::Stretch => imageops::resize(&self.image, width, height, FilterType::Triangle),
            ImageFit::CenterCrop => {
                let (x, y, crop_w, crop_h) =
                    centre_crop(self.width(), self.height(), width, height);
                let cropped = imageops::crop_imm(&self.image, x, y, crop_w, crop_h).to_image();
                imageops::resize(&cropped, width, height, FilterType::Triangle)
            }
        };
        Ok(Self { image: resized })
    }

    /// The image as a `[3, H, W]` f32 tensor in [−1, 1]: `(v / 255 − 0.5) / 0.5`.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor> {
        let (width, height) = (self.width() as usize, self.height() as usize);
        let values: Vec<f32> = self
            .rgb()
            .iter()
            .map(|&v| (f32::from(v) / 255.0 - 0.5) / 0.5)
            .collect();
        let hwc = Tensor::from_vec(values, (height, width, 3), device)?;
        Ok(hwc.permute((2, 0, 1))?.contiguous()?)
    }

    /// The image at the frame size of the pipeline, as a `[3, H, W]` tensor in [−1, 1]:
    /// [`frame_size`](Self::frame_size), [`resize`](Self::resize), [`to_tensor`](Self::to_tensor).
    pub fn conditioning_tensor(
        &self,
        resolution: Resolution,
        aspect: AspectRatio,
        adaptive: bool,
        fit: ImageFit,
        device: &Device,
    ) -> Result<Tensor> {
        let size = self.frame_size(resolution, aspect, adaptive)?;
        self.resize(size, fit)?.to_tensor(device)
    }
}

/// TurboDiffusion's adaptive resolution (`--adaptive_resolution`): a frame with about the area of
/// the table's `resolution × aspect` entry and the aspect ratio of the image.
///
/// With `A = W·H` from the table and `r = image_height / image_width`, the ideal sides are
/// `w* = √(A / r)` and `h* = √(A · r)`; each is rounded to a multiple of 16 with round-half-even
/// (Python's `round`), in the same float64 operations as upstream.
pub fn adaptive_frame_size(
    resolution: Resolution,
    aspect: AspectRatio,
    image_width: u32,
    image_height: u32,
) -> Result<FrameSize> {
    if image_width == 0 || image_height == 0 {
        return Err(Error::Media {
            what: "input image".into(),
            reason: format!("size {image_width}x{image_height}: both sides must be positive"),
        });
    }
    check_adaptive_aspect(image_width, image_height)?;
    let table = resolution.frame_size(aspect);
    let area = (table.width() * table.height()) as f64;
    let image_aspect = f64::from(image_height) / f64::from(image_width);
    let ideal_width = (area / image_aspect).sqrt();
    let ideal_height = (area * image_aspect).sqrt();
    let stride = SIZE_STRIDE as f64;
    let snap = |ideal: f64| (ideal / stride).round_ties_even() as usize * SIZE_STRIDE;
    FrameSize::new(snap(ideal_width), snap(ideal_height))
}

/// The most elongated image (long side over short side) adaptive resolution sizes a video
/// for: past it the frame degenerates (a 1×4000 image would ask for 16×60720).
pub const MAX_ADAPTIVE_ASPECT: u32 = 4;

fn check_adaptive_aspect(width: u32, height: u32) -> Result<()> {
    let (long, short) = (width.max(height), width.min(height));
    if u64::from(long) <= u64::from(short) * u64::from(MAX_ADAPTIVE_ASPECT) {
        return Ok(());
    }
    Err(Error::OutOfRange {
        what: "input image aspect ratio".into(),
        value: format!("{width}x{height}"),
        expected: format!(
            "at most {MAX_ADAPTIVE_ASPECT}:1 either way for adaptive resolution; crop the image \
             or use the resolution table"
        ),
    })
}

/// The centred region `(x, y, width, height)` of a `width × height` image with the aspect ratio
/// of `target_w × target_h`.
fn centre_crop(width: u32, height: u32, target_w: u32, target_h: u32) -> (u32, u32, u32, u32) {
    let (w, h) = (u64::from(width), u64::from(height));
    let (tw, th) = (u64::from(target_w), u64::from(target_h));
    // Rounded integer division keeps the crop exact for whole-ratio cases.
    let (crop_w, crop_h) = if w * th > tw * h {
        (((h * tw + th / 2) / th).clamp(1, w), h)
    } else {
        (w, ((w * th + tw / 2) / tw).clamp(1, h))
    };
    (
        ((w - crop_w) / 2) as u32,
        ((h - crop_h) / 2) as u32,
        crop_w as u32,
        crop_h as u32,
    )
}

fn side_u32(size: FrameSize) -> Result<(u32, u32)> {
    match (u32::try_from(size.width()), u32::try_from(size.height())) {
        (Ok(w), Ok(h)) => Ok((w, h)),
        _ => Err(Error::Media {
            what: "frame size".into(),
            reason: format!("{size} is too large for an image"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn png_bytes(width: u32, height: u32) -> Vec<u8> {
        let image = RgbImage::from_fn(width, height, |x, y| image::Rgb([x as u8, y as u8, 7]));
        let mut bytes = Vec::new();
        image
            .write_to(
                &mut std::io::Cursor::new(&mut bytes),
                image::ImageFormat::Png,
            )
            .unwrap();
        bytes
    }

    #[test]
    fn decode_reads_an_image_from_memory() {
        let image = InputImage::decode(&png_bytes(5, 3), 16).unwrap();
        assert_eq!((image.width(), image.height()), (5, 3));
        assert_eq!(&image.rgb()[..3], &[0, 0, 7]);
    }

    #[test]
    fn decode_refuses_an_oversized_image_and_garbage() {
        let too_wide = InputImage::decode(&png_bytes(20, 3), 16).unwrap_err();
        assert!(matches!(too_wide, Error::Media { .. }), "{too_wide}");
        let garbage = InputImage::decode(b"not an image at all", 16).unwrap_err();
        assert!(garbage.to_string().contains("cannot decode"), "{garbage}");
    }

    proptest! {
        /// The crop lies inside the image, is centred, spans one full side, and has the target's
        /// aspect ratio up to the rounding of one pixel.
        #[test]
        fn centre_crop_is_centred_with_the_target_aspect(
            width in 1u32..3000,
            height in 1u32..3000,
            target_w in 1u32..2000,
            target_h in 1u32..2000,
        ) {
            let (x, y, w, h) = centre_crop(width, height, target_w, target_h);
            prop_assert!(w >= 1 && h >= 1 && x + w <= width && y + h <= height);
            prop_assert!(w == width || h == height);
            prop_assert!((width - w) / 2 == x && (height - h) / 2 == y);
            // |w/h − tw/th| within half a pixel on the cut side (or the side was clamped).
            let error = (f64::from(w) * f64::from(target_h) - f64::from(h) * f64::from(target_w)).abs();
            let tolerance = 0.5 * f64::from(target_h.max(target_w));
            prop_assert!(error <= tolerance || w == 1 || h == 1, "{w}x{h} for {target_w}x{target_h}");
        }
    }
}
