//! The built-in demo: a tiny Wan model set with seeded random weights and a character-level
//! tokenizer, small enough to run the whole pipeline on two CPU cores in seconds.

use candle_core::{DType, Device};
use tokenizers::models::unigram::Unigram;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::Tokenizer;
use turbo_attention::{Attention, AttentionConfig};
use turbo_core::{Error, Result};
use turbo_models::tokenizer::{PromptTokenizer, EOS_TOKEN};
use turbo_models::wan::{expected_tensors, PatchLayout, WanConfig, CLIP_DIM};
use turbo_models::{
    ClipConfig, ClipVisionEncoder, Umt5Config, Umt5Encoder, Vae22Config, VaeConfig,
};

use super::{
    ClipModel, ModelKind, ModelSet, Pipeline, RandomCheckpoint, T2vRequest, VaeSpec, WeightSource,
};

/// What the demo's output is, for the caller to show the user.
pub const DEMO_NOTICE: &str = "demo mode: a tiny Wan model with seeded RANDOM weights (the video \
is structured noise, not a picture of the prompt). For real videos, download the TurboWan \
checkpoints (see docs/checkpoints.md) and pass --checkpoint-dir.";

/// Tokens of the demo tokenizer: padding, end, unknown, then every lower-case letter and digit
/// with and without the word-start marker.
fn demo_vocab() -> Vec<String> {
    let symbols: Vec<char> = ('a'..='z').chain('0'..='9').collect();
    ["<pad>", EOS_TOKEN, "<unk>"]
        .iter()
        .map(|s| s.to_string())
        .chain(symbols.iter().map(|c| format!("▁{c}")))
        .chain(symbols.iter().map(|c| c.to_string()))
        .collect()
}

fn demo_tokenizer() -> Result<PromptTokenizer> {
    let scored = demo_vocab()
        .into_iter()
        .map(|token| (token, -1.0))
        .collect();
    let model = Unigram::from(scored, Some(2), false).map_err(|e| Error::Tokenizer {
        path: "<demo>".into(),
        reason: e.to_string(),
    })?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_pre_tokenizer(Some(Metaspace::new('▁', PrependScheme::Always, true)));
    PromptTokenizer::new(tokenizer)
}

/// Tiny models of the structure of `kind`: its DiT type (two experts for A14B), its VAE
/// (the Wan2.2 one for TI2V) and, for Wan2.1 I2V / FLF2V, a CLIP encoder of the real token width
/// with one block on a 28-pixel image.
fn demo_models(seed: u64, kind: ModelKind) -> ModelSet {
    let text_encoder = Umt5Config {
        vocab: demo_vocab().len(),
        dim: 32,
        dim_attn: 32,
        dim_ffn: 64,
        num_heads: 2,
        num_layers: 2,
        ..Umt5Config::umt5_xxl()
    };
    let vae = match ModelSet::released_vae(kind) {
        VaeSpec::Wan21(cfg) => VaeSpec::Wan21(VaeConfig {
            dim: 8,
            num_res_blocks: 1,
            ..cfg
        }),
        VaeSpec::Wan22(cfg) => VaeSpec::Wan22(Vae22Config {
            dim: 8,
            dec_dim: 8,
            num_res_blocks: 1,
            ..cfg
        }),
    };
    let model_type = kind.dit_config().model_type;
    let out_dim = vae.latent_channels();
    let dit = WanConfig {
        model_type,
        dim: 64,
        ffn_dim: 128,
        freq_dim: 64,
        text_dim: text_encoder.dim,
        text_len: 64,
        in_dim: model_type.in_dim(out_dim),
        out_dim,
        num_heads: 2,
        num_layers: 2,
        eps: 1e-6,
    };
    let clip = model_type.uses_clip().then(|| ClipConfig {
        image_size: 28,
        mlp_ratio: 1,
        out_dim: 8,
        num_heads: 2,
        num_layers: 2,
        ..ClipConfig::vit_h14()
    });
    random_models(seed, kind, dit, text_encoder, vae, clip)
}

