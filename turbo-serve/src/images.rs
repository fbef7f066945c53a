//! The images a request may carry (the first frame and, for FLF2V, the last), each uploaded
//! as a multipart file or sent in base64 in the JSON, and which of them each task takes.

use base64::Engine;
use serde::Serialize;

use crate::error::ApiError;
use crate::request::RequestLimits;

/// A request field that holds an image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ImageField {
    /// `image`: the first frame (image to video, TI2V with an image, FLF2V).
    Image,
    /// `end_image`: the last frame (FLF2V).
    EndImage,
}

impl ImageField {
    pub const ALL: [Self; 2] = [Self::Image, Self::EndImage];

    /// The field's name in the JSON body and the multipart part's name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Image => "image",
            Self::EndImage => "end_image",
        }
    }

    /// The field a multipart part of this name fills.
    pub fn from_part_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|field| field.name() == name)
    }
}

/// Whether a model takes an image field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageUse {
    Required,
    Optional,
    Refused,
}

/// The encoded image files of a request, checked for size but not yet decoded.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct InputImages {
    pub image: Option<Vec<u8>>,
    pub end_image: Option<Vec<u8>>,
}

impl InputImages {
    pub fn get(&self, field: ImageField) -> Option<&[u8]> {
        self.slot(field).as_deref()
    }

    fn slot(&self, field: ImageField) -> &Option<Vec<u8>> {
        match field {
            ImageField::Image => &self.image,
            ImageField::EndImage => &self.end_image,
        }
    }

    fn slot_mut(&mut self, field: ImageField) -> &mut Option<Vec<u8>> {
        match field {
            ImageField::Image => &mut self.image,
            ImageField::EndImage => &mut self.end_image,
        }
    }

    /// Sets `field` once: a second value (a JSON field and a file part) is refused.
    pub fn set_once(&mut self, field: ImageField, bytes: Vec<u8>) -> Result<(), ApiError> {
        let slot = self.slot_mut(field);
        if slot.is_some() {
            return Err(ApiError::field(
                field.name(),
                "give the image once, not twice",
            ));
        }
        *slot = Some(bytes);
        Ok(())
    }
}

/// Refuses an uploaded file of `field` over the size limit.
pub fn check_image_size(
    field: ImageField,
    bytes: &[u8],
    limits: &RequestLimits,
) -> Result<(), ApiError> {
    if bytes.len() > limits.max_image_bytes {
        return Err(image_too_large(field, limits));
    }
    Ok(())
}

/// The bytes of `text`, base64 bare or in a `data:` URL, within the size limit.
pub fn decode_base64_image(
    field: ImageField,
    text: &str,
    limits: &RequestLimits,
) -> Result<Vec<u8>, ApiError> {
    let base64 = match text.split_once(";base64,") {
        Some((prefix, data)) if prefix.starts_with("data:") => data,
        _ => text,
    };
    // Base64 takes four characters per three bytes: refuse before decoding.
    if base64.len() / 4 * 3 > limits.max_image_bytes + 3 {
        return Err(image_too_large(field, limits));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(base64.trim())
        .map_err(|e| ApiError::field(field.name(), format!("not valid base64: {e}")))?;
    check_image_size(field, &bytes, limits)?;
    Ok(bytes)
}

fn image_too_large(field: ImageField, limits: &RequestLimits) -> ApiError {
    ApiError::field(
        field.name(),
        format!("larger than {} bytes", limits.max_image_bytes),
    )
}
