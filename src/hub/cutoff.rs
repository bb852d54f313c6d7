//! When the hub cuts a stream off: its queue is full (too slow), or it had data waiting
//! and accepted none for the client timeout (stale). Its connection is cancelled and its
//! queue released; the client resumes from the event log with `Last-Event-ID`.

use std::sync::atomic::Ordering::Relaxed;

use uuid::Uuid;

use super::Hub;

/// Why the hub cut a stream off.
#[derive(Clone, Copy, Debug)]
pub(super) enum CutOff {
    /// Its queue was full.
    TooSlow,
    /// It had data waiting and accepted none for the client timeout.
    Stale,
    /// Events meant for it could not be read from the log.
    Behind,
    /// Its instance was declared dead by the others.
    Orphaned,
}

impl Hub {
    /// Cuts streams off: their connections close and their queues are released. Counted
    /// and logged once per stream, whichever path noticed first.
    pub(super) fn cut_off(&self, ids: &[Uuid], reason: CutOff) {
        let metrics = &self.inner.metrics;
        for id in ids {
            if let Some(slot) = self.read().clients.get(id) {
                if !slot.client.dropped.swap(true, Relaxed) {
                    let (counter, why) = match reason {
                        CutOff::TooSlow => (&metrics.dropped_slow, "too slow to read its events"),
                        CutOff::Stale => (
                            &metrics.dropped_stale,
                            "accepted no data for the client timeout",
                        ),
                        CutOff::Behind => (
                            &metrics.dropped_behind,
                            "events for it could not be read from the log",
                        ),
                        CutOff::Orphaned => (
                            &metrics.dropped_orphaned,
                            "its instance was declared dead while frozen",
                        ),
                    };
                    counter.fetch_add(1, Relaxed);
                    if let CutOff::TooSlow = reason {
                        metrics
                            .queued_at_cutoff
                            .observe(slot.client.queued_bytes() as f64);
                    }
                    tracing::info!(client_id = %id, "stream cut off: {why}");
                }
                slot.client.kill.cancel();
            }
            self.unregister(*id);
        }
    }

    /// Cuts off streams that had data waiting and accepted none for `CLIENT_TIMEOUT_MS`.
    pub fn sweep_stale(&self) {
        let now = self.clock();
        let timeout = self.inner.client_timeout.as_millis() as i64;
        let stale: Vec<Uuid> = self
            .read()
            .clients
            .values()
            .filter(|s| s.client.is_stalled(now, timeout))
            .map(|s| s.client.info.client_id)
            .collect();
        self.cut_off(&stale, CutOff::Stale);
    }

    /// Ends every stream of an instance that the others declared dead: their sessions
    /// are already closed and counted, so their ends are not recorded again.
    pub fn declared_dead(&self) {
        let ids: Vec<Uuid> = {
            let reg = self.read();
            for slot in reg.clients.values() {
                slot.client.forgotten.store(true, Relaxed);
            }
            reg.clients.keys().copied().collect()
        };
        self.cut_off(&ids, CutOff::Orphaned);
    }

    /// Cuts off every stream: events up to `through` could not be read for them, so they
    /// must resume from the log rather than silently miss them.
    pub fn cut_off_all(&self, through: i64) {
        let ids: Vec<Uuid> = self.read().clients.keys().copied().collect();
        tracing::error!(
            streams = ids.len(),
            through,
            "could not read events stored by other instances; ending streams so that they resume from the log"
        );
        self.cut_off(&ids, CutOff::Behind);
    }
}
