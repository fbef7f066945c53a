//! `turbo-serve`: a video generation server over the `turbodiffusion` library.
//!
//! - an HTTP API shaped like the hosted video APIs (`POST /v1/videos`, `GET /v1/videos/{id}`,
//!   its server-sent `events` and its MP4 `content`, `DELETE` to cancel, `GET /v1/models`);
//! - one job at a time on the device, from a bounded FIFO queue, on a thread of its own;
//! - every job in an SQLite database under the data folder, videos written atomically, so a
//!   restart loses no finished job and runs again the one it interrupted;
//! - a self-contained page at `/` to submit, watch, play and cancel jobs.
//!
//! See `turbo-serve/README.md` for the API with examples.

pub mod content;
pub mod error;
pub mod images;
pub mod job;
pub mod models;
pub mod queue;
pub mod request;
pub mod routes;
pub mod store;
pub mod upload;
pub mod worker;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use tokio::net::TcpListener;
use tokio::sync::{broadcast, watch};

use crate::models::{ModelCatalog, Models};
use crate::queue::JobQueue;
use crate::request::RequestLimits;
use crate::routes::AppState;
use crate::store::JobStore;
use crate::worker::Worker;

/// How the server runs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// Holds `jobs.sqlite3` and `outputs/`.
    pub data_dir: PathBuf,
    /// The bearer token every route but `/` needs; `None`: no authentication.
    pub token: Option<String>,
    /// Jobs that may wait at once.
    pub queue_capacity: usize,
    pub limits: RequestLimits,
    /// Bytes of a request body (a base64 image included).
    pub max_body_bytes: usize,
    /// Built pipelines kept between jobs.
    pub max_resident_models: usize,
    /// Bytes of model weights (by the library's estimate) the resident pipelines may stand
    /// for; `None`: only `max_resident_models` bounds them.
    pub memory_budget: Option<u64>,
}

impl ServerConfig {
    /// Loopback port 8080, the default limits, no token.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data_dir: data_dir.into(),
            token: None,
            queue_capacity: 16,
            limits: RequestLimits::default(),
            max_body_bytes: 16 << 20,
            max_resident_models: 2,
            memory_budget: None,
        }
    }
}

/// Why the server could not start.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("job store: {0}")]
    Store(#[from] rusqlite::Error),
    #[error("cannot start the generation thread: {0}")]
    Thread(std::io::Error),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// A server bound to its address, with its generation thread started.
pub struct Server {
    listener: TcpListener,
    state: AppState,
    shutdown: watch::Sender<bool>,
    worker: JoinHandle<()>,
}

impl Server {
    /// Opens the data folder and the job store (queuing again what a previous run left
    /// unfinished), starts the generation thread and binds `config.addr`.
    pub async fn bind(config: ServerConfig, catalog: ModelCatalog) -> Result<Self, ServeError> {
        let outputs = config.data_dir.join("outputs");
        std::fs::create_dir_all(&outputs).map_err(|source| ServeError::Io {
            path: outputs.clone(),
            source,
        })?;
        remove_partial_files(&outputs);
        let store = Arc::new(JobStore::open(&config.data_dir)?);
        let queue = Arc::new(JobQueue::new(config.queue_capacity));
        let recovery = store.recover()?;
        for id in &recovery.failed {
            tracing::warn!(job = %id, "interrupted too often by restarts; marked failed");
        }
        if !recovery.queued.is_empty() {
            tracing::info!("{} unfinished jobs queued again", recovery.queued.len());
        }
        queue.restore(recovery.queued);
        let models = Arc::new(Models::new(
            catalog,
            config.max_resident_models,
            config.memory_budget,
        ));
        let (events, _) = broadcast::channel(1024);
        let (shutdown, shutdown_seen) = watch::channel(false);
        let worker = Worker {
            store: store.clone(),
            queue: queue.clone(),
            models: models.clone(),
            events: events.clone(),
            outputs: outputs.clone(),
            limits: config.limits,
        }
        .spawn()
        .map_err(ServeError::Thread)?;
        let listener = TcpListener::bind(config.addr)
            .await
            .map_err(|source| ServeError::Bind {
                addr: config.addr,
                source,
            })?;
        let state = AppState {
            store,
            queue,
            models,
            events,
            outputs,
            limits: config.limits,
            max_body_bytes: config.max_body_bytes,
            token: config.token.map(Arc::from),
            shutdown: shutdown_seen,
        };
        Ok(Self {
            listener,
            state,
            shutdown,
            worker,
        })
    }

    /// The address the server listens on (the port chosen, for port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `shutdown` completes; then takes no new connection or job, ends the event
    /// streams, stops the running job at its next step (it is queued again for the next
    /// start) and returns once the generation thread has ended.
    pub async fn run(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let queue = self.state.queue.clone();
        let stopping = self.shutdown;
        let app = routes::router(self.state);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                tracing::info!("shutting down");
                queue.close();
                let _ = stopping.send(true);
            })
            .await?;
        let worker = self.worker;
        tokio::task::spawn_blocking(move || worker.join())
            .await
            .map_err(std::io::Error::other)?
            .map_err(|_| std::io::Error::other("the generation thread panicked"))
    }
}

/// Removes temporary files a write interrupted by a crash left in `outputs` (the writer names
/// them `.<name>.<random>.part`).
fn remove_partial_files(outputs: &Path) {
    let Ok(entries) = std::fs::read_dir(outputs) else {
        return;
    };
    for path in entries.flatten().map(|e| e.path()) {
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or_default();
        if name.starts_with('.') && name.ends_with(".part") {
            if let Err(e) = std::fs::remove_file(&path) {
                tracing::warn!("cannot remove {}: {e}", path.display());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_temporary_files_of_interrupted_writes_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let names = [".vid_1.mp4.a1B2c3.part", "vid_2.mp4", ".keep", "notes.part"];
        for name in names {
            std::fs::write(dir.path().join(name), b"x").unwrap();
        }
        remove_partial_files(dir.path());
        let mut left: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        assert_eq!(left, [".keep", "notes.part", "vid_2.mp4"]);
    }
}
