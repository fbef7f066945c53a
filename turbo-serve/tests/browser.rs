//! The page in a real browser: headless Chromium (the Debian package `chromium`) loads `/`,
//! fills the form, submits a demo job, waits until the video element plays the result, checks
//! the gallery, and saves a screenshot. Driven over the DevTools protocol (a WebSocket).
//!
//! Without Chromium the test prints why it is skipped. `scripts/serve-browser-test.sh` runs it
//! and keeps the screenshot in `docs/turbo-serve.png`.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use base64::Engine;
use common::{request, ServerProcess, PATIENCE};
use serde_json::{json, Value};
use tungstenite::{Message, WebSocket};

/// Where Chromium is looked for, unless `CHROMIUM` names another binary.
const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";

#[test]
fn the_page_submits_a_job_and_plays_its_video() {
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| DEFAULT_CHROMIUM.to_owned());
    if !std::path::Path::new(&chromium).exists() {
        // Written to the process's stderr, past the test harness's capture, so that the skip
        // shows in a normal `cargo test` run.
        let reason = format!(
            "SKIPPED the_page_submits_a_job_and_plays_its_video: no Chromium at {chromium} \
             (install the Debian package `chromium`, or set CHROMIUM to its binary)\n"
        );
        let _ = std::io::stderr().write_all(reason.as_bytes());
        return;
    }
    let data = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(data.path(), &[]);
    let profile = tempfile::tempdir().unwrap();
    let mut browser = Browser::launch(
        &chromium,
        profile.path(),
        &format!("http://{}/", server.addr),
    );

    // `model` is null until the page has loaded, then empty until the models are fetched.
    browser.wait_for(
        "the model list",
        "document.getElementById('model')?.options.length > 0",
    );
    browser.evaluate(
        "(() => {
            const set = (id, value) => { const e = document.getElementById(id); e.value = value;
                                         e.dispatchEvent(new Event('change')); };
            set('prompt', 'a paper boat on a pond');
            set('size', 'custom'); set('width', '64'); set('height', '48');
            set('frames', '5'); set('steps', '2'); set('attention', 'original'); set('seed', '3');
            document.getElementById('submit').click();
            return true;
        })()",
    );
    let size = browser.wait_for(
        "the video to play",
        "(() => { const v = document.getElementById('player');
                  if (v.error) throw new Error('video error ' + v.error.code);
                  return !v.hidden && v.readyState >= 2 ? v.videoWidth + 'x' + v.videoHeight : ''; })()",
    );
    assert_eq!(size, "64x48");
    let stage = browser.evaluate("document.getElementById('stage').textContent");
    assert!(stage.as_str().unwrap().starts_with("succeeded"), "{stage}");
    browser.wait_for(
        "the job in the gallery",
        "document.querySelectorAll('#gallery .job .status-succeeded').length === 1",
    );

    let screenshot = browser.screenshot();
    let path = std::env::var("TURBO_SERVE_SCREENSHOT").map_or_else(
        |_| PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("turbo-serve-page.png"),
        PathBuf::from,
    );
    std::fs::write(&path, screenshot).unwrap();
    eprintln!("screenshot: {}", path.display());
    browser.close();
}

/// A headless Chromium and the DevTools connection to its page.
struct Browser {
    process: Child,
    page: WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Browser {
    fn launch(chromium: &str, profile: &std::path::Path, url: &str) -> Self {
        let mut process = Command::new(chromium)
            .args([
                "--headless=new",
                // The sandbox needs user namespaces, which containers and root often lack.
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--window-size=1280,1000",
                "--remote-debugging-port=0",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg(url)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("Chromium starts");
        let port = devtools_port(&mut process);
        let page = page_socket(port);
        Self {
            process,
            page,
            next_id: 0,
        }
    }

    /// Sends a DevTools command and returns its result.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.page.send(Message::text(command.to_string())).unwrap();
        loop {
            let message = self.page.read().expect("a DevTools message");
            let Ok(text) = message.to_text() else {
                continue;
            };
            let reply: Value = serde_json::from_str(text).unwrap();
            if reply["id"] == id {
                assert!(reply.get("error").is_none(), "{method}: {reply}");
                return reply["result"].clone();
            }
        }
    }

    /// The value of a JavaScript expression in the page (a thrown error fails the test).
    fn evaluate(&mut self, expression: &str) -> Value {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(exception) = result.get("exceptionDetails") {
            panic!("{expression}: {exception}");
        }
        result["result"]["value"].clone()
    }

    /// Evaluates `expression` until it is truthy; returns it.
    fn wait_for(&mut self, what: &str, expression: &str) -> String {
        let deadline = Instant::now() + PATIENCE;
        loop {
            match self.evaluate(expression) {
                Value::Bool(true) => return "true".into(),
                Value::String(text) if !text.is_empty() => return text,
                _ => {}
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn screenshot(&mut self) -> Vec<u8> {
        let result = self.call(
            "Page.captureScreenshot",
            json!({"format": "png", "captureBeyondViewport": true}),
        );
        base64::engine::general_purpose::STANDARD
            .decode(result["data"].as_str().unwrap())
            .unwrap()
    }

    fn close(mut self) {
        let _ = self.call("Browser.close", json!({}));
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.process.try_wait().unwrap().is_none() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// The port of `DevTools listening on ws://127.0.0.1:PORT/…`, which Chromium prints on stderr.
fn devtools_port(process: &mut Child) -> u16 {
    let mut lines = BufReader::new(process.stderr.take().unwrap()).lines();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("DevTools listening on ws://127.0.0.1:") {
            // Keep reading, so that Chromium's later messages do not hit a closed pipe.
            std::thread::spawn(move || lines.for_each(drop));
            return rest.split('/').next().unwrap().parse().unwrap();
        }
    }
    panic!("Chromium ended without opening its DevTools port");
}

/// The WebSocket of the page Chromium opened.
fn page_socket(port: u16) -> WebSocket<tungstenite::stream::MaybeTlsStream<TcpStream>> {
    let addr = format!("127.0.0.1:{port}");
    let deadline = Instant::now() + PATIENCE;
    loop {
        let targets = request(&addr, "GET", "/json/list", &[], None).json();
        let page = targets
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["type"] == "page")
            .and_then(|t| t["webSocketDebuggerUrl"].as_str());
        if let Some(url) = page {
            return tungstenite::connect(url).expect("connect to the page").0;
        }
        assert!(Instant::now() < deadline, "Chromium opened no page");
        std::thread::sleep(Duration::from_millis(100));
    }
}
