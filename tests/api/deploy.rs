//! The Shuttle and Lambda entry points, as built binaries under stand-ins for their
//! platforms' APIs (Shuttle's resource API, the Lambda Runtime API), on Postgres.

use std::{net::SocketAddr, process::Stdio};

use axum::{Router, routing::get};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncBufReadExt, BufReader},
    net::TcpListener,
    process::{Child, Command},
};

use crate::helpers::{PATIENCE, signal, wait_for_log};

/// Serves `router` on a free loopback port.
async fn stand_in(router: Router) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await });
    addr
}

/// Waits for the child's log line containing `message`, then keeps draining its output so
/// that it never blocks on a full pipe.
async fn logged(child: &mut Child, message: &str) -> Value {
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let found = wait_for_log(&mut lines, message).await;
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    found
}

fn binary(path: &str) -> Command {
    let mut command = Command::new(path);
    command
        .env_clear()
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    command
}

#[cfg(feature = "shuttle")]
mod shuttle {
    use std::time::Duration;

    use axum::Json;
    use futures_util::StreamExt;
    use reqwest::StatusCode;

    use super::*;
    use crate::helpers::TestDb;

    /// Shuttle's resource API as a local run sees it: the secrets, nothing to provision
    /// (the database comes from `LOCAL_DATABASE_URL`).
    fn resource_api(secrets: Value) -> Router {
        Router::new().route(
            "/projects/proj_LOCAL/resources/secrets",
            get(move || async move {
                Json(json!({ "type": "secrets", "state": "ready", "config": null, "output": secrets }))
            }),
        )
    }

    #[tokio::test]
    async fn under_shuttles_runtime_sigterm_drains_streams_and_saves_like_a_plain_run() {
        let db = TestDb::postgres().await;
        let api = stand_in(resource_api(json!({
            "LOCAL_DATABASE_URL": db.url,
            "LOG_FORMAT": "json",
            "SSE_PUBLISH_KEY": "publisher",
        })))
        .await;
        let port = TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let mut child = binary(env!("CARGO_BIN_EXE_nomey-sse-shuttle"))
            .envs([
                ("SHUTTLE_ENV", "local"),
                ("SHUTTLE_PROJECT_ID", "proj_LOCAL"),
                ("SHUTTLE_PROJECT_NAME", "nomey-sse"),
                ("SHUTTLE_RUNTIME_IP", "127.0.0.1"),
                ("SHUTTLE_API", &format!("http://{api}")),
            ])
            .env("SHUTTLE_RUNTIME_PORT", port.to_string())
            .spawn()
            .expect("start the Shuttle binary");
        let listening = logged(&mut child, "nomey-sse listening").await;
        let instance = listening["fields"]["instance_id"]
            .as_str()
            .unwrap()
            .to_owned();

        let http = reqwest::Client::new();
        let base = format!("http://127.0.0.1:{port}");
        let response = http
            .get(format!("{base}/api/sse?userId=u1"))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        let mut events = eventsource_stream::Eventsource::eventsource(response.bytes_stream());
        let connected = events.next().await.unwrap().unwrap();
        assert_eq!(connected.event, "connected");
        let client: Value = serde_json::from_str(&connected.data).unwrap();
        let client_id = client["clientId"].as_str().unwrap().to_owned();
        // The secrets reached the configuration: publishing needs the key.
        let body = json!({ "filter": { "userId": "u1" }, "event": "n", "data": 1 });
        let refused = http.post(format!("{base}/api/sse/notify")).json(&body);
        assert_eq!(
            refused.send().await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
        let published = http
            .post(format!("{base}/api/sse/notify"))
            .bearer_auth("publisher")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(published.status(), StatusCode::ACCEPTED);
        loop {
            let event = tokio::time::timeout(PATIENCE, events.next()).await.unwrap();
            if event.unwrap().unwrap().event == "n" {
                break;
            }
        }

        signal(&child, "TERM");
        let ended = tokio::time::timeout(PATIENCE, async {
            while let Some(Ok(_)) = events.next().await {}
        })
        .await;
        assert!(ended.is_ok(), "the open stream ends");
        tokio::time::timeout(Duration::from_secs(12), child.wait())
            .await
            .expect("exits within the drain's bound")
            .unwrap();

        // Only the drain's last save closes the session and removes the instance; a
        // process that exited at once would leave both for the reaper.
        let store = db.store().await;
        let session = store.session(&client_id).await.unwrap().unwrap();
        assert!(session.disconnected_at.is_some(), "the session is closed");
        assert_eq!(session.events_sent, 1);
        assert_eq!(
            store.other_instances("", 0).await.unwrap(),
            0,
            "{instance} left"
        );
    }
}

#[cfg(feature = "lambda")]
mod lambda {
    use std::{sync::Arc, time::Duration};

