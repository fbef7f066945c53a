//! The rCM sampler: its schedules against the `rcm_t2v_sla` golden config, the update rule
//! against a plain-f64 twin of `spec/sampling.md` §2.8 on the file's injected noise, and the
//! invariants of the rule with synthetic denoisers.

use std::cell::{Cell, RefCell};
use std::ops::ControlFlow;

use candle_core::{Device, Tensor};
use proptest::prelude::*;
use turbo_core::golden::GoldenFile;
use turbo_core::{
    Denoiser, Error, NoProgress, NoiseSource, Result, SeededNoise, StepReport, Timestep,
};
use turbo_sampler::golden::{relative_error, RcmGolden};
use turbo_sampler::{rcm_model_time, RcmConfig, RcmMode, RcmSampler};

/// v = a·x + b with a = 0.7·τ/1000 and b = 0.05·τ/1000 (τ the model time), in f32.
struct AffineField {
    calls: Cell<usize>,
}

impl AffineField {
    fn new() -> Self {
        Self {
            calls: Cell::new(0),
        }
    }

    fn coefficients(model_time: f64) -> (f32, f32) {
        let tau = model_time as f32 / 1000.0;
        (0.7 * tau, 0.05 * tau)
    }
}

impl Denoiser for AffineField {
    type Condition = ();

    fn velocity(&self, x: &Tensor, t: Timestep, _: &()) -> Result<Tensor> {
        self.calls.set(self.calls.get() + 1);
        let (a, b) = Self::coefficients(t.model_time);
        Ok(x.affine(a.into(), b.into())?)
    }
}

/// The exact velocity when all data is the point `data`: x̂₀ = x − s·v = data at every step.
struct PointMass {
    data: Tensor,
}

impl Denoiser for PointMass {
    type Condition = ();

    fn velocity(&self, x: &Tensor, t: Timestep, _: &()) -> Result<Tensor> {
        Ok((x - &self.data)?.affine(1.0 / t.s, 0.0)?)
    }
}

/// The spec's pseudo-steps on plain f64 values: x = s₀·ε₀; per step v = f32 field at f32(x),
/// x̂₀ = x − s·v, then x = (1 − s')·x̂₀ + s'·z (SDE) or x = x − (s − s')·v (ODE).
fn reference_rcm(s: &[f64], model_times: &[f64], noise: &[Vec<f32>], mode: RcmMode) -> Vec<f32> {
    let mut x: Vec<f64> = noise[0].iter().map(|&e| s[0] * f64::from(e)).collect();
    for (k, &model_time) in model_times.iter().enumerate() {
        let (a, b) = AffineField::coefficients(model_time);
        for (i, xi) in x.iter_mut().enumerate() {
            let v = f64::from((*xi as f32) * a + b);
            *xi = match mode {
                RcmMode::Sde => {
                    let x0 = *xi - s[k] * v;
                    (1.0 - s[k + 1]) * x0 + s[k + 1] * f64::from(noise[k + 1][i])
                }
                RcmMode::Ode => *xi - (s[k] - s[k + 1]) * v,
            };
        }
    }
    x.into_iter().map(|v| v as f32).collect()
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1().unwrap()
}

fn rcm_golden() -> GoldenFile {
    GoldenFile::open("rcm_t2v_sla").unwrap()
}

/// Every schedule the golden config lists (`sigma_max=<σ>,steps=<N>`): s values and bf16
/// model times reproduced exactly.
#[test]
fn schedules_match_the_golden_config() {
    let file = rcm_golden();
    let schedules = file
        .config_value(&["schedules"])
        .unwrap()
        .as_object()
        .unwrap();
    assert!(!schedules.is_empty());
    for (key, schedule) in schedules {
        let setting = |name: &str| -> f64 {
            key.split(',')
                .find_map(|part| part.strip_prefix(name)?.strip_prefix('='))
                .unwrap_or_else(|| panic!("schedule key `{key}` has no `{name}`"))
                .parse()
                .unwrap()
        };
        let values = |name: &str| -> Vec<f64> {
            schedule[name]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_f64().unwrap())
                .collect()
        };
        let config = RcmConfig {
            steps: setting("steps") as usize,
            sigma_max: setting("sigma_max"),
            ..RcmConfig::t2v(1)
        };
        let sampler = RcmSampler::new(config).unwrap();
        assert_eq!(sampler.s_values(), values("s"), "{key}: s");
        let model_times: Vec<f64> = sampler.timesteps().iter().map(|t| t.model_time).collect();
        assert_eq!(model_times, values("timesteps"), "{key}: timesteps");
        let s: Vec<f64> = sampler.timesteps().iter().map(|t| t.s).collect();
        assert_eq!(s, values("s")[..config.steps], "{key}: the update's s");
    }
}

