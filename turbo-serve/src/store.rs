//! The job store: one SQLite database (`jobs.sqlite3` under the data folder, WAL journal) that
//! records every job, its request, progress, timings and outcome, so that a restart loses no
//! finished job and finds the ones still to run.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Row};

use crate::images::InputImages;
use crate::job::{now_ms, JobId, JobProgress, JobStatus, JobView, Timings};

/// Times a job may be interrupted by the server stopping before it is failed instead of being
/// run again: a job that brings the server down every time must not do so forever.
pub const MAX_INTERRUPTIONS: i64 = 2;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    status TEXT NOT NULL,
    request TEXT NOT NULL,
    image BLOB,
    end_image BLOB,
    progress TEXT NOT NULL,
    timings TEXT NOT NULL,
    error TEXT,
    interruptions INTEGER NOT NULL DEFAULT 0,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER
);
";

/// Adds `end_image` to a database written before FLF2V was offered.
fn add_end_image_column(connection: &Connection) -> StoreResult<()> {
    let present: bool = connection.query_row(
        "SELECT COUNT(*) > 0 FROM pragma_table_info('jobs') WHERE name = 'end_image'",
        [],
        |row| row.get(0),
    )?;
    if !present {
        connection.execute_batch("ALTER TABLE jobs ADD COLUMN end_image BLOB")?;
    }
    Ok(())
}

/// The jobs database. SQLite calls are short (one row), so the async handlers make them
/// directly under the lock rather than on a blocking thread.
pub struct JobStore {
    connection: Mutex<Connection>,
}

/// A job to be recorded as queued.
pub struct NewJob<'a> {
    pub id: &'a JobId,
    /// The request as the API shows it (no image bytes).
    pub request: &'a serde_json::Value,
    /// The uploaded images, decoded again when the job runs.
    pub images: &'a InputImages,
}

/// What [`JobStore::recover`] did with the jobs a previous run left unfinished.
#[derive(Debug, Default, PartialEq)]
pub struct Recovery {
    /// Jobs to run, oldest first (those that were running first in line, as they were).
    pub queued: Vec<JobId>,
    /// Jobs interrupted too often, now failed.
    pub failed: Vec<JobId>,
}

type StoreResult<T> = Result<T, rusqlite::Error>;

