//! One stream's queue and its backpressure: a bounded channel of shared frames, with the
//! bytes waiting counted, so that a reader that falls behind is cut off instead of letting
//! the server's memory grow.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed};

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

/// A registry entry: the stream's client and the sending end of its queue. Only the
/// registry holds the sender, so removing the entry ends the stream once its queue is
/// written.
#[derive(Debug)]
pub(super) struct Slot {
    pub client: std::sync::Arc<Client>,
    pub tx: mpsc::UnboundedSender<Frame>,
}

impl Slot {
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
