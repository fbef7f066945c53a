//! `turbo-serve`: the video generation server.
//!
//! ```text
//! turbo-serve --data-dir serve-data                       # the built-in demo model, on the CPU
//! turbo-serve --data-dir serve-data --checkpoint-dir ckpts --device cuda --token "$TOKEN"
//! ```

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::Parser;
use turbo_serve::models::ModelCatalog;
use turbo_serve::request::RequestLimits;
use turbo_serve::{Server, ServerConfig};
use turbodiffusion::core::DeviceSpec;
use turbodiffusion::pipeline::{Residency, DEMO_NOTICE};

#[derive(Parser, Debug)]
#[command(about = "Serve Wan video generation over HTTP, with a web page")]
struct Args {
    /// Address to listen on (loopback by default: pass 0.0.0.0:PORT, with --token, to serve
    /// other machines).
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Folder of the job database and the videos.
    #[arg(long)]
    data_dir: PathBuf,
    /// Folder with the released checkpoint files; without it, the built-in demo models.
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Offer only these models of the checkpoint folder (wan2.1-t2v-1.3b, wan2.1-t2v-14b,
    /// wan2.2-i2v-a14b, wan2.2-t2v-a14b, wan2.1-i2v-14b-480p, wan2.1-i2v-14b-720p,
    /// wan2.1-flf2v-14b, wan2.2-ti2v-5b); repeatable. Default: every one whose files are
    /// there (files that fit several models, as official Wan folders do, need a choice).
    #[arg(long = "model")]
    models: Vec<String>,
    /// Folder of LoRA adapters (`NAME.safetensors`), offered by name.
    #[arg(long)]
    lora_dir: Option<PathBuf>,
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// Bearer token required on every route but the page (also read from
    /// TURBO_SERVE_TOKEN).
    #[arg(long, env = "TURBO_SERVE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Jobs that may wait in the queue.
    #[arg(long, default_value_t = 16)]
    queue_capacity: usize,
    /// Largest request body, in MiB (a base64 image is 4/3 of its file).
    #[arg(long, default_value_t = 16)]
    max_body_mib: usize,
    /// Largest uploaded image file, in MiB.
    #[arg(long, default_value_t = 10)]
    max_image_mib: usize,
    /// Largest frame side, in pixels.
    #[arg(long, default_value_t = 1280)]
    max_side: usize,
    /// Most frames a request may ask for.
    #[arg(long, default_value_t = 161)]
    max_frames: usize,
    /// Model pipelines kept resident between jobs.
    #[arg(long, default_value_t = 2)]
    max_resident_models: usize,
    /// Keep each resident model's umT5 text encoder on the device between jobs (11 GB in bf16
    /// per model, counted by the eviction): a job then skips reading the encoder's file, which
    /// otherwise takes most of a short job's time.
    #[arg(long)]
    resident_text_encoder: bool,
    /// Load each model's DiT, VAE and CLIP encoder per job and drop them after, as the library does by
    /// default, instead of keeping them on the device between jobs (the default here: a job
    /// of a kept model then reads none of their weights; the eviction counts them).
    #[arg(long)]
    stream_models: bool,
    /// GiB of model weights (by the library's estimate) the resident models may add up to.
    #[arg(long)]
    memory_budget_gib: Option<f64>,
}

fn main() -> Result<()> {
    let args = Args::parse();
    tracing_subscriber::fmt()
        .with_max_level(tracing::Level::INFO)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
    let catalog = catalog(&args)?;
    let config = config(&args)?;
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let server = Server::bind(config, catalog).await?;
        let addr = server.local_addr()?;
        // Scripts and tests read this line for the address (the port, with port 0).
        println!("turbo-serve listening on http://{addr}");
        std::io::stdout().flush()?;
        server.run(shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

fn catalog(args: &Args) -> Result<ModelCatalog> {
    let device = args.device.open().context("--device")?;
    let catalog = match &args.checkpoint_dir {
        Some(dir) => ModelCatalog::from_checkpoint_dir(dir, &args.models, device)?,
        None if !args.models.is_empty() => bail!("--model needs --checkpoint-dir"),
        None => {
            eprintln!("{DEMO_NOTICE}");
            ModelCatalog::demo(device)
        }
    };
    let catalog = catalog.with_residency(Residency {
        text_encoder: args.resident_text_encoder,
        dit: !args.stream_models,
        vae: !args.stream_models,
        clip: !args.stream_models,
    });
    Ok(match &args.lora_dir {
        Some(dir) => catalog.with_lora_dir(dir)?,
        None => catalog,
    })
}

fn config(args: &Args) -> Result<ServerConfig> {
    if args.token.as_deref() == Some("") {
        bail!("--token must not be empty");
    }
    let memory_budget = args
        .memory_budget_gib
        .map(|gib| (gib * f64::from(1u32 << 30)) as u64);
    Ok(ServerConfig {
        addr: args.addr,
        token: args.token.clone(),
        queue_capacity: args.queue_capacity,
        limits: RequestLimits {
            max_image_bytes: args.max_image_mib << 20,
            max_side: args.max_side,
            max_frames: args.max_frames,
            ..RequestLimits::default()
        },
        max_body_bytes: args.max_body_mib << 20,
        max_resident_models: args.max_resident_models,
        memory_budget,
        ..ServerConfig::new(&args.data_dir)
    })
}

/// Completes on Ctrl-C or SIGTERM.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut terminate) => {
                tokio::select! {
                    _ = interrupt => {}
                    _ = terminate.recv() => {}
                }
            }
            Err(e) => {
                tracing::warn!("cannot watch SIGTERM: {e}");
                let _ = interrupt.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = interrupt.await;
}
