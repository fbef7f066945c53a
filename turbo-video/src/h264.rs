//! H.264 through OpenH264, compiled from its bundled source: RGB frames to NAL units and back.

use openh264::decoder::{DecodedYUV, Decoder};
use openh264::encoder::{
    BitRate, Encoder, EncoderConfig, FrameRate, IntraFramePeriod, QpRange, RateControlMode,
    VuiConfig,
};
use openh264::formats::{RgbSliceU8, YUVBuffer, YUVSource};
use openh264::OpenH264API;
use openh264_sys2::{
    WelsTraceCallback, ENCODER_OPTION_TRACE_CALLBACK, WELS_LOG_ERROR, WELS_LOG_WARNING,
};
use std::ffi::{c_char, c_int, c_void, CStr};

use turbo_core::{Error, Result};

use crate::video::{check_frame_len, Fps};

/// The largest frame OpenH264 encodes (level 5.2), in either orientation.
const MAX_LONG_SIDE: usize = 3840;
const MAX_SHORT_SIDE: usize = 2160;

/// NAL unit types (ITU-T H.264 table 7-1): IDR slices start a keyframe; the parameter sets go
/// out of band, in the MP4 sample entry.
const NAL_IDR_SLICE: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;

/// The bit rate handed to OpenH264's rate control in [`Quality::Qp`] mode. The pinned quantiser
/// range overrides it; OpenH264 raises the signalled H.264 level until the level's maximum
/// covers it, so it is kept at a rate that level 4 (1080p-class decoders) allows.
const QP_MODE_BITRATE: u32 = 20_000_000;
/// The highest bit rate OpenH264 accepts: the maximum of H.264 level 5.2 (NAL units).
const MAX_BITRATE: u32 = 288_000_000;

/// How the encoder trades file size for quality.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Quality {
    /// A constant quantiser in 0..=51: lower is better and larger. Every frame is coded at this
    /// quantiser whatever its content.
    Qp(u8),
    /// A target bit rate in bits per second; the encoder varies the quantiser to meet it.
    Bitrate(u32),
}

impl Quality {
    /// Close to upstream's `quality = 5` (libx264 CRF 25) on generated 480p clips.
    pub const DEFAULT: Self = Self::Qp(24);

    fn validate(self) -> Result<Self> {
        let reason = match self {
            Self::Qp(qp) if qp > 51 => format!("quantiser {qp} is out of range 0..=51"),
            Self::Bitrate(bps) if bps == 0 || bps > MAX_BITRATE => {
                format!("bit rate {bps} bits/s is out of range 1..={MAX_BITRATE}")
            }
            _ => return Ok(self),
        };
        Err(Error::Media {
            what: "H.264 quality".into(),
            reason,
        })
    }
}

impl Default for Quality {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// Checks that H.264 (4:2:0) and OpenH264 can take a `width × height` frame.
///
/// Odd sides are rejected rather than padded: padding would change the size of the video the
/// caller asked for, and every size the Wan models produce is a multiple of 16.
pub(crate) fn check_encodable_size(width: usize, height: usize) -> Result<()> {
    let reason = if width == 0 || height == 0 || width % 2 == 1 || height % 2 == 1 {
        format!(
            "frame size {width}x{height}: H.264 with 4:2:0 chroma needs positive even width \
             and height (resize or crop the video first)"
        )
    } else if width.max(height) > MAX_LONG_SIDE || width.min(height) > MAX_SHORT_SIDE {
        format!(
            "frame size {width}x{height}: OpenH264 encodes at most \
             {MAX_LONG_SIDE}x{MAX_SHORT_SIDE} (or {MAX_SHORT_SIDE}x{MAX_LONG_SIDE})"
        )
    } else {
        return Ok(());
    };
    Err(Error::Media {
        what: "H.264 encoder".into(),
        reason,
    })
}

/// One encoded frame.
#[derive(Debug, Default)]
pub(crate) struct EncodedFrame {
    /// The sequence parameter set, when the encoder emitted one with this frame.
    pub sps: Option<Vec<u8>>,
    /// The picture parameter set, when the encoder emitted one with this frame.
    pub pps: Option<Vec<u8>>,
    /// The other NAL units, each behind its 4-byte big-endian length (the MP4 sample format).
    pub sample: Vec<u8>,
    /// Whether the frame is an IDR picture, where decoding can start.
    pub is_keyframe: bool,
}

/// An OpenH264 encoder for frames of one size.
pub(crate) struct H264Encoder {
    encoder: Encoder,
    yuv: YUVBuffer,
    width: usize,
    height: usize,
    frames_encoded: usize,
}

impl H264Encoder {
    /// An encoder for `width × height` RGB frames; `keyframe_interval` 0 puts a keyframe only
    /// at the start.
    pub(crate) fn new(
        width: usize,
        height: usize,
        fps: Fps,
        quality: Quality,
        keyframe_interval: u32,
    ) -> Result<Self> {
        check_encodable_size(width, height)?;
        let base = EncoderConfig::new()
            // Skipping would silently drop frames to meet the rate.
            .skip_frames(false)
            .max_frame_rate(FrameRate::from_hz(fps.get() as f32))
            .intra_frame_period(IntraFramePeriod::from_num_frames(keyframe_interval))
            // The RGB → YUV conversion below uses the BT.601 matrix with limited range.
            .vui(VuiConfig::bt601());
        let config = match quality.validate()? {
            Quality::Qp(qp) => base
                .rate_control_mode(RateControlMode::Quality)
                .bitrate(BitRate::from_bps(QP_MODE_BITRATE))
                .qp(QpRange::new(qp, qp)),
            Quality::Bitrate(bps) => base
                .rate_control_mode(RateControlMode::Bitrate)
                .bitrate(BitRate::from_bps(bps)),
        };
        let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
            .map_err(|e| codec_error("H.264 encoder", e))?;
        route_logs_to_tracing(&mut encoder)?;
        Ok(Self {
            encoder,
            yuv: YUVBuffer::new(width, height),
            width,
            height,
            frames_encoded: 0,
        })
    }

