//! Background workers. Each owns a loop that stops on the shutdown token; a failing
//! database only makes them log and try again on their next tick.

use std::{collections::HashSet, time::Duration};

use tokio::time::{MissedTickBehavior, interval};

use super::{
    EventService,
    error::{Doing, StoreError},
    session_record,
};
use crate::event::{self, now_millis};

/// How often counts and sessions are saved (and this instance's heartbeat written).
const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Every this many flushes, instances that stopped heart-beating are reaped and the event
/// counts of open sessions are saved (new and closed sessions are saved every time): at
/// 10,000 streams, saving every count every second would keep SQLite's one writer busy.
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
    let (tallies, lost_rows) = ledger.take();
    let closed: HashSet<&str> = tallies
        .closed
        .iter()
        .map(|s| s.client_id.as_str())
        .collect();
    let clients = hub.unsaved_clients(refresh_counts);
    let sessions: Vec<_> = clients
        .iter()
        .map(|c| session_record(c, hub.instance_id(), None))
        .filter(|s| !closed.contains(s.client_id.as_str()))
        .collect();
    let saved = async {
        store
            .save_sessions(&sessions)
            .await
            .doing("save open sessions")?;
        for (client, session) in clients.iter().zip(&sessions) {
            client.mark_saved(session.events_sent as u64);
        }
        store
            .flush(
                hub.instance_id(),
                service.inner.started_at,
                now_millis(),
                &tallies,
            )
            .await
            .doing("save counts and ended sessions")?;
        if lost_rows {
            let open = hub
                .clients()
                .iter()
                .map(|c| c.info.client_id.to_string())
                .collect();
            let closed = store
                .close_sessions_except(hub.instance_id(), &open, now_millis())
                .await
                .doing("close the rows of sessions that ended during an outage")?;
            tracing::info!(
                closed,
                "closed the rows of sessions that ended during the outage"
            );
        }
        Ok(())
    }
    .await;
    match saved {
        Ok(()) => ledger.saved(&tallies),
        Err(_) => ledger.restore(tallies, lost_rows),
    }
    saved
}

pub(super) async fn flush_loop(service: EventService) {
    let shutdown = service.inner.shutdown.clone();
    let mut ticks = interval(FLUSH_EVERY);
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    let mut count = 0u32;
    let mut failing = false;
    let mut churned_through = 0;
    loop {
        tokio::select! {
            _ = ticks.tick() => {}
            () = shutdown.cancelled() => return,
        }
        count += 1;
        match flush(&service, count.is_multiple_of(REAP_EVERY)).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("saving counts and sessions works again");
            }
            Ok(()) => {}
            // Once per outage, not once a second.
            Err(error) if !failing => {
                failing = true;
                tracing::error!(%error, "will retry every second");
            }
            Err(_) => {}
        }
        if count.is_multiple_of(REAP_EVERY) {
            // Streams came and went since the last look: give their memory back.
            let connections = service.inner.ledger.connections();
            if connections != churned_through {
                churned_through = connections;
                let _ = tokio::task::spawn_blocking(release_freed_memory).await;
            }
            let reaped = service.store().reap_instances(service.alive_since()).await;
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

/// Returns freed heap pages to the system. glibc keeps what thousands of closed streams
/// freed in its per-thread arenas, so without this an idle server stays at its peak size.
fn release_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks and trims the allocator's own free lists; it takes
    // no pointers and is safe to call from any thread at any time.
    unsafe {
        libc::malloc_trim(0);
    }
}
