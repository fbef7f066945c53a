//! The launch convention of a multi-process run (one process per GPU, as `torchrun` starts
//! them) and the rendezvous that hands rank 0's NCCL unique id to every rank.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

/// The size of an NCCL unique id (`ncclUniqueId`).
pub const UNIQUE_ID_BYTES: usize = 128;

/// How long a rank waits for rank 0's id (other processes may still be loading).
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// How the ranks find rank 0's unique id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rendezvous {
    /// One process: nothing to exchange.
    Single,
    /// Rank 0 listens on `MASTER_PORT` (all interfaces); the others connect to
    /// `MASTER_ADDR:MASTER_PORT` and read the id.
    Tcp { addr: String, port: u16 },
    /// `TURBO_NCCL_ID_FILE`: rank 0 writes the id to a file that must not exist yet (a shared
    /// file system across hosts); the others wait for it.
    File(PathBuf),
}

/// One process's place in a multi-process run, read from the environment:
///
/// | variable | meaning |
/// |---|---|
/// | `WORLD_SIZE` | number of processes (default 1) |
/// | `RANK` | this process, `0..WORLD_SIZE` (needed when `WORLD_SIZE` > 1) |
/// | `LOCAL_RANK` | the GPU of this host to use (default: `RANK`) |
/// | `TURBO_NCCL_ID_FILE` | a fresh file path for the id (taken before `MASTER_*`) |
/// | `MASTER_ADDR`, `MASTER_PORT` | rank 0's host and a free TCP port |
///
/// ```
/// use turbo_core::parallel::{LaunchEnv, Rendezvous};
///
/// let vars = [("WORLD_SIZE", "2"), ("RANK", "1"), ("MASTER_ADDR", "10.0.0.1"), ("MASTER_PORT", "29500")];
/// let env = LaunchEnv::from_vars(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))?;
/// assert_eq!((env.rank, env.world_size, env.local_rank), (1, 2, 1));
/// assert_eq!(env.rendezvous, Rendezvous::Tcp { addr: "10.0.0.1".into(), port: 29500 });
/// # Ok::<(), turbo_core::Error>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchEnv {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub rendezvous: Rendezvous,
}

impl LaunchEnv {
    /// Reads the process environment (see the table above). Without `WORLD_SIZE` and `RANK`,
    /// a single process. A missing, malformed or inconsistent value is an [`Error::Launch`]
    /// naming the variable.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// [`LaunchEnv::from_env`] over any lookup of the variables (for tests and launchers).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let world_size = match var("WORLD_SIZE") {
            None => 1,
            Some(value) => parse_count("WORLD_SIZE", &value, 1)?,
        };
        let rank = match (var("RANK"), world_size) {
            (None, 1) => 0,
            (None, _) => return Err(missing("RANK", "needed when WORLD_SIZE is above 1")),
            (Some(value), _) => parse_below("RANK", &value, world_size)?,
        };
        let local_rank = match var("LOCAL_RANK") {
            None => rank,
            Some(value) => parse_count("LOCAL_RANK", &value, 0)?,
        };
        let rendezvous = if world_size == 1 {
            Rendezvous::Single
        } else {
            rendezvous_from(&var)?
        };
        Ok(Self {
            rank,
            world_size,
            local_rank,
            rendezvous,
        })
    }

    /// Rank 0 makes the id with `make` and hands it to the others; every rank returns it.
    pub fn share_unique_id(
        &self,
        make: impl FnOnce() -> Result<[u8; UNIQUE_ID_BYTES]>,
    ) -> Result<[u8; UNIQUE_ID_BYTES]> {
        match (&self.rendezvous, self.rank) {
            (Rendezvous::Single, _) => make(),
            (Rendezvous::Tcp { port, .. }, 0) => serve_id(*port, self.world_size - 1, &make()?),
            (Rendezvous::Tcp { addr, port }, _) => fetch_id(addr, *port, RENDEZVOUS_TIMEOUT),
            (Rendezvous::File(path), 0) => write_id_file(path, &make()?),
            (Rendezvous::File(path), _) => read_id_file(path, RENDEZVOUS_TIMEOUT),
        }
    }
}

