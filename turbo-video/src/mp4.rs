//! MP4 files with H.264 video: a streaming [`Mp4Writer`], [`Video::write_mp4`] and
//! [`Video::read_mp4`]. Muxing and demuxing use the pure-Rust `mp4` crate; see `docs/video.md`.

use std::collections::VecDeque;
use std::io::{BufWriter, Cursor};
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use bytes::Bytes;
use mp4::{AvcConfig, MediaConfig, MediaType, Mp4Config, Mp4Sample, TrackConfig, TrackType};
use turbo_core::{Error, Result};

use crate::h264::{EncodedFrame, H264Decoder, H264Encoder, Quality};
use crate::output::{AtomicFile, Existing};
use crate::video::{check_frame_len, Fps, Video};

/// Ticks per frame in the track's time base: the time scale is `1000 · fps`, so rates are
/// stored to a thousandth of a frame per second (16 fps → 16 000 ticks/s, 1000 per frame).
const TICKS_PER_FRAME: u32 = 1000;
/// Time base of the movie header (milliseconds), as most muxers write it.
const MOVIE_TIMESCALE: u32 = 1000;
const VIDEO_TRACK_ID: u32 = 1;

/// Settings of the H.264 encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mp4Options {
    /// Size against quality.
    pub quality: Quality,
    /// Frames from one keyframe to the next; 0 puts a single keyframe at the start.
    pub keyframe_interval: u32,
}

impl Default for Mp4Options {
    /// [`Quality::DEFAULT`] and a keyframe every 32 frames (two seconds at 16 fps).
    fn default() -> Self {
        Self {
            quality: Quality::DEFAULT,
            keyframe_interval: 32,
        }
    }
}

impl Mp4Options {
    /// An H.264 encoder of `width × height` frames at `fps` with these settings.
    fn encoder(&self, width: usize, height: usize, fps: Fps) -> Result<H264Encoder> {
        H264Encoder::new(width, height, fps, self.quality, self.keyframe_interval)
    }
}

type Muxer = mp4::Mp4Writer<BufWriter<AtomicFile>>;

/// Writes an MP4 one RGB frame at a time, so a caller can encode frames as they are decoded.
///
/// The file appears at its path only when [`finish`](Self::finish) succeeds. Until then the data
/// lives in a hidden temporary file beside it, which is deleted if the writer is dropped (an
/// error, a panic, a cancelled job): an interrupted write never leaves a partial `.mp4`.
pub struct Mp4Writer {
    muxer: Muxer,
    encoder: H264Encoder,
    path: PathBuf,
    parameter_sets: Option<(Vec<u8>, Vec<u8>)>,
    width: usize,
    height: usize,
    timescale: u32,
    frames_written: u64,
}

impl Mp4Writer {
    /// Starts an MP4 of `width × height` frames at `fps`. Both sides must be even (H.264 4:2:0
    /// chroma); odd sizes are rejected, not padded.
    pub fn create(
        path: impl AsRef<Path>,
        width: usize,
        height: usize,
        fps: Fps,
        options: Mp4Options,
    ) -> Result<Self> {
        Self::create_with(path, width, height, fps, options, Existing::Replace)
    }

    /// [`Mp4Writer::create`], with `existing` saying what becomes of a file already at `path`
    /// (checked again when [`finish`](Self::finish) renames the file into place).
    pub fn create_with(
        path: impl AsRef<Path>,
        width: usize,
        height: usize,
        fps: Fps,
        options: Mp4Options,
        existing: Existing,
    ) -> Result<Self> {
        let path = path.as_ref();
        let timescale = track_timescale(fps)?;
        let encoder = options.encoder(width, height, fps)?;
        let file = AtomicFile::create_with(path, existing)?;
        let config = Mp4Config {
            major_brand: (*b"isom").into(),
            minor_version: 512,
            compatible_brands: [b"isom", b"iso2", b"avc1", b"mp41"]
                .map(|brand| (*brand).into())
                .to_vec(),
            timescale: MOVIE_TIMESCALE,
        };
        let muxer = mp4::Mp4Writer::write_start(BufWriter::new(file), &config)
            .map_err(|e| mux_error(path, e))?;
        Ok(Self {
            muxer,
            encoder,
            path: path.to_owned(),
            parameter_sets: None,
            width,
            height,
            timescale,
            frames_written: 0,
        })
    }

