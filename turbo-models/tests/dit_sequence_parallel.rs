//! Ulysses sequence parallelism of the DiT on simulated ranks (threads): at world sizes 1 to 4
//! the velocity every rank returns equals the one-device forward, for dense and SLA attention,
//! head counts and token counts that the world size does not divide, a rank without heads,
//! the I2V condition with CLIP tokens, TI2V's per-token timesteps and W8A8 linears.

mod common;

use candle_core::{DType, Device, Tensor};
use common::{relative_error, DitCase};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use turbo_attention::Attention;
use turbo_core::parallel::simulate;
use turbo_core::{Denoiser, Error, Timestep, PATCH_SIZE};
use turbo_models::wan::{DitCondition, QuantPolicy, SequenceParallelDit, TokenTimesteps, WanModel};

type Dit = WanModel<Box<dyn Attention>>;

/// Float rounding of the reordered sums (the projections see fewer rows per rank); measured
/// errors are ~1e-7.
const TOLERANCE: f64 = 1e-5;

/// A latent `[C, F, H, W]` of seeded standard normal values.
fn latent(channels: usize, frames: usize, height: usize, width: usize, seed: u64) -> Tensor {
    let shape = (channels, frames, height, width);
    let values: Vec<f32> = StandardNormal
        .sample_iter(StdRng::seed_from_u64(seed))
        .take(channels * frames * height * width)
        .collect();
    Tensor::from_vec(values, shape, &Device::Cpu).unwrap()
}

/// The file's condition (text, I2V image, CLIP tokens).
fn condition_of(case: &DitCase, image: Option<Tensor>) -> DitCondition {
    DitCondition {
        context: case.input("in.context"),
        image,
        clip: case.optional_input("in.clip"),
        held_frames: 0,
    }
}

/// Asserts that every rank of every world size in `worlds` returns the one-device velocity.
fn assert_parallel_equals_one_device(
    model: &Dit,
    x: &Tensor,
    timesteps: &TokenTimesteps,
    condition: &DitCondition,
    worlds: &[usize],
    what: &str,
) {
    let one_device = model
        .forward_with(
            x,
            timesteps,
            &condition.context,
            condition.image.as_ref(),
            condition.clip.as_ref(),
        )
        .unwrap();
    for &world in worlds {
        let velocities = simulate(world, |comm| {
            model.forward_sequence_parallel(x, timesteps, condition, comm)
        })
        .unwrap();
        for (rank, velocity) in velocities.iter().enumerate() {
            let error = relative_error(velocity, &one_device);
            assert!(
                error <= TOLERANCE,
                "{what}, world {world}, rank {rank}: relative error {error:.3e}"
            );
        }
    }
}

#[test]
fn dense_t2v_with_uneven_tokens_and_heads() {
    let mut case = DitCase::open("dit_t2v_dense");
    // 3 × 3 × 5 = 45 tokens: 2 and 4 ranks get uneven shards.
    let x = latent(case.cfg.in_dim, 3, 6, 10, 1);
    let t = TokenTimesteps::Uniform(case.timestep());
    let condition = condition_of(&case, None);
    // The file's heads (2 in the golden file: with 3 or 4 ranks some hold none and only relay).
    let heads = case.cfg.num_heads;
    let file_heads = case.model(DType::F32);
    let what = format!("{heads} heads");
    assert_parallel_equals_one_device(&file_heads, &x, &t, &condition, &[1, 2, 3, 4], &what);
    // The same weights read as 4× the heads, a quarter as wide (8 heads of 16 in the golden
    // file: 3 ranks split them 3, 3, 2).
    case.cfg.num_heads = 4 * heads;
    let more_heads = case.model(DType::F32);
    let what = format!("{} heads", 4 * heads);
    assert_parallel_equals_one_device(&more_heads, &x, &t, &condition, &[3, 4], &what);
}

/// SLA's block selection and linear branch see all tokens of a head on one rank: exact. 189
/// tokens: a partial query block (128) and a partial key block (64), 3 ranks of 63.
#[test]
fn sla_selection_and_linear_branch_stay_exact() {
    let case = DitCase::open("dit_t2v_sla");
    let model = case.model(DType::F32);
    let x = latent(case.cfg.in_dim, 3, 14, 18, 2);
    let t = TokenTimesteps::Uniform(case.timestep());
    let condition = condition_of(&case, None);
    assert_parallel_equals_one_device(&model, &x, &t, &condition, &[2, 3, 4], "SLA");
}

