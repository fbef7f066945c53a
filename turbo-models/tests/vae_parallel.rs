//! The VAE decode split over simulated ranks (one band of latent rows each, with the tiled
//! decode's halo) equals the one-device decode, at world sizes 1 to 4 and rows the world size
//! does not divide.

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use turbo_core::golden::{relative_error, GoldenFile};
use turbo_core::parallel::simulate;
use turbo_core::Error;
use turbo_models::vae::{VaeConfig, WanVae};

/// The golden file's small VAE (the released structure at a smaller width).
fn small_vae() -> WanVae {
    let file = GoldenFile::open("vae").unwrap();
    let cfg = VaeConfig {
        dim: file.config_f64(&["dim"]).unwrap() as usize,
        num_res_blocks: file.config_f64(&["num_res_blocks"]).unwrap() as usize,
        ..VaeConfig::wan21()
    };
    let vb = VarBuilder::from_tensors(file.weights().unwrap(), DType::F32, &Device::Cpu);
    WanVae::load(vb, &cfg).unwrap()
}

fn latent(z: usize, frames: usize, height: usize, width: usize) -> Tensor {
    let values: Vec<f32> = StandardNormal
        .sample_iter(StdRng::seed_from_u64(11))
        .take(z * frames * height * width)
        .collect();
    Tensor::from_vec(values, (1, z, frames, height, width), &Device::Cpu).unwrap()
}

/// 31 latent rows: bands of 16/15, 11/10/10 and 8/8/8/7, thinner than the halo of 13 on
/// both sides, so every rank decodes a cropped range; two latent frames exercise each band's
/// temporal cache.
#[test]
fn split_decode_equals_the_whole_decode() {
    let vae = small_vae();
    let latent = latent(vae.config().z_dim, 2, 31, 2);
    let whole = vae.decode(&latent).unwrap();
    for world in 1..=4 {
        let videos = simulate(world, |comm| vae.decode_parallel(&latent, comm)).unwrap();
        for (rank, video) in videos.iter().enumerate() {
            assert_eq!(video.dims(), whole.dims());
            let error = relative_error(video, &whole).unwrap();
            // The tiled decode's bound (f32 rounding of reordered sums).
            assert!(error <= 1e-5, "world {world}, rank {rank}: {error:.3e}");
        }
    }
}

#[test]
fn more_ranks_than_rows_is_a_typed_error() {
    let vae = small_vae();
    let latent = latent(vae.config().z_dim, 1, 2, 2);
    let err = simulate(3, |comm| vae.decode_parallel(&latent, comm)).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
}
