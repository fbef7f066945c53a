//! Samplers for the Wan flow-matching models: rCM (1–4 steps), the UniPC / DPM-Solver++ /
//! Euler teachers with shift and classifier-free guidance, and two-expert switching.
//!
//! Not implemented yet: see the issue "Samplers (turbo-sampler)".
