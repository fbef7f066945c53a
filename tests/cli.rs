//! The `t2v` example as a user runs it: bad output paths and flags the demo cannot honour fail
//! before any work, an existing file is kept, default names never collide, and Ctrl-C stops
//! the run with status 130 leaving no file behind.
//!
//! The example binary is the one `cargo test` builds beside this test (`target/<profile>/
//! examples/t2v`); a focused run builds it with `cargo test --release --examples --test cli`.

#![cfg(unix)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/examples/t2v`, next to `target/<profile>/deps/cli-…`.
fn t2v() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe.parent().and_then(Path::parent).unwrap();
    let path = profile.join("examples").join("t2v");
    assert!(
        path.exists(),
        "{} is missing: build the examples (`cargo test --release --examples --test cli`)",
        path.display()
    );
    path
}

fn run_in(dir: &Path, args: &[&str]) -> Output {
    Command::new(t2v())
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// A run that would take minutes must fail in well under that: before the text encoder ran.
const BEFORE_ANY_WORK: Duration = Duration::from_secs(20);

#[test]
fn bad_outputs_and_ignored_demo_flags_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("taken.mp4"), b"keep me").unwrap();
    std::fs::create_dir(dir.path().join("folder.mp4")).unwrap();
    // Frames enough that a run which started would take far longer than the bound.
    let long = ["--num-frames", "1001"];
    let cases: [(&[&str], &str); 6] = [
        (&["--output", "taken.mp4"], "already exists"),
        (&["--output", "no/such/dir/out.mp4"], "does not exist"),
        (&["--output", "folder.mp4"], "is a folder"),
        (&["--output", "clip.avi"], ".mp4 or .gif"),
        (&["--fps", "0.00001"], "cannot be stored in MP4"),
        (
            &["--resolution", "720p", "--dtype", "f32"],
            "--resolution, --dtype",
        ),
    ];
    for (args, expected) in cases {
        let started = Instant::now();
        let output = run_in(dir.path(), &[args, &long[..]].concat());
        assert!(!output.status.success(), "{args:?} succeeded");
        assert!(
            stderr(&output).contains(expected),
            "{args:?}: {}",
            stderr(&output)
        );
        assert!(
            started.elapsed() < BEFORE_ANY_WORK,
            "{args:?} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(
        std::fs::read(dir.path().join("taken.mp4")).unwrap(),
        b"keep me"
    );
    assert_eq!(entries(dir.path()), ["folder.mp4", "taken.mp4"]);
}

#[test]
fn two_runs_with_default_names_keep_both_videos() {
    let dir = tempfile::tempdir().unwrap();
    let args = ["--num-frames", "5", "--num-steps", "1"];
    let (first, second) = std::thread::scope(|scope| {
        let a = scope.spawn(|| run_in(dir.path(), &args));
        let b = scope.spawn(|| run_in(dir.path(), &args));
        (a.join().unwrap(), b.join().unwrap())
    });
    assert!(first.status.success(), "{}", stderr(&first));
    assert!(second.status.success(), "{}", stderr(&second));
    let videos = entries(dir.path());
    assert_eq!(videos.len(), 2, "{videos:?}");
    assert!(videos
        .iter()
        .all(|name| name.starts_with("t2v_0_demo_") && name.ends_with(".mp4")));
    // A third run right after takes yet another name, and the explicit --overwrite replaces.
    let third = run_in(dir.path(), &args);
    assert!(third.status.success(), "{}", stderr(&third));
    assert_eq!(entries(dir.path()).len(), 3);
    let replaced = &videos[0];
    let overwrite = run_in(
        dir.path(),
        &[&args[..], &["--output", replaced, "--overwrite"]].concat(),
    );
    assert!(overwrite.status.success(), "{}", stderr(&overwrite));
    assert_eq!(entries(dir.path()).len(), 3);
}

/// The library's warnings reach the user: a prompt longer than the demo DiT's 64 tokens is
/// cut, and stderr says so.
#[test]
fn a_cut_prompt_is_announced() {
    let dir = tempfile::tempdir().unwrap();
    let prompt = "a red fox running through fresh snow at dawn, cinematic lighting ".repeat(3);
    let output = run_in(
        dir.path(),
        &[
            "--prompt",
            &prompt,
            "--num-frames",
            "5",
            "--num-steps",
            "1",
            "--output",
            "fox.gif",
        ],
    );
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("its end is cut"),
        "{}",
        stderr(&output)
    );
    assert_eq!(
        &std::fs::read(dir.path().join("fox.gif")).unwrap()[..3],
        b"GIF"
    );
}

#[test]
fn ctrl_c_cancels_the_run_and_leaves_no_file() {
    let dir = tempfile::tempdir().unwrap();
    // A teacher with many steps: the run is still denoising when the signal comes.
    let args = [
        "--solver",
        "euler",
        "--num-steps",
        "400",
        "--output",
        "cancelled.mp4",
    ];
    let mut child = Command::new(t2v())
        .args(args)
        .current_dir(dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // The demo notice comes after the handler is installed: the signal then reaches it.
    // The reader stays open until the child is gone: a closed pipe would fail its prints.
    let mut stdout = BufReader::new(child.stdout.take().unwrap());
    let mut notice = String::new();
    stdout.read_line(&mut notice).unwrap();
    assert!(notice.contains("demo mode"), "{notice}");
    let killed = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(killed.success());
    let started = Instant::now();
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130), "{}", stderr(&output));
    assert!(
        stderr(&output).contains("cancelled after step"),
        "{}",
        stderr(&output)
    );
    assert!(started.elapsed() < BEFORE_ANY_WORK);
    assert!(entries(dir.path()).is_empty(), "{:?}", entries(dir.path()));
    drop(stdout);
}