    /// Encodes and appends one frame of `width · height · 3` RGB bytes. A frame of the wrong
    /// length is rejected before anything is encoded, so the writer stays usable.
    pub fn write_frame(&mut self, rgb: &[u8]) -> Result<()> {
        let frame = self.encoder.encode(rgb)?;
        self.append(frame)
    }

    /// Appends a frame encoded with this writer's settings (by this writer's encoder or by
    /// another one started at a keyframe, see [`Video::write_mp4`]).
    fn append(&mut self, frame: EncodedFrame) -> Result<()> {
        self.check_parameter_sets(&frame)?;
        let sample = Mp4Sample {
            start_time: self.frames_written * u64::from(TICKS_PER_FRAME),
            duration: TICKS_PER_FRAME,
            rendering_offset: 0,
            is_sync: frame.is_keyframe,
            bytes: Bytes::from(frame.sample),
        };
        self.muxer
            .write_sample(VIDEO_TRACK_ID, &sample)
            .map_err(|e| mux_error(&self.path, e))?;
        self.frames_written += 1;
        Ok(())
    }

    /// Frames appended so far.
    pub fn frames_written(&self) -> u64 {
        self.frames_written
    }

    /// Writes the index, flushes the file to disk and moves it to its path; returns that path
    /// (another one under [`Existing::NextFree`]).
    pub fn finish(mut self) -> Result<PathBuf> {
        if self.frames_written == 0 {
            return Err(self.error("no frame was written; an MP4 needs at least one"));
        }
        let path = self.path;
        self.muxer.write_end().map_err(|e| mux_error(&path, e))?;
        let file = self
            .muxer
            .into_writer()
            .into_inner()
            .map_err(|e| Error::Io {
                path: path.clone(),
                source: e.into_error(),
            })?;
        tracing::debug!(
            path = %path.display(),
            frames = self.frames_written,
            "finished MP4"
        );
        file.commit()
    }

    /// The first frame brings the parameter sets, which go into the track's sample entry; the
    /// encoder repeats them at each keyframe, and an `avc1` track cannot change them.
    fn check_parameter_sets(&mut self, frame: &EncodedFrame) -> Result<()> {
        let Some((sps, pps)) = &self.parameter_sets else {
            let (Some(sps), Some(pps)) = (&frame.sps, &frame.pps) else {
                return Err(self.error("the H.264 encoder emitted no SPS/PPS with the first frame"));
            };
            self.add_track(sps, pps)?;
            self.parameter_sets = Some((sps.clone(), pps.clone()));
            return Ok(());
        };
        let sps_changed = frame.sps.as_ref().is_some_and(|new| new != sps);
        let pps_changed = frame.pps.as_ref().is_some_and(|new| new != pps);
        if sps_changed || pps_changed {
            let index = self.frames_written;
            Err(self.error(&format!(
                "the H.264 encoder changed its parameter sets at frame {index}"
            )))
        } else {
            Ok(())
        }
    }

    fn error(&self, reason: &str) -> Error {
        media_error(&self.path, reason.to_owned())
    }

    fn add_track(&mut self, sps: &[u8], pps: &[u8]) -> Result<()> {
        // `check_encodable_size` caps both sides at 3840.
        let side = |n: usize| u16::try_from(n).unwrap_or(u16::MAX);
        let track = TrackConfig {
            track_type: TrackType::Video,
            timescale: self.timescale,
            language: "und".into(),
            media_conf: MediaConfig::AvcConfig(AvcConfig {
                width: side(self.width),
                height: side(self.height),
                seq_param_set: sps.to_vec(),
                pic_param_set: pps.to_vec(),
            }),
        };
        self.muxer
            .add_track(&track)
            .map_err(|e| mux_error(&self.path, e))
    }
}

impl std::fmt::Debug for Mp4Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mp4Writer")
            .field("path", &self.path)
            .field("width", &self.width)
            .field("height", &self.height)
            .field("frames_written", &self.frames_written)
            .finish_non_exhaustive()
    }
}

