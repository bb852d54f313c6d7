//! `GET /api/sse` connections, served without hyper so that an open stream keeps no HTTP
//! buffers: hyper holds 8 KiB to read and 8 KiB to write for a connection's whole life,
//! more than everything else a stream costs.
//!
//! The request still goes through the router, so access, validation, CORS and errors
//! are the same as on any route; only the HTTP/1.1 framing is here. The response ends
//! the connection (`Connection: close`), as a stream's end almost always does anyway.
//!
//! While a stream waits with nothing to write, it lends its connection to the hub, whose
//! dispatcher then writes the next event itself ([`crate::hub::LentConnection`]).

use std::{
    future::poll_fn,
    io,
    io::IoSlice,
    sync::{
        Arc, Mutex, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use axum::{
    Router,
    body::{Body, Bytes, HttpBody},
    extract::Request,
    http::{StatusCode, Version, header},
    response::Response,
};
use futures_util::{FutureExt, Stream, StreamExt};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    time::{Instant, timeout_at},
};
use tokio_util::sync::CancellationToken;
use tower::ServiceExt;

use super::{ConnectionHandle, RequestStart, StreamSlot};
use crate::{
    hub::{LentConnection, Wrote},
    service::ClientStream,
};

/// The request line's start that this path serves; `?` or a space must follow.
const STREAM_LINE: &[u8] = b"GET /api/sse";
/// Limits as hyper's on every other route: a head over this gets 431 (414 if its request
/// line alone is that long), and so does a URI over `MAX_URI` (414).
const MAX_HEAD: usize = 8192 + 4096 * 100;
const MAX_URI: usize = 65_534;
/// As many header lines as hyper accepts by default.
const MAX_HEADERS: usize = 100;
/// Most queued frames that go out together in one write, after the frame that woke the
/// stream or with the response head.
const MAX_BATCH: usize = 64;

/// Who serves a new connection, from its first bytes.
pub(super) enum Route {
    /// `GET /api/sse`: this module.
    Stream,
    /// Anything else: hyper.
    Other,
    /// Nothing arrived in time, or the peer closed: drop the connection.
    Nothing,
}

/// Looks at the first bytes without taking them, so hyper can still read them all.
pub(super) async fn route(socket: &TcpStream, deadline: Instant) -> Route {
    let mut seen = [0u8; STREAM_LINE.len() + 1];
    loop {
        let n = match timeout_at(deadline, socket.peek(&mut seen)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Route::Nothing,
            Ok(Ok(n)) => n,
        };
        if n == seen.len() {
            let stream = seen.starts_with(STREAM_LINE) && matches!(seen[n - 1], b'?' | b' ');
            return if stream { Route::Stream } else { Route::Other };
        }
        if !STREAM_LINE.starts_with(&seen[..n]) {
            return Route::Other;
        }
        // Part of a request line that may still be a stream's: wait for the rest. (Peeking
        // leaves the socket readable, so waiting for readiness would not wait.)
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// Reads the request head, answers it through the router, writes the response and closes.
pub(super) async fn serve(
    mut socket: TcpStream,
    router: Router,
    start: Instant,
    kill: CancellationToken,
    request_timeout: std::time::Duration,
) {
    // Boxed, as is the handler below: a future is as large as its largest state, and
    // what reading the head needs would otherwise stay with the open stream.
    let reading = Box::pin(timeout_at(
        start + request_timeout,
        read_request(&mut socket),
    ));
    let mut request = match reading.await {
        Ok(Ok(request)) => request,
        Ok(Err(Refused::Status(status))) => {
            let _ = socket
                .write_all(super::parser_errors::answer(status).as_bytes())
                .await;
            linger(&socket).await;
            return;
        }
        Ok(Err(Refused::Gone)) | Err(_) => return,
    };
    let version = request.version();
    // HTTP/1.0 has no chunks: such a body ends when the connection closes.
    let connection = Arc::new(Connection {
        socket,
        chunked: version == Version::HTTP_11,
        has_rest: AtomicBool::new(false),
        rest: Mutex::default(),
    });
    let socket = &connection.socket;
    request.extensions_mut().insert(RequestStart(start));
    request.extensions_mut().insert(ConnectionHandle(kill));
    let slot = StreamSlot::default();
    request.extensions_mut().insert(slot.clone());
    let Ok(response) = Box::pin(router.oneshot(request)).await;
    // Kept here, and lent below: an async fn's arguments stay in its future for its whole
    // life, so passing the stream on by value would hold it twice in every open stream.
    // Only a stream the response stands for: a layer that answered otherwise (an error, a
    // timeout) gets its own body written.
    let mut stream = slot.take().filter(|_| response.status() == StatusCode::OK);
    drop(slot);
    if let Some(stream) = &stream {
        stream.attach(connection.clone());
    }
    let refused = !response.status().is_success();
    // A fired `kill` drops this future in the accept loop: no second watch on it here.
    if let Err(error) = write_response(&connection, response, version, stream.as_mut()).await {
        tracing::debug!(%error, "stream connection ended with an error");
    } else if refused {
        // The client may still be sending (a body it announced): let it read the answer.
        linger(socket).await;
    }
}

/// A stream's connection, shared with the hub (see the module's docs).
struct Connection {
    socket: TcpStream,
    /// HTTP/1.1: a stream's frames go out as chunks (HTTP/1.0 has none).
    chunked: bool,
    /// What the dispatcher could not write of a frame: the task writes it first.
    rest: Mutex<Option<Bytes>>,
    /// `rest` holds something: looked at before each write, so the lock is taken only then.
    has_rest: AtomicBool,
}

impl Connection {
    fn take_rest(&self) -> Option<Bytes> {
        // Set only by the dispatcher, and only while the task cannot be here.
        if !self.has_rest.load(Ordering::Acquire) {
            return None;
        }
        self.has_rest.store(false, Ordering::Relaxed);
        self.rest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
    }
}

impl LentConnection for Connection {
    fn write_now(&self, frame: &Bytes) -> Wrote {
        if frame.is_empty() {
            return Wrote::All;
        }
        let mut size = [0u8; 18];
        let (head, tail): (&[u8], &[u8]) = match self.chunked {
            true => (chunk_size(&mut size, frame.len()), b"\r\n"),
            false => (b"", b""),
        };
        let mut parts = [IoSlice::new(head), IoSlice::new(frame), IoSlice::new(tail)];
        let length = head.len() + frame.len() + tail.len();
        // An error: the task meets it on its next write, or its peer's close.
        let sent = try_send(&self.socket, &parts).unwrap_or(0);
        if sent == 0 {
            return Wrote::Nothing;
        }
        if sent < length {
            let mut parts = &mut parts[..];
            IoSlice::advance_slices(&mut parts, sent);
            let mut rest = Vec::with_capacity(length - sent);
            for part in parts.iter() {
                rest.extend_from_slice(part);
            }
            *self.rest.lock().unwrap_or_else(PoisonError::into_inner) = Some(rest.into());
            self.has_rest.store(true, Ordering::Release);
            return Wrote::Part;
        }
        Wrote::All
    }
}

/// Closes our side, then reads what the client still sends for up to a second: closing
/// with unread bytes would reset the connection, and the client might lose the answer.
/// (Every state of `serve` counts towards each stream's size: no buffers across awaits.)
async fn linger(socket: &TcpStream) {
    shutdown(socket);
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), closed_by_peer(socket)).await;
}

enum Refused {
    /// Answer with this status and close.
    Status(StatusCode),
    /// The peer closed or failed: nothing to answer.
    Gone,
}

async fn read_request(socket: &mut TcpStream) -> Result<Request, Refused> {
    let mut head = Vec::with_capacity(1024);
    loop {
        head.reserve(4096);
        let searched = head.len().saturating_sub(3);
        match socket.read_buf(&mut head).await {
            Ok(0) | Err(_) => return Err(Refused::Gone),
            Ok(_) => {}
        }
        if head.len() > MAX_HEAD {
            let line_ended = head.windows(2).any(|w| w == b"\r\n");
            return Err(Refused::Status(if line_ended {
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE
            } else {
                StatusCode::URI_TOO_LONG
            }));
        }
        if head[searched..].windows(4).any(|w| w == b"\r\n\r\n") {
            return parse_request(&head);
        }
    }
}

fn parse_request(head: &[u8]) -> Result<Request, Refused> {
    let bad = |_| Refused::Status(StatusCode::BAD_REQUEST);
    let mut lines = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut lines);
    match parsed.parse(head) {
        Ok(httparse::Status::Complete(_)) => {}
        Ok(httparse::Status::Partial) => return Err(Refused::Status(StatusCode::BAD_REQUEST)),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refused::Status(StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE));
        }
        Err(_) => return Err(Refused::Status(StatusCode::BAD_REQUEST)),
    }
    if parsed.path.is_some_and(|path| path.len() > MAX_URI) {
        return Err(Refused::Status(StatusCode::URI_TOO_LONG));
    }
    let version = match parsed.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    let mut request = Request::builder()
        .method(parsed.method.unwrap_or("GET"))
        .uri(parsed.path.unwrap_or("/"))
        .version(version);
    for line in parsed.headers.iter() {
        request = request.header(line.name, line.value);
    }
    request.body(Body::empty()).map_err(bad)
}