/// The spec's table of bf16 model times (`spec/sampling.md` §2.1, §2.5).
#[test]
fn model_times_round_through_bf16() {
    let cases = [
        (80.0 / 81.0, 988.0),
        (200.0 / 201.0, 996.0),
        (1600.0 / 1601.0, 1000.0),
        (0.933781061416858, 932.0),
        (0.852895394823775, 852.0),
        (0.608979049230431, 608.0),
    ];
    for (s, expected) in cases {
        assert_eq!(rcm_model_time(s), expected, "s = {s}");
    }
}

/// The harness the DiT parity test uses, run with a synthetic field on the golden file's noise:
/// it must read the file's step count, σ_max and noise, and sample exactly the spec's rule.
#[test]
fn golden_harness_runs_the_spec_rule_on_the_injected_noise() {
    let file = rcm_golden();
    let case = RcmGolden::from_file(&file).unwrap();
    let steps = file.config_f64(&["steps"]).unwrap() as usize;
    assert_eq!(case.sampler.config().steps, steps);
    assert_eq!(case.sampler.config().mode, RcmMode::Sde);
    assert_eq!(case.noise.len(), steps + 1);
    let s = case.sampler.s_values().to_vec();
    let model_times: Vec<f64> = case
        .sampler
        .timesteps()
        .iter()
        .map(|t| t.model_time)
        .collect();
    let noise: Vec<Vec<f32>> = case.noise.iter().map(flat).collect();
    let expected = reference_rcm(&s, &model_times, &noise, RcmMode::Sde);

    let field = AffineField::new();
    let outcome = case.run(&field, &()).unwrap();
    assert_eq!(field.calls.get(), steps);
    assert_eq!(outcome.latent.dims(), outcome.expected.dims());
    let twin = Tensor::from_vec(expected, outcome.latent.dims(), &Device::Cpu).unwrap();
    let error = relative_error(&outcome.latent, &twin).unwrap();
    assert!(error <= 1e-6, "relative error to the f64 twin {error:e}");
}

/// Counts the tensors drawn from a seeded source.
struct CountingNoise {
    inner: SeededNoise,
    draws: usize,
}

impl NoiseSource for CountingNoise {
    fn standard_normal(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        self.draws += 1;
        self.inner.standard_normal(shape, device)
    }
}

const SHAPE: [usize; 4] = [2, 3, 4, 5];

