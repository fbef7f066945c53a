//! Starting the `turbo-serve` binary on an ephemeral loopback port, and a small HTTP/1.1
//! client over a plain socket to drive it (requests, server-sent events).

#![allow(dead_code)] // Each test file uses part of this.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any one wait of a test may take before it fails.
pub const PATIENCE: Duration = Duration::from_secs(90);

/// A running server process, killed when dropped.
pub struct ServerProcess {
    child: Child,
    pub addr: String,
    pub data_dir: PathBuf,
}

impl ServerProcess {
    /// Starts `turbo-serve --addr 127.0.0.1:0 --data-dir DATA_DIR EXTRA…` (the demo models)
    /// and reads the address it prints.
    pub fn start(data_dir: &Path, extra: &[&str]) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_turbo-serve"))
            .args(["--addr", "127.0.0.1:0", "--data-dir"])
            .arg(data_dir)
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the turbo-serve binary starts");
        let mut line = String::new();
        BufReader::new(child.stdout.take().expect("piped stdout"))
            .read_line(&mut line)
            .expect("the server prints its address");
        let addr = line
            .trim()
            .strip_prefix("turbo-serve listening on http://")
            .unwrap_or_else(|| panic!("unexpected first line: {line:?}"))
            .to_owned();
        Self {
            child,
            addr,
            data_dir: data_dir.to_owned(),
        }
    }

    /// Sends SIGTERM and waits for the process to end.
    pub fn terminate(mut self) -> ExitStatus {
        let pid = self.child.id().to_string();
        let sent = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(sent.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + PATIENCE;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the server did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn crash(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    pub fn get(&self, path: &str) -> Response {
        request(&self.addr, "GET", path, &[], None)
    }

    pub fn delete(&self, path: &str) -> Response {
        request(&self.addr, "DELETE", path, &[], None)
    }

    /// Submits `body` and returns the job id (the answer must be 202).
    pub fn submit(&self, body: &Value) -> String {
        let response = self.post_json("/v1/videos", body);
        assert_eq!(response.status, 202, "{}", response.text());
        response.json()["id"].as_str().unwrap().to_owned()
    }

    pub fn post_json(&self, path: &str, body: &Value) -> Response {
        let bytes = body.to_string().into_bytes();
        request(
            &self.addr,
            "POST",
            path,
            &[("Content-Type", "application/json")],
            Some(&bytes),
        )
    }

    /// The job's events until `stop` returns true for one of them (or the stream ends).
    pub fn events_until(&self, id: &str, stop: impl FnMut(&Value) -> bool) -> Vec<Value> {
        read_events(&self.addr, &format!("/v1/videos/{id}/events"), &[], stop)
    }

    /// Follows the job's events until it is over; returns them all.
    pub fn wait_until_over(&self, id: &str) -> Vec<Value> {
        let events = self.events_until(id, |_| false);
        let last = events.last().expect("at least one event");
        let status = last["status"].as_str().unwrap();
        assert!(
            ["succeeded", "failed", "canceled"].contains(&status),
            "the stream ended at {last}"
        );
        events
    }

    /// Waits until the job has finished at least one denoising step.
    pub fn wait_until_denoising(&self, id: &str) {
        let events = self.events_until(id, |event| event["progress"]["step"].as_u64() >= Some(1));
        let last = events.last().unwrap();
        assert_eq!(last["status"], "running", "{last}");
    }

    pub fn job(&self, id: &str) -> Value {
        let response = self.get(&format!("/v1/videos/{id}"));
        assert_eq!(response.status, 200, "{}", response.text());
        response.json()
    }

    pub fn video_path(&self, id: &str) -> PathBuf {
        self.data_dir.join("outputs").join(format!("{id}.mp4"))
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An HTTP response, body read whole.
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }

    /// The `field` of a JSON error body.
    pub fn error_field(&self) -> String {
        self.json()["error"]["field"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }
}

fn connect(addr: &str) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect to the server");
    stream.set_read_timeout(Some(PATIENCE)).unwrap();
    stream
}

/// One request on its own connection (`Connection: close`).
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Response {
    let mut stream = connect(addr);
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    let body = body.unwrap_or_default();
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    stream.write_all(head.as_bytes()).unwrap();
    // The server may answer (413) before reading a large body, and close.
    let _ = stream.write_all(body);
    parse_response(&read_response(&mut stream))
}

/// The raw response: up to its `Content-Length`, else to the end of the connection (some
/// servers keep it open despite `Connection: close`).
fn read_response(stream: &mut TcpStream) -> Vec<u8> {
    let mut raw = Vec::new();
    let mut buffer = [0u8; 64 * 1024];
    loop {
        if let Some(expected) = expected_length(&raw) {
            if raw.len() >= expected {
                return raw;
            }
        }
        match stream.read(&mut buffer) {
            Ok(0) => return raw,
            Ok(n) => raw.extend_from_slice(&buffer[..n]),
            // A server refusing a body it did not read may reset the connection after its
            // answer.
            Err(_) => return raw,
        }
    }
}

/// Head plus body length, once the head is in and gives a `Content-Length`.
fn expected_length(raw: &[u8]) -> Option<usize> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&raw[..split]).to_ascii_lowercase();
    let length = head
        .lines()
        .find_map(|line| line.strip_prefix("content-length:"))?
        .trim()
        .parse::<usize>()
        .ok()?;
    Some(split + 4 + length)
}

fn parse_response(raw: &[u8]) -> Response {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete response head");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: Vec<(String, String)> = lines
        .filter_map(|line| line.split_once(':'))
        .map(|(n, v)| (n.trim().to_owned(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n.eq_ignore_ascii_case("transfer-encoding") && v.contains("chunked"));
    if chunked {
        body = dechunk(&body);
    }
    Response {
        status,
        headers,
        body,
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n").unwrap();
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return body;
        }
        let start = line_end + 2;
        body.extend_from_slice(&data[start..start + size]);
        data = &data[start + size + 2..];
    }
}

/// Reads server-sent events (as HTTP/1.0, so the stream is not chunked) and returns each
/// event's JSON data, until `stop` says so or the server ends the stream.
pub fn read_events(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    mut stop: impl FnMut(&Value) -> bool,
) -> Vec<Value> {
    let mut stream = connect(addr);
    let mut head = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n");
    for (name, value) in headers {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes()).unwrap();
    let mut reader = BufReader::new(stream);
    let mut status_line = String::new();
    reader.read_line(&mut status_line).unwrap();
    assert!(status_line.contains(" 200 "), "events: {status_line}");
    let mut events = Vec::new();
    for line in reader.lines() {
        let line = line.expect("read an event line");
        if let Some(data) = line.strip_prefix("data:") {
            let event: Value = serde_json::from_str(data.trim()).unwrap();
            let done = stop(&event);
            events.push(event);
            if done {
                break;
            }
        }
    }
    events
}

/// A small PNG image, as bytes.
pub fn png(width: u32, height: u32) -> Vec<u8> {
    let image = image::RgbImage::from_fn(width, height, |x, y| {
        image::Rgb([(x * 8) as u8, (y * 8) as u8, 128])
    });
    let mut bytes = Vec::new();
    image
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .unwrap();
    bytes
}
