//! Parity of the teacher samplers with the `flow_solvers` golden file: official Wan UniPC and
//! DPM-Solver++ with shift and classifier-free guidance, driven by the synthetic velocity field
//! the file's config describes. Steps, shift, guidance and shapes come from the file.

use candle_core::{Device, Tensor};
use turbo_core::golden::GoldenFile;
use turbo_core::{Denoiser, NoProgress, ReplayNoise, Result, Timestep};
use turbo_sampler::golden::relative_error;
use turbo_sampler::{FlowSampler, FlowSolver, GuidanceScale, Guided};

/// The field of the file's `velocity` entry, with t the integer timestep handed to the model:
/// v_cond = 0.5·x·(t/1000) + c_cond, v_uncond = 0.3·x + c_uncond·(t/1000).
const VELOCITY: &str = "v_cond = 0.5*x*(t/1000) + c_cond; v_uncond = 0.3*x + c_uncond*(t/1000)";

enum Condition {
    Prompt(Tensor),
    NegativePrompt(Tensor),
}

struct SyntheticField;

impl Denoiser for SyntheticField {
    type Condition = Condition;

    fn velocity(&self, x: &Tensor, t: Timestep, cond: &Condition) -> Result<Tensor> {
        let time = (t.model_time as f32 / 1000.0) as f64;
        Ok(match cond {
            Condition::Prompt(c) => (x.affine(0.5, 0.0)?.affine(time, 0.0)? + c)?,
            Condition::NegativePrompt(c) => (x.affine(0.3, 0.0)? + c.affine(time, 0.0)?)?,
        })
    }
}

fn check_solver(file: &GoldenFile, prefix: &str, solver: FlowSolver) {
    let steps = file.config_f64(&["steps"]).unwrap() as usize;
    let shift = file.config_f64(&["shift"]).unwrap();
    let guidance = file.config_f64(&["guidance"]).unwrap();
    let sampler = FlowSampler::wan(solver, steps, shift).unwrap();

    let expected_timesteps = file
        .tensor(&format!("{prefix}.out.timesteps"))
        .unwrap()
        .to_vec1::<i64>()
        .unwrap();
    assert_eq!(sampler.schedule().model_timesteps(), expected_timesteps);
    let expected_sigmas = file
        .tensor(&format!("{prefix}.out.sigmas"))
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let sigmas: Vec<f64> = sampler
        .schedule()
        .sigmas()
        .iter()
        .map(|&s| s.into())
        .collect();
    assert_eq!(sigmas, expected_sigmas, "{prefix} sigmas");

    let x = file.tensor("in.x").unwrap();
    let prompt = Condition::Prompt(file.tensor("in.c_cond").unwrap());
    let negative = Condition::NegativePrompt(file.tensor("in.c_uncond").unwrap());
    let guided = Guided::new(
        &SyntheticField,
        &negative,
        GuidanceScale::Constant(guidance),
    )
    .unwrap();
    let mut noise = ReplayNoise::new(vec![x.clone()]);
    let sample = sampler
        .sample(
            &guided,
            &prompt,
            &mut noise,
            x.dims(),
            &Device::Cpu,
            &mut NoProgress,
        )
        .unwrap();
    assert_eq!(noise.remaining(), 0);
    let expected = file.tensor(&format!("{prefix}.out.x")).unwrap();
    let error = relative_error(&sample, &expected).unwrap();
    println!("{prefix}: relative error {error:.3e} over {steps} steps");
    assert!(error <= 1e-5, "{prefix}: relative error {error:e}");
}

fn golden() -> GoldenFile {
    let file = GoldenFile::open("flow_solvers").unwrap();
    let formula = file.config_value(&["velocity"]).unwrap().as_str().unwrap();
    assert!(
        formula.starts_with(VELOCITY),
        "this test evaluates `{VELOCITY}`, the file says `{formula}`"
    );
    file
}

#[test]
fn unipc_matches_wan() {
    check_solver(&golden(), "unipc", FlowSolver::UniPc);
}

#[test]
fn dpm_solver_pp_matches_wan() {
    check_solver(&golden(), "dpmpp", FlowSolver::DpmSolverPp);
}
