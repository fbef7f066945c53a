//! Atomic output files: everything is written to a temporary file next to the target and renamed
//! over it only once complete, so an error (or a dropped writer) never leaves a partial file.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;
use turbo_core::{Error, Result};

/// A file being written to a temporary path in the target's directory.
///
/// [`commit`](Self::commit) syncs it and renames it to the target; dropping it without a commit
/// deletes the temporary file.
#[derive(Debug)]
pub(crate) struct AtomicFile {
    temp: NamedTempFile,
    target: PathBuf,
}

impl AtomicFile {
    /// Starts writing `target`: creates a hidden temporary file beside it.
    pub(crate) fn create(target: &Path) -> Result<Self> {
        let io_error = |source| Error::Io {
            path: target.to_owned(),
            source,
        };
        let file_name = target.file_name().ok_or_else(|| {
            io_error(io::Error::new(
                io::ErrorKind::InvalidInput,
                "the output path does not name a file",
            ))
        })?;
        let directory = match target.parent() {
            Some(parent) if !parent.as_os_str().is_empty() => parent,
            _ => Path::new("."),
        };
        let mut prefix = std::ffi::OsString::from(".");
        prefix.push(file_name);
        prefix.push(".");
        let temp = tempfile::Builder::new()
            .prefix(&prefix)
            .suffix(".part")
            .tempfile_in(directory)
            .map_err(io_error)?;
        Ok(Self {
            temp,
            target: target.to_owned(),
        })
    }

    /// Flushes the data to disk and moves the file to its target path.
    pub(crate) fn commit(self) -> Result<()> {
        let target = self.target;
        let io_error = |source| Error::Io {
            path: target.clone(),
            source,
        };
        self.temp.as_file().sync_all().map_err(io_error)?;
        self.temp
            .persist(&target)
            .map_err(|failure| io_error(failure.error))?;
        tracing::debug!(path = %target.display(), "wrote output file");
        Ok(())
    }
}

impl Write for AtomicFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.temp.as_file_mut().write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.temp.as_file_mut().flush()
    }
}

impl Seek for AtomicFile {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        self.temp.as_file_mut().seek(pos)
    }
}

/// Writes `target` atomically with `write`, through a buffer; on any error no file is left.
pub(crate) fn write_atomically(
    target: &Path,
    write: impl FnOnce(&mut BufWriter<&mut File>) -> Result<()>,
) -> Result<()> {
    let mut file = AtomicFile::create(target)?;
    {
        let mut buffered = BufWriter::new(file.temp.as_file_mut());
        write(&mut buffered)?;
        buffered.flush().map_err(|source| Error::Io {
            path: target.to_owned(),
            source,
        })?;
    }
    file.commit()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entries(dir: &Path) -> Vec<PathBuf> {
        let mut names: Vec<PathBuf> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn commit_renames_and_drop_cleans_up() -> Result<()> {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");

        let mut dropped = AtomicFile::create(&target)?;
        dropped.write_all(b"partial").unwrap();
        assert_eq!(entries(dir.path()).len(), 1, "the temporary file exists");
        drop(dropped);
        assert!(entries(dir.path()).is_empty());

        write_atomically(&target, |w| {
            w.write_all(b"whole").map_err(|e| Error::Io {
                path: target.clone(),
                source: e,
            })
        })?;
        assert_eq!(entries(dir.path()), std::slice::from_ref(&target));
        assert_eq!(std::fs::read(&target).unwrap(), b"whole");
        Ok(())
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("out.bin");
        std::fs::write(&target, b"old").unwrap();
        let result = write_atomically(&target, |w| {
            w.write_all(b"new but broken").unwrap();
            Err(Error::Media {
                what: "test".into(),
                reason: "interrupted".into(),
            })
        });
        assert!(result.is_err());
        assert_eq!(entries(dir.path()), std::slice::from_ref(&target));
        assert_eq!(std::fs::read(&target).unwrap(), b"old");
    }
}
