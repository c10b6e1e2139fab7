//! HTTP errors: the protocol's error body (`{"error": {"code", "message"}}`)
//! under one status per error code, mapped here and nowhere else
//! (docs/GATEWAY.md).

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use jetsource_core::protocol::{ErrorBody, ErrorCode};
use serde_json::json;

/// Seconds a client should wait before retrying an `unavailable`.
const RETRY_AFTER_SECS: &str = "1";

/// A failed API request.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// An answer of the protocol (from a worker, or the gateway's own
    /// checks of the request).
    #[error(transparent)]
    Protocol(#[from] ErrorBody),
    /// No API key, or one the gateway does not know.
    #[error("{0}")]
    Unauthorized(String),
    /// A valid key whose role may not do this.
    #[error("{0}")]
    Forbidden(String),
    /// The body is larger than `gateway.max_body_bytes`.
    #[error("{0}")]
    TooLarge(String),
}

impl ApiError {
    pub fn invalid(message: impl Into<String>) -> Self {
        Self::Protocol(ErrorBody::invalid(message))
    }

    pub fn not_found(message: impl Into<String>) -> Self {
        Self::Protocol(ErrorBody::new(ErrorCode::NotFound, message))
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Self::Protocol(ErrorBody::new(ErrorCode::Unavailable, message))
    }

    pub fn timeout(message: impl Into<String>) -> Self {
        Self::Protocol(ErrorBody::new(ErrorCode::Timeout, message))
    }

    /// The HTTP status and the error code in the body.
    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            ApiError::Protocol(e) => (status(e.code), e.code.as_str()),
            ApiError::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            ApiError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "invalid"),
        }
    }
}

/// The one place error codes become HTTP statuses.
pub fn status(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::Invalid => StatusCode::BAD_REQUEST,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Conflict => StatusCode::CONFLICT,
        ErrorCode::Rejected => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        ErrorCode::Timeout => StatusCode::GATEWAY_TIMEOUT,
        ErrorCode::Internal | ErrorCode::Tampered => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let message = match &self {
            ApiError::Protocol(e) => e.message.clone(),
            other => other.to_string(),
        };
        let body = json!({"error": {"code": code, "message": message}});
        let mut response = (status, axum::Json(body)).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            response.headers_mut().insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        if status == StatusCode::UNAUTHORIZED {
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"jetsource\""),
            );
        }
        response
    }
}
