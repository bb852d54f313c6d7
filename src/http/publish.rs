//! `POST /api/sse/notify`, `/broadcast` and `/test`: thin shells over `EventService`.

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use serde::Deserialize;
use serde_json::{Value, json};

use super::{AppState, Error, JsonBody, Result};
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewNotification {
    filter: Filter,
    event: String,
    data: Value,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewBroadcast {
    event: String,
    data: Value,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct TestNotification {
    user_id: String,
    #[serde(default = "default_test_message")]
    message: String,
}

fn default_test_message() -> String {
    "Test notification".into()
}

/// Sends to the clients that match a filter.
async fn notify_clients(
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
async fn broadcast_event(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<NewBroadcast>,
) -> Result<Accepted> {
    let published = state.events.broadcast(&body.event, &body.data).await?;
    Ok((StatusCode::ACCEPTED, Json(published)))
}

/// The seed's demo route: a `notification` to one user.
async fn send_test_notification(
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
