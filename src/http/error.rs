//! The one HTTP error type: every refusal is `{"error": {"code", "message"}}`.

use axum::{
    Json,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
};

use crate::service::{PublishError, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Bad input; the message says which and why. Not logged: the caller's mistake.
    #[error("{message}")]
    BadRequest { code: &'static str, message: String },
    #[error("{0}")]
    Unauthorized(&'static str),
    #[error("{0}")]
    Forbidden(&'static str),
    #[error("the request did not arrive in time")]
    RequestTimeout,
    #[error("no route for {0}")]
    NotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    PayloadTooLarge(String),
    /// `MAX_CLIENTS` (or the open-files budget, or `MAX_STREAMS_PER_USER`) reached.
    #[error("{message}")]
    TooManyClients {
        status: StatusCode,
        code: &'static str,
        message: String,
        retry_after_secs: u64,
    },
    #[error("the service is shutting down")]
    ShuttingDown,
    /// The cause isn't returned to the client; it is logged when the response is made.
    #[error("the database is unavailable; try again shortly")]
    Unavailable(#[from] StoreError),
    #[error("the event could not be stored; try again shortly")]
    PublishUnavailable,
    #[error("not listening to the other instances yet; reconnecting")]
    BusDown,
}

/// Every error response, as the API describes it.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
struct ErrorDetail {
    /// Stable, snake_case, for programs.
    #[schema(pattern = "^[a-z_]+$")]
    code: &'static str,
    /// For people; may change.
    message: String,
}

impl ErrorBody {
    pub fn new(code: &'static str, message: String) -> Self {
        Self {
            error: ErrorDetail { code, message },
        }
    }
}

impl Error {
    /// `400 invalid_parameter`: `name` breaks `rule`.
    pub fn invalid_parameter(name: &str, rule: &str) -> Self {
        Self::bad_request("invalid_parameter", format!("{name}: {rule}"))
    }

    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::BadRequest {
            code,
            message: message.into(),
        }
    }

    fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            Self::BadRequest { code, .. } => (StatusCode::BAD_REQUEST, code),
            Self::Unauthorized(_) => (StatusCode::UNAUTHORIZED, "unauthorized"),
            Self::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            Self::RequestTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout"),
            Self::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
            Self::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
            Self::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large"),
            Self::TooManyClients { status, code, .. } => (*status, code),
            Self::ShuttingDown => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
            Self::Unavailable(_) | Self::PublishUnavailable => {
                (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
            }
            Self::BusDown => (StatusCode::SERVICE_UNAVAILABLE, "bus_unavailable"),
        }
    }
}

impl From<PublishError> for Error {
    fn from(error: PublishError) -> Self {
        match error {
            PublishError::Invalid(message) => Self::bad_request("invalid_event", message),
            PublishError::TooLarge { .. } => Self::PayloadTooLarge(error.to_string()),
            PublishError::Serialize(e) => Self::bad_request("invalid_event", e.to_string()),
            // Logged by the publisher, which saw the cause.
            PublishError::Unavailable(_) => Self::PublishUnavailable,
            PublishError::ShuttingDown => Self::ShuttingDown,
        }
    }
}

impl Error {
    /// A refusal that the client should retry after `retry_after_secs`.
    pub fn busy(
        status: StatusCode,
        code: &'static str,
        message: String,
        retry_after_secs: u64,
    ) -> Self {
        Self::TooManyClients {
            status,
            code,
            message,
            retry_after_secs,
        }
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        if let Self::Unavailable(error) = &self {
            tracing::error!(%error);
        }
        let mut response = (status, Json(ErrorBody::new(code, self.to_string()))).into_response();
        if matches!(self, Self::RequestTimeout) {
            // What is left of the request is still on its way: do not wait for it.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if let Self::TooManyClients {
            retry_after_secs, ..
        } = self
        {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(retry_after_secs));
            // Give the descriptor back at once rather than keep an idle connection.
            response
                .headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        response
    }
}
