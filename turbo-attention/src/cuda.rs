//! The CUDA path of the attention operators: the kernels of `turbo_kernels::ATTENTION`
//! (`turbo-kernels/kernels/attention.cu`) on bf16 tokens-first `[B, L, H, D]` tensors
//! with head dim 128; dense attention at any query and key lengths, SLA and SageSLA for
//! self-attention with the default 128 / 64 blocks. Every other input takes the reference
//! path, the CPU specification, which also runs on CUDA as candle ops (that is how f32 golden
//! parity is kept on the GPU).

use candle_core::cuda_backend::cudarc::driver::sys::CUfunction_attribute;
use candle_core::cuda_backend::cudarc::driver::{
    CudaFunction, CudaSlice, LaunchConfig, PushKernelArg,
};
use candle_core::cuda_backend::{CudaDevice, WrapErr};
use candle_core::{DType, Tensor};
use half::bf16;
use turbo_core::cuda::{cuda_view, tensor_from_cuda};
use turbo_core::{Error, Result};

use crate::quant::V_SCALE_MAX;
use crate::sla::SparseBranch;
use crate::{AttentionKernel, BlockSizes, ProjL, SlaConfig};

/// The head dimension the kernels are built for.
const HEAD_DIM: usize = 128;
/// Query rows per CTA; also the query block of SLA's selection.
const BLOCK_Q: usize = 128;
/// Keys per tile; also SLA's key block.
const BLOCK_K: usize = 64;
const THREADS: u32 = 256;
/// Key blocks per CTA of `key_value_stats`, at least: enough CTAs to fill the GPU at 480p.
const STATS_BLOCKS: usize = 8;
/// Chunks of `key_value_stats` per head, at most: their partial D×D states (64 KiB each) stay
/// small at any length (165 MB for the 14B at 720p instead of 390 MB).
const MAX_STATS_CHUNKS: usize = 64;
/// Dynamic shared memory of the attention kernels: two pipeline stages of a key and a value
/// tile, rows padded by 16 bytes (`2·STAGE_BYTES_*` in attention.cu).
const SHARED_BYTES_BF16: u32 = 2 * 2 * (BLOCK_K * (HEAD_DIM + 8) * 2) as u32;
const SHARED_BYTES_SAGE: u32 =
    2 * (BLOCK_K * (HEAD_DIM + 16) + BLOCK_K * (HEAD_DIM + 8) * 2) as u32;
const MODULE: &str = "turbo_attention";

/// A compiled form of the bf16 attention kernel (`sparse_attention_bf16`'s arguments).
struct AttentionVariant {
    module: &'static str,
    image: &'static [u8],
    function: &'static str,
    threads: u32,
    shared_bytes: u32,
}

/// `kernels/attention.cu`: 8 warps of `mma.sync`.
const MMA_SYNC: AttentionVariant = AttentionVariant {
    module: MODULE,
    image: turbo_kernels::ATTENTION,
    function: "sparse_attention_bf16",
    threads: THREADS,
    shared_bytes: SHARED_BYTES_BF16,
};

/// `kernels/attention_sm90a.cu`: a producer and two consumer warpgroups; 128 bytes of
/// mbarriers, then, aligned up to 1024 bytes, 6 stages of a key and a value tile.
const WGMMA: AttentionVariant = AttentionVariant {
    module: "turbo_attention_sm90a",
    image: turbo_kernels::ATTENTION_SM90A,
    function: "attention_wgmma_bf16",
    threads: 3 * 128,
    shared_bytes: (128 + 1024 + 6 * 2 * 2 * BLOCK_K * HEAD_DIM) as u32,
};

/// `kernels/attention.cu`'s SageSLA kernel: 8 warps of `mma.sync`.
const SAGE_MMA_SYNC: AttentionVariant = AttentionVariant {
    function: "sparse_attention_sage",
    shared_bytes: SHARED_BYTES_SAGE,
    ..MMA_SYNC
};

/// The SageSLA form of [`WGMMA`].
const SAGE_WGMMA: AttentionVariant = AttentionVariant {
    function: "attention_wgmma_sage",
    ..WGMMA
};

