//! The HTTP API end to end: the `turbo-serve` binary with the demo models on an ephemeral
//! loopback port, driven over real sockets. The jobs are tiny (a few frames of 32–128 pixels)
//! so the whole file runs in seconds on two CPU cores.

mod common;

use std::os::unix::fs::PermissionsExt;

use base64::Engine;
use common::{png, request, ServerProcess};
use serde_json::{json, Value};
use turbodiffusion::video::Video;

/// A job of a second or less: 48×32, 9 frames, 2 rCM steps.
fn tiny_job(prompt: &str) -> Value {
    json!({"prompt": prompt, "width": 48, "height": 32, "num_frames": 9, "steps": 2,
           "attention": "original", "seed": 1})
}

/// A job whose denoising takes seconds (100 guided steps), so that it can be caught running.
fn long_job() -> Value {
    json!({"prompt": "a long one", "width": 128, "height": 128, "num_frames": 17,
           "sampler": "teacher", "steps": 100, "attention": "original"})
}

/// A job that denoises for about a second (100 guided steps on a 64×64, 5-frame latent).
fn medium_job() -> Value {
    json!({"prompt": "a medium one", "width": 64, "height": 64, "num_frames": 5,
           "sampler": "teacher", "steps": 100, "attention": "original"})
}

#[test]
fn a_job_streams_its_progress_and_serves_its_mp4() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let id = server.submit(&tiny_job("a red fox"));

    let events = server.wait_until_over(&id);
    let statuses: Vec<&str> = events
        .iter()
        .map(|e| e["status"].as_str().unwrap())
        .collect();
    assert_eq!(statuses.last(), Some(&"succeeded"), "{statuses:?}");
    assert!(statuses.contains(&"running"), "{statuses:?}");
    let steps: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e["progress"]["stage"] == "denoising")
        .map(|e| {
            (
                e["progress"]["step"].as_u64().unwrap(),
                e["progress"]["steps"].as_u64().unwrap(),
            )
        })
        .collect();
    assert!(steps.contains(&(2, 2)), "every step is reported: {steps:?}");

    let job = server.job(&id);
    assert_eq!(job["status"], "succeeded");
    assert_eq!(job["progress"]["fraction"], 1.0);
    assert_eq!(job["request"]["prompt"], "a red fox");
    for timing in [
        "queued_ms",
        "encode_text_ms",
        "denoise_ms",
        "decode_ms",
        "write_ms",
        "run_ms",
    ] {
        assert!(job["timings"][timing].is_u64(), "{timing}: {job}");
    }

    let content = server.get(&format!("/v1/videos/{id}/content"));
    assert_eq!(content.status, 200);
    assert_eq!(content.header("content-type"), Some("video/mp4"));
    assert_eq!(content.header("accept-ranges"), Some("bytes"));
    let downloaded = dir.path().join("downloaded.mp4");
    std::fs::write(&downloaded, &content.body).unwrap();
    let video = Video::read_mp4(&downloaded).expect("an H.264 MP4 the reader decodes");
    assert_eq!((video.len(), video.width(), video.height()), (9, 48, 32));
    let mode = std::fs::metadata(server.video_path(&id))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);

    check_ranges(&server, &id, &content.body);

    let bad_limit = server.get("/v1/videos?limit=many");
    assert_eq!(
        (bad_limit.status, bad_limit.error_field()),
        (400, "limit".into())
    );
    let list = server.get("/v1/videos").json();
    assert_eq!(list["data"][0]["id"], id.as_str());
    let models = server.get("/v1/models").json();
    let column = |key: &str| -> Vec<String> {
        let entries = models["data"].as_array().unwrap();
        entries
            .iter()
            .map(|m| m[key].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(
        column("id"),
        ["demo", "demo-i2v", "demo-ti2v", "demo-flf2v"]
    );
    assert_eq!(column("task"), ["t2v", "i2v", "ti2v", "flf2v"]);
    assert_eq!(models["data"][0]["resident"], true);
    let flf2v = &models["data"][3];
    assert_eq!(flf2v["inputs"]["end_image"], "required");
    assert_eq!(flf2v["defaults"]["sampler"], "teacher");
    assert_eq!(models["data"][2]["inputs"]["image"], "optional");
}

fn check_ranges(server: &ServerProcess, id: &str, whole: &[u8]) {
    let path = format!("/v1/videos/{id}/content");
    let size = whole.len();
    let ranged = |range: &str| request(&server.addr, "GET", &path, &[("Range", range)], None);
    let first = ranged("bytes=0-99");
    assert_eq!(first.status, 206);
    assert_eq!(
        first.header("content-range"),
        Some(&*format!("bytes 0-99/{size}"))
    );
    assert_eq!(first.body, &whole[..100]);
    let tail = ranged("bytes=-10");
    assert_eq!(tail.status, 206);
    assert_eq!(tail.body, &whole[size - 10..]);
    let middle = ranged(&format!("bytes=100-{}", size + 50));
    assert_eq!(middle.body, &whole[100..]);
    let outside = ranged(&format!("bytes={size}-"));
    assert_eq!(outside.status, 416);
    assert_eq!(
        outside.header("content-range"),
        Some(&*format!("bytes */{size}"))
    );
}

#[test]
fn an_image_to_video_job_runs_from_an_uploaded_image() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let image = base64::engine::general_purpose::STANDARD.encode(png(40, 24));
    let id = server.submit(&json!({
        "prompt": "the picture comes alive", "task": "i2v",
        "image": format!("data:image/png;base64,{image}"),
        "width": 32, "height": 32, "num_frames": 5, "steps": 1, "attention": "original"
    }));
    let events = server.wait_until_over(&id);
    assert_eq!(events.last().unwrap()["status"], "succeeded", "{events:?}");
    assert!(events
        .iter()
        .any(|e| e["progress"]["stage"] == "encoding_image"));
    let video = Video::read_mp4(server.video_path(&id)).unwrap();
    assert_eq!((video.len(), video.width(), video.height()), (5, 32, 32));
    let job = server.job(&id);
    assert!(
        job["request"].get("image").is_none(),
        "the image bytes are not echoed"
    );

    // The same as a file upload: `curl -F request=… -F image=@picture.png`.
    let request = json!({"prompt": "uploaded", "width": 32, "height": 48, "num_frames": 5,
                         "steps": 1, "attention": "original"});
    let body = multipart(&[
        ("request", None, request.to_string().as_bytes()),
        ("image", Some("picture.png"), &png(24, 40)),
    ]);
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let headers = [("Content-Type", content_type.as_str())];
    let response = common::request(&server.addr, "POST", "/v1/videos", &headers, Some(&body));
    assert_eq!(response.status, 202, "{}", response.text());
    let id = response.json()["id"].as_str().unwrap().to_owned();
    assert_eq!(
        server.wait_until_over(&id).last().unwrap()["status"],
        "succeeded"
    );
    let video = Video::read_mp4(server.video_path(&id)).unwrap();
    assert_eq!((video.len(), video.width(), video.height()), (5, 32, 48));
}

