//! What the fuzz targets share: the readers take paths, so each input is written to a file in
//! a scratch folder that lives as long as the fuzzing process.

use std::path::PathBuf;
use std::sync::OnceLock;

use candle_core::{DType, Device};
use turbo_models::Checkpoint;

/// Writes `data` to `input.<extension>` in the process's scratch folder.
pub fn input_file(extension: &str, data: &[u8]) -> PathBuf {
    static SCRATCH: OnceLock<tempfile::TempDir> = OnceLock::new();
    let folder = SCRATCH.get_or_init(|| tempfile::tempdir().expect("a scratch folder"));
    let path = folder.path().join(format!("input.{extension}"));
    std::fs::write(&path, data).expect("the scratch folder is writable");
    path
}

/// Opens `data` as a checkpoint of `extension` and reads every tensor it lists: any outcome
/// but a panic, an abort or a hang is a pass.
pub fn open_and_read_checkpoint(extension: &str, data: &[u8]) {
    let path = input_file(extension, data);
    let Ok(checkpoint) = Checkpoint::open(&path) else {
        return;
    };
    let Ok(vb) = checkpoint.var_builder(DType::F32, &Device::Cpu) else {
        return;
    };
    for meta in checkpoint.tensors() {
        let dtype = if meta.dtype == "I8" {
            DType::U8
        } else {
            DType::F32
        };
        let _ = vb.get_unchecked_dtype(&meta.name, dtype);
    }
}
