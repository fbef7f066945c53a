//! The `.pth` reader (zip archive, pickle, storage extents) on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    turbodiffusion_fuzz::open_and_read_checkpoint("pth", data);
});
