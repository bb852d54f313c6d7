//! Background workers. Each owns a loop that stops on the shutdown token; a failing
//! database only makes them log and try again on their next tick.

use std::{collections::HashSet, sync::atomic::Ordering::Relaxed, time::Duration};

use tokio::time::{MissedTickBehavior, interval};

use tokio::sync::watch;

use super::{
    EventService,
    error::{Doing, StoreError},
    session_record,
};
use crate::{
    bus::{Bus, Wake},
    event::{self, now_millis},
    store::Tallies,
};

/// How often counts and sessions are saved (and this instance's heartbeat written).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Every this many flushes the event counts of open sessions are saved (new and closed
/// sessions are saved every time): at 10,000 streams, saving every count every second
/// would keep SQLite's one writer busy.
const REAP_EVERY: u32 = 10;

/// Saves new sessions (and, with `refresh_counts`, the counts of open ones), then the
/// ledger with this instance's heartbeat in one transaction. On failure the ledger keeps
/// what it had, for the next try.
pub(super) async fn flush(service: &EventService, refresh_counts: bool) -> Result<(), StoreError> {
    let hub = service.hub();
    let store = service.store();
    let ledger = &service.inner.ledger;
    let _flushing = service.inner.flushing.lock().await;
    // Tallies first: a stream closing after this is still open in the snapshot below, and
    // its end is saved next time.
    let (mut tallies, lost_rows) = ledger.take();
    let now = now_millis();
    let rejoined = match store
        .heartbeat(hub.instance_id(), service.inner.started_at, now)
        .await
        .doing("write this instance's heartbeat")
    {
        Ok(rejoined) => rejoined,
        Err(error) => {
            ledger.restore(tallies, lost_rows);
            return Err(error);
        }
    };
    if rejoined && service.inner.joined.swap(true, Relaxed) {
        // Frozen past the client timeout: the others closed and counted our sessions.
        // Our streams end (clients resume elsewhere from the log), and the sessions that
        // ended meanwhile are not counted a second time.
        tracing::warn!(
            streams = hub.len(),
            "this instance was declared dead while it was frozen; ending its streams"
        );
        hub.declared_dead();
        tallies.closed.clear();
        (tallies.closed_unrecorded, tallies.closed_unrecorded_ms) = (0, 0);
    }
    // Streams that closed since the snapshot are saved as closed, not as open.
    let closed: HashSet<&str> = tallies
        .closed
        .iter()
        .map(|s| s.client_id.as_str())
        .collect();
    let (clients, sessions): (Vec<_>, Vec<_>) = hub
        .unsaved_clients(refresh_counts)
        .into_iter()
        .map(|c| {
            let session = session_record(&c, hub.instance_id(), None);
            (c, session)
        })
        .filter(|(_, s)| !closed.contains(s.client_id.as_str()))
        .unzip();
    let saved = async {
        store
            .save_sessions(&sessions)
            .await
            .doing("save open sessions")?;
        for (client, session) in clients.iter().zip(&sessions) {
            client.mark_saved(session.events_sent as u64);
        }
        store
            .flush(&tallies)
            .await
            .doing("save counts and ended sessions")
    }
    .await;
    if let Err(error) = saved {
        ledger.restore(tallies, lost_rows);
        return Err(error);
    }
    ledger.saved(&tallies);
    if lost_rows {
        let open = hub
            .clients()
            .iter()
            .map(|c| c.info.client_id.to_string())
            .collect();
        match store
            .close_sessions_except(hub.instance_id(), &open, now_millis())
            .await
            .doing("close the rows of sessions that ended during an outage")
        {
            Ok(closed) => tracing::info!(
                closed,
                "closed the rows of sessions that ended during the outage"
            ),
            Err(error) => {
                // The counts are saved; only the reconciliation is left for next time.
                ledger.restore(Tallies::default(), true);
                return Err(error);
            }
        }
    }
    Ok(())
}

pub(super) async fn flush_loop(service: EventService) {
    let shutdown = service.inner.shutdown.clone();
    let mut ticks = interval(FLUSH_EVERY);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut count = 0u32;
    let mut failing = false;
    let mut churned_through = 0;
    // Dead instances are looked for twice per client timeout (at most every 10 s), so
    // their sessions close within about 1.5 timeouts.
    let reap_every = (service.config().client_timeout.as_secs() / 2).clamp(1, 10) as u32;
    // The start counts as healthy: the first flush already succeeded in `start`.
    let now = tokio::time::Instant::now();
    let mut healthy_since = Some(
        now.checked_sub(service.config().client_timeout)
            .unwrap_or(now),
    );
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        count += 1;
        match flush(&service, count.is_multiple_of(REAP_EVERY)).await {
            Ok(()) if failing => {
                failing = false;
                healthy_since = Some(tokio::time::Instant::now());
                tracing::info!("saving counts and sessions works again");
            }
            Ok(()) => {}
            // Once per outage, not once a second.
            Err(error) if !failing => {
                failing = true;
                healthy_since = None;
                tracing::error!(%error, "will retry every second");
            }
            Err(_) => {}
        }
        if count.is_multiple_of(REAP_EVERY) {
            // Streams ended since the last look: give their memory back. (Not on opens
            // alone: a trim holds the allocator's locks, which stalls delivery.)
            let ended = service.inner.ledger.ended();
            if ended != churned_through {
                churned_through = ended;
                let _ = tokio::task::spawn_blocking(release_freed_memory).await;
            }
        }
        // After an outage every heartbeat is stale: declare no one dead until this
        // instance has been saving again for a whole client timeout, so that the others
        // have had their chance to heart-beat too.
        let healthy_long_enough = healthy_since.is_some_and(|since: tokio::time::Instant| {
            since.elapsed() > service.config().client_timeout
        });
        if count.is_multiple_of(reap_every) && healthy_long_enough {
            let reaped = service
                .store()
                .reap_instances(service.hub().instance_id(), service.alive_since())
                .await;
            match reaped.doing("close the sessions of stopped instances") {
                Ok(0) => {}
                Ok(closed) => tracing::info!(closed, "closed the sessions of stopped instances"),
                Err(error) => tracing::debug!(%error),
            }
        }
    }
}

