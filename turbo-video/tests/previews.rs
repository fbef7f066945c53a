//! PNG frames and the animated GIF preview, read back with the `image` crate.

mod common;

use std::fs::File;
use std::io::BufReader;

use common::{entries, moving_video, psnr};
use image::codecs::gif::GifDecoder;
use image::AnimationDecoder;

#[test]
fn png_frames_are_numbered_and_lossless() {
    let dir = tempfile::tempdir().unwrap();
    let frames_dir = dir.path().join("frames");
    let video = moving_video(40, 24, 3, 16.0);
    let paths = video.write_png_frames(&frames_dir, "frame_").unwrap();
    let names: Vec<String> = paths
        .iter()
        .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        ["frame_0000.png", "frame_0001.png", "frame_0002.png"]
    );
    assert_eq!(entries(&frames_dir), paths, "no temporary file is left");
    for (path, frame) in paths.iter().zip(video.frames()) {
        let image = image::open(path).unwrap().into_rgb8();
        assert_eq!(image.dimensions(), (40, 24));
        assert_eq!(image.as_raw(), frame);
    }
}

#[test]
fn gif_preview_keeps_every_frame_and_the_rate() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preview.gif");
    let video = moving_video(48, 32, 5, 20.0);
    video.write_gif(&path).unwrap();
    assert_eq!(entries(dir.path()), std::slice::from_ref(&path));

    let decoder = GifDecoder::new(BufReader::new(File::open(&path).unwrap())).unwrap();
    let frames = decoder.into_frames().collect_frames().unwrap();
    assert_eq!(frames.len(), 5);
    for (decoded, original) in frames.iter().zip(video.frames()) {
        let (numer, denom) = decoded.delay().numer_denom_ms();
        assert_eq!(numer / denom, 50, "1/20 s per frame");
        let rgb: Vec<u8> = decoded
            .buffer()
            .pixels()
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect();
        // A 256-colour palette per frame: close, not exact.
        let quality = psnr(original, &rgb);
        assert!(quality > 28.0, "GIF frame PSNR {quality:.1} dB");
    }
}
