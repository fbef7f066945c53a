//! LoRA adapters on the pipeline's DiT: which adapters each expert gets, and the load that
//! applies them.
//!
//! The pipeline loads the DiT when the denoising stage starts and drops it after (one model
//! resident at a time), so the adapters are a setting: [`Pipeline::set_loras`] swaps them (or
//! their strengths) between runs without reading any LoRA file again, and the next run merges
//! them into the DiT it loads anyway. A program that keeps a DiT resident itself switches with
//! [`turbo_models::wan::WanModel::set_loras`].

use std::path::{Path, PathBuf};

use candle_core::DType;
use turbo_attention::{Attention, AttentionConfig};
use turbo_core::{Error, Result};
use turbo_models::lora::{LoraAdapter, LoraMode, ScaledLora};
use turbo_models::wan::{expected_tensors, PatchLayout, QuantPolicy};
use turbo_sampler::Expert;

use super::denoise::Dit;
use super::memory::WeightBytes;
use super::{Pipeline, WeightSource};

/// The adapters of the DiT: for every model, and for Wan2.2 A14B per expert (the high-noise
/// and low-noise experts are trained apart, so their LoRAs differ).
#[derive(Debug, Clone, Default)]
pub struct DitLoras {
    /// Applied to the DiT, or to both experts.
    pub all: Vec<ScaledLora>,
    /// Applied to the high-noise expert only (A14B).
    pub high_noise: Vec<ScaledLora>,
    /// Applied to the low-noise expert only (A14B).
    pub low_noise: Vec<ScaledLora>,
}

impl DitLoras {
    pub fn is_empty(&self) -> bool {
        self.all.is_empty() && self.high_noise.is_empty() && self.low_noise.is_empty()
    }

    /// The adapters of `expert` (`None`: a one-model family).
    pub fn for_expert(&self, expert: Option<Expert>) -> Vec<ScaledLora> {
        let own = match expert {
            None => &[][..],
            Some(Expert::HighNoise) => &self.high_noise,
            Some(Expert::LowNoise) => &self.low_noise,
        };
        self.all.iter().chain(own).cloned().collect()
    }
}

/// Reads a `FILE[:STRENGTH]` argument (strength 1 when absent): `style.safetensors:0.8`.
pub fn parse_lora_arg(arg: &str) -> Result<(PathBuf, f64)> {
    match arg.rsplit_once(':') {
        Some((file, strength)) if !file.is_empty() => match strength.parse::<f64>() {
            Ok(strength) if strength.is_finite() => Ok((PathBuf::from(file), strength)),
            Ok(_) => Err(Error::InvalidConfig {
                field: "lora".into(),
                reason: format!("`{arg}`: the strength must be a finite number"),
            }),
            // A colon that is part of the path (`C:\loras\style.safetensors`).
            Err(_) => Ok((PathBuf::from(arg), 1.0)),
        },
        _ => Ok((PathBuf::from(arg), 1.0)),
    }
}

/// Opens the LoRA file `path` at `strength` (strict: unknown keys are an error).
pub fn open_lora(path: impl AsRef<Path>, strength: f64) -> Result<ScaledLora> {
    Ok(LoraAdapter::open(path)?.at(strength))
}

impl Pipeline {
    /// The pipeline with `loras` on its DiT (see [`Pipeline::set_loras`]).
    pub fn with_loras(mut self, loras: DitLoras) -> Result<Self> {
        self.set_loras(loras)?;
        Ok(self)
    }

    /// Replaces the DiT's adapters for the runs that follow. Nothing is loaded here: the next
    /// run merges them into the DiT as it loads it (float weights; with `quant_linear` on a
    /// float checkpoint, merged before quantising; a `-quant` checkpoint's int8 linears run
    /// them as a low-rank term beside the int8 GEMM). Per-expert adapters on a one-model
    /// family are an [`Error::InvalidConfig`]; an adapter that does not fit the DiT's
    /// configuration (absent targets, wrong shapes) is an [`Error::Lora`] here, before any
    /// run.
    pub fn set_loras(&mut self, loras: DitLoras) -> Result<()> {
        let per_expert = !loras.high_noise.is_empty() || !loras.low_noise.is_empty();
        if per_expert && self.models.dit_low_noise_weights.is_none() {
            return Err(Error::InvalidConfig {
                field: "lora".into(),
                reason: "high-noise / low-noise LoRAs need a two-expert model (Wan2.2 A14B); \
                         use the LoRAs for the whole DiT"
                    .into(),
            });
        }
        let tensors: Vec<(String, Vec<usize>)> = expected_tensors::<Box<dyn Attention>>(
            &self.models.dit,
            PatchLayout::Conv3d,
            &self.attention,
            DType::F32,
        )
        .into_iter()
        .map(|spec| (spec.name, spec.shape))
        .collect();
        let mut adapters = loras
            .all
            .iter()
            .chain(&loras.high_noise)
            .chain(&loras.low_noise);
        adapters.try_for_each(|lora| lora.adapter.check_fits(&tensors))?;
        self.loras = loras;
        Ok(())
    }

    /// The DiT's adapters.
    pub fn loras(&self) -> &DitLoras {
        &self.loras
    }

    /// The DiT (or `expert`) from `source`, with its adapters applied.
    pub(super) fn load_adapted_dit(
        &self,
        source: &WeightSource,
        attention: &AttentionConfig,
        bytes: &WeightBytes,
        expert: Option<Expert>,
    ) -> Result<Dit> {
        let loras = self.loras.for_expert(expert);
        if loras.is_empty() {
            return self.load_dit(source, attention, bytes, self.quant_linear);
        }
        // Float linears take the adapters merged, then are quantised when asked: the int8
        // weights then carry the adapters at no cost per step. (A `-quant` file loads int8
        // whatever the policy; its linears run the adapters as low-rank terms.)
        let mut dit = self.load_dit(source, attention, bytes, QuantPolicy::KeepFloat)?;
        dit.apply_loras(&loras, LoraMode::Merge)?;
        if self.quant_linear == QuantPolicy::Quantize {
            dit.quantize_block_linears()?;
        }
        Ok(dit)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lora_arguments_read_file_and_strength() {
        let parsed = |arg| parse_lora_arg(arg).unwrap();
        assert_eq!(
            parsed("a.safetensors"),
            (PathBuf::from("a.safetensors"), 1.0)
        );
        assert_eq!(
            parsed("a.safetensors:0.8"),
            (PathBuf::from("a.safetensors"), 0.8)
        );
        assert_eq!(
            parsed("dir/a.safetensors:-1"),
            (PathBuf::from("dir/a.safetensors"), -1.0)
        );
        assert_eq!(
            parsed(r"C:\l\a.safetensors"),
            (PathBuf::from(r"C:\l\a.safetensors"), 1.0)
        );
        assert!(parse_lora_arg("a.safetensors:inf").is_err());
    }

    #[test]
    fn each_expert_gets_the_shared_adapters_and_its_own() {
        let adapter = |name: &str| {
            LoraAdapter::from_tensors(name, std::iter::empty(), false)
                .unwrap()
                .at(1.0)
        };
        let loras = DitLoras {
            all: vec![adapter("all")],
            high_noise: vec![adapter("high")],
            low_noise: vec![adapter("low")],
        };
        let names = |expert| {
            loras
                .for_expert(expert)
                .iter()
                .map(|l| l.adapter.path().display().to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(names(None), ["all"]);
        assert_eq!(names(Some(Expert::HighNoise)), ["all", "high"]);
        assert_eq!(names(Some(Expert::LowNoise)), ["all", "low"]);
    }
}
