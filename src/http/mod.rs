//! The HTTP API (see `docs/reference.md`): thin handlers over `EventService`.

mod error;
mod monitor;
mod publish;
mod stream;
mod web;

use std::sync::Arc;

use axum::{
    Router,
    body::Bytes,
    extract::{FromRequest, Request, State},
    http::{HeaderName, HeaderValue, Method, StatusCode, Uri, header},
    middleware::{self, Next},
    response::Response,
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tower_http::{cors::CorsLayer, trace::TraceLayer};

pub use error::Error;

use crate::{config::Config, server::FileBudget, service::EventService};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared by every handler; each field is already a cheap handle.
#[derive(Clone, Debug)]
pub struct AppState {
    pub events: EventService,
    pub config: Arc<Config>,
    pub shutdown: CancellationToken,
    pub files: FileBudget,
}

/// The whole API, ready to serve.
pub fn router(state: AppState) -> Router {
    let protected = publish::router()
        .merge(monitor::protected_router())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_publish_key,
        ));
    let mut app = stream::router()
        .merge(protected)
        .merge(monitor::router())
        .merge(web::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone())
        .layer(TraceLayer::new_for_http());
    if !state.config.cors_origins.is_empty() {
        app = app.layer(cors(&state.config));
    }
    app
}

fn cors(config: &Config) -> CorsLayer {
    // Origins were checked as header values when the configuration was read.
    let origins: Vec<HeaderValue> = config
        .cors_origins
        .iter()
        .filter_map(|o| o.parse().ok())
        .collect();
    CorsLayer::new()
        .allow_origin(origins)
        .allow_credentials(true)
        .allow_methods([Method::GET, Method::POST, Method::OPTIONS])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("last-event-id"),
        ])
}

async fn not_found(uri: Uri) -> Error {
    Error::NotFound(uri.path().to_owned())
}

async fn method_not_allowed() -> Error {
    Error::MethodNotAllowed
}

/// With `SSE_PUBLISH_KEY` set, publishing and monitoring need `Authorization: Bearer <key>`.
async fn require_publish_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response> {
    if let Some(key) = &state.config.publish_key {
        let given = bearer_token(request.headers()).unwrap_or_default();
        if !constant_time_eq(given.as_bytes(), key.expose().as_bytes()) {
            return Err(Error::Unauthorized(
                "a valid Authorization: Bearer <SSE_PUBLISH_KEY> is required",
            ));
        }
    }
    Ok(next.run(request).await)
}

pub(crate) fn bearer_token(headers: &axum::http::HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then_some(token.trim())
}

/// Compares without an early exit, so timing does not reveal how much of a key matched.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A JSON body whose rejections are the contract's JSON errors. Any `Content-Type` is
/// taken: a `curl -d` without `-H` should not fail on a header.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let body = Bytes::from_request(req, state).await.map_err(|rejection| {
            match rejection.status() {
                StatusCode::PAYLOAD_TOO_LARGE => {
                    Error::PayloadTooLarge("the request body is too large".into())
                }
                _ => Error::bad_request("invalid_body", rejection.body_text()),
            }
        })?;
        // serde's message names the field and what was wrong with it.
        serde_json::from_slice(&body)
            .map(Self)
            .map_err(|e| Error::bad_request("invalid_body", format!("invalid JSON body: {e}")))
    }
}