/// Pings every stream each `PING_INTERVAL_MS`, and cuts off streams that accepted no
/// data for `CLIENT_TIMEOUT_MS` (checked four times per timeout, so one is cut off at
/// most a quarter late).
pub(super) async fn heartbeat_loop(service: EventService) {
    let shutdown = service.inner.shutdown.clone();
    let config = service.config();
    let mut pings = interval(config.ping_interval);
    let mut sweeps = interval((config.client_timeout / 4).max(Duration::from_millis(10)));
    pings.set_missed_tick_behavior(MissedTickBehavior::Delay);
    sweeps.set_missed_tick_behavior(MissedTickBehavior::Delay);
    // The first tick of an interval is immediate; a new stream gets `connected` instead.
    pings.tick().await;
    loop {
        tokio::select! {
            _ = pings.tick() => service.hub().heartbeat(event::encode_ping(std::time::SystemTime::now())),
            _ = sweeps.tick() => service.hub().sweep_stale(),
            () = shutdown.cancelled() => return,
        }
    }
}

/// Deletes events, pending rows and closed sessions older than `HISTORY_RETENTION_MS`.
pub(super) async fn retention_loop(service: EventService) {
    let shutdown = service.inner.shutdown.clone();
    let retention = service.config().history_retention;
    let every = (retention / 10).clamp(Duration::from_millis(100), Duration::from_secs(60));
    let mut ticks = interval(every);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let cutoff = now_millis() - retention.as_millis() as i64;
        match service.store().prune(cutoff).await.doing("apply retention") {
            Ok(0) => {}
            Ok(deleted) => tracing::info!(deleted, "deleted events past retention"),
            Err(error) => tracing::warn!(%error),
        }
    }
}

/// Returns freed heap pages to the system when the allocator is glibc's (the library used
/// on its own, as the tests do): glibc keeps what thousands of closed streams freed in its
/// per-thread arenas, so without this an idle server stays at its peak size. The binaries'
/// jemalloc gives pages back by itself, and this finds nothing to trim.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists; it takes
    // no pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Passes the bus's wake-ups to the publisher (as the highest id committed anywhere),
/// reconnecting with backoff while it is down (`/readyz` says so meanwhile). After every
/// (re)connection it reads the log's last id, so nothing committed while it was not
/// listening is missed.
pub(super) async fn bus_loop(
    service: EventService,
    mut bus: impl Bus,
    committed: watch::Sender<i64>,
) {
    let shutdown = service.inner.shutdown.clone();
    let down = &service.inner.bus_down;
    let mut delay = Duration::from_millis(100);
    // A resync whose log read failed is tried again before listening on.
    let mut resync_due = false;
    loop {
        let wake = if resync_due {
            Ok(Wake::Resync)
        } else {
            tokio::select! {
                wake = bus.next() => wake,
                () = shutdown.cancelled() => return,
            }
        };
        resync_due = matches!(wake, Ok(Wake::Resync));
        let through = match wake {
            Ok(Wake::Committed(id)) => Ok(id),
            Ok(Wake::Resync) => service
                .store()
                .event_horizon()
                .await
                .map(|(last, _)| last)
                .doing("read the last event id after listening again"),
            Err(error) => Err(error).doing("listen for other instances' events"),
        };
        match through {
            Ok(id) => {
                resync_due = false;
                if down.swap(false, std::sync::atomic::Ordering::Relaxed) {
                    tracing::info!("listening to the other instances");
                }
                delay = Duration::from_millis(100);
                committed.send_if_modified(|seen| {
                    let newer = id > *seen;
                    *seen = (*seen).max(id);
                    newer
                });
            }
            Err(error) => {
                if !down.swap(true, std::sync::atomic::Ordering::Relaxed) {
                    tracing::error!(%error, "will reconnect");
                }
                tokio::select! {
                    () = tokio::time::sleep(delay) => {}
                    () = shutdown.cancelled() => return,
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    }
}
