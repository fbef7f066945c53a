//! Where a run's decoded frames go: kept for a [`Video`], or written to a file while the
//! decoder makes the next ones.

use std::path::PathBuf;
use std::time::Instant;

use turbo_core::{Error, Progress, Result, Stage, StageReport};
use turbo_video::{Fps, Mp4Options, OutputFile, Video, VideoStream};

/// Takes the RGB frames of a run, a decoded chunk at a time.
pub(super) trait FrameSink {
    fn push(&mut self, frames: Vec<Vec<u8>>) -> Result<()>;
}

/// Frames kept in memory, for a [`Video`].
pub(super) struct MemoryFrames {
    width: usize,
    height: usize,
    fps: Fps,
    frames: Vec<Vec<u8>>,
}

impl MemoryFrames {
    pub(super) fn new(width: usize, height: usize, fps: Fps) -> Self {
        Self {
            width,
            height,
            fps,
            frames: Vec::new(),
        }
    }

    pub(super) fn into_video(self) -> Result<Video> {
        Video::new(self.width, self.height, self.fps, self.frames)
    }
}

impl FrameSink for MemoryFrames {
    fn push(&mut self, frames: Vec<Vec<u8>>) -> Result<()> {
        self.frames.extend(frames);
        Ok(())
    }
}

/// Frames dropped as they come: a rank other than 0 of a multi-GPU run, which takes part in
/// the decode but leaves the file to rank 0.
pub(super) struct DiscardedFrames;

impl FrameSink for DiscardedFrames {
    fn push(&mut self, _frames: Vec<Vec<u8>>) -> Result<()> {
        Ok(())
    }
}

/// Frames written to a file as they come: an MP4 encodes them on other threads while the
/// decoder makes the next ones (see [`VideoStream`]). The stream opens at the first frames, so
/// a run that fails before its decode never has a temporary file beside the output.
pub(super) struct FileFrames<'o> {
    width: usize,
    height: usize,
    fps: Fps,
    output: &'o OutputFile,
    options: Mp4Options,
    /// The open stream and when its first frame came.
    stream: Option<(VideoStream, Instant)>,
}

impl<'o> FileFrames<'o> {
    pub(super) fn new(
        width: usize,
        height: usize,
        fps: Fps,
        output: &'o OutputFile,
        options: Mp4Options,
    ) -> Self {
        Self {
            width,
            height,
            fps,
            output,
            options,
            stream: None,
        }
    }

    /// Finishes the file and reports [`Stage::WritingVideo`], timed from the first frame
    /// (while later ones were still decoding) to the file in place; returns its path.
    pub(super) fn finish(self, progress: &mut dyn Progress) -> Result<PathBuf> {
        let Some((stream, started)) = self.stream else {
            return Err(Error::Media {
                what: self.output.path().display().to_string(),
                reason: "the run decoded no frame to write".into(),
            });
        };
        let path = stream.finish()?;
        progress.stage_done(&StageReport {
            stage: Stage::WritingVideo,
            elapsed: started.elapsed(),
            resident_bytes: 0,
            device_memory: None,
        });
        Ok(path)
    }
}

impl FrameSink for FileFrames<'_> {
    fn push(&mut self, frames: Vec<Vec<u8>>) -> Result<()> {
        let (stream, _) = match &mut self.stream {
            Some(open) => open,
            None => self.stream.insert((
                self.output
                    .stream(self.width, self.height, self.fps, self.options)?,
                Instant::now(),
            )),
        };
        frames
            .into_iter()
            .try_for_each(|frame| stream.push_frame(frame))
    }
}
