//! The MP4 reader (demuxer and H.264 decoder) on arbitrary bytes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let path = turbodiffusion_fuzz::input_file("mp4", data);
    let _ = turbo_video::Video::read_mp4(&path);
});
