//! Video geometry: the sizes the Wan models accept and the latent and token shapes they imply
//! (`spec/turbodiffusion.md` §7).

use std::fmt;
use std::str::FromStr;

use crate::{Error, Result};

/// Channels of the Wan2.1 VAE latent.
pub const LATENT_CHANNELS: usize = 16;
/// VAE compression: (time, height, width).
pub const VAE_STRIDE: (usize, usize, usize) = (4, 8, 8);
/// DiT patch size over the latent: (time, height, width).
pub const PATCH_SIZE: (usize, usize, usize) = (1, 2, 2);

/// Pixel stride a frame size must respect: VAE stride × patch size.
const SIZE_STRIDE: usize = VAE_STRIDE.1 * PATCH_SIZE.1;

/// The longest frame side accepted (4K and a little more): the Wan models are trained at 480p
/// and 720p, and every size computed from a frame (latents, tokens, bytes) stays far from
/// overflowing below it.
pub const MAX_FRAME_SIDE: usize = 4096;
/// The most frames accepted: 64 seconds at 16 fps (the models are trained on 81).
pub const MAX_FRAMES: usize = 1025;

/// The named resolutions of TurboDiffusion's size table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Resolution {
    P480,
    P720,
}

/// The aspect ratios of TurboDiffusion's size table, written width:height.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum AspectRatio {
    #[default]
    Wide16x9,
    Tall9x16,
    Square,
    Wide4x3,
    Tall3x4,
}

impl AspectRatio {
    pub const ALL: [Self; 5] = [
        Self::Wide16x9,
        Self::Tall9x16,
        Self::Square,
        Self::Wide4x3,
        Self::Tall3x4,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Wide16x9 => "16:9",
            Self::Tall9x16 => "9:16",
            Self::Square => "1:1",
            Self::Wide4x3 => "4:3",
            Self::Tall3x4 => "3:4",
        }
    }
}

impl Resolution {
    pub const ALL: [Self; 2] = [Self::P480, Self::P720];

    /// The frame size of this resolution at `aspect` (`VIDEO_RES_SIZE_INFO` upstream).
    pub fn frame_size(self, aspect: AspectRatio) -> FrameSize {
        use AspectRatio::*;
        let (width, height) = match (self, aspect) {
            (Self::P480, Wide16x9) => (832, 480),
            (Self::P480, Tall9x16) => (480, 832),
            (Self::P480, Square) => (640, 640),
            (Self::P480, Wide4x3) => (640, 480),
            (Self::P480, Tall3x4) => (480, 640),
            (Self::P720, Wide16x9) => (1280, 720),
            (Self::P720, Tall9x16) => (720, 1280),
            (Self::P720, Square) => (960, 960),
            (Self::P720, Wide4x3) => (960, 720),
            (Self::P720, Tall3x4) => (720, 960),
        };
        FrameSize { width, height }
    }

    fn name(self) -> &'static str {
        match self {
            Self::P480 => "480p",
            Self::P720 => "720p",
        }
    }
}

impl FromStr for Resolution {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim().to_ascii_lowercase();
        Self::ALL
            .into_iter()
            .find(|r| r.name() == name)
            .ok_or_else(|| Error::UnknownResolution { name: s.to_owned() })
    }
}

impl FromStr for AspectRatio {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        let name = s.trim();
        Self::ALL
            .into_iter()
            .find(|a| a.name() == name)
            .ok_or_else(|| Error::UnknownAspectRatio { name: s.to_owned() })
    }
}

impl fmt::Display for Resolution {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl fmt::Display for AspectRatio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A frame size in pixels; both sides are positive multiples of 16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameSize {
    width: usize,
    height: usize,
}

impl FrameSize {
    /// Both sides positive multiples of 16, at most [`MAX_FRAME_SIDE`].
    pub fn new(width: usize, height: usize) -> Result<Self> {
        if width.max(height) > MAX_FRAME_SIDE {
            return Err(Error::OutOfRange {
                what: "frame size".into(),
                value: format!("{width}x{height}"),
                expected: format!("each side at most {MAX_FRAME_SIDE} pixels"),
            });
        }
        let valid = |side: usize| side > 0 && side % SIZE_STRIDE == 0;
        if valid(width) && valid(height) {
            Ok(Self { width, height })
        } else {
            Err(Error::InvalidFrameSize { width, height })
        }
    }

