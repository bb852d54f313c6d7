//! The body of one SSE response: its opening frames, its history, then its queue.

use std::{
    collections::VecDeque,
    convert::Infallible,
    pin::Pin,
    task::{Context, Poll, ready},
    time::Duration,
};

use bytes::Bytes;
use futures_util::{Stream, future::FutureExt};
use tokio::time::{Instant, Sleep};

use super::{Registration, SessionRecord};
use crate::event::now_millis;

/// A stored event read back for a stream that is catching up.
#[derive(Debug)]
pub struct Replayed {
    pub id: i64,
    pub frame: Bytes,
    /// The event names this stream's user, so handing it over settles a pending row.
    pub settles_pending: bool,
}

/// Stored events a stream catches up on before live ones; an error ends the stream, and
/// the client resumes from the last id it got.
pub type HistoryStream = Pin<Box<dyn Stream<Item = Result<Replayed, ()>> + Send>>;

/// One open stream. Ends when its deadline passes, when the hub drops its queue (shutdown,
/// too slow, stale) or when its history cannot be read; dropping it unregisters the client
/// and records the session's end.
pub struct ClientStream {
    opening: VecDeque<Bytes>,
    history: Option<HistoryStream>,
    registration: Registration,
    deadline: Option<Pin<Box<Sleep>>>,
    /// The client's `Last-Event-ID`: live events up to it are not sent again. (Only an
    /// instance that has not yet dispatched what the client saw elsewhere queues such.)
    seen_through: i64,
}

impl ClientStream {
    pub fn new(
        registration: Registration,
        opening: Vec<Bytes>,
        history: Option<HistoryStream>,
        max_duration: Option<Duration>,
        seen_through: Option<i64>,
    ) -> Self {
        let hub = &registration.hub;
        hub.ledger().opened();
        let info = &registration.client.info;
        tracing::info!(
            client_id = %info.client_id,
            user_id = info.user_id.as_deref(),
            session_id = info.session_id.as_deref(),
            last_event_id = seen_through,
            "stream opened"
        );
        Self {
            opening: opening.into(),
            history,
            deadline: max_duration.map(|d| Box::pin(tokio::time::sleep_until(Instant::now() + d))),
            registration,
            seen_through: seen_through.unwrap_or(0),
        }
    }

    fn settle(&self, id: i64) {
        if let Some(user) = &self.registration.client.info.user_id {
            self.registration.hub.ledger().settled(user.clone(), id);
        }
    }

    fn wrote_stored(&self, id: i64, len: usize, from_queue: bool, settles_pending: bool) {
        let now = now_millis();
        let hub = &self.registration.hub;
        self.registration.client.wrote(len, id > 0, now, from_queue);
        hub.metrics()
            .frames_written
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        if id > 0 {
            hub.ledger().wrote_event(now);
            if settles_pending {
                self.settle(id);
            }
        }
    }
}

impl Stream for ClientStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(deadline) = &mut self.deadline {
            if deadline.poll_unpin(cx).is_ready() {
                return Poll::Ready(None);
            }
        }
        if let Some(frame) = self.opening.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(history) = &mut self.history {
            match ready!(history.as_mut().poll_next(cx)) {
                Some(Ok(event)) => {
                    self.wrote_stored(event.id, event.frame.len(), false, event.settles_pending);
                    return Poll::Ready(Some(Ok(event.frame)));
                }
                Some(Err(())) => return Poll::Ready(None),
                None => self.history = None,
            }
        }
        loop {
            match ready!(self.registration.rx.poll_recv(cx)) {
                Some(frame) if frame.id > 0 && frame.id <= self.seen_through => {
                    self.registration.client.skipped(frame.bytes.len());
                }
                Some(frame) => {
                    self.wrote_stored(frame.id, frame.bytes.len(), true, frame.settles_pending);
                    return Poll::Ready(Some(Ok(frame.bytes)));
                }
                None => return Poll::Ready(None),
            }
        }
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        let client = &self.registration.client;
        let hub = &self.registration.hub;
        let session = SessionRecord::new(client, hub.instance_id(), Some(now_millis()));
        tracing::info!(
            client_id = %client.info.client_id,
            user_id = client.info.user_id.as_deref(),
            duration_ms = session.duration_ms(),
            events_sent = session.events_sent,
            "stream closed"
        );
        hub.ledger().closed(session);
    }
}
