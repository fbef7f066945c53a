//! Damaged MP4 files are typed errors, never a panic or an abort on a claimed size: a proptest
//! mutates a valid file at random, and a sample that claims more bytes than the file holds is
//! refused before the demuxer allocates it.

use proptest::prelude::*;
use turbo_core::Error;
use turbo_video::{Fps, Mp4Options, Video};

fn valid_mp4() -> Vec<u8> {
    let frames = (0..3u8)
        .map(|i| {
            (0..32 * 32 * 3)
                .map(|j| (j as u8).wrapping_mul(i + 1))
                .collect()
        })
        .collect();
    let video = Video::new(32, 32, Fps::new(16.0).unwrap(), frames).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("valid.mp4");
    video.write_mp4(&path, Mp4Options::default()).unwrap();
    std::fs::read(path).unwrap()
}

/// The offset of the 4-byte box type `name` in `bytes`.
fn box_offset(bytes: &[u8], name: &[u8; 4]) -> usize {
    bytes
        .windows(4)
        .position(|window| window == name)
        .expect("the box is present")
}

#[test]
fn a_sample_claiming_more_than_the_file_is_refused() {
    let mut bytes = valid_mp4();
    // stsz: size(4) type(4) version+flags(4) sample_size(4) sample_count(4) sizes(4 each).
    let first_size = box_offset(&bytes, b"stsz") + 4 + 4 + 4 + 4;
    bytes[first_size..first_size + 4].copy_from_slice(&0xFFFF_FF00u32.to_be_bytes());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("claim.mp4");
    std::fs::write(&path, &bytes).unwrap();
    match Video::read_mp4(&path) {
        Err(Error::Media { reason, .. }) => assert!(reason.contains("claims"), "{reason}"),
        other => panic!("expected a media error, got {:?}", other.map(|v| v.len())),
    }
}

/// What `fuzz/`'s `mp4_reader` found: a box of size 0 inside a `moof`, on which the demuxer
/// seeks back to the same header forever. The box tree is checked first.
#[test]
fn a_nested_box_of_size_zero_is_refused_not_looped_on() {
    const FOUND_BY_FUZZING: [u8; 58] = [
        0, 0, 0, 4, 0, 0, 0, 8, 162, 163, 163, 163, 0, 0, 0, 8, 163, 163, 162, 163, 0, 0, 0, 40,
        109, 111, 111, 102, 0, 0, 0, 0, 162, 162, 0, 93, 92, 60, 161, 247, 163, 23, 0, 0, 8, 169,
        110, 97, 109, 0, 0, 162, 0, 8, 169, 110, 97, 109,
    ];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("loop.mp4");
    std::fs::write(&path, FOUND_BY_FUZZING).unwrap();
    match Video::read_mp4(&path) {
        Err(Error::Media { reason, .. }) => assert!(reason.contains("malformed MP4"), "{reason}"),
        other => panic!("expected a media error, got {:?}", other.map(|v| v.len())),
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn mutated_mp4_files_never_panic(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        keep in prop::option::weighted(0.2, any::<usize>()),
    ) {
        let mut bytes = valid_mp4();
        let len = bytes.len();
        for (position, value) in edits {
            bytes[position % len] = value;
        }
        if let Some(keep) = keep {
            bytes.truncate(keep % (len + 1));
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("mutated.mp4");
        std::fs::write(&path, &bytes).unwrap();
        let _ = Video::read_mp4(&path);
    }
}
