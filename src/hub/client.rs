//! One stream's queue and its backpressure: a bounded channel of shared frames, with the
//! bytes waiting counted, so that a reader that falls behind is cut off instead of letting
//! the server's memory grow. While the queue is empty and the stream's task waits, the
//! task may lend its connection to the dispatcher (`Client::lend`, `Slot::write_lent`).

use std::sync::{
    Arc, OnceLock,
    atomic::{
        AtomicBool, AtomicI64, AtomicU8, AtomicU64, AtomicUsize,
        Ordering::{Acquire, Relaxed, Release},
    },
};

use bytes::Bytes;
use futures_channel::mpsc;
use tokio_util::sync::CancellationToken;

use crate::filter::ClientInfo;

/// Events a stream may have queued before it counts as too slow (mercure uses 1000).
pub(super) const QUEUE_EVENTS: usize = 1024;
/// Bytes a stream may have queued before it counts as too slow. With events up to 64 KiB
/// this, not the count, is what bounds a slow reader's memory.
pub(super) const QUEUE_BYTES: usize = 4 * 1024 * 1024;

const NEVER_SAVED: u64 = u64::MAX;

// Who writes to a stream's connection (`Client::writer`):
/// The connection's own task: the dispatcher queues.
const TASK: u8 = 0;
/// Nobody: the task waits with nothing to write, and the dispatcher may write itself.
const LENT: u8 = 1;
/// The dispatcher, writing one frame now.
const DISPATCHER: u8 = 2;

/// A stream's connection as the dispatcher writes to it while the stream's task waits
/// with nothing queued: a broadcast then costs one system call per stream, not also a
/// wake-up and a poll of its task.
pub trait LentConnection: Send + Sync {
    /// Writes `frame` without waiting.
    fn write_now(&self, frame: &Bytes) -> Wrote;
}

/// How much of a frame `LentConnection::write_now` wrote.
#[derive(Debug, PartialEq, Eq)]
pub enum Wrote {
    All,
    /// Part of it: the connection keeps the rest for its task, which must be woken.
    Part,
    /// None (the socket is full or failed): the frame goes to the queue.
    Nothing,
}

/// One frame in a stream's queue. `id` is 0 for frames that are not stored events.
#[derive(Debug)]
pub struct Frame {
    pub id: i64,
    pub bytes: Bytes,
    /// The event waits in the pending table for this stream's user: handing it over
    /// settles that.
    pub settles_pending: bool,
}

/// A connected stream as the hub and the monitoring routes see it.
#[derive(Debug)]
pub struct Client {
    pub info: ClientInfo,
    queued_bytes: AtomicUsize,
    /// Frames waiting: the queue itself is unbounded, so that an idle stream holds no
    /// preallocated slots, and bounded here.
    queued_frames: AtomicUsize,
    /// Hub clock (ms) of the last write, or of the moment the queue stopped being empty.
    last_progress: AtomicI64,
    events_sent: AtomicU64,
    /// Unix ms of the last stored event written, 0 for none.
    last_event_at: AtomicI64,
    /// `events_sent` as last saved (`NEVER_SAVED` before the first save), so that only
    /// sessions that changed are written.
    saved_events: AtomicU64,
    /// Cancels this stream's connection; fired for streams that are cut off.
    pub(super) kill: CancellationToken,
    pub(super) dropped: AtomicBool,
    /// `TASK`, `LENT` or `DISPATCHER`: see `lend` and `reclaim`.
    writer: AtomicU8,
    /// The cluster already closed and counted this session (its instance was declared
    /// dead): its end is not recorded again.
    pub(super) forgotten: AtomicBool,
}

pub(super) enum Offer {
    TooSlow,
    Gone,
}

impl Client {
    pub(super) fn new(info: ClientInfo, kill: CancellationToken, now: i64) -> Self {
        Self {
            info,
            queued_bytes: AtomicUsize::new(0),
            queued_frames: AtomicUsize::new(0),
            last_progress: AtomicI64::new(now),
            events_sent: AtomicU64::new(0),
            last_event_at: AtomicI64::new(0),
            saved_events: AtomicU64::new(NEVER_SAVED),
            kill,
            dropped: AtomicBool::new(false),
            writer: AtomicU8::new(TASK),
            forgotten: AtomicBool::new(false),
        }
    }

