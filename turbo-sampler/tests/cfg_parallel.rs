//! CFG parallelism on two simulated ranks: the guided velocity and a whole guided teacher run
//! are bit for bit those of one device, on both ranks.

use candle_core::{Device, Tensor};
use turbo_core::parallel::simulate;
use turbo_core::{Denoiser, Error, NoProgress, Result, SeededNoise, Timestep};
use turbo_sampler::{CfgParallel, ExpertBoundary, FlowSampler, FlowSolver, GuidanceScale, Guided};

const SHAPE: [usize; 4] = [2, 3, 4, 5];

/// A model whose velocity depends on x, t and the condition (a pull towards `target`).
struct Pull;

impl Denoiser for Pull {
    type Condition = f64;

    fn velocity(&self, x: &Tensor, t: Timestep, target: &f64) -> Result<Tensor> {
        Ok(x.affine(1.0 / t.s, -target / t.s)?.sin()?)
    }
}

fn guided_run(denoiser: &impl Denoiser<Condition = f64>) -> Result<Tensor> {
    FlowSampler::wan(FlowSolver::UniPc, 4, 3.0)?.sample(
        denoiser,
        &1.5,
        &mut SeededNoise::new(3),
        &SHAPE,
        &Device::Cpu,
        &mut NoProgress,
    )
}

#[test]
fn cfg_parallel_run_equals_the_one_device_run_on_both_ranks() {
    let negative = -0.5;
    let scales = [
        GuidanceScale::Constant(5.0),
        GuidanceScale::PerExpert {
            boundary: ExpertBoundary::new(0.9).unwrap(),
            high: 3.0,
            low: 4.0,
        },
    ];
    for scale in scales {
        let one_device = guided_run(&Guided::new(&Pull, &negative, scale).unwrap()).unwrap();
        let per_rank = simulate(2, |comm| {
            guided_run(&CfgParallel::new(&Pull, &negative, scale, comm)?)
        })
        .unwrap();
        for sample in per_rank {
            let diff = (&sample - &one_device)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap();
            assert_eq!(diff.to_scalar::<f32>().unwrap(), 0.0, "{scale:?}");
        }
    }
}

#[test]
fn cfg_parallel_needs_two_ranks() {
    for world in [1, 3] {
        let err = simulate(world, |comm| {
            CfgParallel::new(&Pull, &0.0, GuidanceScale::Constant(5.0), comm).map(|_| ())
        })
        .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    }
}
