//! What happened since the last save: counts, ended sessions and settled pending events,
//! and which pending events this instance's streams have already taken.
//!
//! Streams write here without waiting for anything; the flusher drains it about once a
//! second, so nothing on the per-recipient path touches the database. While the database
//! is away, what waits here is bounded: past the bounds, ended sessions keep only their
//! count and length, settlements are dropped (those events may be delivered again), and
//! both are counted in `/metrics`.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Mutex, MutexGuard,
        atomic::{AtomicI64, AtomicU64, Ordering::Relaxed},
    },
};

use crate::store::{SessionRecord, Tallies};

/// Ended sessions kept for the next save.
const MAX_CLOSED: usize = 100_000;
/// Settled pending events kept for the next save.
const MAX_SETTLED: usize = 100_000;

/// Running totals since start (what `/metrics` shows) and what is not saved yet. The
/// unsaved counts are derived from the totals and what the last flush took, so each write
/// of an event costs one shared counter, not two.
#[derive(Debug)]
pub(crate) struct Ledger {
    events_written: AtomicU64,
    connections: AtomicU64,
    ended: AtomicU64,
    last_event_at: AtomicI64,
    /// Ended sessions saved as a count only, and settlements dropped, at the bounds.
    pub dropped_sessions: AtomicU64,
    pub dropped_settlements: AtomicU64,
    limits: (usize, usize),
    rest: Mutex<Unsaved>,
}

#[derive(Debug, Default)]
struct Unsaved {
    /// `events_written` and `connections` as of the last flush.
    taken_events: u64,
    taken_connections: u64,
    closed: Vec<SessionRecord>,
    closed_unrecorded: u64,
    closed_unrecorded_ms: i64,
    settled: HashSet<(String, i64)>,
    /// Pending events a stream here has taken (read into its history, or written and not
    /// yet deleted in the store), by user: a second fresh stream of the user skips them.
    taken_pending: HashMap<String, HashSet<i64>>,
    /// Some ended sessions were saved as a count only: their rows still read as open.
    lost_rows: bool,
    /// Settlements the last flush deleted in the store: forgotten here one flush later,
    /// because a fresh stream may have read those rows just before they were deleted.
    deleted_last: Vec<(String, i64)>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self::with_limits(MAX_CLOSED, MAX_SETTLED)
    }
}

impl Ledger {
    pub fn with_limits(closed: usize, settled: usize) -> Self {
        Self {
            events_written: AtomicU64::new(0),
            connections: AtomicU64::new(0),
            ended: AtomicU64::new(0),
            last_event_at: AtomicI64::new(0),
            dropped_sessions: AtomicU64::new(0),
            dropped_settlements: AtomicU64::new(0),
            limits: (closed, settled),
            rest: Mutex::default(),
        }
    }

    fn rest(&self) -> MutexGuard<'_, Unsaved> {
        // Plain data: a panic elsewhere cannot leave it half-updated in a harmful way.
        self.rest.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn wrote_event(&self, now: i64) {
        self.wrote_events(1, now);
    }

    /// `count` events written at `now`.
    pub fn wrote_events(&self, count: usize, now: i64) {
        self.events_written.fetch_add(count as u64, Relaxed);
        self.last_event_at.fetch_max(now, Relaxed);
    }

    pub fn opened(&self) {
        self.connections.fetch_add(1, Relaxed);
    }

    pub fn closed(&self, session: SessionRecord) {
        self.ended.fetch_add(1, Relaxed);
        let mut rest = self.rest();
        if rest.closed.len() < self.limits.0 {
            rest.closed.push(session);
            return;
        }
        rest.closed_unrecorded += 1;
        rest.closed_unrecorded_ms += session.duration_ms();
        rest.lost_rows = true;
        if self
            .dropped_sessions
            .fetch_add(1, Relaxed)
            .is_multiple_of(10_000)
        {
            tracing::warn!(
                kept = rest.closed.len(),
                "the database is away and ended sessions pile up; keeping only their count from now on"
            );
        }
    }

    /// A stream handed the user a pending event: its row can go.
    pub fn settled(&self, user: &str, event_id: i64) {
        let mut rest = self.rest();
        if rest.settled.len() >= self.limits.1 {
            if let Some(taken) = rest.taken_pending.get_mut(user) {
                taken.remove(&event_id);
            }
            if self
                .dropped_settlements
                .fetch_add(1, Relaxed)
                .is_multiple_of(10_000)
            {
                tracing::warn!(
                    kept = rest.settled.len(),
                    "the database is away and settled pending events pile up; dropping some, which may be delivered again"
                );
            }
            return;
        }
        rest.settled.insert((user.to_owned(), event_id));
        match rest.taken_pending.get_mut(user) {
            Some(taken) => {
                taken.insert(event_id);
            }
            None => {
                rest.taken_pending
                    .insert(user.to_owned(), HashSet::from([event_id]));
            }
        }
    }

    /// Takes the pending events of `user` that no stream here has taken yet; returns
    /// whether each id was free (and is now taken).
    pub fn take_pending(&self, user: &str, ids: &[i64]) -> Vec<bool> {
        let mut rest = self.rest();
        let taken = rest.taken_pending.entry(user.to_owned()).or_default();
        ids.iter().map(|id| taken.insert(*id)).collect()
    }

    /// Gives back pending events a stream took but never wrote.
    pub fn release_pending(&self, user: &str, ids: impl IntoIterator<Item = i64>) {
        let mut rest = self.rest();
        if let Some(taken) = rest.taken_pending.get_mut(user) {
            for id in ids {
                taken.remove(&id);
            }
            if taken.is_empty() {
                rest.taken_pending.remove(user);
            }
        }
    }

