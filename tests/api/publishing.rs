//! `POST /api/sse/notify`, `/broadcast`, `/test` and the library API behind them.

use reqwest::StatusCode;
use serde::Serialize;
use serde_json::{Value, json};

use crate::helpers::{Subscriber, TestDb, error_code, spawn_app};

/// Reads events until the `end` marker; returns the `data` of the others.
async fn received_until_end(stream: &mut Subscriber) -> Vec<Value> {
    let mut out = Vec::new();
    loop {
        let event = stream.next_event().await;
        if event.event == "end" {
            return out;
        }
        out.push(serde_json::from_str(&event.data).unwrap());
    }
}

#[tokio::test]
async fn a_broadcast_reaches_every_client() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut streams = Vec::new();
    for user in ["a", "b", "c"] {
        let mut stream = app.subscribe(&format!("userId={user}")).await;
        stream.connected().await;
        streams.push(stream);
    }

    let published = app.broadcast("alert", json!({ "text": "to all" })).await;

    assert_eq!(published["delivered"], 3);
    assert_eq!(published["pending"], false);
    for stream in &mut streams {
        let event = stream.next_event().await;
        assert_eq!(event.event, "alert");
        assert_eq!(event.data, r#"{"text":"to all"}"#);
        assert_eq!(event.id, published["eventId"].to_string());
    }
    app.stop().await;
}

#[tokio::test]
async fn a_notification_for_one_user_reaches_only_that_user() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut alice = app.subscribe("userId=alice").await;
    alice.connected().await;
    let mut bob = app.subscribe("userId=bob").await;
    bob.connected().await;

    let published = app
        .notify(
            json!({ "userId": "alice" }),
            "notification",
            json!({ "message": "hi" }),
        )
        .await;
    app.broadcast("end", json!(null)).await;

    assert_eq!(published["delivered"], 1);
    assert_eq!(
        received_until_end(&mut alice).await,
        [json!({ "message": "hi" })]
    );
    assert!(received_until_end(&mut bob).await.is_empty());
    app.stop().await;
}

#[tokio::test]
async fn every_filter_kind_and_a_combined_filter_select_their_clients() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut a = app.subscribe("userId=u1&sessionId=s1&role=admin").await;
    let a_id = a.connected().await["clientId"].as_str().unwrap().to_owned();
    let mut b = app.subscribe("userId=u1&sessionId=s2&role=user").await;
    b.connected().await;
    let mut c = app.subscribe("userId=u2&sessionId=s3&role=admin").await;
    let c_id = c.connected().await["clientId"].as_str().unwrap().to_owned();

    let cases = [
        (json!({ "userIds": ["u1", "u2"] }), 3),
        (json!({ "sessionId": "s2" }), 1),
        (json!({ "clientIds": [c_id] }), 1),
        (json!({ "metadata": { "role": "admin" } }), 2),
        (
            json!({ "userId": "u1", "metadata": { "role": "admin" } }),
            1,
        ),
        (
            json!({ "userIds": ["u1"], "sessionId": "s1", "clientIds": [a_id] }),
            1,
        ),
    ];
    for (i, (filter, expected)) in cases.iter().enumerate() {
        let published = app.notify(filter.clone(), "n", json!(i)).await;
        assert_eq!(published["delivered"], *expected, "filter {filter}");
    }
    app.broadcast("end", json!(null)).await;

    assert_eq!(
        received_until_end(&mut a).await,
        [json!(0), json!(3), json!(4), json!(5)]
    );
    assert_eq!(received_until_end(&mut b).await, [json!(0), json!(1)]);
    assert_eq!(
        received_until_end(&mut c).await,
        [json!(0), json!(2), json!(3)]
    );
    app.stop().await;
}

#[tokio::test]
async fn the_test_route_sends_a_notification_to_the_user() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut stream = app.subscribe("userId=u1").await;
    stream.connected().await;

    let response = app
        .post(
            "/api/sse/test",
            json!({ "userId": "u1", "message": "Test notification" }),
        )
        .await;

    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["delivered"], 1);
    let event = stream.next_event().await;
    assert_eq!(event.event, "notification");
    assert_eq!(event.id, body["eventId"].to_string());
    let data: Value = serde_json::from_str(&event.data).unwrap();
    assert_eq!(data["message"], "Test notification");
    assert!(data["timestamp"].as_str().unwrap().ends_with('Z'));
    app.stop().await;
}

