use candle_nn::VarBuilder;
use turbo_core::{Attention, AttentionKind, Error, Result};

use crate::{DenseAttention, SageSlaAttention, SlaAttention};

/// Query and key block sizes of the sparse attention, in tokens.
///
/// TurboDiffusion's inference uses 128 / 64 for `sla` and for `sagesla` on non-Hopper GPUs;
/// SageSLA on sm90 uses 64 / 128. Both are valid here; the last block of a sequence whose
/// length is not a multiple of the block size is partial.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSizes {
    pub query: usize,
    pub key: usize,
}

impl BlockSizes {
    pub fn new(query: usize, key: usize) -> Result<Self> {
        for (what, value) in [("query", query), ("key", key)] {
            if value == 0 {
                return Err(Error::InvalidBlockSize { what, value });
            }
        }
        Ok(Self { query, key })
    }
}

impl Default for BlockSizes {
    fn default() -> Self {
        Self {
            query: 128,
            key: 64,
        }
    }
}

/// The tensor-core instructions of the CUDA attention kernels (bf16, head dim 128). The CPU
/// path and the reference path ignore it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AttentionKernel {
    /// `mma.sync` kernels for compute capability 8.0 and later.
    MmaSync,
    /// Hopper `wgmma` kernels (a producer warpgroup streaming K and V, two consumer
    /// warpgroups taking turns on the tensor cores) on compute capability 9.0 devices, the
    /// `mma.sync` ones elsewhere; the default.
    #[default]
    Wgmma,
}

impl AttentionKernel {
    /// Every kernel, for checks and benchmarks that compare them.
    pub const ALL: [AttentionKernel; 2] = [AttentionKernel::MmaSync, AttentionKernel::Wgmma];

    /// A short name for tables: `mma.sync` or `wgmma`.
    pub fn name(self) -> &'static str {
        match self {
            AttentionKernel::MmaSync => "mma.sync",
            AttentionKernel::Wgmma => "wgmma",
        }
    }
}

/// Settings of SLA and SageSLA: the top-k fraction, the block sizes and the CUDA kernel.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SlaConfig {
    pub topk: f64,
    pub blocks: BlockSizes,
    pub kernel: AttentionKernel,
}

impl SlaConfig {
    /// Denominator guard of the linear branch, as released.
    pub const LINEAR_EPS: f64 = 1e-5;

    /// Default block sizes with a validated top-k fraction.
    pub fn new(topk: f64) -> Result<Self> {
        Self::with_blocks(topk, BlockSizes::default())
    }

    pub fn with_blocks(topk: f64, blocks: BlockSizes) -> Result<Self> {
        AttentionKind::sla(topk)?;
        BlockSizes::new(blocks.query, blocks.key)?;
        Ok(Self {
            topk,
            blocks,
            kernel: AttentionKernel::default(),
        })
    }

    /// The same settings with another top-k fraction, validated.
    pub fn with_topk(self, topk: f64) -> Result<Self> {
        Ok(Self {
            topk: Self::with_blocks(topk, self.blocks)?.topk,
            ..self
        })
    }

    /// The same settings on another CUDA kernel.
    pub fn with_kernel(self, kernel: AttentionKernel) -> Self {
        Self { kernel, ..self }
    }

    /// Key blocks each query block attends exactly: T = ⌊topk · n_k⌋, at least 1.
    ///
    /// Upstream selects none when topk · n_k < 1 (its sparse output is then 0/0); this port
    /// keeps one block so short sequences stay well defined.
    pub fn selected_blocks(&self, key_blocks: usize) -> usize {
        let t = (self.topk * key_blocks as f64).floor() as usize;
        t.clamp(1, key_blocks.max(1))
    }

    /// Fraction of the key blocks computed exactly for a key sequence of `kv_len` tokens.
    pub fn density(&self, kv_len: usize) -> f64 {
        let key_blocks = kv_len.div_ceil(self.blocks.key);
        self.selected_blocks(key_blocks) as f64 / key_blocks as f64
    }
}

