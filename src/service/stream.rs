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

use super::{EventService, session_record};
use crate::{event::now_millis, hub::Registration};

/// A stored event read back for a stream that is catching up.
#[derive(Debug)]
pub(crate) struct Replayed {
    pub id: i64,
    pub frame: Bytes,
    /// The event names this stream's user, so handing it over settles a pending row.
    pub settles_pending: bool,
}

/// Stored events a stream catches up on before live ones; an error ends the stream, and
/// the client resumes from the last id it got.
pub(crate) type HistoryStream = Pin<Box<dyn Stream<Item = Result<Replayed, ()>> + Send>>;

/// One open stream. Ends when its deadline passes, when the hub lets it go (shutdown,
/// too slow, stale) or when its history cannot be read; dropping it unregisters the client
/// and records the session's end.
pub struct ClientStream {
    opening: VecDeque<Bytes>,
    history: Option<HistoryStream>,
    registration: Registration,
    service: EventService,
    deadline: Option<Pin<Box<Sleep>>>,
    /// The client's `Last-Event-ID`: live events up to it are not sent again. (Only an
    /// instance that has not yet dispatched what the client saw elsewhere queues such.)
    seen_through: i64,
}

impl ClientStream {
    pub(super) fn new(
        service: EventService,
        registration: Registration,
        opening: Vec<Bytes>,
        history: Option<HistoryStream>,
        max_duration: Option<Duration>,
        seen_through: Option<i64>,
    ) -> Self {
        service.inner.ledger.opened();
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
            service,
            seen_through: seen_through.unwrap_or(0),
        }
    }

    /// The stream's connection, for the dispatcher to write to while the stream lends it.
    pub fn attach(&self, connection: std::sync::Arc<dyn crate::hub::LentConnection>) {
        self.registration.attach(connection);
    }

    /// Lends the connection to the dispatcher (`Client::lend`), once every frame before
    /// the live ones is written: the opening, the history, and queued events the client
    /// had already seen.
    pub fn lend(&self) {
        if self.opening.is_empty()
            && self.history.is_none()
            && self.seen_through <= self.registration.cursor
        {
            self.registration.client.lend();
        }
    }

    /// Takes the connection back before writing; `false` while the dispatcher writes.
    pub fn reclaim(&self) -> bool {
        self.registration.client.reclaim()
    }

    fn wrote(&self, id: i64, len: usize, from_queue: bool, settles_pending: bool) {
        // One clock read for the stream's and the service's records.
        let wall = now_millis();
        self.registration.wrote(len, id > 0, from_queue, wall);
        if id > 0 {
            let ledger = &self.service.inner.ledger;
            ledger.wrote_event(wall);
            if let (true, Some(user)) = (settles_pending, &self.registration.client.info.user_id) {
                ledger.settled(user, id);
            }
        }
    }
}

impl Stream for ClientStream {
    type Item = Result<Bytes, Infallible>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if let Some(deadline) = &mut self.deadline
            && deadline.poll_unpin(cx).is_ready()
        {
            return Poll::Ready(None);
        }
        if let Some(frame) = self.opening.pop_front() {
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(history) = &mut self.history {
            match ready!(history.as_mut().poll_next(cx)) {
                Some(Ok(event)) => {
                    self.wrote(event.id, event.frame.len(), false, event.settles_pending);
                    return Poll::Ready(Some(Ok(event.frame)));
                }
                Some(Err(())) => return Poll::Ready(None),
                None => self.history = None,
            }
        }
        loop {
            match ready!(self.registration.poll_frame(cx)) {
                // The hub's wake-up after it wrote part of a frame (the connection writes
                // the rest): nothing to count.
                Some(frame) if frame.bytes.is_empty() => self.registration.skipped(0),
                Some(frame) if frame.id > 0 && frame.id <= self.seen_through => {
                    self.registration.skipped(frame.bytes.len());
                }
                Some(frame) => {
                    if frame.id > self.seen_through {
                        // Ids only grow from here: nothing more to skip.
                        self.seen_through = 0;
                    }
                    self.wrote(frame.id, frame.bytes.len(), true, frame.settles_pending);
                    return Poll::Ready(Some(Ok(frame.bytes)));
                }
                None => return Poll::Ready(None),
            }
        }
    }
}

impl Drop for ClientStream {
    fn drop(&mut self) {
        let registration = &self.registration;
        if registration.client.is_forgotten() {
            return;
        }
        let session = session_record(
            &registration.client,
            registration.instance_id(),
            Some(now_millis()),
        );
        tracing::info!(
            client_id = %session.client_id,
            user_id = session.user_id.as_deref(),
            duration_ms = session.duration_ms(),
            events_sent = session.events_sent,
            "stream closed"
        );
        self.service.inner.ledger.closed(session);
    }
}
