//! The denoising stage shared by both tasks: the sampler run step by step over one DiT or
//! two experts, each loaded when its first step comes, with the top-k set for every step.

use std::io::Read;
use std::path::Path;
use std::thread::JoinHandle;

use candle_core::{Device, Tensor};
use turbo_attention::{Attention, AttentionConfig};
use turbo_core::parallel::Communicator;
use turbo_core::{
    Denoiser, Error, NoiseSource, Progress, Result, SeededNoise, Stage, StepReport, Timestep,
};
use turbo_models::wan::{DitCondition, QuantPolicy, SequenceParallelDit, WanModel};
use turbo_sampler::{
    cfg_pass_group, CfgParallel, Expert, ExpertBoundary, FlowRun, FlowSampler, GuidanceScale,
    Guided, RcmRun, RcmSampler,
};

use super::memory::{StageMeter, WeightBytes};
use super::parallel::DitSplit;
use super::resident::{timed_load, DitLoadSettings, ResidentDit, ResidentDits};
use super::{Pipeline, SamplerChoice, WeightSource};

/// A DiT whose attention backend is chosen at run time.
pub(super) type Dit = WanModel<Box<dyn Attention>>;

/// The sampler of a validated request.
pub(super) enum PlannedSampler {
    Rcm(RcmSampler),
    /// A teacher solver with classifier-free guidance against the negative prompt.
    Teacher {
        sampler: FlowSampler,
        guidance: GuidanceScale,
        negative_prompt: String,
    },
}

impl PlannedSampler {
    /// The sampler `choice` names; rCM's σ_max defaults to `default_sigma_max`. A teacher's
    /// `expert_guidance` (high-noise, low-noise) needs the two experts of `dits`.
    pub(super) fn new(
        choice: &SamplerChoice,
        default_sigma_max: f64,
        dits: &DitPlan,
        expert_guidance: Option<[f64; 2]>,
    ) -> Result<Self> {
        Ok(match choice {
            SamplerChoice::Rcm { .. } if expert_guidance.is_some() => {
                return Err(expert_guidance_error("rCM, which has no guidance"))
            }
            SamplerChoice::Rcm { .. } => {
                let cfg = choice.rcm_config(default_sigma_max).expect("an rCM choice");
                Self::Rcm(RcmSampler::new(cfg)?)
            }
            SamplerChoice::Teacher {
                solver,
                steps,
                shift,
                guidance,
                negative_prompt,
            } => {
                let guidance = match (expert_guidance, dits) {
                    (None, _) => GuidanceScale::Constant(*guidance),
                    (Some([high, low]), DitPlan::Experts { boundary, .. }) => {
                        GuidanceScale::PerExpert {
                            boundary: *boundary,
                            high,
                            low,
                        }
                    }
                    (Some(_), DitPlan::Single(_)) => {
                        return Err(expert_guidance_error("a model with one DiT"))
                    }
                };
                // Checked here, before any stage, rather than at the first guided step.
                guidance.validate()?;
                Self::Teacher {
                    sampler: FlowSampler::wan(*solver, *steps, *shift)?,
                    guidance,
                    negative_prompt: negative_prompt.clone(),
                }
            }
        })
    }

    /// The time of each network evaluation.
    pub(super) fn timesteps(&self) -> &[Timestep] {
        match self {
            Self::Rcm(sampler) => sampler.timesteps(),
            Self::Teacher { sampler, .. } => sampler.timesteps(),
        }
    }

    /// The prompt guidance steers away from, for the teachers.
    pub(super) fn negative_prompt(&self) -> Option<&str> {
        match self {
            Self::Rcm(_) => None,
            Self::Teacher { guidance, .. } if is_unguided(guidance) => None,
            Self::Teacher {
                negative_prompt, ..
            } => Some(negative_prompt),
        }
    }

    fn start(
        &self,
        noise: &mut dyn NoiseSource,
        shape: &[usize],
        device: &Device,
    ) -> Result<Run<'_>> {
        Ok(match self {
            Self::Rcm(sampler) => Run::Rcm(sampler.start(noise, shape, device)?),
            Self::Teacher {
                sampler, guidance, ..
            } => Run::Teacher(sampler.start(noise, shape, device)?, *guidance),
        })
    }
}