    /// Encodes one RGB frame of the encoder's size.
    pub(crate) fn encode(&mut self, rgb: &[u8]) -> Result<EncodedFrame> {
        let index = self.frames_encoded;
        check_frame_len(rgb, self.width, self.height, index)?;
        self.yuv
            .read_rgb8(RgbSliceU8::new(rgb, (self.width, self.height)));
        let bitstream = self
            .encoder
            .encode(&self.yuv)
            .map_err(|e| codec_error(&format!("H.264 encoder, frame {index}"), e))?;

        let mut frame = EncodedFrame::default();
        for layer in (0..bitstream.num_layers()).filter_map(|i| bitstream.layer(i)) {
            for nal in (0..layer.nal_count()).filter_map(|i| layer.nal_unit(i)) {
                let nal = strip_start_code(nal);
                match nal.first().map(|header| header & 0x1f) {
                    None => {}
                    Some(NAL_SPS) => frame.sps = Some(nal.to_vec()),
                    Some(NAL_PPS) => frame.pps = Some(nal.to_vec()),
                    Some(nal_type) => {
                        frame.is_keyframe |= nal_type == NAL_IDR_SLICE;
                        frame
                            .sample
                            .extend_from_slice(&(nal.len() as u32).to_be_bytes());
                        frame.sample.extend_from_slice(nal);
                    }
                }
            }
        }
        if frame.sample.is_empty() {
            return Err(Error::Media {
                what: format!("H.264 encoder, frame {index}"),
                reason: "the encoder produced no picture for this frame".into(),
            });
        }
        self.frames_encoded += 1;
        Ok(frame)
    }
}

/// An OpenH264 decoder that turns MP4 samples into RGB frames.
pub(crate) struct H264Decoder {
    decoder: Decoder,
}

/// One decoded RGB frame and its size.
pub(crate) struct DecodedFrame {
    pub width: usize,
    pub height: usize,
    pub rgb: Vec<u8>,
}

impl H264Decoder {
    /// A decoder primed with the stream's parameter sets.
    pub(crate) fn new(sps: &[u8], pps: &[u8]) -> Result<Self> {
        let mut decoder = Decoder::with_api_config(OpenH264API::from_source(), Default::default())
            .map_err(|e| codec_error("H.264 decoder", e))?;
        let mut headers = Vec::new();
        for nal in [sps, pps] {
            headers.extend_from_slice(&[0, 0, 0, 1]);
            headers.extend_from_slice(nal);
        }
        decoder
            .decode(&headers)
            .map_err(|e| codec_error("H.264 decoder, parameter sets", e))?;
        Ok(Self { decoder })
    }

    /// Decodes one MP4 sample (length-prefixed NAL units); returns the picture it completes.
    pub(crate) fn decode_sample(
        &mut self,
        sample: &[u8],
        index: usize,
    ) -> Result<Option<DecodedFrame>> {
        let annex_b = length_prefixed_to_annex_b(sample).ok_or_else(|| Error::Media {
            what: format!("H.264 sample {index}"),
            reason: "its NAL unit lengths overrun the sample".into(),
        })?;
        let picture = self
            .decoder
            .decode(&annex_b)
            .map_err(|e| codec_error(&format!("H.264 decoder, sample {index}"), e))?;
        Ok(picture.map(|yuv| to_rgb(&yuv)))
    }

