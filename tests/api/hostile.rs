//! What the internet sends: bad bytes, loose bodies, slow and stalled senders, floods.

use std::{net::SocketAddr, time::Duration};

use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

use crate::helpers::{PATIENCE, TestDb, error_code, spawn_app, spawn_app_with};

/// Sends raw bytes and returns what comes back until the server closes or `wait` passes.
async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: Duration) -> String {
    let mut socket = TcpStream::connect(addr).await.unwrap();
    socket.write_all(request).await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(wait, socket.read_to_end(&mut answer)).await;
    String::from_utf8_lossy(&answer).into_owned()
}

#[tokio::test]
async fn query_values_that_are_not_utf8_are_refused_on_every_route() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    for path in [
        "/api/sse?userId=%FF",
        "/api/sse?userId=%FE",
        "/api/sse/clients?userId=%FF",
        "/api/sse/stats?x=%C3",
        "/healthz?x=%FF",
    ] {
        let response = app.http.get(app.url(path)).send().await.unwrap();
        assert_eq!(
            error_code(response, StatusCode::BAD_REQUEST).await,
            "invalid_parameter",
            "{path}"
        );
    }
    app.stop().await;
}

#[tokio::test]
async fn loose_bodies_and_filters_are_refused() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let long = "x".repeat(257);
    let refused = [
        ("/api/sse/notify", r#"[{"userId":"u"},"n",{}]"#.to_owned()),
        (
            "/api/sse/notify",
            r#"{"filter":["u"],"event":"n","data":1}"#.to_owned(),
        ),
        (
            "/api/sse/notify",
            r#"{"filter":{"userId":""},"event":"n","data":1}"#.to_owned(),
        ),
        (
            "/api/sse/notify",
            format!(r#"{{"filter":{{"userId":"{long}"}},"event":"n","data":1}}"#),
        ),
        (
            "/api/sse/notify",
            r#"{"filter":{"userIds":["a",""]},"event":"n","data":1}"#.to_owned(),
        ),
        (
            "/api/sse/notify",
            r#"{"filter":{"metadata":{"bad key":"v"}},"event":"n","data":1}"#.to_owned(),
        ),
        ("/api/sse/broadcast", r#"["alert", 1]"#.to_owned()),
        ("/api/sse/broadcast", "\"alert\"".to_owned()),
        ("/api/sse/test", r#"["u1","hi"]"#.to_owned()),
    ];
    for (path, body) in refused {
        let response = app.post_text(path, body.clone()).await;
        let code = error_code(response, StatusCode::BAD_REQUEST).await;
        assert!(code.starts_with("invalid_"), "{path} {body}: {code}");
    }
    assert_eq!(
        app.get_json("/api/sse/stats").await.1["pendingNotifications"],
        0
    );
    app.stop().await;
}

#[tokio::test]
async fn last_event_ids_with_white_space_or_given_twice_are_refused() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    for query in [
        "lastEventId=%201",
        "lastEventId=1%0A",
        "lastEventId=%E3%80%801",
    ] {
        let response = app.open_stream(query, &[]).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST, "{query}");
    }
    let twice = app
        .open_stream("", &[("Last-Event-ID", "1"), ("Last-Event-ID", "2")])
        .await;
    assert_eq!(
        error_code(twice, StatusCode::BAD_REQUEST).await,
        "invalid_parameter"
    );
    app.stop().await;
}

#[tokio::test]
async fn head_on_the_stream_route_opens_and_counts_nothing() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let response = app
        .http
        .head(app.url("/api/sse?userId=u"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.headers()["content-type"], "text/event-stream");
    let stats = app.get_json("/api/sse/stats").await.1;
    assert_eq!(
        (
            stats["totalConnections"].as_i64(),
            stats["totalClients"].as_i64()
        ),
        (Some(0), Some(0))
    );
    app.stop().await;
}

#[tokio::test]
async fn a_huge_announced_body_gets_413_before_any_100_continue() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let request = "POST /api/sse/notify HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n\
                   Content-Length: 200000000\r\nExpect: 100-continue\r\n\r\n";
    let answer = raw_exchange(app.addr, request.as_bytes(), Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(!answer.contains("100 Continue"), "{answer}");
    assert!(answer.contains("payload_too_large"), "{answer}");
    app.stop().await;
}

#[tokio::test]
async fn a_stream_request_with_a_body_is_refused_at_once() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    // The body may be short, still on its way (the answer must not be lost to a reset
    // when the server closes with it unread), or hidden behind a first length of 0.
    let large = "x".repeat(300_000);
    for (framing, body) in [
        ("Content-Length: 100", "abc"),
        ("Transfer-Encoding: chunked", "abc"),
        ("Content-Length: 300000", large.as_str()),
        ("Content-Length: 0\r\nContent-Length: 3", "abc"),
    ] {
        let request =
            format!("GET /api/sse?userId=u HTTP/1.1\r\nHost: t\r\n{framing}\r\n\r\n{body}");
        let answer = raw_exchange(app.addr, request.as_bytes(), PATIENCE).await;
        assert!(answer.starts_with("HTTP/1.1 400"), "{framing}: {answer}");
        assert!(answer.contains("invalid_body"), "{answer}");
    }
    let empty = "GET /api/sse?userId=u HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n";
    let answer = raw_exchange(app.addr, empty.as_bytes(), Duration::from_millis(500)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    app.stop().await;
}

#[tokio::test]
async fn a_request_that_does_not_arrive_in_time_is_answered_408_or_closed() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("REQUEST_TIMEOUT_MS", "500")]).await;
    let started = tokio::time::Instant::now();
    // A body that never completes.
    let half_body = "POST /api/sse/notify HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\n{";
    let answer = raw_exchange(app.addr, half_body.as_bytes(), PATIENCE).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_timeout"), "{answer}");
    // Headers that never complete.
    let half_head = "GET /api/sse?userId=u HTTP/1.1\r\nHost: t\r\n";
    raw_exchange(app.addr, half_head.as_bytes(), PATIENCE).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "closed after {:?}",
        started.elapsed()
    );
    app.stop().await;
}