    use axum::{
        body::{Body, Bytes},
        extract::{Path, State},
        http::{HeaderMap, StatusCode},
        response::IntoResponse,
        routing::post,
    };
    use futures_util::StreamExt;
    use tokio::sync::{Mutex, mpsc};

    use super::*;
    use crate::helpers::{TestDb, spawn_app};

    /// One invocation's response as the Runtime API receives it.
    enum Chunk {
        Data(Bytes),
        End,
    }

    /// The Lambda Runtime API: hands out the invocations the test queues, and passes each
    /// streamed response on chunk by chunk, as it arrives.
    #[derive(Clone)]
    struct RuntimeApi {
        invocations: Arc<Mutex<mpsc::Receiver<(String, Value)>>>,
        chunks: mpsc::UnboundedSender<Chunk>,
        errors: mpsc::UnboundedSender<String>,
    }

    async fn next_invocation(State(api): State<RuntimeApi>) -> impl IntoResponse {
        let (id, event) = api.invocations.lock().await.recv().await.unwrap();
        let deadline = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis()
            + 900_000;
        (
            [
                ("lambda-runtime-aws-request-id", id),
                ("lambda-runtime-deadline-ms", deadline.to_string()),
                (
                    "lambda-runtime-invoked-function-arn",
                    "arn:aws:lambda:eu-west-1:000000000000:function:nomey-sse".to_owned(),
                ),
            ],
            event.to_string(),
        )
    }

    async fn response(
        State(api): State<RuntimeApi>,
        Path(_id): Path<String>,
        headers: HeaderMap,
        body: Body,
    ) -> StatusCode {
        assert_eq!(
            headers["lambda-runtime-function-response-mode"], "streaming",
            "the runtime streams the response"
        );
        let mut body = body.into_data_stream();
        while let Some(Ok(data)) = body.next().await {
            let _ = api.chunks.send(Chunk::Data(data));
        }
        let _ = api.chunks.send(Chunk::End);
        StatusCode::ACCEPTED
    }

    async fn error(State(api): State<RuntimeApi>, body: String) -> StatusCode {
        let _ = api.errors.send(body);
        StatusCode::ACCEPTED
    }

    /// A function URL request (API Gateway's HTTP payload, version 2.0).
    fn sse_request(query: &str, last_event_id: Option<i64>) -> Value {
        let mut headers =
            json!({ "host": "nomey.lambda-url.eu-west-1.on.aws", "accept": "text/event-stream" });
        if let Some(id) = last_event_id {
            headers["last-event-id"] = json!(id.to_string());
        }
        json!({
            "version": "2.0",
            "routeKey": "$default",
            "rawPath": "/api/sse",
            "rawQueryString": query,
            "headers": headers,
            "isBase64Encoded": false,
            "requestContext": {
                "accountId": "anonymous",
                "apiId": "nomey",
                "domainName": "nomey.lambda-url.eu-west-1.on.aws",
                "domainPrefix": "nomey",
                "requestId": "request",
                "routeKey": "$default",
                "stage": "$default",
                "time": "30/Nov/2026:12:00:00 +0000",
                "timeEpoch": 0,
                "http": {
                    "method": "GET",
                    "path": "/api/sse",
                    "protocol": "HTTP/1.1",
                    "sourceIp": "127.0.0.1",
                    "userAgent": "test"
                }
            }
        })
    }

    /// Reads one streamed response: its metadata prelude, then SSE frames as they come.
    struct Invocation<'a> {
        chunks: &'a mut mpsc::UnboundedReceiver<Chunk>,
        buffer: String,
        prelude: Option<Value>,
        ended: bool,
    }

    impl<'a> Invocation<'a> {
        fn new(chunks: &'a mut mpsc::UnboundedReceiver<Chunk>) -> Self {
            Self {
                chunks,
                buffer: String::new(),
                prelude: None,
                ended: false,
            }
        }

        /// Takes one chunk; false once the response has ended.
        async fn read(&mut self) -> bool {
            let chunk = tokio::time::timeout(PATIENCE, self.chunks.recv())
                .await
                .expect("a chunk within the patience")
                .expect("the stand-in is running");
            match chunk {
                Chunk::Data(data) => self.buffer.push_str(std::str::from_utf8(&data).unwrap()),
                Chunk::End => self.ended = true,
            }
            if self.prelude.is_none() {
                // The prelude is JSON followed by eight NUL bytes.
                if let Some((prelude, rest)) = self.buffer.split_once("\0\0\0\0\0\0\0\0") {
                    self.prelude = Some(serde_json::from_str(prelude).unwrap());
                    self.buffer = rest.to_owned();
                }
            }
            !self.ended
        }

