//! `GET /api/sse`: open a stream.

use std::collections::BTreeMap;

use axum::{
    Extension, Router,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, Method, StatusCode, header},
    response::Response,
    routing::get,
};

use super::{
    AppState, Error, ErrorBody, Result,
    auth::{bearer_token, cookie, verify_token},
    query,
};
use crate::{
    filter::{MAX_METADATA_PAIRS, check_id, check_metadata_key},
    server::{ConnectionHandle, StreamSlot},
    service::{Subscribe, SubscribeError},
};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/sse", get(stream_events))
}

const MAX_TOKEN_BYTES: usize = 4096;

/// What a stream asked for, checked against the contract's limits.
#[derive(Debug, Default, PartialEq)]
struct StreamParams {
    user_id: Option<String>,
    session_id: Option<String>,
    last_event_id: Option<i64>,
    metadata: BTreeMap<String, String>,
    /// The subscriber token, from the query, the `Authorization` header or the cookie.
    token: Option<String>,
}

impl StreamParams {
    fn parse(raw_query: Option<&str>, headers: &HeaderMap) -> Result<Self> {
        let mut params = Self::default();
        let mut query_last_id = None;
        let mut query_token = None;
        let mut seen = std::collections::HashSet::new();
        for (key, value) in query::pairs(raw_query)? {
            if !seen.insert(key.clone()) {
                return Err(Error::invalid_parameter(&key, "given more than once"));
            }
            let slot = match key.as_str() {
                "userId" => &mut params.user_id,
                "sessionId" => &mut params.session_id,
                "lastEventId" => &mut query_last_id,
                "token" => &mut query_token,
                _ => {
                    check_metadata_key(&key)
                        .map_err(|rule| Error::invalid_parameter(&key, &rule))?;
                    check_id(&value).map_err(|rule| Error::invalid_parameter(&key, &rule))?;
                    params.metadata.insert(key, value);
                    if params.metadata.len() > MAX_METADATA_PAIRS {
                        return Err(Error::invalid_parameter("metadata", "at most 16 pairs"));
                    }
                    continue;
                }
            };
            // An empty value counts as absent.
            if !value.is_empty() {
                if key != "token" && key != "lastEventId" {
                    check_id(&value).map_err(|rule| Error::invalid_parameter(&key, &rule))?;
                }
                *slot = Some(value);
            }
        }
        // The token's size is checked however it comes, before anything reads it.
        let sources = [
            query_token.as_deref(),
            bearer_token(headers),
            cookie(headers, "sse_token"),
        ];
        if sources.iter().flatten().any(|t| t.len() > MAX_TOKEN_BYTES) {
            return Err(Error::invalid_parameter("token", "at most 4 KiB"));
        }
        params.token = sources
            .into_iter()
            .flatten()
            .find(|t| !t.is_empty())
            .map(str::to_owned);
        let mut header_ids = headers.get_all("last-event-id").iter();
        let header_last_id = match (header_ids.next(), header_ids.next()) {
            (None, _) => None,
            (Some(_), Some(_)) => {
                return Err(Error::invalid_parameter(
                    "Last-Event-ID",
                    "given more than once",
                ));
            }
            (Some(value), None) => {
                let value = value
                    .to_str()
                    .map_err(|_| Error::invalid_parameter("Last-Event-ID", "not valid text"))?;
                parse_event_id("Last-Event-ID", value)?
            }
        };
        let query_last_id = match query_last_id {
            Some(value) => parse_event_id("lastEventId", &value)?,
            None => None,
        };
        // The header wins: a browser's own reconnect sends it, while the page URL keeps
        // the id the stream was first opened with.
        params.last_event_id = header_last_id.or(query_last_id);
        Ok(params)
    }

