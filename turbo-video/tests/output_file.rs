//! The output path of a run is checked before any work, existing files are kept unless
//! replacing was asked for, links are written through, and the file's mode follows the umask.

use std::path::{Path, PathBuf};

use turbo_core::Error;
use turbo_video::{Existing, Fps, Mp4Options, OutputFile, OutputFormat, Video};

fn tiny_video(fps: f64) -> Video {
    let frame = vec![128u8; 16 * 16 * 3];
    Video::new(16, 16, Fps::new(fps).unwrap(), vec![frame; 2]).unwrap()
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

fn io_message(result: turbo_core::Result<OutputFile>) -> String {
    match result {
        Err(error @ Error::Io { .. }) => error.to_string(),
        other => panic!("expected an I/O error, got {other:?}"),
    }
}

#[test]
fn bad_output_paths_fail_before_any_work() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("no/such/folder/out.mp4");
    assert!(io_message(OutputFile::new(&missing, Existing::Refuse)).contains("does not exist"));
    let folder = dir.path().join("videos.mp4");
    std::fs::create_dir(&folder).unwrap();
    assert!(io_message(OutputFile::new(&folder, Existing::Replace)).contains("is a folder"));
    match OutputFile::new(dir.path().join("clip.avi"), Existing::Refuse) {
        Err(Error::Media { reason, .. }) => assert!(reason.contains(".mp4 or .gif")),
        other => panic!("{other:?}"),
    }
    let mp4 = OutputFile::new(dir.path().join("out.MP4"), Existing::Refuse).unwrap();
    assert_eq!(mp4.format(), OutputFormat::Mp4);
    assert!(matches!(
        mp4.check_fps(Fps::new(1e-5).unwrap()),
        Err(Error::Media { .. })
    ));
    mp4.check_fps(Fps::new(16.0).unwrap()).unwrap();
    // Nothing was left behind by the checks (the probe file is gone).
    assert_eq!(entries(dir.path()), ["videos.mp4"]);
}

#[cfg(unix)]
#[test]
fn a_folder_without_write_permission_is_refused_up_front() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let locked = dir.path().join("locked");
    std::fs::create_dir(&locked).unwrap();
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o555)).unwrap();
    // Root may write anywhere; the check is then that a writable folder passes.
    let writable = std::fs::File::create(locked.join("probe")).is_ok();
    let result = OutputFile::new(locked.join("out.mp4"), Existing::Refuse);
    assert_eq!(result.is_ok(), writable, "{result:?}");
    let _ = std::fs::remove_file(locked.join("probe"));
    std::fs::set_permissions(&locked, std::fs::Permissions::from_mode(0o755)).unwrap();
}

#[test]
fn existing_files_are_kept_unless_replacing_is_asked_for() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.mp4");
    std::fs::write(&path, b"earlier video").unwrap();
    match OutputFile::new(&path, Existing::Refuse) {
        Err(Error::OutputExists { path: reported }) => assert_eq!(reported, path),
        other => panic!("{other:?}"),
    }
    OutputFile::new(&path, Existing::Replace)
        .unwrap()
        .write(&tiny_video(16.0), Mp4Options::default())
        .unwrap();
    assert_eq!(Video::read_mp4(&path).unwrap().len(), 2);
    assert_eq!(entries(dir.path()), ["out.mp4"]);
}

/// A file that appears between the check and the write is not replaced, and the finished
/// video's temporary file is removed.
#[test]
fn a_file_that_appears_during_the_run_is_not_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("out.gif");
    let output = OutputFile::new(&path, Existing::Refuse).unwrap();
    std::fs::write(&path, b"another run's video").unwrap();
    match output.write(&tiny_video(16.0), Mp4Options::default()) {
        Err(Error::OutputExists { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(std::fs::read(&path).unwrap(), b"another run's video");
    assert_eq!(entries(dir.path()), ["out.gif"]);
}

#[test]
fn gif_outputs_are_gifs() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("preview.gif");
    OutputFile::new(&path, Existing::Refuse)
        .unwrap()
        .write(&tiny_video(16.0), Mp4Options::default())
        .unwrap();
    assert_eq!(&std::fs::read(&path).unwrap()[..6], b"GIF89a");
}

#[cfg(unix)]
#[test]
fn read_only_files_are_never_replaced() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("keep.mp4");
    std::fs::write(&path, b"precious").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o444)).unwrap();
    assert!(io_message(OutputFile::new(&path, Existing::Replace)).contains("read-only"));
    assert!(matches!(
        OutputFile::new(&path, Existing::Refuse),
        Err(Error::OutputExists { .. })
    ));
}

