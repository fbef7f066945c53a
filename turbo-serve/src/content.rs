//! Serving a finished video, whole or by byte range (`Range: bytes=…`, one range), so that
//! players can seek.

use std::io::SeekFrom;
use std::path::Path;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tokio_util::io::ReaderStream;

use crate::error::ApiError;

/// An inclusive byte range of a file of known size.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    pub first: u64,
    pub last: u64,
}

impl ByteRange {
    /// Bytes in the range (never 0: both ends are included).
    pub fn length(self) -> u64 {
        self.last - self.first + 1
    }
}

/// The range a `Range` header asks of a file of `size` bytes: `Ok(None)` for the whole file
/// (no header, or a form this server does not serve by range: several ranges, another unit),
/// an error when the range lies outside the file.
pub fn requested_range(header: Option<&str>, size: u64) -> Result<Option<ByteRange>, ApiError> {
    let Some(spec) = header.and_then(|h| h.trim().strip_prefix("bytes=")) else {
        return Ok(None);
    };
    if spec.contains(',') {
        return Ok(None);
    }
    let Some((start, end)) = spec.split_once('-') else {
        return Ok(None);
    };
    let (start, end) = (start.trim(), end.trim());
    let parse = |text: &str| text.parse::<u64>().ok();
    let range = match (parse(start), parse(end)) {
        // `bytes=-N`: the last N bytes.
        (None, Some(suffix)) if start.is_empty() && suffix > 0 && size > 0 => ByteRange {
            first: size.saturating_sub(suffix),
            last: size - 1,
        },
        (Some(first), None) if end.is_empty() && first < size => ByteRange {
            first,
            last: size - 1,
        },
        (Some(first), Some(last)) if first <= last && first < size => ByteRange {
            first,
            last: last.min(size - 1),
        },
        (None, None) => return Ok(None),
        _ => return Err(ApiError::RangeNotSatisfiable { size }),
    };
    Ok(Some(range))
}

/// The MP4 at `path` (named `download_name` for the browser), honouring `Range`.
pub async fn serve_video(
    path: &Path,
    download_name: &str,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let missing = |e: std::io::Error| ApiError::Internal(format!("the video file: {e}"));
    let mut file = tokio::fs::File::open(path).await.map_err(missing)?;
    let size = file.metadata().await.map_err(missing)?.len();
    let range_header = headers.get(header::RANGE).and_then(|v| v.to_str().ok());
    let range = requested_range(range_header, size)?;
    let (status, length) = match range {
        Some(range) => {
            file.seek(SeekFrom::Start(range.first))
                .await
                .map_err(missing)?;
            (StatusCode::PARTIAL_CONTENT, range.length())
        }
        None => (StatusCode::OK, size),
    };
    let body = Body::from_stream(ReaderStream::new(file.take(length)));
    let mut response = (status, body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("video/mp4"));
    headers.insert(header::ACCEPT_RANGES, HeaderValue::from_static("bytes"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from(length));
    if let Some(range) = range {
        let value = format!("bytes {}-{}/{size}", range.first, range.last);
        headers.insert(header::CONTENT_RANGE, header_value(&value)?);
    }
    let disposition = format!("inline; filename=\"{download_name}\"");
    headers.insert(header::CONTENT_DISPOSITION, header_value(&disposition)?);
    Ok(response)
}

fn header_value(text: &str) -> Result<HeaderValue, ApiError> {
    HeaderValue::from_str(text).map_err(|e| ApiError::Internal(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn range(header: &str, size: u64) -> Option<(u64, u64)> {
        requested_range(Some(header), size)
            .unwrap()
            .map(|r| (r.first, r.last))
    }

    #[test]
    fn ranges_are_read_as_rfc_9110_says() {
        assert_eq!(range("bytes=0-9", 100), Some((0, 9)));
        assert_eq!(range("bytes=90-", 100), Some((90, 99)));
        assert_eq!(range("bytes=-10", 100), Some((90, 99)));
        assert_eq!(range("bytes=-500", 100), Some((0, 99)));
        assert_eq!(range("bytes=50-500", 100), Some((50, 99)));
        assert_eq!(range("bytes=0-1,5-6", 100), None);
        assert_eq!(range("items=0-1", 100), None);
        assert_eq!(requested_range(None, 100).unwrap(), None);
        for unsatisfiable in ["bytes=100-", "bytes=100-200", "bytes=9-3", "bytes=-0"] {
            assert!(
                requested_range(Some(unsatisfiable), 100).is_err(),
                "{unsatisfiable}"
            );
        }
    }
}
