//! What happened since the last save: counts, ended sessions and settled pending events.
//!
//! Streams write here without waiting for anything; the flusher drains it about once a
//! second, so nothing on the per-recipient path touches the database.

use std::sync::{
    Mutex,
    atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
};

use super::Client;

/// A stream's session as it is saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub client_id: String,
    pub instance_id: String,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    /// JSON object of string values.
    pub metadata: String,
    pub connected_at: i64,
    pub disconnected_at: Option<i64>,
    pub last_event_at: Option<i64>,
    pub events_sent: i64,
}

impl SessionRecord {
    pub fn new(client: &Client, instance_id: &str, disconnected_at: Option<i64>) -> Self {
        let info = &client.info;
        Self {
            client_id: info.client_id.to_string(),
            instance_id: instance_id.to_owned(),
            user_id: info.user_id.clone(),
            session_id: info.session_id.clone(),
            // A map of strings always serializes.
            metadata: serde_json::to_string(&info.metadata).unwrap_or_else(|_| "{}".into()),
            connected_at: info.connected_at,
            disconnected_at,
            last_event_at: client.last_event_at(),
            events_sent: client.events_sent() as i64,
        }
    }

    /// How long a closed session lasted, in ms.
    pub fn duration_ms(&self) -> i64 {
        self.disconnected_at
            .map_or(0, |end| end - self.connected_at)
    }
}

/// Everything a flush writes, taken out of the ledger in one piece.
#[derive(Debug, Default)]
pub struct Tallies {
    pub events_sent: u64,
    pub last_event_at: Option<i64>,
    pub connections: u64,
    pub closed: Vec<SessionRecord>,
    /// (user, event id) pairs whose pending row can go.
    pub settled: Vec<(String, i64)>,
}

impl Tallies {
    pub fn is_empty(&self) -> bool {
        self.events_sent == 0
            && self.connections == 0
            && self.closed.is_empty()
            && self.settled.is_empty()
    }

    /// Summed durations of the closed sessions, in ms.
    pub fn closed_duration_ms(&self) -> i64 {
        self.closed.iter().map(SessionRecord::duration_ms).sum()
    }
}

/// Running totals since start (what `/metrics` shows) and what is not saved yet. The
/// unsaved counts are derived from the totals and what the last flush took, so each write
/// of an event costs one shared counter, not two.
#[derive(Debug, Default)]
pub struct Ledger {
    events_written: AtomicU64,
    connections: AtomicU64,
    last_event_at: AtomicI64,
    rest: Mutex<Unsaved>,
}

#[derive(Debug, Default)]
struct Unsaved {
    /// `events_written` and `connections` as of the last flush.
    taken_events: u64,
    taken_connections: u64,
    closed: Vec<SessionRecord>,
    settled: Vec<(String, i64)>,
}

impl Ledger {
    fn rest(&self) -> std::sync::MutexGuard<'_, Unsaved> {
        // Plain data: a panic elsewhere cannot leave it half-updated in a harmful way.
        self.rest.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) fn wrote_event(&self, now: i64) {
        self.events_written.fetch_add(1, Relaxed);
        self.last_event_at.fetch_max(now, Relaxed);
    }

    pub(super) fn opened(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    pub(super) fn closed(&self, session: SessionRecord) {
        self.rest().closed.push(session);
    }

    pub(super) fn settled(&self, user: String, event_id: i64) {
        self.rest().settled.push((user, event_id));
    }

    /// Stored events written to streams on this instance since it started.
    pub fn events_written(&self) -> u64 {
        self.events_written.load(Relaxed)
    }

    /// Streams opened on this instance since it started.
    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    /// Takes everything recorded since the last take.
    pub fn take(&self) -> Tallies {
        let mut rest = self.rest();
        let (events, connections) = (self.events_written(), self.connections());
        let tallies = Tallies {
            events_sent: events - rest.taken_events,
            connections: connections - rest.taken_connections,
            last_event_at: self.last_event_at(),
            closed: std::mem::take(&mut rest.closed),
            settled: std::mem::take(&mut rest.settled),
        };
        (rest.taken_events, rest.taken_connections) = (events, connections);
        tallies
    }

    /// Puts back what a failed flush took, so the next one writes it.
    pub fn restore(&self, tallies: Tallies) {
        let mut rest = self.rest();
        rest.taken_events -= tallies.events_sent;
        rest.taken_connections -= tallies.connections;
        rest.closed.extend(tallies.closed);
        rest.settled.extend(tallies.settled);
    }

    /// Unsaved counts for the stats: (events sent, connections, closed sessions, their ms).
    pub fn unsaved(&self) -> (u64, u64, u64, i64) {
        let rest = self.rest();
        let closed_ms = rest.closed.iter().map(SessionRecord::duration_ms).sum();
        (
            self.events_written() - rest.taken_events,
            self.connections() - rest.taken_connections,
            rest.closed.len() as u64,
            closed_ms,
        )
    }

    /// The last time a stored event was written on this instance, if ever.
    pub fn last_event_at(&self) -> Option<i64> {
        Some(self.last_event_at.load(Relaxed)).filter(|&t| t > 0)
    }
}