#[cfg(unix)]
#[test]
fn a_link_is_written_through_and_kept() {
    let dir = tempfile::tempdir().unwrap();
    let real = dir.path().join("real.mp4");
    std::fs::write(&real, b"old").unwrap();
    let link = dir.path().join("link.mp4");
    std::os::unix::fs::symlink("real.mp4", &link).unwrap();
    assert!(matches!(
        OutputFile::new(&link, Existing::Refuse),
        Err(Error::OutputExists { .. })
    ));
    OutputFile::new(&link, Existing::Replace)
        .unwrap()
        .write(&tiny_video(16.0), Mp4Options::default())
        .unwrap();
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert_eq!(Video::read_mp4(&real).unwrap().len(), 2);
    assert_eq!(entries(dir.path()), ["link.mp4", "real.mp4"]);
}

/// The mode is what the umask leaves of 0666: the umask is read back from the system through
/// a file created by `std` (whose mode goes through the same umask), not assumed.
#[cfg(unix)]
#[test]
fn outputs_get_the_mode_the_umask_gives() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let reference: PathBuf = dir.path().join("reference");
    std::fs::write(&reference, b"").unwrap();
    let expected = std::fs::metadata(&reference).unwrap().permissions().mode() & 0o777;
    let path = dir.path().join("out.mp4");
    tiny_video(16.0)
        .write_mp4(&path, Mp4Options::default())
        .unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, expected, "{mode:o} vs {expected:o}");
}

/// Runs given the same name under `Existing::NextFree` each keep their file: the name is taken
/// when the finished file is renamed into place, so a file that appears meanwhile is kept too.
#[test]
fn next_free_names_keep_every_run() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("clip.mp4");
    let first = OutputFile::new(&path, Existing::NextFree).unwrap();
    let second = OutputFile::new(&path, Existing::NextFree).unwrap();
    let video = tiny_video(16.0);
    let mut stream = second
        .stream(16, 16, video.fps(), Mp4Options::default())
        .unwrap();
    for frame in video.frames() {
        stream.push_frame(frame.clone()).unwrap();
    }
    assert_eq!(first.write(&video, Mp4Options::default()).unwrap(), path);
    let numbered = dir.path().join("clip_2.mp4");
    assert_eq!(stream.finish().unwrap(), numbered);
    assert_eq!(entries(dir.path()), ["clip.mp4", "clip_2.mp4"]);
    assert_eq!(Video::read_mp4(&numbered).unwrap().len(), 2);
}

/// A GIF streamed frame by frame is written whole at the end; a frame of the wrong size is
/// refused; a stream dropped unfinished leaves no file.
#[test]
fn a_gif_stream_writes_at_the_end_and_nothing_when_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let output = OutputFile::new(dir.path().join("clip.gif"), Existing::Refuse).unwrap();
    let video = tiny_video(8.0);
    let mut stream = output
        .stream(16, 16, video.fps(), Mp4Options::default())
        .unwrap();
    assert!(stream.push_frame(vec![0; 5]).is_err());
    stream.push_frame(video.frames()[0].clone()).unwrap();
    drop(stream);
    assert!(entries(dir.path()).is_empty());
    let mut stream = output
        .stream(16, 16, video.fps(), Mp4Options::default())
        .unwrap();
    for frame in video.frames() {
        stream.push_frame(frame.clone()).unwrap();
    }
    assert_eq!(stream.finish().unwrap(), output.path());
    assert_eq!(entries(dir.path()), ["clip.gif"]);
}
