//! Classifier-free guidance for the teacher samplers (`spec/sampling.md` §3.3). The rCM students
//! are guidance-distilled and take no guidance.

use candle_core::Tensor;
use turbo_core::parallel::{Communicator, Group};
use turbo_core::{Denoiser, Error, Result, Timestep};

use crate::experts::{Expert, ExpertBoundary};

/// Wan's default negative prompt (`shared_config.sample_neg_prompt` of Wan2.1 and Wan2.2, also
/// what the rCM students were distilled against). Upstream uses it when no negative prompt is
/// given; Wan2.1 I2V prepends `镜头晃动，` and FLF2V `镜头切换，`.
pub const WAN_NEGATIVE_PROMPT: &str = "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走";

/// Wan's default guidance scale.
pub const WAN_GUIDANCE: f64 = 5.0;

/// The guidance scale g, constant or one per Wan2.2 expert.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GuidanceScale {
    Constant(f64),
    /// Wan2.2 A14B: `high` while the high-noise expert runs, `low` after.
    PerExpert {
        boundary: ExpertBoundary,
        high: f64,
        low: f64,
    },
}

impl GuidanceScale {
    /// The scale at time `t`.
    pub fn at(&self, t: Timestep) -> f64 {
        match *self {
            Self::Constant(scale) => scale,
            Self::PerExpert {
                boundary,
                high,
                low,
            } => match boundary.expert_at(t) {
                Expert::HighNoise => high,
                Expert::LowNoise => low,
            },
        }
    }

    /// Fails with [`Error::InvalidSamplerSetting`] for a scale that is not finite or whose
    /// size passes [`MAX_GUIDANCE`] (such a scale only turns the video into flat noise).
    pub fn validate(&self) -> Result<()> {
        let scales = match *self {
            Self::Constant(scale) => [scale, scale],
            Self::PerExpert { high, low, .. } => [high, low],
        };
        let usable = |scale: f64| scale.is_finite() && scale.abs() <= MAX_GUIDANCE;
        match scales.into_iter().find(|&scale| !usable(scale)) {
            Some(scale) => Err(Error::InvalidSamplerSetting {
                setting: "guidance scale",
                value: scale.to_string(),
                expected: "a finite number between -100 and 100",
            }),
            None => Ok(()),
        }
    }
}

/// The largest guidance scale accepted, in size: Wan uses 5, and far larger scales only
/// amplify the difference of two velocities until the video is flat gray or non-finite.
pub const MAX_GUIDANCE: f64 = 100.0;

/// A [`Denoiser`] with classifier-free guidance: v = v_u + g·(v_c − v_u), where v_c is the
/// model's velocity with the condition a sampler passes and v_u its velocity with `negative`
/// (the negative-prompt context, for example the encoding of [`WAN_NEGATIVE_PROMPT`]).
///
/// `negative` is a whole condition of the model's type: for image-to-video it carries the same
/// image conditioning as the prompt's, only the text context differs (as upstream). Two model
/// passes per evaluation, as upstream (no shortcut at g = 1).
pub struct Guided<'a, D: Denoiser + ?Sized> {
    model: &'a D,
    negative: &'a D::Condition,
    scale: GuidanceScale,
}

impl<'a, D: Denoiser + ?Sized> Guided<'a, D> {
    /// Fails with [`Error::InvalidSamplerSetting`] for a scale that is not finite.
    pub fn new(model: &'a D, negative: &'a D::Condition, scale: GuidanceScale) -> Result<Self> {
        scale.validate()?;
        Ok(Self {
            model,
            negative,
            scale,
        })
    }
}

impl<D: Denoiser + ?Sized> std::fmt::Debug for Guided<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guided")
            .field("scale", &self.scale)
            .finish_non_exhaustive()
    }
}

impl<D: Denoiser + ?Sized> Denoiser for Guided<'_, D> {
    type Condition = D::Condition;

    fn velocity(&self, x: &Tensor, t: Timestep, cond: &Self::Condition) -> Result<Tensor> {
        let conditional = self.model.velocity(x, t, cond)?;
        let unconditional = self.model.velocity(x, t, self.negative)?;
        guide(conditional, unconditional, self.scale.at(t))
    }
}

/// v_u + g·(v_c − v_u), in the one order both guided denoisers use.
fn guide(conditional: Tensor, unconditional: Tensor, scale: f64) -> Result<Tensor> {
    let guidance = (conditional - &unconditional)?.affine(scale, 0.0)?;
    Ok((unconditional + guidance)?)
}

