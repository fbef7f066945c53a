//! Image input: loading, the adaptive resolution rule, resizing and the tensor conversion.

use candle_core::Device;
use image::{ImageFormat, RgbImage};
use proptest::prelude::*;
use turbo_core::{AspectRatio, Error, FrameSize, Resolution};
use turbo_video::{adaptive_frame_size, ImageFit, InputImage};

fn adaptive(resolution: &str, aspect: &str, width: u32, height: u32) -> (usize, usize) {
    let size = adaptive_frame_size(
        resolution.parse().unwrap(),
        aspect.parse().unwrap(),
        width,
        height,
    )
    .unwrap();
    (size.width(), size.height())
}

/// Expected sizes computed with upstream's Python expressions (`np.sqrt`, built-in `round`).
#[test]
fn adaptive_resolution_pins_upstream_sizes() {
    assert_eq!(adaptive("480p", "16:9", 1920, 1080), (848, 480));
    assert_eq!(adaptive("480p", "16:9", 1000, 1000), (624, 624));
    assert_eq!(adaptive("480p", "16:9", 1024, 768), (736, 544));
    assert_eq!(adaptive("720p", "16:9", 1080, 1920), (720, 1280));
    assert_eq!(adaptive("720p", "16:9", 3000, 1000), (1664, 560));
    // Exact ties go to the even multiple: 130x192 gives w*/16 = 32.5 → 32 (not 33), and
    // 4800x5329 gives h*/16 = 36.5 → 36 (not 37).
    assert_eq!(adaptive("480p", "16:9", 130, 192), (512, 768));
    assert_eq!(adaptive("480p", "4:3", 4800, 5329), (528, 576));
}

#[test]
fn fixed_size_comes_from_the_table() {
    let image = InputImage::from_rgb(300, 100, vec![0; 300 * 100 * 3]).unwrap();
    for resolution in Resolution::ALL {
        for aspect in AspectRatio::ALL {
            let size = image.frame_size(resolution, aspect, false).unwrap();
            assert_eq!(size, resolution.frame_size(aspect));
        }
    }
    let adaptive = image
        .frame_size(Resolution::P480, AspectRatio::Wide16x9, true)
        .unwrap();
    assert_eq!((adaptive.width(), adaptive.height()), (1088, 368));
    assert!(adaptive_frame_size(Resolution::P480, AspectRatio::Square, 0, 10).is_err());
}

/// A 1×4000 image used to ask for a 16×60720 video: degenerate aspect ratios are a typed
/// error naming the image size.
#[test]
fn degenerate_aspect_ratios_are_refused() {
    for (width, height) in [(1, 4000), (4000, 1), (401, 100)] {
        match adaptive_frame_size(Resolution::P720, AspectRatio::Wide16x9, width, height) {
            Err(turbo_core::Error::OutOfRange { what, value, .. }) => {
                assert_eq!(what, "input image aspect ratio");
                assert_eq!(value, format!("{width}x{height}"));
            }
            other => panic!("{width}x{height}: {other:?}"),
        }
    }
    assert!(adaptive_frame_size(Resolution::P720, AspectRatio::Wide16x9, 400, 100).is_ok());
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Each side is the ideal side rounded to a multiple of 16, so the area stays close to the
    /// table's and the aspect close to the image's.
    #[test]
    fn adaptive_sizes_round_the_ideal_sides(
        width in 200u32..5000,
        height in 200u32..5000,
        resolution in prop::sample::select(Resolution::ALL.to_vec()),
        aspect in prop::sample::select(AspectRatio::ALL.to_vec()),
    ) {
        let table = resolution.frame_size(aspect);
        let area = (table.width() * table.height()) as f64;
        let ratio = f64::from(height) / f64::from(width);
        let size = adaptive_frame_size(resolution, aspect, width, height);
        // Images more elongated than 4:1 are refused (they would round a side to zero or
        // give a sliver of a video).
        let elongated = width.max(height) > 4 * width.min(height);
        prop_assert_eq!(size.is_err(), elongated);
        prop_assume!(!elongated);
        let (ideal_w, ideal_h) = ((area / ratio).sqrt(), (area * ratio).sqrt());
        let size = size.unwrap();
        prop_assert!((size.width() as f64 - ideal_w).abs() <= 8.0);
        prop_assert!((size.height() as f64 - ideal_h).abs() <= 8.0);
    }
}

fn test_pattern(width: u32, height: u32) -> RgbImage {
    RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([
            (x * 255 / width) as u8,
            (y * 255 / height) as u8,
            ((x + y) % 7 * 30) as u8,
        ])
    })
}

#[test]
fn png_jpeg_and_webp_load_whatever_the_extension() {
    let dir = tempfile::tempdir().unwrap();
    let original = test_pattern(24, 16);
    for (format, name, exact) in [
        (ImageFormat::Png, "image.png", true),
        (ImageFormat::WebP, "image.webp", true),
        (ImageFormat::Jpeg, "image.jpg", false),
        // The format is read from the content, not the name.
        (ImageFormat::Png, "misnamed.jpg", true),
    ] {
        let path = dir.path().join(name);
        original.save_with_format(&path, format).unwrap();
        let loaded = InputImage::open(&path).unwrap();
        assert_eq!((loaded.width(), loaded.height()), (24, 16), "{name}");
        let max_diff = loaded
            .rgb()
            .iter()
            .zip(original.as_raw())
            .map(|(&a, &b)| a.abs_diff(b))
            .max()
            .unwrap();
        if exact {
            assert_eq!(max_diff, 0, "{name}");
        } else {
            assert!(max_diff < 64, "{name}: {max_diff}");
        }
    }
}