fn png_base64(width: u32, height: u32) -> String {
    base64::engine::general_purpose::STANDARD.encode(png(width, height))
}

/// A TI2V job at 64×32, 5 frames, 2 teacher steps.
fn tiny_ti2v_job(prompt: &str) -> Value {
    json!({"prompt": prompt, "task": "ti2v", "width": 64, "height": 32, "num_frames": 5,
           "steps": 2, "attention": "original", "seed": 3})
}

fn assert_video_of(
    server: &ServerProcess,
    id: &str,
    (frames, width, height): (usize, usize, usize),
) {
    let events = server.wait_until_over(id);
    assert_eq!(events.last().unwrap()["status"], "succeeded", "{events:?}");
    let video = Video::read_mp4(server.video_path(id)).unwrap();
    assert_eq!(
        (video.len(), video.width(), video.height()),
        (frames, width, height)
    );
}

#[test]
fn a_ti2v_job_runs_from_text_alone_and_from_text_and_an_image() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let text_only = server.submit(&tiny_ti2v_job("a lighthouse at dusk"));
    assert_video_of(&server, &text_only, (5, 64, 32));
    assert_eq!(server.job(&text_only)["request"]["task"], "ti2v");

    let mut with_image = tiny_ti2v_job("the lighthouse beam turns");
    with_image["image"] = json!(png_base64(40, 24));
    let id = server.submit(&with_image);
    assert_video_of(&server, &id, (5, 64, 32));
    let job = server.job(&id);
    assert!(job["request"].get("image").is_none(), "{job}");
    assert!(job["timings"]["encode_image_ms"].is_u64(), "{job}");
}

