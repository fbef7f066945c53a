//! A video job as the API shows it: its id, status, progress and timings.

use std::fmt;
use std::str::FromStr;

use rand::RngCore;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;

/// A job id the server generated: `vid_` and 32 hexadecimal digits (128 random bits). Content
/// is found by id, so only strings of exactly this form are ever turned into a file name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct JobId(String);

const ID_PREFIX: &str = "vid_";
const ID_HEX_DIGITS: usize = 32;

impl JobId {
    /// A fresh random id.
    pub fn generate() -> Self {
        let mut bytes = [0u8; ID_HEX_DIGITS / 2];
        rand::rng().fill_bytes(&mut bytes);
        let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
        Self(format!("{ID_PREFIX}{hex}"))
    }

    /// An id read back from the job store, which holds only generated ones.
    pub(crate) fn from_store(id: String) -> Self {
        Self(id)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The MP4 file name of the job's video.
    pub fn video_file_name(&self) -> String {
        format!("{}.mp4", self.0)
    }
}

impl FromStr for JobId {
    type Err = ApiError;

    /// Accepts only the form [`JobId::generate`] makes; anything else is an unknown job.
    fn from_str(s: &str) -> Result<Self, ApiError> {
        let well_formed = s.strip_prefix(ID_PREFIX).is_some_and(|hex| {
            hex.len() == ID_HEX_DIGITS
                && hex
                    .bytes()
                    .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        });
        if well_formed {
            Ok(Self(s.to_owned()))
        } else {
            Err(ApiError::JobNotFound { id: s.to_owned() })
        }
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Canceled,
}

impl JobStatus {
    pub const ALL: [Self; 5] = [
        Self::Queued,
        Self::Running,
        Self::Succeeded,
        Self::Failed,
        Self::Canceled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Canceled => "canceled",
        }
    }

    /// Whether the job is over (nothing about it changes any more).
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Canceled)
    }
}

impl FromStr for JobStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown job status `{s}`"))
    }
}

/// How far a job has come: the stage it is in, the denoising step, and an overall fraction.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobProgress {
    /// `queued`, `loading_model`, `encoding_text`, `encoding_image`, `denoising`, `decoding`,
    /// `writing` or `done`.
    pub stage: String,
    /// Denoising steps finished.
    pub step: usize,
    /// Denoising steps of the run (0 until known).
    pub steps: usize,
    /// Overall progress in [0, 1].
    pub fraction: f64,
}

impl JobProgress {
    pub fn queued() -> Self {
        Self::at("queued", 0.0)
    }

    /// `stage`, with the step counts still unknown.
    pub fn at(stage: &str, fraction: f64) -> Self {
        Self {
            stage: stage.to_owned(),
            step: 0,
            steps: 0,
            fraction,
        }
    }
}

/// How long each part of a job took, in milliseconds (absent: not reached).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Timings {
    /// From submission to the start of the run.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queued_ms: Option<u64>,
    /// Building the model's pipeline (0 when it was resident).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encode_text_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub encode_image_ms: Option<u64>,
    /// Denoising, loading the DiT included.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub denoise_ms: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decode_ms: Option<u64>,
    /// Encoding and writing the MP4.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_ms: Option<u64>,
    /// From the start of the run to its end.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub run_ms: Option<u64>,
}

/// A job as `GET /v1/videos/{id}` and the events show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobView {
    pub id: String,
    pub status: JobStatus,
    pub progress: JobProgress,
    /// The request as submitted (an uploaded image is replaced by its byte count).
    pub request: serde_json::Value,
    pub timings: Timings,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Unix time in milliseconds.
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<i64>,
    /// Where the video is, once the job succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub content_url: Option<String>,
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_ids_parse_and_nothing_else_does() {
        let id = JobId::generate();
        assert_eq!(id.as_str().parse::<JobId>().unwrap(), id);
        assert_ne!(JobId::generate(), id);
        for bad in [
            "",
            "vid_",
            "../etc/passwd",
            "vid_0123456789abcdef0123456789abcde",
            "vid_0123456789abcdef0123456789abcdeF",
            "vid_0123456789abcdef0123456789abcd/f",
            "xyz_0123456789abcdef0123456789abcdef",
        ] {
            assert!(bad.parse::<JobId>().is_err(), "{bad}");
        }
    }

    #[test]
    fn statuses_round_trip_through_their_names() {
        for status in JobStatus::ALL {
            assert_eq!(status.as_str().parse::<JobStatus>().unwrap(), status);
        }
        assert!("done".parse::<JobStatus>().is_err());
    }
}
