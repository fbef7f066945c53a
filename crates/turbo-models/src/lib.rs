//! The Wan DiT, the umT5 text encoder and tokenizer, the Wan VAE, and checkpoint loading.
//!
//! Not implemented yet: see the issues for the DiT and for umT5 + VAE.