#[tokio::test]
async fn a_flood_of_malformed_requests_leaves_a_normal_client_served() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("REQUEST_TIMEOUT_MS", "1000")]).await;
    let mut stream = app.subscribe("userId=steady").await;
    stream.connected().await;

    let many_headers: String = (0..200).map(|i| format!("X-H{i}: v\r\n")).collect();
    let garbage: Vec<Vec<u8>> = vec![
        b"POST /api/sse/notify HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\n{not json".to_vec(),
        format!("GET /healthz HTTP/1.1\r\nHost: t\r\n{many_headers}\r\n").into_bytes(),
        b"POST /api/sse/notify HTTP/1.1\r\nHost: t\r\nContent-Length: 1000\r\n\r\n{\"filter\""
            .to_vec(),
        b"GET /api/sse?userId=s".to_vec(),
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03 not http at all\r\n\r\n".to_vec(),
        format!("GET /{} HTTP/1.1\r\nHost: t\r\n\r\n", "a".repeat(100_000)).into_bytes(),
    ];
    let flood: Vec<_> = (0..200)
        .map(|n| {
            let request = garbage[n % garbage.len()].clone();
            let addr = app.addr;
            tokio::spawn(async move { raw_exchange(addr, &request, Duration::from_secs(3)).await })
        })
        .collect();
    let mut sent = Vec::new();
    for n in 0..20 {
        let published = app
            .notify(json!({ "userId": "steady" }), "n", json!(n))
            .await;
        sent.push((published["eventId"].as_i64().unwrap(), json!(n)));
    }
    for task in flood {
        task.await.unwrap();
    }
    assert_eq!(
        stream.take_stored(20).await,
        sent,
        "every event, in order, once"
    );
    assert_eq!(app.get_json("/healthz").await.0, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn clients_come_in_pages_ordered_by_client_id() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut streams = Vec::new();
    for _ in 0..5 {
        let mut stream = app.subscribe("userId=paged").await;
        stream.connected().await;
        streams.push(stream);
    }
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    let mut pages = 0;
    loop {
        let query = after
            .as_ref()
            .map_or(String::new(), |a| format!("&after={a}"));
        let (status, body) = app
            .get_json(&format!("/api/sse/clients?userId=paged&limit=2{query}"))
            .await;
        assert_eq!(status, StatusCode::OK);
        pages += 1;
        let ids: Vec<String> = body["clients"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["clientId"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(body["stats"]["totalClients"], 5);
        seen.extend(ids.clone());
        match &body["nextAfter"] {
            Value::Null => break,
            next => {
                assert_eq!(next.as_str(), ids.last().map(String::as_str));
                after = next.as_str().map(String::from);
            }
        }
    }
    assert_eq!(pages, 3);
    let mut sorted = seen.clone();
    sorted.sort();
    assert_eq!(seen, sorted);
    assert_eq!(seen.len(), 5);
    // An upper-case copy of an id is the same id: the page after it leaves it out.
    let upper = seen[0].to_uppercase();
    let (status, body) = app
        .get_json(&format!("/api/sse/clients?userId=paged&after={upper}"))
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(
        body["clients"][0]["clientId"].as_str(),
        Some(seen[1].as_str())
    );
    let refused = [
        "limit=0",
        "limit=1001",
        "limit=abc",
        "limit=-1",
        "limit=%2B5",
        "after=zzz",
        "after=1",
    ];
    for query in refused {
        let response = app
            .http
            .get(app.url(&format!("/api/sse/clients?{query}")))
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(response, StatusCode::BAD_REQUEST).await,
            "invalid_parameter",
            "{query}"
        );
    }
    let long = "u".repeat(257);
    let (status, error) = app
        .get_json(&format!("/api/sse/clients?userId={long}"))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    let message = error["error"]["message"].as_str().unwrap();
    assert!(message.starts_with("userId: "), "{message}");
    let default = app.get_json("/api/sse/clients").await.1;
    assert_eq!(default["clients"].as_array().unwrap().len(), 5);
    assert_eq!(default["nextAfter"], Value::Null);
    app.stop().await;
}

#[tokio::test]
async fn slow_headers_then_a_slow_body_share_one_request_deadline() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("REQUEST_TIMEOUT_MS", "1000")]).await;
    let started = tokio::time::Instant::now();
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    socket
        .write_all(b"POST /api/sse/notify HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(700)).await;
    socket
        .write_all(b"Content-Length: 100\r\n\r\n{")
        .await
        .unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(PATIENCE, socket.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // The body had what was left of the second, not a second of its own.
    assert!(
        started.elapsed() < Duration::from_millis(1500),
        "after {:?}",
        started.elapsed()
    );
    app.stop().await;
}

/// Reads from a raw stream connection until `marker` appears; returns all read so far.
async fn read_until(socket: &mut TcpStream, marker: &str) -> String {
    let mut seen = Vec::new();
    tokio::time::timeout(PATIENCE, async {
        let mut buf = [0u8; 4096];
        while !String::from_utf8_lossy(&seen).contains(marker) {
            let n = socket.read(&mut buf).await.unwrap();
            assert!(
                n > 0,
                "closed before {marker:?}: {}",
                String::from_utf8_lossy(&seen)
            );
            seen.extend_from_slice(&buf[..n]);
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no {marker:?} within the patience"));
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn a_stream_request_in_pieces_opens_a_chunked_stream_that_the_server_closes_at_its_end() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("MAX_STREAM_DURATION_MS", "300")]).await;
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    for piece in [
        "GE",
        "T /api/s",
        "se?userId=u1 HTTP/1.1\r\nHo",
        "st: test\r\n\r\n",
    ] {
        socket.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let head = read_until(&mut socket, "event: connected").await;
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\ncontent-type: text/event-stream\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\ntransfer-encoding: chunked\r\n"),
        "{head}"
    );
    // At its end the stream sends the last chunk and the connection closes.
    let mut rest = Vec::new();
    tokio::time::timeout(PATIENCE, socket.read_to_end(&mut rest))
        .await
        .expect("the server closes the connection")
        .unwrap();
    assert!(String::from_utf8_lossy(&rest).ends_with("0\r\n\r\n"));
}

#[tokio::test]
async fn an_http_1_0_stream_is_sent_without_chunks() {
    // Held to the end: dropping it deletes the database file under the running app.
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut socket = TcpStream::connect(app.addr).await.unwrap();
    socket
        .write_all(b"GET /api/sse?userId=u1 HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    let seen = read_until(&mut socket, "event: connected").await;
    assert!(seen.starts_with("HTTP/1.0 200 OK\r\n"), "{seen}");
    assert!(!seen.contains("transfer-encoding"), "{seen}");
    assert!(
        seen.contains("\r\n\r\nretry: "),
        "the body starts right after the head: {seen}"
    );
}

/// Checks that `answer` is a `status` with the contract's JSON error, `code`, as its body.
fn assert_json_refusal(answer: &str, status: u16, code: &str) {
    assert!(
        answer.starts_with(&format!("HTTP/1.1 {status} ")),
        "{status} {code}: {answer}"
    );
    let (head, body) = answer.split_once("\r\n\r\n").expect(answer);
    assert!(
        head.contains(&format!("\r\ncontent-length: {}\r\n", body.len())),
        "{answer}"
    );
    let error: Value = serde_json::from_str(body).expect(answer);
    assert_eq!(error["error"]["code"], code, "{answer}");
}

#[tokio::test]
async fn an_unreadable_or_oversized_request_gets_400_414_or_431_as_json_and_the_server_keeps_serving()
 {
    // Held to the end: dropping it deletes the database file under the running app.
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let wait = Duration::from_secs(2);
    // A stream's head is read by the server itself; every other route's by hyper. The
    // answers are the same.
    for (line, rest) in [
        ("GET /api/sse?userId=u1", ""),
        ("GET /api/sse/stats?x=1", ""),
        ("POST /api/sse/notify?x=1", "content-length: 2\r\n"),
    ] {
        let request = format!("{line} HTTP/1.1\r\n{rest}bad name: v\r\n\r\n");
        let malformed = raw_exchange(app.addr, request.as_bytes(), wait).await;
        assert_json_refusal(&malformed, 400, "bad_request");
        let long = format!("{line}&x={} HTTP/1.1\r\n{rest}\r\n", "a".repeat(70_000));
        let too_long = raw_exchange(app.addr, long.as_bytes(), wait).await;
        assert_json_refusal(&too_long, 414, "uri_too_long");
        let too_many: String = (0..120).map(|i| format!("x-h{i}: v\r\n")).collect();
        let request = format!("{line} HTTP/1.1\r\n{rest}{too_many}\r\n");
        let crowded = raw_exchange(app.addr, request.as_bytes(), wait).await;
        assert_json_refusal(&crowded, 431, "headers_too_large");
    }
    // A head over the limit (hyper's own, on the other routes, is looser).
    let huge = format!(
        "GET /api/sse?userId=u1 HTTP/1.1\r\nx-filler: {}\r\n\r\n",
        "a".repeat(420_000)
    );
    let oversized = raw_exchange(app.addr, huge.as_bytes(), wait).await;
    assert_json_refusal(&oversized, 431, "headers_too_large");
    // hyper answers a bad request after a kept-alive HTTP/1.0 one in HTTP/1.0.
    let second = raw_exchange(
        app.addr,
        b"GET /healthz HTTP/1.0\r\nConnection: keep-alive\r\n\r\nGET /healthz HTTP/1.0\r\nbad name: v\r\n\r\n",
        wait,
    )
    .await;
    let refusal = &second[second.find("HTTP/1.1 400").expect(&second)..];
    assert_json_refusal(refusal, 400, "bad_request");
    // A refusal from the router is framed on the stream path too.
    let refused = raw_exchange(
        app.addr,
        b"GET /api/sse?lastEventId=x HTTP/1.1\r\n\r\n",
        wait,
    )
    .await;
    assert_json_refusal(&refused, 400, "invalid_parameter");

    let mut stream = app.subscribe("userId=u1").await;
    stream.connected().await;
    assert_eq!(app.get_json("/api/sse/stats").await.0, StatusCode::OK);
}
