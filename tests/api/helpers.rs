//! The real app on a random port, its own database, and a real SSE client.

use std::{collections::HashMap, net::SocketAddr, path::PathBuf, pin::Pin, time::Duration};

use eventsource_stream::{Event, EventStreamError, Eventsource};
use futures_util::{Stream, StreamExt};
use nomey_sse::{Application, Config, EventService, store::Store};
use reqwest::StatusCode;
use serde_json::Value;
use sqlx::{Connection, Executor, PgConnection};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// How long a test waits for something that should happen, before it fails.
pub const PATIENCE: Duration = Duration::from_secs(10);

/// The Postgres server tests create their databases on.
pub fn postgres_admin_url() -> String {
    crate::postgres::admin_url()
}

/// A fresh database for one test, removed when dropped.
pub struct TestDb {
    pub url: String,
    postgres_name: Option<String>,
    sqlite_file: Option<PathBuf>,
}

impl TestDb {
    pub async fn sqlite() -> Self {
        let file = std::env::temp_dir().join(format!("nomey-sse-test-{}.db", Uuid::new_v4()));
        Self {
            url: format!("sqlite://{}", file.display()),
            postgres_name: None,
            sqlite_file: Some(file),
        }
    }

    pub async fn postgres() -> Self {
        let name = format!("nomey_test_{}", Uuid::new_v4().simple());
        let admin = postgres_admin_url();
        let mut conn = PgConnection::connect(&admin)
            .await
            .expect("connect to the tests' Postgres server");
        conn.execute(format!(r#"create database "{name}""#).as_str())
            .await
            .expect("create the test database");
        let (base, _) = admin.rsplit_once('/').expect("a database URL has a path");
        Self {
            url: format!("{base}/{name}"),
            postgres_name: Some(name),
            sqlite_file: None,
        }
    }

    /// A raw connection, for tests that write what the service never would.
    pub async fn connect(&self) -> sqlx::AnyConnection {
        sqlx::any::install_default_drivers();
        sqlx::AnyConnection::connect(&self.url)
            .await
            .expect("connect to the test database")
    }

    pub async fn store(&self) -> Store {
        Store::connect(&nomey_sse::config::DatabaseUrl::parse(&self.url).unwrap())
            .await
            .expect("open the test store")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        if let Some(file) = &self.sqlite_file {
            for suffix in ["", "-wal", "-shm"] {
                let _ = std::fs::remove_file(format!("{}{suffix}", file.display()));
            }
        }
        if let Some(name) = self.postgres_name.take() {
            // Drop runs inside the test's runtime; a thread with its own runtime may block.
            let _ = std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .unwrap();
                runtime.block_on(async {
                    if let Ok(mut conn) = PgConnection::connect(&postgres_admin_url()).await {
                        let sql = format!(r#"drop database if exists "{name}" with (force)"#);
                        let _ = conn.execute(sql.as_str()).await;
                    }
                });
            })
            .join();
        }
    }
}

/// Both backends, for tests that must hold on each.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    pub async fn db(self) -> TestDb {
        match self {
            Self::Sqlite => TestDb::sqlite().await,
            Self::Postgres => TestDb::postgres().await,
        }
    }
}

