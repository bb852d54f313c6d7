//! The publisher: one task per instance that stores publishes and fans them out.
//!
//! Publishes that arrive while a transaction is in flight wait in the channel and go into
//! the next one together (group commit): one round trip for many events. Because one task
//! commits and then dispatches, this instance's streams receive events in id order.

use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use super::{EventService, PublishError, Published};
use crate::{
    event::{self, EventName, now_millis},
    filter::Filter,
    hub::Dispatch,
    store::{NewEvent, StoredEvent},
};

/// Most publishes stored in one transaction.
const MAX_BATCH: usize = 256;
/// Most events read at once to catch up on ids that other instances took.
const GAP_PAGE: i64 = 1000;

pub(super) struct Request {
    pub kind: EventName,
    /// Serialized JSON.
    pub data: String,
    pub filter: Option<Filter>,
    pub reply: oneshot::Sender<Result<Published, PublishError>>,
}

pub(super) async fn run(service: EventService, mut requests: mpsc::Receiver<Request>) {
    let shutdown = service.inner.shutdown.clone();
    let mut batch = Vec::with_capacity(MAX_BATCH);
    loop {
        let received = tokio::select! {
            n = requests.recv_many(&mut batch, MAX_BATCH) => n,
            () = shutdown.cancelled() => {
                // Take what was already queued, refuse the rest.
                requests.close();
                while requests.recv_many(&mut batch, MAX_BATCH).await > 0 {
                    publish_batch(&service, std::mem::take(&mut batch)).await;
                }
                return;
            }
        };
        if received == 0 {
            return;
        }
        publish_batch(&service, std::mem::take(&mut batch)).await;
    }
}

async fn publish_batch(service: &EventService, batch: Vec<Request>) {
    let hub = service.hub();
    let now = now_millis();
    // The data moves into the record: it is stored, then encoded once from there. The
    // filter is serialized once, for the store and the log line.
    let (records, targets): (Vec<NewEvent>, Vec<_>) = batch
        .into_iter()
        .map(|r| {
            let record = NewEvent {
                kind: r.kind.into(),
                data: r.data,
                // A filter serializes: it is plain strings and ids.
                filter: r
                    .filter
                    .as_ref()
                    .map(|f| serde_json::to_string(f).unwrap_or_default()),
                pending_candidates: r
                    .filter
                    .as_ref()
                    .map(|f| {
                        f.target_users()
                            .into_iter()
                            .filter(|u| !hub.has_user(u))
                            .collect()
                    })
                    .unwrap_or_default(),
                created_at: now,
            };
            (record, (r.filter, r.reply))
        })
        .unzip();
    let appended = match service
        .store()
        .append(&records, hub.instance_id(), service.alive_since())
        .await
    {
        Ok(appended) => appended,
        Err(error) => {
            tracing::error!(%error, events = records.len(), "could not store events");
            let error = Arc::new(error);
            for (_, reply) in targets {
                let _ = reply.send(Err(PublishError::Unavailable(error.clone())));
            }
            return;
        }
    };
    catch_up(service, appended.first_id - 1).await;
    let published = records.iter().zip(targets).zip(appended.pending);
    for (i, ((record, (filter, reply)), pending_users)) in published.enumerate() {
        let event_id = appended.first_id + i as i64;
        let delivered = hub.dispatch(&Dispatch {
            id: event_id,
            frame: event::encode(event_id, &record.kind, &record.data),
            filter: filter.as_ref(),
            pending_users: &pending_users,
        });
        let pending = !pending_users.is_empty();
        tracing::info!(
            event_id,
            event = record.kind,
            target = record.filter.as_deref().unwrap_or("broadcast"),
            delivered,
            pending,
            "event published"
        );
        let _ = reply.send(Ok(Published {
            event_id,
            delivered,
            pending,
        }));
    }
}

/// Dispatches events that other instances stored since this one last dispatched, so that
/// every id up to the cursor has reached this instance's streams.
async fn catch_up(service: &EventService, through: i64) {
    let hub = service.hub();
    let mut after = hub.cursor();
    while after < through {
        let events = match service
            .store()
            .events_between(after, through, GAP_PAGE)
            .await
        {
            Ok(events) => events,
            Err(error) => {
                tracing::warn!(%error, after, through, "could not read events stored by other instances");
                break;
            }
        };
        let Some(last) = events.last() else { break };
        after = last.event_id;
        for stored in &events {
            dispatch_stored(service, stored);
        }
    }
    hub.advance_cursor(through);
}

fn dispatch_stored(service: &EventService, stored: &StoredEvent) {
    let filter: Option<Filter> = stored
        .filter
        .as_deref()
        .and_then(|f| serde_json::from_str(f).ok());
    service.hub().dispatch(&Dispatch {
        id: stored.event_id,
        frame: event::encode(stored.event_id, &stored.kind, &stored.data),
        filter: filter.as_ref(),
        pending_users: &[],
    });
}
