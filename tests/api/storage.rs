//! The storage suite, run against SQLite and against Postgres.

use nomey_sse::{
    event::now_millis,
    store::{NewEvent, SessionRecord, Store, Tallies},
};

use crate::on_both_backends;

fn event(data: &str, filter: Option<&str>, candidates: &[&str]) -> NewEvent {
    NewEvent {
        kind: "n".into(),
        data: data.into(),
        filter: filter.map(String::from),
        audience: "x".into(),
        absent_here: candidates.iter().map(|u| u.to_string()).collect(),
        created_at: now_millis(),
    }
}

fn session(client: &str, instance: &str, user: &str, closed: Option<i64>) -> SessionRecord {
    SessionRecord {
        client_id: client.into(),
        instance_id: instance.into(),
        user_id: Some(user.into()),
        session_id: None,
        metadata: "{}".into(),
        connected_at: 1_000,
        disconnected_at: closed,
        last_event_at: None,
        events_sent: 0,
    }
}

async fn heartbeat(store: &Store, instance: &str, sessions: &[SessionRecord]) {
    store.heartbeat(instance, 0, now_millis()).await.unwrap();
    store.save_sessions(sessions).await.unwrap();
    store.flush(&Tallies::default()).await.unwrap();
}

on_both_backends! {
    async fn appended_batches_get_consecutive_increasing_ids(backend: Backend) {
        let db = backend.db().await;
        let store = db.store().await;

        let first = store.append(&[event("1", None, &[]), event("2", None, &[])], "i", 0).await.unwrap();
        let second = store.append(&[event("3", Some(r#"{"userId":"u"}"#), &[])], "i", 0).await.unwrap();

        assert_eq!(first.first_id, 1);
        assert_eq!(second.first_id, 3);
        let all = store.events_between(0, 3, 100).await.unwrap();
        let ids: Vec<i64> = all.iter().map(|e| e.event_id).collect();
        assert_eq!(ids, [1, 2, 3]);
        assert_eq!(all[2].filter.as_deref(), Some(r#"{"userId":"u"}"#));
        assert_eq!(all[1].data, "2");
        assert_eq!(store.events_between(1, 3, 1).await.unwrap()[0].event_id, 2, "limit and lower bound");
        assert_eq!(store.event_horizon().await.unwrap(), (3, 0));
    }

    async fn a_batch_larger_than_one_statement_keeps_its_ids_consecutive(backend: Backend) {
        let db = backend.db().await;
        let store = db.store().await;
        // Three full statements, then 701 rows: on Postgres 512 + 128 + 61.
        let batch: Vec<NewEvent> = (0..4700).map(|n| event(&n.to_string(), None, &[])).collect();
        let appended = store.append(&batch, "me", 0).await.unwrap();
        let stored = store.events_between(0, i64::MAX, 5000).await.unwrap();
        assert_eq!(stored.len(), 4700);
        for (n, event) in stored.iter().enumerate() {
            assert_eq!(event.event_id, appended.first_id + n as i64);
            assert_eq!(event.data, n.to_string(), "id {} holds the event sent at {n}", event.event_id);
        }
        // And the next append goes on from there.
        assert_eq!(store.append(&[event("next", None, &[])], "me", 0).await.unwrap().first_id, 4701);
    }

    async fn concurrent_appends_never_reuse_or_skip_an_id(backend: Backend) {
        let db = backend.db().await;
        let store = db.store().await;

        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move {
                    let mut firsts = Vec::new();
                    for _ in 0..10 {
                        firsts.push(store.append(&[event("x", None, &[]), event("y", None, &[])], "i", 0).await.unwrap().first_id);
                    }
                    firsts
                })
            })
            .collect();
        let mut firsts = Vec::new();
        for task in tasks {
            firsts.extend(task.await.unwrap());
        }

        firsts.sort();
        assert_eq!(firsts, (0..80).map(|n| 1 + 2 * n).collect::<Vec<i64>>());
        assert_eq!(store.events_between(0, i64::MAX, 1000).await.unwrap().len(), 160);
    }

    async fn every_named_user_gets_a_pending_row_and_pending_says_whether_one_is_away_everywhere(backend: Backend) {
        let db = backend.db().await;
        let store = db.store().await;
        heartbeat(&store, "other", &[session("c1", "other", "online", None)]).await;

        let appended = store
            .append(&[event("p", Some(r#"{"userIds":["online","offline"]}"#), &["online", "offline"])], "me", 0)
            .await
            .unwrap();

        assert_eq!(appended.pending, [true], "offline is away everywhere");
        // Rows for both: the instance that hands the event to a stream settles its row.
        assert_eq!(store.pending_count().await.unwrap(), 2);
        let pending = store.pending_between("offline", 0, i64::MAX, 10).await.unwrap();
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].data, "p");
        assert_eq!(store.pending_between("online", 0, i64::MAX, 10).await.unwrap().len(), 1);

        let appended = store.append(&[event("q", None, &["online"])], "me", 0).await.unwrap();
        assert_eq!(appended.pending, [false], "online has a stream on another instance");
        // Once the other instance stops heart-beating, its streams no longer count.
        let later = now_millis() + 1;
        let appended = store.append(&[event("r", None, &["online"])], "me", later).await.unwrap();
        assert_eq!(appended.pending, [true]);
    }

    async fn settled_pending_rows_are_deleted_by_a_flush(backend: Backend) {
        let db = backend.db().await;
        let store = db.store().await;
        store.append(&[event("a", None, &["u"]), event("b", None, &["u", "v"])], "me", 0).await.unwrap();
        assert_eq!(store.pending_count().await.unwrap(), 3);

        let tallies = Tallies { settled: vec![("u".into(), 1), ("u".into(), 2)], ..Tallies::default() };
        store.flush(&tallies).await.unwrap();

        assert_eq!(store.pending_count().await.unwrap(), 1);
        assert_eq!(store.pending_between("v", 0, 10, 10).await.unwrap()[0].event_id, 2);
        assert!(store.pending_between("u", 0, 10, 10).await.unwrap().is_empty());
    }

    async fn flushes_add_up_totals_and_upsert_sessions(backend: Backend) {
        let db = backend.db().await;
        let store = db.store().await;
        let open = session("c1", "me", "u", None);
        let tallies = Tallies { events_sent: 5, connections: 2, last_event_at: Some(2_000), ..Tallies::default() };
        store.save_sessions(std::slice::from_ref(&open)).await.unwrap();
        store.flush(&tallies).await.unwrap();
        let closed = SessionRecord { disconnected_at: Some(4_000), events_sent: 5, ..open.clone() };
        let tallies = Tallies { events_sent: 1, closed: vec![closed.clone()], last_event_at: Some(1_500), ..Tallies::default() };
        store.flush(&tallies).await.unwrap();

        let totals = store.totals().await.unwrap();
        assert_eq!(totals.events_sent, 6);
        assert_eq!(totals.connections, 2);
        assert_eq!(totals.closed_connections, 1);
        assert_eq!(totals.closed_duration_ms, 3_000);
        assert_eq!(totals.last_event_at, Some(2_000), "the latest time wins");
        assert_eq!(store.session("c1").await.unwrap(), Some(closed));
    }

    async fn remote_sessions_are_those_of_other_live_instances(backend: Backend) {
        let db = backend.db().await;
        let store = db.store().await;
        heartbeat(&store, "me", &[session("mine", "me", "a", None)]).await;
        heartbeat(&store, "other", &[session("theirs", "other", "b", None), session("gone", "other", "c", Some(2_000))]).await;

        let remote = store.remote_sessions("me", 0).await.unwrap();
        assert_eq!(remote.iter().map(|s| s.client_id.as_str()).collect::<Vec<_>>(), ["theirs"]);
        assert_eq!(store.other_instances("me", 0).await.unwrap(), 1);

        // Both heart-beat after 0; after "now", neither has: their open sessions are closed
        // and the instances forgotten.
        assert_eq!(store.reap_instances("reaper", 0).await.unwrap(), 0);
        assert_eq!(store.reap_instances("reaper", now_millis() + 10).await.unwrap(), 2);
        let theirs = store.session("theirs").await.unwrap().unwrap();
        let ended = theirs.disconnected_at.expect("closed at its instance's last heartbeat");
        assert!(ended > 1_000);
        let totals = store.totals().await.unwrap();
        assert_eq!(totals.closed_connections, 2, "reaped sessions count as closed");
        assert!(totals.closed_duration_ms >= ended - 1_000);
        assert_eq!(store.other_instances("me", 0).await.unwrap(), 0);
    }

    async fn an_instance_that_stops_cleanly_leaves_no_open_session(backend: Backend) {
        let db = backend.db().await;
        let store = db.store().await;
        heartbeat(&store, "me", &[session("mine", "me", "a", None)]).await;

        store.remove_instance("me", 9_000).await.unwrap();

        assert_eq!(store.session("mine").await.unwrap().unwrap().disconnected_at, Some(9_000));
        assert_eq!(store.other_instances("x", 0).await.unwrap(), 0);
    }

    async fn retention_deletes_old_events_and_their_pending_rows_and_marks_the_horizon(backend: Backend) {
        let db = backend.db().await;
        let store = db.store().await;
        let mut old = event("old", None, &["u"]);
        old.created_at = 1_000;
        store.append(&[old.clone(), old], "me", 0).await.unwrap();
        store.append(&[event("new", None, &["u"])], "me", 0).await.unwrap();
        heartbeat(&store, "me", &[session("closed", "me", "u", Some(1_500))]).await;

        let deleted = store.prune(2_000).await.unwrap();

        assert_eq!(deleted, 2);
        assert_eq!(store.event_horizon().await.unwrap(), (3, 2));
        assert_eq!(store.events_between(0, 10, 10).await.unwrap().len(), 1);
        assert_eq!(store.pending_count().await.unwrap(), 1);
        assert!(store.session("closed").await.unwrap().is_none());
        assert_eq!(store.prune(2_000).await.unwrap(), 0, "nothing more to delete");
        assert_eq!(store.event_horizon().await.unwrap(), (3, 2));
    }
}
