//! MP4 round trips: encode synthetic moving frames, read them back through the demuxer and the
//! OpenH264 decoder, and check the frame count, size, rate and fidelity.

mod common;

use common::{entries, moving_video, psnr};
use turbo_core::Error;
use turbo_video::{Existing, Fps, Mp4Options, Mp4Stream, Mp4Writer, Quality, Video};

const MIN_PSNR_DB: f64 = 30.0;

fn round_trip(video: &Video, options: Mp4Options) -> (Video, u64) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    video.write_mp4(&path, options).unwrap();
    assert_eq!(
        entries(dir.path()),
        std::slice::from_ref(&path),
        "only the MP4 is left"
    );
    let size = std::fs::metadata(&path).unwrap().len();
    (Video::read_mp4(&path).unwrap(), size)
}

/// PSNR of each frame of `decoded` against `original`.
fn frame_psnrs(original: &Video, decoded: &Video) -> Vec<f64> {
    original
        .frames()
        .iter()
        .zip(decoded.frames())
        .map(|(a, b)| psnr(a, b))
        .collect()
}

#[test]
fn moving_frames_survive_the_round_trip() {
    let video = moving_video(64, 48, 9, 16.0);
    let (decoded, _) = round_trip(&video, Mp4Options::default());
    assert_eq!(decoded.len(), 9);
    assert_eq!((decoded.width(), decoded.height()), (64, 48));
    assert_eq!(decoded.fps(), Fps::DEFAULT);
    let psnrs = frame_psnrs(&video, &decoded);
    let worst = psnrs.iter().copied().fold(f64::INFINITY, f64::min);
    println!("per-frame PSNR at the default quality: {psnrs:.2?} dB");
    assert!(worst >= MIN_PSNR_DB, "per-frame PSNR {psnrs:.1?} dB");
}

#[test]
fn frame_rate_and_odd_multiples_of_two_are_kept() {
    // 34 × 18 is not a multiple of 16: the stream carries a cropping window.
    let video = moving_video(34, 18, 5, 23.976);
    let (decoded, _) = round_trip(&video, Mp4Options::default());
    assert_eq!(
        (decoded.width(), decoded.height(), decoded.len()),
        (34, 18, 5)
    );
    assert!(
        (decoded.fps().get() - 23.976).abs() < 1e-9,
        "{:?}",
        decoded.fps()
    );
    assert!(decoded.duration_secs() > 0.2);

    // Rates outside what OpenH264's rate control plans for are still written as given.
    for fps in [0.5, 120.0] {
        let (decoded, _) = round_trip(&moving_video(32, 32, 2, fps), Mp4Options::default());
        assert_eq!((decoded.len(), decoded.fps().get()), (2, fps));
    }
}

#[test]
fn quality_settings_trade_size_for_fidelity() {
    let video = moving_video(64, 48, 9, 16.0);
    let encode = |quality| {
        let options = Mp4Options {
            quality,
            ..Mp4Options::default()
        };
        let (decoded, bytes) = round_trip(&video, options);
        let mean_psnr = frame_psnrs(&video, &decoded).iter().sum::<f64>() / 9.0;
        (mean_psnr, bytes)
    };
    let (fine_psnr, fine_bytes) = encode(Quality::Qp(12));
    let (coarse_psnr, coarse_bytes) = encode(Quality::Qp(40));
    assert!(
        fine_psnr > coarse_psnr + 3.0,
        "{fine_psnr} vs {coarse_psnr}"
    );
    assert!(fine_bytes > coarse_bytes, "{fine_bytes} vs {coarse_bytes}");

    let (bitrate_psnr, bitrate_bytes) = encode(Quality::Bitrate(2_000_000));
    println!(
        "mean PSNR / bytes: QP 12 {fine_psnr:.2} dB / {fine_bytes}, QP 40 {coarse_psnr:.2} dB / \
         {coarse_bytes}, 2 Mbit/s {bitrate_psnr:.2} dB / {bitrate_bytes}"
    );
    assert!(bitrate_psnr >= MIN_PSNR_DB, "{bitrate_psnr}");
}

#[test]
fn every_frame_is_kept_with_keyframes_at_the_interval() {
    // Identical frames tempt an encoder into skipping; skipping must be off.
    let still = Video::new(32, 32, Fps::DEFAULT, vec![vec![128; 32 * 32 * 3]; 7]).unwrap();
    let options = Mp4Options {
        keyframe_interval: 3,
        ..Mp4Options::default()
    };
    let (decoded, _) = round_trip(&still, options);
    assert_eq!(decoded.len(), 7);
    for frame in decoded.frames() {
        assert!(psnr(&still.frames()[0], frame) > 40.0);
    }
}