    pub fn width(self) -> usize {
        self.width
    }

    pub fn height(self) -> usize {
        self.height
    }
}

impl fmt::Display for FrameSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}x{}", self.width, self.height)
    }
}

/// A number of video frames of the form 4n + 1, as the causal Wan VAE requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FrameCount(usize);

impl FrameCount {
    /// TurboDiffusion's default: 81 frames, five seconds at 16 fps.
    pub const DEFAULT: Self = Self(81);

    /// `4n + 1` frames, at most [`MAX_FRAMES`].
    pub fn new(frames: usize) -> Result<Self> {
        if frames > MAX_FRAMES {
            return Err(Error::OutOfRange {
                what: "frame count".into(),
                value: frames.to_string(),
                expected: format!("at most {MAX_FRAMES} frames (4n + 1)"),
            });
        }
        if frames % VAE_STRIDE.0 == 1 {
            return Ok(Self(frames));
        }
        // The nearest valid counts on either side (1 when there is none below).
        let below = if frames > 1 {
            (frames - 2) / 4 * 4 + 1
        } else {
            1
        };
        let above = (frames + 2) / 4 * 4 + 1;
        Err(Error::InvalidFrameCount {
            frames,
            below,
            above,
        })
    }

    pub fn get(self) -> usize {
        self.0
    }

    /// Frames of the latent: 1 + (F − 1) / 4.
    pub fn latent_frames(self) -> usize {
        1 + (self.0 - 1) / VAE_STRIDE.0
    }
}

impl Default for FrameCount {
    fn default() -> Self {
        Self::DEFAULT
    }
}

/// The shape of a Wan latent, `[C, T, H, W]` (no batch dimension).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LatentShape {
    pub channels: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

impl LatentShape {
    pub fn dims(self) -> [usize; 4] {
        [self.channels, self.frames, self.height, self.width]
    }

    /// The DiT's token count: one token per patch of the latent.
    pub fn token_count(self) -> usize {
        (self.frames / PATCH_SIZE.0) * (self.height / PATCH_SIZE.1) * (self.width / PATCH_SIZE.2)
    }
}

/// The size and length of a video.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VideoGeometry {
    pub size: FrameSize,
    pub frames: FrameCount,
}

impl VideoGeometry {
    pub fn new(size: FrameSize, frames: FrameCount) -> Self {
        Self { size, frames }
    }

    /// `[16, 1 + (F − 1)/4, H/8, W/8]`.
    pub fn latent_shape(self) -> LatentShape {
        LatentShape {
            channels: LATENT_CHANNELS,
            frames: self.frames.latent_frames(),
            height: self.size.height / VAE_STRIDE.1,
            width: self.size.width / VAE_STRIDE.2,
        }
    }

