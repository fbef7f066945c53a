//! The errors a request can meet, each with its HTTP status and a JSON body that names what is
//! at fault: `{"error": {"code": "invalid_field", "field": "num_frames", "message": "…"}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

/// Why a request was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A field of the request is missing, malformed or out of range.
    #[error("{field}: {reason}")]
    InvalidField { field: String, reason: String },
    /// The request body is larger than the server takes.
    #[error("the request body is larger than {limit} bytes")]
    BodyTooLarge { limit: usize },
    /// No job has this id (or the id is not one the server makes).
    #[error("no video job with id `{id}`")]
    JobNotFound { id: String },
    /// The route does not exist.
    #[error("no such route")]
    RouteNotFound,
    /// The job queue holds as many jobs as it may.
    #[error("the queue is full ({capacity} jobs waiting); try again later")]
    QueueFull { capacity: usize },
    /// The bearer token is missing or wrong.
    #[error("this server needs `Authorization: Bearer <token>`; the token is missing or wrong")]
    Unauthorized,
    /// A page of another origin sent a request that changes something.
    #[error("requests from pages of another origin ({origin}) are refused")]
    CrossOrigin { origin: String },
    /// The job is not in a state that allows the request (no video yet, already finished).
    #[error("{0}")]
    Conflict(String),
    /// The `Range` header asks for bytes outside the video.
    #[error("the range is outside the video's {size} bytes")]
    RangeNotSatisfiable { size: u64 },
    /// The server is stopping and takes no new job.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Something failed on the server's side (the job store, the file system).
    #[error("internal error: {0}")]
    Internal(String),
}

impl ApiError {
    /// A bad value of `field`.
    pub fn field(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidField {
            field: field.into(),
            reason: reason.into(),
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::InvalidField { .. } => StatusCode::BAD_REQUEST,
            Self::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::JobNotFound { .. } | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::QueueFull { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::CrossOrigin { .. } => StatusCode::FORBIDDEN,
            Self::Conflict(_) => StatusCode::CONFLICT,
            Self::RangeNotSatisfiable { .. } => StatusCode::RANGE_NOT_SATISFIABLE,
            Self::ShuttingDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// A stable machine-readable name of the error.
    pub fn code(&self) -> &'static str {
        match self {
            Self::InvalidField { .. } => "invalid_field",
            Self::BodyTooLarge { .. } => "body_too_large",
            Self::JobNotFound { .. } => "job_not_found",
            Self::RouteNotFound => "route_not_found",
            Self::QueueFull { .. } => "queue_full",
            Self::Unauthorized => "unauthorized",
            Self::CrossOrigin { .. } => "cross_origin",
            Self::Conflict(_) => "conflict",
            Self::RangeNotSatisfiable { .. } => "range_not_satisfiable",
            Self::ShuttingDown => "shutting_down",
            Self::Internal(_) => "internal",
        }
    }

    /// The request field at fault, where there is one.
    fn field_name(&self) -> Option<&str> {
        match self {
            Self::InvalidField { field, .. } => Some(field),
            Self::BodyTooLarge { .. } => Some("body"),
            Self::QueueFull { .. } => Some("queue"),
            _ => None,
        }
    }
}

impl From<rusqlite::Error> for ApiError {
    fn from(error: rusqlite::Error) -> Self {
        Self::Internal(format!("job store: {error}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if let Self::Internal(message) = &self {
            tracing::error!("{message}");
        }
        let body = json!({
            "error": {
                "code": self.code(),
                "field": self.field_name(),
                "message": self.to_string(),
            }
        });
        let mut response = (self.status(), Json(body)).into_response();
        if let Self::RangeNotSatisfiable { size } = self {
            if let Ok(value) = format!("bytes */{size}").parse() {
                response
                    .headers_mut()
                    .insert(axum::http::header::CONTENT_RANGE, value);
            }
        }
        if matches!(self, Self::Unauthorized) {
            response.headers_mut().insert(
                axum::http::header::WWW_AUTHENTICATE,
                axum::http::HeaderValue::from_static("Bearer"),
            );
        }
        response
    }
}
