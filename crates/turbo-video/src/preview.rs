//! Quick-look outputs: numbered PNG frames and an animated GIF.

use std::path::{Path, PathBuf};

use image::codecs::gif::{GifEncoder, Repeat};
use image::codecs::png::PngEncoder;
use image::{Delay, ExtendedColorType, Frame, ImageEncoder, ImageError, RgbaImage};
use turbo_core::{Error, Result};

use crate::output::write_atomically;
use crate::video::Video;

/// NeuQuant sampling of the GIF palette search: 1 is best and slowest, 30 fastest; 10 is the
/// `gif` crate's suggested balance.
const GIF_PALETTE_SPEED: i32 = 10;
/// Digits of a PNG frame number at the least (`frame_0000.png`).
const MIN_INDEX_DIGITS: usize = 4;

impl Video {
    /// Writes every frame as `dir/{prefix}{index}.png`, the index zero-padded to at least four
    /// digits (`frame_0000.png`, `frame_0001.png`, …), creating `dir` if needed. Returns the
    /// paths in frame order. Each file is written atomically.
    pub fn write_png_frames(&self, dir: impl AsRef<Path>, prefix: &str) -> Result<Vec<PathBuf>> {
        let dir = dir.as_ref();
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_owned(),
            source,
        })?;
        let (width, height) = self.size_u32()?;
        let digits = index_digits(self.len());
        self.frames()
            .iter()
            .enumerate()
            .map(|(index, frame)| {
                let path = dir.join(format!("{prefix}{index:0digits$}.png"));
                write_atomically(&path, |out| {
                    PngEncoder::new(out)
                        .write_image(frame, width, height, ExtendedColorType::Rgb8)
                        .map_err(|e| encode_error(&path, e))
                })?;
                Ok(path)
            })
            .collect()
    }

    /// Writes an animated GIF that loops forever, for quick previews: each frame gets its own
    /// 256-colour palette, and frame delays are rounded to the GIF's 10 ms unit.
    pub fn write_gif(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let (width, height) = self.size_u32()?;
        let delay = Delay::from_saturating_duration(std::time::Duration::from_secs_f64(
            1.0 / self.fps().get(),
        ));
        write_atomically(path, |out| {
            let mut encoder = GifEncoder::new_with_speed(out, GIF_PALETTE_SPEED);
            encoder
                .set_repeat(Repeat::Infinite)
                .map_err(|e| encode_error(path, e))?;
            for rgb in self.frames() {
                let rgba: Vec<u8> = rgb
                    .chunks_exact(3)
                    .flat_map(|p| [p[0], p[1], p[2], u8::MAX])
                    .collect();
                let image = RgbaImage::from_raw(width, height, rgba)
                    .expect("a video frame holds width · height RGB pixels");
                encoder
                    .encode_frame(Frame::from_parts(image, 0, 0, delay))
                    .map_err(|e| encode_error(path, e))?;
            }
            Ok(())
        })
    }

    fn size_u32(&self) -> Result<(u32, u32)> {
        match (u32::try_from(self.width()), u32::try_from(self.height())) {
            (Ok(w), Ok(h)) => Ok((w, h)),
            _ => Err(Error::Media {
                what: "video".into(),
                reason: format!(
                    "frame size {}x{} is too large for an image file",
                    self.width(),
                    self.height()
                ),
            }),
        }
    }
}

/// Digits of the frame numbers of `count` frames: enough for the last, and at least four.
fn index_digits(count: usize) -> usize {
    count
        .saturating_sub(1)
        .to_string()
        .len()
        .max(MIN_INDEX_DIGITS)
}

fn encode_error(path: &Path, error: ImageError) -> Error {
    Error::Media {
        what: path.display().to_string(),
        reason: format!("cannot encode image: {error}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_numbers_widen_past_four_digits() {
        assert_eq!(index_digits(1), 4);
        assert_eq!(index_digits(10_000), 4);
        assert_eq!(index_digits(10_001), 5);
        assert_eq!(index_digits(100_001), 6);
    }
}
