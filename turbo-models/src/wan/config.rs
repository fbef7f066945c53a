use std::path::Path;

use serde_json::Value;
use turbo_core::{Error, Result};

/// Width of the CLIP ViT-H/14 tokens the Wan2.1 I2V / FLF2V models embed (`img_emb`): upstream
/// builds `MLPProj(1280, dim)` whatever the model size.
pub const CLIP_DIM: usize = 1280;

/// Mask channels of the image-to-video condition (`spec/wan-model.md` §5.1): latent frame 0
/// (and for FLF2V the last) marked in four channels, one per folded pixel frame.
pub const MASK_CHANNELS: usize = 4;

/// What a Wan DiT is conditioned on, which fixes its input channels and its extra modules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// Text to video: the input is the noisy latent alone.
    T2v,
    /// Wan2.2 image to video (no CLIP): the input is `cat[x, mask(4), image latent(16)]`.
    I2v,
    /// Wan2.1 image to video: the input of [`ModelType::I2v`], plus the CLIP tokens of the image
    /// embedded by `img_emb` and attended by a `k_img` / `v_img` branch of every cross-attention.
    /// Its `config.json` says `"i2v"` as Wan2.2's does: the checkpoint's `img_emb` tells them
    /// apart ([`WanConfig::with_image_embedding`]).
    I2vClip,
    /// Wan2.1 first-last-frame to video: [`ModelType::I2vClip`] over the CLIP tokens of both
    /// frames, with the learned position embedding `img_emb.emb_pos` added before `img_emb`.
    Flf2v,
    /// Wan2.2 TI2V-5B, text or text + image: the input is the latent alone (48 channels, the
    /// Wan2.2 VAE's); in image mode the image's latent frame is held at t = 0 by per-token
    /// timesteps instead of a mask.
    Ti2v,
}

impl ModelType {
    /// Whether the model embeds CLIP image tokens (`img_emb`, `k_img` / `v_img`).
    pub fn uses_clip(self) -> bool {
        matches!(self, Self::I2vClip | Self::Flf2v)
    }

    /// Whether the input carries the mask + image latent channels after the noisy latent.
    pub fn has_image_channels(self) -> bool {
        matches!(self, Self::I2v | Self::I2vClip | Self::Flf2v)
    }

    /// `in_dim` for a model of this type whose latent has `out_dim` channels.
    pub fn in_dim(self, out_dim: usize) -> usize {
        if self.has_image_channels() {
            out_dim + MASK_CHANNELS + out_dim
        } else {
            out_dim
        }
    }
}

/// The shape of a Wan DiT (`spec/wan-model.md` §2–3). Every dimension is a field, so the tiny
/// models of the golden files and the released sizes go through the same code.
#[derive(Debug, Clone, PartialEq)]
pub struct WanConfig {
    pub model_type: ModelType,
    /// Hidden size D.
    pub dim: usize,
    pub ffn_dim: usize,
    /// Width of the sinusoidal time embedding.
    pub freq_dim: usize,
    /// Width of the text encoder's output (4096 for umT5-XXL).
    pub text_dim: usize,
    /// Text tokens the context is zero-padded to (512).
    pub text_len: usize,
    /// Input channels: 16 for T2V, 36 for the I2V experts.
    pub in_dim: usize,
    pub out_dim: usize,
    pub num_heads: usize,
    pub num_layers: usize,
    pub eps: f64,
}

impl WanConfig {
    fn released(
        dim: usize,
        ffn_dim: usize,
        num_heads: usize,
        num_layers: usize,
        model_type: ModelType,
    ) -> Self {
        // The Wan2.1 VAE's 16 latent channels, or the Wan2.2 VAE's 48 for TI2V-5B.
        let out_dim = match model_type {
            ModelType::Ti2v => 48,
            _ => 16,
        };
        Self {
            model_type,
            dim,
            ffn_dim,
            freq_dim: 256,
            text_dim: 4096,
            text_len: 512,
            in_dim: model_type.in_dim(out_dim),
            out_dim,
            num_heads,
            num_layers,
            eps: 1e-6,
        }
    }

    /// Wan2.1 T2V-1.3B (TurboWan2.1-T2V-1.3B-480P).
    pub fn wan21_t2v_1_3b() -> Self {
        Self::released(1536, 8960, 12, 30, ModelType::T2v)
    }

