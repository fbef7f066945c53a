//! Quick-look outputs: numbered PNG frames and an animated GIF.

use std::path::{Path, PathBuf};

use image::codecs::png::PngEncoder;
use image::{ExtendedColorType, ImageEncoder, ImageError};
use turbo_core::{Error, Result};

use crate::output::{write_atomically, write_atomically_with, Existing};
use crate::video::Video;

/// NeuQuant sampling of the GIF palette search, from 1 (best, slowest) to 30 (fastest); 10 is the
/// `gif` crate's suggested balance. At 30 the palette visibly bands while the encoding is barely
/// faster: mapping every pixel to the palette costs more than the search.
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
    /// 256-colour palette (quantised on all cores), and the frame delay is rounded to the GIF's
    /// unit of 10 ms.
    pub fn write_gif(&self, path: impl AsRef<Path>) -> Result<()> {
        self.write_gif_with(path, Existing::Replace).map(drop)
    }

    /// [`Video::write_gif`], with `existing` saying what becomes of a file already at `path`;
    /// returns the path written.
    pub fn write_gif_with(&self, path: impl AsRef<Path>, existing: Existing) -> Result<PathBuf> {
        let path = path.as_ref();
        let (width, height) = match (u16::try_from(self.width()), u16::try_from(self.height())) {
            (Ok(w), Ok(h)) => (w, h),
            _ => {
                return Err(Error::Media {
                    what: path.display().to_string(),
                    reason: format!(
                        "frame size {}x{}: a GIF side is at most 65535",
                        self.width(),
                        self.height()
                    ),
                })
            }
        };
        let delay_centiseconds = (100.0 / self.fps().get()).round().clamp(1.0, 65535.0) as u16;
        let frames = gif_frames(self.frames(), width, height, delay_centiseconds);
        let gif_error = |e: gif::EncodingError| Error::Media {
            what: path.display().to_string(),
            reason: format!("cannot encode GIF: {e}"),
        };
        write_atomically_with(path, existing, |out| {
            let mut encoder = gif::Encoder::new(out, width, height, &[]).map_err(gif_error)?;
            encoder
                .set_repeat(gif::Repeat::Infinite)
                .map_err(gif_error)?;
            for frame in &frames {
                encoder
                    .write_lzw_pre_encoded_frame(frame)
                    .map_err(gif_error)?;
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

/// Palettised, LZW-compressed GIF frames, built on all cores (the palette search dominates the
/// cost of a GIF).
fn gif_frames(
    frames: &[Vec<u8>],
    width: u16,
    height: u16,
    delay_centiseconds: u16,
) -> Vec<gif::Frame<'static>> {
    let encode = |rgb: &Vec<u8>| {
        let mut frame = gif::Frame::from_rgb_speed(width, height, rgb, GIF_PALETTE_SPEED);
        frame.delay = delay_centiseconds;
        frame.make_lzw_pre_encoded();
        frame
    };
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let chunk_len = frames.len().div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        let workers: Vec<_> = frames
            .chunks(chunk_len)
            .map(|chunk| scope.spawn(move || chunk.iter().map(encode).collect::<Vec<_>>()))
            .collect();
        workers
            .into_iter()
            .flat_map(|worker| {
                worker
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
            .collect()
    })
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