#[test]
fn a_flf2v_job_runs_from_uploaded_first_and_last_frames() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let request = json!({"prompt": "day turns to night", "model": "demo-flf2v", "width": 32,
                         "height": 32, "num_frames": 5, "steps": 2, "attention": "original"});
    let body = multipart(&[
        ("request", None, request.to_string().as_bytes()),
        ("image", Some("first.png"), &png(24, 24)),
        ("end_image", Some("last.png"), &png(24, 24)),
    ]);
    let content_type = format!("multipart/form-data; boundary={BOUNDARY}");
    let headers = [("Content-Type", content_type.as_str())];
    let response = common::request(&server.addr, "POST", "/v1/videos", &headers, Some(&body));
    assert_eq!(response.status, 202, "{}", response.text());
    let id = response.json()["id"].as_str().unwrap().to_owned();
    assert_video_of(&server, &id, (5, 32, 32));

    // The end image in the JSON as well as a file part is one too many.
    let twice = json!({"prompt": "twice", "model": "demo-flf2v", "end_image": png_base64(8, 8)});
    let body = multipart(&[
        ("request", None, twice.to_string().as_bytes()),
        ("image", Some("first.png"), &png(8, 8)),
        ("end_image", Some("last.png"), &png(8, 8)),
    ]);
    let response = common::request(&server.addr, "POST", "/v1/videos", &headers, Some(&body));
    assert_eq!(
        (response.status, response.error_field()),
        (400, "end_image".into())
    );
}

const BOUNDARY: &str = "turbo-serve-test-boundary";

/// A `multipart/form-data` body of `(name, file name, content)` parts.
fn multipart(parts: &[(&str, Option<&str>, &[u8])]) -> Vec<u8> {
    let mut body = Vec::new();
    for (name, file_name, content) in parts {
        let file = file_name.map_or(String::new(), |f| format!("; filename=\"{f}\""));
        let head = format!(
            "--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"{file}\r\n\r\n"
        );
        body.extend_from_slice(head.as_bytes());
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    }
    body.extend_from_slice(format!("--{BOUNDARY}--\r\n").as_bytes());
    body
}

