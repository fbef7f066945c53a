//! The CUDA kernels of turbodiffusion-rs as PTX text, compiled from `kernels/*.cu` by nvcc at
//! build time under this crate's `cuda` feature (which the other crates' `cuda` features
//! enable); without it the crate is empty.
//!
//! Load a module with `CudaDevice::get_or_load_custom_func(name, module, ptx)`, passing one of
//! the constants here as `ptx` and its name as `module`.

/// Flash-style dense and block-sparse attention (bf16 and SageSLA's int8/E4M3 variant), block
/// top-k selection and the SageSLA quantisers: `kernels/attention.cu`.
#[cfg(feature = "cuda")]
pub const ATTENTION: &str = include_str!(concat!(env!("OUT_DIR"), "/attention.ptx"));

/// The bf16 dense and block-sparse attention kernel on Hopper's `wgmma` instructions (the
/// arguments of [`ATTENTION`]'s `sparse_attention_bf16`; sm_90a PTX, which loads only on compute
/// capability 9.0 devices): `kernels/attention_sm90a.cu`.
#[cfg(feature = "cuda")]
pub const ATTENTION_SM90A: &str = include_str!(concat!(env!("OUT_DIR"), "/attention_sm90a.ptx"));

/// W8A8 linears: activation quantisation into 128×128 tiles and the block-scaled int8 GEMM:
/// `kernels/w8a8.cu`.
#[cfg(feature = "cuda")]
pub const W8A8: &str = include_str!(concat!(env!("OUT_DIR"), "/w8a8.ptx"));

/// The W8A8 GEMM on Hopper's `wgmma` tensor-core instructions (same arguments as the GEMMs
/// of [`W8A8`]; sm_90a PTX, which loads only on compute capability 9.0 devices):
/// `kernels/w8a8_sm90a.cu`.
#[cfg(feature = "cuda")]
pub const W8A8_SM90A: &str = include_str!(concat!(env!("OUT_DIR"), "/w8a8_sm90a.ptx"));

/// Fused row and elementwise ops of the DiT and the linears (LayerNorm with modulation, gated
/// residual, bias add): `kernels/fused.cu`.
#[cfg(feature = "cuda")]
pub const FUSED: &str = include_str!(concat!(env!("OUT_DIR"), "/fused.ptx"));

/// The im2col step of the VAE's convolutions, in the layout of one NCHW-writing GEMM:
/// `kernels/conv.cu`.
#[cfg(feature = "cuda")]
pub const CONV: &str = include_str!(concat!(env!("OUT_DIR"), "/conv.ptx"));

/// The VAE's stride-1 convolutions on Hopper's `wgmma` instructions, fed by TMA from a
/// channels-last input (written by [`CONV`]'s `channels_last_bf16`); sm_90a PTX, which loads
/// only on compute capability 9.0 devices: `kernels/conv_sm90a.cu`.
#[cfg(feature = "cuda")]
pub const CONV_SM90A: &str = include_str!(concat!(env!("OUT_DIR"), "/conv_sm90a.ptx"));