/// The variant that runs `kernel` on `dev` for the sparse `branch` (dense attention is
/// [`SparseBranch::Exact`] over every key block): wgmma needs compute capability 9.0 exactly
/// (sm_90a code runs on no other).
fn attention_variant(
    dev: &CudaDevice,
    kernel: AttentionKernel,
    branch: SparseBranch,
) -> Result<&'static AttentionVariant> {
    let hopper = dev.cuda_stream().context().compute_capability().w()? == (9, 0);
    Ok(match (kernel == AttentionKernel::Wgmma && hopper, branch) {
        (true, SparseBranch::Exact) => &WGMMA,
        (true, SparseBranch::Sage) => &SAGE_WGMMA,
        (false, SparseBranch::Exact) => &MMA_SYNC,
        (false, SparseBranch::Sage) => &SAGE_MMA_SYNC,
    })
}

/// Whether the flash kernel takes these inputs for dense attention (otherwise the caller runs
/// the reference path): bf16 on CUDA, head dim 128, queries and keys differing at most in
/// length.
pub(crate) fn flash_applies(q: &Tensor, k: &Tensor) -> bool {
    let (q_dims, k_dims) = (q.dims(), k.dims());
    q.device().is_cuda()
        && q.dtype() == DType::BF16
        && q_dims.len() == 4
        && k_dims.len() == 4
        && q_dims[3] == HEAD_DIM
        && (q_dims[0], q_dims[2], q_dims[3]) == (k_dims[0], k_dims[2], k_dims[3])
}

/// Whether the sparse kernels take these inputs: the flash conditions, self-attention, and
/// the kernels' 128 / 64 blocks.
pub(crate) fn sparse_applies(q: &Tensor, k: &Tensor, blocks: BlockSizes) -> bool {
    flash_applies(q, k) && q.dims() == k.dims() && blocks == BlockSizes::default()
}

/// SLA (`branch` Exact) or SageSLA (Sage) on the kernels, bf16 in and out: one pass over K
/// and V for the statistics, the block selection, then the sparse branch with the linear branch
/// and `proj_l` in its epilogue.
pub(crate) fn sla_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    cfg: &SlaConfig,
    proj_l: &ProjL,
    branch: SparseBranch,
) -> Result<Tensor> {
    let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
    let geometry = Geometry::of(&q)?;
    let stats = KeyValueStats::compute(&k, &v, &geometry)?;
    let selection = select_blocks(&q, &stats, cfg, &geometry)?;
    let linear = LinearState::new(&stats, proj_l)?;
    match branch {
        SparseBranch::Exact => {
            attention_kernel(&q, &k, &v, Some((&selection, &linear)), cfg.kernel)
        }
        SparseBranch::Sage => sage_attention(&q, &k, &v, &stats, &selection, &linear, cfg.kernel),
    }
}

/// Dense flash attention in bf16 (keys may be fewer or more than queries).
pub(crate) fn flash_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    kernel: AttentionKernel,
) -> Result<Tensor> {
    let (q, k, v) = (aligned(q)?, aligned(k)?, aligned(v)?);
    attention_kernel(&q, &k, &v, None, kernel)
}

/// What SLA needs from one pass over K and V (`key_value_stats`), per (batch, head).
struct KeyValueStats {
    /// `[B·H, ⌈L/64⌉, D]` f32: the mean of each key block.
    key_block_means: Tensor,
    /// `[B·H, 1, D]` f32: the mean key.
    key_mean: Tensor,
    /// `[B·H, D, D]` f32: `H = φ(K)ᵀV` over all keys.
    state: Tensor,
    /// `[B·H, D]` f32: `z = Σ φ(K)`.
    z: Tensor,
    /// `[B·H, D]` f32: V's per-channel absolute maximum.
    v_amax: Tensor,
}

