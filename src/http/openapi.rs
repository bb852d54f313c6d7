//! `GET /openapi.json`: the API described as OpenAPI 3.1, generated from the handlers'
//! annotations and the types they take and answer.

use axum::{Json, Router, routing::get};
use utoipa::{
    Modify, OpenApi,
    openapi::security::{Http, HttpAuthScheme, SecurityScheme},
};

use super::{AppState, monitor, publish, stream, web};

#[derive(OpenApi)]
#[openapi(
    info(title = "nomey-sse", description = "Real-time notifications over Server-Sent Events, with durable replay."),
    paths(
        stream::stream_events,
        publish::notify_clients,
        publish::broadcast_event,
        publish::send_test_notification,
        publish::publish_batch,
        monitor::list_clients,
        monitor::get_stats,
        monitor::get_metrics,
        monitor::get_health,
        monitor::get_readiness,
        web::get_home,
        web::get_client_script,
        web::redirect_home,
        get_openapi,
    ),
    modifiers(&PublishKey),
)]
struct ApiDoc;

/// `Authorization: Bearer <SSE_PUBLISH_KEY>`, needed when the key is set.
struct PublishKey;

impl Modify for PublishKey {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "publish_key",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(get_openapi))
}

/// This description.
#[utoipa::path(get, path = "/openapi.json", tag = "web",
    responses((status = 200, description = "The OpenAPI 3.1 description of this API", content_type = "application/json")))]
pub async fn get_openapi() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