/// A guidance per expert given where it cannot apply (`where_given`).
fn expert_guidance_error(where_given: &str) -> Error {
    Error::InvalidSamplerSetting {
        setting: "guidance per expert",
        value: format!("given for {where_given}"),
        expected: "a teacher solver on a two-expert model (Wan2.2 A14B)",
    }
}

/// A constant guidance of 1: v_u + 1·(v_c − v_u) = v_c, classifier-free guidance off.
fn is_unguided(guidance: &GuidanceScale) -> bool {
    matches!(guidance, GuidanceScale::Constant(scale) if *scale == 1.0)
}

/// A sampler run in progress.
enum Run<'a> {
    Rcm(RcmRun<'a>),
    Teacher(FlowRun<'a>, GuidanceScale),
}

impl Run<'_> {
    fn next_step(&self) -> Option<usize> {
        match self {
            Self::Rcm(run) => run.next_step(),
            Self::Teacher(run, _) => run.next_step(),
        }
    }

    /// Runs the next step with `model` on `ranks`; `negative` is the guidance condition of the
    /// teachers.
    fn step(
        &mut self,
        model: &Dit,
        ranks: StepRanks,
        condition: &DitCondition,
        negative: Option<&DitCondition>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Option<StepReport>> {
        match ranks {
            StepRanks::One => self.step_with(model, condition, negative, noise),
            StepRanks::Sequence(comm) => {
                let model = SequenceParallelDit { model, comm };
                self.step_with(&model, condition, negative, noise)
            }
            StepRanks::Cfg(comm) => self.cfg_step(model, comm, condition, negative, noise),
        }
    }

    /// A guided teacher's step with its conditional and unconditional passes on the two halves
    /// of the ranks of `comm`, each half sequence parallel when it has more than one rank.
    /// Runs without a second pass are never planned so; one would run whole on each rank (the
    /// same result, nothing shared).
    fn cfg_step(
        &mut self,
        model: &Dit,
        comm: &dyn Communicator,
        condition: &DitCondition,
        negative: Option<&DitCondition>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Option<StepReport>> {
        match (self, negative) {
            (Self::Teacher(run, guidance), Some(negative)) if !is_unguided(guidance) => {
                // On two ranks each group is one rank, whose pass is a plain forward.
                let group = cfg_pass_group(comm)?;
                let pass = SequenceParallelDit {
                    model,
                    comm: &group,
                };
                run.step(
                    &CfgParallel::new(&pass, negative, *guidance, comm)?,
                    condition,
                )
            }
            (run, negative) => run.step_with(model, condition, negative, noise),
        }
    }

    /// Runs the next step with the velocities of `model`.
    fn step_with<D: Denoiser<Condition = DitCondition>>(
        &mut self,
        model: &D,
        condition: &DitCondition,
        negative: Option<&DitCondition>,
        noise: &mut dyn NoiseSource,
    ) -> Result<Option<StepReport>> {
        match self {
            Self::Rcm(run) => run.step(model, condition, noise),
            // Guidance 1 is the conditional velocity alone: one pass, no negative prompt
            // (the distilled-LoRA presets).
            Self::Teacher(run, guidance) if is_unguided(guidance) => run.step(model, condition),
            Self::Teacher(run, guidance) => {
                let negative = negative.expect("teachers are planned with a negative prompt");
                run.step(&Guided::new(model, negative, *guidance)?, condition)
            }
        }
    }

    fn finish(self) -> Result<Tensor> {
        match self {
            Self::Rcm(run) => run.finish(),
            Self::Teacher(run, _) => Ok(run.finish()),
        }
    }

    /// Writes `held` `[C, k, h, w]` over the first `k` latent frames of the state (TI2V's
    /// image frame, held at t = 0 through the run).
    fn hold(&mut self, held: &Tensor) -> Result<()> {
        let state = match self {
            Self::Rcm(run) => run.state(),
            Self::Teacher(run, _) => run.state(),
        };
        let frames = held.dim(1)?;
        let rest = state.narrow(1, frames, state.dim(1)? - frames)?;
        let held = held.to_dtype(state.dtype())?.to_device(state.device())?;
        let state = Tensor::cat(&[&held, &rest], 1)?;
        match self {
            Self::Rcm(run) => run.set_state(&state),
            Self::Teacher(run, _) => run.set_state(&state),
        }
    }
}

/// Where a step's velocities are computed (see [`DitSplit`]).
#[derive(Clone, Copy)]
enum StepRanks<'c> {
    One,
    /// Every rank, each over its shard of the tokens.
    Sequence(&'c dyn Communicator),
    /// The conditional pass on the first half of the ranks, the unconditional one on the
    /// second.
    Cfg(&'c dyn Communicator),
}

impl<'c> StepRanks<'c> {
    fn new(split: DitSplit, comm: Option<&'c dyn Communicator>) -> Self {
        match (split, comm) {
            (DitSplit::Sequence, Some(comm)) => Self::Sequence(comm),
            (DitSplit::Cfg, Some(comm)) => Self::Cfg(comm),
            _ => Self::One,
        }
    }
}

/// Which DiT evaluates each step.
#[derive(Debug, Clone, Copy)]
pub(super) enum DitPlan {
    /// One model for every step.
    Single(AttentionConfig),
    /// Wan2.2's two experts, with the attention of the high-noise one, then the low-noise one.
    Experts {
        boundary: ExpertBoundary,
        attention: [AttentionConfig; 2],
    },
}

impl DitPlan {
    /// The attention of the first DiT to run (the experts differ only in top-k).
    pub(super) fn first_attention(&self) -> AttentionConfig {
        match self {
            Self::Single(attention) => *attention,
            Self::Experts { attention, .. } => attention[0],
        }
    }

    fn expert_at(&self, t: Timestep) -> Option<Expert> {
        match self {
            Self::Single(_) => None,
            Self::Experts { boundary, .. } => Some(boundary.expert_at(t)),
        }
    }
}

/// Everything the denoising stage needs, validated.
pub(super) struct DenoisePlan {
    pub(super) sampler: PlannedSampler,
    pub(super) dits: DitPlan,
    /// The SLA top-k of each step, overriding the attention's.
    topk_schedule: Option<Vec<f64>>,
    latent_shape: Vec<usize>,
    /// How the ranks of a multi-GPU run share the DiT.
    pub(super) split: DitSplit,
}

impl DenoisePlan {
    /// A plan whose optional top-k `schedule` is checked against the sampler's steps.
    pub(super) fn new(
        sampler: PlannedSampler,
        dits: DitPlan,
        schedule: Option<&[f64]>,
        latent_shape: Vec<usize>,
        split: DitSplit,
    ) -> Result<Self> {
        if let Some(schedule) = schedule {
            check_topk_schedule(schedule, sampler.timesteps().len())?;
        }
        Ok(Self {
            sampler,
            dits,
            topk_schedule: schedule.map(<[f64]>::to_vec),
            latent_shape,
            split,
        })
    }

    /// The expert of the first step (`None`: a one-model family).
    pub(super) fn first_expert(&self) -> Option<Expert> {
        let first = self.sampler.timesteps().first();
        first.and_then(|&t| self.dits.expert_at(t))
    }
}

/// One valid top-k per step.
fn check_topk_schedule(schedule: &[f64], steps: usize) -> Result<()> {
    if schedule.len() != steps {
        return Err(Error::InvalidSamplerSetting {
            setting: "SLA top-k schedule",
            value: format!("{} values for {steps} steps", schedule.len()),
            expected: "one top-k per denoising step",
        });
    }
    schedule
        .iter()
        .try_for_each(|&topk| turbo_core::AttentionKind::sla(topk).map(drop))
}

/// The DiTs of one denoising run.
enum RunDits<'p> {
    /// Each loaded when its expert's first step comes, the previous one dropped first (boxed:
    /// the model is large beside the other variant, which only locks).
    Streamed(Option<Box<Dit>>),
    /// The pipeline's resident DiTs, locked for the stage; `current` is the expert in use.
    Resident {
        dits: ResidentDits<'p>,
        current: Option<Expert>,
    },
}

impl RunDits<'_> {
    /// The DiT of the expert switched to last.
    fn current(&mut self) -> &mut Dit {
        match self {
            Self::Streamed(dit) => dit.as_mut().expect("switched to before the first step"),
            Self::Resident { dits, current } => {
                let slot = dits.slot(*current);
                &mut slot.as_mut().expect("loaded at the switch").model
            }
        }
    }
}

impl Pipeline {
    /// Samples the latent. Each DiT is loaded when its first step comes and dropped before the
    /// next one is read (with two experts only one is resident); the last is dropped before
    /// returning. Resident DiTs ([`super::Residency::dit`]) are loaded by the first run that
    /// needs them and kept. `held` (TI2V's image latent) replaces the leading latent frames of the
    /// starting noise and of the state after every step.
    pub(super) fn denoise(
        &self,
        plan: &DenoisePlan,
        condition: &DitCondition,
        negative: Option<&DitCondition>,
        held: Option<&Tensor>,
        seed: u64,
        progress: &mut dyn Progress,
    ) -> Result<Tensor> {
        let meter = StageMeter::start(&self.device)?;
        let timesteps = plan.sampler.timesteps();
        let mut noise = SeededNoise::new(seed);
        let mut run = plan
            .sampler
            .start(&mut noise, &plan.latent_shape, &self.device)?;
        let hold = |run: &mut Run| held.map_or(Ok(()), |held| run.hold(held));
        hold(&mut run)?;
        let mut dits = self.run_dits(plan.dits);
        let mut current_expert = None;
        let mut largest_model = 0;
        let ranks = StepRanks::new(plan.split, self.ranks.several());
        if plan.split != DitSplit::OneDevice {
            tracing::info!(split = ?plan.split, world_size = self.ranks.world_size(), "DiT split");
        }
        // The second expert's file is read into the page cache while the first one samples,
        // so that loading it after the switch copies from memory instead of the disk.
        let prefetch = match plan.dits {
            DitPlan::Experts { .. } => self.prefetch_dit(plan.dits, Some(Expert::LowNoise)),
            DitPlan::Single(_) => None,
        };
        while let Some(step) = run.next_step() {
            let expert = plan.dits.expert_at(timesteps[step]);
            if current_expert != Some(expert) {
                progress.stage(&Stage::LoadingDit {
                    expert: expert.map(Expert::name),
                });
                let read = self.switch_dit(&mut dits, plan.dits, expert)?;
                current_expert = Some(expert);
                largest_model = largest_model.max(read);
                if step == 0 {
                    progress.stage(&Stage::Denoising {
                        steps: timesteps.len(),
                    });
                }
            }
            let model = dits.current();
            if let Some(schedule) = &plan.topk_schedule {
                model.set_attention_topk(schedule[step])?;
            }
            let report = run
                .step(model, ranks, condition, negative, &mut noise)?
                .expect("a step was pending");
            hold(&mut run)?;
            self.report_step(progress, &report)?;
        }
        drop(dits);
        finish_prefetch(prefetch, "the second expert");
        let stage = Stage::Denoising {
            steps: timesteps.len(),
        };
        meter.finish(stage, largest_model, &self.device, progress)?;
        run.finish()
    }

    /// Reads the file of `expert`'s DiT in `plan` into the page cache on another thread, unless
    /// the DiT is resident already with the plan's settings: a run reads nothing for it then,
    /// and a read of the whole file (about 15 GB for the 14B) would only delay the request.
    /// Random weights have no file.
    pub(super) fn prefetch_dit(
        &self,
        plan: DitPlan,
        expert: Option<Expert>,
    ) -> Option<JoinHandle<std::io::Result<u64>>> {
        let (source, attention) = self.planned_dit(plan, expert);
        let settings = self.dit_settings(attention);
        match self.residency.dit && self.residents.holds_dit(expert, settings) {
            true => None,
            false => prefetch_file(source),
        }
    }

    /// The DiTs of a run over `dits`: the resident ones (emptied of DiTs loaded with other
    /// settings), or none yet.
    fn run_dits(&self, dits: DitPlan) -> RunDits<'_> {
        match self.residency.dit {
            true => RunDits::Resident {
                dits: self
                    .residents
                    .dits(self.dit_settings(dits.first_attention())),
                current: None,
            },
            false => RunDits::Streamed(None),
        }
    }

    /// What a DiT with `attention` is loaded with.
    fn dit_settings(&self, attention: AttentionConfig) -> DitLoadSettings {
        DitLoadSettings::new(attention, self.quant_linear, self.dtype)
    }

    /// Makes the DiT of `expert` (`None`: the only one) current in `dits`, returning the bytes
    /// of the weights read for it (0 for a resident one).
    fn switch_dit(&self, dits: &mut RunDits, plan: DitPlan, expert: Option<Expert>) -> Result<u64> {
        let bytes = WeightBytes::default();
        match dits {
            RunDits::Streamed(dit) => {
                // Free the previous expert before the next one is read.
                *dit = None;
                *dit = Some(Box::new(self.load_planned_dit(plan, expert, &bytes)?));
            }
            RunDits::Resident { dits, current } => {
                self.prepare_resident_dit(dits, plan, expert, &bytes)?;
                *current = expert;
            }
        }
        Ok(bytes.get())
    }

    /// Loads the resident DiT of `expert` if its slot is empty (its base weights, counted into
    /// `bytes`), then gives it the pipeline's adapters and the plan's top-k.
    fn prepare_resident_dit(
        &self,
        dits: &mut ResidentDits,
        plan: DitPlan,
        expert: Option<Expert>,
        bytes: &WeightBytes,
    ) -> Result<()> {
        let (source, attention) = self.planned_dit(plan, expert);
        if dits.slot(expert).is_none() {
            log_expert_load(expert);
            let model = self.load_dit(source, &attention, bytes, self.quant_linear)?;
            let settings = self.dit_settings(attention);
            *dits.slot(expert) = Some(ResidentDit::new(model, settings, bytes.get()));
            dits.count_bytes();
        }
        let resident = dits.slot(expert).as_mut().expect("loaded above");
        resident.switch_loras(&self.loras.for_expert(expert))?;
        // The model keeps the top-k of the last step it ran (a schedule's last value).
        match attention.kind.topk() {
            Some(topk) => resident.model.set_attention_topk(topk),
            None => Ok(()),
        }
    }

    /// The DiT that runs `expert` (`None`: the only one), counting its weights into `bytes`.
    fn load_planned_dit(
        &self,
        dits: DitPlan,
        expert: Option<Expert>,
        bytes: &WeightBytes,
    ) -> Result<Dit> {
        let (source, attention) = self.planned_dit(dits, expert);
        log_expert_load(expert);
        self.load_adapted_dit(source, &attention, bytes, expert)
    }

    /// The weights and the attention of the DiT that runs `expert`.
    fn planned_dit(
        &self,
        dits: DitPlan,
        expert: Option<Expert>,
    ) -> (&WeightSource, AttentionConfig) {
        match (dits, expert) {
            (DitPlan::Single(attention), _) => (&self.models.dit_weights, attention),
            (DitPlan::Experts { attention, .. }, Some(Expert::HighNoise) | None) => {
                (&self.models.dit_weights, attention[0])
            }
            (DitPlan::Experts { attention, .. }, Some(Expert::LowNoise)) => (
                self.models
                    .dit_low_noise_weights
                    .as_ref()
                    .expect("checked when planning"),
                attention[1],
            ),
        }
    }

    pub(super) fn load_dit(
        &self,
        weights: &WeightSource,
        attention: &AttentionConfig,
        bytes: &WeightBytes,
        quant_linear: QuantPolicy,
    ) -> Result<Dit> {
        let load = || match weights {
            WeightSource::File(path) => WanModel::from_checkpoint_through(
                path,
                Some(&self.models.dit),
                attention,
                quant_linear,
                self.dtype,
                &self.device,
                |vb| bytes.counting(vb),
            ),
            source @ WeightSource::Random(_) => WanModel::load_with_quant(
                bytes.counting(self.var_builder(source, self.dtype)?),
                &self.models.dit,
                attention,
                quant_linear,
            ),
        };
        timed_load("the DiT", || Ok((load()?, bytes.get()))).map(|(dit, _)| dit)
    }
}