fn rendezvous_from(var: &impl Fn(&str) -> Option<String>) -> Result<Rendezvous> {
    if let Some(path) = var("TURBO_NCCL_ID_FILE") {
        if path.is_empty() {
            return Err(launch_error("TURBO_NCCL_ID_FILE", &path, "an empty path"));
        }
        return Ok(Rendezvous::File(path.into()));
    }
    let addr = var("MASTER_ADDR").ok_or_else(|| {
        missing(
            "MASTER_ADDR",
            "a run of several processes needs MASTER_ADDR and MASTER_PORT, or TURBO_NCCL_ID_FILE",
        )
    })?;
    if addr.is_empty() {
        return Err(launch_error("MASTER_ADDR", &addr, "an empty host name"));
    }
    let port =
        var("MASTER_PORT").ok_or_else(|| missing("MASTER_PORT", "needed with MASTER_ADDR"))?;
    let port = match port.trim().parse::<u16>() {
        Ok(p) if p > 0 => p,
        _ => {
            return Err(launch_error(
                "MASTER_PORT",
                &port,
                "expected a TCP port, 1 to 65535",
            ))
        }
    };
    Ok(Rendezvous::Tcp { addr, port })
}

fn launch_error(var: &'static str, value: &str, reason: &str) -> Error {
    Error::Launch {
        var,
        value: value.into(),
        reason: reason.into(),
    }
}

fn missing(var: &'static str, reason: &str) -> Error {
    Error::Launch {
        var,
        value: String::new(),
        reason: format!("not set: {reason}"),
    }
}

/// An integer of at least `min`.
fn parse_count(var: &'static str, value: &str, min: usize) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) if n >= min => Ok(n),
        _ => Err(launch_error(
            var,
            value,
            &format!("expected an integer of at least {min}"),
        )),
    }
}

/// An integer in `0..bound`.
fn parse_below(var: &'static str, value: &str, bound: usize) -> Result<usize> {
    match value.trim().parse::<usize>() {
        Ok(n) if n < bound => Ok(n),
        _ => Err(launch_error(
            var,
            value,
            &format!("expected an integer in 0..{bound} (below WORLD_SIZE)"),
        )),
    }
}

fn io_error(path: impl Into<PathBuf>, source: std::io::Error) -> Error {
    Error::Io {
        path: path.into(),
        source,
    }
}

/// Rank 0: accepts `peers` connections on `port` and writes the id to each.
fn serve_id(port: u16, peers: usize, id: &[u8; UNIQUE_ID_BYTES]) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let endpoint = format!("0.0.0.0:{port}");
    let listener = TcpListener::bind(&endpoint).map_err(|e| io_error(&endpoint, e))?;
    serve_id_on(&listener, peers, id)?;
    Ok(*id)
}

fn serve_id_on(listener: &TcpListener, peers: usize, id: &[u8; UNIQUE_ID_BYTES]) -> Result<()> {
    for _ in 0..peers {
        let (mut stream, peer) = listener
            .accept()
            .map_err(|e| io_error("rendezvous listener", e))?;
        stream
            .write_all(id)
            .map_err(|e| io_error(peer.to_string(), e))?;
    }
    Ok(())
}

/// Another rank: connects to rank 0 (retrying until `timeout`, rank 0 may not listen yet) and
/// reads the id.
fn fetch_id(addr: &str, port: u16, timeout: Duration) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let endpoint = format!("{addr}:{port}");
    let start = Instant::now();
    let mut stream = loop {
        match TcpStream::connect(&endpoint) {
            Ok(stream) => break stream,
            Err(e) if start.elapsed() >= timeout => return Err(io_error(&endpoint, e)),
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    };
    let mut id = [0u8; UNIQUE_ID_BYTES];
    stream
        .read_exact(&mut id)
        .map_err(|e| io_error(&endpoint, e))?;
    Ok(id)
}

/// Rank 0: writes the id to a temporary file beside `path` and renames it, so that a reader
/// never sees a partial id. An existing `path` is an error: it may hold a previous run's id.
fn write_id_file(path: &Path, id: &[u8; UNIQUE_ID_BYTES]) -> Result<[u8; UNIQUE_ID_BYTES]> {
    if path.exists() {
        return Err(launch_error(
            "TURBO_NCCL_ID_FILE",
            &path.display().to_string(),
            "the file exists already (a previous run's id?): remove it or name a fresh path",
        ));
    }
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = PathBuf::from(partial);
    std::fs::write(&partial, id).map_err(|e| io_error(&partial, e))?;
    std::fs::rename(&partial, path).map_err(|e| io_error(path, e))?;
    Ok(*id)
}