    /// With `SSE_JWT_SECRET` set, the stream belongs to the token's `sub` (and `sid`).
    fn authorize(&mut self, state: &AppState) -> Result<()> {
        let Some(secret) = &state.config.jwt_secret else {
            return Ok(());
        };
        let token = self.token.as_deref().ok_or(Error::Unauthorized(
            "a subscriber token is required (token=, Authorization: Bearer, or the sse_token cookie)",
        ))?;
        let claims = verify_token(secret, token)?;
        check_id(&claims.sub).map_err(|_| {
            Error::Unauthorized("the subscriber token's sub is not a valid user id")
        })?;
        if self.user_id.as_ref().is_some_and(|u| *u != claims.sub) {
            return Err(Error::Forbidden("the token is for another user"));
        }
        if let Some(sid) = claims.sid {
            check_id(&sid).map_err(|_| {
                Error::Unauthorized("the subscriber token's sid is not a valid session id")
            })?;
            if self.session_id.as_ref().is_some_and(|s| *s != sid) {
                return Err(Error::Forbidden("the token is for another session"));
            }
            self.session_id = Some(sid);
        }
        self.user_id = Some(claims.sub);
        Ok(())
    }
}

/// A non-negative integer that fits in 63 bits; empty means absent. Nothing else, not
/// even surrounding white space.
fn parse_event_id(name: &str, value: &str) -> Result<Option<i64>> {
    if value.is_empty() {
        return Ok(None);
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Error::invalid_parameter(
            name,
            "a non-negative whole number",
        ));
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| Error::invalid_parameter(name, "a whole number below 2^63"))
}

/// One event of the stream, as the API describes it.
#[derive(utoipa::ToSchema)]
#[allow(dead_code)]
pub struct SseEvent {
    /// Stored events only: a decimal id, increasing.
    id: Option<String>,
    event: Option<String>,
    /// JSON.
    data: String,
    retry: Option<u64>,
}

/// Whether a request says a body follows: a non-zero `Content-Length` or any
/// `Transfer-Encoding`.
fn announces_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|length| length.as_bytes().iter().any(|&b| b != b'0'))
}

/// Opens a stream: `retry:`, `connected`, then history, then live events.
#[utoipa::path(get, path = "/api/sse", tag = "stream",
    params(
        ("userId" = Option<String>, Query, nullable = false, max_length = 256, description = "Empty counts as absent"),
        ("sessionId" = Option<String>, Query, nullable = false, max_length = 256, description = "Empty counts as absent"),
        ("lastEventId" = Option<i64>, Query, nullable = false, minimum = 0, maximum = 9223372036854775807_i64, description = "Resume after this event id (the Last-Event-ID header wins); empty counts as absent"),
        ("token" = Option<String>, Query, nullable = false, max_length = 4096, description = "Subscriber JWT, when SSE_JWT_SECRET is set"),
        ("Last-Event-ID" = Option<String>, Header, nullable = false, pattern = "^([0-9]{1,18})?$", description = "Resume after this event id; empty counts as absent"),
    ),
    responses(
        (status = 200, description = "The event stream: retry, connected, then stored events (with ids) and pings", body = SseEvent, content_type = "text/event-stream"),
        (status = 400, description = "A bad parameter", body = ErrorBody),
        (status = 401, description = "A subscriber token is missing or invalid", body = ErrorBody),
        (status = 403, description = "The token is for another user or session", body = ErrorBody),
        (status = 429, description = "The user has MAX_STREAMS_PER_USER streams open here", body = ErrorBody),
        (status = 503, description = "MAX_CLIENTS streams are open, the database is unavailable, or the service is stopping", body = ErrorBody),
    ))]