fn log_expert_load(expert: Option<Expert>) {
    if let Some(expert) = expert {
        tracing::info!("loading the {} expert", expert.name());
    }
}

/// Reads a weight file once on a background thread (its pages stay in the OS page cache for
/// the memory-mapped load that follows), returning the bytes read; `None` for random weights.
fn prefetch_file(source: &WeightSource) -> Option<JoinHandle<std::io::Result<u64>>> {
    let WeightSource::File(path) = source else {
        return None;
    };
    let path = path.clone();
    Some(std::thread::spawn(move || read_through(&path)))
}

/// Reads `path` to its end in 16 MiB pieces, keeping nothing.
fn read_through(path: &Path) -> std::io::Result<u64> {
    let mut file = std::fs::File::open(path)?;
    let mut buffer = vec![0u8; 16 << 20];
    let mut total = 0u64;
    loop {
        match file.read(&mut buffer)? {
            0 => return Ok(total),
            n => total += n as u64,
        }
    }
}

/// Waits for a [`prefetch_file`] read of `what`: usually done long before (it overlaps other
/// work). A failed read only costs speed (the load that follows reports real errors), so it is
/// a warning.
pub(super) fn finish_prefetch(read: Option<JoinHandle<std::io::Result<u64>>>, what: &str) {
    match read.map(JoinHandle::join) {
        Some(Ok(Err(error))) => tracing::warn!("prefetching {what} failed: {error}"),
        Some(Err(_)) => tracing::warn!("prefetching {what} panicked"),
        _ => {}
    }
}