#[test]
fn bad_requests_are_refused_naming_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(
        dir.path(),
        &["--max-body-mib", "1", "--queue-capacity", "1"],
    );
    let garbage_image = base64::engine::general_purpose::STANDARD.encode(b"not a picture");
    let cases = [
        (json!({"prompt": "a", "num_frames": 8}), "num_frames"),
        (json!({"prompt": "a", "width": 100, "height": 64}), "width"),
        (
            json!({"prompt": "a", "width": 64, "height": 2048}),
            "height",
        ),
        (json!({"prompt": "a", "model": "wan9"}), "model"),
        (json!({"prompt": "a".repeat(2001)}), "prompt"),
        (json!({"prompt": "a", "image": garbage_image}), "image"),
        (json!({"prompt": "a", "steps": 0}), "steps"),
        (
            json!({"prompt": "a", "attention": "sagesla:0"}),
            "attention",
        ),
        (
            json!({"prompt": "a", "model": "demo", "task": "ti2v"}),
            "task",
        ),
        (
            json!({"prompt": "a", "task": "flf2v", "image": png_base64(16, 16)}),
            "end_image",
        ),
        (
            json!({"prompt": "a", "model": "demo", "end_image": png_base64(16, 16)}),
            "end_image",
        ),
        (
            json!({"prompt": "a", "model": "demo-ti2v", "sampler": "rcm"}),
            "sampler",
        ),
        (
            json!({"prompt": "a", "aspect_ratio": "21:9"}),
            "aspect_ratio",
        ),
        (json!({"prompt": "a", "seed": "seven"}), "seed"),
        (json!({"prompt": "a", "lora": [{"name": "style"}]}), "lora"),
        (json!({"negative_prompt": "a"}), "prompt"),
    ];
    for (body, field) in cases {
        let response = server.post_json("/v1/videos", &body);
        assert_eq!(response.status, 400, "{body}: {}", response.text());
        assert_eq!(response.error_field(), field, "{body}: {}", response.text());
        assert_eq!(response.json()["error"]["code"], "invalid_field");
    }

    let form = br#"{"prompt": "from another site's form"}"#;
    let response = request(
        &server.addr,
        "POST",
        "/v1/videos",
        &[("Content-Type", "text/plain")],
        Some(form),
    );
    assert_eq!(response.status, 400, "{}", response.text());
    assert_eq!(response.error_field(), "content-type");

    // A page of another site cannot submit or cancel.
    let foreign = [
        ("Content-Type", "application/json"),
        ("Origin", "http://evil.example"),
    ];
    let body = tiny_job("cross-site").to_string();
    let response = request(
        &server.addr,
        "POST",
        "/v1/videos",
        &foreign,
        Some(body.as_bytes()),
    );
    assert_eq!(response.status, 403, "{}", response.text());
    assert_eq!(response.json()["error"]["code"], "cross_origin");

    let too_large = vec![b' '; (1 << 20) + 1024];
    let json = [("Content-Type", "application/json")];
    let response = request(&server.addr, "POST", "/v1/videos", &json, Some(&too_large));
    assert_eq!(response.status, 413, "{}", response.text());
    assert_eq!(response.error_field(), "body");

    for path in [
        "/v1/videos/vid_00000000000000000000000000000000",
        "/v1/videos/..%2Fjobs.sqlite3/content",
        "/v1/nothing",
    ] {
        let response = server.get(path);
        assert_eq!(response.status, 404, "{path}");
        assert!(response.json()["error"]["message"].is_string());
    }

    // One job runs, one waits, the next finds the queue full.
    let running = server.submit(&long_job());
    server.wait_until_denoising(&running);
    let waiting = server.submit(&tiny_job("waits"));
    let refused = server.post_json("/v1/videos", &tiny_job("refused"));
    assert_eq!(refused.status, 429, "{}", refused.text());
    assert_eq!(refused.error_field(), "queue");
    let not_yet = server.get(&format!("/v1/videos/{waiting}/content"));
    assert_eq!(not_yet.status, 409);
    assert_eq!(server.delete(&format!("/v1/videos/{running}")).status, 202);
}

#[test]
fn cancel_stops_running_and_queued_jobs_leaving_no_file() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let running = server.submit(&long_job());
    let queued = server.submit(&tiny_job("never runs"));
    server.wait_until_denoising(&running);

    let response = server.delete(&format!("/v1/videos/{queued}"));
    assert_eq!(response.status, 200, "{}", response.text());
    assert_eq!(response.json()["status"], "canceled");

    let response = server.delete(&format!("/v1/videos/{running}"));
    assert_eq!(response.status, 202, "{}", response.text());
    let events = server.wait_until_over(&running);
    let last = events.last().unwrap();
    assert_eq!(last["status"], "canceled", "{last}");
    let step = last["progress"]["step"].as_u64().unwrap();
    assert!(step < 100, "stopped at step {step} of 100");

    for id in [&running, &queued] {
        assert!(!server.video_path(id).exists(), "{id} left a video");
        assert_eq!(server.get(&format!("/v1/videos/{id}/content")).status, 409);
        assert_eq!(
            server.delete(&format!("/v1/videos/{id}")).status,
            409,
            "already over"
        );
    }
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("outputs"))
        .unwrap()
        .collect();
    assert!(leftovers.is_empty(), "no partial file: {leftovers:?}");
}