    /// Wan2.1 T2V-14B (TurboWan2.1-T2V-14B-480P / -720P).
    pub fn wan21_t2v_14b() -> Self {
        Self::released(5120, 13824, 40, 40, ModelType::T2v)
    }

    /// One expert of Wan2.2 I2V-A14B (both experts share it).
    pub fn wan22_i2v_a14b() -> Self {
        Self::released(5120, 13824, 40, 40, ModelType::I2v)
    }

    /// Wan2.1 I2V-14B, 480P and 720P (same architecture, different weights): CLIP + mask and
    /// image latent.
    pub fn wan21_i2v_14b() -> Self {
        Self::released(5120, 13824, 40, 40, ModelType::I2vClip)
    }

    /// Wan2.1 FLF2V-14B-720P: CLIP tokens of the first and last frames.
    pub fn wan21_flf2v_14b() -> Self {
        Self::released(5120, 13824, 40, 40, ModelType::Flf2v)
    }

    /// One expert of Wan2.2 T2V-A14B (`high_noise_model/` and `low_noise_model/` share it).
    pub fn wan22_t2v_a14b() -> Self {
        Self::released(5120, 13824, 40, 40, ModelType::T2v)
    }

    /// Wan2.2 TI2V-5B: 48 latent channels in and out, per-token timesteps in image mode.
    pub fn wan22_ti2v_5b() -> Self {
        Self::released(3072, 14336, 24, 30, ModelType::Ti2v)
    }

    /// The configuration a checkpoint calls `"i2v"` in its `config.json`, told apart by its
    /// tensors: with `img_emb` it is Wan2.1 I2V ([`ModelType::I2vClip`]), without it Wan2.2's
    /// I2V expert. Other types are returned unchanged.
    pub fn with_image_embedding(mut self, has_img_emb: bool) -> Self {
        if self.model_type == ModelType::I2v && has_img_emb {
            self.model_type = ModelType::I2vClip;
        }
        self
    }

    pub fn head_dim(&self) -> usize {
        self.dim / self.num_heads
    }

    /// Channels of the noisy latent (the output); the rest of `in_dim` is the I2V condition.
    pub fn condition_channels(&self) -> usize {
        self.in_dim - self.out_dim
    }

    /// Checks what the forward pass relies on.
    pub fn validate(&self) -> Result<()> {
        let invalid = |field: &str, reason: String| {
            Err(Error::InvalidConfig {
                field: field.into(),
                reason,
            })
        };
        let positive = [
            ("dim", self.dim),
            ("ffn_dim", self.ffn_dim),
            ("freq_dim", self.freq_dim),
            ("text_dim", self.text_dim),
            ("text_len", self.text_len),
            ("in_dim", self.in_dim),
            ("out_dim", self.out_dim),
            ("num_heads", self.num_heads),
            ("num_layers", self.num_layers),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return invalid(field, "must be positive".into());
        }
        if self.dim % self.num_heads != 0 || self.head_dim() % 2 != 0 {
            return invalid(
                "num_heads",
                format!("dim {} must split into heads of even size", self.dim),
            );
        }
        if self.freq_dim % 2 != 0 {
            return invalid(
                "freq_dim",
                format!("{} must be even (cos and sin halves)", self.freq_dim),
            );
        }
        let expected_in = self.model_type.in_dim(self.out_dim);
        if self.in_dim != expected_in {
            return invalid(
                "in_dim",
                format!(
                    "{} does not fit {:?} with out_dim {} (expected {expected_in})",
                    self.in_dim, self.model_type, self.out_dim
                ),
            );
        }
        Ok(())
    }