impl Pipeline {
    /// Hands a finished step to `progress`; a cancel there ends the run, on every rank of a
    /// multi-GPU run (a rank that went on alone would wait for the others forever).
    fn report_step(&self, progress: &mut dyn Progress, report: &StepReport) -> Result<()> {
        let cancel = progress.step_done(report).is_break();
        match self.ranks.any(&self.device, cancel)? {
            false => Ok(()),
            true => Err(Error::Cancelled {
                completed: report.index + 1,
                total: report.total,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::{demo_request, Residency};
    use candle_core::DType;
    use turbo_attention::AttentionKind;

    #[test]
    fn prefetch_reads_the_whole_file_and_skips_random_weights() {
        let dir = std::env::temp_dir().join(format!("turbo-prefetch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("expert.safetensors");
        let size = (16 << 20) + 12_345;
        std::fs::write(&path, vec![7u8; size]).unwrap();
        let reader = prefetch_file(&WeightSource::File(path)).expect("a file is prefetched");
        assert_eq!(reader.join().unwrap().unwrap(), size as u64);
        let random = WeightSource::Random(super::super::RandomCheckpoint::new(0, []));
        assert!(prefetch_file(&random).is_none());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The demo pipeline with its DiT read from a `.pth` file, every model resident.
    fn resident_demo_from_file(dir: &Path) -> Pipeline {
        let demo = Pipeline::demo(
            3,
            AttentionConfig::new(AttentionKind::Original),
            Device::Cpu,
        );
        let demo = demo.unwrap();
        let mut models = demo.models().clone();
        let WeightSource::Random(random) = &models.dit_weights else {
            panic!("the demo has random weights")
        };
        let path = dir.join("dit.pth");
        random.save_pth(&path, DType::F32, &Device::Cpu).unwrap();
        models.dit_weights = WeightSource::File(path);
        let attention = AttentionConfig::new(AttentionKind::Original);
        let tokenizer = demo.tokenizer().clone();
        Pipeline::from_parts(models, tokenizer, attention, Device::Cpu, DType::F32)
            .unwrap()
            .with_residency(Residency::ALL)
    }

    #[test]
    fn a_resident_dits_file_is_not_read_ahead() {
        let dir = tempfile::tempdir().unwrap();
        let pipeline = resident_demo_from_file(dir.path());
        let request = crate::T2vRequest {
            frames: 5,
            ..demo_request("a heron")
        };
        let prefetch = |pipeline: &Pipeline| {
            let plan = pipeline.plan(&request).unwrap().denoise;
            pipeline.prefetch_dit(plan.dits, plan.first_expert())
        };
        let before = prefetch(&pipeline).expect("nothing is resident before the first request");
        finish_prefetch(Some(before), "the DiT");
        pipeline.text_to_video(&request).unwrap();
        assert!(
            prefetch(&pipeline).is_none(),
            "the resident DiT's file was read"
        );
        // Other load settings reload the DiT, so its file is read ahead again.
        let sla = pipeline
            .with_attention(AttentionKind::sla(0.5).unwrap())
            .unwrap();
        assert!(prefetch(&sla).is_some());
    }
}