fn mode_strategy() -> impl Strategy<Value = RcmMode> {
    prop_oneof![Just(RcmMode::Sde), Just(RcmMode::Ode)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// With the exact velocity of a point mass every step predicts it, so both modes end on it,
    /// for every step count and σ_max; SDE draws steps + 1 tensors, ODE only the first.
    #[test]
    fn point_mass_is_recovered(
        steps in 1usize..=4,
        sigma_max in 0.5f64..2000.0,
        mode in mode_strategy(),
        seed in any::<u64>(),
    ) {
        let data = SeededNoise::new(seed ^ 1).standard_normal(&SHAPE, &Device::Cpu).unwrap();
        let sampler = RcmSampler::new(RcmConfig { steps, sigma_max, mode, ..RcmConfig::t2v(1) })
            .unwrap();
        let mut noise = CountingNoise { inner: SeededNoise::new(seed), draws: 0 };
        let latent = sampler
            .sample(&PointMass { data: data.clone() }, &(), &mut noise, &SHAPE, &Device::Cpu,
                &mut NoProgress)
            .unwrap();
        let error = relative_error(&latent, &data).unwrap();
        prop_assert!(error < 1e-5, "relative error {error:e}");
        let expected_draws = match mode { RcmMode::Sde => steps + 1, RcmMode::Ode => 1 };
        prop_assert_eq!(noise.draws, expected_draws);
    }

    /// On random data the sampler follows the f64 twin of the spec's rule.
    #[test]
    fn follows_the_reference_rule(
        steps in 1usize..=4,
        sigma_max in 1.0f64..500.0,
        mode in mode_strategy(),
        seed in any::<u64>(),
    ) {
        let sampler = RcmSampler::new(RcmConfig { steps, sigma_max, mode, ..RcmConfig::t2v(1) })
            .unwrap();
        let mut seeded = SeededNoise::new(seed);
        let noise: Vec<Tensor> = (0..=steps)
            .map(|_| seeded.standard_normal(&SHAPE, &Device::Cpu).unwrap())
            .collect();
        let mut replay = turbo_core::ReplayNoise::new(noise.clone());
        let latent = sampler
            .sample(&AffineField::new(), &(), &mut replay, &SHAPE, &Device::Cpu, &mut NoProgress)
            .unwrap();
        let model_times: Vec<f64> = sampler.timesteps().iter().map(|t| t.model_time).collect();
        let noise: Vec<Vec<f32>> = noise.iter().map(flat).collect();
        let expected = reference_rcm(sampler.s_values(), &model_times, &noise, mode);
        let got = flat(&latent);
        for (g, e) in got.iter().zip(&expected) {
            prop_assert!((g - e).abs() <= 1e-6 * (1.0 + e.abs()), "{g} vs {e}");
        }
    }
}

#[test]
fn same_seed_same_sample() {
    let sampler = RcmSampler::new(RcmConfig::t2v(4)).unwrap();
    let sample = |seed| {
        flat(
            &sampler
                .sample(
                    &AffineField::new(),
                    &(),
                    &mut SeededNoise::new(seed),
                    &SHAPE,
                    &Device::Cpu,
                    &mut NoProgress,
                )
                .unwrap(),
        )
    };
    assert_eq!(sample(3), sample(3));
    assert_ne!(sample(3), sample(4));
}

#[test]
fn step_counts_outside_one_to_four_are_rejected() {
    for steps in [0, 5, 50] {
        let result = RcmSampler::new(RcmConfig::t2v(steps));
        assert!(
            matches!(
                result,
                Err(Error::InvalidSamplerSetting {
                    setting: "rCM steps",
                    ..
                })
            ),
            "{steps} steps: {result:?}"
        );
    }
    for sigma_max in [0.0, -1.0, f64::NAN, f64::INFINITY] {
        let config = RcmConfig {
            sigma_max,
            ..RcmConfig::i2v(2)
        };
        assert!(RcmSampler::new(config).is_err(), "sigma_max {sigma_max}");
    }
    let config = RcmConfig {
        mid_t: [1.5, 0.0, 1.0],
        ..RcmConfig::t2v(3)
    };
    assert!(RcmSampler::new(config).is_err());
}

#[test]
fn progress_sees_every_step_and_can_cancel() {
    let sampler = RcmSampler::new(RcmConfig::i2v(4)).unwrap();
    let reports = RefCell::new(Vec::<StepReport>::new());
    let mut observer = |report: &StepReport| {
        reports.borrow_mut().push(*report);
        ControlFlow::Continue(())
    };
    let run = |progress: &mut dyn turbo_core::Progress, field: &AffineField| {
        sampler.sample(
            field,
            &(),
            &mut SeededNoise::new(0),
            &SHAPE,
            &Device::Cpu,
            progress,
        )
    };
    run(&mut observer, &AffineField::new()).unwrap();
    let reports = reports.into_inner();
    assert_eq!(
        reports.iter().map(|r| r.index).collect::<Vec<_>>(),
        [0, 1, 2, 3]
    );
    assert!(reports.iter().all(|r| r.total == 4));
    let s: Vec<f64> = reports.iter().map(|r| r.s).collect();
    assert_eq!(s, sampler.s_values()[..4]);
    assert!(reports.windows(2).all(|w| w[0].elapsed <= w[1].elapsed));

    let field = AffineField::new();
    let mut cancel_after_two = |report: &StepReport| {
        if report.index == 1 {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let result = run(&mut cancel_after_two, &field);
    assert!(matches!(
        result,
        Err(Error::Cancelled {
            completed: 2,
            total: 4
        })
    ));
    assert_eq!(field.calls.get(), 2);
}