impl JobStore {
    /// Opens (creating if needed) `jobs.sqlite3` in `data_dir`.
    pub fn open(data_dir: &Path) -> StoreResult<Self> {
        let connection = Connection::open(data_dir.join("jobs.sqlite3"))?;
        // WAL: readers do not block the writer; FULL: a finished job survives a power cut.
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "synchronous", "FULL")?;
        connection.busy_timeout(std::time::Duration::from_secs(5))?;
        connection.execute_batch(SCHEMA)?;
        add_end_image_column(&connection)?;
        Ok(Self {
            connection: Mutex::new(connection),
        })
    }

    fn with<T>(&self, f: impl FnOnce(&Connection) -> StoreResult<T>) -> StoreResult<T> {
        // A panic while holding the lock cannot leave SQLite half-written (each statement is
        // atomic), so a poisoned lock is still usable.
        let connection = self
            .connection
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        f(&connection)
    }

    pub fn insert(&self, job: &NewJob<'_>) -> StoreResult<()> {
        let progress = to_json(&JobProgress::queued());
        let timings = to_json(&Timings::default());
        self.with(|c| {
            c.execute(
                "INSERT INTO jobs
                     (id, status, request, image, end_image, progress, timings, created_at)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
                params![
                    job.id.as_str(),
                    JobStatus::Queued.as_str(),
                    job.request.to_string(),
                    job.images.image,
                    job.images.end_image,
                    progress,
                    timings,
                    now_ms()
                ],
            )
            .map(drop)
        })
    }

    pub fn get(&self, id: &JobId) -> StoreResult<Option<JobView>> {
        self.with(|c| {
            c.query_row(
                &format!("SELECT {VIEW_COLUMNS} FROM jobs WHERE id = ?1"),
                [id.as_str()],
                job_view,
            )
            .optional()
        })
    }

    /// The newest `limit` jobs, newest first.
    pub fn list(&self, limit: usize) -> StoreResult<Vec<JobView>> {
        self.with(|c| {
            let mut statement = c.prepare(&format!(
                "SELECT {VIEW_COLUMNS} FROM jobs ORDER BY seq DESC LIMIT ?1"
            ))?;
            let rows = statement.query_map([limit as i64], job_view)?;
            rows.collect()
        })
    }

    /// The images uploaded with the job (none for an unknown job).
    pub fn images(&self, id: &JobId) -> StoreResult<InputImages> {
        self.with(|c| {
            c.query_row(
                "SELECT image, end_image FROM jobs WHERE id = ?1",
                [id.as_str()],
                |row| {
                    Ok(InputImages {
                        image: row.get(0)?,
                        end_image: row.get(1)?,
                    })
                },
            )
            .optional()
            .map(Option::unwrap_or_default)
        })
    }

    pub fn mark_running(&self, id: &JobId, timings: &Timings) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET status = ?2, started_at = ?3, timings = ?4 WHERE id = ?1",
                params![
                    id.as_str(),
                    JobStatus::Running.as_str(),
                    now_ms(),
                    to_json(timings)
                ],
            )
            .map(drop)
        })
    }

    pub fn set_progress(&self, id: &JobId, progress: &JobProgress) -> StoreResult<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET progress = ?2 WHERE id = ?1",
                params![id.as_str(), to_json(progress)],
            )
            .map(drop)
        })
    }

    /// Records the end of a job: `status` must be terminal.
    pub fn finish(
        &self,
        id: &JobId,
        status: JobStatus,
        progress: &JobProgress,
        timings: &Timings,
        error: Option<&str>,
    ) -> StoreResult<()> {
        debug_assert!(status.is_terminal());
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET status = ?2, progress = ?3, timings = ?4, error = ?5,
                 finished_at = ?6 WHERE id = ?1",
                params![
                    id.as_str(),
                    status.as_str(),
                    to_json(progress),
                    to_json(timings),
                    error,
                    now_ms()
                ],
            )
            .map(drop)
        })
    }

    /// Puts a job that was running back in the queue, its progress reset (the server is
    /// stopping; the next start runs it again).
    pub fn requeue(&self, id: &JobId) -> StoreResult<()> {
        self.with(|c| requeue_with(c, id.as_str(), false))
    }

    /// After a restart: every job that was running when the server stopped is queued again
    /// (counted as an interruption) or, past [`MAX_INTERRUPTIONS`], failed with the reason;
    /// returns the jobs to run in submission order.
    pub fn recover(&self) -> StoreResult<Recovery> {
        self.with(|c| {
            let running = ids_with_status(c, JobStatus::Running)?;
            let mut recovery = Recovery::default();
            for id in running {
                let interruptions: i64 = c.query_row(
                    "SELECT interruptions FROM jobs WHERE id = ?1",
                    [&id],
                    |row| row.get(0),
                )?;
                if interruptions + 1 >= MAX_INTERRUPTIONS {
                    fail_interrupted(c, &id, interruptions + 1)?;
                    recovery.failed.push(JobId::from_store(id));
                } else {
                    requeue_with(c, &id, true)?;
                }
            }
            recovery.queued = ids_with_status(c, JobStatus::Queued)?
                .into_iter()
                .map(JobId::from_store)
                .collect();
            Ok(recovery)
        })
    }
}

const VIEW_COLUMNS: &str =
    "id, status, request, progress, timings, error, created_at, started_at, finished_at";

/// A row of [`VIEW_COLUMNS`] as the API shows it.
fn job_view(row: &Row<'_>) -> rusqlite::Result<JobView> {
    let id: String = row.get(0)?;
    let status: String = row.get(1)?;
    let status = status.parse::<JobStatus>().map_err(|reason| {
        rusqlite::Error::FromSqlConversionFailure(1, rusqlite::types::Type::Text, reason.into())
    })?;
    let content_url = (status == JobStatus::Succeeded).then(|| format!("/v1/videos/{id}/content"));
    Ok(JobView {
        status,
        request: from_json(row, 2)?,
        progress: from_json(row, 3)?,
        timings: from_json(row, 4)?,
        error: row.get(5)?,
        created_at: row.get(6)?,
        started_at: row.get(7)?,
        finished_at: row.get(8)?,
        content_url,
        id,
    })
}

fn from_json<T: serde::de::DeserializeOwned>(row: &Row<'_>, column: usize) -> rusqlite::Result<T> {
    let text: String = row.get(column)?;
    serde_json::from_str(&text).map_err(|e| {
        rusqlite::Error::FromSqlConversionFailure(column, rusqlite::types::Type::Text, e.into())
    })
}