pub async fn stream_events(
    State(state): State<AppState>,
    connection: Option<Extension<ConnectionHandle>>,
    slot: Option<Extension<StreamSlot>>,
    method: Method,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    // A body announced but never sent would otherwise hold the request open past its
    // deadline while the stream runs.
    if announces_body(&headers) {
        return Err(Error::bad_request(
            "invalid_body",
            "a stream request takes no body",
        ));
    }
    let mut params = StreamParams::parse(query.as_deref(), &headers)?;
    params.authorize(&state)?;
    if method == Method::HEAD {
        // The headers a stream would get, and no stream: nothing registers or counts.
        return Ok(stream_response(Body::empty()));
    }
    let retry_after_secs = state.config.retry.as_secs().max(1);
    if state.files.exhausted() {
        return Err(Error::busy(
            StatusCode::SERVICE_UNAVAILABLE,
            "too_many_open_files",
            "the server is out of file descriptors; try again shortly".into(),
            retry_after_secs,
        ));
    }
    let request = Subscribe {
        user_id: params.user_id,
        session_id: params.session_id,
        metadata: params.metadata,
        last_event_id: params.last_event_id,
        kill: connection
            .map(|Extension(ConnectionHandle(token))| token)
            .unwrap_or_default(),
    };
    let stream = state
        .events
        .subscribe(request)
        .await
        .map_err(|error| match error {
            SubscribeError::Full(_) => Error::busy(
                StatusCode::SERVICE_UNAVAILABLE,
                "too_many_clients",
                error.to_string(),
                retry_after_secs,
            ),
            SubscribeError::UserFull(_) => Error::busy(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_streams",
                error.to_string(),
                retry_after_secs,
            ),
            SubscribeError::ShuttingDown => Error::ShuttingDown,
            SubscribeError::Unavailable(error) => Error::Unavailable(error),
        })?;

    Ok(match slot {
        Some(Extension(slot)) => {
            slot.put(stream);
            stream_response(Body::empty())
        }
        None => stream_response(Body::from_stream(stream)),
    })
}

fn stream_response(body: Body) -> Response {
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(query: &str) -> Result<StreamParams> {
        StreamParams::parse(Some(query), &HeaderMap::new())
    }

    #[test]
    fn other_pairs_become_metadata() {
        let p = parse("userId=u1&sessionId=s1&role=admin&team=a%20b").unwrap();
        assert_eq!(p.user_id.as_deref(), Some("u1"));
        assert_eq!(p.metadata.get("team").map(String::as_str), Some("a b"));
        assert_eq!(p.metadata.len(), 2);
    }

    #[test]
    fn the_limits_of_the_contract_hold() {
        assert!(parse(&format!("userId={}", "x".repeat(257))).is_err());
        assert!(parse(&format!("userId={}", "x".repeat(256))).is_ok());
        assert!(parse(&format!("{}=v", "k".repeat(65))).is_err());
        assert!(parse("bad%20key=v").is_err());
        let seventeen: Vec<String> = (0..17).map(|i| format!("k{i}=v")).collect();
        assert!(parse(&seventeen.join("&")).is_err());
        assert!(parse("lastEventId=-1").is_err());
        assert!(parse("lastEventId=9223372036854775808").is_err());
        assert_eq!(
            parse("lastEventId=9223372036854775807")
                .unwrap()
                .last_event_id,
            Some(i64::MAX)
        );
        assert_eq!(parse("lastEventId=").unwrap().last_event_id, None);
        assert!(parse("lastEventId=%201").is_err());
        assert!(parse("lastEventId=1%0A").is_err());
        assert!(parse("lastEventId=%E3%80%801").is_err());
        assert!(parse("userId=%FF").is_err());
        assert!(parse(&format!("token={}", "t".repeat(4097))).is_err());
    }

    #[test]
    fn a_token_over_4_kib_is_refused_however_it_comes() {
        let long = format!("Bearer {}", "t".repeat(4097));
        let mut headers = HeaderMap::new();
        headers.insert(header::AUTHORIZATION, HeaderValue::from_str(&long).unwrap());
        assert!(StreamParams::parse(None, &headers).is_err());
        let mut headers = HeaderMap::new();
        let cookie = format!("theme=dark; sse_token={}", "t".repeat(4097));
        headers.insert(header::COOKIE, HeaderValue::from_str(&cookie).unwrap());
        assert!(StreamParams::parse(None, &headers).is_err());
        headers.insert(
            header::COOKIE,
            HeaderValue::from_static("theme=dark; sse_token=short"),
        );
        assert!(StreamParams::parse(None, &headers).is_ok());
    }

    #[test]
    fn two_last_event_id_headers_are_refused() {
        let mut headers = HeaderMap::new();
        headers.append("last-event-id", HeaderValue::from_static("1"));
        headers.append("last-event-id", HeaderValue::from_static("2"));
        assert!(StreamParams::parse(None, &headers).is_err());
    }

    #[test]
    fn the_header_wins_over_the_query() {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_static("9"));
        let p = StreamParams::parse(Some("lastEventId=3"), &headers).unwrap();
        assert_eq!(p.last_event_id, Some(9));
    }
}
