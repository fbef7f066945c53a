//! Atomic output files: everything is written to a temporary file next to the target and renamed
//! over it only once complete, so an error (or a dropped writer) never leaves a partial file.

use std::fs::File;
use std::io::{self, BufWriter, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use tempfile::NamedTempFile;
use turbo_core::{Error, Result};

/// What writing a file does to a file already at its path.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Existing {
    /// Replace it (what `std::fs::write` does). A symbolic link is written through: the file
    /// it points to is replaced and the link stays.
    #[default]
    Replace,
    /// Fail with [`Error::OutputExists`], also when the file appears while the video is
    /// being written (the final rename does not replace).
    Refuse,
    /// Keep it and write the first free name of `name_2.ext`, `name_3.ext`, …, chosen when the
    /// finished file is renamed into place (so two runs given the same name both keep theirs).
    NextFree,
}

/// Numbered names tried by [`Existing::NextFree`] before giving up.
const NEXT_FREE_TRIES: usize = 10_000;

/// A file being written to a temporary path in the target's directory.
///
/// [`commit`](Self::commit) syncs it and renames it to the target; dropping it without a commit
/// deletes the temporary file. The file's mode is `0666` less the process's umask (`0644`
/// under the usual umask), as any other program's output, not the `0600` of a temporary file.
#[derive(Debug)]
pub(crate) struct AtomicFile {
    temp: NamedTempFile,
    target: PathBuf,
    existing: Existing,
}

impl AtomicFile {
    /// Starts writing `target` (through it, if it is a symbolic link), with `existing` saying
    /// what becomes of a file already there.
    pub(crate) fn create_with(target: &Path, existing: Existing) -> Result<Self> {
        let target = &resolve_link(target)?;
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
        let mut builder = tempfile::Builder::new();
        builder.prefix(&prefix).suffix(".part");
        #[cfg(unix)]
        builder.permissions(umask_mode());
        let temp = builder.tempfile_in(directory).map_err(io_error)?;
        Ok(Self {
            temp,
            target: target.to_owned(),
            existing,
        })
    }

    /// Flushes the data to disk and moves the file to its target path (for
    /// [`Existing::NextFree`], the first free name); returns the path it now has.
    pub(crate) fn commit(self) -> Result<PathBuf> {
        let target = self.target;
        let io_error = |path: &Path, source| Error::Io {
            path: path.to_owned(),
            source,
        };
        self.temp
            .as_file()
            .sync_all()
            .map_err(|e| io_error(&target, e))?;
        let mut temp = self.temp;
        for name in candidate_names(&target, self.existing) {
            let persisted = match self.existing {
                Existing::Replace => temp.persist(&name),
                Existing::Refuse | Existing::NextFree => temp.persist_noclobber(&name),
            };
            match persisted {
                Ok(_) => {
                    tracing::debug!(path = %name.display(), "wrote output file");
                    return Ok(name);
                }
                Err(failure) if failure.error.kind() == io::ErrorKind::AlreadyExists => {
                    temp = failure.file;
                }
                Err(failure) => return Err(io_error(&name, failure.error)),
            }
        }
        Err(Error::OutputExists { path: target })
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

/// The names a file for `target` may take under `existing`: the target, then for
/// [`Existing::NextFree`] `stem_2.ext`, `stem_3.ext`, ….
fn candidate_names(target: &Path, existing: Existing) -> impl Iterator<Item = PathBuf> + '_ {
    let tries = match existing {
        Existing::NextFree => NEXT_FREE_TRIES,
        Existing::Replace | Existing::Refuse => 1,
    };
    (1..=tries).map(move |n| match n {
        1 => target.to_owned(),
        n => numbered(target, n),
    })
}

/// `dir/stem_n.ext` for `dir/stem.ext`.
fn numbered(path: &Path, n: usize) -> PathBuf {
    let mut name = path.file_stem().unwrap_or_default().to_owned();
    name.push(format!("_{n}"));
    if let Some(extension) = path.extension() {
        name.push(".");
        name.push(extension);
    }
    path.with_file_name(name)
}

/// The permissions a new file is created with: `0666`, which the kernel lowers by the umask.
#[cfg(unix)]
fn umask_mode() -> std::fs::Permissions {
    use std::os::unix::fs::PermissionsExt;
    std::fs::Permissions::from_mode(0o666)
}

/// Links followed at most when resolving an output path (Linux's own limit is 40).
const MAX_LINKS: usize = 40;

/// `path`, or for a symbolic link the file it finally points to (relative links resolve
/// against the link's folder), so that writing replaces that file and keeps the link.
pub(crate) fn resolve_link(path: &Path) -> Result<PathBuf> {
    let mut resolved = path.to_owned();
    for _ in 0..MAX_LINKS {
        let is_link =
            std::fs::symlink_metadata(&resolved).is_ok_and(|m| m.file_type().is_symlink());
        if !is_link {
            return Ok(resolved);
        }
        let destination = std::fs::read_link(&resolved).map_err(|source| Error::Io {
            path: resolved.clone(),
            source,
        })?;
        resolved = match resolved.parent() {
            Some(parent) if destination.is_relative() => parent.join(destination),
            _ => destination,
        };
    }
    Err(Error::Io {
        path: path.to_owned(),
        source: io::Error::other(format!("more than {MAX_LINKS} symbolic links in a chain")),
    })
}

/// Writes `target` atomically with `write`, through a buffer; on any error no file is left.
pub(crate) fn write_atomically(
    target: &Path,
    write: impl FnOnce(&mut BufWriter<&mut File>) -> Result<()>,
) -> Result<()> {
    write_atomically_with(target, Existing::Replace, write).map(drop)
}

/// [`write_atomically`], with `existing` saying what becomes of a file already at `target`.
pub(crate) fn write_atomically_with(
    target: &Path,
    existing: Existing,
    write: impl FnOnce(&mut BufWriter<&mut File>) -> Result<()>,
) -> Result<PathBuf> {
    let mut file = AtomicFile::create_with(target, existing)?;
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

        let mut dropped = AtomicFile::create_with(&target, Existing::Replace)?;
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
