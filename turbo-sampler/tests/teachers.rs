//! Invariants of the teacher samplers (UniPC, DPM-Solver++, Euler), their schedules and
//! classifier-free guidance. Parity with upstream is in `flow_solvers_golden.rs`.

use std::cell::Cell;
use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use turbo_core::{
    Denoiser, Error, NoProgress, NoiseSource, Result, SeededNoise, StepReport, Timestep,
};
use turbo_sampler::golden::relative_error;
use turbo_sampler::{
    ExpertBoundary, FlowSampler, FlowSchedule, FlowSolver, GuidanceScale, Guided,
    WAN_NEGATIVE_PROMPT,
};

const SHAPE: [usize; 4] = [2, 3, 4, 5];

/// The exact velocity when all data is the point `data`.
struct PointMass {
    data: Tensor,
    calls: Cell<usize>,
}

impl Denoiser for PointMass {
    type Condition = ();

    fn velocity(&self, x: &Tensor, t: Timestep, _: &()) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        Ok((x - &self.data)?.affine(1.0 / t.s, 0.0)?)
    }
}

fn solver_strategy() -> impl Strategy<Value = FlowSolver> {
    prop_oneof![
        Just(FlowSolver::UniPc),
        Just(FlowSolver::DpmSolverPp),
        Just(FlowSolver::Euler)
    ]
}

