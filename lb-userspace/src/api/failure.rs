//! An error as the API answers it: a status and a one-line detail, as JSON.

use axum::{
    Json,
    http::StatusCode,
    response::{IntoResponse, Response as HttpResponse},
};

use super::ApiError;
use crate::error::Error;

/// An error as the API answers it.
pub struct Failure(StatusCode, String);

impl Failure {
    pub fn new(status: StatusCode, detail: impl Into<String>) -> Self {
        Self(status, one_line(&detail.into()))
    }

    pub fn status(&self) -> StatusCode {
        self.0
    }
}

/// An error's detail as the API answers it: one line, every control character (a newline in a
/// quoted field name, say) a space.
pub fn one_line(detail: &str) -> String {
    detail
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        let status = match &e {
            Error::Config(_) | Error::Invalid(_) | Error::Resolve(_) => StatusCode::BAD_REQUEST,
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::Exists(_) => StatusCode::CONFLICT,
            Error::DataPlane(_) | Error::Io { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Self::new(status, e.to_string())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> HttpResponse {
        let kind = match self.0 {
            StatusCode::BAD_REQUEST => "invalid",
            StatusCode::NOT_FOUND => "not-found",
            StatusCode::CONFLICT => "exists",
            StatusCode::UNAUTHORIZED => "unauthorized",
            StatusCode::FORBIDDEN => "forbidden",
            StatusCode::METHOD_NOT_ALLOWED => "method-not-allowed",
            _ => "internal",
        };
        (
            self.0,
            Json(ApiError {
                error: kind.into(),
                detail: self.1,
            }),
        )
            .into_response()
    }
}
