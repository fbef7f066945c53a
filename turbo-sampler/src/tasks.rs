//! The published teacher settings of each Wan task (`spec/sampling.md` §3.7 and §3.8): steps,
//! shift, guidance (one scale, or one per Wan2.2 expert with its boundary), frames and fps.
//! These models have no rCM students; they run their teachers with these defaults.

use crate::experts::{ExpertBoundary, I2V_A14B_BOUNDARY, T2V_A14B_BOUNDARY};
use crate::guidance::{GuidanceScale, WAN_GUIDANCE};

/// A released Wan model, as its sampler defaults differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum WanTask {
    Wan21T2v1_3b,
    Wan21T2v14b,
    Wan21I2v14b,
    Wan21Flf2v14b,
    /// Two T2V experts, switched at [`T2V_A14B_BOUNDARY`].
    Wan22T2vA14b,
    /// Two I2V experts, switched at [`I2V_A14B_BOUNDARY`].
    Wan22I2vA14b,
    Wan22Ti2v5b,
}

/// A task's published teacher settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TeacherDefaults {
    pub steps: usize,
    /// Flow shift of the sigma schedule.
    pub shift: f64,
    /// Classifier-free guidance: per expert for the A14B models.
    pub guidance: GuidanceScale,
    /// Frames of the published videos (4n + 1).
    pub frames: usize,
    pub fps: u32,
    /// What upstream prepends to the negative prompt (`镜头晃动，` for Wan2.1 I2V,
    /// `镜头切换，` for FLF2V), else empty.
    pub negative_prefix: &'static str,
}

impl WanTask {
    /// Every task, in table order.
    pub const ALL: [Self; 7] = [
        Self::Wan21T2v1_3b,
        Self::Wan21T2v14b,
        Self::Wan21I2v14b,
        Self::Wan21Flf2v14b,
        Self::Wan22T2vA14b,
        Self::Wan22I2vA14b,
        Self::Wan22Ti2v5b,
    ];

    /// The expert boundary of the two-expert models (RF time; the high-noise expert runs while
    /// s ≥ boundary), `None` for single models.
    pub fn boundary(self) -> Option<ExpertBoundary> {
        let value = match self {
            Self::Wan22T2vA14b => T2V_A14B_BOUNDARY,
            Self::Wan22I2vA14b => I2V_A14B_BOUNDARY,
            _ => return None,
        };
        Some(ExpertBoundary::new(value).expect("the published boundaries lie in [0, 1]"))
    }

    /// The published teacher settings for a video of `width × height` pixels (Wan2.1
    /// I2V-14B lowers its shift to 3 at 480p).
    pub fn teacher(self, width: usize, height: usize) -> TeacherDefaults {
        let constant = GuidanceScale::Constant(WAN_GUIDANCE);
        let per_expert = |high, low| GuidanceScale::PerExpert {
            boundary: self.boundary().expect("an A14B task has a boundary"),
            high,
            low,
        };
        let is_480p = matches!((width, height), (832, 480) | (480, 832));
        let (steps, shift, guidance, frames, fps, negative_prefix) = match self {
            Self::Wan21T2v1_3b | Self::Wan21T2v14b => (50, 5.0, constant, 81, 16, ""),
            Self::Wan21I2v14b => {
                let shift = if is_480p { 3.0 } else { 5.0 };
                (40, shift, constant, 81, 16, "镜头晃动，")
            }
            Self::Wan21Flf2v14b => (50, 16.0, constant, 81, 16, "镜头切换，"),
            Self::Wan22T2vA14b => (40, 12.0, per_expert(4.0, 3.0), 81, 16, ""),
            Self::Wan22I2vA14b => (40, 5.0, per_expert(3.5, 3.5), 81, 16, ""),
            Self::Wan22Ti2v5b => (50, 5.0, constant, 121, 24, ""),
        };
        TeacherDefaults {
            steps,
            shift,
            guidance,
            frames,
            fps,
            negative_prefix,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experts::Expert;
    use crate::schedule::FlowSchedule;

    #[test]
    fn published_defaults_are_valid() {
        for task in WanTask::ALL {
            let defaults = task.teacher(1280, 720);
            defaults.guidance.validate().unwrap();
            assert_eq!((defaults.frames - 1) % 4, 0, "{task:?}");
            assert_eq!(
                task.boundary().is_some(),
                matches!(defaults.guidance, GuidanceScale::PerExpert { .. })
            );
        }
        assert_eq!(WanTask::Wan21I2v14b.teacher(832, 480).shift, 3.0);
        assert_eq!(WanTask::Wan21I2v14b.teacher(1280, 720).shift, 5.0);
    }

    /// `spec/wan-model.md` §3: with shift 12 and 40 steps, T2V-A14B runs 26 high-noise steps
    /// and 14 low-noise ones; I2V-A14B with shift 5 runs 15 and 25.
    #[test]
    fn a14b_expert_split_matches_the_published_counts() {
        for (task, high_steps) in [(WanTask::Wan22T2vA14b, 26), (WanTask::Wan22I2vA14b, 15)] {
            let defaults = task.teacher(1280, 720);
            let boundary = task.boundary().unwrap();
            let schedule = FlowSchedule::wan_unipc(defaults.steps, defaults.shift).unwrap();
            let high = schedule
                .timesteps()
                .iter()
                .filter(|t| boundary.expert_at(**t) == Expert::HighNoise)
                .count();
            assert_eq!(high, high_steps, "{task:?}");
        }
    }
}
