//! The safetensors header reader (length, JSON, tensor extents) and the tensor reads after it,
//! on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    turbodiffusion_fuzz::open_and_read_checkpoint("safetensors", data);
});
