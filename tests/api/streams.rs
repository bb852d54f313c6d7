//! `GET /api/sse`: opening, validation, heartbeats, limits, cleanup and shutdown.

use std::time::Duration;

use futures_util::StreamExt;
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{PATIENCE, TestDb, error_code, spawn_app, spawn_app_with, stuck_stream};

/// Reads raw body chunks until `needle` appears; returns everything read.
async fn read_until(response: &mut reqwest::Response, needle: &str) -> String {
    let mut body = String::new();
    while !body.contains(needle) {
        let chunk = tokio::time::timeout(PATIENCE, response.chunk())
            .await
            .expect("more of the stream in time")
            .expect("a readable stream")
            .expect("the stream did not end");
        body.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    body
}

#[tokio::test]
async fn a_stream_starts_with_retry_then_connected_and_has_the_contract_headers() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;

    let mut response = app.open_stream("userId=u1&sessionId=s1", &[]).await;

    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers["content-type"], "text/event-stream");
    assert_eq!(headers["cache-control"], "no-cache");
    assert_eq!(headers["x-accel-buffering"], "no");
    // Chunked, and nothing else: strict clients (Node's fetch) refuse a response that
    // also announces a length.
    assert_eq!(headers["transfer-encoding"], "chunked");
    assert!(headers.get("content-length").is_none(), "{headers:?}");
    // The retry frame has no brace: the first "}\n\n" ends the connected frame.
    let body = read_until(&mut response, "}\n\n").await;
    let (retry, rest) = body.split_once("\n\n").unwrap();
    let retry: u64 = retry
        .strip_prefix("retry: ")
        .expect("retry: comes first")
        .parse()
        .unwrap();
    assert!(
        (2400..=3600).contains(&retry),
        "retry {retry} is within ±20 % of 3000"
    );
    assert!(!rest.contains("id:"), "connected carries no id: {rest}");
    let data: Value = serde_json::from_str(
        rest.trim()
            .strip_prefix("event: connected\ndata: ")
            .unwrap(),
    )
    .unwrap();
    assert!(uuid::Uuid::parse_str(data["clientId"].as_str().unwrap()).is_ok());
    assert_eq!(data["userId"], "u1");
    assert_eq!(data["sessionId"], "s1");
    assert_eq!(data["historyGap"], false);
    assert!(data["serverTime"].as_str().unwrap().ends_with('Z'));
    app.stop().await;
}

#[tokio::test]
async fn every_bad_stream_parameter_gets_a_json_400_and_the_server_keeps_serving() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let long = "x".repeat(257);
    let seventeen: Vec<String> = (0..17).map(|i| format!("k{i}=v")).collect();
    let cases: Vec<(String, Vec<(&str, String)>)> = vec![
        (format!("userId={long}"), vec![]),
        (format!("sessionId={long}"), vec![]),
        (format!("role={long}"), vec![]),
        (format!("{}=v", "k".repeat(65)), vec![]),
        ("bad%20key=v".into(), vec![]),
        (seventeen.join("&"), vec![]),
        ("lastEventId=-1".into(), vec![]),
        ("lastEventId=abc".into(), vec![]),
        ("lastEventId=9223372036854775808".into(), vec![]),
        ("userId=a&userId=b".into(), vec![]),
        (format!("token={}", "t".repeat(4097)), vec![]),
        ("userId=u1".into(), vec![("last-event-id", "12x".into())]),
        ("userId=u1".into(), vec![("last-event-id", "-5".into())]),
        (
            "userId=u1".into(),
            vec![("authorization", format!("Bearer {}", "t".repeat(4097)))],
        ),
        (
            "userId=u1".into(),
            vec![("cookie", format!("sse_token={}", "t".repeat(4097)))],
        ),
    ];
    for (query, headers) in &cases {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let response = app.open_stream(query, &headers).await;
        let code = error_code(response, StatusCode::BAD_REQUEST).await;
        assert_eq!(code, "invalid_parameter", "for {query} {headers:?}");
    }
    // Still serving, and the edge values are accepted.
    let ok = format!("userId={}&lastEventId=&role=admin", "x".repeat(256));
    let mut stream = app.subscribe(&ok).await;
    assert_eq!(stream.connected().await["userId"], "x".repeat(256));
    app.stop().await;
}

