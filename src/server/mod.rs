//! The accept loop: hyper's HTTP/1 connection builder driven directly, except for
//! `GET /api/sse`, which `sse` serves without HTTP buffers.
//!
//! `axum::serve` costs about 11 KB more per idle stream (it rebuilds the router per
//! connection, and its protocol sniffing grows hyper's read buffer to 16 KB), cannot
//! cancel one connection, and has no answer to running out of
//! file descriptors. Here each connection carries a `ConnectionHandle` the hub can fire,
//! and counts against the open-files budget.

use std::{
    future::Future,
    io,
    pin::Pin,
    sync::{
        Arc, PoisonError,
        atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use axum::{Router, body::Body, extract::Request};
use hyper::body::Incoming;
use hyper_util::{
    rt::{TokioIo, TokioTimer},
    server::graceful::GracefulShutdown,
};
use tokio::net::TcpListener;
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tower::ServiceExt;

use crate::service::ClientStream;

mod parser_errors;
mod sse;

/// Open connections against the open-files limit, so that streams are refused with 503
/// while descriptors remain for the database, the listener and everything else.
#[derive(Clone, Debug)]
pub struct FileBudget {
    open: Arc<AtomicUsize>,
    limit: usize,
}

/// Descriptors kept for everything that is not a client connection.
const RESERVED_FILES: usize = 64;

impl FileBudget {
    pub fn new(soft_limit: u64) -> Self {
        Self {
            open: Arc::default(),
            limit: soft_limit.saturating_sub(RESERVED_FILES as u64) as usize,
        }
    }

    /// Counts one connection until the guard drops.
    pub fn open(&self) -> FileGuard {
        self.open.fetch_add(1, Relaxed);
        FileGuard(self.open.clone())
    }

    pub fn exhausted(&self) -> bool {
        self.open.load(Relaxed) > self.limit
    }
}

pub struct FileGuard(Arc<AtomicUsize>);

impl Drop for FileGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Relaxed);
    }
}

/// Cancels the connection a request came on; the server puts it in each request's
/// extensions, and the hub fires it to cut off a stream that is too slow or stale.
#[derive(Clone, Debug)]
pub struct ConnectionHandle(pub CancellationToken);

/// Where `GET /api/sse` leaves its stream when `sse` serves the connection: the frames
/// then go from the stream to the socket with no response body, and no layer's wrapper
/// around one, in between. The handler's response carries the status and headers.
#[derive(Clone, Default)]
pub struct StreamSlot(Arc<std::sync::Mutex<Option<ClientStream>>>);

impl StreamSlot {
    pub fn put(&self, stream: ClientStream) {
        *self.0.lock().unwrap_or_else(PoisonError::into_inner) = Some(stream);
    }

    fn take(&self) -> Option<ClientStream> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner).take()
    }
}

impl std::fmt::Debug for StreamSlot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("StreamSlot")
    }
}

/// When a request began to arrive, as near as the server knows: the connection's accept
/// for its first request, else the moment its headers were complete. The request read
/// (`REQUEST_TIMEOUT_MS`) is measured from here, so that slow headers and a slow body
/// together cannot hold a fresh connection for twice the limit.
#[derive(Clone, Copy, Debug)]
pub struct RequestStart(pub tokio::time::Instant);

/// Serves until `shutdown` fires, then waits up to `drain` for open connections to finish.
///
/// `client_timeout` bounds how long data written to a connection may stay unacknowledged:
/// a client that vanished without closing (a laptop lid, a dropped network) then fails
/// the next write instead of letting the kernel buffer heartbeats for many minutes.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    files: FileBudget,
    shutdown: CancellationToken,
    client_timeout: Duration,
    request_timeout: Duration,
    drain: Duration,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(request_timeout);
    // Shared by every connection's task, which holds it for its whole life.
    let http = Arc::new(http);
    let graceful = GracefulShutdown::new();
    let connections = TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            () = shutdown.cancelled() => break,
        };
        let socket = match accepted {
            Ok((socket, _)) => socket,
            Err(error) => {
                accept_failed(&error).await;
                continue;
            }
        };
        let _ = socket.set_nodelay(true);
        #[cfg(any(target_os = "linux", target_os = "android"))]
        let _ = socket2::SockRef::from(&socket).set_tcp_user_timeout(Some(client_timeout));
        let guard = files.open();
        let kill = CancellationToken::new();
        let handle = ConnectionHandle(kill.clone());
        let router = router.clone();
        let accepted_at = tokio::time::Instant::now();
        let watcher = graceful.watcher();
        let http = Arc::clone(&http);
        connections.spawn(async move {
            let route = sse::route(&socket, accepted_at + request_timeout).await;
            // Each kind of connection in its own allocation: a task's future is as large as
            // its largest state, and hyper's connection would make every stream's as large.
            let served: Pin<Box<dyn Future<Output = ()> + Send>> = match route {
                sse::Route::Stream => Box::pin(sse::serve(
                    socket,
                    router,
                    accepted_at,
                    kill.clone(),
                    request_timeout,
                )),
                sse::Route::Other => {
                    let first = AtomicBool::new(true);
                    let service =
                        hyper::service::service_fn(move |mut request: Request<Incoming>| {
                            let started = if first.swap(false, Relaxed) {
                                accepted_at
                            } else {
                                tokio::time::Instant::now()
                            };
                            request.extensions_mut().insert(RequestStart(started));
                            request.extensions_mut().insert(handle.clone());
                            router.clone().oneshot(request.map(Body::new))
                        });
                    let connection = watcher.watch(http.serve_connection(
                        TokioIo::new(parser_errors::WithJsonRefusals::new(socket)),
                        service,
                    ));
                    Box::pin(async move {
                        if let Err(error) = connection.await {
                            tracing::debug!(%error, "connection ended with an error");
                        }
                    })
                }
                sse::Route::Nothing => Box::pin(std::future::ready(())),
            };
            tokio::select! {
                () = served => {}
                () = kill.cancelled() => {}
            }
            drop(guard);
        });
    }
    drop(listener);
    connections.close();
    let drained = async {
        // Tells hyper's connections to finish; streams end as the hub closes.
        graceful.shutdown().await;
        connections.wait().await;
    };
    tokio::select! {
        () = drained => {}
        () = tokio::time::sleep(drain) => tracing::warn!("connections still open after the shutdown grace period"),
    }
}

/// Accept errors are about one connection or a passing shortage; the loop goes on.
async fn accept_failed(error: &io::Error) {
    // EMFILE / ENFILE: the process or the system is out of descriptors. Wait for some to
    // be released instead of spinning; new streams are refused with 503 meanwhile.
    if matches!(error.raw_os_error(), Some(23 | 24)) {
        tracing::warn!(%error, "out of file descriptors; pausing accept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    } else {
        tracing::debug!(%error, "accept failed");
    }
}
