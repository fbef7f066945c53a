//! W8A8 int8 linears for the Wan DiT: tile quantisation (one fp32 scale per 128×128 tile), the
//! `Linear` that is either bf16 or int8, and the int8 GEMM.
//!
//! Not implemented yet: see the issue "W8A8 int8 linears (turbo-quant)".
