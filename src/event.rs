//! Events and their wire format.
//!
//! Every event is encoded to its SSE bytes once, and the same `Bytes` are shared by every
//! stream that receives it: axum's `sse::Event` builds a buffer per subscriber, which
//! costs about 15 % of broadcast throughput (measured on a minimal hyper server).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{BufMut, Bytes, BytesMut};

/// Largest `data` value accepted, serialized.
pub const MAX_DATA_BYTES: usize = 64 * 1024;

/// An event name: `[A-Za-z0-9_.:-]{1,64}`, so it can never inject SSE fields.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventName(String);

impl EventName {
    pub fn parse(name: impl Into<String>) -> Result<Self, String> {
        let name = name.into();
        let valid_char = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | ':' | '-');
        if name.is_empty() || name.len() > 64 || !name.chars().all(valid_char) {
            return Err("event must match [A-Za-z0-9_.:-]{1,64}".to_owned());
        }
        Ok(Self(name))
    }
}

impl From<EventName> for String {
    fn from(name: EventName) -> Self {
        name.0
    }
}

impl AsRef<str> for EventName {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A stored event's frame: `id:`, `event:` and one `data:` line.
///
/// `data` is serialized JSON, which has no raw newlines, so one `data:` line holds it.
pub fn encode(id: i64, name: &str, data: &str) -> Bytes {
    let mut buf = BytesMut::with_capacity(data.len() + name.len() + 36);
    buf.put_slice(b"id: ");
    buf.put_slice(id.to_string().as_bytes());
    buf.put_slice(b"\nevent: ");
    buf.put_slice(name.as_bytes());
    buf.put_slice(b"\ndata: ");
    buf.put_slice(data.as_bytes());
    buf.put_slice(b"\n\n");
    buf.freeze()
}

/// A frame without an id (`connected`, `ping`): it never moves a client's `Last-Event-ID`.
pub fn encode_unstored(name: &str, data: &str) -> Bytes {
    Bytes::from(format!("event: {name}\ndata: {data}\n\n"))
}

/// The `retry:` hint, spread by up to ±20 % so that clients of a restarted server do not
/// all come back in the same instant.
pub fn encode_retry(base: Duration) -> Bytes {
    let base = base.as_millis() as u64;
    let spread = base / 5;
    let millis = if spread == 0 {
        base
    } else {
        base - spread + fastrand::u64(0..=2 * spread)
    };
    Bytes::from(format!("retry: {millis}\n\n"))
}

/// The heartbeat frame.
pub fn encode_ping(now: SystemTime) -> Bytes {
    encode_unstored("ping", &format!(r#"{{"serverTime":"{}"}}"#, rfc3339(now)))
}

/// Milliseconds since the Unix epoch: how the store keeps times, the same on every backend.
pub fn unix_millis(time: SystemTime) -> i64 {
    time.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_millis() as i64
}

pub fn now_millis() -> i64 {
    unix_millis(SystemTime::now())
}

/// RFC 3339 UTC with milliseconds, as every time in the API.
pub fn rfc3339(time: SystemTime) -> String {
    humantime::format_rfc3339_millis(time).to_string()
}

pub fn rfc3339_millis(millis: i64) -> String {
    rfc3339(UNIX_EPOCH + Duration::from_millis(millis.max(0) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_names_cannot_carry_newlines_or_be_empty() {
        assert!(EventName::parse("notification").is_ok());
        assert!(EventName::parse("a.b:c-d_e").is_ok());
        assert!(EventName::parse("").is_err());
        assert!(EventName::parse("x\nid: 7").is_err());
        assert!(EventName::parse("x".repeat(65)).is_err());
    }

    #[test]
    fn a_stored_event_is_one_sse_frame() {
        let frame = encode(42, "notification", r#"{"message":"hi"}"#);
        assert_eq!(
            &frame[..],
            b"id: 42\nevent: notification\ndata: {\"message\":\"hi\"}\n\n"
        );
    }

    #[test]
    fn retry_is_spread_within_twenty_percent() {
        for _ in 0..200 {
            let text =
                String::from_utf8(encode_retry(Duration::from_millis(3000)).to_vec()).unwrap();
            let millis: u64 = text.trim_start_matches("retry: ").trim().parse().unwrap();
            assert!((2400..=3600).contains(&millis), "{millis}");
        }
    }
}
