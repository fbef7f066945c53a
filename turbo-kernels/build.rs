//! Compiles every `kernels/*.cu` with nvcc to a fatbin for the compute capability in
//! `CUDA_COMPUTE_CAP` (as candle's own kernels are; 80 when unset): machine code for that
//! architecture, which a device of it loads without the driver's JIT (seconds in a process's
//! first requests), and its PTX, which later GPUs JIT. A file named `*_sm90a.cu` uses
//! Hopper-only instructions (wgmma) and is always compiled for `sm_90a`; it loads only on
//! compute capability 9.0 devices, and its launcher checks for one first.
//!
//! Only with the `cuda` feature. nvcc is found through `CUDA_HOME` (or `CUDA_ROOT`, `CUDA_PATH`), else on `PATH`.

use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo::rerun-if-env-changed=CARGO_FEATURE_CUDA");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let compute_cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".to_owned());
    let nvcc = nvcc_path();
    println!("cargo::rerun-if-env-changed=CUDA_COMPUTE_CAP");
    for var in ["CUDA_HOME", "CUDA_ROOT", "CUDA_PATH"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    for source in kernel_sources() {
        let stem = source.file_stem().expect("a .cu file has a stem");
        let fatbin = out_dir.join(stem).with_extension("fatbin");
        let arch = if stem.to_string_lossy().ends_with("_sm90a") {
            "90a"
        } else {
            &compute_cap
        };
        compile(&nvcc, &source, &fatbin, arch);
    }
}

/// The `.cu` files of `kernels/`; every file there (headers too) reruns the build when it
/// changes.
fn kernel_sources() -> Vec<PathBuf> {
    let dir = Path::new("kernels");
    println!("cargo::rerun-if-changed={}", dir.display());
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("turbo-kernels/kernels exists")
        .map(|entry| entry.expect("readable kernels directory").path())
        .collect();
    files.sort();
    for file in &files {
        println!("cargo::rerun-if-changed={}", file.display());
    }
    files
        .into_iter()
        .filter(|path| path.extension().is_some_and(|ext| ext == "cu"))
        .collect()
}

fn nvcc_path() -> PathBuf {
    ["CUDA_HOME", "CUDA_ROOT", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .map(|root| PathBuf::from(root).join("bin").join("nvcc"))
        .find(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("nvcc"))
}

fn compile(nvcc: &Path, source: &Path, fatbin: &Path, compute_cap: &str) {
    let status = Command::new(nvcc)
        .args(["--fatbin", "-O3", "-std=c++17", "--expt-relaxed-constexpr"])
        .arg(format!(
            "-gencode=arch=compute_{compute_cap},code=[sm_{compute_cap},compute_{compute_cap}]"
        ))
        .arg(source)
        .arg("-o")
        .arg(fatbin)
        .status()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): set CUDA_HOME to a CUDA toolkit (see README, Building with CUDA)",
                nvcc.display()
            )
        });
    assert!(status.success(), "nvcc failed on {}", source.display());
}
