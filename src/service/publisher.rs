//! The publisher: one task per instance that stores publishes and fans them out.
//!
//! Publishes that arrive while a transaction is in flight wait in the channel and go into
//! the next one together (group commit): one round trip for many events. Because one task
//! commits and then dispatches, this instance's streams receive events in id order.

use std::time::Duration;

use tokio::sync::{mpsc, oneshot, watch};

use super::{EventService, PublishError, Published, error::Doing};
use crate::{
    event::{self, EventName, now_millis},
    filter::Filter,
    hub::{Dispatch, Handed},
    store::{NewEvent, StoredEvent, Writer},
};

/// Most publishes stored in one transaction.
const MAX_BATCH: usize = 256;
/// After a commit of at least this many publish requests, the next batch waits while
/// requests keep arriving, for up to `GATHER_YIELDS` yields to the scheduler.
const GATHER_AFTER: usize = 8;
const GATHER_YIELDS: usize = 16;
/// Most events read at once to catch up on ids that other instances took.
const GAP_PAGE: i64 = 1000;
/// Reads of a catch-up page before giving up on it (waiting 50, 100, 200 ms between).
const CATCH_UP_TRIES: u32 = 4;

/// An event checked and serialized, ready to store.
pub(super) struct Prepared {
    pub kind: EventName,
    /// Serialized JSON.
    pub data: String,
    pub filter: Option<Filter>,
}

/// One publish: one event, or a batch stored all or none.
pub(super) struct Request {
    pub events: Vec<Prepared>,
    pub reply: oneshot::Sender<Result<Vec<Published>, PublishError>>,
    /// Its share of the data that may wait for or be in the publisher, given back once
    /// its batch is stored and dispatched.
    pub room: tokio::sync::OwnedSemaphorePermit,
}

/// Stores and dispatches publishes; between them, hands this instance's streams what
/// other instances committed (`committed` carries the highest id announced on the bus).
pub(super) async fn run(
    service: EventService,
    mut requests: mpsc::Receiver<Request>,
    mut committed: watch::Receiver<i64>,
) {
    let shutdown = service.inner.shutdown.clone();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut writer = Writer::default();
    loop {
        let received = tokio::select! {
            n = requests.recv_many(&mut batch, MAX_BATCH) => n,
            Ok(()) = committed.changed() => {
                let through = *committed.borrow_and_update();
                catch_up(&service, through, requests.is_empty()).await;
                continue;
            }
            () = shutdown.cancelled() => {
                // Take what was already queued, refuse the rest.
                requests.close();
                while requests.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    let batch = std::mem::take(&mut batch);
                    publish_batch(&service, &mut writer, batch, &requests).await;
                }
                return;
            }
        };
        if received == 0 {
            return;
        }
        publish_batch(&service, &mut writer, std::mem::take(&mut batch), &requests).await;
        if received >= GATHER_AFTER {
            gather(&requests).await;
        }
    }
}

/// Under load, the clients answered by the last commit send their next publishes within
/// a few yields: letting those join the next batch makes commits larger and fewer (see
/// BENCHMARKS.md, seventh session). Only a large batch is followed by this, so a publish
/// that comes alone is taken at once; a full batch already waiting is taken at once too.
async fn gather(requests: &mpsc::Receiver<Request>) {
    for _ in 0..GATHER_YIELDS {
        let queued = requests.len();
        if queued >= MAX_BATCH {
            return;
        }
        tokio::task::yield_now().await;
        if requests.len() == queued {
            return;
        }
    }
}

