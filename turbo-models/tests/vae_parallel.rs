//! The VAE decode split over simulated ranks (one band of latent rows each, with the tiled
//! decode's halo) equals the one-device decode, for the Wan2.1 and the Wan2.2 VAE, at world
//! sizes 1 to 4 and rows the world size does not divide.

mod common;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use common::{vae22_config, vae_config};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};
use turbo_core::golden::{relative_error, GoldenFile};
use turbo_core::parallel::{simulate, SimulatedCommunicator};
use turbo_core::Error;
use turbo_models::vae::{Vae22Config, Wan22Vae, WanVae};

/// The `vae` golden file's small Wan2.1 VAE.
fn small_vae() -> WanVae {
    let file = GoldenFile::open("vae").unwrap();
    let vb = VarBuilder::from_tensors(file.weights().unwrap(), DType::F32, &Device::Cpu);
    WanVae::load(vb, &vae_config(&file)).unwrap()
}

/// The `vae22` golden file's small Wan2.2 VAE.
fn small_vae22() -> Wan22Vae {
    let file = GoldenFile::open("vae22").unwrap();
    let vb = VarBuilder::from_tensors(file.weights().unwrap(), DType::F32, &Device::Cpu);
    Wan22Vae::load(vb, &vae22_config(&file)).unwrap()
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
    assert_every_split_equals(&whole, |comm| vae.decode_parallel(&latent, comm));
}

/// On 1 to 4 ranks, every rank's video equals the whole decode.
fn assert_every_split_equals(
    whole: &Tensor,
    decode: impl Fn(&SimulatedCommunicator) -> turbo_core::Result<Tensor> + Sync,
) {
    for world in 1..=4 {
        let videos = simulate(world, &decode).unwrap();
        for (rank, video) in videos.iter().enumerate() {
            assert_eq!(video.dims(), whole.dims());
            let error = relative_error(video, whole).unwrap();
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

/// As for the Wan2.1 VAE: bands thinner than the halo, and three latent frames, so that each
/// band's cache carries the temporal upsamplers' first-frame rule and a later chunk.
#[test]
fn split_wan22_decode_equals_the_whole_decode() {
    let vae = small_vae22();
    let halo = vae.config().decode_halo();
    let rows = 2 * halo + 3;
    let latent = latent(vae.config().z_dim, 3, rows, 2);
    let whole = vae.decode(&latent).unwrap();
    assert_every_split_equals(&whole, |comm| vae.decode_parallel(&latent, comm));
    let err = simulate(rows + 1, |comm| vae.decode_parallel(&latent, comm)).unwrap_err();
    assert!(matches!(err, Error::InvalidConfig { .. }), "{err}");
}

/// The released Wan2.2 decoder counted back from the head, in pixels of each scale: the
/// head's 3×3 (1), the last level's three residual blocks (6): 7; each upsampler adds its 3×3
/// and halves, rounded up, before three more blocks: ⌈8/2⌉ + 6 = 10, ⌈11/2⌉ + 6 = 12,
/// ⌈13/2⌉ + 6 = 13.
#[test]
fn the_released_wan22_decoder_needs_a_halo_of_13() {
    assert_eq!(Vae22Config::wan22().decode_halo(), 13);
}