/// An MP4 written from frames that arrive a few at a time, as a VAE decodes them: each keyframe
/// interval is encoded on a thread of its own, which takes each frame as it arrives, so the
/// intervals encode side by side while the caller makes the next frames and little encoding is
/// left when the last frame arrives. (Handing an interval over only once its last frame was in
/// left its 32 frames to encode one after another from then on: a 480p video was in place
/// 2.0 s after its first decoded frame, against 1.6–1.7 s taking frames as they arrive, both
/// with OpenH264 built without its assembly; `docs/performance.md` v12.)
///
/// An interval starts with a keyframe (an IDR picture, which references nothing before it), so
/// the stream is the one a single encoder writes. At most one encoding thread per core runs at
/// once. The guarantees of [`Mp4Writer`] hold: the file appears only when
/// [`finish`](Self::finish) succeeds, and dropping the stream leaves nothing behind.
pub struct Mp4Stream {
    writer: Mp4Writer,
    options: Mp4Options,
    fps: Fps,
    /// Frames per keyframe interval (all of them when the options ask for one keyframe).
    interval: usize,
    /// The interval taking frames now.
    open: Option<OpenInterval>,
    /// The intervals complete in frames, still encoding or done, oldest first.
    encoding: VecDeque<IntervalEncoder>,
    threads: usize,
    pushed: u64,
}

type IntervalEncoder = JoinHandle<Result<Vec<EncodedFrame>>>;

/// A keyframe interval whose encoding thread is still being sent frames.
struct OpenInterval {
    sender: mpsc::Sender<Vec<u8>>,
    encoder: IntervalEncoder,
}

impl Mp4Stream {
    /// Starts an MP4 of `width × height` frames at `fps` (see [`Mp4Writer::create_with`]).
    pub fn create_with(
        path: impl AsRef<Path>,
        width: usize,
        height: usize,
        fps: Fps,
        options: Mp4Options,
        existing: Existing,
    ) -> Result<Self> {
        let writer = Mp4Writer::create_with(path, width, height, fps, options, existing)?;
        let interval = match options.keyframe_interval {
            0 => usize::MAX,
            frames => frames as usize,
        };
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        Ok(Self {
            writer,
            options,
            fps,
            interval,
            open: None,
            encoding: VecDeque::new(),
            threads,
            pushed: 0,
        })
    }

    /// Adds one frame of `width · height · 3` RGB bytes. A frame of the wrong length is
    /// rejected at once, so the stream stays usable.
    pub fn push_frame(&mut self, rgb: Vec<u8>) -> Result<()> {
        let index = usize::try_from(self.pushed).unwrap_or(usize::MAX);
        check_frame_len(&rgb, self.writer.width, self.writer.height, index)?;
        let open = match self.open.take() {
            Some(open) => open,
            None => self.open_interval()?,
        };
        if open.sender.send(rgb).is_err() {
            // The thread stopped early: its result says why.
            return Err(self.joined(open.encoder).err().unwrap_or_else(|| {
                self.writer
                    .error("an H.264 encoding thread stopped before its last frame")
            }));
        }
        self.pushed += 1;
        if self.pushed % self.interval as u64 == 0 {
            // Dropping the sender ends the thread's interval.
            self.encoding.push_back(open.encoder);
        } else {
            self.open = Some(open);
        }
        Ok(())
    }

    /// Frames pushed so far.
    pub fn frames_pushed(&self) -> u64 {
        self.pushed
    }

    /// Encodes the last frames, appends every interval in order and moves the file into place;
    /// returns its path (see [`Mp4Writer::finish`]).
    pub fn finish(mut self) -> Result<PathBuf> {
        if let Some(open) = self.open.take() {
            self.encoding.push_back(open.encoder);
        }
        while !self.encoding.is_empty() {
            self.append_oldest()?;
        }
        self.writer.finish()
    }

    /// A new interval's encoding thread, first appending the oldest interval if every core is
    /// busy.
    fn open_interval(&mut self) -> Result<OpenInterval> {
        if self.encoding.len() >= self.threads {
            self.append_oldest()?;
        }
        let (width, height, fps, options) = (
            self.writer.width,
            self.writer.height,
            self.fps,
            self.options,
        );
        let (sender, frames) = mpsc::channel::<Vec<u8>>();
        let encoder = std::thread::spawn(move || {
            let mut encoder = options.encoder(width, height, fps)?;
            frames.iter().map(|rgb| encoder.encode(&rgb)).collect()
        });
        Ok(OpenInterval { sender, encoder })
    }

