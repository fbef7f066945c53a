//! The CUDA kernels of turbodiffusion-rs as fatbins (machine code for the build's compute
//! capability and its PTX), compiled from `kernels/*.cu` by nvcc at build time under this
//! crate's `cuda` feature (which the other crates' `cuda` features enable); without it the
//! crate is empty.
//!
//! Load a kernel with `turbo_core::cuda::kernel(device, name, module, image)`, passing one of
//! the constants here as `image` and its name as `module`.

/// Flash-style dense and block-sparse attention (bf16 and SageSLA's int8/E4M3 variant), block
/// top-k selection and the SageSLA quantisers: `kernels/attention.cu`.
#[cfg(feature = "cuda")]
pub const ATTENTION: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/attention.fatbin"));

/// The bf16 dense and block-sparse attention kernel on Hopper's `wgmma` instructions (the
/// arguments of [`ATTENTION`]'s `sparse_attention_bf16`; sm_90a code, which loads only on compute
/// capability 9.0 devices): `kernels/attention_sm90a.cu`.
#[cfg(feature = "cuda")]
pub const ATTENTION_SM90A: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/attention_sm90a.fatbin"));

/// W8A8 linears: activation quantisation into 128×128 tiles and the block-scaled int8 GEMM:
/// `kernels/w8a8.cu`.
#[cfg(feature = "cuda")]
pub const W8A8: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/w8a8.fatbin"));

/// The W8A8 GEMM on Hopper's `wgmma` tensor-core instructions (same arguments as the GEMMs
/// of [`W8A8`]; sm_90a code, which loads only on compute capability 9.0 devices):
/// `kernels/w8a8_sm90a.cu`.
#[cfg(feature = "cuda")]
pub const W8A8_SM90A: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/w8a8_sm90a.fatbin"));

/// Fused row and elementwise ops of the DiT and the linears (LayerNorm with modulation, gated
/// residual, bias add): `kernels/fused.cu`.
#[cfg(feature = "cuda")]
pub const FUSED: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/fused.fatbin"));

/// The im2col step of the VAE's convolutions, in the layout of one NCHW-writing GEMM:
/// `kernels/conv.cu`.
#[cfg(feature = "cuda")]
pub const CONV: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/conv.fatbin"));

/// The VAE's stride-1 convolutions on Hopper's `wgmma` instructions, fed by TMA from a
/// channels-last input (written by [`CONV`]'s `channels_last_bf16`); sm_90a code, which loads
/// only on compute capability 9.0 devices: `kernels/conv_sm90a.cu`.
#[cfg(feature = "cuda")]
pub const CONV_SM90A: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/conv_sm90a.fatbin"));
