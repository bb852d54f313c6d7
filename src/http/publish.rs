//! `POST /api/sse/notify`, `/broadcast` and `/test`: thin shells over `EventService`.

use axum::{Json, Router, extract::State, http::StatusCode, routing::post};
use serde::{Deserialize, Deserializer, Serialize, de::Error as _};
use serde_json::{Value, json, value::RawValue};
use utoipa::ToSchema;

use super::{AppState, Error, ErrorBody, JsonBody, Result, object_in_one_pass};
use crate::{
    event,
    filter::{Filter, check_id},
    service::{MAX_BATCH_EVENTS, Published},
};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/api/sse/notify", post(notify_clients))
        .route("/api/sse/broadcast", post(broadcast_event))
        .route("/api/sse/test", post(send_test_notification))
        .route("/api/sse/batch", post(publish_batch))
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

/// Many events, stored in one transaction (all or none).
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewBatch {
    /// Kept as text and read one by one, so that an error names the event's index.
    #[schema(value_type = Vec<BatchItem>, min_items = 1, max_items = 1000)]
    events: Vec<Box<RawValue>>,
}

/// One event of a batch: a notification, or a broadcast without `filter`.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BatchItem {
    #[serde(default, deserialize_with = "present_filter")]
    #[schema(nullable = false)]
    filter: Option<Filter>,
    #[schema(pattern = "^[A-Za-z0-9_.:-]{1,64}$")]
    event: String,
    /// Any JSON value, at most 64 KiB once serialized.
    data: Value,
}

/// Why a batch event's `"filter": null` is refused.
const NULL_FILTER: &str = "leave it out for a broadcast; null is not a filter";

/// A `filter` that is there must be one: only leaving it out makes a broadcast. (What a
/// client is told comes from `batch_item_from_value`, which reads the event again.)
fn present_filter<'de, D: Deserializer<'de>>(value: D) -> Result<Option<Filter>, D::Error> {
    Option::<Filter>::deserialize(value)?
        .map(Some)
        .ok_or_else(|| D::Error::custom(NULL_FILTER))
}

/// The results of a batch, one per event, in order.
#[derive(Serialize, ToSchema)]
pub struct BatchResults {
    results: Vec<Published>,
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

/// Stores many events in one transaction, then dispatches them in order.
#[utoipa::path(post, path = "/api/sse/batch", request_body = NewBatch, tag = "publish",
    responses(
        (status = 202, description = "All stored, ids increasing, each handed to this instance's matching streams", body = BatchResults),
        (status = 400, description = "A bad body, or one bad event (named by its index): nothing is stored", body = ErrorBody),
        (status = 401, description = "The publish key is missing or wrong", body = ErrorBody),
        (status = 413, description = "An event's data or the body is too large", body = ErrorBody),
        (status = 503, description = "The database is unavailable, or the service is stopping", body = ErrorBody),
    ),
    security((), ("publish_key" = [])))]
pub async fn publish_batch(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<NewBatch>,
) -> Result<(StatusCode, Json<BatchResults>)> {
    if body.events.is_empty() || body.events.len() > MAX_BATCH_EVENTS {
        return Err(Error::bad_request(
            "invalid_body",
            format!("events: 1 to {MAX_BATCH_EVENTS} events"),
        ));
    }
    let mut items = Vec::with_capacity(body.events.len());
    for (i, raw) in body.events.iter().enumerate() {
        let item = match object_in_one_pass::<BatchItem>(raw.get().as_bytes()) {
            Some(item) => item,
            None => batch_item_from_value(i, raw)?,
        };
        if let Some(error) = item.filter.as_ref().and_then(|f| f.validate().err()) {
            return Err(Error::bad_request(
                "invalid_filter",
                format!("events[{i}].filter: {error}"),
            ));
        }
        items.push(item);
    }
    let events = items
        .iter()
        .map(|e| (e.filter.clone(), e.event.as_str(), &e.data));
    let results = state.events.batch(events).await?;
    Ok((StatusCode::ACCEPTED, Json(BatchResults { results })))
}

/// A batch event that one pass refused, read as a value: this decides what is accepted
/// (a repeated key keeps its last value) and what the error says.
fn batch_item_from_value(i: usize, raw: &RawValue) -> Result<BatchItem> {
    let invalid = |message: String| Error::bad_request("invalid_body", message);
    let value: Value =
        serde_json::from_str(raw.get()).map_err(|e| invalid(format!("events[{i}]: {e}")))?;
    match value {
        Value::Object(ref map) if map.get("filter").is_some_and(Value::is_null) => {
            Err(invalid(format!("events[{i}].filter: {NULL_FILTER}")))
        }
        Value::Object(_) => {
            serde_json::from_value(value).map_err(|e| invalid(format!("events[{i}]: {e}")))
        }
        _ => Err(invalid(format!("events[{i}]: must be a JSON object"))),
    }
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
