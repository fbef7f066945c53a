//! Synthetic videos and quality measures shared by the integration tests.

#![allow(dead_code)]

use std::path::{Path, PathBuf};

use turbo_video::{Fps, Video};

/// A smooth colour field under a soft bright blob that moves (3, 2) pixels per frame: motion for
/// the inter-frame coder, and no hard colour edges (which 4:2:0 chroma cannot keep whatever the
/// codec).
pub fn moving_frames(width: usize, height: usize, frames: usize) -> Vec<Vec<u8>> {
    (0..frames)
        .map(|t| {
            let (cx, cy) = ((8 + 3 * t) as f64, (8 + 2 * t) as f64);
            let mut rgb = Vec::with_capacity(width * height * 3);
            for y in 0..height {
                for x in 0..width {
                    let d2 = (x as f64 - cx).powi(2) + (y as f64 - cy).powi(2);
                    let blob = (-d2 / 50.0).exp();
                    let background = [
                        40.0 + 160.0 * x as f64 / width as f64,
                        60.0 + 140.0 * y as f64 / height as f64,
                        180.0 - 100.0 * (x + y) as f64 / (width + height) as f64,
                    ];
                    let highlight = [240.0, 220.0, 60.0];
                    for c in 0..3 {
                        let value = background[c] + blob * (highlight[c] - background[c]);
                        rgb.push(value.round() as u8);
                    }
                }
            }
            rgb
        })
        .collect()
}

pub fn moving_video(width: usize, height: usize, frames: usize, fps: f64) -> Video {
    let fps = Fps::new(fps).unwrap();
    Video::new(width, height, fps, moving_frames(width, height, frames)).unwrap()
}

/// Peak signal-to-noise ratio in dB of `test` against `reference` (8-bit samples).
pub fn psnr(reference: &[u8], test: &[u8]) -> f64 {
    assert_eq!(reference.len(), test.len());
    let squared_error: f64 = reference
        .iter()
        .zip(test)
        .map(|(&a, &b)| (f64::from(a) - f64::from(b)).powi(2))
        .sum();
    let mse = squared_error / reference.len() as f64;
    10.0 * (255.0f64 * 255.0 / mse).log10()
}

/// The entries of a directory, sorted.
pub fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    paths.sort();
    paths
}
