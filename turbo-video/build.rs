//! Warns when OpenH264 will be built without its assembly.
//!
//! `openh264-sys2` compiles OpenH264's x86 SIMD routines only where `nasm` runs, and otherwise
//! falls back to plain C without a word in the build output. The fallback encodes about 3×
//! slower (81 frames of 832×480: 546 ms against 191 ms on two cores, `docs/performance.md`),
//! which a whole video then waits for. The check only looks for an assembler; it changes nothing.

use std::process::Command;

fn main() {
    // Not PATH: a shell with another PATH would rebuild this crate and all that depends on
    // it. The warning says to clean this crate once nasm is installed.
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=NASM");
    println!("cargo:rerun-if-env-changed=OPENH264_NO_ASM");
    let target_arch = std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let has_x86_assembly = matches!(target_arch.as_str(), "x86" | "x86_64");
    if !has_x86_assembly || std::env::var_os("OPENH264_NO_ASM").is_some() {
        return;
    }
    // The same lookup as openh264-sys2's assembler driver: $NASM, else `nasm` on the PATH.
    let nasm = std::env::var_os("NASM").unwrap_or_else(|| "nasm".into());
    let runs = Command::new(&nasm)
        .arg("-v")
        .output()
        .is_ok_and(|output| output.status.success());
    if !runs {
        println!(
            "cargo:warning=nasm not found ({}): OpenH264's encoder is built without its SIMD \
             assembly and writes MP4s about 3x slower. Install nasm (e.g. `apt install nasm`), \
             then `cargo clean -p openh264-sys2 -p turbo-video` so that both are rebuilt.",
            nasm.to_string_lossy()
        );
    }
}