fn sample(
    sampler: &FlowSampler,
    denoiser: &impl Denoiser<Condition = ()>,
    seed: u64,
) -> Result<Tensor> {
    sampler.sample(
        denoiser,
        &(),
        &mut SeededNoise::new(seed),
        &SHAPE,
        &Device::Cpu,
        &mut NoProgress,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Every solver ends on the data when the model predicts it exactly, one evaluation a step.
    #[test]
    fn point_mass_is_recovered(
        solver in solver_strategy(),
        steps in 1usize..30,
        shift in 1.0f64..12.0,
        seed in any::<u64>(),
    ) {
        let data = SeededNoise::new(!seed).standard_normal(&SHAPE, &Device::Cpu).unwrap();
        let model = PointMass { data: data.clone(), calls: Cell::new(0) };
        let sampler = FlowSampler::wan(solver, steps, shift).unwrap();
        let result = sample(&sampler, &model, seed).unwrap();
        let error = relative_error(&result, &data).unwrap();
        prop_assert!(error < 1e-5, "{solver} {steps} steps: relative error {error:e}");
        prop_assert_eq!(model.calls.get(), steps);
    }

    /// The grids decrease strictly to 0 from at most 1, and the model timesteps are the
    /// truncated 1000·σ.
    #[test]
    fn schedules_decrease_to_zero(steps in 1usize..200, shift in 0.2f64..20.0, from_one: bool) {
        let schedule = if from_one {
            FlowSchedule::wan_dpm_solver(steps, shift).unwrap()
        } else {
            FlowSchedule::wan_unipc(steps, shift).unwrap()
        };
        let sigmas = schedule.sigmas();
        prop_assert_eq!(sigmas.len(), steps + 1);
        prop_assert!(sigmas[0] <= 1.0);
        prop_assert_eq!(sigmas[steps], 0.0);
        prop_assert!(sigmas.windows(2).all(|w| w[0] > w[1]));
        for (&sigma, &t) in sigmas.iter().zip(schedule.model_timesteps()) {
            prop_assert!((f64::from(sigma) * 1000.0 - t as f64).abs() < 1.0 + 1e-3);
        }
        prop_assert!(schedule.model_timesteps().windows(2).all(|w| w[0] >= w[1]));
    }

    /// v = v_u + g·(v_c − v_u), with both passes at the same x and time.
    #[test]
    fn guidance_combines_both_passes(g in -2.0f64..10.0, s in 0.01f64..1.0, seed in any::<u64>()) {
        let mut noise = SeededNoise::new(seed);
        let x = noise.standard_normal(&SHAPE, &Device::Cpu).unwrap();
        let prompt = noise.standard_normal(&SHAPE, &Device::Cpu).unwrap();
        let negative = noise.standard_normal(&SHAPE, &Device::Cpu).unwrap();
        let t = Timestep { s, model_time: (s * 1000.0).trunc() };
        let guided = Guided::new(&ContextField, &negative, GuidanceScale::Constant(g)).unwrap();
        let v = guided.velocity(&x, t, &prompt).unwrap();
        let v_c = ContextField.velocity(&x, t, &prompt).unwrap();
        let v_u = ContextField.velocity(&x, t, &negative).unwrap();
        let expected = (&v_u + ((v_c - &v_u).unwrap() * g).unwrap()).unwrap();
        prop_assert!(relative_error(&v, &expected).unwrap() < 1e-6);
    }
}

/// v = s·x + context.
struct ContextField;

impl Denoiser for ContextField {
    type Condition = Tensor;

    fn velocity(&self, x: &Tensor, t: Timestep, context: &Tensor) -> Result<Tensor> {
        Ok((x.affine(t.s, 0.0)? + context)?)
    }
}

#[test]
fn per_expert_guidance_follows_the_boundary() {
    let scale = GuidanceScale::PerExpert {
        boundary: ExpertBoundary::new(0.875).unwrap(),
        high: 4.0,
        low: 3.0,
    };
    let at = |s| {
        scale.at(Timestep {
            s,
            model_time: s * 1000.0,
        })
    };
    assert_eq!(at(0.9), 4.0);
    assert_eq!(at(0.875), 4.0);
    assert_eq!(at(0.87), 3.0);
    let negative = Tensor::zeros(SHAPE.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap();
    assert!(Guided::new(&ContextField, &negative, GuidanceScale::Constant(f64::NAN)).is_err());
}

/// With a constant velocity, Euler moves x by −σ₀·v in total.
#[test]
fn euler_integrates_a_constant_field() {
    struct Constant;
    impl Denoiser for Constant {
        type Condition = ();
        fn velocity(&self, x: &Tensor, _: Timestep, _: &()) -> Result<Tensor> {
            Ok(x.ones_like()?.affine(0.5, 0.0)?)
        }
    }
    let sampler = FlowSampler::wan(FlowSolver::Euler, 20, 5.0).unwrap();
    let result = sample(&sampler, &Constant, 1).unwrap();
    let start = SeededNoise::new(1)
        .standard_normal(&SHAPE, &Device::Cpu)
        .unwrap();
    let sigma_0 = f64::from(sampler.schedule().sigmas()[0]);
    let expected = start.affine(1.0, -0.5 * sigma_0).unwrap();
    assert!(relative_error(&result, &expected).unwrap() < 1e-6);
}

#[test]
fn progress_can_cancel_a_teacher_run() {
    let sampler = FlowSampler::wan(FlowSolver::UniPc, 10, 5.0).unwrap();
    let data = Tensor::zeros(SHAPE.as_slice(), candle_core::DType::F32, &Device::Cpu).unwrap();
    let model = PointMass {
        data,
        calls: Cell::new(0),
    };
    let mut seen = Vec::new();
    let mut observer = |report: &StepReport| {
        seen.push((report.index, report.total, report.s));
        if report.index == 6 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = sampler.sample(
        &model,
        &(),
        &mut SeededNoise::new(0),
        &SHAPE,
        &Device::Cpu,
        &mut observer,
    );
    assert!(matches!(
        result,
        Err(Error::Cancelled {
            completed: 7,
            total: 10
        })
    ));
    assert_eq!(model.calls.get(), 7);
    let expected: Vec<_> = sampler.timesteps()[..7]
        .iter()
        .enumerate()
        .map(|(i, t)| (i, 10, t.s))
        .collect();
    assert_eq!(seen, expected);
}

#[test]
fn solvers_parse_from_their_names() {
    for solver in [
        FlowSolver::UniPc,
        FlowSolver::DpmSolverPp,
        FlowSolver::Euler,
    ] {
        assert_eq!(solver.to_string().parse::<FlowSolver>().unwrap(), solver);
    }
    assert!(matches!(
        "ddim".parse::<FlowSolver>(),
        Err(Error::InvalidSamplerSetting { .. })
    ));
}

/// Guards the constant against accidental edits (checked verbatim against `spec/sampling.md`
/// §3.3 when written).
#[test]
fn the_default_negative_prompt_is_wans() {
    assert!(WAN_NEGATIVE_PROMPT.starts_with("色调艳丽，过曝，静态"));
    assert!(WAN_NEGATIVE_PROMPT.ends_with("背景人很多，倒着走"));
    assert_eq!(
        WAN_NEGATIVE_PROMPT.chars().filter(|&c| c == '，').count(),
        27
    );
    assert_eq!(WAN_NEGATIVE_PROMPT.chars().count(), 137);
}
