//! The checks that make a run fail before the work rather than after it: every weight file a
//! request will read is opened and its tensor list checked before the first stage, and each
//! stage's output is checked for NaN and infinity before the next stage takes it.

use candle_core::{DType, Tensor};
use turbo_attention::{Attention, AttentionConfig};
use turbo_core::{Error, Result, Stage};
use turbo_models::wan::WanModel;
use turbo_models::{Checkpoint, ClipVisionEncoder, Umt5Encoder};

use super::denoise::DitPlan;

/// The CLIP file holds a text tower too; only its `visual.*` tensors are checked and read.
const CLIP_PREFIX: &str = "visual.";
use super::{Pipeline, WeightSource};

impl Pipeline {
    /// Opens every weight file `dits` and the other stages (the CLIP encoder included) will read and checks its tensor
    /// list (names, shapes, byte extents) against its model, reading no weight: a missing key,
    /// a wrong shape or a truncated file in the VAE or the low-noise expert fails here, not
    /// after minutes of work. Random weights need no check.
    pub(super) fn check_weight_files(&self, dits: &DitPlan) -> Result<()> {
        let models = &self.models;
        if let WeightSource::File(path) = &models.text_encoder_weights {
            Checkpoint::open(path)?
                .expect_keys(&Umt5Encoder::expected_keys(&models.text_encoder))?;
        }
        if let WeightSource::File(path) = &models.vae_weights {
            Checkpoint::open(path)?.expect_keys(&models.vae.expected_keys())?;
        }
        if let Some(clip) = models
            .clip
            .as_ref()
            .filter(|_| models.dit.model_type.uses_clip())
        {
            if let WeightSource::File(path) = &clip.weights {
                let keys = ClipVisionEncoder::expected_keys(&clip.config);
                Checkpoint::open(path)?.expect_keys_under(CLIP_PREFIX, &keys)?;
            }
        }
        for (source, attention) in self.dit_sources(dits) {
            if let WeightSource::File(path) = source {
                WanModel::<Box<dyn Attention>>::check_checkpoint(
                    path,
                    Some(&models.dit),
                    &attention,
                )?;
            }
        }
        Ok(())
    }

    /// Every DiT a plan runs, with its attention: the one model, or both experts.
    fn dit_sources(&self, dits: &DitPlan) -> Vec<(&WeightSource, AttentionConfig)> {
        match (dits, &self.models.dit_low_noise_weights) {
            (DitPlan::Experts { attention, .. }, Some(low_noise)) => vec![
                (&self.models.dit_weights, attention[0]),
                (low_noise, attention[1]),
            ],
            _ => vec![(&self.models.dit_weights, dits.first_attention())],
        }
    }
}

/// Fails with [`Error::NonFinite`] naming `stage` and `what` when `tensor` holds a NaN or an
/// infinity: a NaN weight or an extreme setting would otherwise come out as an all-black or
/// flat gray video with a successful exit.
pub(super) fn ensure_finite(tensor: &Tensor, stage: &Stage, what: &str) -> Result<()> {
    // The sum of magnitudes is finite exactly when every value is (short of an f32 overflow
    // of the sum itself, which no usable latent or frame comes near).
    let total = tensor
        .to_dtype(DType::F32)?
        .abs()?
        .sum_all()?
        .to_scalar::<f32>()?;
    if total.is_finite() {
        Ok(())
    } else {
        Err(Error::NonFinite {
            stage: super::estimate::stage_name(stage).to_owned(),
            what: what.to_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    #[test]
    fn non_finite_values_name_the_stage() {
        let device = Device::Cpu;
        let fine = Tensor::new(&[1f32, -2.0, 3e10], &device).unwrap();
        ensure_finite(&fine, &Stage::EncodingText, "the context").unwrap();
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            let tensor = Tensor::new(&[1f32, bad, 0.0], &device).unwrap();
            let stage = Stage::Denoising { steps: 4 };
            match ensure_finite(&tensor, &stage, "the latent") {
                Err(Error::NonFinite { stage, what }) => {
                    assert_eq!((stage.as_str(), what.as_str()), ("denoising", "the latent"));
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
    }
}