#[test]
fn sizes_h264_cannot_take_are_rejected_before_any_file_exists() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("odd.mp4");
    let odd = moving_video(63, 48, 2, 16.0);
    let error = odd.write_mp4(&path, Mp4Options::default()).unwrap_err();
    assert!(matches!(error, Error::Media { .. }));
    assert!(error.to_string().contains("63x48"), "{error}");
    let bad_quality = Mp4Options {
        quality: Quality::Qp(60),
        ..Mp4Options::default()
    };
    assert!(moving_video(64, 48, 2, 16.0)
        .write_mp4(&path, bad_quality)
        .is_err());
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn an_interrupted_write_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let video = moving_video(64, 48, 4, 16.0);

    // A frame of the wrong size halfway through: the error is reported and the writer dropped.
    let mut writer = Mp4Writer::create(&path, 64, 48, Fps::DEFAULT, Mp4Options::default()).unwrap();
    for frame in &video.frames()[..3] {
        writer.write_frame(frame).unwrap();
    }
    assert_eq!(writer.frames_written(), 3);
    assert!(
        !entries(dir.path()).is_empty(),
        "data goes to a temporary file"
    );
    let error = writer.write_frame(&[0; 10]).unwrap_err();
    assert!(error.to_string().contains("frame 3"), "{error}");
    drop(writer);
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));

    // A panic while frames are being produced unwinds through the writer.
    let panicked = std::panic::catch_unwind(|| {
        let mut writer =
            Mp4Writer::create(&path, 64, 48, Fps::DEFAULT, Mp4Options::default()).unwrap();
        writer.write_frame(&video.frames()[0]).unwrap();
        panic!("the frame source failed");
    });
    assert!(panicked.is_err());
    assert!(entries(dir.path()).is_empty());

    // A writer finished without frames writes nothing.
    let empty = Mp4Writer::create(&path, 64, 48, Fps::DEFAULT, Mp4Options::default()).unwrap();
    assert!(empty.finish().is_err());
    assert!(entries(dir.path()).is_empty());
}

#[test]
fn an_interrupted_rewrite_keeps_the_previous_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let first = moving_video(64, 48, 3, 16.0);
    first.write_mp4(&path, Mp4Options::default()).unwrap();
    let before = std::fs::read(&path).unwrap();

    let mut writer = Mp4Writer::create(&path, 32, 32, Fps::DEFAULT, Mp4Options::default()).unwrap();
    writer.write_frame(&vec![0; 32 * 32 * 3]).unwrap();
    drop(writer);
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(entries(dir.path()), std::slice::from_ref(&path));
    assert_eq!(Video::read_mp4(&path).unwrap().len(), 3);
}

#[test]
fn reading_a_file_that_is_not_an_mp4_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("not.mp4");
    std::fs::write(&path, b"definitely not an mp4 file").unwrap();
    let error = Video::read_mp4(&path).unwrap_err();
    assert!(error.to_string().contains("not.mp4"), "{error}");
    assert!(matches!(
        Video::read_mp4(dir.path().join("missing.mp4")),
        Err(Error::Io { .. })
    ));
}

/// `write_mp4` encodes each keyframe interval on its own thread; the file decodes to the same
/// frames as one encoder fed frame by frame (`Mp4Writer`).
#[test]
fn intervals_encoded_in_parallel_decode_as_one_encoder() {
    let dir = tempfile::tempdir().unwrap();
    let video = moving_video(64, 48, 11, 16.0);
    let options = Mp4Options {
        keyframe_interval: 3,
        ..Mp4Options::default()
    };
    let parallel = dir.path().join("parallel.mp4");
    video.write_mp4(&parallel, options).unwrap();
    let sequential = dir.path().join("sequential.mp4");
    let mut writer = Mp4Writer::create(&sequential, 64, 48, video.fps(), options).unwrap();
    for frame in video.frames() {
        writer.write_frame(frame).unwrap();
    }
    writer.finish().unwrap();
    let (parallel, sequential) = (
        Video::read_mp4(&parallel).unwrap(),
        Video::read_mp4(&sequential).unwrap(),
    );
    assert_eq!(parallel.len(), 11);
    assert_eq!(parallel.frames(), sequential.frames());
}

/// `Mp4Stream` takes frames a few at a time, as a decoder makes them: a frame of the wrong size
/// is refused without spoiling the stream, the file decodes to what one encoder writes, and a
/// stream dropped before `finish` leaves nothing behind.
#[test]
fn a_stream_fed_in_chunks_writes_what_one_encoder_writes() {
    let dir = tempfile::tempdir().unwrap();
    let video = moving_video(64, 48, 13, 16.0);
    let options = Mp4Options {
        keyframe_interval: 4,
        ..Mp4Options::default()
    };
    let open = |name: &str| {
        let path = dir.path().join(name);
        let stream =
            Mp4Stream::create_with(&path, 64, 48, video.fps(), options, Existing::Refuse).unwrap();
        (path, stream)
    };
    let (streamed, mut stream) = open("streamed.mp4");
    for chunk in video.frames().chunks(3) {
        for frame in chunk {
            stream.push_frame(frame.clone()).unwrap();
        }
        assert!(matches!(
            stream.push_frame(vec![0; 10]),
            Err(Error::Media { .. })
        ));
    }
    assert_eq!(stream.frames_pushed(), 13);
    stream.finish().unwrap();
    let decoded = Video::read_mp4(&streamed).unwrap();
    assert_eq!(decoded.len(), 13);
    let sequential = dir.path().join("sequential.mp4");
    let mut writer = Mp4Writer::create(&sequential, 64, 48, video.fps(), options).unwrap();
    for frame in video.frames() {
        writer.write_frame(frame).unwrap();
    }
    writer.finish().unwrap();
    assert_eq!(
        decoded.frames(),
        Video::read_mp4(&sequential).unwrap().frames()
    );

    let (dropped, mut stream) = open("dropped.mp4");
    for frame in &video.frames()[..9] {
        stream.push_frame(frame.clone()).unwrap();
    }
    drop(stream);
    assert!(!dropped.exists());
    assert_eq!(entries(dir.path()), [sequential, streamed]);
}