/// [`Guided`] with its two model passes on the two halves of the ranks of `comm` (CFG
/// parallelism): the first half computes the conditional velocity, the second half the
/// unconditional one, rank r of one half exchanges its velocity with rank r of the other, and
/// both combine them with the same arithmetic as [`Guided`]. Every rank gets the bit-identical
/// guided velocity, so ranks that drive the same sampler from the same noise stay in step
/// without further exchange.
///
/// On two ranks each pass is a whole forward of `model`. On more, `model` is the pass computed
/// by the ranks of [`cfg_pass_group`] together (a DiT sequence parallel over that
/// group), which every rank of the half returns whole.
///
/// ```
/// use candle_core::{Device, Tensor};
/// use turbo_core::parallel::simulate;
/// use turbo_sampler::{CfgParallel, Denoiser, GuidanceScale, Guided, Timestep};
///
/// /// A toy model: the velocity is the condition times x.
/// struct Scale;
/// impl Denoiser for Scale {
///     type Condition = f64;
///     fn velocity(&self, x: &Tensor, _: Timestep, c: &f64) -> turbo_core::Result<Tensor> {
///         Ok(x.affine(*c, 0.0)?)
///     }
/// }
///
/// let x = Tensor::new(&[1f32, 2.0], &Device::Cpu)?;
/// let t = Timestep { s: 0.5, model_time: 500.0 };
/// let scale = GuidanceScale::Constant(5.0);
/// let one_device = Guided::new(&Scale, &0.5, scale)?.velocity(&x, t, &2.0)?;
/// let per_rank = simulate(2, |comm| CfgParallel::new(&Scale, &0.5, scale, comm)?.velocity(&x, t, &2.0))?;
/// for v in per_rank {
///     assert_eq!(v.to_vec1::<f32>()?, one_device.to_vec1::<f32>()?);
/// }
/// # Ok::<(), turbo_core::Error>(())
/// ```
pub struct CfgParallel<'a, D: Denoiser + ?Sized> {
    model: &'a D,
    negative: &'a D::Condition,
    scale: GuidanceScale,
    comm: &'a dyn Communicator,
}

impl<'a, D: Denoiser + ?Sized> CfgParallel<'a, D> {
    /// Fails with [`Error::InvalidSamplerSetting`] for a scale that is not finite, and with
    /// [`Error::InvalidConfig`] for a communicator whose ranks do not split into two halves.
    pub fn new(
        model: &'a D,
        negative: &'a D::Condition,
        scale: GuidanceScale,
        comm: &'a dyn Communicator,
    ) -> Result<Self> {
        scale.validate()?;
        check_halves(comm)?;
        Ok(Self {
            model,
            negative,
            scale,
            comm,
        })
    }
}

/// The ranks of `comm` that compute this rank's pass of [`CfgParallel`] together: its half of
/// the ranks, the first half for the conditional pass. Fails as [`CfgParallel::new`] does.
pub fn cfg_pass_group(comm: &dyn Communicator) -> Result<Group<'_>> {
    let half = check_halves(comm)?;
    let first = comm.rank() / half * half;
    Group::new(comm, (first..first + half).collect())
}

/// The ranks per pass of CFG parallelism on `comm`: half of them, or an
/// [`Error::InvalidConfig`] for an odd number of ranks.
fn check_halves(comm: &dyn Communicator) -> Result<usize> {
    let world = comm.world_size();
    if world >= 2 && world % 2 == 0 {
        return Ok(world / 2);
    }
    Err(Error::InvalidConfig {
        field: "CFG-parallel world size".into(),
        reason: format!(
            "{world} ranks: the conditional and unconditional passes take two halves of an \
             even number of ranks"
        ),
    })
}

impl<D: Denoiser + ?Sized> std::fmt::Debug for CfgParallel<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CfgParallel")
            .field("rank", &self.comm.rank())
            .field("scale", &self.scale)
            .finish_non_exhaustive()
    }
}

impl<D: Denoiser + ?Sized> Denoiser for CfgParallel<'_, D> {
    type Condition = D::Condition;

    fn velocity(&self, x: &Tensor, t: Timestep, cond: &Self::Condition) -> Result<Tensor> {
        let (me, half) = (self.comm.rank(), self.comm.world_size() / 2);
        let conditional_pass = me < half;
        let (mine, partner) = if conditional_pass {
            (self.model.velocity(x, t, cond)?, me + half)
        } else {
            (self.model.velocity(x, t, self.negative)?, me - half)
        };
        let theirs = self.comm.swap_with(&mine, partner)?;
        let (conditional, unconditional) = if conditional_pass {
            (mine, theirs)
        } else {
            (theirs, mine)
        };
        guide(conditional, unconditional, self.scale.at(t))
    }
}
