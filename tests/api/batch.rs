//! `POST /api/sse/batch`: many events in one request, all or none.

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{helpers::spawn_app, on_both_backends};

on_both_backends! {
    async fn a_batch_is_stored_in_order_and_each_event_reaches_its_clients(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        let mut alice = app.subscribe("userId=alice").await;
        let mut bob = app.subscribe("userId=bob").await;
        alice.connected().await;
        bob.connected().await;

        let response = app.post("/api/sse/batch", json!({ "events": [
            { "filter": { "userId": "alice" }, "event": "n", "data": { "n": 1 } },
            { "event": "alert", "data": "everyone" },
            { "filter": { "userIds": ["bob", "carol"] }, "event": "n", "data": { "n": 2 } },
        ]})).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        let body: Value = response.json().await.unwrap();
        let results = body["results"].as_array().unwrap();
        let ids: Vec<i64> = results.iter().map(|r| r["eventId"].as_i64().unwrap()).collect();
        assert_eq!(ids.len(), 3);
        assert!(ids.windows(2).all(|w| w[1] == w[0] + 1), "consecutive: {ids:?}");
        let delivered: Vec<i64> = results.iter().map(|r| r["delivered"].as_i64().unwrap()).collect();
        assert_eq!(delivered, [1, 2, 1]);
        let pending: Vec<bool> = results.iter().map(|r| r["pending"].as_bool().unwrap()).collect();
        assert_eq!(pending, [false, false, true], "carol has no stream");

        assert_eq!(alice.take_stored(2).await, [(ids[0], json!({ "n": 1 })), (ids[1], json!("everyone"))]);
        assert_eq!(bob.take_stored(2).await, [(ids[1], json!("everyone")), (ids[2], json!({ "n": 2 }))]);
        app.stop().await;
    }

    async fn one_bad_event_refuses_the_whole_batch_naming_it_and_stores_nothing(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        let good = json!({ "filter": { "userId": "u" }, "event": "n", "data": 1 });
        let refused = [
            (json!({ "events": [good, { "event": "bad name", "data": 1 }] }), "events[1]"),
            (json!({ "events": [good, good, { "filter": {}, "event": "n", "data": 1 }] }), "events[2]"),
            (json!({ "events": [good, { "filter": null, "event": "n", "data": 1 }] }), "events[1].filter: leave it out"),
            (json!({ "events": [good, { "filter": null, "event": "n", "data": 1, "extra": 1 }] }), "events[1].filter: leave it out"),
            (json!({ "events": [good, ["n", 1]] }), "events[1]"),
            (json!({ "events": [good, { "event": "n", "data": 1, "extra": true }] }), "events[1]"),
            (json!({ "events": [] }), "events"),
            (json!({ "events": vec![good.clone(); 1001] }), "events"),
        ];
        for (body, named) in refused {
            let response = app.post("/api/sse/batch", body).await;
            assert_eq!(response.status(), StatusCode::BAD_REQUEST);
            let error: Value = response.json().await.unwrap();
            let message = error["error"]["message"].as_str().unwrap();
            assert!(message.contains(named), "{message}");
        }
        let too_large = json!({ "events": [good, { "event": "n", "data": "x".repeat(70_000) }] });
        let response = app.post("/api/sse/batch", too_large).await;
        assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
        let error: Value = response.json().await.unwrap();
        assert_eq!(error["error"]["code"], "payload_too_large");
        let message = error["error"]["message"].as_str().unwrap();
        assert!(message.starts_with("events[1]: data is larger than"), "{message}");

        // Nothing was stored: the next event is the first.
        let first = app.notify(json!({ "userId": "u" }), "n", json!("first")).await;
        assert_eq!(first["eventId"], 1);
        app.stop().await;
    }
}

#[tokio::test]
async fn a_batch_of_nearly_8_mib_is_taken_whole() {
    let db = crate::helpers::TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let big = "x".repeat(60_000);
    let events: Vec<Value> = (0..130)
        .map(|n| json!({ "filter": { "userId": format!("u{n}") }, "event": "n", "data": big }))
        .collect();
    let response = app
        .post("/api/sse/batch", json!({ "events": events }))
        .await;
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["results"].as_array().unwrap().len(), 130);
    app.stop().await;
}

#[tokio::test]
async fn a_repeated_key_keeps_its_last_value_in_a_body_and_in_a_batch_event() {
    let db = crate::helpers::TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut alice = app.subscribe("userId=alice").await;
    alice.connected().await;
    let notify = r#"{"filter":{"userId":"alice"},"event":"x","event":"n","data":1,"data":2}"#;
    assert_eq!(
        app.post_text("/api/sse/notify", notify).await.status(),
        StatusCode::ACCEPTED
    );
    let batch = r#"{"events":[{"filter":{"userId":"alice"},"event":"x","data":3,"event":"m"}]}"#;
    assert_eq!(
        app.post_text("/api/sse/batch", batch).await.status(),
        StatusCode::ACCEPTED
    );

    let first = alice.next_event().await;
    assert_eq!((first.event.as_str(), first.data.as_str()), ("n", "2"));
    let second = alice.next_event().await;
    assert_eq!((second.event.as_str(), second.data.as_str()), ("m", "3"));
    app.stop().await;
}
