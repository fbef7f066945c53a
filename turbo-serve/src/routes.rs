//! The HTTP routes: the page at `/` and the JSON API under `/v1`.

use std::convert::Infallible;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::json;
use tokio::sync::{broadcast, watch};

use crate::content::serve_video;
use crate::error::ApiError;
use crate::job::{JobId, JobProgress, JobStatus, JobView};
use crate::models::Models;
use crate::queue::{Cancel, JobQueue, PushError};
use crate::request::RequestLimits;
use crate::store::{JobStore, NewJob};
use crate::upload::read_submission;
use crate::worker::Events;

/// The page: one file, no build step, nothing fetched from elsewhere.
const PAGE: &str = include_str!("page.html");

/// Jobs `GET /v1/videos` lists unless asked for another number, and at most.
const DEFAULT_LIST_LIMIT: usize = 50;
const MAX_LIST_LIMIT: usize = 500;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<JobStore>,
    pub queue: Arc<JobQueue>,
    pub models: Arc<Models>,
    pub events: Events,
    pub outputs: PathBuf,
    pub limits: RequestLimits,
    pub max_body_bytes: usize,
    /// The bearer token every route but `/` needs, if any.
    pub token: Option<Arc<str>>,
    /// Turns true when the server starts shutting down (ends the event streams).
    pub shutdown: watch::Receiver<bool>,
}

/// The whole application.
pub fn router(state: AppState) -> Router {
    let api = Router::new()
        .route("/v1/videos", get(list_videos).post(submit_video))
        .route("/v1/videos/{id}", get(get_video).delete(cancel_video))
        .route("/v1/videos/{id}/events", get(video_events))
        .route("/v1/videos/{id}/content", get(video_content))
        .route("/v1/models", get(list_models))
        .fallback(|| async { ApiError::RouteNotFound })
        .layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(|| async { Html(PAGE) }))
        .merge(api)
        .layer(DefaultBodyLimit::max(state.max_body_bytes))
        .layer(middleware::from_fn(require_same_origin))
        .with_state(state)
}

/// Refuses a request that changes something (any method but GET and HEAD) sent by a page of
/// another origin: browsers name the page's origin in `Origin`, so another site cannot make a
/// visitor's browser submit or cancel jobs here (a form post needs no CORS preflight).
async fn require_same_origin(request: Request, next: Next) -> Result<Response, ApiError> {
    let safe = matches!(*request.method(), Method::GET | Method::HEAD);
    match foreign_origin(request.headers()) {
        Some(origin) if !safe => Err(ApiError::CrossOrigin { origin }),
        _ => Ok(next.run(request).await),
    }
}

/// The `Origin` of the request when it is not the server's own (its `Host`).
fn foreign_origin(headers: &HeaderMap) -> Option<String> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    let origin = text(header::ORIGIN)?;
    let host = text(header::HOST).unwrap_or_default();
    let same = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|authority| authority.eq_ignore_ascii_case(host));
    (!same).then(|| origin.to_owned())
}

/// Refuses a request without the server's bearer token (when it has one).
async fn require_token(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    if let Some(token) = &state.token {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or_default();
        if !same_secret(given.as_bytes(), token.as_bytes()) {
            return Err(ApiError::Unauthorized);
        }
    }
    Ok(next.run(request).await)
}

/// Compares in time independent of where the strings differ.
fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

async fn submit_video(
    State(state): State<AppState>,
    body: Request,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let (request, images) = read_submission(body, &state.limits, state.max_body_bytes).await?;
    let request = request.with_seed();
    // Decoding the images is CPU work: off the threads that serve connections.
    let (models, limits) = (state.models.clone(), state.limits);
    let (request, images) = tokio::task::spawn_blocking(move || {
        request.validate(&models.catalog, &limits, &images)?;
        Ok::<_, ApiError>((request, images))
    })
    .await
    .map_err(|e| ApiError::Internal(e.to_string()))??;
    let id = JobId::generate();
    let stored = serde_json::to_value(&request).map_err(|e| ApiError::Internal(e.to_string()))?;
    let new_job = NewJob {
        id: &id,
        request: &stored,
        images: &images,
    };
    match state
        .queue
        .push(id.clone(), || state.store.insert(&new_job))
    {
        Ok(recorded) => recorded?,
        Err(PushError::Full { capacity }) => return Err(ApiError::QueueFull { capacity }),
        Err(PushError::Closed) => return Err(ApiError::ShuttingDown),
    }
    tracing::info!(job = %id, "queued");
    Ok((StatusCode::ACCEPTED, Json(job_view(&state, &id)?)))
}

fn job_view(state: &AppState, id: &JobId) -> Result<JobView, ApiError> {
    state
        .store
        .get(id)?
        .ok_or_else(|| ApiError::JobNotFound { id: id.to_string() })
}

async fn get_video(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    Ok(Json(job_view(&state, &id.parse()?)?))
}

#[derive(Deserialize)]
struct ListQuery {
    limit: Option<usize>,
}

async fn list_videos(
    State(state): State<AppState>,
    query: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Query(query) = query.map_err(|e| ApiError::field("limit", e.body_text()))?;
    let limit = query
        .limit
        .unwrap_or(DEFAULT_LIST_LIMIT)
        .min(MAX_LIST_LIMIT);
    let jobs = state.store.list(limit)?;
    Ok(Json(json!({ "data": jobs })))
}

