use std::path::Path;

use serde_json::Value;
use turbo_core::{Error, Result};

/// What a Wan DiT is conditioned on, which fixes its input channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModelType {
    /// Text to video: the input is the noisy latent alone.
    T2v,
    /// Wan2.2 image to video (no CLIP): the input is `cat[x, mask(4), image latent(16)]`.
    I2v,
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
        Self {
            model_type,
            dim,
            ffn_dim,
            freq_dim: 256,
            text_dim: 4096,
            text_len: 512,
            in_dim: match model_type {
                ModelType::T2v => 16,
                ModelType::I2v => 36,
            },
            out_dim: 16,
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
        let expected_in = match self.model_type {
            ModelType::T2v => self.out_dim,
            ModelType::I2v => self.out_dim + 4 + self.out_dim,
        };
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
        let field = |name: &str| -> Result<&Value> {
            value.get(name).ok_or_else(|| Error::InvalidConfig {
                field: name.into(),
                reason: "missing".into(),
            })
        };
        let usize_field = |name: &str| -> Result<usize> {
            let v = field(name)?;
            v.as_u64()
                .map(|n| n as usize)
                .ok_or_else(|| Error::InvalidConfig {
                    field: name.into(),
                    reason: format!("{v} is not a non-negative integer"),
                })
        };
        let model_type = match field("model_type")?.as_str() {
            Some("t2v") => ModelType::T2v,
            Some("i2v") => ModelType::I2v,
            other => {
                return Err(Error::InvalidConfig {
                    field: "model_type".into(),
                    reason: format!("{other:?} is not supported (expected \"t2v\" or \"i2v\")"),
                })
            }
        };
        Ok(Self {
            model_type,
            dim: usize_field("dim")?,
            ffn_dim: usize_field("ffn_dim")?,
            freq_dim: usize_field("freq_dim")?,
            text_dim: if value.get("text_dim").is_some() {
                usize_field("text_dim")?
            } else {
                4096
            },
            text_len: usize_field("text_len")?,
            in_dim: usize_field("in_dim")?,
            out_dim: usize_field("out_dim")?,
            num_heads: usize_field("num_heads")?,
            num_layers: usize_field("num_layers")?,
            eps: field("eps")?.as_f64().ok_or_else(|| Error::InvalidConfig {
                field: "eps".into(),
                reason: "not a number".into(),
            })?,
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