#[tokio::test]
async fn every_bad_publish_gets_a_json_error_and_the_server_keeps_serving() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let big = "z".repeat(64 * 1024);
    let cases = [
        (
            "/api/sse/notify",
            json!({ "filter": {}, "event": "n", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "filter": { "userIds": [] }, "event": "n", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "filter": { "user": "u1" }, "event": "n", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "filter": { "userId": 7 }, "event": "n", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "filter": { "clientIds": ["x"] }, "event": "n", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "filter": { "metadata": { "a": 1 } }, "event": "n", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "event": "n", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "filter": { "userId": "u" }, "event": "bad name", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "filter": { "userId": "u" }, "event": "", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "filter": { "userId": "u" }, "event": "n" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/notify",
            json!({ "filter": { "userId": "u" }, "event": "n", "data": big }),
            StatusCode::PAYLOAD_TOO_LARGE,
        ),
        (
            "/api/sse/broadcast",
            json!({ "event": "x\nid: 9", "data": 1 }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/broadcast",
            json!({ "event": "n", "data": 1, "extra": true }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/test",
            json!({ "message": "no user" }),
            StatusCode::BAD_REQUEST,
        ),
        (
            "/api/sse/test",
            json!({ "userId": "" }),
            StatusCode::BAD_REQUEST,
        ),
    ];
    for (path, body, status) in cases {
        let response = app.post(path, body.clone()).await;
        assert_eq!(response.status(), status, "{path} {body}");
        error_code(response, status).await;
    }
    // The message says which is wrong: the JSON, or its shape.
    for (body, says) in [
        ("{not json", "could not be read as JSON"),
        ("{\"event\": \"n\", \"data\": 1e999}", "number out of range"),
        ("[1]", "must be a JSON object"),
    ] {
        let response = app.post_text("/api/sse/broadcast", body).await;
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "invalid_body", "{body}");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.contains(says), "{body}: {message}");
    }

    // Nothing was stored by the refusals, and publishing still works.
    let published = app.broadcast("ok", json!(true)).await;
    assert_eq!(published["eventId"], 1);
    app.stop().await;
}

#[derive(Serialize)]
struct Order {
    id: u32,
    status: &'static str,
}

#[tokio::test]
async fn the_library_api_sends_typed_data_to_users_metadata_and_everyone() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut stream = app.subscribe("userId=u1&plan=pro").await;
    stream.connected().await;
    let events = &app.events;

    let to_user = events
        .notify_user(
            "u1",
            "order",
            &Order {
                id: 1,
                status: "paid",
            },
        )
        .await
        .unwrap();
    let to_meta = events
        .notify_with_metadata(
            [("plan", "pro")],
            "order",
            &Order {
                id: 2,
                status: "sent",
            },
        )
        .await
        .unwrap();
    let to_none = events
        .notify_with_metadata([("plan", "free")], "order", &Order { id: 3, status: "x" })
        .await
        .unwrap();
    let to_all = events
        .broadcast(
            "order",
            &Order {
                id: 4,
                status: "all",
            },
        )
        .await
        .unwrap();

    assert_eq!(
        (
            to_user.delivered,
            to_meta.delivered,
            to_none.delivered,
            to_all.delivered
        ),
        (1, 1, 0, 1)
    );
    assert!(to_user.event_id < to_meta.event_id && to_meta.event_id < to_all.event_id);
    let received = stream.take_stored(3).await;
    assert_eq!(
        received[0],
        (to_user.event_id, json!({ "id": 1, "status": "paid" }))
    );
    assert_eq!(
        received[1],
        (to_meta.event_id, json!({ "id": 2, "status": "sent" }))
    );
    assert_eq!(
        received[2],
        (to_all.event_id, json!({ "id": 4, "status": "all" }))
    );
    assert!(
        events
            .notify(nomey_sse::Filter::default(), "x", &1)
            .await
            .is_err(),
        "an empty filter is refused"
    );
    app.stop().await;
}

#[tokio::test]
async fn a_published_double_arrives_with_exactly_its_value() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut stream = app.subscribe("userId=f").await;
    stream.connected().await;
    // Doubles spread over the whole range, written in their shortest form: a parser
    // that is off by one unit in the last place for some of them changes them.
    let mut bits = 0x9e37_79b9_7f4a_7c15_u64;
    let sent: Vec<f64> = std::iter::from_fn(|| {
        bits = bits.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
        Some(f64::from_bits(bits))
    })
    .filter(|x| x.is_finite())
    .take(2000)
    .collect();
    let list: Vec<String> = sent.iter().map(|x| format!("{x:e}")).collect();
    let body = format!(r#"{{"event": "f", "data": [{}]}}"#, list.join(","));
    let response = app.post_text("/api/sse/broadcast", body).await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let event = stream.next_event().await;
    let text = event.data.trim_start_matches('[').trim_end_matches(']');
    let received: Vec<f64> = text.split(',').map(|x| x.parse().unwrap()).collect();
    assert_eq!(received.len(), sent.len());
    let changed = sent
        .iter()
        .zip(&received)
        .filter(|(a, b)| a.to_bits() != b.to_bits())
        .count();
    assert_eq!(changed, 0, "{changed} of {} doubles changed", sent.len());
    app.stop().await;
}
