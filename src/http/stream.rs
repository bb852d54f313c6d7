//! `GET /api/sse`: open a stream.

use std::collections::BTreeMap;

use axum::{
    Extension, Router,
    body::Body,
    extract::{RawQuery, State},
    http::{HeaderMap, HeaderValue, StatusCode, header},
    response::Response,
    routing::get,
};

use super::{AppState, Error, Result, bearer_token};
use crate::{
    server::ConnectionHandle,
    service::{Subscribe, SubscribeError},
};

pub fn router() -> Router<AppState> {
    Router::new().route("/api/sse", get(stream_events))
}

const MAX_VALUE_BYTES: usize = 256;
const MAX_KEY_BYTES: usize = 64;
const MAX_METADATA_PAIRS: usize = 16;
const MAX_TOKEN_BYTES: usize = 4096;

/// What a stream asked for, checked against the contract's limits.
#[derive(Debug, Default, PartialEq)]
struct StreamParams {
    user_id: Option<String>,
    session_id: Option<String>,
    last_event_id: Option<i64>,
    metadata: BTreeMap<String, String>,
}

impl StreamParams {
    fn parse(query: Option<&str>, headers: &HeaderMap) -> Result<Self> {
        let mut params = Self::default();
        let mut query_last_id = None;
        for (key, value) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
            let (key, value) = (key.into_owned(), value.into_owned());
            let slot = match key.as_str() {
                "userId" => &mut params.user_id,
                "sessionId" => &mut params.session_id,
                "lastEventId" => &mut query_last_id,
                "token" => {
                    if value.len() > MAX_TOKEN_BYTES {
                        return Err(invalid("token", "at most 4 KiB"));
                    }
                    continue;
                }
                _ => {
                    check_metadata_key(&key)?;
                    check_value(&key, &value)?;
                    if params.metadata.insert(key.clone(), value).is_some() {
                        return Err(invalid(&key, "given more than once"));
                    }
                    if params.metadata.len() > MAX_METADATA_PAIRS {
                        return Err(invalid("metadata", "at most 16 pairs"));
                    }
                    continue;
                }
            };
            if slot.is_some() {
                return Err(invalid(&key, "given more than once"));
            }
            check_value(&key, &value)?;
            // An empty value counts as absent.
            *slot = Some(value).filter(|v| !v.is_empty());
        }
        // The token's size is checked however it comes, before anything reads it.
        let header_token = bearer_token(headers).map(str::len);
        let cookie_token = cookie(headers, "sse_token").map(str::len);
        if header_token
            .max(cookie_token)
            .is_some_and(|len| len > MAX_TOKEN_BYTES)
        {
            return Err(invalid("token", "at most 4 KiB"));
        }
        let header_last_id = match headers.get("last-event-id") {
            None => None,
            Some(value) => {
                let value = value
                    .to_str()
                    .map_err(|_| invalid("Last-Event-ID", "not valid text"))?;
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
}

/// A cookie's value from the `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find_map(|(key, value)| (key == name).then_some(value))
}

fn invalid(name: &str, rule: &str) -> Error {
    Error::bad_request("invalid_parameter", format!("{name}: {rule}"))
}

fn check_value(name: &str, value: &str) -> Result<()> {
    if value.len() > MAX_VALUE_BYTES {
        return Err(invalid(name, "at most 256 bytes"));
    }
    Ok(())
}

fn check_metadata_key(key: &str) -> Result<()> {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if key.is_empty() || key.len() > MAX_KEY_BYTES || !key.chars().all(valid) {
        let shown: String = key.chars().take(MAX_KEY_BYTES).collect();
        return Err(invalid(
            &format!("metadata key {shown:?}"),
            "1 to 64 characters of [A-Za-z0-9_.-]",
        ));
    }
    Ok(())
}

/// A non-negative integer that fits in 63 bits; empty means absent.
fn parse_event_id(name: &str, value: &str) -> Result<Option<i64>> {
    let value = value.trim();
    if value.is_empty() {
        return Ok(None);
    }
    if !value.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid(name, "a non-negative whole number"));
    }
    value
        .parse()
        .map(Some)
        .map_err(|_| invalid(name, "a whole number below 2^63"))
}

/// Opens a stream: `retry:`, `connected`, then history, then live events.
async fn stream_events(
    State(state): State<AppState>,
    connection: Option<Extension<ConnectionHandle>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response> {
    let params = StreamParams::parse(query.as_deref(), &headers)?;
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

    let mut response = Response::new(Body::from_stream(stream));
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // Tells nginx-style proxies not to buffer the stream.
    headers.insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
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
    fn the_header_wins_over_the_query() {
        let mut headers = HeaderMap::new();
        headers.insert("last-event-id", HeaderValue::from_static("9"));
        let p = StreamParams::parse(Some("lastEventId=3"), &headers).unwrap();
        assert_eq!(p.last_event_id, Some(9));
    }
}
