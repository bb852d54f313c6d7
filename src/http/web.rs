//! The demo page and the browser client: `GET /home`, `GET /sse-client.js`, and `GET /`
//! redirecting to `/home`.
//!
//! The files live in `web/` and are compiled into the binary, so the service needs no
//! build step and no separate web server to show them. They are public: a page and a
//! script are no secret, and the routes they call check the publish key themselves.

use axum::{
    Router,
    extract::RawQuery,
    http::{HeaderValue, StatusCode, header},
    response::{IntoResponse, Response},
    routing::get,
};

use super::AppState;

const HOME_HTML: &str = include_str!("../../web/home.html");
const CLIENT_JS: &str = include_str!("../../web/sse-client.js");

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(redirect_home))
        .route("/home", get(get_home))
        .route("/sse-client.js", get(get_client_script))
}

#[utoipa::path(get, path = "/home", tag = "web",
    responses((status = 200, description = "The demo page", body = String, content_type = "text/html")))]
pub async fn get_home() -> Response {
    embedded("text/html; charset=utf-8", HOME_HTML)
}

#[utoipa::path(get, path = "/sse-client.js", tag = "web",
    responses((status = 200, description = "The browser client, an ES module", body = String, content_type = "text/javascript")))]
pub async fn get_client_script() -> Response {
    embedded("text/javascript; charset=utf-8", CLIENT_JS)
}

/// `/` → `/home`, keeping the query, so `/?userId=alice` opens alice's page.
#[utoipa::path(get, path = "/", tag = "web",
    responses((status = 303, description = "To /home, keeping the query")))]
pub async fn redirect_home(RawQuery(query): RawQuery) -> Response {
    let target = match query.filter(|q| !q.is_empty()) {
        Some(query) => format!("/home?{query}"),
        None => "/home".to_owned(),
    };
    // A query that hyper accepted is valid in a header; the plain path is the fallback.
    let location =
        HeaderValue::try_from(target).unwrap_or_else(|_| HeaderValue::from_static("/home"));
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

fn embedded(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Revalidate on each load, so a new release's page and client go together.
            (header::CACHE_CONTROL, "no-cache"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        body,
    )
        .into_response()
}