#[test]
fn unreadable_images_are_typed_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.png");
    std::fs::write(&path, b"\x89PNG\r\n\x1a\nnot really").unwrap();
    let error = InputImage::open(&path).unwrap_err();
    assert!(matches!(error, Error::Media { .. }));
    assert!(error.to_string().contains("broken.png"), "{error}");
    assert!(matches!(
        InputImage::open(dir.path().join("missing.png")),
        Err(Error::Io { .. })
    ));
    assert!(InputImage::from_rgb(2, 2, vec![0; 11]).is_err());
    assert!(InputImage::from_rgb(0, 0, vec![]).is_err());
}

/// Antialiased bilinear resampling as PIL and torchvision (`antialias=True`) define it: a
/// triangle filter widened by the scale factor when shrinking, pixel centres at `i + 0.5`.
/// Computed in f64 without intermediate rounding.
fn resize_reference(image: &RgbImage, width: u32, height: u32) -> Vec<f64> {
    fn weights(in_len: u32, out_len: u32) -> Vec<Vec<(usize, f64)>> {
        let scale = f64::from(in_len) / f64::from(out_len);
        let filter_scale = scale.max(1.0);
        (0..out_len)
            .map(|i| {
                let centre = (f64::from(i) + 0.5) * scale;
                let taps: Vec<(usize, f64)> = (0..in_len as usize)
                    .map(|j| {
                        let distance = (j as f64 + 0.5 - centre) / filter_scale;
                        (j, (1.0 - distance.abs()).max(0.0))
                    })
                    .filter(|&(_, w)| w > 0.0)
                    .collect();
                let total: f64 = taps.iter().map(|&(_, w)| w).sum();
                taps.into_iter().map(|(j, w)| (j, w / total)).collect()
            })
            .collect()
    }
    let (in_w, in_h) = image.dimensions();
    let (wx, wy) = (weights(in_w, width), weights(in_h, height));
    let mut out = Vec::with_capacity((width * height * 3) as usize);
    for row in &wy {
        for col in &wx {
            for c in 0..3 {
                let value: f64 = row
                    .iter()
                    .flat_map(|&(y, wy)| {
                        col.iter().map(move |&(x, wx)| {
                            wy * wx * f64::from(image.get_pixel(x as u32, y as u32)[c])
                        })
                    })
                    .sum();
                out.push(value);
            }
        }
    }
    out
}

#[test]
fn stretch_resize_matches_antialiased_bilinear() {
    let source = test_pattern(100, 60);
    let image = InputImage::from_rgb(100, 60, source.as_raw().clone()).unwrap();
    // Shrink on one axis and enlarge on the other.
    let size = FrameSize::new(48, 80).unwrap();
    let resized = image.resize(size, ImageFit::Stretch).unwrap();
    assert_eq!((resized.width(), resized.height()), (48, 80));
    let reference = resize_reference(&source, 48, 80);
    let worst = resized
        .rgb()
        .iter()
        .zip(&reference)
        .map(|(&a, &b)| (f64::from(a) - b).abs())
        .fold(0.0, f64::max);
    println!("largest difference from the reference: {worst:.3}");
    assert!(worst <= 1.0, "largest difference {worst}");
}

#[test]
fn centre_crop_keeps_the_middle_of_a_wide_image() {
    // 64x32: red | green (the middle 32 columns) | blue; cropping to a square keeps the green.
    let source = RgbImage::from_fn(64, 32, |x, _| match x {
        0..16 => image::Rgb([255, 0, 0]),
        16..48 => image::Rgb([0, 255, 0]),
        _ => image::Rgb([0, 0, 255]),
    });
    let image = InputImage::from_rgb(64, 32, source.into_raw()).unwrap();
    let cropped = image
        .resize(FrameSize::new(16, 16).unwrap(), ImageFit::CenterCrop)
        .unwrap();
    assert!(cropped.rgb().chunks(3).all(|p| p == [0, 255, 0]));
    let stretched = image
        .resize(FrameSize::new(16, 16).unwrap(), ImageFit::Stretch)
        .unwrap();
    assert_eq!(&stretched.rgb()[..3], [255, 0, 0]);
}

#[test]
fn tensor_is_channels_first_in_minus_one_to_one() {
    let rgb = vec![0, 128, 255, 10, 20, 30];
    let image = InputImage::from_rgb(2, 1, rgb.clone()).unwrap();
    let tensor = image.to_tensor(&Device::Cpu).unwrap();
    assert_eq!(tensor.dims(), [3, 1, 2]);
    let values = tensor.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    // [3, H, W]: channel c of pixel x sits at c·W + x.
    for (x, pixel) in rgb.chunks(3).enumerate() {
        for c in 0..3 {
            let expected = (f32::from(pixel[c]) / 255.0 - 0.5) / 0.5;
            assert_eq!(values[c * 2 + x], expected);
        }
    }
    assert_eq!(values[0], -1.0);
    assert_eq!(values[2 * 2], 1.0);

    let conditioning = InputImage::from_rgb(300, 100, vec![128; 300 * 100 * 3])
        .unwrap()
        .conditioning_tensor(
            Resolution::P480,
            AspectRatio::Wide16x9,
            true,
            ImageFit::Stretch,
            &Device::Cpu,
        )
        .unwrap();
    assert_eq!(conditioning.dims(), [3, 368, 1088]);
}
