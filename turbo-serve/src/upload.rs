//! Reading a submission: a JSON body (the image, if any, in base64), or a
//! `multipart/form-data` body with the JSON in a `request` part and the image file in an
//! `image` part (`curl -F request='{…}' -F image=@cat.png`).

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};

use crate::error::ApiError;
use crate::request::{RequestLimits, VideoRequest};

/// The request and the image bytes of a `POST /v1/videos` body of at most `max_body` bytes.
pub async fn read_submission(
    request: Request,
    limits: &RequestLimits,
    max_body: usize,
) -> Result<(VideoRequest, Option<Vec<u8>>), ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let essence = content_type.split(';').next().unwrap_or_default().trim();
    if essence.eq_ignore_ascii_case("application/json") {
        let body = Bytes::from_request(request, &())
            .await
            .map_err(|rejection| body_error(rejection.status(), rejection.body_text(), max_body))?;
        let mut video = VideoRequest::parse(&body)?;
        let image = video.take_image(limits)?;
        Ok((video, image))
    } else if essence.eq_ignore_ascii_case("multipart/form-data") {
        let multipart = Multipart::from_request(request, &())
            .await
            .map_err(|rejection| ApiError::field("body", rejection.body_text()))?;
        read_parts(multipart, limits, max_body).await
    } else {
        Err(ApiError::field(
            "content-type",
            format!("`{content_type}`: send `application/json` or `multipart/form-data`"),
        ))
    }
}

/// The `request` and `image` parts of a multipart body.
async fn read_parts(
    mut multipart: Multipart,
    limits: &RequestLimits,
    max_body: usize,
) -> Result<(VideoRequest, Option<Vec<u8>>), ApiError> {
    let mut video = None;
    let mut image = None;
    while let Some(part) = multipart
        .next_field()
        .await
        .map_err(|e| body_error(e.status(), e.body_text(), max_body))?
    {
        let name = part.name().unwrap_or_default().to_owned();
        let bytes = part
            .bytes()
            .await
            .map_err(|e| body_error(e.status(), e.body_text(), max_body))?;
        match name.as_str() {
            "request" => video = Some(VideoRequest::parse(&bytes)?),
            "image" if bytes.len() > limits.max_image_bytes => {
                return Err(ApiError::field(
                    "image",
                    format!("larger than {} bytes", limits.max_image_bytes),
                ))
            }
            "image" => image = Some(bytes.to_vec()),
            other => {
                return Err(ApiError::field(
                    other,
                    "unknown part: send `request` (JSON) and `image` (a file)",
                ))
            }
        }
    }
    let mut video = video.ok_or_else(|| ApiError::field("request", "the JSON part is missing"))?;
    match (video.take_image(limits)?, image) {
        (Some(_), Some(_)) => Err(ApiError::field("image", "give the image once, not twice")),
        (in_json, as_file) => Ok((video, in_json.or(as_file))),
    }
}

fn body_error(status: StatusCode, text: String, max_body: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge { limit: max_body }
    } else {
        ApiError::field("body", text)
    }
}
