//! The teacher samplers: many-step flow-matching solvers over a shifted sigma grid, as the
//! official Wan code runs the undistilled models (`spec/sampling.md` §3).

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use turbo_core::{Denoiser, Error, NoiseSource, Progress, Result, StepReport, Timestep};

use crate::dpm_solver::DpmSolverPp;
use crate::euler::Euler;
use crate::report_step;
use crate::schedule::FlowSchedule;
use crate::solver::SolverStep;
use crate::unipc::UniPc;

/// Which flow-matching solver a [`FlowSampler`] runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FlowSolver {
    /// UniPC, bh2, order 2, predicting x₀: Wan's default (`--sample_solver unipc`).
    #[default]
    UniPc,
    /// DPM-Solver++ 2M, midpoint (`--sample_solver dpm++`).
    DpmSolverPp,
    /// First-order Euler: not an official Wan solver, handy for tests and baselines.
    Euler,
}

impl FlowSolver {
    /// The name that parses back to this solver: `unipc`, `dpm++` or `euler`.
    pub fn name(self) -> &'static str {
        match self {
            Self::UniPc => "unipc",
            Self::DpmSolverPp => "dpm++",
            Self::Euler => "euler",
        }
    }

    fn state(self) -> Box<dyn SolverStep> {
        match self {
            Self::UniPc => Box::new(UniPc::default()),
            Self::DpmSolverPp => Box::new(DpmSolverPp::default()),
            Self::Euler => Box::new(Euler),
        }
    }
}

impl fmt::Display for FlowSolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FlowSolver {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "unipc" => Ok(Self::UniPc),
            "dpm++" | "dpmpp" | "dpm-solver++" => Ok(Self::DpmSolverPp),
            "euler" => Ok(Self::Euler),
            _ => Err(Error::InvalidSamplerSetting {
                setting: "flow-matching solver",
                value: s.to_owned(),
                expected: "`unipc`, `dpm++` or `euler`",
            }),
        }
    }
}

/// A flow-matching teacher sampler: a [`FlowSolver`] over a [`FlowSchedule`].
///
/// The state starts at the unscaled noise ε and is kept in f32, as upstream. Classifier-free
/// guidance is not built in: wrap the model in [`Guided`](crate::Guided).
#[derive(Debug, Clone)]
pub struct FlowSampler {
    solver: FlowSolver,
    schedule: FlowSchedule,
    timesteps: Vec<Timestep>,
}

impl FlowSampler {
    pub fn new(solver: FlowSolver, schedule: FlowSchedule) -> Self {
        let timesteps = schedule.timesteps();
        Self {
            solver,
            schedule,
            timesteps,
        }
    }

    /// The solver on the grid official Wan pairs it with: DPM-Solver++ on
    /// [`FlowSchedule::wan_dpm_solver`], UniPC and Euler on [`FlowSchedule::wan_unipc`].
    pub fn wan(solver: FlowSolver, steps: usize, shift: f64) -> Result<Self> {
        let schedule = match solver {
            FlowSolver::DpmSolverPp => FlowSchedule::wan_dpm_solver(steps, shift)?,
            FlowSolver::UniPc | FlowSolver::Euler => FlowSchedule::wan_unipc(steps, shift)?,
        };
        Ok(Self::new(solver, schedule))
    }

    pub fn solver(&self) -> FlowSolver {
        self.solver
    }

    pub fn schedule(&self) -> &FlowSchedule {
        &self.schedule
    }

    /// The time of each network evaluation, in order.
    pub fn timesteps(&self) -> &[Timestep] {
        &self.timesteps
    }

    /// Runs every step from noise of `shape` drawn on `device` and returns the sample in f32.
    /// Reports each step to `progress`; a cancel there ends the run with [`Error::Cancelled`].
    pub fn sample<D: Denoiser + ?Sized>(
        &self,
        denoiser: &D,
        cond: &D::Condition,
        noise: &mut dyn NoiseSource,
        shape: &[usize],
        device: &Device,
        progress: &mut dyn Progress,
    ) -> Result<Tensor> {
        let mut run = self.start(noise, shape, device)?;
        while let Some(report) = run.step(denoiser, cond)? {
            report_step(progress, &report)?;
        }
        Ok(run.finish())
    }

    /// Starts a run step by step (for callers that swap experts between steps): x = ε.
    pub fn start(
        &self,
        noise: &mut dyn NoiseSource,
        shape: &[usize],
        device: &Device,
    ) -> Result<FlowRun<'_>> {
        Ok(FlowRun {
            sampler: self,
            solver: self.solver.state(),
            x: noise.standard_normal(shape, device)?,
            next: 0,
            started: Instant::now(),
        })
    }
}

/// A teacher run in progress, advanced one network evaluation at a time.
pub struct FlowRun<'a> {
    sampler: &'a FlowSampler,
    solver: Box<dyn SolverStep>,
    x: Tensor,
    next: usize,
    started: Instant,
}

impl FlowRun<'_> {
    /// The index of the step [`step`](Self::step) runs next, or `None` once all have run.
    pub fn next_step(&self) -> Option<usize> {
        (self.next < self.sampler.timesteps.len()).then_some(self.next)
    }

    /// Runs the next step, or returns `None` when every step has run.
    pub fn step<D: Denoiser + ?Sized>(
        &mut self,
        denoiser: &D,
        cond: &D::Condition,
    ) -> Result<Option<StepReport>> {
        let Some(i) = self.next_step() else {
            return Ok(None);
        };
        let t = self.sampler.timesteps[i];
        let v = denoiser.velocity(&self.x, t, cond)?.to_dtype(DType::F32)?;
        self.x = self
            .solver
            .step(self.sampler.schedule.sigmas(), i, &self.x, &v)?;
        self.next += 1;
        Ok(Some(StepReport {
            index: i,
            total: self.sampler.timesteps.len(),
            s: t.s,
            elapsed: self.started.elapsed(),
        }))
    }

    /// The f32 state: the noisy latent at the next step's time.
    pub fn state(&self) -> &Tensor {
        &self.x
    }

    /// Replaces the state between steps (TI2V writes its image latent back into frame 0 after
    /// every step); `x` must have the state's shape.
    pub fn set_state(&mut self, x: &Tensor) -> Result<()> {
        self.x = checked_state(&self.x, x)?.to_dtype(DType::F32)?;
        Ok(())
    }

    /// The f32 state: the sample once every step has run.
    pub fn finish(self) -> Tensor {
        self.x
    }
}

impl fmt::Debug for FlowRun<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FlowRun")
            .field("solver", &self.sampler.solver)
            .field("next", &self.next)
            .field("x", &self.x)
            .finish()
    }
}

/// `new`, when it has the shape of the state `current`.
pub(crate) fn checked_state<'a>(current: &Tensor, new: &'a Tensor) -> Result<&'a Tensor> {
    if new.dims() == current.dims() {
        Ok(new)
    } else {
        Err(Error::Shape {
            what: "sampler state".into(),
            expected: format!("{:?}", current.dims()),
            got: new.dims().to_vec(),
        })
    }
}