#[test]
fn concurrent_submissions_run_one_at_a_time_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let ids: Vec<String> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let server = &server;
                scope.spawn(move || server.submit(&tiny_job(&format!("job {i}"))))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for id in &ids {
        server.wait_until_over(id);
    }
    // Newest first: reversed, the submission (queue) order.
    let mut jobs = server.get("/v1/videos").json()["data"]
        .as_array()
        .unwrap()
        .clone();
    jobs.reverse();
    assert_eq!(jobs.len(), 4);
    for pair in jobs.windows(2) {
        let (earlier, later) = (&pair[0], &pair[1]);
        assert_eq!(earlier["status"], "succeeded");
        assert!(
            earlier["finished_at"].as_i64() <= later["started_at"].as_i64(),
            "{} ran before {} finished",
            later["id"],
            earlier["id"]
        );
    }
}

#[test]
fn the_token_guards_every_route_but_the_page() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &["--token", "s3cret"]);
    let page = server.get("/");
    assert_eq!(page.status, 200);
    assert!(page.text().contains("<html"), "the page");

    let id = "vid_00000000000000000000000000000000";
    let routes = [
        ("GET", "/v1/models".to_owned()),
        ("GET", "/v1/videos".to_owned()),
        ("POST", "/v1/videos".to_owned()),
        ("GET", format!("/v1/videos/{id}")),
        ("DELETE", format!("/v1/videos/{id}")),
        ("GET", format!("/v1/videos/{id}/events")),
        ("GET", format!("/v1/videos/{id}/content")),
    ];
    for (method, path) in &routes {
        for auth in [None, Some("Bearer wrong"), Some("s3cret")] {
            let headers: Vec<_> = auth.map(|a| ("Authorization", a)).into_iter().collect();
            let response = request(&server.addr, method, path, &headers, None);
            assert_eq!(response.status, 401, "{method} {path} with {auth:?}");
            assert_eq!(response.json()["error"]["code"], "unauthorized");
        }
    }
    let bearer = [
        ("Authorization", "Bearer s3cret"),
        ("Content-Type", "application/json"),
    ];
    assert_eq!(
        request(&server.addr, "GET", "/v1/models", &bearer, None).status,
        200
    );
    let body = tiny_job("with a token").to_string();
    let submitted = request(
        &server.addr,
        "POST",
        "/v1/videos",
        &bearer,
        Some(body.as_bytes()),
    );
    assert_eq!(submitted.status, 202, "{}", submitted.text());
    let id = submitted.json()["id"].as_str().unwrap().to_owned();
    let events = common::read_events(
        &server.addr,
        &format!("/v1/videos/{id}/events"),
        &bearer,
        |e| e["status"] == "succeeded",
    );
    assert_eq!(events.last().unwrap()["status"], "succeeded");
}

/// Finished jobs survive restarts; a job stopped by SIGTERM is queued again, and one cut
/// short by a crash is run again after the restart, to success.
#[test]
fn restarts_keep_finished_jobs_and_rerun_interrupted_ones() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path(), &[]);
    let finished = server.submit(&tiny_job("finished before the restart"));
    server.wait_until_over(&finished);
    let interrupted = server.submit(&medium_job());
    server.wait_until_denoising(&interrupted);
    let status = server.terminate();
    assert!(status.success(), "a graceful stop: {status}");

    let server = ServerProcess::start(dir.path(), &[]);
    assert_eq!(server.job(&finished)["status"], "succeeded");
    let content = server.get(&format!("/v1/videos/{finished}/content"));
    assert_eq!(content.status, 200);
    // Queued again by the shutdown, now running again: crash in the middle of it.
    server.wait_until_denoising(&interrupted);
    server.crash();

    let server = ServerProcess::start(dir.path(), &[]);
    let events = server.wait_until_over(&interrupted);
    assert_eq!(events.last().unwrap()["status"], "succeeded", "{events:?}");
    let video = Video::read_mp4(server.video_path(&interrupted)).unwrap();
    assert_eq!(video.len(), 5);
    assert_eq!(
        server.get("/v1/videos").json()["data"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
}
