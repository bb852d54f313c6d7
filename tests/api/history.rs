//! Replay and pending delivery at their edges: unreadable targets, bounded replay, a
//! pending event taken once, a catch-up that cannot read the log.

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, Executor};

use crate::{
    helpers::{TestDb, postgres_admin_url, spawn_app, spawn_app_at, spawn_app_with},
    on_both_backends,
};

fn id(published: &Value) -> i64 {
    published["eventId"].as_i64().unwrap()
}

/// Stores an event the way a newer version might: its filter has a field this version
/// does not know. Optionally leaves it pending for `pending_user`.
async fn store_unreadable_event(db: &TestDb, audience: &str, pending_user: Option<&str>) -> i64 {
    let mut conn = db.connect().await;
    let id: i64 = sqlx::query_scalar(
        "update event_counter set last_event_id = last_event_id + 1 returning last_event_id",
    )
    .fetch_one(&mut conn)
    .await
    .unwrap();
    sqlx::query(
        "insert into event (event_id, kind, data, filter, created_at, audience) values ($1, 'n', '\"secret\"', $2, $3, $4)",
    )
    .bind(id)
    .bind(r#"{"userId":"u","fromANewerVersion":true}"#)
    .bind(nomey_sse::event::now_millis())
    .bind(audience)
    .execute(&mut conn)
    .await
    .unwrap();
    if let Some(user) = pending_user {
        sqlx::query("insert into pending (user_id, event_id) values ($1, $2)")
            .bind(user)
            .bind(id)
            .execute(&mut conn)
            .await
            .unwrap();
    }
    id
}

fn metric(text: &str, name: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {name} in /metrics"))
}

on_both_backends! {
    async fn an_event_whose_filter_cannot_be_read_reaches_no_one(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        let mut named = app.subscribe("userId=u").await;
        let mut other = app.subscribe("userId=v").await;
        named.connected().await;
        other.connected().await;

        // Caught up from the log by the next publish of this instance.
        store_unreadable_event(&db, "u:u", None).await;
        let after = id(&app.notify(json!({ "userId": "u" }), "n", json!("after")).await);
        let everyone = id(&app.broadcast("n", json!("all")).await);
        assert_eq!(named.take_stored(2).await, [(after, json!("after")), (everyone, json!("all"))]);
        assert_eq!(other.take_stored(1).await, [(everyone, json!("all"))]);

        // Nor in a replay.
        let mut replay = app.subscribe("userId=u&lastEventId=0").await;
        replay.connected().await;
        assert_eq!(replay.take_stored(2).await, [(after, json!("after")), (everyone, json!("all"))]);

        // Nor as a pending notification.
        store_unreadable_event(&db, "u:w", Some("w")).await;
        let mut fresh = app.subscribe("userId=w").await;
        fresh.connected().await;
        let marker = id(&app.notify(json!({ "userId": "w" }), "n", json!("marker")).await);
        assert_eq!(fresh.take_stored(1).await, [(marker, json!("marker"))]);

        assert_eq!(metric(&app.metrics().await, "nomey_sse_unreadable_filters_total"), 3);
        assert_eq!(app.get_json("/healthz").await.0, StatusCode::OK);
        app.stop().await;
    }

    async fn a_client_further_behind_than_max_replay_events_gets_the_most_recent_and_a_gap(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app_with(&db, &[("MAX_REPLAY_EVENTS", "5")]).await;
        let mut for_u = Vec::new();
        for n in 0..8 {
            for_u.push((id(&app.notify(json!({ "userId": "u" }), "n", json!(n)).await), json!(n)));
            app.notify(json!({ "userId": "other" }), "n", json!("private")).await;
            app.notify(json!({ "userIds": ["other", "third"] }), "n", json!("private")).await;
            if n % 4 == 0 {
                for_u.push((id(&app.broadcast("n", json!("all")).await), json!("all")));
            }
        }
        assert_eq!(for_u.len(), 10);
        let recent = for_u[5..].to_vec();

        let mut behind = app.subscribe("userId=u&lastEventId=0").await;
        assert_eq!(behind.connected().await["historyGap"], true);
        assert_eq!(behind.take_stored(5).await, recent, "the five most recent, oldest first");
        let live = id(&app.notify(json!({ "userId": "u" }), "n", json!("live")).await);
        assert_eq!(behind.take_stored(1).await, [(live, json!("live"))]);

        // Exactly five due: no gap.
        for_u.push((live, json!("live")));
        let recent = for_u[6..].to_vec();
        let mut caught_up = app.subscribe(&format!("userId=u&lastEventId={}", recent[0].0 - 1)).await;
        assert_eq!(caught_up.connected().await["historyGap"], false);
        assert_eq!(caught_up.take_stored(5).await, recent);

        // An anonymous client can match only the broadcasts.
        let mut anonymous = app.subscribe("lastEventId=0").await;
        assert_eq!(anonymous.connected().await["historyGap"], false);
        let broadcasts: Vec<_> = for_u.iter().filter(|(_, d)| d == "all").cloned().collect();
        assert_eq!(anonymous.take_stored(2).await, broadcasts);
        app.stop().await;
    }

    async fn a_pending_event_goes_to_a_users_first_fresh_stream_only(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        let mut pending = Vec::new();
        for n in 0..3 {
            pending.push((id(&app.notify(json!({ "userId": "u" }), "n", json!(n)).await), json!(n)));
        }
        let mut first = app.subscribe("userId=u").await;
        first.connected().await;
        assert_eq!(first.take_stored(3).await, pending);

        // Opened before the settlement is saved: it must still not get them again.
        let mut second = app.subscribe("userId=u").await;
        second.connected().await;
        let marker = app.notify(json!({ "userId": "u" }), "n", json!("marker")).await;
        assert_eq!(marker["delivered"], 2);
        assert_eq!(second.take_stored(1).await, [(id(&marker), json!("marker"))]);
        assert_eq!(first.take_stored(1).await, [(id(&marker), json!("marker"))]);
        app.stop().await;
    }
}

#[tokio::test]
async fn a_user_past_max_streams_per_user_gets_429_with_retry_after() {
    let db = TestDb::sqlite().await;
    let app = spawn_app_with(&db, &[("MAX_STREAMS_PER_USER", "2")]).await;
    let mut open = vec![
        app.subscribe("userId=u").await,
        app.subscribe("userId=u").await,
    ];
    for stream in &mut open {
        stream.connected().await;
    }
    let refused = app.open_stream("userId=u", &[]).await;
    assert!(refused.headers().contains_key("retry-after"));
    assert_eq!(
        crate::helpers::error_code(refused, StatusCode::TOO_MANY_REQUESTS).await,
        "too_many_streams"
    );
    // Other users are not affected, and a freed place can be taken again.
    app.subscribe("userId=v").await.connected().await;
    drop(open.pop());
    crate::helpers::eventually("the closed stream frees its place", || async {
        app.open_stream("userId=u", &[]).await.status() == StatusCode::OK
    })
    .await;
    app.stop().await;
}

#[tokio::test]
async fn a_catch_up_that_cannot_read_the_log_cuts_streams_off_so_that_they_resume_without_loss() {
    let db = TestDb::postgres().await;
    let publisher = spawn_app(&db).await;
    // A role that may write events but, for a while, not read them back.
    let role = format!("nomey_limited_{}", uuid::Uuid::new_v4().simple());
    let mut conn = db.connect().await;
    for sql in [
        format!("create role {role} login password 'limited'"),
        format!("grant select, insert, update, delete on all tables in schema public to {role}"),
        // The migrator checks its table with `create table if not exists`.
        format!("grant create on schema public to {role}"),
    ] {
        conn.execute(sql.as_str()).await.unwrap();
    }
    let (scheme, rest) = db.url.split_once("://").unwrap();
    let host = rest.split_once('@').map_or(rest, |(_, host)| host);
    let limited = spawn_app_at(&format!("{scheme}://{role}:limited@{host}"), &[]).await;

    let mut stream = limited.subscribe("userId=u").await;
    stream.connected().await;
    let first = id(&limited
        .notify(json!({ "userId": "u" }), "n", json!("first"))
        .await);
    assert_eq!(stream.take_stored(1).await, [(first, json!("first"))]);

    conn.execute(format!("revoke select on event from {role}").as_str())
        .await
        .unwrap();
    let elsewhere = id(&publisher
        .notify(json!({ "userId": "u" }), "n", json!("elsewhere"))
        .await);
    let here = id(&limited
        .notify(json!({ "userId": "u" }), "n", json!("here"))
        .await);
    // It could not hand over `elsewhere`, so it must not go on as if it had.
    stream.expect_end().await;

    conn.execute(format!("grant select on event to {role}").as_str())
        .await
        .unwrap();
    let resumed = first.to_string();
    let mut again = limited
        .subscribe_with("userId=u", &[("Last-Event-ID", &resumed)])
        .await;
    again.connected().await;
    assert_eq!(
        again.take_stored(2).await,
        [(elsewhere, json!("elsewhere")), (here, json!("here"))]
    );
    assert_eq!(
        metric(
            &limited.metrics().await,
            "nomey_sse_clients_dropped_total{reason=\"behind\"}"
        ),
        1
    );

    drop(again);
    limited.stop().await;
    publisher.stop().await;
    conn.execute(format!("drop owned by {role}").as_str())
        .await
        .unwrap();
    drop(conn);
    let mut admin = sqlx::PgConnection::connect(&postgres_admin_url())
        .await
        .unwrap();
    admin
        .execute(format!("drop role {role}").as_str())
        .await
        .ok();
}