/// Seeded random weights for the models of these shapes; for A14B two experts that differ
/// only by their seed. FLF2V's `img_emb.emb_pos` covers the CLIP tokens of two images.
fn random_models(
    seed: u64,
    kind: ModelKind,
    dit: WanConfig,
    text_encoder: Umt5Config,
    vae: VaeSpec,
    clip: Option<ClipConfig>,
) -> ModelSet {
    // Listing the SLA `proj_l` keys lets every attention kind run on the same weights.
    let sla = AttentionConfig::new(turbo_core::AttentionKind::sla(0.1).expect("valid top-k"));
    let clip_tokens = clip.as_ref().map_or(0, ClipConfig::num_tokens);
    let dit_keys =
        expected_tensors::<Box<dyn Attention>>(&dit, PatchLayout::Linear, &sla, DType::F32)
            .into_iter()
            .map(|spec| match spec.name.as_str() {
                "img_emb.emb_pos" => (spec.name, vec![1, 2 * clip_tokens, CLIP_DIM]),
                _ => (spec.name, spec.shape),
            })
            .collect::<Vec<_>>();
    let low_noise = kind
        .has_experts()
        .then(|| WeightSource::Random(RandomCheckpoint::new(seed + 3, dit_keys.clone())));
    ModelSet {
        dit_weights: WeightSource::Random(RandomCheckpoint::new(seed, dit_keys)),
        dit_low_noise_weights: low_noise,
        text_encoder_weights: WeightSource::Random(RandomCheckpoint::new(
            seed + 1,
            Umt5Encoder::expected_keys(&text_encoder),
        )),
        vae_weights: WeightSource::Random(RandomCheckpoint::new(seed + 2, vae.expected_keys())),
        clip: clip.map(|config| ClipModel {
            weights: WeightSource::Random(RandomCheckpoint::new(
                seed + 4,
                ClipVisionEncoder::expected_keys(&config),
            )),
            config,
        }),
        dit,
        text_encoder,
        vae,
    }
}

impl Pipeline {
    /// The built-in demo pipeline: tiny models with weights drawn from `seed` (see
    /// [`DEMO_NOTICE`]), computing in f32 on `device`.
    ///
    /// ```
    /// use candle_core::Device;
    /// use turbodiffusion::attention::AttentionConfig;
    /// use turbodiffusion::pipeline::demo_request;
    /// use turbodiffusion::{AttentionKind, Pipeline, T2vRequest};
    ///
    /// # fn main() -> turbodiffusion::Result<()> {
    /// let attention = AttentionConfig::new(AttentionKind::Original);
    /// let pipeline = Pipeline::demo(0, attention, Device::Cpu)?;
    /// let request = T2vRequest { frames: 5, ..demo_request("a red fox") };
    /// let video = pipeline.text_to_video(&request)?;
    /// assert_eq!((video.len(), video.width(), video.height()), (5, 128, 128));
    /// # Ok(())
    /// # }
    /// ```
    pub fn demo(seed: u64, attention: AttentionConfig, device: Device) -> Result<Self> {
        Self::demo_of(ModelKind::Wan21T2V1_3B, seed, attention, device)
    }

    /// The image-to-video demo: like [`Pipeline::demo`], with two tiny random I2V experts.
    pub fn demo_i2v(seed: u64, attention: AttentionConfig, device: Device) -> Result<Self> {
        Self::demo_of(ModelKind::Wan22I2VA14B, seed, attention, device)
    }

    /// The demo of `kind`: tiny models of its structure (its DiT type, two experts for
    /// A14B, the Wan2.2 VAE for TI2V, a CLIP encoder for Wan2.1 I2V / FLF2V) with weights
    /// drawn from `seed`, computing in f32 on `device` (see [`DEMO_NOTICE`]).
    pub fn demo_of(
        kind: ModelKind,
        seed: u64,
        attention: AttentionConfig,
        device: Device,
    ) -> Result<Self> {
        Self::from_parts(
            demo_models(seed, kind),
            demo_tokenizer()?,
            attention,
            device,
            DType::F32,
        )
    }

    /// A released model family at full size with seeded random weights (drawn on `device`, see
    /// [`RandomCheckpoint`]) and the demo's tiny tokenizer: every stage does the work of the
    /// real model, so this measures speed and memory without downloading checkpoints. The
    /// video is noise.
    pub fn random_weights(
        kind: ModelKind,
        seed: u64,
        attention: AttentionConfig,
        device: Device,
        dtype: DType,
    ) -> Result<Self> {
        let dit = kind.dit_config();
        let clip = dit.model_type.uses_clip().then(ClipConfig::vit_h14);
        let vae = ModelSet::released_vae(kind);
        let models = random_models(seed, kind, dit, Umt5Config::umt5_xxl(), vae, clip);
        Self::from_parts(models, demo_tokenizer()?, attention, device, dtype)
    }
}

/// A request at the demo's size: 128×128, 17 frames (about one second at 16 fps).
pub fn demo_request(prompt: impl Into<String>) -> T2vRequest {
    T2vRequest {
        size: Some((128, 128)),
        frames: 17,
        ..T2vRequest::new(prompt)
    }
}
