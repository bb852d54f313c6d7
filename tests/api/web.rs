//! The embedded demo page and browser client: served as files, open without the publish key.

use reqwest::{StatusCode, header, redirect::Policy};

use crate::helpers::{TestDb, spawn_app_with};

#[tokio::test]
async fn home_client_script_and_root_redirect_are_served_without_the_publish_key() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("SSE_PUBLISH_KEY", "secret")]).await;
    let http = reqwest::Client::builder()
        .redirect(Policy::none())
        .build()
        .unwrap();

    let home = http.get(app.url("/home")).send().await.unwrap();
    assert_eq!(home.status(), StatusCode::OK);
    assert_eq!(
        home.headers()[header::CONTENT_TYPE],
        "text/html; charset=utf-8"
    );
    let html = home.text().await.unwrap();
    assert!(html.contains("/sse-client.js"), "the page loads the client");

    let script = http.get(app.url("/sse-client.js")).send().await.unwrap();
    assert_eq!(script.status(), StatusCode::OK);
    assert_eq!(
        script.headers()[header::CONTENT_TYPE],
        "text/javascript; charset=utf-8"
    );
    assert!(
        script
            .text()
            .await
            .unwrap()
            .contains("export function connect")
    );

    let root = http.get(app.url("/")).send().await.unwrap();
    assert_eq!(root.status(), StatusCode::SEE_OTHER);
    assert_eq!(root.headers()[header::LOCATION], "/home");

    let with_user = http.get(app.url("/?userId=alice")).send().await.unwrap();
    assert_eq!(with_user.status(), StatusCode::SEE_OTHER);
    assert_eq!(with_user.headers()[header::LOCATION], "/home?userId=alice");

    app.stop().await;
}
