//! Monitoring: `/api/sse/clients`, `/api/sse/stats`, `/metrics`, `/healthz`, `/readyz`.

use axum::{
    Json, Router,
    extract::{RawQuery, State},
    http::header,
    response::IntoResponse,
    routing::get,
};
use serde::Serialize;
use utoipa::ToSchema;
use uuid::Uuid;

use super::{AppState, Error, ErrorBody, Result, query};
use crate::{
    filter::{Filter, check_id},
    service::{ClientView, NotReady, Stats},
};

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

/// Clients per page of `/api/sse/clients` unless `limit` says otherwise, and the most.
const DEFAULT_PAGE: usize = 100;
const MAX_PAGE: usize = 1000;

#[derive(Default)]
struct ClientQuery {
    user_id: Option<String>,
    session_id: Option<String>,
    /// Comma-separated.
    client_ids: Option<String>,
    limit: Option<String>,
    after: Option<String>,
}

impl ClientQuery {
    /// Unknown parameters are ignored, as on every route but `/api/sse`.
    fn parse(raw: Option<&str>) -> Result<Self> {
        let mut out = Self::default();
        let mut seen = std::collections::HashSet::new();
        for (key, value) in query::pairs(raw)? {
            let slot = match key.as_str() {
                "userId" => &mut out.user_id,
                "sessionId" => &mut out.session_id,
                "clientIds" => &mut out.client_ids,
                "limit" => &mut out.limit,
                "after" => &mut out.after,
                _ => continue,
            };
            if !seen.insert(key.clone()) {
                return Err(Error::invalid_parameter(&key, "given more than once"));
            }
            *slot = Some(value).filter(|v| !v.is_empty());
        }
        Ok(out)
    }

    fn limit(&self) -> Result<usize> {
        match &self.limit {
            None => Ok(DEFAULT_PAGE),
            Some(limit) => Some(limit)
                // `parse` would also take a sign.
                .filter(|l| l.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|l| l.parse().ok())
                .filter(|n| (1..=MAX_PAGE).contains(n))
                .ok_or_else(|| Error::invalid_parameter("limit", "a whole number from 1 to 1000")),
        }
    }

    /// The client id a page starts after, in the form ids are listed in.
    fn after(&self) -> Result<Option<String>> {
        self.after
            .as_deref()
            .map(|id| {
                hyphenated_uuid(id)
                    .map(|id| id.to_string())
                    .ok_or_else(|| Error::invalid_parameter("after", "a clientId (a UUID)"))
            })
            .transpose()
    }

    fn filter(&self) -> Result<Option<Filter>> {
        for (name, value) in [("userId", &self.user_id), ("sessionId", &self.session_id)] {
            if let Some(value) = value {
                check_id(value).map_err(|rule| Error::invalid_parameter(name, &rule))?;
            }
        }
        let client_ids = match self.client_ids.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(list) => Some(
                list.split(',')
                    .map(|id| hyphenated_uuid(id.trim()))
                    .collect::<Option<Vec<_>>>()
                    .ok_or_else(|| {
                        Error::invalid_parameter("clientIds", "comma-separated UUIDs")
                    })?,
            ),
        };
        let filter = Filter {
            user_id: self.user_id.clone(),
            session_id: self.session_id.clone(),
            client_ids,
            ..Filter::default()
        };
        if filter == Filter::default() {
            return Ok(None);
        }
        filter
            .validate()
            .map_err(|rule| Error::bad_request("invalid_parameter", rule))?;
        Ok(Some(filter))
    }
}

/// A UUID as `connected` hands them out: 8-4-4-4-12 hex digits.
fn hyphenated_uuid(id: &str) -> Option<Uuid> {
    (id.len() == 36).then(|| id.parse().ok()).flatten()
}

/// A page of `GET /api/sse/clients`.
#[derive(Serialize, ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientsPage {
    clients: Vec<ClientView>,
    /// The last `clientId` of a full page (ask for `after=` it), else null.
    next_after: Option<String>,
    stats: Stats,
}

/// A probe's answer.
#[derive(Serialize, ToSchema)]
pub struct Probe {
    #[schema(example = "ok")]
    status: &'static str,
}

/// Who is connected, on every instance that shares the database, a page at a time in
/// `clientId` order.
#[utoipa::path(get, path = "/api/sse/clients", tag = "monitor",
    params(
        ("userId" = Option<String>, Query, nullable = false, max_length = 256, description = "Empty counts as absent"),
        ("sessionId" = Option<String>, Query, nullable = false, max_length = 256, description = "Empty counts as absent"),
        ("clientIds" = Option<String>, Query, nullable = false, description = "Comma-separated client ids (UUIDs)", pattern = "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}(,[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})*)?$"),
        ("limit" = Option<u32>, Query, nullable = false, minimum = 1, maximum = 1000, description = "Clients per page (default 100); empty counts as absent"),
        ("after" = Option<String>, Query, nullable = false, description = "The nextAfter of the previous page; empty counts as absent", pattern = "^([0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12})?$"),
    ),
    responses(
        (status = 200, description = "One page of the open streams, with the stats over all of them", body = ClientsPage),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 401, description = "The publish key is missing or wrong", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
    security((), ("publish_key" = [])))]
pub async fn list_clients(
    State(state): State<AppState>,
    RawQuery(raw): RawQuery,
) -> Result<Json<ClientsPage>> {
    let query = ClientQuery::parse(raw.as_deref())?;
    let (limit, after, filter) = (query.limit()?, query.after()?, query.filter()?);
    let (page, stats) = state
        .events
        .clients_page(filter.as_ref(), after.as_deref(), limit)
        .await?;
    Ok(Json(ClientsPage {
        clients: page.clients,
        next_after: page.next_after,
        stats,
    }))
}

/// The seed's SSEStats, durable.
#[utoipa::path(get, path = "/api/sse/stats", tag = "monitor",
    responses(
        (status = 200, description = "Clients, connections and events across every instance", body = Stats),
        (status = 401, description = "The publish key is missing or wrong", body = ErrorBody),
        (status = 503, description = "The database is unavailable", body = ErrorBody),
    ),
    security((), ("publish_key" = [])))]
pub async fn get_stats(State(state): State<AppState>) -> Result<Json<Stats>> {
    Ok(Json(state.events.stats().await?))
}

#[utoipa::path(get, path = "/healthz", tag = "monitor",
    responses((status = 200, description = "The process serves", body = Probe)))]
pub async fn get_health() -> Json<Probe> {
    Json(Probe { status: "ok" })
}

/// Ready while the database answers.
#[utoipa::path(get, path = "/readyz", tag = "monitor",
    responses(
        (status = 200, description = "The database answers (and, on Postgres, this instance listens to the others)", body = Probe),
        (status = 503, description = "The database is unavailable, or the bus to the other instances is down", body = ErrorBody),
    ))]
pub async fn get_readiness(State(state): State<AppState>) -> Result<Json<Probe>> {
    match state.events.ready().await {
        Ok(()) => Ok(Json(Probe { status: "ready" })),
        Err(NotReady::Database(error)) => Err(error.into()),
        Err(NotReady::Bus) => Err(Error::BusDown),
    }
}

/// Prometheus text format.
#[utoipa::path(get, path = "/metrics", tag = "monitor",
    responses(
        (status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
        (status = 401, description = "The publish key is missing or wrong", body = ErrorBody),
    ),
    security((), ("publish_key" = [])))]
pub async fn get_metrics(State(state): State<AppState>) -> impl IntoResponse {
    let out = state.events.encode_metrics();
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
}