    fn append_oldest(&mut self) -> Result<()> {
        let Some(oldest) = self.encoding.pop_front() else {
            return Ok(());
        };
        self.joined(oldest)?
            .into_iter()
            .try_for_each(|frame| self.writer.append(frame))
    }

    /// The frames an interval's thread encoded, or its error.
    fn joined(&self, encoder: IntervalEncoder) -> Result<Vec<EncodedFrame>> {
        encoder
            .join()
            .map_err(|_| self.writer.error("an H.264 encoding thread panicked"))?
    }
}

impl std::fmt::Debug for Mp4Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mp4Stream")
            .field("writer", &self.writer)
            .field("frames_pushed", &self.frames_pushed())
            .finish_non_exhaustive()
    }
}

impl Video {
    /// Writes the video as an H.264 MP4 at `path` (see [`Mp4Writer`] for the guarantees).
    ///
    /// The keyframe intervals are encoded in parallel, each by an encoder of its own: an interval
    /// starts with a keyframe (an IDR picture, which references nothing before it), so the
    /// stream is the one a single encoder writes, several times faster on a multi-core host.
    pub fn write_mp4(&self, path: impl AsRef<Path>, options: Mp4Options) -> Result<()> {
        self.write_mp4_with(path, options, Existing::Replace)
            .map(drop)
    }

    /// [`Video::write_mp4`], with `existing` saying what becomes of a file already at `path`;
    /// returns the path written.
    pub fn write_mp4_with(
        &self,
        path: impl AsRef<Path>,
        options: Mp4Options,
        existing: Existing,
    ) -> Result<PathBuf> {
        let (width, height, fps) = (self.width(), self.height(), self.fps());
        let mut stream = Mp4Stream::create_with(path, width, height, fps, options, existing)?;
        for frame in self.frames() {
            stream.push_frame(frame.clone())?;
        }
        stream.finish()
    }

    /// Reads the first H.264 track of an MP4 file and decodes every frame to RGB. The frame rate
    /// is that of the first frame.
    pub fn read_mp4(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let io_error = |source| Error::Io {
            path: path.to_owned(),
            source,
        };
        let bytes = std::fs::read(path).map_err(io_error)?;
        crate::mp4_boxes::check_boxes(&bytes)
            .map_err(|reason| media_error(path, format!("malformed MP4: {reason}")))?;
        let size = bytes.len() as u64;
        let mut reader = demuxing(path, "reading the header", || {
            mp4::Mp4Reader::read_header(Cursor::new(bytes), size)
        })?;
        let track = H264Track::find(&reader, path)?;
        track.check_sample_sizes(&reader, size, path)?;
        let (frames, frame_ticks) = track.decode(&mut reader, path)?;
        if frame_ticks == 0 {
            return Err(media_error(
                path,
                "the video track has no timed frames".into(),
            ));
        }
        let fps = Fps::new(f64::from(track.timescale) / f64::from(frame_ticks))?;
        Self::new(track.width, track.height, fps, frames)
    }
}

type Mp4Reader = mp4::Mp4Reader<Cursor<Vec<u8>>>;

/// What decoding needs from an MP4's H.264 track.
struct H264Track {
    id: u32,
    width: usize,
    height: usize,
    timescale: u32,
    sample_count: u32,
    sps: Vec<u8>,
    pps: Vec<u8>,
}

impl H264Track {
    /// The first H.264 track of the file.
    fn find(reader: &Mp4Reader, path: &Path) -> Result<Self> {
        let track = reader
            .tracks()
            .values()
            .find(|track| matches!(track.media_type(), Ok(MediaType::H264)))
            .ok_or_else(|| media_error(path, "the file has no H.264 video track".into()))?;
        let parameter_set = |set: mp4::Result<&[u8]>| set.map(<[u8]>::to_vec);
        Ok(Self {
            id: track.track_id(),
            width: usize::from(track.width()),
            height: usize::from(track.height()),
            timescale: track.timescale(),
            sample_count: track.sample_count(),
            sps: parameter_set(track.sequence_parameter_set()).map_err(|e| mux_error(path, e))?,
            pps: parameter_set(track.picture_parameter_set()).map_err(|e| mux_error(path, e))?,
        })
    }