/// Cancels a waiting job at once (`200`), or asks the running one to stop at its next step
/// (`202`; the events say when it has).
async fn cancel_video(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<(StatusCode, Json<JobView>), ApiError> {
    let id: JobId = id.parse()?;
    let view = job_view(&state, &id)?;
    let mut recorded = Ok(());
    let outcome = state.queue.cancel(&id, || {
        recorded = state.store.finish(
            &id,
            JobStatus::Canceled,
            &JobProgress::at("canceled", 0.0),
            &view.timings,
            None,
        );
    });
    recorded?;
    match outcome {
        Cancel::Dequeued => {
            let view = job_view(&state, &id)?;
            let _ = state.events.send(view.clone());
            Ok((StatusCode::OK, Json(view)))
        }
        Cancel::Stopping => Ok((StatusCode::ACCEPTED, Json(view))),
        Cancel::NotActive => Err(ApiError::Conflict(format!(
            "job {id} is {}; only a queued or running job can be canceled",
            view.status.as_str()
        ))),
    }
}

async fn video_content(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let id: JobId = id.parse()?;
    let view = job_view(&state, &id)?;
    if view.status != JobStatus::Succeeded {
        return Err(ApiError::Conflict(format!(
            "job {id} is {}: its video exists once it has succeeded",
            view.status.as_str()
        )));
    }
    // The path comes from the generated id, never from the request's text.
    let file_name = id.video_file_name();
    serve_video(&state.outputs.join(&file_name), &file_name, &headers).await
}

async fn list_models(State(state): State<AppState>) -> Json<serde_json::Value> {
    let resident = state.models.resident_models();
    let catalog = &state.models.catalog;
    let models: Vec<_> = catalog
        .entries()
        .iter()
        .map(|entry| {
            let mut value = json!(entry);
            value["resident"] = json!(resident.contains(&entry.id));
            value
        })
        .collect();
    let loras: Vec<_> = catalog.lora_names().collect();
    Json(json!({ "data": models, "loras": loras }))
}

/// Server-sent events: the job as it is now, then every change, until it is over (or the
/// server stops). Each event is named after the job's status and carries the job as JSON.
async fn video_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, ApiError> {
    let id: JobId = id.parse()?;
    // Subscribe before reading the job, so that no change falls between the two.
    let receiver = state.events.subscribe();
    let current = job_view(&state, &id)?;
    let stream = job_events(state, id, current, receiver);
    Ok(Sse::new(stream).keep_alive(KeepAlive::default()))
}

/// Where an event stream is.
enum Feed {
    /// The first event: the job as read.
    First(Box<JobView>, broadcast::Receiver<JobView>),
    Following(broadcast::Receiver<JobView>),
    Over,
}

fn job_events(
    state: AppState,
    id: JobId,
    current: JobView,
    receiver: broadcast::Receiver<JobView>,
) -> impl Stream<Item = Result<Event, Infallible>> {
    stream::unfold(
        (Feed::First(Box::new(current), receiver), state, id),
        |(feed, mut state, id)| async move {
            let (view, receiver) = match feed {
                Feed::Over => return None,
                Feed::First(view, receiver) => (*view, receiver),
                Feed::Following(mut receiver) => {
                    let view = next_change(&mut state, &id, &mut receiver).await?;
                    (view, receiver)
                }
            };
            let next = if view.status.is_terminal() {
                Feed::Over
            } else {
                Feed::Following(receiver)
            };
            Some((Ok(sse_event(&view)), (next, state, id)))
        },
    )
}

/// The next change of job `id`; `None` when the server is stopping.
async fn next_change(
    state: &mut AppState,
    id: &JobId,
    receiver: &mut broadcast::Receiver<JobView>,
) -> Option<JobView> {
    loop {
        tokio::select! {
            _ = state.shutdown.wait_for(|stopping| *stopping) => return None,
            received = receiver.recv() => match received {
                Ok(view) if view.id == id.as_str() => return Some(view),
                Ok(_) => {}
                // Some changes were missed: the store has the latest state.
                Err(broadcast::error::RecvError::Lagged(_)) => {
                    return state.store.get(id).ok().flatten();
                }
                Err(broadcast::error::RecvError::Closed) => return None,
            },
        }
    }
}

fn sse_event(view: &JobView) -> Event {
    let data = serde_json::to_string(view).unwrap_or_else(|_| "{}".to_owned());
    Event::default().event(view.status.as_str()).data(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_another_origin_than_the_host_is_foreign() {
        let headers = |origin: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(header::HOST, "127.0.0.1:8080".parse().unwrap());
            headers.insert(header::ORIGIN, origin.parse().unwrap());
            headers
        };
        assert_eq!(foreign_origin(&headers("http://127.0.0.1:8080")), None);
        for foreign in ["http://evil.example", "null", "http://127.0.0.1:9090"] {
            assert_eq!(foreign_origin(&headers(foreign)).as_deref(), Some(foreign));
        }
        assert_eq!(
            foreign_origin(&HeaderMap::new()),
            None,
            "no Origin: not a browser page"
        );
    }

    #[test]
    fn secrets_match_only_when_equal() {
        assert!(same_secret(b"s3cret", b"s3cret"));
        assert!(!same_secret(b"s3cret", b"s3creT"));
        assert!(!same_secret(b"s3cret", b"s3cret!"));
        assert!(!same_secret(b"", b"x"));
    }
}