impl KeyValueStats {
    fn compute(k: &Tensor, v: &Tensor, geometry: &Geometry) -> Result<Self> {
        let dev = k.device().as_cuda_device()?;
        let (bh, len) = (geometry.batch_heads(), geometry.len as usize);
        let key_blocks = len.div_ceil(BLOCK_K);
        let blocks_per_chunk = STATS_BLOCKS.max(key_blocks.div_ceil(MAX_STATS_CHUNKS));
        let chunks = key_blocks.div_ceil(blocks_per_chunk);
        let block_means = unsafe { dev.alloc::<f32>(bh * key_blocks * HEAD_DIM) }?;
        let key_sums = unsafe { dev.alloc::<f32>(bh * chunks * HEAD_DIM) }?;
        let state = unsafe { dev.alloc::<f32>(bh * chunks * HEAD_DIM * HEAD_DIM) }?;
        let z = unsafe { dev.alloc::<f32>(bh * chunks * HEAD_DIM) }?;
        let v_amax = unsafe { dev.alloc::<f32>(bh * chunks * HEAD_DIM) }?;
        {
            let (ks, kl) = k.storage_and_layout();
            let (vs, vl) = v.storage_and_layout();
            let k_view = cuda_view::<bf16>(&ks, kl.start_offset(), "k")?;
            let v_view = cuda_view::<bf16>(&vs, vl.start_offset(), "v")?;
            let func =
                turbo_core::cuda::kernel(dev, "key_value_stats", MODULE, turbo_kernels::ATTENTION)?;
            let blocks_per_chunk_arg = blocks_per_chunk as i32;
            let mut launch = func.builder();
            launch
                .arg(&k_view)
                .arg(&v_view)
                .arg(&block_means)
                .arg(&key_sums)
                .arg(&state)
                .arg(&z)
                .arg(&v_amax)
                .arg(&geometry.heads)
                .arg(&geometry.len)
                .arg(&blocks_per_chunk_arg);
            let cfg = grid(chunks, bh, 0);
            unsafe { launch.launch(cfg) }.w()?;
        }
        let reduce = |partial: &CudaSlice<f32>, n: usize, reduction: Reduction| {
            let total = reduce_chunks(dev, partial, [bh, chunks, n], reduction)?;
            Ok::<_, Error>(tensor_from_cuda(total, dev, (bh, n)))
        };
        let key_sum = reduce(&key_sums, HEAD_DIM, Reduction::Sum)?;
        Ok(Self {
            key_block_means: tensor_from_cuda(block_means, dev, (bh, key_blocks, HEAD_DIM)),
            key_mean: (key_sum.unsqueeze(1)? / len as f64)?,
            state: reduce(&state, HEAD_DIM * HEAD_DIM, Reduction::Sum)?
                .reshape((bh, HEAD_DIM, HEAD_DIM))?,
            z: reduce(&z, HEAD_DIM, Reduction::Sum)?,
            v_amax: reduce(&v_amax, HEAD_DIM, Reduction::Max)?,
        })
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Reduction {
    Sum,
    Max,
}

/// `[batches, n]`: the `[batches, chunks, n]` partial results reduced over the chunks, in
/// chunk order (deterministic, unlike atomics).
fn reduce_chunks(
    dev: &CudaDevice,
    partial: &CudaSlice<f32>,
    [batches, chunks, n]: [usize; 3],
    reduction: Reduction,
) -> Result<CudaSlice<f32>> {
    let out = unsafe { dev.alloc::<f32>(batches * n) }?;
    let func = turbo_core::cuda::kernel(dev, "reduce_chunks", MODULE, turbo_kernels::ATTENTION)?;
    let mut launch = func.builder();
    let args = [
        chunks as i32,
        n as i32,
        i32::from(reduction == Reduction::Max),
    ];
    launch.arg(partial).arg(&out);
    for arg in &args {
        launch.arg(arg);
    }
    let cfg = grid(n.div_ceil(THREADS as usize), batches, 0);
    unsafe { launch.launch(cfg) }.w()?;
    Ok(out)
}

/// The linear branch as the attention kernels' epilogue takes it: `proj_l` folded into the
/// state, `proj_l(φ(q)·H / (φ(q)·z + eps)) = φ(q)·(H·Wᵀ) / (φ(q)·z + eps) + b`.
struct LinearState {
    /// `[B·H, D, D]` bf16: `(H·Wᵀ)ᵀ`, one output channel per row.
    folded: Tensor,
    /// `[B·H, D]` f32.
    z: Tensor,
    /// `[D]` f32.
    bias: Tensor,
}

impl LinearState {
    fn new(stats: &KeyValueStats, proj_l: &ProjL) -> Result<Self> {
        let folded = stats.state.broadcast_matmul(proj_l.weight_t())?;
        Ok(Self {
            folded: folded
                .transpose(1, 2)?
                .to_dtype(DType::BF16)?
                .contiguous()?,
            z: stats.z.contiguous()?,
            bias: proj_l.bias().contiguous()?,
        })
    }
}

/// The selected key blocks on the device: `[B·H·n_q, per_row]` u32, ascending per row.
struct DeviceSelection {
    indices: Tensor,
    per_row: usize,
}

/// SLA's block selection on the device: the pooled scores `mean(q_i) · mean(k_j − mean(k))`
/// from the query block means (a kernel) and the key statistics, the top-k a kernel.
fn select_blocks(
    q: &Tensor,
    stats: &KeyValueStats,
    cfg: &SlaConfig,
    geometry: &Geometry,
) -> Result<DeviceSelection> {
    let pooled_q = query_block_means(q, geometry)?;
    let pooled_k = stats.key_block_means.broadcast_sub(&stats.key_mean)?;
    let scores = pooled_q
        .matmul(&pooled_k.t()?)?
        .flatten_to(1)?
        .contiguous()?;
    let (rows, key_blocks) = scores.dims2()?;
    let per_row = cfg.selected_blocks(key_blocks);
    let dev = scores.device().as_cuda_device()?;
    let out = unsafe { dev.alloc::<u32>(rows * per_row) }?;
    {
        let (storage, layout) = scores.storage_and_layout();
        let scores = cuda_view::<f32>(&storage, layout.start_offset(), "pooled scores")?;
        let func = turbo_core::cuda::kernel(dev, "top_blocks", MODULE, turbo_kernels::ATTENTION)?;
        let mut launch = func.builder();
        let (n, count) = (key_blocks as i32, per_row as i32);
        launch.arg(&scores).arg(&out).arg(&n).arg(&count);
        let cfg = grid(rows, 1, (key_blocks * 4) as u32);
        unsafe { launch.launch(cfg) }.w()?;
    }
    Ok(DeviceSelection {
        indices: tensor_from_cuda(out, dev, (rows, per_row)),
        per_row,
    })
}

/// `[B·H, ⌈L/128⌉, D]` f32: the mean of each query block.
fn query_block_means(q: &Tensor, geometry: &Geometry) -> Result<Tensor> {
    let dev = q.device().as_cuda_device()?;
    let (bh, blocks) = (
        geometry.batch_heads(),
        (geometry.len as usize).div_ceil(BLOCK_Q),
    );
    let out = unsafe { dev.alloc::<f32>(bh * blocks * HEAD_DIM) }?;
    {
        let (qs, ql) = q.storage_and_layout();
        let q_view = cuda_view::<bf16>(&qs, ql.start_offset(), "q")?;
        let func = turbo_core::cuda::kernel(dev, "block_means", MODULE, turbo_kernels::ATTENTION)?;
        let mut launch = func.builder();
        let block = BLOCK_Q as i32;
        launch
            .arg(&q_view)
            .arg(&out)
            .arg(&geometry.heads)
            .arg(&geometry.len)
            .arg(&block);
        let cfg = grid(blocks, bh, 0);
        unsafe { launch.launch(cfg) }.w()?;
    }
    Ok(tensor_from_cuda(out, dev, (bh, blocks, HEAD_DIM)))
}

/// The bf16 attention kernel over every key block (`sparse` None; keys may be fewer or more
/// than queries) or over the selected ones with the linear branch.
fn attention_kernel(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    sparse: Option<(&DeviceSelection, &LinearState)>,
    kernel: AttentionKernel,
) -> Result<Tensor> {
    let geometry = Geometry::of(q)?;
    let dev = q.device().as_cuda_device()?;
    let out = unsafe { dev.alloc::<bf16>(q.elem_count()) }?;
    let (qs, ql) = q.storage_and_layout();
    let (ks, kl) = k.storage_and_layout();
    let (vs, vl) = v.storage_and_layout();
    let (q_view, k_view, v_view) = (
        cuda_view::<bf16>(&qs, ql.start_offset(), "q")?,
        cuda_view::<bf16>(&ks, kl.start_offset(), "k")?,
        cuda_view::<bf16>(&vs, vl.start_offset(), "v")?,
    );
    let guards = sparse.map(|(selection, linear)| {
        [&selection.indices, &linear.folded, &linear.z, &linear.bias]
            .map(|t| t.storage_and_layout().0)
    });
    let views = match &guards {
        Some(g) => Some((
            cuda_view::<u32>(&g[0], 0, "block indices")?,
            cuda_view::<bf16>(&g[1], 0, "linear state")?,
            cuda_view::<f32>(&g[2], 0, "linear z")?,
            cuda_view::<f32>(&g[3], 0, "proj_l bias")?,
        )),
        None => None,
    };
    let kv_len = Geometry::of(k)?.len;
    let n_sel = sparse.map_or((kv_len as usize).div_ceil(BLOCK_K), |(s, _)| s.per_row) as i32;
    let scale_log2 = std::f32::consts::LOG2_E / (HEAD_DIM as f32).sqrt();
    let eps = SlaConfig::LINEAR_EPS as f32;
    let variant = attention_variant(dev, kernel, SparseBranch::Exact)?;
    let func = turbo_core::cuda::kernel(dev, variant.function, variant.module, variant.image)?;
    allow_shared_memory(&func, variant.shared_bytes)?;
    let mut launch = func.builder();
    let null: u64 = 0;
    launch.arg(&q_view).arg(&k_view).arg(&v_view);
    match &views {
        Some((indices, folded, z, bias)) => launch.arg(indices).arg(folded).arg(z).arg(bias),
        None => launch.arg(&null).arg(&null).arg(&null).arg(&null),
    };
    launch
        .arg(&out)
        .arg(&geometry.heads)
        .arg(&geometry.len)
        .arg(&kv_len)
        .arg(&n_sel)
        .arg(&scale_log2)
        .arg(&eps);
    unsafe { launch.launch(geometry.attention_launch(variant)) }.w()?;
    Ok(tensor_from_cuda(out, dev, q.shape().clone()))
}

/// SageSLA's sparse branch and the linear branch: K − mean(K) to int8 per key block and V to
/// E4M3 per channel in one pass, then the int8 / FP8 attention kernel (which quantises each
/// query block itself) over the selected blocks.
fn sage_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    stats: &KeyValueStats,
    selection: &DeviceSelection,
    linear: &LinearState,
    kernel: AttentionKernel,
) -> Result<Tensor> {
    let geometry = Geometry::of(q)?;
    let dev = q.device().as_cuda_device()?;
    let v_scale = (&stats.v_amax / f64::from(V_SCALE_MAX))?.contiguous()?;
    let keys_values =
        quantize_keys_values(k, v, &stats.key_mean.contiguous()?, &v_scale, &geometry)?;

    let out = unsafe { dev.alloc::<bf16>(q.elem_count()) }?;
    let (qs, ql) = q.storage_and_layout();
    let q_view = cuda_view::<bf16>(&qs, ql.start_offset(), "q")?;
    let guards = [
        &keys_values.k8,
        &keys_values.v8,
        &keys_values.k_scale,
        &v_scale,
        &selection.indices,
        &linear.folded,
        &linear.z,
        &linear.bias,
    ]
    .map(|t| t.storage_and_layout().0);
    let k8_view = cuda_view::<u8>(&guards[0], 0, "int8 k")?;
    let v8_view = cuda_view::<bf16>(&guards[1], 0, "e4m3 v")?;
    let k_scale_view = cuda_view::<f32>(&guards[2], 0, "k scales")?;
    let v_scale_view = cuda_view::<f32>(&guards[3], 0, "v scales")?;
    let index_view = cuda_view::<u32>(&guards[4], 0, "block indices")?;
    let folded_view = cuda_view::<bf16>(&guards[5], 0, "linear state")?;
    let z_view = cuda_view::<f32>(&guards[6], 0, "linear z")?;
    let bias_view = cuda_view::<f32>(&guards[7], 0, "proj_l bias")?;
    let score_scale = std::f32::consts::LOG2_E / (HEAD_DIM as f32).sqrt();
    let eps = SlaConfig::LINEAR_EPS as f32;
    let n_sel = selection.per_row as i32;
    let variant = attention_variant(dev, kernel, SparseBranch::Sage)?;
    let func = turbo_core::cuda::kernel(dev, variant.function, variant.module, variant.image)?;
    allow_shared_memory(&func, variant.shared_bytes)?;
    let mut launch = func.builder();
    launch
        .arg(&q_view)
        .arg(&k8_view)
        .arg(&v8_view)
        .arg(&k_scale_view)
        .arg(&v_scale_view)
        .arg(&index_view)
        .arg(&folded_view)
        .arg(&z_view)
        .arg(&bias_view)
        .arg(&out)
        .arg(&geometry.heads)
        .arg(&geometry.len)
        .arg(&n_sel)
        .arg(&score_scale)
        .arg(&eps);
    unsafe { launch.launch(geometry.attention_launch(variant)) }.w()?;
    Ok(tensor_from_cuda(out, dev, q.shape().clone()))
}

/// SageSLA's quantised keys and values (`quantize_keys_values`).
struct QuantisedKeysValues {
    /// Int8 `K − mean(K)` as `U8` bytes, the layout of `k`.
    k8: Tensor,
    /// `[B·H, ⌈L/64⌉]` f32.
    k_scale: Tensor,
    /// E4M3 values of `v / v_scale` held in bf16, the layout of `v`.
    v8: Tensor,
}

fn quantize_keys_values(
    k: &Tensor,
    v: &Tensor,
    k_mean: &Tensor,
    v_scale: &Tensor,
    geometry: &Geometry,
) -> Result<QuantisedKeysValues> {
    let dev = k.device().as_cuda_device()?;
    let (bh, blocks) = (
        geometry.batch_heads(),
        (geometry.len as usize).div_ceil(BLOCK_K),
    );
    let k8 = unsafe { dev.alloc::<u8>(k.elem_count()) }?;
    let v8 = unsafe { dev.alloc::<bf16>(v.elem_count()) }?;
    let k_scale = unsafe { dev.alloc::<f32>(bh * blocks) }?;
    {
        let guards = [k, v, k_mean, v_scale].map(|t| t.storage_and_layout());
        let k_view = cuda_view::<bf16>(&guards[0].0, guards[0].1.start_offset(), "k")?;
        let v_view = cuda_view::<bf16>(&guards[1].0, guards[1].1.start_offset(), "v")?;
        let mean_view = cuda_view::<f32>(&guards[2].0, guards[2].1.start_offset(), "k mean")?;
        let scale_view = cuda_view::<f32>(&guards[3].0, guards[3].1.start_offset(), "v scales")?;
        let func = turbo_core::cuda::kernel(
            dev,
            "quantize_keys_values",
            MODULE,
            turbo_kernels::ATTENTION,
        )?;
        let mut launch = func.builder();
        launch
            .arg(&k_view)
            .arg(&v_view)
            .arg(&mean_view)
            .arg(&scale_view)
            .arg(&k8)
            .arg(&v8)
            .arg(&k_scale)
            .arg(&geometry.heads)
            .arg(&geometry.len);
        let cfg = grid(blocks, bh, 0);
        unsafe { launch.launch(cfg) }.w()?;
    }
    Ok(QuantisedKeysValues {
        k8: tensor_from_cuda(k8, dev, k.shape().clone()),
        k_scale: tensor_from_cuda(k_scale, dev, (bh, blocks)),
        v8: tensor_from_cuda(v8, dev, v.shape().clone()),
    })
}

/// Allows `func` `shared_bytes` of dynamic shared memory (above the default 48 KiB only on
/// request).
fn allow_shared_memory(func: &CudaFunction, shared_bytes: u32) -> Result<()> {
    func.set_attribute(
        CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared_bytes as i32,
    )
    .w()?;
    Ok(())
}

/// The sizes a launch needs, as the kernels take them.
struct Geometry {
    batch: i32,
    len: i32,
    heads: i32,
}

impl Geometry {
    fn of(q: &Tensor) -> Result<Self> {
        let (batch, len, heads, _) = q.dims4()?;
        let narrow = |value: usize| {
            i32::try_from(value).map_err(|_| Error::Shape {
                what: "attention input (too large for the CUDA kernels)".into(),
                expected: "dimensions below 2^31".into(),
                got: q.dims().to_vec(),
            })
        };
        Ok(Self {
            batch: narrow(batch)?,
            len: narrow(len)?,
            heads: narrow(heads)?,
        })
    }

    fn batch_heads(&self) -> usize {
        (self.batch * self.heads) as usize
    }

    /// One CTA of `variant` per query block and (batch, head).
    fn attention_launch(&self, variant: &AttentionVariant) -> LaunchConfig {
        let query_blocks = (self.len as usize).div_ceil(BLOCK_Q);
        LaunchConfig {
            block_dim: (variant.threads, 1, 1),
            ..grid(query_blocks, self.batch_heads(), variant.shared_bytes)
        }
    }
}

/// A `(x, y)` grid of CTAs of `THREADS` threads with `shared_bytes` of dynamic shared memory.
fn grid(x: usize, y: usize, shared_bytes: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (x as u32, y as u32, 1),
        block_dim: (THREADS, 1, 1),
        shared_mem_bytes: shared_bytes,
    }
}

/// `x` contiguous and starting on a 16-byte boundary (the kernels load 16 bytes at a time).
fn aligned(x: &Tensor) -> Result<Tensor> {
    let x = x.contiguous()?;
    let offset_bytes = x.layout().start_offset() * x.dtype().size_in_bytes();
    Ok(if offset_bytes % 16 == 0 { x } else { x.copy()? })
}