#[tokio::test]
async fn heartbeats_arrive_every_ping_interval_without_an_id() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("PING_INTERVAL_MS", "100")]).await;
    let mut stream = app.subscribe("userId=u1").await;
    stream.connected().await;

    for _ in 0..3 {
        let ping = stream.next_any().await.expect("a heartbeat");
        assert_eq!(ping.event, "ping");
        assert_eq!(ping.id, "", "a heartbeat never moves Last-Event-ID");
        let data: Value = serde_json::from_str(&ping.data).unwrap();
        assert!(data["serverTime"].is_string());
    }
    app.stop().await;
}

#[tokio::test]
async fn max_clients_refuses_with_503_then_accepts_after_one_closes() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("MAX_CLIENTS", "2"), ("PING_INTERVAL_MS", "50")]).await;
    let mut first = app.subscribe("userId=a").await;
    first.connected().await;
    let mut second = app.subscribe("userId=b").await;
    second.connected().await;

    let refused = app.open_stream("userId=c", &[]).await;
    assert!(
        refused.headers()["retry-after"]
            .to_str()
            .unwrap()
            .parse::<u64>()
            .unwrap()
            >= 1
    );
    assert_eq!(
        error_code(refused, StatusCode::SERVICE_UNAVAILABLE).await,
        "too_many_clients"
    );

    drop(first);
    // The server notices the closed connection at its next write at the latest.
    let accepted = tokio::time::timeout(PATIENCE, async {
        loop {
            let response = app.open_stream("userId=c", &[]).await;
            if response.status() == StatusCode::OK {
                return response;
            }
            assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        }
    })
    .await
    .expect("a place frees up once a stream closes");
    assert_eq!(accepted.status(), StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_vanished_is_removed() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("PING_INTERVAL_MS", "50")]).await;
    let mut stream = app.subscribe("userId=gone").await;
    stream.connected().await;
    assert_eq!(
        app.get_json("/api/sse/clients?userId=gone").await.1["clients"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    drop(stream);

    let removed = tokio::time::timeout(PATIENCE, async {
        loop {
            let (_, body) = app.get_json("/api/sse/clients?userId=gone").await;
            if body["clients"].as_array().unwrap().is_empty() {
                return body;
            }
            tokio::task::yield_now().await;
        }
    })
    .await
    .expect("the vanished client is removed");
    assert_eq!(removed["stats"]["totalClients"], 0);
    app.stop().await;
}

#[tokio::test]
async fn a_client_that_accepts_no_data_for_the_client_timeout_is_removed() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("CLIENT_TIMEOUT_MS", "300")]).await;
    let _raw = stuck_stream(app.addr, "userId=stuck").await;

    // Events at a pace the queue absorbs (it holds 4 MiB) while the client's window stays
    // shut: the stream must be ended for the timeout (by the kernel's unacknowledged-data
    // timeout or the hub's stall check, whichever fires first), never as too slow.
    let big = "y".repeat(60 * 1024);
    let mut pace = tokio::time::interval(Duration::from_millis(40));
    let mut cut_off = false;
    for _ in 0..400 {
        pace.tick().await;
        let published = app
            .notify(json!({ "userId": "stuck" }), "big", json!(big))
            .await;
        if published["delivered"] == 0 {
            cut_off = true;
            break;
        }
    }
    assert!(cut_off, "the stalled stream was cut off");
    let metrics = app.metrics().await;
    assert!(
        metrics.contains("nomey_sse_clients_dropped_total{reason=\"slow\"} 0"),
        "{metrics}"
    );
    app.stop().await;
}

#[tokio::test]
async fn graceful_shutdown_ends_open_streams() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut stream = app.subscribe("userId=u1").await;
    stream.connected().await;

    let shutdown = app.shutdown.clone();
    let server = app.server;
    shutdown.cancel();

    stream.expect_end().await;
    tokio::time::timeout(PATIENCE, server)
        .await
        .expect("the server stops")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn a_stream_ends_cleanly_after_max_stream_duration_and_resumes() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("MAX_STREAM_DURATION_MS", "300")]).await;
    let mut stream = app.subscribe("userId=u1").await;
    stream.connected().await;
    let first = app.notify(json!({ "userId": "u1" }), "n", json!(1)).await;
    assert_eq!(
        stream.take_stored(1).await[0].0,
        first["eventId"].as_i64().unwrap()
    );

    stream.expect_end().await;
    let second = app.notify(json!({ "userId": "u1" }), "n", json!(2)).await;

    let last_id = first["eventId"].to_string();
    let mut resumed = app
        .subscribe_with("userId=u1", &[("Last-Event-ID", &last_id)])
        .await;
    resumed.connected().await;
    let replayed = resumed.take_stored(1).await;
    assert_eq!(replayed[0].0, second["eventId"].as_i64().unwrap());
    assert_eq!(replayed[0].1, json!(2));
    app.stop().await;
}

