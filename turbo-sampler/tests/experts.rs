//! Two-expert switching (Wan2.2 A14B): which expert runs each step of the rCM and teacher
//! schedules, the switch step known before sampling, and swapping experts between steps.

use std::cell::RefCell;
use std::rc::Rc;

use candle_core::{Device, Tensor};
use turbo_core::{Denoiser, Error, NoProgress, Result, SeededNoise, Timestep};
use turbo_sampler::{
    Expert, ExpertBoundary, FlowSampler, FlowSolver, RcmConfig, RcmSampler, TwoExperts,
    I2V_A14B_BOUNDARY, T2V_A14B_BOUNDARY,
};

/// v = scale·x, logging which expert ran.
struct Tagged {
    expert: Expert,
    scale: f64,
    log: Rc<RefCell<Vec<Expert>>>,
}

impl Denoiser for Tagged {
    type Condition = ();

    fn velocity(&self, x: &Tensor, _: Timestep, _: &()) -> Result<Tensor> {
        self.log.borrow_mut().push(self.expert);
        Ok(x.affine(self.scale, 0.0)?)
    }
}

fn experts(log: &Rc<RefCell<Vec<Expert>>>, boundary: f64) -> TwoExperts<Tagged> {
    let tagged = |expert, scale| Tagged {
        expert,
        scale,
        log: log.clone(),
    };
    TwoExperts::new(
        ExpertBoundary::new(boundary).unwrap(),
        tagged(Expert::HighNoise, 0.3),
        tagged(Expert::LowNoise, -0.2),
    )
}

const SHAPE: [usize; 3] = [2, 3, 4];

fn sample_rcm(sampler: &RcmSampler, denoiser: &impl Denoiser<Condition = ()>) -> Result<Tensor> {
    sampler.sample(
        denoiser,
        &(),
        &mut SeededNoise::new(5),
        &SHAPE,
        &Device::Cpu,
        &mut NoProgress,
    )
}

/// `spec/sampling.md` §2.7: with σ_max 200 and boundary 0.9, H / HH / HHL / HHLL.
#[test]
fn rcm_i2v_expert_order_matches_the_spec_table() {
    use Expert::{HighNoise as H, LowNoise as L};
    let tables: [&[Expert]; 4] = [&[H], &[H, H], &[H, H, L], &[H, H, L, L]];
    for (steps, expected) in (1..=4).zip(tables) {
        let sampler = RcmSampler::new(RcmConfig::i2v(steps)).unwrap();
        let log = Rc::new(RefCell::new(Vec::new()));
        let experts = experts(&log, I2V_A14B_BOUNDARY);
        let boundary = experts.boundary();
        sample_rcm(&sampler, &experts).unwrap();
        assert_eq!(log.borrow().as_slice(), expected, "{steps} steps");
        let switch = expected.iter().position(|&e| e == L);
        assert_eq!(boundary.switch_step(sampler.timesteps()), switch);
        assert_eq!(boundary.is_needed(L, sampler.timesteps()), switch.is_some());
    }
}

/// `spec/sampling.md` §3.8: 40 steps at shift 12 (T2V) run 26 high-noise steps; at shift 5
/// (I2V) 15.
#[test]
fn teacher_switch_steps_match_wan22() {
    for (shift, boundary, high_steps) in
        [(12.0, T2V_A14B_BOUNDARY, 26), (5.0, I2V_A14B_BOUNDARY, 15)]
    {
        let sampler = FlowSampler::wan(FlowSolver::UniPc, 40, shift).unwrap();
        let boundary = ExpertBoundary::new(boundary).unwrap();
        assert_eq!(boundary.switch_step(sampler.timesteps()), Some(high_steps));
        // Upstream's rule on the integer timesteps: high noise while t ≥ 1000·boundary.
        let upstream = sampler
            .schedule()
            .model_timesteps()
            .iter()
            .take_while(|&&t| t as f64 >= boundary.value() * 1000.0)
            .count();
        assert_eq!(upstream, high_steps);
    }
}

#[test]
fn a_missing_expert_is_a_typed_error() {
    let log = Rc::new(RefCell::new(Vec::new()));
    let mut experts = experts(&log, I2V_A14B_BOUNDARY);
    experts.unload(Expert::LowNoise).unwrap();
    // Two steps never need the low-noise expert.
    sample_rcm(&RcmSampler::new(RcmConfig::i2v(2)).unwrap(), &experts).unwrap();
    let result = sample_rcm(&RcmSampler::new(RcmConfig::i2v(3)).unwrap(), &experts);
    assert!(
        matches!(
            result,
            Err(Error::ExpertNotLoaded {
                expert: "low-noise",
                ..
            })
        ),
        "{result:?}"
    );
}

/// Holding one expert at a time, swapped at the switch step, gives the same sample as holding
/// both.
#[test]
fn swapping_experts_between_steps_matches_holding_both() {
    let sampler = RcmSampler::new(RcmConfig::i2v(4)).unwrap();
    let log = Rc::new(RefCell::new(Vec::new()));
    let both = sample_rcm(&sampler, &experts(&log, I2V_A14B_BOUNDARY)).unwrap();

    let mut full = experts(&log, I2V_A14B_BOUNDARY);
    let low = full.unload(Expert::LowNoise).unwrap();
    let mut held = full;
    let switch = held.boundary().switch_step(sampler.timesteps()).unwrap();
    let mut noise = SeededNoise::new(5);
    let mut run = sampler.start(&mut noise, &SHAPE, &Device::Cpu).unwrap();
    let mut pending_low = Some(low);
    while let Some(step) = run.next_step() {
        if step == switch {
            held.unload(Expert::HighNoise).unwrap();
            held.load(Expert::LowNoise, pending_low.take().unwrap());
        }
        run.step(&held, &(), &mut noise).unwrap().unwrap();
    }
    assert!(run.step(&held, &(), &mut noise).unwrap().is_none());
    let swapped = run.finish().unwrap();
    let difference = (both - swapped).unwrap().abs().unwrap().max_all().unwrap();
    assert_eq!(difference.to_scalar::<f32>().unwrap(), 0.0);
    assert!(!held.is_loaded(Expert::HighNoise));
}

#[test]
fn boundaries_outside_zero_one_are_rejected() {
    for boundary in [-0.1, 1.5, f64::NAN] {
        assert!(matches!(
            ExpertBoundary::new(boundary),
            Err(Error::InvalidSamplerSetting { .. })
        ));
    }
}