    /// Parses an upstream `config.json` (the published fields: `model_type`, `dim`, `ffn_dim`,
    /// `freq_dim`, `in_dim`, `out_dim`, `num_heads`, `num_layers`, `eps`, `text_len`; `text_dim`
    /// is read when present and is 4096 otherwise, as upstream ignores it in configs).
    pub fn from_json(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text).map_err(|e| Error::InvalidConfig {
            field: "config.json".into(),
            reason: e.to_string(),
        })?;
        let cfg = Self::from_value(&value)?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Reads `config.json` from a file.
    pub fn from_json_file(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Io {
            path: path.to_owned(),
            source,
        })?;
        Self::from_json(&text)
    }

    /// Reads the fields from a JSON object (an upstream `config.json` or a golden file's config).
    pub fn from_value(value: &Value) -> Result<Self> {
        let fields = crate::config_fields::ConfigFields(value);
        let model_type = match fields.str("model_type") {
            Ok("t2v") => ModelType::T2v,
            Ok("i2v") => ModelType::I2v,
            Ok("flf2v") => ModelType::Flf2v,
            Ok("ti2v") => ModelType::Ti2v,
            Err(error) => return Err(error),
            Ok(other) => {
                return Err(Error::InvalidConfig {
                    field: "model_type".into(),
                    reason: format!(
                    "{other:?} is not supported (expected \"t2v\", \"i2v\", \"flf2v\" or \"ti2v\")"
                ),
                })
            }
        };
        Ok(Self {
            model_type,
            dim: fields.usize("dim")?,
            ffn_dim: fields.usize("ffn_dim")?,
            freq_dim: fields.usize("freq_dim")?,
            text_dim: if value.get("text_dim").is_some() {
                fields.usize("text_dim")?
            } else {
                4096
            },
            text_len: fields.usize("text_len")?,
            in_dim: fields.usize("in_dim")?,
            out_dim: fields.usize("out_dim")?,
            num_heads: fields.usize("num_heads")?,
            num_layers: fields.usize("num_layers")?,
            eps: fields.f64("eps")?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_are_valid() {
        for cfg in [
            WanConfig::wan21_t2v_1_3b(),
            WanConfig::wan21_t2v_14b(),
            WanConfig::wan22_i2v_a14b(),
            WanConfig::wan21_i2v_14b(),
            WanConfig::wan21_flf2v_14b(),
            WanConfig::wan22_t2v_a14b(),
            WanConfig::wan22_ti2v_5b(),
        ] {
            cfg.validate().unwrap();
            assert_eq!(cfg.head_dim(), 128);
        }
    }

    #[test]
    fn parses_the_published_config_json() {
        let text = r#"{"_class_name":"WanModel","_diffusers_version":"0.30.0","model_type":"t2v",
            "dim":1536,"eps":1e-06,"ffn_dim":8960,"freq_dim":256,"in_dim":16,"num_heads":12,
            "num_layers":30,"out_dim":16,"text_len":512}"#;
        assert_eq!(
            WanConfig::from_json(text).unwrap(),
            WanConfig::wan21_t2v_1_3b()
        );
    }

    #[test]
    fn parses_the_wan22_ti2v_and_wan21_image_configs() {
        let ti2v = r#"{"_class_name":"WanModel","model_type":"ti2v","dim":3072,"eps":1e-06,
            "ffn_dim":14336,"freq_dim":256,"in_dim":48,"num_heads":24,"num_layers":30,
            "out_dim":48,"text_len":512}"#;
        assert_eq!(
            WanConfig::from_json(ti2v).unwrap(),
            WanConfig::wan22_ti2v_5b()
        );
        let i2v = r#"{"model_type":"i2v","dim":5120,"eps":1e-06,"ffn_dim":13824,
            "freq_dim":256,"in_dim":36,"num_heads":40,"num_layers":40,"out_dim":16,
            "text_len":512}"#;
        let parsed = WanConfig::from_json(i2v).unwrap();
        assert_eq!(parsed, WanConfig::wan22_i2v_a14b());
        assert_eq!(
            parsed.clone().with_image_embedding(true),
            WanConfig::wan21_i2v_14b()
        );
        assert_eq!(
            parsed.clone().with_image_embedding(false),
            WanConfig::wan22_i2v_a14b()
        );
        let flf2v = i2v.replace("\"i2v\"", "\"flf2v\"");
        assert_eq!(
            WanConfig::from_json(&flf2v).unwrap(),
            WanConfig::wan21_flf2v_14b()
        );
    }

    #[test]
    fn bad_configs_name_the_field() {
        let err = WanConfig::from_json(r#"{"model_type":"t2v"}"#).unwrap_err();
        assert!(err.to_string().contains("dim"), "{err}");
        let err = WanConfig::from_json(r#"{"model_type":"s2v","dim":1}"#).unwrap_err();
        assert!(err.to_string().contains("s2v"), "{err}");
        let mut cfg = WanConfig::wan21_t2v_1_3b();
        cfg.in_dim = 36;
        assert!(
            matches!(cfg.validate(), Err(Error::InvalidConfig { field, .. }) if field == "in_dim")
        );
        cfg = WanConfig::wan21_t2v_1_3b();
        cfg.num_heads = 7;
        assert!(cfg.validate().is_err());
    }
}
