//! Subscriber tokens and the publish key, over HTTP.

use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::helpers::{TestDb, error_code, spawn_app_with};

const SECRET: &str = "jwt-secret-for-tests";

fn token_with(alg: Algorithm, key: &str, claims: Value) -> String {
    encode(
        &Header::new(alg),
        &claims,
        &EncodingKey::from_secret(key.as_bytes()),
    )
    .unwrap()
}

fn exp_in(secs: i64) -> i64 {
    nomey_sse::event::now_millis() / 1000 + secs
}

fn token(sub: &str, sid: Option<&str>) -> String {
    let mut claims = json!({ "sub": sub, "exp": exp_in(600) });
    if let Some(sid) = sid {
        claims["sid"] = json!(sid);
    }
    token_with(Algorithm::HS256, SECRET, claims)
}

#[tokio::test]
async fn a_token_by_query_header_or_cookie_opens_its_users_stream() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("SSE_JWT_SECRET", SECRET)]).await;
    let alice = token("alice", None);
    let by_query = app.subscribe(&format!("token={alice}")).await;
    let by_header = app
        .subscribe_with("", &[("Authorization", &format!("Bearer {alice}"))])
        .await;
    let by_cookie = app
        .subscribe_with(
            "userId=alice",
            &[("Cookie", &format!("theme=dark; sse_token={alice}"))],
        )
        .await;
    let pinned = app
        .subscribe(&format!("token={}", token("bob", Some("tab-1"))))
        .await;
    let mut streams = [by_query, by_header, by_cookie];
    for stream in &mut streams {
        let connected = stream.connected().await;
        assert_eq!(connected["userId"], "alice");
    }
    let mut pinned = pinned;
    let connected = pinned.connected().await;
    assert_eq!(
        (
            connected["userId"].as_str(),
            connected["sessionId"].as_str()
        ),
        (Some("bob"), Some("tab-1"))
    );

    let sent = app
        .notify(json!({ "userId": "alice" }), "n", json!("for alice"))
        .await;
    assert_eq!(sent["delivered"], 3);
    for stream in &mut streams {
        assert_eq!(stream.take_stored(1).await[0].1, json!("for alice"));
    }
    app.stop().await;
}

#[tokio::test]
async fn streams_without_a_valid_token_or_for_another_user_are_refused() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("SSE_JWT_SECRET", SECRET)]).await;
    let unauthorized = [
        String::new(),
        "token=garbage".into(),
        format!(
            "token={}",
            token_with(
                Algorithm::HS256,
                "wrong",
                json!({ "sub": "a", "exp": exp_in(600) })
            )
        ),
        format!(
            "token={}",
            token_with(
                Algorithm::HS256,
                SECRET,
                json!({ "sub": "a", "exp": exp_in(-3600) })
            )
        ),
        format!(
            "token={}",
            token_with(
                Algorithm::HS512,
                SECRET,
                json!({ "sub": "a", "exp": exp_in(600) })
            )
        ),
        format!(
            "token={}",
            token_with(Algorithm::HS256, SECRET, json!({ "sub": "a" }))
        ),
        // alg "none": header {"alg":"none","typ":"JWT"}, no signature.
        "token=eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJzdWIiOiJhIiwiZXhwIjo5OTk5OTk5OTk5fQ.".into(),
    ];
    for query in unauthorized {
        let response = app.open_stream(&query, &[]).await;
        assert_eq!(
            error_code(response, StatusCode::UNAUTHORIZED).await,
            "unauthorized",
            "{query}"
        );
    }
    let alice = token("alice", Some("s1"));
    for query in [
        format!("token={alice}&userId=bob"),
        format!("token={alice}&sessionId=s2"),
    ] {
        let response = app.open_stream(&query, &[]).await;
        assert_eq!(
            error_code(response, StatusCode::FORBIDDEN).await,
            "forbidden",
            "{query}"
        );
    }
    // The token must obey the size limit before anything reads it.
    let huge = format!("token={}", "x".repeat(5000));
    assert_eq!(
        error_code(app.open_stream(&huge, &[]).await, StatusCode::BAD_REQUEST).await,
        "invalid_parameter"
    );
    // Nothing of the above counts as a connection.
    assert_eq!(
        app.get_json("/api/sse/stats").await.1["totalConnections"],
        0
    );
    app.stop().await;
}

#[tokio::test]
async fn with_both_secrets_subscribers_use_tokens_and_publishers_the_key() {
    let db = TestDb::sqlite().await;
    let key = "publish-key";
    let app = spawn_app_with(&db, &[("SSE_JWT_SECRET", SECRET), ("SSE_PUBLISH_KEY", key)]).await;
    let mut stream = app
        .subscribe(&format!("token={}", token("carol", None)))
        .await;
    stream.connected().await;

    let body = json!({ "filter": { "userId": "carol" }, "event": "n", "data": 1 });
    let url = app.url("/api/sse/notify");
    let refused = app.http.post(&url).json(&body).send().await.unwrap();
    assert_eq!(
        error_code(refused, StatusCode::UNAUTHORIZED).await,
        "unauthorized"
    );
    // A subscriber token is no publish key.
    let with_token = app
        .http
        .post(&url)
        .bearer_auth(token("carol", None))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(with_token.status(), StatusCode::UNAUTHORIZED);
    let accepted = app
        .http
        .post(&url)
        .bearer_auth(key)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), StatusCode::ACCEPTED);
    assert_eq!(stream.take_stored(1).await[0].1, json!(1));
    app.stop().await;
}

#[tokio::test]
async fn a_token_cookie_works_from_an_allowed_origin() {
    let db = TestDb::sqlite().await;
    let origin = "https://app.example";
    let app = spawn_app_with(&db, &[("SSE_JWT_SECRET", SECRET), ("CORS_ORIGINS", origin)]).await;
    let cookie = format!("sse_token={}", token("dave", None));
    let response = app
        .open_stream("", &[("Origin", origin), ("Cookie", &cookie)])
        .await;
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers["access-control-allow-origin"], origin);
    assert_eq!(headers["access-control-allow-credentials"], "true");
    app.stop().await;
}
