//! Several instances on one Postgres database: live delivery through the bus, a lost
//! listener, closes racing publishes, and SQLite's single instance.

use std::time::Duration;

use serde_json::{Value, json};
use sqlx::{Connection, Executor};

use crate::helpers::{
    PATIENCE, Subscriber, TestApp, TestDb, eventually, spawn_app, spawn_app_with,
};

fn id(published: &Value) -> i64 {
    published["eventId"].as_i64().unwrap()
}

async fn instances(app: &TestApp) -> i64 {
    app.get_json("/api/sse/stats").await.1["instances"]
        .as_i64()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_published_on_one_instance_reaches_streams_on_the_other_at_once() {
    let db = TestDb::postgres().await;
    let a = spawn_app(&db).await;
    let b = spawn_app(&db).await;
    let mut on_a = a.subscribe("userId=u").await;
    let mut on_b = b.subscribe("userId=u").await;
    on_a.connected().await;
    on_b.connected().await;

    for (from, label) in [(&b, "from b"), (&a, "from a")] {
        let started = tokio::time::Instant::now();
        let sent = id(&from
            .notify(json!({ "userId": "u" }), "n", json!(label))
            .await);
        for stream in [&mut on_a, &mut on_b] {
            assert_eq!(stream.take_stored(1).await, [(sent, json!(label))]);
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    // Nothing twice: the next event on each stream is the next one published.
    let marker = id(&a.broadcast("n", json!("marker")).await);
    assert_eq!(on_a.take_stored(1).await, [(marker, json!("marker"))]);
    assert_eq!(on_b.take_stored(1).await, [(marker, json!("marker"))]);
    // Each instance counts what reached its own stream, its own events and the other's.
    for (app, name) in [(&a, "a"), (&b, "b")] {
        let metrics = app.metrics().await;
        assert!(
            metrics.contains("nomey_sse_events_written_total 3\n"),
            "{name}: {metrics}"
        );
    }
    a.stop().await;
    b.stop().await;
}

/// Reads `count` stored events and checks they come in increasing id order.
async fn in_order(stream: &mut Subscriber, count: usize) -> Vec<i64> {
    let ids: Vec<i64> = stream
        .take_stored(count)
        .await
        .into_iter()
        .map(|(id, _)| id)
        .collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "out of order: {ids:?}");
    ids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_publishers_on_both_instances_every_stream_gets_every_event_once_in_order() {
    let db = TestDb::postgres().await;
    let a = spawn_app(&db).await;
    let b = spawn_app(&db).await;
    let mut streams = Vec::new();
    for app in [&a, &b, &a, &b] {
        let mut stream = app.subscribe("userId=many").await;
        stream.connected().await;
        streams.push(stream);
    }
    let publishers: Vec<_> = (0..4)
        .map(|p| {
            let (url, http) = (
                if p % 2 == 0 { a.url("") } else { b.url("") },
                a.http.clone(),
            );
            tokio::spawn(async move {
                let mut ids = Vec::new();
                for n in 0..25 {
                    let body = json!({ "filter": { "userId": "many" }, "event": "n", "data": n });
                    let response = http
                        .post(format!("{url}/api/sse/notify"))
                        .json(&body)
                        .send()
                        .await
                        .unwrap();
                    ids.push(id(&response.json().await.unwrap()));
                }
                ids
            })
        })
        .collect();
    let mut published = Vec::new();
    for publisher in publishers {
        published.extend(publisher.await.unwrap());
    }
    published.sort();
    for stream in &mut streams {
        assert_eq!(in_order(stream, published.len()).await, published);
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_listener_reconnects_and_catches_up_with_nothing_missing_or_twice() {
    let db = TestDb::postgres().await;
    let a = spawn_app(&db).await;
    let b = spawn_app(&db).await;
    let mut on_a = a.subscribe("userId=u").await;
    on_a.connected().await;
    let before = id(&b
        .notify(json!({ "userId": "u" }), "n", json!("before"))
        .await);
    assert_eq!(on_a.take_stored(1).await, [(before, json!("before"))]);

    // The listeners lose their connections and cannot get new ones for a while; the
    // instances' pools keep the connections they have.
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let mut admin = sqlx::PgConnection::connect(&crate::helpers::postgres_admin_url())
        .await
        .unwrap();
    for sql in [
        format!(r#"alter database "{name}" allow_connections false"#),
        format!(
            "select pg_terminate_backend(pid) from pg_stat_activity \
             where datname = '{name}' and query like 'LISTEN%'"
        ),
    ] {
        admin.execute(sql.as_str()).await.unwrap();
    }
    eventually("/readyz says the bus is down", || async {
        a.get_json("/readyz").await.1["error"]["code"] == "bus_unavailable"
    })
    .await;
    let mut published = Vec::new();
    for n in 0..5 {
        published.push(id(&b.notify(json!({ "userId": "u" }), "n", json!(n)).await));
    }
    admin
        .execute(format!(r#"alter database "{name}" allow_connections true"#).as_str())
        .await
        .unwrap();

    // Nothing is published after this: only the catch-up after listening again delivers.
    assert_eq!(in_order(&mut on_a, published.len()).await, published);
    eventually("/readyz is 200 again", || async {
        a.get_json("/readyz").await.0 == reqwest::StatusCode::OK
    })
    .await;
    let marker = id(&b.broadcast("n", json!("marker")).await);
    assert_eq!(
        on_a.take_stored(1).await,
        [(marker, json!("marker"))],
        "nothing twice"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_closing_on_one_instance_while_the_other_publishes_loses_nothing() {
    let db = TestDb::postgres().await;
    let a = spawn_app(&db).await;
    let b = spawn_app(&db).await;
    eventually("both instances see each other", || async {
        instances(&b).await == 2
    })
    .await;
    let mut published = Vec::new();
    for round in 0..10 {
        let mut stream = a.subscribe("userId=racer").await;
        stream.connected().await;
        // Let the session be saved, so that B sees the user as connected on A.
        if round == 0 {
            eventually("B sees the stream on A", || async {
                b.get_json("/api/sse/clients?userId=racer").await.1["clients"]
                    .as_array()
                    .is_some_and(|c| !c.is_empty())
            })
            .await;
        }
        drop(stream);
        published.push(id(&b
            .notify(json!({ "userId": "racer" }), "n", json!(round))
            .await));
    }
    // The user's next stream, on either instance, gets each of them once.
    let mut fresh = b.subscribe("userId=racer").await;
    fresh.connected().await;
    assert_eq!(in_order(&mut fresh, published.len()).await, published);
    let marker = id(&b
        .notify(json!({ "userId": "racer" }), "n", json!("marker"))
        .await);
    assert_eq!(fresh.take_stored(1).await, [(marker, json!("marker"))]);
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
async fn a_second_instance_on_the_same_sqlite_file_is_refused_with_a_clear_message() {
    let db = TestDb::sqlite().await;
    let first = spawn_app(&db).await;
    let config = crate::helpers::test_config(&db.url, &[]);
    let error = nomey_sse::Application::build(config, db.store().await)
        .await
        .err()
        .expect("the second start is refused");
    let message = format!("{error:#}");
    assert!(message.contains("Postgres"), "{message}");
    first.stop().await;
    // Once the first has stopped, the file is free again.
    let again = spawn_app_with(&db, &[]).await;
    tokio::time::timeout(PATIENCE, again.stop()).await.unwrap();
}