    /// Stored events written to streams on this instance since it started.
    pub fn events_written(&self) -> u64 {
        self.events_written.load(Relaxed)
    }

    /// Streams opened on this instance since it started.
    pub fn connections(&self) -> u64 {
        self.connections.load(Relaxed)
    }

    /// Streams ended on this instance since it started.
    pub fn ended(&self) -> u64 {
        self.ended.load(Relaxed)
    }

    /// Takes everything recorded since the last take; the second value says whether
    /// some ended sessions' rows must be closed by a reconciliation.
    pub fn take(&self) -> (Tallies, bool) {
        let mut rest = self.rest();
        let (events, connections) = (self.events_written(), self.connections());
        let tallies = Tallies {
            events_sent: events - rest.taken_events,
            connections: connections - rest.taken_connections,
            last_event_at: self.last_event_at(),
            closed: std::mem::take(&mut rest.closed),
            closed_unrecorded: std::mem::take(&mut rest.closed_unrecorded),
            closed_unrecorded_ms: std::mem::take(&mut rest.closed_unrecorded_ms),
            settled: std::mem::take(&mut rest.settled).into_iter().collect(),
        };
        (rest.taken_events, rest.taken_connections) = (events, connections);
        (tallies, std::mem::take(&mut rest.lost_rows))
    }

    /// The store now has what `tallies` held: settled rows are gone there, so they need
    /// not be remembered here.
    pub fn saved(&self, tallies: &Tallies) {
        let mut rest = self.rest();
        let forget = std::mem::replace(&mut rest.deleted_last, tallies.settled.clone());
        for (user, id) in &forget {
            if let Some(taken) = rest.taken_pending.get_mut(user) {
                taken.remove(id);
                if taken.is_empty() {
                    rest.taken_pending.remove(user);
                }
            }
        }
        if rest.taken_pending.capacity() > 64
            && rest.taken_pending.capacity() > 4 * rest.taken_pending.len()
        {
            rest.taken_pending.shrink_to_fit();
        }
    }

    /// Puts back what a failed flush took, so the next one writes it.
    pub fn restore(&self, tallies: Tallies, lost_rows: bool) {
        let mut rest = self.rest();
        rest.taken_events -= tallies.events_sent;
        rest.taken_connections -= tallies.connections;
        rest.closed.extend(tallies.closed);
        rest.closed_unrecorded += tallies.closed_unrecorded;
        rest.closed_unrecorded_ms += tallies.closed_unrecorded_ms;
        rest.settled.extend(tallies.settled);
        rest.lost_rows |= lost_rows;
    }

    /// Pending rows this instance settled that the store still holds.
    pub fn unsaved_settlements(&self) -> i64 {
        self.rest().settled.len() as i64
    }

    /// Unsaved counts for the stats: (events sent, connections, closed sessions, their ms).
    pub fn unsaved(&self) -> (u64, u64, u64, i64) {
        let rest = self.rest();
        let closed_ms = rest
            .closed
            .iter()
            .map(SessionRecord::duration_ms)
            .sum::<i64>()
            + rest.closed_unrecorded_ms;
        (
            self.events_written() - rest.taken_events,
            self.connections() - rest.taken_connections,
            rest.closed.len() as u64 + rest.closed_unrecorded,
            closed_ms,
        )
    }

    /// The last time a stored event was written on this instance, if ever.
    pub fn last_event_at(&self) -> Option<i64> {
        Some(self.last_event_at.load(Relaxed)).filter(|&t| t > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(n: i64) -> SessionRecord {
        SessionRecord {
            client_id: n.to_string(),
            instance_id: "i".into(),
            user_id: None,
            session_id: None,
            metadata: "{}".into(),
            connected_at: 0,
            disconnected_at: Some(n),
            last_event_at: None,
            events_sent: 0,
        }
    }

    #[test]
    fn past_its_bounds_the_ledger_keeps_counts_and_counts_what_it_dropped() {
        let ledger = Ledger::with_limits(2, 1);
        for n in 1..=5 {
            ledger.closed(session(n * 10));
        }
        ledger.settled("u", 1);
        ledger.settled("u", 2);
        assert_eq!(ledger.dropped_sessions.load(Relaxed), 3);
        assert_eq!(ledger.dropped_settlements.load(Relaxed), 1);
        assert_eq!(ledger.unsaved().2, 5, "every ended session still counts");
        assert_eq!(ledger.unsaved().3, 150, "and so does its length");

        let (tallies, lost_rows) = ledger.take();
        assert!(lost_rows);
        assert_eq!(tallies.closed.len(), 2);
        assert_eq!(tallies.closed_count(), 5);
        assert_eq!(tallies.closed_duration_ms(), 150);
        assert_eq!(tallies.settled, [("u".to_owned(), 1)]);
        assert_eq!(ledger.take_pending("u", &[1, 2]), [false, true]);
    }

    #[test]
    fn a_pending_event_is_taken_once_until_released_or_saved() {
        let ledger = Ledger::default();
        assert_eq!(ledger.take_pending("u", &[1, 2, 3]), [true, true, true]);
        assert_eq!(ledger.take_pending("u", &[2, 3, 4]), [false, false, true]);
        ledger.release_pending("u", [3]);
        assert_eq!(ledger.take_pending("u", &[3]), [true]);

        ledger.settled("u", 1);
        let (tallies, _) = ledger.take();
        assert_eq!(ledger.take_pending("u", &[1]), [false], "not saved yet");
        ledger.saved(&tallies);
        assert_eq!(
            ledger.take_pending("u", &[1]),
            [false],
            "a stream may have read the row just before the delete"
        );
        ledger.saved(&Tallies::default());
        assert_eq!(
            ledger.take_pending("u", &[1]),
            [true],
            "deleted in the store a flush ago"
        );
    }
}