#[test]
fn i2v_with_clip_tokens() {
    let case = DitCase::open("dit_i2v_clip");
    let model = case.model(DType::F32);
    let condition = condition_of(&case, case.condition());
    let t = TokenTimesteps::Uniform(case.timestep());
    assert_parallel_equals_one_device(&model, &case.input("in.x"), &t, &condition, &[3], "I2V");
}

/// TI2V's held first frame: the time runs are cut at the shard boundaries.
#[test]
fn ti2v_per_token_timesteps() {
    let case = DitCase::open("dit_ti2v");
    let model = case.model(DType::F32);
    let condition = condition_of(&case, None);
    let x = case.input("in.x");
    for timesteps in [
        case.timesteps(),
        TokenTimesteps::HeldFrames {
            frames: 1,
            t: 937.0,
        },
    ] {
        assert_parallel_equals_one_device(&model, &x, &timesteps, &condition, &[4], "TI2V");
    }
}

/// W8A8 quantises activations in 128-row tiles: shards start on tile boundaries, so every rank
/// quantises the rows one device does (480 tokens, say: 128, 128, 128, 96 on 4 ranks).
#[test]
fn w8a8_shards_keep_the_activation_tiles() {
    let case = DitCase::open("dit_t2v_sla");
    let model = quantized(&case);
    let t = TokenTimesteps::Uniform(case.timestep());
    let condition = condition_of(&case, None);
    // Two and four ranks where the file's tokens have that many tiles.
    let tiles = w8a8_tiles(&case);
    let worlds: Vec<usize> = [2, 4].into_iter().filter(|&w| w <= tiles).collect();
    assert!(
        !worlds.is_empty(),
        "{tiles} tile(s): too few tokens for two W8A8 shards"
    );
    assert_parallel_equals_one_device(&model, &case.input("in.x"), &t, &condition, &worlds, "W8A8");
}

#[test]
fn too_many_ranks_for_the_tiles_is_a_typed_error() {
    let case = DitCase::open("dit_t2v_dense");
    let model = quantized(&case);
    let condition = condition_of(&case, None);
    // One rank more than the file's tokens have 128-row tiles: the last would get nothing.
    let err = simulate(w8a8_tiles(&case) + 1, |comm| {
        model.forward_sequence_parallel(
            &case.input("in.x"),
            &TokenTimesteps::Uniform(case.timestep()),
            &condition,
            comm,
        )
    })
    .unwrap_err();
    assert!(
        matches!(&err, Error::InvalidConfig { field, .. } if field.contains("sequence parallel")),
        "{err}"
    );
}

/// How many 128-row W8A8 activation tiles the case's tokens fill.
fn w8a8_tiles(case: &DitCase) -> usize {
    let (_, frames, height, width) = case.input("in.x").dims4().unwrap();
    let (pt, ph, pw) = PATCH_SIZE;
    ((frames / pt) * (height / ph) * (width / pw)).div_ceil(128)
}

/// The case's DiT with its block linears quantised to W8A8 at load.
fn quantized(case: &DitCase) -> Dit {
    let model: Dit = WanModel::load_with_quant(
        case.var_builder(DType::F32),
        &case.cfg,
        &case.attention,
        QuantPolicy::Quantize,
    )
    .unwrap();
    assert!(model.int8_linears() > 0);
    model
}

/// The `Denoiser` a sampler drives: the same velocity as the model's own.
#[test]
fn sequence_parallel_denoiser_equals_the_model() {
    let case = DitCase::open("dit_t2v_dense");
    let model = case.model(DType::F32);
    let condition = condition_of(&case, None);
    let x = case.input("in.x");
    let t = Timestep {
        s: 0.9,
        model_time: 900.0,
    };
    let one_device = model.velocity(&x, t, &condition).unwrap();
    let velocities = simulate(2, |comm| {
        SequenceParallelDit {
            model: &model,
            comm,
        }
        .velocity(&x, t, &condition)
    })
    .unwrap();
    for velocity in velocities {
        assert!(relative_error(&velocity, &one_device) <= TOLERANCE);
    }
}
