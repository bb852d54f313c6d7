//! The real binary: configuration errors, signals, a hard kill, database trouble and
//! running out of file descriptors.

use std::{net::SocketAddr, process::Stdio, time::Duration};

use reqwest::StatusCode;
use serde_json::{Value, json};
use sqlx::{Connection, Executor, PgConnection};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    process::{Child, Command},
};

use crate::{
    helpers::{
        PATIENCE, TestDb, error_code, eventually, postgres_admin_url, signal, stuck_stream,
        wait_for_log,
    },
    on_both_backends,
};

fn server_command(db_url: &str, vars: &[(&str, &str)]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_nomey-sse"));
    command
        .env_clear()
        .env("BIND_ADDR", "127.0.0.1:0")
        .env("DATABASE_URL", db_url)
        .env("LOG_FORMAT", "json")
        .envs(vars.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command
}

type EventStream = std::pin::Pin<
    Box<
        dyn futures_util::Stream<
                Item = Result<
                    eventsource_stream::Event,
                    eventsource_stream::EventStreamError<reqwest::Error>,
                >,
            > + Send,
    >,
>;

/// A running server process.
struct Server {
    child: Child,
    addr: SocketAddr,
    http: reqwest::Client,
}

impl Server {
    async fn start(db_url: &str, vars: &[(&str, &str)]) -> Self {
        Self::start_command(server_command(db_url, vars)).await
    }

    async fn start_command(mut command: Command) -> Self {
        let mut child = command.spawn().expect("start the server binary");
        let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = wait_for_log(&mut logs, "nomey-sse listening").await;
        let addr = line["fields"]["addr"].as_str().unwrap().parse().unwrap();
        // Keep reading, or the server blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = logs.next_line().await {} });
        Self {
            child,
            addr,
            http: reqwest::Client::new(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    async fn post_notify(&self, body: &Value) -> reqwest::Response {
        let request = self.http.post(self.url("/api/sse/notify")).json(body);
        request.send().await.unwrap()
    }

    async fn notify(&self, user: &str, data: Value) -> Value {
        let body = json!({ "filter": { "userId": user }, "event": "n", "data": data });
        let response = self.post_notify(&body).await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        response.json().await.unwrap()
    }

    async fn stats(&self) -> Value {
        self.http
            .get(self.url("/api/sse/stats"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Opens `GET /api/sse?{query}` and reads its first chunk.
    async fn open_stream(&self, query: &str) -> reqwest::Response {
        let url = self.url(&format!("/api/sse?{query}"));
        let mut response = self.http.get(url).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        response.chunk().await.unwrap();
        response
    }

    /// Opens `GET /api/sse?{query}` (with optional headers), read with a real SSE parser.
    async fn events(&self, query: &str, headers: &[(&str, &str)]) -> EventStream {
        let mut request = self.http.get(self.url(&format!("/api/sse?{query}")));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send().await.unwrap();
        Box::pin(eventsource_stream::Eventsource::eventsource(
            response.bytes_stream(),
        ))
    }

    async fn status(&self, path: &str) -> StatusCode {
        self.http.get(self.url(path)).send().await.unwrap().status()
    }

    fn signal(&self, name: &str) {
        signal(&self.child, name);
    }
}

/// Sends SIGTERM and waits for the process to exit.
async fn stop_gracefully(child: &mut Child) {
    signal(child, "TERM");
    tokio::time::timeout(PATIENCE, child.wait())
        .await
        .expect("exits after SIGTERM")
        .unwrap();
}

#[tokio::test]
async fn a_bad_configuration_value_stops_the_start_naming_the_variable() {
    for (name, value) in [
        ("PING_INTERVAL_MS", "soon"),
        ("DATABASE_URL", "mysql://db/x"),
        ("MAX_CLIENTS", "-3"),
    ] {
        let output = server_command("sqlite::memory:", &[(name, value)])
            .output()
            .await
            .unwrap();
        assert!(
            !output.status.success(),
            "{name}={value} must stop the start"
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(name), "stderr names {name}: {stderr}");
    }
}

#[tokio::test]
async fn sigterm_ends_open_streams_and_exits_promptly() {
    let db = TestDb::sqlite().await;
    let mut server = Server::start(&db.url, &[]).await;
    let mut stream = server.open_stream("userId=u1").await;

    let started = std::time::Instant::now();
    server.signal("TERM");

    let ended = tokio::time::timeout(PATIENCE, async {
        while let Ok(Some(_)) = stream.chunk().await {}
    })
    .await;
    assert!(ended.is_ok(), "the open stream ends");
    let status = tokio::time::timeout(Duration::from_secs(10), server.child.wait())
        .await
        .expect("exits within 10 s");
    assert!(status.unwrap().success());
    assert!(started.elapsed() < Duration::from_secs(10));
}

on_both_backends! {
    async fn a_hard_kill_loses_no_pending_notification_and_no_flushed_count(backend: Backend) {
        let db = backend.db().await;
        let mut server = Server::start(&db.url, &[("CLIENT_TIMEOUT_MS", "1000")]).await;
        let stream = server.open_stream("userId=here").await;
        server.notify("here", json!(1)).await;
        server.notify("here", json!(2)).await;
        let mut pending = Vec::new();
        for n in 0..3 {
            pending.push(server.notify("away", json!(n)).await["eventId"].as_i64().unwrap());
        }
        // Wait until the counts of the two delivered events are saved.
        let store = db.store().await;
        eventually("the counts are flushed", || async { store.totals().await.unwrap().events_sent >= 2 }).await;

        server.signal("KILL");
        server.child.wait().await.unwrap();
        drop(stream);

        let server = Server::start(&db.url, &[("CLIENT_TIMEOUT_MS", "1000")]).await;
        let stats = server.stats().await;
        assert_eq!(stats["totalEventsSent"], 2);
        assert_eq!(stats["totalConnections"], 1);
        assert_eq!(stats["pendingNotifications"], 3);
        let mut events = server.events("userId=away", &[]).await;
        let mut received = Vec::new();
        while received.len() < 3 {
            let event = tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut events)).await.unwrap().unwrap().unwrap();
            if event.event == "n" {
                received.push(event.id.parse::<i64>().unwrap());
            }
        }
        assert_eq!(received, pending);
        // The killed instance's stream stops counting once its heartbeat is stale.
        eventually("the dead instance's client goes away", || async {
            server.stats().await["clientsByUser"].get("here").is_none()
        })
        .await;
    }
}

/// A process's resident memory, from `/proc/<pid>/status`.
fn resident_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmRSS:")).unwrap();
    line.split_whitespace()
        .nth(1)
        .unwrap()
        .parse::<u64>()
        .unwrap()
        * 1024
}

#[tokio::test]
async fn a_reader_that_never_reads_costs_bounded_memory_while_others_get_everything() {
    let db = TestDb::sqlite().await;
    let server = Server::start(&db.url, &[]).await;
    let pid = server.child.id().unwrap();
    let mut fast = server.events("userId=u1", &[]).await;
    let _slow = stuck_stream(server.addr, "userId=u1").await;
    // Warm up, so the baseline includes the database's caches.
    let big = "x".repeat(60 * 1024);
    for _ in 0..20 {
        server.notify("nobody", json!(big)).await;
    }
    let before = resident_bytes(pid);

    // 60 MB for a client that never reads.
    let mut delivered = 0;
    for n in 0..1000 {
        server.notify("u1", json!([n, big])).await;
        loop {
            let event = tokio::time::timeout(PATIENCE, futures_util::StreamExt::next(&mut fast))
                .await
                .unwrap()
                .unwrap()
                .unwrap();
            if event.event == "n" {
                delivered += 1;
                break;
            }
        }
    }
    let grown = resident_bytes(pid).saturating_sub(before);

    assert_eq!(delivered, 1000);
    assert!(
        grown < 24 << 20,
        "the server grew by {grown} bytes while a reader never read"
    );
    let metrics = server
        .http
        .get(server.url("/metrics"))
        .send()
        .await
        .unwrap();
    let metrics = metrics.text().await.unwrap();
    assert!(
        metrics.contains("nomey_sse_clients_dropped_total{reason=\"slow\"} 1"),
        "{metrics}"
    );
}

#[tokio::test]
async fn an_unreachable_database_at_start_is_retried_with_a_clear_error() {
    // Nothing listens on port 1.
    let mut command = server_command("postgres://postgres@127.0.0.1:1/none", &[]);
    let mut child = command.spawn().unwrap();
    let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
    let first = wait_for_log(&mut logs, "could not open the database").await;
    let second = wait_for_log(&mut logs, "could not open the database").await;
    assert!(first["fields"]["error"].is_string());
    assert!(
        second["fields"]["retry_in_ms"].as_u64() > first["fields"]["retry_in_ms"].as_u64(),
        "it backs off"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "still running, still retrying"
    );
    child.kill().await.unwrap();
}

#[tokio::test]
async fn a_database_lost_while_running_refuses_publishes_keeps_streams_and_recovers() {
    let db = TestDb::postgres().await;
    let name = db.url.rsplit('/').next().unwrap().to_owned();
    let server = Server::start(&db.url, &[("PING_INTERVAL_MS", "100")]).await;
    let mut stream = server.open_stream("userId=u1").await;

    let mut admin = PgConnection::connect(&postgres_admin_url()).await.unwrap();
    admin
        .execute(format!(r#"alter database "{name}" allow_connections false"#).as_str())
        .await
        .unwrap();
    admin
        .execute(
            format!(
                "select pg_terminate_backend(pid) from pg_stat_activity where datname = '{name}'"
            )
            .as_str(),
        )
        .await
        .unwrap();

    let body = json!({ "filter": { "userId": "u1" }, "event": "n", "data": 1 });
    let refused = server.post_notify(&body).await;
    assert_eq!(
        error_code(refused, StatusCode::SERVICE_UNAVAILABLE).await,
        "database_unavailable"
    );
    assert_eq!(
        server.status("/readyz").await,
        StatusCode::SERVICE_UNAVAILABLE
    );
    // The open stream stays up: heartbeats keep coming.
    for _ in 0..3 {
        let chunk = tokio::time::timeout(PATIENCE, stream.chunk())
            .await
            .unwrap()
            .unwrap()
            .expect("still open");
        assert!(!chunk.is_empty());
    }

    admin
        .execute(format!(r#"alter database "{name}" allow_connections true"#).as_str())
        .await
        .unwrap();
    eventually("publishing recovers", || async {
        server.post_notify(&body).await.status() == StatusCode::ACCEPTED
    })
    .await;
    // The bus reconnects with backoff after the database, so readiness may follow later.
    eventually("ready again", || async {
        server.status("/readyz").await == StatusCode::OK
    })
    .await;
    let mut text = String::new();
    while !text.contains("id: 1\n") {
        let chunk = tokio::time::timeout(PATIENCE, stream.chunk())
            .await
            .unwrap()
            .unwrap()
            .expect("still open");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
}

#[tokio::test]
async fn out_of_file_descriptors_new_streams_get_503_and_the_rest_keeps_working() {
    let db = TestDb::sqlite().await;
    let mut command = server_command(&db.url, &[]);
    // SAFETY: setrlimit is async-signal-safe and touches nothing but the child's limits.
    unsafe {
        command.pre_exec(|| rlimit::setrlimit(rlimit::Resource::NOFILE, 120, 120));
    }
    let server = Server::start_command(command).await;

    let mut open = Vec::new();
    let refused = loop {
        let response = server
            .http
            .get(server.url(&format!("/api/sse?userId=u{}", open.len())))
            .send()
            .await
            .unwrap();
        if response.status() != StatusCode::OK {
            break response;
        }
        open.push(response);
        assert!(open.len() < 120, "streams were never refused");
    };
    assert_eq!(
        error_code(refused, StatusCode::SERVICE_UNAVAILABLE).await,
        "too_many_open_files"
    );
    assert!(
        open.len() > 20,
        "only {} streams before the limit",
        open.len()
    );

    assert_eq!(server.status("/healthz").await, StatusCode::OK);
    assert_eq!(server.status("/readyz").await, StatusCode::OK);
    let published = server.notify("u0", json!("still publishing")).await;
    assert_eq!(published["delivered"], 1);
}

#[tokio::test]
async fn fresh_sqlite_starts_under_publish_load_log_no_locked_database_and_no_colour_codes() {
    for _ in 0..4 {
        let db = TestDb::sqlite().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        // Text logs to a pipe; retention every 200 ms, so it meets the publisher often.
        let mut child = Command::new(env!("CARGO_BIN_EXE_nomey-sse"))
            .env_clear()
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", &db.url)
            .env("HISTORY_RETENTION_MS", "2000")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut stderr = child.stderr.take().unwrap();
        let logs = tokio::spawn(async move {
            let mut text = String::new();
            tokio::io::AsyncReadExt::read_to_string(&mut stderr, &mut text)
                .await
                .unwrap();
            text
        });
        let http = reqwest::Client::new();
        let url = |path: &str| format!("http://127.0.0.1:{port}{path}");
        eventually("the server answers", || async {
            http.get(url("/healthz")).send().await.is_ok()
        })
        .await;

        let publishes = (0..300).map(|n| {
            let body =
                json!({ "filter": { "userId": format!("u{}", n % 7) }, "event": "n", "data": n });
            let request = http.post(url("/api/sse/notify")).json(&body).send();
            async move { request.await.unwrap().status() }
        });
        let statuses = futures_util::future::join_all(publishes).await;
        assert!(
            statuses.iter().all(|s| *s == StatusCode::ACCEPTED),
            "{statuses:?}"
        );

        stop_gracefully(&mut child).await;
        let logs = logs.await.unwrap();
        assert!(logs.contains("nomey-sse listening"), "{logs}");
        assert!(!logs.contains("locked"), "{logs}");
        assert!(!logs.contains('\u{1b}'), "colour codes in a pipe");
    }
}

#[tokio::test]
async fn a_subscriber_token_never_appears_in_the_logs() {
    let db = TestDb::sqlite().await;
    let secret = "log-test-secret";
    let claims = json!({ "sub": "u1", "exp": nomey_sse::event::now_millis() / 1000 + 600 });
    let token = jsonwebtoken::encode(
        &jsonwebtoken::Header::default(),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap();
    let mut command = server_command(
        &db.url,
        &[("SSE_JWT_SECRET", secret), ("RUST_LOG", "debug")],
    );
    let mut child = command.spawn().unwrap();
    let mut logs = BufReader::new(child.stdout.take().unwrap()).lines();
    let line = wait_for_log(&mut logs, "nomey-sse listening").await;
    let addr: SocketAddr = line["fields"]["addr"].as_str().unwrap().parse().unwrap();
    let collected = tokio::spawn(async move {
        let mut text = String::new();
        while let Ok(Some(line)) = logs.next_line().await {
            text.push_str(&line);
            text.push('\n');
        }
        text
    });
    let http = reqwest::Client::new();
    for query in [
        format!("token={token}&userId=u1"),
        format!("userId=u1&token={token}x"),
    ] {
        let url = format!("http://{addr}/api/sse?{query}");
        // Read the first chunk, so the request was handled, then hang up.
        let mut response = http.get(url).send().await.unwrap();
        let _ = response.chunk().await;
    }
    stop_gracefully(&mut child).await;
    let text = collected.await.unwrap();
    assert!(
        text.contains("token=[redacted]"),
        "the request is logged: {text}"
    );
    let signature = token.rsplit('.').next().unwrap();
    assert!(!text.contains(signature), "the token leaked: {text}");
}

#[tokio::test]
async fn an_instance_frozen_past_the_timeout_ends_its_streams_and_nothing_is_lost_or_counted_twice()
{
    use futures_util::StreamExt;
    let db = TestDb::postgres().await;
    let vars = [("CLIENT_TIMEOUT_MS", "1500"), ("PING_INTERVAL_MS", "300")];
    let frozen = Server::start(&db.url, &vars).await;
    let survivor = Server::start(&db.url, &vars).await;
    let mut events = frozen.events("userId=f", &[]).await;
    let mut received = Vec::new();
    // The parser repeats the last id on later events: only stored events count.
    let stored = |event: eventsource_stream::Event, received: &mut Vec<i64>| {
        if event.event == "n" {
            received.push(event.id.parse::<i64>().unwrap());
        }
    };
    let mut published = vec![
        survivor.notify("f", json!("before")).await["eventId"]
            .as_i64()
            .unwrap(),
    ];
    while received.is_empty() {
        let event = tokio::time::timeout(PATIENCE, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        stored(event, &mut received);
    }

    frozen.signal("STOP");
    eventually(
        "the survivor declares it dead and closes its sessions",
        || async {
            let alive: i64 = sqlx::query_scalar("select count(*) from instance")
                .fetch_one(&mut db.connect().await)
                .await
                .unwrap();
            alive == 1
        },
    )
    .await;
    for n in 0..3 {
        published.push(
            survivor.notify("f", json!(n)).await["eventId"]
                .as_i64()
                .unwrap(),
        );
    }
    frozen.signal("CONT");

    // Thawed, it may still hand over what it learns, then it ends the stream.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while let Ok(Some(Ok(event))) = tokio::time::timeout_at(deadline, events.next()).await {
        stored(event, &mut received);
    }
    assert!(
        tokio::time::Instant::now() < deadline,
        "the thawed instance kept its stream"
    );
    let last = received.last().unwrap().to_string();
    let mut resumed = survivor
        .events("userId=f", &[("Last-Event-ID", &last)])
        .await;
    while received.len() < published.len() {
        let event = tokio::time::timeout(PATIENCE, resumed.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        stored(event, &mut received);
    }
    assert_eq!(received, published, "every event, once, in order");
    // One live session, counted once, wherever it is.
    eventually("the stats count the one open stream", || async {
        let (s, f) = (survivor.stats().await, frozen.stats().await);
        s["totalClients"] == 1 && f["totalClients"] == 1 && s["instances"] == 2
    })
    .await;
}

#[tokio::test]
async fn two_server_processes_deliver_each_others_events_live_once() {
    use futures_util::StreamExt;
    let db = TestDb::postgres().await;
    let a = Server::start(&db.url, &[]).await;
    let b = Server::start(&db.url, &[]).await;
    let mut streams = Vec::new();
    for server in [&a, &b] {
        let mut events = server.events("userId=p", &[]).await;
        let connected = tokio::time::timeout(PATIENCE, events.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        assert_eq!(connected.event, "connected");
        streams.push(events);
    }
    let mut published = Vec::new();
    for (n, server) in [&b, &a, &b, &a].into_iter().enumerate() {
        let started = tokio::time::Instant::now();
        let id = server.notify("p", json!(n)).await["eventId"]
            .as_i64()
            .unwrap();
        published.push(id);
        for events in &mut streams {
            let event = loop {
                let event = tokio::time::timeout(PATIENCE, events.next())
                    .await
                    .unwrap()
                    .unwrap()
                    .unwrap();
                if event.event == "n" {
                    break event;
                }
            };
            assert_eq!(event.id, id.to_string(), "each event once, in order");
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    assert!(published.windows(2).all(|w| w[0] < w[1]));
}
