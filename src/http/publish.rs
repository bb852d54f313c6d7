//! `POST /api/sse/notify`, `/broadcast` and `/test`: thin shells over `EventService`.

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use serde::Deserialize;
use serde_json::{Value, json};
use utoipa::ToSchema;

use super::{AppState, Error, ErrorBody, JsonBody, Result};
use crate::{
    event,
    filter::{Filter, check_id},
    service::Published,
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/sse/notify", post(notify_clients))
        .route("/api/sse/broadcast", post(broadcast_event))
        .route("/api/sse/test", post(send_test_notification))
}

type Accepted = (StatusCode, Json<Published>);

/// An event for the clients a filter picks.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewNotification {
    filter: Filter,
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    event: String,
    /// Any JSON value, at most 64 KiB once serialized.
    data: Value,
}

/// An event for every client.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBroadcast {
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    event: String,
    /// Any JSON value, at most 64 KiB once serialized.
    data: Value,
}

/// The seed's demo notification.
#[derive(Deserialize, ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TestNotification {
    #[schema(min_length = 1, max_length = 256)]
    user_id: String,
    #[serde(default = "default_test_message")]
    #[schema(default = "Test notification")]
    message: String,
}

fn default_test_message() -> String {
    "Test notification".into()
}

/// Sends to the clients that match a filter.
#[utoipa::path(post, path = "/api/sse/notify", request_body = NewNotification, tag = "publish",
    responses(
        (status = 202, description = "Stored and handed to this instance's matching streams", body = Published),
        (status = 400, description = "Bad body, event name or filter", body = ErrorBody),
        (status = 401, description = "The publish key is missing or wrong", body = ErrorBody),
        (status = 413, description = "The data or the body is too large", body = ErrorBody),
        (status = 503, description = "The database is unavailable, or the service is stopping", body = ErrorBody),
    ),
    security((), ("publish_key" = [])))]
pub async fn notify_clients(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<NewNotification>,
) -> Result<Accepted> {
    body.filter
        .validate()
        .map_err(|message| Error::bad_request("invalid_filter", message))?;
    let published = state
        .events
        .notify(body.filter, &body.event, &body.data)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(published)))
}

/// Sends to every client.
#[utoipa::path(post, path = "/api/sse/broadcast", request_body = NewBroadcast, tag = "publish",
    responses(
        (status = 202, description = "Stored and handed to this instance's streams", body = Published),
        (status = 400, description = "Bad body or event name", body = ErrorBody),
        (status = 401, description = "The publish key is missing or wrong", body = ErrorBody),
        (status = 413, description = "The data or the body is too large", body = ErrorBody),
        (status = 503, description = "The database is unavailable, or the service is stopping", body = ErrorBody),
    ),
    security((), ("publish_key" = [])))]
pub async fn broadcast_event(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<NewBroadcast>,
) -> Result<Accepted> {
    let published = state.events.broadcast(&body.event, &body.data).await?;
    Ok((StatusCode::ACCEPTED, Json(published)))
}

/// The seed's demo route: a `notification` to one user.
#[utoipa::path(post, path = "/api/sse/test", request_body = TestNotification, tag = "publish",
    responses(
        (status = 202, description = "Stored and handed to the user's streams here", body = Published),
        (status = 400, description = "Bad body", body = ErrorBody),
        (status = 401, description = "The publish key is missing or wrong", body = ErrorBody),
        (status = 413, description = "The body is too large", body = ErrorBody),
        (status = 503, description = "The database is unavailable, or the service is stopping", body = ErrorBody),
    ),
    security((), ("publish_key" = [])))]
pub async fn send_test_notification(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<TestNotification>,
) -> Result<Accepted> {
    check_id(&body.user_id)
        .map_err(|rule| Error::bad_request("invalid_body", format!("userId: {rule}")))?;
    let data = json!({ "message": body.message, "timestamp": event::rfc3339(std::time::SystemTime::now()) });
    let published = state
        .events
        .notify_user(&body.user_id, "notification", &data)
        .await?;
    Ok((StatusCode::ACCEPTED, Json(published)))
}
