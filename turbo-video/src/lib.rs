//! Video frames, MP4 / PNG / GIF output, and image input with adaptive resolution.
//!
//! - [`Video`]: u8 RGB frames and a frame rate, built from the VAE's `[3, T, H, W]` output with
//!   [`Video::from_tensor`];
//! - [`Video::write_mp4`] and the streaming [`Mp4Writer`]: H.264 in MP4, encoded by OpenH264
//!   (built from source, no FFmpeg needed) and muxed in pure Rust; [`Video::read_mp4`] reads
//!   such files back;
//! - [`Video::write_png_frames`] and [`Video::write_gif`]: numbered PNG frames and an animated
//!   GIF preview;
//! - [`InputImage`]: a PNG / JPEG / WebP image for image-to-video, resized to the size of
//!   [`adaptive_frame_size`] or of the resolution table, as a tensor in [−1, 1].
//!
//! Every file is written to a temporary file beside its target and renamed into place once
//! complete: an error never leaves a partial file behind. [`OutputFile`] checks a program's
//! output path (format, folder, a file in the way) before any work is done.

mod h264;
mod image_input;
mod mp4;
mod mp4_boxes;
mod output;
mod preview;
mod target;
mod video;

pub use crate::h264::Quality;
pub use crate::image_input::{adaptive_frame_size, ImageFit, InputImage, MAX_ADAPTIVE_ASPECT};
pub use crate::mp4::{Mp4Options, Mp4Stream, Mp4Writer};
pub use crate::output::Existing;
pub use crate::target::{OutputFile, OutputFormat, VideoStream};
pub use crate::video::{rgb_frames, Fps, Video};
