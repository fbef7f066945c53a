//! Inputs shared by the pipeline tests.

use turbodiffusion::video::InputImage;

/// A `width × height` image whose red rises left to right and green top to bottom: every
/// pixel differs from its neighbours, so a misplaced row or column changes the video.
pub fn gradient_image(width: u32, height: u32) -> InputImage {
    let rgb = (0..height)
        .flat_map(|y| {
            (0..width).flat_map(move |x| [(x * 255 / width) as u8, (y * 255 / height) as u8, 128])
        })
        .collect();
    InputImage::from_rgb(width, height, rgb).unwrap()
}
