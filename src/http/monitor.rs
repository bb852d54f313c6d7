//! Monitoring: `/api/sse/clients`, `/api/sse/stats`, `/metrics`, `/healthz`, `/readyz`.

use std::{fmt::Write, sync::atomic::Ordering::Relaxed, time::Duration};

use axum::{
    Json, Router,
    extract::{RawQuery, State},
    http::header,
    response::IntoResponse,
    routing::get,
};
use serde_json::{Value, json};
use uuid::Uuid;

use super::{AppState, Error, Result};
use crate::{filter::Filter, service::Stats};

/// Routes that `SSE_PUBLISH_KEY` guards.
pub fn protected_router() -> Router<AppState> {
    Router::new()
        .route("/api/sse/clients", get(list_clients))
        .route("/api/sse/stats", get(get_stats))
        .route("/metrics", get(get_metrics))
}

/// Probes, open to all.
pub fn router() -> Router<AppState> {
    Router::new()
        .route("/healthz", get(get_health))
        .route("/readyz", get(get_readiness))
}

#[derive(Default)]
struct ClientQuery {
    user_id: Option<String>,
    session_id: Option<String>,
    /// Comma-separated.
    client_ids: Option<String>,
}

impl ClientQuery {
    /// Unknown parameters are ignored, as on every route but `/api/sse`.
    fn parse(query: Option<&str>) -> Self {
        let mut out = Self::default();
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let slot = match &*key {
                "userId" => &mut out.user_id,
                "sessionId" => &mut out.session_id,
                "clientIds" => &mut out.client_ids,
                _ => continue,
            };
            *slot = Some(value.into_owned());
        }
        out
    }

    fn into_filter(self) -> Result<Option<Filter>> {
        let client_ids = match self
            .client_ids
            .as_deref()
            .map(str::trim)
            .filter(|s| !s.is_empty())
        {
            None => None,
            Some(list) => Some(
                list.split(',')
                    .map(|id| id.trim().parse::<Uuid>())
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|_| {
                        Error::bad_request("invalid_parameter", "clientIds: comma-separated UUIDs")
                    })?,
            ),
        };
        let filter = Filter {
            user_id: self.user_id.filter(|s| !s.is_empty()),
            session_id: self.session_id.filter(|s| !s.is_empty()),
            client_ids,
            ..Filter::default()
        };
        Ok(Some(filter).filter(|f| f.validate().is_ok()))
    }
}

/// Who is connected, on every instance that shares the database.
async fn list_clients(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<Value>> {
    let filter = ClientQuery::parse(query.as_deref()).into_filter()?;
    let (clients, stats) = state.events.clients_and_stats(filter.as_ref()).await?;
    Ok(Json(json!({ "clients": clients, "stats": stats })))
}

/// The seed's SSEStats, durable.
async fn get_stats(State(state): State<AppState>) -> Result<Json<Stats>> {
    Ok(Json(state.events.stats().await?))
}

async fn get_health() -> Json<Value> {
    Json(json!({ "status": "ok" }))
}

/// Ready while the database answers.
async fn get_readiness(State(state): State<AppState>) -> Result<Json<Value>> {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => Ok(Json(json!({ "status": "ready" }))),
        Ok(Err(error)) => Err(Error::Database(error)),
        Err(_) => Err(Error::Database(sqlx::Error::PoolTimedOut)),
    }
}

/// Prometheus text format.
async fn get_metrics(State(state): State<AppState>) -> impl IntoResponse {
    let hub = state.hub.metrics();
    let service = state.events.metrics();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(&str, u64)]| {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "# HELP nomey_sse_{name} {help}\n# TYPE nomey_sse_{name} {kind}"
        );
        for (labels, value) in samples {
            let _ = writeln!(out, "nomey_sse_{name}{labels} {value}");
        }
    };
    metric(
        "open_streams",
        "gauge",
        "Streams open on this instance.",
        &[("", state.hub.len() as u64)],
    );
    metric(
        "connections_total",
        "counter",
        "Streams opened on this instance.",
        &[("", state.hub.ledger().connections())],
    );
    metric(
        "events_published_total",
        "counter",
        "Events stored and dispatched by this instance.",
        &[("", service.events_published.load(Relaxed))],
    );
    metric(
        "publish_failures_total",
        "counter",
        "Publishes refused because the event could not be stored.",
        &[("", service.publish_failures.load(Relaxed))],
    );
    metric(
        "events_written_total",
        "counter",
        "Stored events handed to connections.",
        &[("", state.hub.ledger().events_written())],
    );
    metric(
        "frames_written_total",
        "counter",
        "Frames (events and heartbeats) handed to connections.",
        &[("", hub.frames_written.load(Relaxed))],
    );
    metric(
        "clients_dropped_total",
        "counter",
        "Streams cut off by the server.",
        &[
            ("{reason=\"slow\"}", hub.dropped_slow.load(Relaxed)),
            ("{reason=\"stale\"}", hub.dropped_stale.load(Relaxed)),
        ],
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}
