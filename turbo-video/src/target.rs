//! The output file of a generation, checked before any work: a path a program can only write
//! after minutes of sampling must not turn out to be unusable then.

use std::path::{Path, PathBuf};

use turbo_core::{Error, Result};

use crate::mp4::track_timescale;
use crate::output::{resolve_link, Existing};
use crate::video::check_frame_len;
use crate::{Fps, Mp4Options, Mp4Stream, Video};

/// The container a video is written in, chosen by the file's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    /// `.mp4`: H.264.
    Mp4,
    /// `.gif`: an animated preview.
    Gif,
}

impl OutputFormat {
    /// The format of `path`'s extension (case-insensitive), an error for any other.
    pub fn from_path(path: &Path) -> Result<Self> {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase);
        match extension.as_deref() {
            Some("mp4") => Ok(Self::Mp4),
            Some("gif") => Ok(Self::Gif),
            _ => Err(Error::Media {
                what: path.display().to_string(),
                reason: "unsupported output format: the name must end in .mp4 or .gif".into(),
            }),
        }
    }
}

/// Where a finished video goes, checked when made: a known format, a folder that exists and
/// takes new files, not a folder itself, and no file in the way unless replacing was asked
/// for (a read-only file is never replaced). The write renames the complete file into place
/// and, when not replacing, fails rather than replace a file that appeared meanwhile.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputFile {
    path: PathBuf,
    format: OutputFormat,
    existing: Existing,
}

impl OutputFile {
    /// Checks `path` as the output of a run; `existing` says whether a file there may be
    /// replaced.
    pub fn new(path: impl Into<PathBuf>, existing: Existing) -> Result<Self> {
        let path = path.into();
        let format = OutputFormat::from_path(&path)?;
        let resolved = resolve_link(&path)?;
        check_folder(&resolved)?;
        check_existing(&resolved, existing)?;
        Ok(Self {
            path,
            format,
            existing,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn format(&self) -> OutputFormat {
        self.format
    }

    /// Checks that a video at `fps` can be stored in this format (an MP4 time base holds
    /// 0.001 to about 4.3 million frames per second).
    pub fn check_fps(&self, fps: Fps) -> Result<()> {
        match self.format {
            OutputFormat::Mp4 => track_timescale(fps).map(drop),
            OutputFormat::Gif => Ok(()),
        }
    }

    /// Writes `video` in the file's format (MP4 with `options`); returns the path written
    /// (another one under [`Existing::NextFree`]).
    pub fn write(&self, video: &Video, options: Mp4Options) -> Result<PathBuf> {
        match self.format {
            OutputFormat::Mp4 => video.write_mp4_with(&self.path, options, self.existing),
            OutputFormat::Gif => video.write_gif_with(&self.path, self.existing),
        }
    }

    /// Starts writing a video of `width × height` frames at `fps` that arrive a few at a time
    /// (see [`VideoStream`]).
    pub fn stream(
        &self,
        width: usize,
        height: usize,
        fps: Fps,
        options: Mp4Options,
    ) -> Result<VideoStream> {
        let kind = match self.format {
            OutputFormat::Mp4 => StreamKind::Mp4(Box::new(Mp4Stream::create_with(
                &self.path,
                width,
                height,
                fps,
                options,
                self.existing,
            )?)),
            OutputFormat::Gif => StreamKind::Gif(Vec::new()),
        };
        Ok(VideoStream {
            output: self.clone(),
            width,
            height,
            fps,
            kind,
        })
    }
}

/// A video written to an [`OutputFile`] as its frames are made: an MP4 encodes them while the
/// caller makes the next ones ([`Mp4Stream`]); a GIF, whose palettes are chosen over the whole
/// clip, is written when finished. Nothing is at the path until [`finish`](Self::finish)
/// succeeds, and dropping the stream leaves nothing behind.
#[derive(Debug)]
pub struct VideoStream {
    output: OutputFile,
    width: usize,
    height: usize,
    fps: Fps,
    kind: StreamKind,
}

#[derive(Debug)]
enum StreamKind {
    // Boxed: the encoder state is kilobytes, the GIF variant a vector.
    Mp4(Box<Mp4Stream>),
    Gif(Vec<Vec<u8>>),
}

impl VideoStream {
    /// Adds one frame of `width · height · 3` RGB bytes.
    pub fn push_frame(&mut self, rgb: Vec<u8>) -> Result<()> {
        match &mut self.kind {
            StreamKind::Mp4(stream) => stream.push_frame(rgb),
            StreamKind::Gif(frames) => {
                check_frame_len(&rgb, self.width, self.height, frames.len())?;
                frames.push(rgb);
                Ok(())
            }
        }
    }

    /// Writes what is left and moves the file into place; returns its path.
    pub fn finish(self) -> Result<PathBuf> {
        match self.kind {
            StreamKind::Mp4(stream) => stream.finish(),
            StreamKind::Gif(frames) => {
                let video = Video::new(self.width, self.height, self.fps, frames)?;
                video.write_gif_with(&self.output.path, self.output.existing)
            }
        }
    }
}

/// The folder of `path` exists, is a folder and takes a new file (a probe file is created in
/// it and removed at once).
fn check_folder(path: &Path) -> Result<()> {
    let folder = match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent,
        _ => Path::new("."),
    };
    let io_error = |source| Error::Io {
        path: path.to_owned(),
        source,
    };
    if !folder.is_dir() {
        return Err(io_error(std::io::Error::new(
            std::io::ErrorKind::NotFound,
            format!("the folder {} does not exist", folder.display()),
        )));
    }
    tempfile::Builder::new()
        .prefix(".turbo-output-probe")
        .tempfile_in(folder)
        .map(drop)
        .map_err(|source| Error::Io {
            path: folder.to_owned(),
            source: std::io::Error::new(
                source.kind(),
                format!("cannot create files in this folder: {source}"),
            ),
        })
}

/// What is at `path` now may be replaced under `existing`.
fn check_existing(path: &Path, existing: Existing) -> Result<()> {
    let Ok(metadata) = std::fs::metadata(path) else {
        return Ok(());
    };
    let refuse = |reason: &str| Error::Io {
        path: path.to_owned(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidInput, reason.to_owned()),
    };
    if metadata.is_dir() {
        return Err(refuse("is a folder: give a file name for the output"));
    }
    match existing {
        Existing::Refuse => Err(Error::OutputExists {
            path: path.to_owned(),
        }),
        Existing::Replace if metadata.permissions().readonly() => {
            Err(refuse("is read-only: it is not replaced"))
        }
        Existing::Replace | Existing::NextFree => Ok(()),
    }
}