/// Settings of dense attention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DenseConfig {
    /// Query rows processed at once by the reference path; memory is O(query_chunk · L) per
    /// head.
    pub query_chunk: usize,
    /// The CUDA kernel.
    pub kernel: AttentionKernel,
}

impl Default for DenseConfig {
    fn default() -> Self {
        Self {
            query_chunk: 128,
            kernel: AttentionKernel::default(),
        }
    }
}

/// Run-time choice of backend: the kind with its top-k, and the sparse block sizes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AttentionConfig {
    pub kind: AttentionKind,
    pub blocks: BlockSizes,
}

impl AttentionConfig {
    pub fn new(kind: AttentionKind) -> Self {
        Self {
            kind,
            blocks: BlockSizes::default(),
        }
    }
}

impl std::str::FromStr for BlockSizes {
    type Err = Error;

    /// `QxK`: the query and the key block size, as in `128x64`.
    fn from_str(text: &str) -> Result<Self> {
        let invalid = || Error::InvalidConfig {
            field: "attention block sizes".into(),
            reason: format!("`{text}`: expected query x key block sizes, as in `128x64`"),
        };
        let (query, key) = text.trim().split_once(['x', 'X']).ok_or_else(invalid)?;
        let side = |part: &str| part.trim().parse::<usize>().map_err(|_| invalid());
        Self::new(side(query)?, side(key)?)
    }
}

impl std::fmt::Display for BlockSizes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}", self.query, self.key)
    }
}

impl std::str::FromStr for AttentionConfig {
    type Err = Error;

    /// `kind[:topk[:QxK]]`: `original`, `sla`, `sagesla:0.1`, `sla:0.2:128x64` (the block
    /// sizes of the sparse kinds; default 128x64).
    fn from_str(text: &str) -> Result<Self> {
        let mut parts = text.trim().splitn(3, ':');
        let name = parts.next().unwrap_or_default();
        let topk = parts.next();
        let kind: AttentionKind = match topk {
            Some(topk) => format!("{name}:{topk}").parse()?,
            None => name.parse()?,
        };
        let blocks = match parts.next() {
            None => BlockSizes::default(),
            Some(_) if kind.topk().is_none() => {
                return Err(Error::InvalidConfig {
                    field: "attention".into(),
                    reason: format!("`{text}`: dense attention has no block sizes"),
                })
            }
            Some(blocks) => blocks.parse()?,
        };
        Ok(Self { kind, blocks })
    }
}

impl std::fmt::Display for AttentionConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.kind.topk() {
            None => write!(f, "{}", self.kind),
            Some(_) => write!(f, "{}:{}", self.kind, self.blocks),
        }
    }
}

/// An attention operator that can be built for one layer of a model.
///
/// `vb` points at the layer's attention operator in the checkpoint (in TurboDiffusion files
/// `blocks.N.self_attn.attn_op.local_attn`, which holds `proj_l.weight` and `proj_l.bias`).
pub trait LoadAttention: Attention + Sized {
    type Config: Clone + Send + Sync + std::fmt::Debug;

    fn load(vb: VarBuilder, head_dim: usize, cfg: &Self::Config) -> Result<Self>;

    /// Names (relative to `vb`) and shapes of the tensors `load` reads, so that a model can
    /// check a checkpoint or list its keys without loading anything.
    fn weights(head_dim: usize, cfg: &Self::Config) -> Vec<(String, Vec<usize>)>;
}

/// The weights of an SLA-family layer: `proj_l`, `[D, D]` and `[D]`.
pub(crate) fn proj_l_weights(head_dim: usize) -> Vec<(String, Vec<usize>)> {
    vec![
        ("proj_l.weight".to_owned(), vec![head_dim, head_dim]),
        ("proj_l.bias".to_owned(), vec![head_dim]),
    ]
}

