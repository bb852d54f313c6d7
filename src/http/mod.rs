//! The HTTP API (see `docs/reference.md`): thin handlers over `EventService`.

mod auth;
mod error;
mod monitor;
mod openapi;
mod publish;
mod query;
mod stream;
mod web;

use std::sync::Arc;

use axum::{
    Router,
    extract::{FromRequest, Request},
    http::{HeaderName, HeaderValue, Method, Uri, header},
    middleware::{self, Next},
    response::Response,
};
use serde::de::DeserializeOwned;
use tokio_util::sync::CancellationToken;
use tower_http::{cors::CorsLayer, trace::TraceLayer};

pub use error::{Error, ErrorBody};

use crate::{
    config::Config,
    server::{FileBudget, RequestStart},
    service::EventService,
};

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Shared by every handler. One `Arc` around the parts: axum clones the state several
/// times per request (router, middleware, extractor), and cloning and dropping each part
/// (a cancellation token takes a lock) was 3% of a one-event publish.
#[derive(Clone, Debug)]
pub struct AppState(Arc<AppParts>);

#[derive(Debug)]
pub struct AppParts {
    pub events: EventService,
    pub config: Arc<Config>,
    pub shutdown: CancellationToken,
    pub files: FileBudget,
}

impl AppState {
    pub fn new(parts: AppParts) -> Self {
        Self(Arc::new(parts))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppParts;

    fn deref(&self) -> &AppParts {
        &self.0
    }
}

/// The whole API, ready to serve.
pub fn router(state: AppState) -> Router {
    let protected = publish::router()
        .merge(monitor::protected_router())
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            auth::require_publish_key,
        ));
    let mut app = stream::router()
        .merge(protected)
        .merge(monitor::router())
        .merge(web::router())
        .merge(openapi::router())
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state.clone())
        .layer(middleware::from_fn(require_utf8_query))
        .layer(TraceLayer::new_for_http().make_span_with(request_span));
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

/// Refuses any request whose query does not decode as UTF-8, on every route: even a
/// parameter a route ignores must not be silently rewritten.
async fn require_utf8_query(request: Request, next: Next) -> Result<Response> {
    query::pairs(request.uri().query())?;
    Ok(next.run(request).await)
}

/// The request span: method, path and the query with any token hidden.
fn request_span(request: &Request) -> tracing::Span {
    let query = request.uri().query().map(query::redacted);
    tracing::debug_span!(
        "request",
        method = %request.method(),
        path = request.uri().path(),
        query,
    )
}

/// Largest request body taken by the publishing routes.
pub const MAX_BODY_BYTES: usize = 8 * 1024 * 1024;

/// `text` read as `T` in one pass, if it is a JSON object that reads as one. `None` leaves
/// the verdict to the slower path, which must not be needed on any well-formed body:
/// serde refuses a repeated key in one pass, and would take an array for a struct.
pub(crate) fn object_in_one_pass<T: DeserializeOwned>(text: &[u8]) -> Option<T> {
    if text.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return None;
    }
    serde_json::from_slice(text).ok()
}

/// A JSON object body whose rejections are the contract's JSON errors. Any
/// `Content-Type` is taken: a `curl -d` without `-H` should not fail on a header. The
/// body must arrive within `REQUEST_TIMEOUT_MS`, and one announced as too large is
/// refused before a byte of it is read (so `Expect: 100-continue` gets 413, not 100).
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, Self::Rejection> {
        let too_large = || Error::PayloadTooLarge("the request body is too large".into());
        let announced = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if announced.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        let started = req
            .extensions()
            .get::<RequestStart>()
            .map_or_else(tokio::time::Instant::now, |start| start.0);
        let read = axum::body::to_bytes(req.into_body(), MAX_BODY_BYTES);
        let body = tokio::time::timeout_at(started + state.config.request_timeout, read)
            .await
            .map_err(|_| Error::RequestTimeout)?
            .map_err(|error| {
                let length_limit = std::error::Error::source(&error)
                    .is_some_and(|e| e.is::<http_body_util::LengthLimitError>());
                if length_limit {
                    too_large()
                } else {
                    Error::bad_request("invalid_body", "the request body could not be read")
                }
            })?;
        // One pass when it reads as it should. Anything else takes the two steps below,
        // which decide what is accepted and what an error says.
        if let Some(value) = object_in_one_pass(&body) {
            return Ok(Self(value));
        }
        // A map first: serde would also take a JSON array for a struct, field by field.
        let object: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&body)
            .map_err(|e| {
                let message = match e.classify() {
                    serde_json::error::Category::Data => {
                        format!("the body must be a JSON object: {e}")
                    }
                    _ => format!("the body could not be read as JSON: {e}"),
                };
                Error::bad_request("invalid_body", message)
            })?;
        // serde's message names the field and what was wrong with it.
        T::deserialize(serde_json::Value::Object(object))
            .map(Self)
            .map_err(|e| Error::bad_request("invalid_body", format!("invalid JSON body: {e}")))
    }
}