/// Another rank: waits until `path` holds a whole id.
fn read_id_file(path: &Path, timeout: Duration) -> Result<[u8; UNIQUE_ID_BYTES]> {
    let start = Instant::now();
    loop {
        match std::fs::read(path) {
            Ok(bytes) if bytes.len() == UNIQUE_ID_BYTES => {
                let mut id = [0u8; UNIQUE_ID_BYTES];
                id.copy_from_slice(&bytes);
                return Ok(id);
            }
            Ok(bytes) => {
                return Err(launch_error(
                    "TURBO_NCCL_ID_FILE",
                    &path.display().to_string(),
                    &format!("holds {} bytes, expected {UNIQUE_ID_BYTES}", bytes.len()),
                ))
            }
            Err(e) if start.elapsed() >= timeout => return Err(io_error(path, e)),
            Err(_) => std::thread::sleep(POLL_INTERVAL),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    fn env(vars: &[(&str, &str)]) -> Result<LaunchEnv> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        LaunchEnv::from_vars(|name| map.get(name).cloned())
    }

    fn launch_var(result: Result<LaunchEnv>) -> &'static str {
        match result {
            Err(Error::Launch { var, .. }) => var,
            other => panic!("expected a launch error, got {other:?}"),
        }
    }

    #[test]
    fn no_variables_is_one_process() {
        let single = env(&[]).unwrap();
        assert_eq!(
            single,
            LaunchEnv {
                rank: 0,
                world_size: 1,
                local_rank: 0,
                rendezvous: Rendezvous::Single
            }
        );
    }

    #[test]
    fn the_id_file_is_taken_before_master_addr() {
        let e = env(&[
            ("WORLD_SIZE", "4"),
            ("RANK", "3"),
            ("LOCAL_RANK", "1"),
            ("TURBO_NCCL_ID_FILE", "/tmp/id"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "1"),
        ])
        .unwrap();
        assert_eq!((e.rank, e.local_rank), (3, 1));
        assert_eq!(e.rendezvous, Rendezvous::File("/tmp/id".into()));
    }

    #[test]
    fn bad_values_name_their_variable() {
        assert_eq!(launch_var(env(&[("WORLD_SIZE", "0")])), "WORLD_SIZE");
        assert_eq!(launch_var(env(&[("WORLD_SIZE", "two")])), "WORLD_SIZE");
        assert_eq!(launch_var(env(&[("WORLD_SIZE", "2")])), "RANK");
        assert_eq!(
            launch_var(env(&[("WORLD_SIZE", "2"), ("RANK", "2")])),
            "RANK"
        );
        assert_eq!(
            launch_var(env(&[("WORLD_SIZE", "2"), ("RANK", "0")])),
            "MASTER_ADDR"
        );
        let no_port = [("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h")];
        assert_eq!(launch_var(env(&no_port)), "MASTER_PORT");
        let bad_port = [
            ("WORLD_SIZE", "2"),
            ("RANK", "0"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "70000"),
        ];
        assert_eq!(launch_var(env(&bad_port)), "MASTER_PORT");
        assert_eq!(launch_var(env(&[("LOCAL_RANK", "-1")])), "LOCAL_RANK");
    }

    #[test]
    fn tcp_rendezvous_hands_rank_zeros_id_to_every_rank() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let id = [7u8; UNIQUE_ID_BYTES];
        std::thread::scope(|scope| {
            let server = scope.spawn(|| serve_id_on(&listener, 2, &id));
            let clients: Vec<_> = (0..2)
                .map(|_| scope.spawn(move || fetch_id("127.0.0.1", port, Duration::from_secs(10))))
                .collect();
            server.join().unwrap().unwrap();
            for client in clients {
                assert_eq!(client.join().unwrap().unwrap(), id);
            }
        });
    }

    #[test]
    fn file_rendezvous_waits_for_the_whole_id_and_refuses_a_stale_file() {
        let dir = tempdir();
        let path = dir.join("nccl.id");
        let id = [3u8; UNIQUE_ID_BYTES];
        std::thread::scope(|scope| {
            let reader = scope.spawn(|| read_id_file(&path, Duration::from_secs(10)));
            std::thread::sleep(Duration::from_millis(100));
            write_id_file(&path, &id).unwrap();
            assert_eq!(reader.join().unwrap().unwrap(), id);
        });
        let again = write_id_file(&path, &id).unwrap_err();
        assert!(matches!(
            again,
            Error::Launch {
                var: "TURBO_NCCL_ID_FILE",
                ..
            }
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn tempdir() -> PathBuf {
        let dir = std::env::temp_dir().join(format!("turbo-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }
}
