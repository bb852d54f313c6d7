//! Monitoring routes, probes, errors for unknown routes, the publish key and CORS.

use reqwest::StatusCode;
use serde_json::json;

use crate::helpers::{TestDb, error_code, spawn_app, spawn_app_with};

#[tokio::test]
async fn clients_lists_open_streams_and_filters_them() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut a = app.subscribe("userId=u1&sessionId=s1&role=admin").await;
    let a_id = a.connected().await["clientId"].as_str().unwrap().to_owned();
    let mut b = app.subscribe("userId=u1&sessionId=s2").await;
    let b_id = b.connected().await["clientId"].as_str().unwrap().to_owned();
    let mut c = app.subscribe("userId=u2&sessionId=s3").await;
    let c_id = c.connected().await["clientId"].as_str().unwrap().to_owned();
    app.notify(json!({ "userId": "u1" }), "n", json!(1)).await;
    a.next_event().await;
    b.next_event().await;

    let (status, all) = app.get_json("/api/sse/clients").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(all["clients"].as_array().unwrap().len(), 3);
    assert_eq!(all["stats"]["totalClients"], 3);
    let by_id = |id: &str| {
        all["clients"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["clientId"] == id)
            .cloned()
            .unwrap()
    };
    let first = by_id(&a_id);
    assert_eq!(first["metadata"], json!({ "role": "admin" }));
    assert_eq!(first["eventsSent"], 1);
    assert!(first["lastEventAt"].is_string());
    assert!(first["connectedAt"].as_str().unwrap().ends_with('Z'));
    assert!(first["instanceId"].is_string());
    assert!(
        by_id(&c_id)["lastEventAt"].is_null(),
        "null until the client is sent an event"
    );

    let count = |body: &serde_json::Value| body["clients"].as_array().unwrap().len();
    assert_eq!(
        count(&app.get_json("/api/sse/clients?userId=u1").await.1),
        2
    );
    assert_eq!(
        count(&app.get_json("/api/sse/clients?sessionId=s3").await.1),
        1
    );
    assert_eq!(
        count(
            &app.get_json(&format!("/api/sse/clients?clientIds={a_id},{b_id}"))
                .await
                .1
        ),
        2
    );
    assert_eq!(
        count(
            &app.get_json(&format!("/api/sse/clients?clientIds={a_id}&userId=u2"))
                .await
                .1
        ),
        0
    );
    assert_eq!(
        count(&app.get_json("/api/sse/clients?unknown=1").await.1),
        3
    );
    let bad = app
        .http
        .get(app.url("/api/sse/clients?clientIds=nope"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(bad, StatusCode::BAD_REQUEST).await,
        "invalid_parameter"
    );
    app.stop().await;
}

#[tokio::test]
async fn stats_count_clients_connections_events_and_pending() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut one = app.subscribe("userId=u1").await;
    one.connected().await;
    let mut two = app.subscribe("userId=u1").await;
    two.connected().await;
    let mut three = app.subscribe("userId=u2").await;
    three.connected().await;
    app.notify(json!({ "userId": "u1" }), "n", json!(1)).await;
    app.notify(json!({ "userId": "nobody" }), "n", json!(2))
        .await;
    one.next_event().await;
    two.next_event().await;

    let (status, stats) = app.get_json("/api/sse/stats").await;

    assert_eq!(status, StatusCode::OK);
    assert_eq!(stats["totalClients"], 3);
    assert_eq!(stats["clientsByUser"], json!({ "u1": 2, "u2": 1 }));
    assert_eq!(stats["totalEventsSent"], 2);
    assert_eq!(stats["totalConnections"], 3);
    assert_eq!(stats["pendingNotifications"], 1);
    assert_eq!(stats["instances"], 1);
    assert!(stats["lastEventTimestamp"].as_str().unwrap().ends_with('Z'));
    assert!(stats["averageConnectionDurationMs"].as_i64().unwrap() >= 0);
    app.stop().await;
}

