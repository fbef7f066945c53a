//! CFG parallelism on simulated ranks: a whole guided teacher run is bit for bit that of one
//! device on every rank, with each pass on one rank or on a group of ranks computing it
//! together.

use candle_core::Shape;
use candle_core::{Device, Tensor};
use turbo_core::parallel::{simulate, Communicator, Group, Partition};
use turbo_core::{Denoiser, Error, NoProgress, Result, SeededNoise, Timestep};
use turbo_sampler::{
    cfg_pass_group, CfgParallel, ExpertBoundary, FlowSampler, FlowSolver, GuidanceScale, Guided,
};

const SHAPE: [usize; 4] = [2, 3, 4, 5];

/// A model whose velocity depends on x, t and the condition (a pull towards `target`).
struct Pull;

impl Denoiser for Pull {
    type Condition = f64;

    fn velocity(&self, x: &Tensor, t: Timestep, target: &f64) -> Result<Tensor> {
        Ok(x.affine(1.0 / t.s, -target / t.s)?.sin()?)
    }
}

/// [`Pull`] computed by the ranks of a group together, as a sequence-parallel DiT computes
/// its pass: each rank its share of the elements, gathered on every rank of the group.
struct GroupPull<'a>(&'a Group<'a>);

impl Denoiser for GroupPull<'_> {
    type Condition = f64;

    fn velocity(&self, x: &Tensor, t: Timestep, target: &f64) -> Result<Tensor> {
        let group = self.0;
        let flat = x.flatten_all()?;
        let split = Partition::balanced(flat.dim(0)?, group.world_size())?;
        let range = split.range(group.rank());
        let mine = Pull.velocity(&flat.narrow(0, range.start, range.len())?, t, target)?;
        let shapes: Vec<Shape> = split.sizes().iter().map(|&n| Shape::from(n)).collect();
        Ok(Tensor::cat(&group.all_gather(&mine, &shapes)?, 0)?.reshape(x.shape())?)
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
fn cfg_parallel_run_equals_the_one_device_run_on_every_rank() {
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
        // Two ranks: a whole pass each. Four and six: each pass on a group of two or three.
        for world in [2, 4, 6] {
            let per_rank = simulate(world, |comm| {
                let group = cfg_pass_group(comm)?;
                let pass = GroupPull(&group);
                guided_run(&CfgParallel::new(&pass, &negative, scale, comm)?)
            })
            .unwrap();
            for sample in per_rank {
                let diff = (&sample - &one_device)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap();
                assert_eq!(
                    diff.to_scalar::<f32>().unwrap(),
                    0.0,
                    "{scale:?}, {world} ranks"
                );
            }
        }
    }
}

#[test]
fn the_pass_groups_are_the_halves_of_the_ranks() {
    let members = simulate(6, |comm| Ok(cfg_pass_group(comm)?.members().to_vec())).unwrap();
    let (first, second) = ([0, 1, 2], [3, 4, 5]);
    assert_eq!(members, [first, first, first, second, second, second]);
}

#[test]
fn cfg_parallel_needs_an_even_number_of_ranks() {
    for world in [1, 3, 5] {
        let err = simulate(world, |comm| {
            CfgParallel::new(&Pull, &0.0, GuidanceScale::Constant(5.0), comm).map(|_| ())
        })
        .unwrap_err();
        assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
    }
}
