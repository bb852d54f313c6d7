//! The contract's delivery guarantees, through HTTP, on SQLite and on Postgres.

use std::time::Duration;

use reqwest::StatusCode;
use serde_json::{Value, json};

use crate::{
    helpers::{PATIENCE, TestApp, eventually, spawn_app, spawn_app_with, stuck_stream},
    on_both_backends,
};

async fn stat(app: &TestApp, name: &str) -> i64 {
    app.get_json("/api/sse/stats").await.1[name]
        .as_i64()
        .unwrap()
}

fn id(published: &Value) -> i64 {
    published["eventId"].as_i64().unwrap()
}

on_both_backends! {
    async fn pending_notifications_reach_a_user_who_connects_later_once_and_in_order(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        let mut published = Vec::new();
        for n in 0..3 {
            let p = app.notify(json!({ "userId": "late" }), "n", json!(n)).await;
            assert_eq!(p["pending"], true);
            assert_eq!(p["delivered"], 0);
            published.push(id(&p));
        }
        app.broadcast("other", json!("not pending")).await;

        let mut stream = app.subscribe("userId=late").await;
        stream.connected().await;
        let received = stream.take_stored(3).await;
        let live = app.notify(json!({ "userId": "late" }), "n", json!("live")).await;
        assert_eq!(live["pending"], false);

        assert_eq!(received, published.iter().enumerate().map(|(n, id)| (*id, json!(n))).collect::<Vec<_>>());
        assert_eq!(stream.take_stored(1).await, [(id(&live), json!("live"))], "then live, with no repeat");
        eventually("the pending rows are settled", || async { stat(&app, "pendingNotifications").await == 0 }).await;

        // A second, fresh stream of the same user gets nothing again.
        let mut again = app.subscribe("userId=late").await;
        again.connected().await;
        let marker = app.notify(json!({ "userId": "late" }), "n", json!("marker")).await;
        assert_eq!(again.take_stored(1).await, [(id(&marker), json!("marker"))]);
        app.stop().await;
    }

    async fn replay_by_header_and_by_query_sends_what_was_missed_and_nothing_for_others(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        let mut ids = Vec::new();
        for n in 0..5 {
            ids.push(id(&app.notify(json!({ "userId": "r" }), "n", json!(n)).await));
            app.notify(json!({ "userId": "someone-else" }), "n", json!("private")).await;
        }
        let broadcast = id(&app.broadcast("b", json!("all")).await);

        let after = ids[1].to_string();
        let mut by_header = app.subscribe_with("userId=r", &[("Last-Event-ID", &after)]).await;
        let mut by_query = app.subscribe(&format!("userId=r&lastEventId={after}")).await;
        // The header wins over a stale query value.
        let mut both = app.subscribe_with("userId=r&lastEventId=0", &[("Last-Event-ID", &after)]).await;

        let expected = vec![(ids[2], json!(2)), (ids[3], json!(3)), (ids[4], json!(4)), (broadcast, json!("all"))];
        for stream in [&mut by_header, &mut by_query, &mut both] {
            assert_eq!(stream.connected().await["historyGap"], false);
            assert_eq!(stream.take_stored(4).await, expected);
        }
        let live = id(&app.notify(json!({ "userId": "r" }), "n", json!("live")).await);
        for stream in [&mut by_header, &mut by_query, &mut both] {
            assert_eq!(stream.take_stored(1).await, [(live, json!("live"))]);
        }
        app.stop().await;
    }

    async fn replay_under_concurrent_publishers_misses_nothing_and_repeats_nothing(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        const PUBLISHERS: usize = 4;
        const EACH: usize = 40;
        let publishers: Vec<_> = (0..PUBLISHERS)
            .map(|p| {
                let http = app.http.clone();
                let url = app.url("/api/sse/notify");
                tokio::spawn(async move {
                    let mut mine = Vec::new();
                    for n in 0..EACH {
                        let target = if n % 3 == 0 { "bystander" } else { "reader" };
                        let body = json!({ "filter": { "userId": target }, "event": "n", "data": [p, n] });
                        let response = http.post(&url).json(&body).send().await.unwrap();
                        assert_eq!(response.status(), StatusCode::ACCEPTED);
                        let published: Value = response.json().await.unwrap();
                        if target == "reader" {
                            mine.push(id(&published));
                        }
                    }
                    mine
                })
            })
            .collect();

        // The reader keeps reconnecting from the last id it saw while they publish.
        let reader = {
            let app_url = app.url("");
            tokio::spawn(async move {
                let http = reqwest::Client::new();
                let mut seen: Vec<i64> = Vec::new();
                let mut reconnects = 0;
                let mut quiet_streams = 0;
                loop {
                    let mut request = http.get(format!("{app_url}/api/sse?userId=reader"));
                    if let Some(last) = seen.last() {
                        request = request.header("Last-Event-ID", last.to_string());
                    }
                    let response = request.send().await.unwrap();
                    let mut events = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
                    let take = 1 + reconnects % 7;
                    let mut got = 0;
                    while got < take {
                        let next = tokio::time::timeout(Duration::from_millis(500), futures_util::StreamExt::next(&mut events)).await;
                        let Ok(Some(Ok(event))) = next else { break };
                        if event.event == "n" {
                            seen.push(event.id.parse().unwrap());
                            got += 1;
                        }
                    }
                    reconnects += 1;
                    quiet_streams = if got == 0 { quiet_streams + 1 } else { 0 };
                    if quiet_streams >= 2 {
                        return (seen, reconnects);
                    }
                }
            })
        };
        let mut published = Vec::new();
        for task in publishers {
            published.extend(task.await.unwrap());
        }
        let (seen, reconnects) = tokio::time::timeout(Duration::from_secs(60), reader).await.unwrap().unwrap();

        published.sort();
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "ids arrive in order, none twice: {seen:?}");
        assert_eq!(seen, published, "every event for the reader, none for the bystander");
        assert!(reconnects > 10, "the reader reconnected {reconnects} times");
    }

    async fn a_client_resuming_from_before_the_retained_history_is_told_of_the_gap(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app_with(&db, &[("HISTORY_RETENTION_MS", "300")]).await;
        let first = id(&app.broadcast("n", json!(1)).await);
        let deadline = tokio::time::Instant::now() + PATIENCE;
        let latest = loop {
            let latest = id(&app.broadcast("n", json!(2)).await);
            let mut stream = app.subscribe(&format!("lastEventId={first}")).await;
            if stream.connected().await["historyGap"] == true {
                break latest;
            }
            assert!(tokio::time::Instant::now() < deadline, "retention never deleted the first event");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };

        let mut current = app.subscribe(&format!("lastEventId={latest}")).await;
        assert_eq!(current.connected().await["historyGap"], false);
        app.stop().await;
    }

    async fn stats_and_pending_notifications_survive_a_restart(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        let mut stream = app.subscribe("userId=u1").await;
        stream.connected().await;
        app.notify(json!({ "userId": "u1" }), "n", json!(1)).await;
        app.notify(json!({ "userId": "u1" }), "n", json!(2)).await;
        stream.take_stored(2).await;
        let pending = id(&app.notify(json!({ "userId": "away" }), "n", json!("kept")).await);
        drop(stream);
        app.stop().await;

        let app = spawn_app(&db).await;
        let (_, stats) = app.get_json("/api/sse/stats").await;
        assert_eq!(stats["totalEventsSent"], 2);
        assert_eq!(stats["totalConnections"], 1);
        assert_eq!(stats["pendingNotifications"], 1);
        assert_eq!(stats["totalClients"], 0);
        assert_eq!(stats["instances"], 1, "the stopped instance left the shared state");
        assert!(stats["lastEventTimestamp"].is_string());
        assert!(stats["averageConnectionDurationMs"].as_i64().unwrap() > 0);

        let mut away = app.subscribe("userId=away").await;
        away.connected().await;
        assert_eq!(away.take_stored(1).await, [(pending, json!("kept"))]);
        let next = id(&app.broadcast("n", json!(3)).await);
        assert_eq!(next, pending + 1, "ids continue after a restart");
        app.stop().await;
    }

    async fn a_user_whose_stream_here_does_not_match_still_gets_the_event_later(backend: Backend) {
        // Connected here, so no pending row is written with the event; the stream's
        // metadata does not match, so the dispatch adds the row afterwards.
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        let mut viewer = app.subscribe("userId=u&role=viewer").await;
        viewer.connected().await;
        let p = app
            .notify(json!({ "userId": "u", "metadata": { "role": "admin" } }), "n", json!("for admins"))
            .await;
        assert_eq!((p["delivered"].as_i64(), p["pending"].as_bool()), (Some(0), Some(false)));
        eventually("the row is counted", || async { stat(&app, "pendingNotifications").await == 1 }).await;

        let mut admin = app.subscribe("userId=u&role=admin").await;
        admin.connected().await;
        assert_eq!(admin.take_stored(1).await, [(id(&p), json!("for admins"))]);
        let marker = app.notify(json!({ "userId": "u" }), "n", json!("marker")).await;
        assert_eq!(viewer.take_stored(1).await, [(id(&marker), json!("marker"))], "nothing else reached the viewer");
        eventually("both rows are settled", || async { stat(&app, "pendingNotifications").await == 0 }).await;
        app.stop().await;
    }

    async fn a_slow_client_is_cut_off_and_resumes_without_loss(backend: Backend) {
        let db = backend.db().await;
        let app = spawn_app(&db).await;
        let mut fast = app.subscribe("userId=u1").await;
        fast.connected().await;
        let _slow = stuck_stream(app.addr, "userId=u1").await;

        // 24 MB of events: far more than a stream may queue (4 MiB) plus socket buffers.
        let big = "x".repeat(60 * 1024);
        let mut ids = Vec::new();
        let mut fast_received = Vec::new();
        for n in 0..400 {
            ids.push(id(&app.notify(json!({ "userId": "u1" }), "big", json!([n, big])).await));
            fast_received.extend(fast.take_stored(1).await.into_iter().map(|(id, _)| id));
        }

        assert_eq!(fast_received, ids, "the fast client got every event");
        let metrics = app.metrics().await;
        assert!(metrics.contains("nomey_sse_clients_dropped_total{reason=\"slow\"} 1"), "{metrics}");
        assert!(metrics.contains("nomey_sse_cutoff_queued_bytes_count 1"), "{metrics}");

        // The cut-off client resumes from the last id it had and loses nothing.
        let mut resumed = app.subscribe_with("userId=u1", &[("Last-Event-ID", &ids[99].to_string())]).await;
        resumed.connected().await;
        let replayed: Vec<i64> = resumed.take_stored(300).await.into_iter().map(|(id, _)| id).collect();
        assert_eq!(replayed, ids[100..]);
        app.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_resuming_on_another_instance_gets_each_event_once() {
    {
        let db = crate::helpers::TestDb::postgres().await;
        let first = spawn_app(&db).await;
        let second = spawn_app(&db).await;
        let mut on_first = first.subscribe("userId=u1").await;
        on_first.connected().await;
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(id(&first
                .notify(json!({ "userId": "u1" }), "n", json!(n))
                .await));
        }
        let seen = on_first.take_stored(3).await;
        assert_eq!(seen.iter().map(|(id, _)| *id).collect::<Vec<_>>(), ids);
        eventually("both instances see each other", || async {
            stat(&second, "instances").await == 2
        })
        .await;

        // The client moves to the second instance, which has not dispatched those events.
        let last = ids[2].to_string();
        let mut on_second = second
            .subscribe_with("userId=u1", &[("Last-Event-ID", &last)])
            .await;
        assert_eq!(on_second.connected().await["historyGap"], false);
        let next = id(&second
            .notify(json!({ "userId": "u1" }), "n", json!("next"))
            .await);

        assert_eq!(
            on_second.take_stored(1).await,
            [(next, json!("next"))],
            "nothing it already had"
        );
        first.stop().await;
        second.stop().await;
    }
}