fn to_json<T: serde::Serialize>(value: &T) -> String {
    // These types hold only strings and numbers: serialising cannot fail.
    serde_json::to_string(value).unwrap_or_else(|_| "null".to_owned())
}

fn ids_with_status(c: &Connection, status: JobStatus) -> StoreResult<Vec<String>> {
    let mut statement = c.prepare("SELECT id FROM jobs WHERE status = ?1 ORDER BY seq")?;
    let rows = statement.query_map([status.as_str()], |row| row.get(0))?;
    rows.collect()
}

fn requeue_with(c: &Connection, id: &str, count_interruption: bool) -> StoreResult<()> {
    c.execute(
        "UPDATE jobs SET status = ?2, progress = ?3, started_at = NULL,
         interruptions = interruptions + ?4 WHERE id = ?1",
        params![
            id,
            JobStatus::Queued.as_str(),
            to_json(&JobProgress::queued()),
            i64::from(count_interruption)
        ],
    )
    .map(drop)
}

fn fail_interrupted(c: &Connection, id: &str, interruptions: i64) -> StoreResult<()> {
    let reason = format!(
        "the server stopped while this job ran, {interruptions} times; it is not run again"
    );
    c.execute(
        "UPDATE jobs SET status = ?2, error = ?3, interruptions = ?4, finished_at = ?5
         WHERE id = ?1",
        params![
            id,
            JobStatus::Failed.as_str(),
            reason,
            interruptions,
            now_ms()
        ],
    )
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn submit(store: &JobStore) -> JobId {
        let id = JobId::generate();
        let request = serde_json::json!({"prompt": "a fox"});
        store
            .insert(&NewJob {
                id: &id,
                request: &request,
                images: &InputImages {
                    image: Some(b"png bytes".to_vec()),
                    end_image: Some(b"last frame".to_vec()),
                },
            })
            .unwrap();
        id
    }

    #[test]
    fn a_database_without_end_images_gains_the_column() {
        let dir = tempfile::tempdir().unwrap();
        let old_schema = SCHEMA.replace("    end_image BLOB,\n", "");
        Connection::open(dir.path().join("jobs.sqlite3"))
            .unwrap()
            .execute_batch(&old_schema)
            .unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        let id = submit(&store);
        assert!(store.images(&id).unwrap().end_image.is_some());
    }

    #[test]
    fn a_job_is_recorded_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = JobStore::open(dir.path()).unwrap();
        let id = submit(&store);
        let view = store.get(&id).unwrap().unwrap();
        assert_eq!(view.status, JobStatus::Queued);
        assert_eq!(view.request["prompt"], "a fox");
        let images = store.images(&id).unwrap();
        assert_eq!(images.image.as_deref(), Some(&b"png bytes"[..]));
        assert_eq!(images.end_image.as_deref(), Some(&b"last frame"[..]));
        let timings = Timings {
            run_ms: Some(5),
            ..Timings::default()
        };
        store
            .finish(
                &id,
                JobStatus::Succeeded,
                &JobProgress::at("done", 1.0),
                &timings,
                None,
            )
            .unwrap();
        let view = store.get(&id).unwrap().unwrap();
        assert_eq!(view.timings, timings);
        assert_eq!(
            view.content_url.as_deref(),
            Some(&*format!("/v1/videos/{id}/content"))
        );
        assert!(store.get(&JobId::generate()).unwrap().is_none());
    }

    /// Reopening the database requeues the running job, keeps the queued ones in order, and
    /// fails a job interrupted too many times.
    #[test]
    fn recovery_requeues_then_fails_an_interrupted_job() {
        let dir = tempfile::tempdir().unwrap();
        let (running, waiting) = {
            let store = JobStore::open(dir.path()).unwrap();
            let running = submit(&store);
            let waiting = submit(&store);
            store.mark_running(&running, &Timings::default()).unwrap();
            (running, waiting)
        };
        let store = JobStore::open(dir.path()).unwrap();
        let recovery = store.recover().unwrap();
        assert_eq!(recovery.queued, vec![running.clone(), waiting.clone()]);
        assert!(recovery.failed.is_empty());

        for _ in 1..MAX_INTERRUPTIONS {
            store.mark_running(&running, &Timings::default()).unwrap();
            let _ = store.recover().unwrap();
        }
        let view = store.get(&running).unwrap().unwrap();
        assert_eq!(view.status, JobStatus::Failed);
        assert!(view.error.unwrap().contains("server stopped"));
        assert_eq!(store.list(10).unwrap().len(), 2);
    }
}