/// Builds the backend `cfg.kind` names for one layer (the run-time path).
pub fn load_attention(
    vb: VarBuilder,
    head_dim: usize,
    cfg: &AttentionConfig,
) -> Result<Box<dyn Attention>> {
    cfg.kind.validate()?;
    let sla = |topk| SlaConfig::with_blocks(topk, cfg.blocks);
    Ok(match cfg.kind {
        AttentionKind::Original => {
            Box::new(DenseAttention::load(vb, head_dim, &DenseConfig::default())?)
        }
        AttentionKind::Sla { topk } => Box::new(SlaAttention::load(vb, head_dim, &sla(topk)?)?),
        AttentionKind::SageSla { topk } => {
            Box::new(SageSlaAttention::load(vb, head_dim, &sla(topk)?)?)
        }
    })
}

impl LoadAttention for Box<dyn Attention> {
    type Config = AttentionConfig;

    fn load(vb: VarBuilder, head_dim: usize, cfg: &AttentionConfig) -> Result<Self> {
        load_attention(vb, head_dim, cfg)
    }

    fn weights(head_dim: usize, cfg: &AttentionConfig) -> Vec<(String, Vec<usize>)> {
        match cfg.kind {
            AttentionKind::Original => Vec::new(),
            AttentionKind::Sla { .. } | AttentionKind::SageSla { .. } => proj_l_weights(head_dim),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn configs_parse_with_block_sizes_and_print_back() {
        use super::{AttentionConfig, BlockSizes};
        use turbo_core::AttentionKind;
        let config: AttentionConfig = "sla:0.2:64x128".parse().unwrap();
        assert_eq!(config.kind, AttentionKind::sla(0.2).unwrap());
        assert_eq!(config.blocks, BlockSizes::new(64, 128).unwrap());
        assert_eq!(config.to_string(), "sla:0.2:64x128");
        assert_eq!(
            config.to_string().parse::<AttentionConfig>().unwrap(),
            config
        );
        let default: AttentionConfig = "sagesla".parse().unwrap();
        assert_eq!(default.blocks, BlockSizes::default());
        assert_eq!(
            "original".parse::<AttentionConfig>().unwrap().to_string(),
            "original"
        );
        for bad in [
            "sla:0.2:128",
            "sla:0.2:0x64",
            "original:0.1:128x64",
            "sla:2:128x64",
        ] {
            assert!(bad.parse::<AttentionConfig>().is_err(), "{bad}");
        }
        // The kind alone names the form that carries block sizes.
        let message = "sla:0.2:128x64"
            .parse::<AttentionKind>()
            .unwrap_err()
            .to_string();
        assert!(message.contains("AttentionConfig"), "{message}");
    }

    use super::*;

    #[test]
    fn selected_blocks_floor_with_at_least_one() {
        let cfg = SlaConfig::new(0.1).unwrap();
        assert_eq!(cfg.selected_blocks(512), 51);
        assert_eq!(cfg.selected_blocks(1182), 118);
        assert_eq!(cfg.selected_blocks(9), 1);
        assert_eq!(SlaConfig::new(0.3).unwrap().selected_blocks(9), 2);
        assert_eq!(SlaConfig::new(1.0).unwrap().selected_blocks(7), 7);
        assert!((cfg.density(32_760) - 51.0 / 512.0).abs() < 1e-12);
    }

    #[test]
    fn invalid_settings_are_typed_errors() {
        assert!(matches!(
            SlaConfig::new(0.0),
            Err(Error::InvalidTopk { .. })
        ));
        assert!(matches!(
            SlaConfig::with_blocks(0.1, BlockSizes { query: 0, key: 64 }),
            Err(Error::InvalidBlockSize { what: "query", .. })
        ));
        assert!(matches!(
            BlockSizes::new(64, 0),
            Err(Error::InvalidBlockSize { what: "key", .. })
        ));
    }
}
