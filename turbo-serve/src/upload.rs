//! Reading a submission: a JSON body (the images, if any, in base64), or a
//! `multipart/form-data` body with the JSON in a `request` part and the image files in
//! `image` and `end_image` parts (`curl -F request='{…}' -F image=@cat.png`).

use axum::body::Bytes;
use axum::extract::{FromRequest, Multipart, Request};
use axum::http::{header, StatusCode};

use crate::error::ApiError;
use crate::images::{check_image_size, ImageField, InputImages};
use crate::request::{RequestLimits, VideoRequest};

/// The request and the image bytes of a `POST /v1/videos` body of at most `max_body` bytes.
pub async fn read_submission(
    request: Request,
    limits: &RequestLimits,
    max_body: usize,
) -> Result<(VideoRequest, InputImages), ApiError> {
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
        let images = video.take_images(limits)?;
        Ok((video, images))
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

/// The `request`, `image` and `end_image` parts of a multipart body.
async fn read_parts(
    mut multipart: Multipart,
    limits: &RequestLimits,
    max_body: usize,
) -> Result<(VideoRequest, InputImages), ApiError> {
    let mut video = None;
    let mut files = InputImages::default();
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
        match (name.as_str(), ImageField::from_part_name(&name)) {
            ("request", _) => video = Some(VideoRequest::parse(&bytes)?),
            (_, Some(field)) => {
                check_image_size(field, &bytes, limits)?;
                files.set_once(field, bytes.to_vec())?;
            }
            (other, None) => {
                return Err(ApiError::field(
                    other,
                    "unknown part: send `request` (JSON), `image` and `end_image` (files)",
                ))
            }
        }
    }
    let mut video = video.ok_or_else(|| ApiError::field("request", "the JSON part is missing"))?;
    let mut images = video.take_images(limits)?;
    for field in ImageField::ALL {
        if let Some(bytes) = files.get(field) {
            images.set_once(field, bytes.to_vec())?;
        }
    }
    Ok((video, images))
}

fn body_error(status: StatusCode, text: String, max_body: usize) -> ApiError {
    if status == StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::BodyTooLarge { limit: max_body }
    } else {
        ApiError::field("body", text)
    }
}