#[tokio::test]
async fn probes_and_metrics_answer() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let mut stream = app.subscribe("userId=u1").await;
    stream.connected().await;
    app.notify(json!({ "userId": "u1" }), "n", json!(1)).await;
    stream.next_event().await;

    assert_eq!(app.get_json("/healthz").await.0, StatusCode::OK);
    assert_eq!(app.get_json("/readyz").await.0, StatusCode::OK);
    let metrics = app.http.get(app.url("/metrics")).send().await.unwrap();
    assert!(
        metrics.headers()["content-type"]
            .to_str()
            .unwrap()
            .starts_with("text/plain")
    );
    let text = metrics.text().await.unwrap();
    for line in [
        "nomey_sse_open_streams 1",
        "nomey_sse_events_published_total 1",
        "nomey_sse_events_written_total 1",
        "# TYPE nomey_sse_clients_dropped_total counter",
        "# TYPE nomey_sse_publish_duration_seconds histogram",
        "nomey_sse_publish_duration_seconds_count 1",
        "nomey_sse_commit_batch_events_count 1",
        "nomey_sse_commit_batch_events_sum 1.0",
        "# TYPE nomey_sse_cutoff_queued_bytes histogram",
    ] {
        assert!(text.contains(line), "{line} in\n{text}");
    }
    app.stop().await;
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let db = TestDb::sqlite().await;
    let app = spawn_app(&db).await;
    let missing = app.http.get(app.url("/nope")).send().await.unwrap();
    assert_eq!(
        error_code(missing, StatusCode::NOT_FOUND).await,
        "not_found"
    );
    let wrong_method = app
        .http
        .delete(app.url("/api/sse/notify"))
        .send()
        .await
        .unwrap();
    assert_eq!(
        error_code(wrong_method, StatusCode::METHOD_NOT_ALLOWED).await,
        "method_not_allowed"
    );
    app.stop().await;
}

#[tokio::test]
async fn the_publish_key_guards_publishing_and_monitoring_but_not_streams() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("SSE_PUBLISH_KEY", "s3cret")]).await;
    let body = json!({ "event": "n", "data": 1 });

    for path in ["/api/sse/broadcast", "/api/sse/notify", "/api/sse/test"] {
        let none = app
            .http
            .post(app.url(path))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(none, StatusCode::UNAUTHORIZED).await,
            "unauthorized"
        );
    }
    for path in ["/api/sse/clients", "/api/sse/stats", "/metrics"] {
        let wrong = app
            .http
            .get(app.url(path))
            .bearer_auth("guess")
            .send()
            .await
            .unwrap();
        assert_eq!(
            error_code(wrong, StatusCode::UNAUTHORIZED).await,
            "unauthorized"
        );
        let right = app
            .http
            .get(app.url(path))
            .bearer_auth("s3cret")
            .send()
            .await
            .unwrap();
        assert_eq!(right.status(), StatusCode::OK, "{path}");
    }
    let right = app
        .http
        .post(app.url("/api/sse/broadcast"))
        .bearer_auth("s3cret")
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(right.status(), StatusCode::ACCEPTED);
    app.subscribe("userId=u1").await.connected().await;
    assert_eq!(app.get_json("/healthz").await.0, StatusCode::OK);
    app.stop().await;
}

#[tokio::test]
async fn cors_allows_the_configured_origins_with_the_contract_headers() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(
        &db,
        &[("CORS_ORIGINS", "https://app.example, https://other.example")],
    )
    .await;

    let preflight = app
        .http
        .request(reqwest::Method::OPTIONS, app.url("/api/sse"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "GET")
        .header(
            "access-control-request-headers",
            "last-event-id,authorization",
        )
        .send()
        .await
        .unwrap();

    assert!(preflight.status().is_success());
    let headers = preflight.headers();
    assert_eq!(
        headers["access-control-allow-origin"],
        "https://app.example"
    );
    assert_eq!(headers["access-control-allow-credentials"], "true");
    let allowed = headers["access-control-allow-headers"]
        .to_str()
        .unwrap()
        .to_ascii_lowercase();
    for name in ["authorization", "content-type", "last-event-id"] {
        assert!(allowed.contains(name), "{name} in {allowed}");
    }
    let stranger = app
        .http
        .get(app.url("/healthz"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(
        stranger
            .headers()
            .get("access-control-allow-origin")
            .is_none()
    );
    app.stop().await;
}

#[tokio::test]
async fn the_openapi_description_lists_every_route() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("SSE_PUBLISH_KEY", "k")]).await;
    let (status, doc) = app.get_json("/openapi.json").await;
    assert_eq!(status, StatusCode::OK, "open to all");
    assert_eq!(doc["openapi"], "3.1.0");
    for path in [
        "/api/sse",
        "/api/sse/notify",
        "/api/sse/broadcast",
        "/api/sse/test",
        "/api/sse/clients",
        "/api/sse/stats",
        "/metrics",
        "/healthz",
        "/readyz",
        "/home",
        "/sse-client.js",
    ] {
        assert!(doc["paths"][path].is_object(), "{path} is described");
    }
    app.stop().await;
}