    /// Fails when a sample claims more bytes than the file holds: the demuxer would allocate
    /// the claimed size (up to 4 GiB a sample) before finding out.
    fn check_sample_sizes(&self, reader: &Mp4Reader, file_size: u64, path: &Path) -> Result<()> {
        let Some(track) = reader.tracks().get(&self.id) else {
            return Ok(());
        };
        let stsz = &track.trak.mdia.minf.stbl.stsz;
        let fragments = track
            .trafs
            .iter()
            .filter_map(|traf| traf.trun.as_ref())
            .flat_map(|trun| trun.sample_sizes.iter());
        let largest = stsz
            .sample_sizes
            .iter()
            .chain(fragments)
            .chain([&stsz.sample_size])
            .copied()
            .max()
            .unwrap_or(0);
        if u64::from(largest) > file_size {
            return Err(media_error(
                path,
                format!("a sample claims {largest} bytes but the file holds {file_size}"),
            ));
        }
        Ok(())
    }

    /// Every frame as RGB of the track's size, and the duration of the first in ticks.
    fn decode(&self, reader: &mut Mp4Reader, path: &Path) -> Result<(Vec<Vec<u8>>, u32)> {
        let mut decoder = H264Decoder::new(&self.sps, &self.pps)?;
        // The count is the file's claim: grow as samples really arrive.
        let mut pictures = Vec::new();
        let mut first_duration = 0;
        for sample_id in 1..=self.sample_count {
            let sample = demuxing(path, "reading a sample", || {
                reader.read_sample(self.id, sample_id)
            })?
            .ok_or_else(|| {
                let count = self.sample_count;
                media_error(path, format!("sample {sample_id} of {count} is missing"))
            })?;
            if sample_id == 1 {
                first_duration = sample.duration;
            }
            let index = sample_id as usize - 1;
            pictures.extend(decoder.decode_sample(&sample.bytes, index)?);
        }
        pictures.extend(decoder.finish()?);

        let frames = pictures
            .into_iter()
            .enumerate()
            .map(|(index, picture)| {
                if (picture.width, picture.height) == (self.width, self.height) {
                    Ok(picture.rgb)
                } else {
                    let (w, h) = (self.width, self.height);
                    let reason = format!(
                        "frame {index} decodes to {}x{}, but the track is {w}x{h}",
                        picture.width, picture.height
                    );
                    Err(media_error(path, reason))
                }
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((frames, first_duration))
    }
}

/// The track time scale for `fps`, with [`TICKS_PER_FRAME`] ticks per frame.
pub(crate) fn track_timescale(fps: Fps) -> Result<u32> {
    let timescale = (fps.get() * f64::from(TICKS_PER_FRAME)).round();
    if timescale >= 1.0 && timescale <= f64::from(u32::MAX) {
        Ok(timescale as u32)
    } else {
        Err(Error::Media {
            what: "frame rate".into(),
            reason: format!(
                "{} fps cannot be stored in MP4: it must lie in [0.001, 4 294 967]",
                fps.get()
            ),
        })
    }
}

/// Runs a call into the `mp4` demuxer, which panics (`expect`, `unwrap`, arithmetic overflow)
/// on some malformed files: a panic becomes the same typed error as a demuxing failure.
fn demuxing<T>(path: &Path, what: &str, call: impl FnOnce() -> mp4::Result<T>) -> Result<T> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(call)) {
        Ok(result) => result.map_err(|e| mux_error(path, e)),
        Err(_) => Err(media_error(
            path,
            format!("malformed MP4: the demuxer failed while {what}"),
        )),
    }
}

fn media_error(path: &Path, reason: String) -> Error {
    Error::Media {
        what: path.display().to_string(),
        reason,
    }
}

fn mux_error(path: &Path, error: mp4::Error) -> Error {
    Error::Media {
        what: path.display().to_string(),
        reason: format!("MP4: {error}"),
    }
}