    /// Tokens the DiT attends over: `T_lat · (H/16) · (W/16)`.
    pub fn token_count(self) -> usize {
        self.latent_shape().token_count()
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn size_table_matches_upstream() {
        let size = |r: &str, a: &str| {
            let s = r
                .parse::<Resolution>()
                .unwrap()
                .frame_size(a.parse().unwrap());
            (s.width(), s.height())
        };
        assert_eq!(size("480p", "16:9"), (832, 480));
        assert_eq!(size("480p", "9:16"), (480, 832));
        assert_eq!(size("480p", "1:1"), (640, 640));
        assert_eq!(size("480p", "4:3"), (640, 480));
        assert_eq!(size("480p", "3:4"), (480, 640));
        assert_eq!(size("720p", "16:9"), (1280, 720));
        assert_eq!(size("720p", "9:16"), (720, 1280));
        assert_eq!(size("720p", "1:1"), (960, 960));
        assert_eq!(size("720p", "4:3"), (960, 720));
        assert_eq!(size("720p", "3:4"), (720, 960));
    }

    #[test]
    fn every_table_entry_is_a_valid_frame_size() {
        for r in Resolution::ALL {
            for a in AspectRatio::ALL {
                let s = r.frame_size(a);
                assert_eq!(FrameSize::new(s.width(), s.height()).unwrap(), s);
                assert_eq!(r.to_string().parse::<Resolution>().unwrap(), r);
                assert_eq!(a.to_string().parse::<AspectRatio>().unwrap(), a);
            }
        }
    }

    #[test]
    fn wan_token_counts() {
        let geometry = |r: Resolution| {
            VideoGeometry::new(r.frame_size(AspectRatio::Wide16x9), FrameCount::DEFAULT)
        };
        let g480 = geometry(Resolution::P480);
        assert_eq!(g480.latent_shape().dims(), [16, 21, 60, 104]);
        assert_eq!(g480.token_count(), 32_760);
        assert_eq!(geometry(Resolution::P720).token_count(), 75_600);
    }

    #[test]
    fn frame_counts_must_be_4n_plus_1() {
        assert_eq!(FrameCount::new(81).unwrap().latent_frames(), 21);
        assert_eq!(FrameCount::new(1).unwrap().latent_frames(), 1);
        match FrameCount::new(80) {
            Err(Error::InvalidFrameCount {
                frames: 80,
                below: 77,
                above: 81,
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            FrameCount::new(0),
            Err(Error::InvalidFrameCount {
                below: 1,
                above: 1,
                ..
            })
        ));
        assert!(matches!(
            FrameCount::new(3),
            Err(Error::InvalidFrameCount {
                below: 1,
                above: 5,
                ..
            })
        ));
    }

    #[test]
    fn bad_names_and_sizes_are_typed_errors() {
        assert!(matches!(
            "1080p".parse::<Resolution>(),
            Err(Error::UnknownResolution { .. })
        ));
        assert!(matches!(
            "21:9".parse::<AspectRatio>(),
            Err(Error::UnknownAspectRatio { .. })
        ));
        assert!(matches!(
            FrameSize::new(830, 480),
            Err(Error::InvalidFrameSize { .. })
        ));
        assert!(FrameSize::new(0, 480).is_err());
    }

    /// Sizes past the bounds (the ones that used to overflow the size arithmetic among them)
    /// are typed errors naming the value.
    #[test]
    fn sizes_and_lengths_past_the_bounds_are_refused() {
        for (width, height) in [(1 << 34, 1 << 34), (100_000, 100_000), (4112, 480)] {
            match FrameSize::new(width, height) {
                Err(Error::OutOfRange { what, value, .. }) => {
                    assert_eq!(what, "frame size");
                    assert_eq!(value, format!("{width}x{height}"));
                }
                other => panic!("{width}x{height}: {other:?}"),
            }
        }
        assert!(FrameSize::new(MAX_FRAME_SIDE, MAX_FRAME_SIDE).is_ok());
        for frames in [MAX_FRAMES + 4, 100_001, usize::MAX] {
            assert!(
                matches!(FrameCount::new(frames), Err(Error::OutOfRange { .. })),
                "{frames}"
            );
        }
        assert_eq!(FrameCount::new(MAX_FRAMES).unwrap().get(), MAX_FRAMES);
    }

    proptest! {
        #[test]
        fn latent_and_token_shapes(n in 0usize..40, w in 1usize..100, h in 1usize..100) {
            let frames = FrameCount::new(4 * n + 1).unwrap();
            let size = FrameSize::new(16 * w, 16 * h).unwrap();
            let latent = VideoGeometry::new(size, frames).latent_shape();
            prop_assert_eq!(latent.dims(), [16, n + 1, 2 * h, 2 * w]);
            prop_assert_eq!(latent.token_count(), (n + 1) * h * w);
        }

        #[test]
        fn invalid_frame_counts_name_valid_neighbours(frames in 0usize..1000) {
            prop_assume!(frames % 4 != 1);
            match FrameCount::new(frames) {
                Err(Error::InvalidFrameCount { below, above, .. }) => {
                    prop_assert!(FrameCount::new(below).is_ok());
                    prop_assert!(FrameCount::new(above).is_ok());
                    prop_assert!(below < frames || frames <= 1);
                    prop_assert!(above > frames);
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }
    }
}