    /// Bytes waiting in the queue.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Relaxed)
    }

    /// Whether the session was already closed and counted elsewhere.
    pub fn is_forgotten(&self) -> bool {
        self.forgotten.load(Relaxed)
    }

    pub fn events_sent(&self) -> u64 {
        self.events_sent.load(Relaxed)
    }

    pub fn last_event_at(&self) -> Option<i64> {
        Some(self.last_event_at.load(Relaxed)).filter(|&t| t > 0)
    }

    /// Whether the saved session lags behind: never saved, or (with `counts`) its event
    /// count moved since.
    pub fn needs_saving(&self, counts: bool) -> bool {
        let saved = self.saved_events.load(Relaxed);
        saved == NEVER_SAVED || (counts && saved != self.events_sent())
    }

    /// Notes that the session was saved with this count.
    pub fn mark_saved(&self, events_sent: u64) {
        self.saved_events.store(events_sent, Relaxed);
    }

    /// Records that a frame was handed to the connection.
    pub(super) fn wrote(&self, len: usize, stored: bool, from_queue: bool, now: i64, wall: i64) {
        if from_queue {
            self.queued_bytes.fetch_sub(len, Relaxed);
            self.queued_frames.fetch_sub(1, Relaxed);
        }
        self.last_progress.store(now, Relaxed);
        if stored {
            self.events_sent.fetch_add(1, Relaxed);
            self.last_event_at.store(wall, Relaxed);
        }
    }

    /// The stream's task has written everything it had and waits: until it reclaims the
    /// connection, the dispatcher may write the next event itself (if nothing is queued).
    pub fn lend(&self) {
        self.writer.store(LENT, Release);
    }

    /// Lent, with nothing queued. A first look, under the registry's lock, at whether the
    /// stream is worth keeping for the writes; `Slot::write_lent` looks again when it
    /// writes.
    pub(super) fn is_lent(&self) -> bool {
        self.writer.load(Relaxed) == LENT && self.queued_frames.load(Relaxed) == 0
    }

    /// Takes the connection back before the task writes; `false` while the dispatcher is
    /// writing one frame (the task tries again after a yield).
    pub fn reclaim(&self) -> bool {
        // Most polls find it already taken back: a load, not a compare-and-swap.
        if self.writer.load(Acquire) == TASK {
            return true;
        }
        match self.writer.compare_exchange(LENT, TASK, Acquire, Acquire) {
            Ok(_) | Err(TASK) => true,
            Err(_) => false,
        }
    }

    /// A queued frame that the stream will not send after all.
    pub(super) fn skipped(&self, len: usize) {
        self.queued_bytes.fetch_sub(len, Relaxed);
        self.queued_frames.fetch_sub(1, Relaxed);
    }

    /// Data has waited and none was accepted for longer than `timeout_ms`.
    pub(super) fn is_stalled(&self, now: i64, timeout_ms: i64) -> bool {
        self.queued_bytes.load(Relaxed) > 0 && now - self.last_progress.load(Relaxed) > timeout_ms
    }
}

/// Gives the connection back when dropped: to `to`, which stays `TASK` while a write is
/// under way, so that even a panic there leaves the stream's task able to go on.
struct HandBack<'a> {
    writer: &'a AtomicU8,
    to: u8,
}

impl Drop for HandBack<'_> {
    fn drop(&mut self) {
        self.writer.store(self.to, Release);
    }
}

/// A registry entry: the stream's client and the sending end of its queue. Only the
/// registry holds the sender (and a dispatch, while it writes), so removing the entry ends
/// the stream once its queue is written.
pub(super) struct Slot {
    pub client: Arc<Client>,
    pub tx: mpsc::UnboundedSender<Frame>,
    /// Set once the server serves the stream's connection itself.
    pub connection: OnceLock<Arc<dyn LentConnection>>,
}

impl std::fmt::Debug for Slot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Slot")
            .field("client", &self.client)
            .field("connection", &self.connection.get().is_some())
            .finish_non_exhaustive()
    }
}

impl Slot {
    /// Writes `frame` to the connection at once when the stream's task has lent it and
    /// nothing is queued; `false` leaves the frame to the queue. A frame that settles a
    /// pending row goes through the queue, where the stream's records settle it.
    pub fn write_lent(&self, frame: &Frame, now: i64, wall: i64) -> bool {
        let client = &self.client;
        let Some(connection) = self.connection.get() else {
            return false;
        };
        // A closed queue: the stream's task is gone, whatever its connection still takes.
        if frame.settles_pending
            || client.dropped.load(Relaxed)
            || self.tx.is_closed()
            || client
                .writer
                .compare_exchange(LENT, DISPATCHER, Acquire, Relaxed)
                .is_err()
        {
            return false;
        }
        let mut hand_back = HandBack {
            writer: &client.writer,
            to: LENT,
        };
        // Frames already queued go first: the task was woken for them and has not run.
        if client.queued_frames.load(Relaxed) > 0 {
            return false;
        }
        hand_back.to = TASK;
        match connection.write_now(&frame.bytes) {
            Wrote::All => hand_back.to = LENT,
            Wrote::Part => {
                drop(hand_back);
                // An empty frame wakes the task, which writes the rest before anything else.
                let nudge = Frame {
                    id: 0,
                    bytes: Bytes::new(),
                    settles_pending: false,
                };
                let _ = self.offer(nudge, now);
            }
            Wrote::Nothing => {
                hand_back.to = LENT;
                return false;
            }
        }
        client.wrote(frame.bytes.len(), frame.id > 0, false, now, wall);
        true
    }

    /// Queues a frame without waiting.
    pub fn offer(&self, frame: Frame, now: i64) -> Result<(), Offer> {
        let client = &self.client;
        if client.dropped.load(Relaxed) {
            return Err(Offer::Gone);
        }
        let len = frame.bytes.len();
        let before = client.queued_bytes.fetch_add(len, Relaxed);
        let frames = client.queued_frames.fetch_add(1, Relaxed);
        let undo = || {
            client.queued_bytes.fetch_sub(len, Relaxed);
            client.queued_frames.fetch_sub(1, Relaxed);
        };
        if frames >= QUEUE_EVENTS || (before > 0 && before + len > QUEUE_BYTES) {
            undo();
            return Err(Offer::TooSlow);
        }
        if self.tx.unbounded_send(frame).is_err() {
            // Only a dropped receiver refuses a frame.
            undo();
            return Err(Offer::Gone);
        }
        if before == 0 {
            // The stall clock starts when there is something to write.
            client.last_progress.store(now, Relaxed);
        }
        Ok(())
    }
}
