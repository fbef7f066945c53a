//! Converts a checkpoint to safetensors, so that loading needs no pickle and can memory-map:
//!
//! ```text
//! # .pth → .safetensors, every key and stored dtype kept (int8 included):
//! cargo run --release --example convert -- TurboWan2.1-T2V-1.3B-480P.pth TurboWan2.1-T2V-1.3B-480P.safetensors
//! # and quantise the DiT's block linears to W8A8 on the way (the `-quant` layout):
//! cargo run --release --example convert -- --quantize TurboWan2.1-T2V-1.3B-480P.pth TurboWan2.1-T2V-1.3B-480P-quant.safetensors
//! ```
//!
//! Every tensor is read into memory before the file is written: plan for the checkpoint's size
//! in RAM.

use std::path::PathBuf;

use anyhow::Result;
use clap::Parser;
use turbodiffusion::models::{convert, Checkpoint};

#[derive(Parser, Debug)]
struct Args {
    /// Any checkpoint `turbo_models::Checkpoint` opens (.pth, .safetensors, a sharded folder).
    input: PathBuf,
    /// The `.safetensors` file to write.
    output: PathBuf,
    /// Quantise the DiT's float block linears (q, k, v, o of both attentions, ffn.0, ffn.2) to
    /// W8A8: `int8_weight` (I8) + `scale` (F32 per 128×128 tile), as the `-quant` releases store.
    #[arg(long)]
    quantize: bool,
    /// Replace `output` if it exists.
    #[arg(long)]
    overwrite: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    anyhow::ensure!(
        args.overwrite || !args.output.exists(),
        "{} exists: pass --overwrite to replace it",
        args.output.display()
    );
    // Ctrl-C or SIGTERM while the (checkpoint-sized) temporary file is written removes it.
    let temp = convert::temp_path(&args.output);
    ctrlc::set_handler(move || {
        let _ = std::fs::remove_file(&temp);
        std::process::exit(130);
    })?;
    let converted =
        convert::to_safetensors(&Checkpoint::open(&args.input)?, &args.output, args.quantize)?;
    println!(
        "wrote {} ({} tensors, {} block linears quantised to W8A8)",
        args.output.display(),
        converted.tensors,
        converted.quantized
    );
    Ok(())
}