/// Stores `batch` in one transaction, then dispatches it; `waiting` holds the publishes
/// that will follow.
async fn publish_batch(
    service: &EventService,
    writer: &mut Writer,
    batch: Vec<Request>,
    waiting: &mpsc::Receiver<Request>,
) {
    let hub = service.hub();
    let now = now_millis();
    // The data moves into the record: it is stored, then encoded once from there. The
    // filter is serialized once, for the store and the log line.
    let mut replies = Vec::with_capacity(batch.len());
    // Held to the end of this batch: the data stays in memory until then.
    let mut _rooms = Vec::with_capacity(batch.len());
    let prepared = batch.into_iter().flat_map(|r| {
        _rooms.push(r.room);
        replies.push((r.events.len(), r.reply));
        r.events
    });
    let (records, targets): (Vec<NewEvent>, Vec<_>) = prepared
        .map(|r| {
            let target_users = r
                .filter
                .as_ref()
                .map(Filter::target_users)
                .unwrap_or_default();
            let (absent_here, present) = hub.split_by_streams(target_users);
            let record = NewEvent {
                kind: r.kind.into(),
                data: r.data,
                // A filter serializes: it is plain strings and ids.
                filter: r
                    .filter
                    .as_ref()
                    .map(|f| serde_json::to_string(f).unwrap_or_default()),
                audience: Filter::audience(r.filter.as_ref()),
                absent_here,
                created_at: now,
            };
            (record, (r.filter, present))
        })
        .unzip();
    let appended = match service
        .store()
        .append_on(writer, &records, hub.instance_id(), service.alive_since())
        .await
        .doing("store events")
    {
        Ok(appended) => appended,
        Err(error) => {
            tracing::error!(%error, events = records.len());
            for (_, reply) in replies {
                let _ = reply.send(Err(PublishError::Unavailable(error.clone())));
            }
            return;
        }
    };
    service
        .inner
        .instruments
        .commit_batch
        .observe(records.len() as f64);
    // This batch's own events follow: none of these is the last to dispatch.
    catch_up(service, appended.first_id - 1, false).await;
    let mut results = Vec::with_capacity(records.len());
    let mut late = Vec::new();
    let published = records.iter().zip(&targets).zip(appended.pending);
    let last = records.len().saturating_sub(1);
    for (i, ((record, (filter, present)), pending)) in published.enumerate() {
        let event_id = appended.first_id + i as i64;
        let handed = dispatch(
            service,
            &Dispatch {
                id: event_id,
                frame: event::encode(event_id, &record.kind, &record.data),
                filter: filter.as_ref(),
                pending_users: &record.absent_here,
                expected_users: present,
                write_idle: i == last && waiting.is_empty(),
            },
        );
        late.extend(handed.missed.into_iter().map(|user| (user, event_id)));
        tracing::info!(
            event_id,
            event = record.kind,
            target = record.filter.as_deref().unwrap_or("broadcast"),
            delivered = handed.streams,
            pending,
            "event published"
        );
        results.push(Published {
            event_id,
            delivered: handed.streams,
            pending,
        });
    }
    if !late.is_empty() {
        // A user's stream here does not match the filter's metadata, or it closed between
        // the look at the hub and the dispatch. Should this fail, the event still replays
        // by id; only a fresh connection of that user would miss it.
        if let Err(error) = service
            .store()
            .add_pending(&late)
            .await
            .doing("store pending rows for streams that closed")
        {
            tracing::error!(%error, rows = late.len());
        }
    }
    let mut results = results.into_iter();
    for (count, reply) in replies {
        let _ = reply.send(Ok(results.by_ref().take(count).collect()));
    }
}

/// Dispatches events that other instances stored since this one last dispatched, so that
/// every id up to the cursor has reached this instance's streams. A read that keeps
/// failing never lets the cursor pass events silently: the streams are cut off and resume
/// from the log. With `write_idle`, the last of them may be written to idle streams:
/// nothing follows it yet.
async fn catch_up(service: &EventService, through: i64, write_idle: bool) {
    let hub = service.hub();
    let mut after = hub.cursor();
    let mut failures = 0;
    while after < through {
        let events = match service
            .store()
            .events_between(after, through, GAP_PAGE)
            .await
            .doing("read events stored by other instances")
        {
            Ok(events) => events,
            Err(error) if failures + 1 < CATCH_UP_TRIES => {
                tracing::warn!(%error, after, through, "retrying");
                tokio::time::sleep(Duration::from_millis(50 << failures)).await;
                failures += 1;
                continue;
            }
            Err(error) => {
                tracing::error!(%error, after, through);
                hub.cut_off_all(through);
                break;
            }
        };
        failures = 0;
        // Retention may have deleted the rest of the gap: nothing left to hand over.
        let Some(last) = events.last() else { break };
        after = last.event_id;
        // As for this instance's publishes: idle streams are written to at the last.
        let final_index = (write_idle && after >= through).then(|| events.len() - 1);
        for (i, stored) in events.iter().enumerate() {
            dispatch_stored(service, stored, Some(i) == final_index);
        }
    }
    hub.advance_cursor(through);
}

/// Hands an event to this instance's streams, and counts those it was written to here
/// (the streams count what they write themselves).
fn dispatch<'a>(service: &EventService, event: &Dispatch<'a>) -> Handed<'a> {
    let handed = service.hub().dispatch(event);
    if handed.written > 0 {
        service
            .inner
            .ledger
            .wrote_events(handed.written, now_millis());
    }
    handed
}

fn dispatch_stored(service: &EventService, stored: &StoredEvent, write_idle: bool) {
    let Some(filter) = service.stored_filter(stored) else {
        return;
    };
    // A user the event names may have a pending row (the publishing instance had no
    // stream of theirs): a stream of theirs here settles it, or finds nothing to delete.
    let pending_users = filter
        .as_ref()
        .map(Filter::target_users)
        .unwrap_or_default();
    dispatch(
        service,
        &Dispatch {
            id: stored.event_id,
            frame: event::encode(stored.event_id, &stored.kind, &stored.data),
            filter: filter.as_ref(),
            pending_users: &pending_users,
            expected_users: &[],
            write_idle,
        },
    );
}