/// The `date` header's value: now.
pub(super) fn now_date() -> String {
    httpdate::fmt_http_date(std::time::SystemTime::now())
}

/// Writes the response; its frames come from `stream` when the handler left the stream
/// there, else from its body.
async fn write_response(
    connection: &Connection,
    response: Response,
    version: Version,
    stream: Option<&mut ClientStream>,
) -> io::Result<()> {
    let (parts, body) = response.into_parts();
    let length = match stream {
        Some(_) => None,
        None => HttpBody::size_hint(&body).exact(),
    };
    let chunked = length.is_none() && connection.chunked;
    let mut head = format!(
        "{} {} {}\r\n",
        if version == Version::HTTP_10 {
            "HTTP/1.0"
        } else {
            "HTTP/1.1"
        },
        parts.status.as_u16(),
        parts.status.canonical_reason().unwrap_or(""),
    )
    .into_bytes();
    for (name, value) in &parts.headers {
        // The framing is this function's: a layer's `content-length` for the empty body
        // a stream's handler returns must not go out beside `transfer-encoding`.
        if name == header::CONNECTION
            || name == header::TRANSFER_ENCODING
            || name == header::CONTENT_LENGTH
        {
            continue;
        }
        head.extend_from_slice(name.as_str().as_bytes());
        head.extend_from_slice(b": ");
        head.extend_from_slice(value.as_bytes());
        head.extend_from_slice(b"\r\n");
    }
    if let Some(length) = length {
        head.extend_from_slice(format!("content-length: {length}\r\n").as_bytes());
    }
    if chunked {
        head.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    head.extend_from_slice(format!("date: {}\r\n", now_date()).as_bytes());
    head.extend_from_slice(b"connection: close\r\n\r\n");
    // Nothing of the head stays with the open stream.
    drop(parts);
    match stream {
        Some(stream) => {
            // Layers' wrappers around an empty body: nothing to keep for the stream's life.
            drop(body);
            write_frames(connection, head, stream, chunked).await
        }
        None => write_frames(connection, head, &mut body.into_data_stream(), chunked).await,
    }
}

/// What the write loop needs of a response's frames besides the frames.
trait Frames: Stream<Item = Result<Bytes, Self::Error>> + Unpin {
    type Error: Into<Box<dyn std::error::Error + Send + Sync>>;
    /// Nothing is left to write ahead of the next frame: the hub may write it itself.
    fn lend(&self) {}
    /// Takes the connection back before writing; `false` while the hub is writing.
    fn reclaim(&self) -> bool {
        true
    }
}

impl Frames for ClientStream {
    type Error = std::convert::Infallible;

    fn lend(&self) {
        ClientStream::lend(self);
    }

    fn reclaim(&self) -> bool {
        ClientStream::reclaim(self)
    }
}

/// A body the hub knows nothing of: never lent.
impl Frames for axum::body::BodyDataStream {
    type Error = axum::Error;
}

/// What the write loop waits for.
enum Next<T> {
    Frame(Option<T>),
    /// The rest of a frame the hub began.
    Rest(Bytes),
    Closed,
}

/// Writes the head, then the body's frames as they come until it ends or the peer closes.
async fn write_frames<S: Frames>(
    connection: &Connection,
    head: Vec<u8>,
    frames: &mut S,
    chunked: bool,
) -> io::Result<()> {
    let socket = &connection.socket;
    // The head and the frames already waiting (a stream's `retry` and `connected`) in one
    // write: one system call, and one wake-up of the client, per new stream.
    let mut opening = Vec::new();
    let mut ended = take_ready(frames, &mut opening)?;
    write_data(socket, &head, &[], &opening, chunked).await?;
    drop((head, opening));
    while !ended {
        // The frames first; the peer's close only while there are none. (The same
        // readiness slot each time: a `readable()` future per event would join and leave a
        // waiter list under a lock.)
        let next = poll_fn(|cx| {
            if !frames.reclaim() {
                // The hub is writing one frame: try again after it.
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            if let Some(rest) = connection.take_rest() {
                return Poll::Ready(Next::Rest(rest));
            }
            match frames.poll_next_unpin(cx) {
                Poll::Ready(frame) => Poll::Ready(Next::Frame(frame)),
                Poll::Pending => match poll_closed_by_peer(socket, cx) {
                    Poll::Ready(()) => Poll::Ready(Next::Closed),
                    Poll::Pending => {
                        frames.lend();
                        Poll::Pending
                    }
                },
            }
        });
        let first = match next.await {
            Next::Frame(Some(Ok(data))) => data,
            Next::Frame(Some(Err(error))) => return Err(io::Error::other(error)),
            Next::Frame(None) => break,
            Next::Rest(rest) => {
                write_all_vectored(socket, &mut [IoSlice::new(&rest)]).await?;
                continue;
            }
            Next::Closed => return Ok(()),
        };
        // Whatever else is already queued goes out in the same write: in a burst, one
        // system call for many events. (`more` allocates only when there is more.)
        let mut more = Vec::new();
        ended = take_ready(frames, &mut more)?;
        write_data(socket, b"", std::slice::from_ref(&first), &more, chunked).await?;
    }
    if chunked {
        write_all_vectored(socket, &mut [IoSlice::new(b"0\r\n\r\n")]).await?;
    }
    shutdown(socket);
    Ok(())
}

/// Ends our side of the connection (a FIN after what is written).
fn shutdown(socket: &TcpStream) {
    let _ = socket2::SockRef::from(socket).shutdown(std::net::Shutdown::Write);
}

/// Moves the frames the stream has ready now, up to `MAX_BATCH`, into `ready`; `true`
/// when the stream ended.
fn take_ready<S: Frames>(frames: &mut S, ready: &mut Vec<Bytes>) -> io::Result<bool> {
    while ready.len() < MAX_BATCH {
        match frames.next().now_or_never() {
            Some(Some(Ok(data))) => ready.push(data),
            Some(Some(Err(error))) => return Err(io::Error::other(error)),
            Some(None) => return Ok(true),
            None => break,
        }
    }
    Ok(false)
}

/// Writes `prefix` (raw), then `first` and `more` as one chunk (or raw, without chunks):
/// one write when the socket takes it all, and no allocation for a lone frame.
async fn write_data(
    socket: &TcpStream,
    prefix: &[u8],
    first: &[Bytes],
    more: &[Bytes],
    chunked: bool,
) -> io::Result<()> {
    let length: usize = first.iter().chain(more).map(Bytes::len).sum();
    if prefix.is_empty() && length == 0 {
        // Empty frames: nothing to send (and a write of nothing would fail as `WriteZero`).
        return Ok(());
    }
    let mut size = [0u8; 18];
    let (head, tail): (&[u8], &[u8]) = match (chunked, length) {
        // A chunk of size 0 would end the body.
        (true, 1..) => (chunk_size(&mut size, length), b"\r\n"),
        _ => (b"", b""),
    };
    if first.len() + more.len() <= 1 {
        let data = first.iter().chain(more).next().map_or(&[][..], |data| data);
        let mut parts = [
            IoSlice::new(prefix),
            IoSlice::new(head),
            IoSlice::new(data),
            IoSlice::new(tail),
        ];
        let mut parts = &mut parts[..];
        // An error surfaces again on the write that follows.
        let sent = try_send(socket, parts).unwrap_or(0);
        IoSlice::advance_slices(&mut parts, sent);
        return write_all_vectored(socket, parts).await;
    }
    let mut parts = Vec::with_capacity(first.len() + more.len() + 3);
    parts.push(IoSlice::new(prefix));
    parts.push(IoSlice::new(head));
    parts.extend(first.iter().chain(more).map(|data| IoSlice::new(data)));
    parts.push(IoSlice::new(tail));
    write_all_vectored(socket, &mut parts).await
}

/// A chunk's size line, `<hex>\r\n`, written into `buf`.
fn chunk_size(buf: &mut [u8; 18], length: usize) -> &[u8] {
    use std::io::Write;
    let mut rest = &mut buf[..];
    // 16 hex digits and CRLF always fit.
    let _ = write!(rest, "{length:x}\r\n");
    let written = 18 - rest.len();
    &buf[..written]
}

/// Writes up to this size go out as one contiguous `send` rather than a `writev` of
/// their pieces: the kernel's vectored path costs more than copying a few hundred bytes.
const SMALL_WRITE: usize = 1024;

/// Sends what of `parts` the socket takes now, without waiting; small writes are copied
/// together first. Not async, so the copy is never part of a stream's state.
fn try_send(socket: &TcpStream, parts: &[IoSlice<'_>]) -> io::Result<usize> {
    let length: usize = parts.iter().map(|part| part.len()).sum();
    let sent = if length > SMALL_WRITE {
        socket.try_write_vectored(parts)
    } else {
        let mut buf = [0u8; SMALL_WRITE];
        let mut end = 0;
        for part in parts {
            buf[end..end + part.len()].copy_from_slice(part);
            end += part.len();
        }
        socket.try_write(&buf[..end])
    };
    match sent {
        Err(error) if error.kind() == io::ErrorKind::WouldBlock => Ok(0),
        sent => sent,
    }
}

async fn write_all_vectored(socket: &TcpStream, parts: &mut [IoSlice<'_>]) -> io::Result<()> {
    let mut parts = parts;
    while !parts.is_empty() {
        let written = match socket.try_write_vectored(parts) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(written) => written,
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {
                // Not `writable()`, whose future would add its size to every stream's.
                poll_fn(|cx| socket.poll_write_ready(cx)).await?;
                continue;
            }
            Err(error) => return Err(error),
        };
        IoSlice::advance_slices(&mut parts, written);
    }
    Ok(())
}

/// Completes when the peer closes its side or the connection fails. Bytes it sends meanwhile
/// are read and dropped: a stream's request has no body.
async fn closed_by_peer(socket: &TcpStream) {
    poll_fn(|cx| poll_closed_by_peer(socket, cx)).await;
}

fn poll_closed_by_peer(socket: &TcpStream, cx: &mut Context<'_>) -> Poll<()> {
    loop {
        if ready!(socket.poll_read_ready(cx)).is_err() {
            return Poll::Ready(());
        }
        // Never held across an await, so it takes no room in the stream's future.
        let mut sink = [0u8; 4096];
        match socket.try_read(&mut sink) {
            Ok(0) => return Poll::Ready(()),
            Ok(_) => {}
            // Readiness is cleared: the next poll waits for more.
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return Poll::Ready(()),
        }
    }
}