#[tokio::test]
async fn streams_are_served_with_bytes_shared_across_many_clients() {
    // Many streams on one broadcast: each receives the identical frame.
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut streams = Vec::new();
    for i in 0..50 {
        let mut s = app.subscribe(&format!("userId=u{i}")).await;
        s.connected().await;
        streams.push(s);
    }
    let published = app.broadcast("alert", json!({ "level": "high" })).await;
    assert_eq!(published["delivered"], 50);
    let received = futures_util::stream::iter(streams.iter_mut())
        .then(|s| async move { s.next_event().await })
        .collect::<Vec<_>>()
        .await;
    for event in received {
        assert_eq!(event.event, "alert");
        assert_eq!(event.data, r#"{"level":"high"}"#);
        assert_eq!(event.id, published["eventId"].to_string());
    }
    app.stop().await;
}

/// The complete events in an SSE body: (id, data) of each that has an id, in order.
fn stored_events(body: &str) -> Vec<(i64, String)> {
    let complete = body
        .rsplit_once("\n\n")
        .map_or("", |(complete, _)| complete);
    complete
        .split("\n\n")
        .filter_map(|event| {
            let field = |name: &str| {
                event
                    .lines()
                    .find_map(|line| line.strip_prefix(name).map(str::to_owned))
            };
            Some((field("id: ")?.parse().ok()?, field("data: ")?))
        })
        .collect()
}

/// A chunked body's data as far as it is complete.
fn dechunk(mut raw: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    while let Some(end) = raw.windows(2).position(|w| w == b"\r\n") {
        let size = std::str::from_utf8(&raw[..end]).unwrap();
        let size = usize::from_str_radix(size, 16).expect("a chunk size");
        let Some(chunk) = raw.get(end + 2..end + 2 + size + 2) else {
            break;
        };
        assert_eq!(&chunk[size..], b"\r\n", "a chunk ends with CRLF");
        body.extend_from_slice(&chunk[..size]);
        raw = &raw[end + 2 + size + 2..];
    }
    body
}

#[tokio::test]
async fn a_reader_that_stops_then_reads_gets_every_event_whole_and_in_order_in_both_framings() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // Held to the end: dropping it deletes the database file under the running app.
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    // Small receive buffers: writes to these streams soon stop part-way through a frame,
    // whether the publisher writes them or the stream's own task does.
    let mut chunked = stuck_stream(app.addr, "userId=u1").await;
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut plain = socket.connect(app.addr).await.unwrap();
    plain
        .write_all(b"GET /api/sse?userId=u1 HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let mut head = [0u8; 12];
    plain.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.0 200");

    // More than a socket holds (its send buffer grows to the system's maximum), and less
    // than that plus what a stream may queue (4 MiB).
    let most_sent = std::fs::read_to_string("/proc/sys/net/ipv4/tcp_wmem")
        .ok()
        .and_then(|limits| limits.split_whitespace().last()?.parse().ok())
        .unwrap_or(4 << 20);
    let events = (most_sent + (2 << 20)) / 60_000;
    let mut sent = Vec::new();
    for n in 0..events {
        let data = json!([n, "x".repeat(60_000 + n)]);
        let published = app
            .notify(json!({ "userId": "u1" }), "big", data.clone())
            .await;
        assert_eq!(published["delivered"], 2);
        sent.push((published["eventId"].as_i64().unwrap(), data.to_string()));
    }

    for (socket, is_chunked) in [(&mut chunked, true), (&mut plain, false)] {
        let mut raw = Vec::new();
        let received = tokio::time::timeout(PATIENCE, async {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                let n = socket.read(&mut buf).await.unwrap();
                assert!(n > 0, "the stream ended early");
                raw.extend_from_slice(&buf[..n]);
                // Parsed only where a frame (and its chunk) ends.
                if !(raw.ends_with(b"\n\n") || raw.ends_with(b"\n\n\r\n")) {
                    continue;
                }
                let start = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
                let body = match is_chunked {
                    true => dechunk(&raw[start..]),
                    false => raw[start..].to_vec(),
                };
                let events = stored_events(&String::from_utf8(body).unwrap());
                if events.len() >= sent.len() {
                    return events;
                }
            }
        })
        .await
        .expect("every event within the patience");
        assert!(received == sent, "chunked {is_chunked}: the events differ");
    }
    let metrics = app.metrics().await;
    let written = format!("nomey_sse_frames_written_total {}\n", 2 * events);
    assert!(
        metrics.contains(&written),
        "each frame counted once: {metrics}"
    );
    app.stop().await;
}
