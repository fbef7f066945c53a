//! Damaged and hostile checkpoint files are typed errors when opened: never a panic, an abort
//! on a huge allocation, a silently wrong tensor or an empty one. Sizes in a header are checked
//! against the bytes the file stores, with overflow-checked arithmetic; a proptest mutates
//! valid files at random and asserts that opening and reading them never panics.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use proptest::prelude::*;
use turbo_core::Error;
use turbo_models::Checkpoint;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("../fixtures/pth/{name}"))
}

fn checkpoint_reason(result: turbo_core::Result<Checkpoint>) -> (PathBuf, String) {
    match result {
        Err(Error::Checkpoint { path, reason }) => (path, reason),
        other => panic!(
            "expected a checkpoint error, got {:?}",
            other.map(|c| c.len())
        ),
    }
}

#[test]
fn pth_sizes_that_lie_are_refused_naming_the_tensor() {
    for (file, key) in [
        ("damaged_offset.pth", "far"),
        ("damaged_shape.pth", "empty"),
        ("damaged_claim.pth", "huge"),
    ] {
        let (path, reason) = checkpoint_reason(Checkpoint::open(fixture(file)));
        assert_eq!(path, fixture(file));
        assert!(reason.contains(&format!("`{key}`")), "{file}: {reason}");
    }
}

/// The input `fuzz/`'s `pth_reader` found: a pickle string claiming 2.8 GB, which candle's
/// unpickler allocated before reading. The pass before it refuses the length.
#[test]
fn a_pickle_length_past_the_stream_is_refused_before_allocating() {
    let path = fixture("damaged_pickle_length.pth");
    let (reported, reason) = checkpoint_reason(Checkpoint::open(&path));
    assert_eq!(reported, path);
    assert!(
        reason.contains("data.pkl") && reason.contains("remain"),
        "{reason}"
    );
}

/// A safetensors file written by hand: `header` as JSON, then `data`.
fn write_safetensors(path: &Path, header: &str, data: &[u8]) {
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(data);
    std::fs::write(path, bytes).unwrap();
}

#[test]
fn safetensors_headers_that_lie_are_refused_when_opened() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.safetensors");
    // The safetensors parser refuses some of these itself (without naming the tensor); what
    // it lets through, the extent check refuses by name.
    let parser = "bad safetensors header: invalid";
    let cases = [
        // Offsets past the end of the data: a truncated file.
        (
            r#"{"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}"#,
            "`w` ends at byte 16",
        ),
        // A byte range that does not hold the shape.
        (
            r#"{"w":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
            parser,
        ),
        // A shape whose byte size overflows (2^32 · 2^32 elements).
        (
            r#"{"w":{"dtype":"F32","shape":[4294967296,4294967296],"data_offsets":[0,8]}}"#,
            "overflow",
        ),
        (
            r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[8,0]}}"#,
            parser,
        ),
        // Data after the last tensor, which the loader would refuse later.
        (
            r#"{"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}"#,
            "end at byte 4",
        ),
    ];
    for (header, expected) in cases {
        write_safetensors(&path, header, &[0u8; 8]);
        let (reported, reason) = checkpoint_reason(Checkpoint::open(&path));
        assert_eq!(reported, path);
        assert!(reason.contains(expected), "{header}: {reason}");
    }
    write_safetensors(
        &path,
        r#"{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
        &[0u8; 8],
    );
    assert_eq!(Checkpoint::open(&path).unwrap().len(), 1);
    // No tensor at all is a valid (empty) file; data after it is not.
    write_safetensors(&path, "{}", &[]);
    assert!(Checkpoint::open(&path).unwrap().is_empty());
}

/// Opens `bytes` as a checkpoint of `extension` and reads every tensor it lists, returning
/// whether all of that succeeded; the point is that it returns at all, without a panic.
fn open_and_read(dir: &Path, extension: &str, bytes: &[u8]) -> bool {
    let path = dir.join(format!("mutated.{extension}"));
    std::fs::write(&path, bytes).unwrap();
    let Ok(checkpoint) = Checkpoint::open(&path) else {
        return false;
    };
    let Ok(vb) = checkpoint.var_builder(DType::F32, &Device::Cpu) else {
        return false;
    };
    checkpoint
        .tensors()
        .map(|meta| {
            let dtype = if meta.dtype == "I8" {
                DType::U8
            } else {
                DType::F32
            };
            vb.get_unchecked_dtype(&meta.name, dtype).is_ok()
        })
        // Every tensor is read, also after a failure.
        .filter(|&ok| !ok)
        .count()
        == 0
}

fn valid_safetensors() -> Vec<u8> {
    let tensors: HashMap<String, Tensor> = [
        ("a", Tensor::new(&[1f32, 2.0, 3.0], &Device::Cpu).unwrap()),
        (
            "b",
            Tensor::new(&[[7u8, 8], [9, 10]], &Device::Cpu).unwrap(),
        ),
    ]
    .into_iter()
    .map(|(name, tensor)| (name.to_owned(), tensor))
    .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("valid.safetensors");
    candle_core::safetensors::save(&tensors, &path).unwrap();
    std::fs::read(path).unwrap()
}

/// Overwrites bytes at the given positions (taken modulo the length), then keeps a prefix.
fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], keep: Option<usize>) -> Vec<u8> {
    let len = bytes.len();
    for &(position, value) in edits {
        bytes[position % len] = value;
    }
    if let Some(keep) = keep {
        bytes.truncate(keep % (len + 1));
    }
    bytes
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn mutated_pth_archives_never_panic(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        keep in prop::option::weighted(0.2, any::<usize>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = mutate(std::fs::read(fixture("tensors.pth")).unwrap(), &edits, keep);
        open_and_read(dir.path(), "pth", &bytes);
    }

    #[test]
    fn mutated_safetensors_never_panic(
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 1..6),
        keep in prop::option::weighted(0.2, any::<usize>()),
    ) {
        let dir = tempfile::tempdir().unwrap();
        let bytes = mutate(valid_safetensors(), &edits, keep);
        open_and_read(dir.path(), "safetensors", &bytes);
    }

    /// Headers with arbitrary shapes and offsets (the sizes an attacker controls) open only
    /// when the range holds exactly the shape's bytes and fills the data, and then read back.
    #[test]
    fn arbitrary_safetensors_extents_are_checked(
        shape in prop::collection::vec(prop_oneof![0usize..5, Just(1usize << 33), Just(usize::MAX)], 0..4),
        start in prop_oneof![Just(0usize), 1usize..8, Just(usize::MAX - 3)],
        length in prop_oneof![Just(None), (0usize..64).prop_map(Some), Just(Some(usize::MAX))],
        data in 0usize..64,
    ) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("extent.safetensors");
        let bytes = shape.iter().try_fold(4usize, |n, &side| n.checked_mul(side));
        // `None`: the shape's own byte size, so that valid headers come up often.
        let length = length.or(bytes).unwrap_or(usize::MAX);
        let end = start.saturating_add(length);
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":{shape:?},"data_offsets":[{start},{end}]}}}}"#
        );
        write_safetensors(&path, &header, &vec![0u8; data]);
        let fits = start == 0 && bytes == Some(length) && end == data;
        prop_assert_eq!(Checkpoint::open(&path).is_ok(), fits, "{}", header);
        if fits {
            prop_assert!(open_and_read(dir.path(), "safetensors", &std::fs::read(&path).unwrap()));
        }
    }
}