/// Runs an async test body once per backend, as `#[tokio::test]`s named after both.
#[macro_export]
macro_rules! on_both_backends {
    ($(async fn $name:ident($backend:ident: Backend) $body:block)*) => {
        $(
            mod $name {
                #[allow(unused_imports)]
                use super::*;

                async fn run($backend: $crate::helpers::Backend) $body

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn on_sqlite() {
                    run($crate::helpers::Backend::Sqlite).await
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn on_postgres() {
                    run($crate::helpers::Backend::Postgres).await
                }
            }
        )*
    };
}

/// The application, running in this process on a random port.
pub struct TestApp {
    pub addr: SocketAddr,
    pub http: reqwest::Client,
    pub shutdown: CancellationToken,
    pub server: JoinHandle<anyhow::Result<()>>,
    pub events: EventService,
}

/// Configuration for a test app: quiet, on loopback, on the given database.
pub fn test_config(db_url: &str, vars: &[(&str, &str)]) -> Config {
    let mut env: HashMap<String, String> = HashMap::from([
        ("BIND_ADDR".into(), "127.0.0.1:0".into()),
        ("DATABASE_URL".into(), db_url.into()),
        ("ENABLE_LOGGING".into(), "false".into()),
    ]);
    env.extend(vars.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Config::from_vars(env).expect("a valid test configuration")
}

pub async fn spawn_app(db: &TestDb) -> TestApp {
    spawn_app_with(db, &[]).await
}

pub async fn spawn_app_with(db: &TestDb, vars: &[(&str, &str)]) -> TestApp {
    spawn_app_at(&db.url, vars).await
}

/// The app on a database given by URL (another role's, say).
pub async fn spawn_app_at(db_url: &str, vars: &[(&str, &str)]) -> TestApp {
    let config = test_config(db_url, vars);
    let store = Store::connect(&config.database)
        .await
        .expect("open the test database");
    let app = Application::build(config, store)
        .await
        .expect("build the app");
    let addr = app.local_addr();
    let shutdown = app.shutdown_token();
    let events = app.events().clone();
    let server = tokio::spawn(app.run_until_stopped());
    TestApp {
        addr,
        http: reqwest::Client::new(),
        shutdown,
        server,
        events,
    }
}

type EventStream =
    Pin<Box<dyn Stream<Item = Result<Event, EventStreamError<reqwest::Error>>> + Send>>;

/// An open stream, read with a real SSE parser.
pub struct Subscriber {
    events: EventStream,
}

impl Subscriber {
    /// The next frame of any kind, or `None` when the stream ended.
    pub async fn next_any(&mut self) -> Option<Event> {
        match tokio::time::timeout(PATIENCE, self.events.next()).await {
            Ok(Some(Ok(event))) => Some(event),
            Ok(Some(Err(_))) | Ok(None) => None,
            Err(_) => panic!("no event within {PATIENCE:?}"),
        }
    }

    /// The next event that is not a heartbeat.
    pub async fn next_event(&mut self) -> Event {
        loop {
            let event = self.next_any().await.expect("the stream ended early");
            if event.event != "ping" {
                return event;
            }
        }
    }

    /// The `connected` event's data, which every stream starts with.
    pub async fn connected(&mut self) -> Value {
        let event = self
            .next_any()
            .await
            .expect("the stream ended before connected");
        assert_eq!(event.event, "connected");
        serde_json::from_str(&event.data).unwrap()
    }

    /// The next `count` stored events, as (id, data).
    pub async fn take_stored(&mut self, count: usize) -> Vec<(i64, Value)> {
        let mut out = Vec::with_capacity(count);
        while out.len() < count {
            let event = self.next_event().await;
            out.push((
                event.id.parse().expect("a stored event has an id"),
                serde_json::from_str(&event.data).unwrap(),
            ));
        }
        out
    }

    /// Waits for the stream to end, failing if it does not.
    pub async fn expect_end(&mut self) {
        while let Some(event) = self.next_any().await {
            assert_eq!(
                event.event, "ping",
                "expected the stream to end, got {event:?}"
            );
        }
    }
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Opens `GET /api/sse?{query}`; returns the raw response.
    pub async fn open_stream(&self, query: &str, headers: &[(&str, &str)]) -> reqwest::Response {
        let mut request = self.http.get(self.url(&format!("/api/sse?{query}")));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        request.send().await.expect("request /api/sse")
    }

    /// Opens a stream and reads its `connected` event. Registration happens before the
    /// response starts, so anything published after this returns reaches the stream.
    pub async fn subscribe(&self, query: &str) -> Subscriber {
        self.subscribe_with(query, &[]).await
    }

    pub async fn subscribe_with(&self, query: &str, headers: &[(&str, &str)]) -> Subscriber {
        let response = self.open_stream(query, headers).await;
        assert_eq!(response.status(), StatusCode::OK, "GET /api/sse?{query}");
        Subscriber {
            events: Box::pin(response.bytes_stream().eventsource()),
        }
    }

    pub async fn post(&self, path: &str, body: Value) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .json(&body)
            .send()
            .await
            .expect("POST")
    }

    /// POSTs `body` as it is, with no content type: for bodies that are not JSON values.
    pub async fn post_text(&self, path: &str, body: impl Into<reqwest::Body>) -> reqwest::Response {
        self.http
            .post(self.url(path))
            .body(body)
            .send()
            .await
            .expect("POST")
    }

    /// Publishes through `POST /api/sse/notify`, expecting 202; returns the response body.
    pub async fn notify(&self, filter: Value, event: &str, data: Value) -> Value {
        let response = self
            .post(
                "/api/sse/notify",
                serde_json::json!({ "filter": filter, "event": event, "data": data }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        response.json().await.unwrap()
    }

    pub async fn broadcast(&self, event: &str, data: Value) -> Value {
        let response = self
            .post(
                "/api/sse/broadcast",
                serde_json::json!({ "event": event, "data": data }),
            )
            .await;
        assert_eq!(response.status(), StatusCode::ACCEPTED);
        response.json().await.unwrap()
    }

    pub async fn get_json(&self, path: &str) -> (StatusCode, Value) {
        let response = self.http.get(self.url(path)).send().await.expect("GET");
        let status = response.status();
        (status, response.json().await.unwrap_or(Value::Null))
    }

    /// The `/metrics` text.
    pub async fn metrics(&self) -> String {
        let response = self.http.get(self.url("/metrics")).send().await.unwrap();
        response.text().await.unwrap()
    }

    /// Stops the app gracefully and waits for it to finish.
    pub async fn stop(self) {
        self.shutdown.cancel();
        tokio::time::timeout(PATIENCE, self.server)
            .await
            .expect("the server stops within the grace period")
            .expect("the server task does not panic")
            .expect("the server stops cleanly");
    }
}

/// A client that sends its request and then never reads, with a tiny receive window;
/// returns once the response has started.
pub async fn stuck_stream(addr: SocketAddr, query: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut stream = socket.connect(addr).await.unwrap();
    let request = format!("GET /api/sse?{query} HTTP/1.1\r\nHost: test\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    stream
}

/// Polls `check` until it holds; fails after `PATIENCE`.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Asserts the contract's error shape and returns its code.
pub async fn error_code(response: reqwest::Response, status: StatusCode) -> String {
    assert_eq!(response.status(), status);
    let body: Value = response.json().await.expect("a JSON error body");
    let message = body["error"]["message"].as_str().expect("error.message");
    assert!(!message.is_empty());
    body["error"]["code"]
        .as_str()
        .expect("error.code")
        .to_owned()
}

/// Sends the signal `name` (`TERM`, `KILL`, `STOP`, …) to a child process.
pub fn signal(child: &tokio::process::Child, name: &str) {
    let pid = child.id().expect("the process is running").to_string();
    let status = std::process::Command::new("kill")
        .args([&format!("-{name}"), &pid])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Reads JSON log lines until one's message contains `message`, and returns that line.
pub async fn wait_for_log(
    logs: &mut tokio::io::Lines<tokio::io::BufReader<tokio::process::ChildStdout>>,
    message: &str,
) -> Value {
    tokio::time::timeout(PATIENCE, async {
        loop {
            let line = logs
                .next_line()
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("the process exited before logging {message:?}"));
            let Ok(line) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if line["fields"]["message"]
                .as_str()
                .is_some_and(|m| m.contains(message))
            {
                return line;
            }
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no log line with {message:?}"))
}