        /// The next complete SSE frame as (event, id, data), or `None` at the end.
        async fn frame(&mut self) -> Option<(String, Option<i64>, String)> {
            loop {
                if self.prelude.is_some()
                    && let Some((frame, rest)) = self.buffer.split_once("\n\n")
                {
                    let frame = frame.to_owned();
                    self.buffer = rest.to_owned();
                    let field = |name: &str| {
                        frame
                            .lines()
                            .find_map(|l| l.strip_prefix(name))
                            .map(str::to_owned)
                    };
                    let Some(event) = field("event: ") else {
                        continue;
                    };
                    let id = field("id: ").map(|id| id.parse().unwrap());
                    return Some((event, id, field("data: ").unwrap_or_default()));
                }
                if self.ended || !self.read().await {
                    return None;
                }
            }
        }

        /// The next frame named `event`, skipping others.
        async fn named(&mut self, event: &str) -> (Option<i64>, String) {
            loop {
                let (name, id, data) = self.frame().await.expect("the response ended early");
                if name == event {
                    return (id, data);
                }
            }
        }
    }

    #[tokio::test]
    async fn under_lambdas_runtime_a_stream_arrives_chunk_by_chunk_ends_in_time_and_resumes() {
        let db = TestDb::postgres().await;
        // Publishers reach the function's instance through the database, as in AWS.
        let publisher = spawn_app(&db).await;
        let (queue, invocations) = mpsc::channel(4);
        let (chunks_tx, mut chunks) = mpsc::unbounded_channel();
        let (errors_tx, mut errors) = mpsc::unbounded_channel();
        let api = RuntimeApi {
            invocations: Arc::new(Mutex::new(invocations)),
            chunks: chunks_tx,
            errors: errors_tx,
        };
        let addr = stand_in(
            Router::new()
                .route("/2018-06-01/runtime/invocation/next", get(next_invocation))
                .route(
                    "/2018-06-01/runtime/invocation/{id}/response",
                    post(response),
                )
                .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
                .route("/2018-06-01/runtime/init/error", post(error))
                .with_state(api),
        )
        .await;
        let mut child = binary(env!("CARGO_BIN_EXE_nomey-sse-lambda"))
            .envs([
                ("AWS_LAMBDA_FUNCTION_NAME", "nomey-sse"),
                ("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512"),
                ("AWS_LAMBDA_FUNCTION_VERSION", "$LATEST"),
                ("DATABASE_URL", &db.url),
                ("LOG_FORMAT", "json"),
                ("MAX_STREAM_DURATION_MS", "4000"),
            ])
            .env("AWS_LAMBDA_RUNTIME_API", addr.to_string())
            .spawn()
            .expect("start the Lambda binary");
        logged(&mut child, "nomey-sse ready").await;

        queue
            .send(("first".into(), sse_request("userId=u1", None)))
            .await
            .unwrap();
        let mut first = Invocation::new(&mut chunks);
        first.named("connected").await;
        let prelude = first.prelude.clone().unwrap();
        assert_eq!(prelude["statusCode"], 200);
        assert_eq!(prelude["headers"]["content-type"], "text/event-stream");
        // Each event is published only after the previous one arrived while the
        // response was still open: the body streams, it is not sent at the end.
        let mut last = 0;
        for n in 0..3 {
            let published = publisher
                .notify(json!({ "userId": "u1" }), "n", json!(n))
                .await;
            let (id, data) = first.named("n").await;
            assert!(
                !first.ended,
                "event {n} arrived while the response was open"
            );
            assert_eq!(id, published["eventId"].as_i64());
            assert_eq!(data, n.to_string());
            last = id.unwrap();
        }
        // MAX_STREAM_DURATION_MS ends the response before the platform would.
        let open_for = std::time::Instant::now();
        while first.frame().await.is_some() {}
        assert!(open_for.elapsed() < Duration::from_secs(5));

        // Published while no stream is open, then resumed by the client's reconnect.
        let mut missed = Vec::new();
        for n in 3..5 {
            let published = publisher
                .notify(json!({ "userId": "u1" }), "n", json!(n))
                .await;
            missed.push(published["eventId"].as_i64());
        }
        queue
            .send(("second".into(), sse_request("userId=u1", Some(last))))
            .await
            .unwrap();
        let mut second = Invocation::new(&mut chunks);
        let mut resumed = Vec::new();
        while resumed.len() < missed.len() {
            resumed.push(second.named("n").await.0);
        }
        assert_eq!(resumed, missed);
        assert!(
            errors.try_recv().is_err(),
            "no invocation reported an error"
        );

        signal(&child, "TERM");
        let stopped = tokio::time::timeout(PATIENCE, child.wait()).await;
        assert!(stopped.expect("stops after SIGTERM").unwrap().success());
    }
}