    /// The pictures still buffered in the decoder, in order.
    pub(crate) fn finish(&mut self) -> Result<Vec<DecodedFrame>> {
        let pictures = self
            .decoder
            .flush_remaining()
            .map_err(|e| codec_error("H.264 decoder, flush", e))?;
        Ok(pictures.iter().map(to_rgb).collect())
    }
}

/// Sends OpenH264's messages to `tracing` rather than stderr. The encoder is initialised (and
/// validates its parameters, warning as it goes) on the first frame, before the wrapper lowers
/// its log level, so without this those warnings would be printed.
fn route_logs_to_tracing(encoder: &mut Encoder) -> Result<()> {
    let mut callback: WelsTraceCallback = Some(forward_log);
    // SAFETY: the trace callback may be set before initialisation; OpenH264 copies the function
    // pointer out of `callback` during the call, and `forward_log` has the signature it expects.
    let status = unsafe {
        encoder
            .raw_api()
            .set_option(ENCODER_OPTION_TRACE_CALLBACK, (&raw mut callback).cast())
    };
    if status == 0 {
        Ok(())
    } else {
        Err(Error::Media {
            what: "H.264 encoder".into(),
            reason: format!("cannot install the log callback (OpenH264 status {status})"),
        })
    }
}

unsafe extern "C" fn forward_log(_context: *mut c_void, level: c_int, message: *const c_char) {
    if message.is_null() {
        return;
    }
    // SAFETY: OpenH264 passes a NUL-terminated string that lives for the duration of the call.
    let message = unsafe { CStr::from_ptr(message) }.to_string_lossy();
    let message = message.trim_end();
    if level <= WELS_LOG_ERROR as c_int {
        tracing::error!(target: "openh264", "{message}");
    } else if level <= WELS_LOG_WARNING as c_int {
        tracing::warn!(target: "openh264", "{message}");
    } else {
        tracing::debug!(target: "openh264", "{message}");
    }
}

fn to_rgb(yuv: &DecodedYUV<'_>) -> DecodedFrame {
    let (width, height) = yuv.dimensions();
    let mut rgb = vec![0; width * height * 3];
    yuv.write_rgb8(&mut rgb);
    DecodedFrame { width, height, rgb }
}

/// A NAL unit without its Annex B start code (`00 00 01` or `00 00 00 01`).
fn strip_start_code(nal: &[u8]) -> &[u8] {
    nal.strip_prefix(&[0, 0, 0, 1])
        .or_else(|| nal.strip_prefix(&[0, 0, 1]))
        .unwrap_or(nal)
}

/// Rewrites 4-byte length prefixes as Annex B start codes; `None` if a length overruns.
fn length_prefixed_to_annex_b(mut sample: &[u8]) -> Option<Vec<u8>> {
    let mut annex_b = Vec::with_capacity(sample.len() + 16);
    while !sample.is_empty() {
        let (length, rest) = sample.split_first_chunk::<4>()?;
        let length = u32::from_be_bytes(*length) as usize;
        let nal = rest.get(..length)?;
        annex_b.extend_from_slice(&[0, 0, 0, 1]);
        annex_b.extend_from_slice(nal);
        sample = &rest[length..];
    }
    Some(annex_b)
}

fn codec_error(what: &str, error: openh264::Error) -> Error {
    Error::Media {
        what: what.to_owned(),
        reason: error.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_and_oversized_frames_are_rejected() {
        assert!(check_encodable_size(64, 48).is_ok());
        assert!(check_encodable_size(3840, 2160).is_ok());
        assert!(check_encodable_size(2160, 3840).is_ok());
        for (w, h) in [(63, 48), (64, 47), (0, 48), (3842, 2160), (2200, 2200)] {
            let message = check_encodable_size(w, h).unwrap_err().to_string();
            assert!(message.contains(&format!("{w}x{h}")), "{message}");
        }
    }

    #[test]
    fn start_codes_and_length_prefixes() {
        assert_eq!(strip_start_code(&[0, 0, 0, 1, 0x67, 9]), [0x67, 9]);
        assert_eq!(strip_start_code(&[0, 0, 1, 0x68]), [0x68]);
        let sample = [0, 0, 0, 2, 0x65, 1, 0, 0, 0, 1, 0x06];
        assert_eq!(
            length_prefixed_to_annex_b(&sample).unwrap(),
            [0, 0, 0, 1, 0x65, 1, 0, 0, 0, 1, 0x06]
        );
        assert!(length_prefixed_to_annex_b(&[0, 0, 0, 5, 1, 2]).is_none());
        assert!(length_prefixed_to_annex_b(&[0, 0]).is_none());
    }

    proptest::proptest! {
        /// Length-prefixed NAL units become start-code-prefixed ones with the same payloads.
        #[test]
        fn length_prefixes_become_start_codes(
            nals in proptest::collection::vec(proptest::collection::vec(1u8..=255, 1..40), 0..6)
        ) {
            let sample: Vec<u8> = nals
                .iter()
                .flat_map(|nal| (nal.len() as u32).to_be_bytes().into_iter().chain(nal.clone()))
                .collect();
            let expected: Vec<u8> = nals
                .iter()
                .flat_map(|nal| [0, 0, 0, 1].into_iter().chain(nal.clone()))
                .collect();
            proptest::prop_assert_eq!(length_prefixed_to_annex_b(&sample), Some(expected));
        }
    }

    #[test]
    fn quality_out_of_range_is_an_error() {
        assert!(Quality::Qp(52).validate().is_err());
        assert!(Quality::Bitrate(0).validate().is_err());
        assert!(Quality::Bitrate(MAX_BITRATE + 1).validate().is_err());
        assert_eq!(Quality::Qp(51).validate().unwrap(), Quality::Qp(51));
    }
}
