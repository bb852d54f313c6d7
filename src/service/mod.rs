//! `EventService`: the library API for sending events and opening streams, named after
//! the seed module's.
//!
//! A publish serializes its data once, goes through the publisher task (which stores a
//! batch of publishes in one transaction and then fans them out in id order), and returns
//! the stored event's id. A subscribe registers with the hub, reads the stream's history
//! and returns the response body. Background workers save counts and sessions, send
//! heartbeats and apply retention; all of them stop on the shutdown token.

mod error;
mod history;
mod ledger;
mod metrics;
mod publisher;
mod stats;
mod stream;
mod subscribe;
mod workers;

use std::{
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use error::{NotReady, PublishError, StoreError, SubscribeError};
pub use stats::{ClientPage, ClientView, Stats};
pub use stream::ClientStream;
pub use subscribe::Subscribe;

use error::Doing;
use ledger::Ledger;

use crate::{
    bus::PgBus,
    config::{Config, DatabaseUrl},
    event::{EventName, MAX_DATA_BYTES, now_millis},
    filter::Filter,
    hub::{Client, Hub},
    store::{SessionRecord, Store, StoredEvent},
};

/// The result of a publish, as `POST /api/sse/notify` answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    pub event_id: i64,
    /// Streams on this instance that were handed the event.
    pub delivered: usize,
    /// At least one named user had no open stream anywhere: the event waits for them.
    pub pending: bool,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
struct ServiceMetrics {
    events_published: AtomicU64,
    publish_failures: AtomicU64,
    unreadable_filters: AtomicU64,
    history_rows_read: AtomicU64,
}

/// What `/metrics` shows, read at one moment.
#[derive(Clone, Copy, Debug, Default)]
pub struct Metrics {
    pub open_streams: u64,
    pub connections: u64,
    pub events_published: u64,
    pub publish_failures: u64,
    pub events_written: u64,
    pub frames_written: u64,
    pub dropped_slow: u64,
    pub dropped_stale: u64,
    pub dropped_behind: u64,
    pub dropped_orphaned: u64,
    pub unreadable_filters: u64,
    pub history_rows_read: u64,
    pub unsaved_sessions_dropped: u64,
    pub unsaved_settlements_dropped: u64,
}

/// A cheap handle for sending events to connected clients.
#[derive(Clone, Debug)]
pub struct EventService {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    hub: Hub,
    store: Store,
    config: Arc<Config>,
    requests: mpsc::Sender<publisher::Request>,
    /// KiB of event data that may wait for the publisher; beyond, publishers wait.
    queue_room: Arc<tokio::sync::Semaphore>,
    /// Whether the bus to other instances is down (always false without one).
    bus_down: AtomicBool,
    /// Set by the first heartbeat: a later one that has to re-create this instance's row
    /// means it was declared dead.
    joined: AtomicBool,
    started_at: i64,
    metrics: ServiceMetrics,
    instruments: metrics::Instruments,
    ledger: Ledger,
    /// Held by a flush from taking the ledger until its transaction commits, and by the
    /// stats while they add saved and unsaved counts, so that they never see a count in
    /// flight (in neither place) or twice.
    flushing: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Publishes waiting for the publisher; beyond this, publishers wait (backpressure).
const PUBLISH_QUEUE: usize = 4096;
/// Event data, in KiB, that may wait for the publisher at once: what bounds the queue's
/// memory, since one request may carry a batch of 8 MiB.
const PUBLISH_QUEUE_KIB: usize = 64 * 1024;

impl EventService {
    /// Starts the publisher and the background workers.
    pub async fn start(
        hub: Hub,
        store: Store,
        config: Arc<Config>,
        shutdown: CancellationToken,
    ) -> Result<Self, StoreError> {
        // Everything already stored is history to streams that connect from now on.
        let (last_event_id, _) = store
            .event_horizon()
            .await
            .doing("read the event log's horizon")?;
        hub.advance_cursor(last_event_id);
        let (requests, receiver) = mpsc::channel(PUBLISH_QUEUE);
        let (committed, committed_rx) = watch::channel(last_event_id);
        let service = Self {
            inner: Arc::new(Inner {
                hub,
                store,
                config,
                requests,
                queue_room: Arc::new(tokio::sync::Semaphore::new(PUBLISH_QUEUE_KIB)),
                bus_down: AtomicBool::new(false),
                joined: AtomicBool::new(false),
                started_at: now_millis(),
                metrics: ServiceMetrics::default(),
                instruments: metrics::Instruments::default(),
                ledger: Ledger::default(),
                flushing: tokio::sync::Mutex::new(()),
                shutdown,
                tasks: TaskTracker::new(),
            }),
        };
        // Register this instance before serving, so other instances see it at once.
        service.flush().await?;
        let tasks = &service.inner.tasks;
        tasks.spawn(publisher::run(service.clone(), receiver, committed_rx));
        if let DatabaseUrl::Postgres(url) = &service.inner.config.database {
            // Mark it down until it has listened once.
            service.inner.bus_down.store(true, Relaxed);
            tasks.spawn(workers::bus_loop(
                service.clone(),
                PgBus::new(&crate::store::postgres_url(url)),
                committed,
            ));
        }
        tasks.spawn(workers::flush_loop(service.clone()));
        tasks.spawn(workers::heartbeat_loop(service.clone()));
        tasks.spawn(workers::retention_loop(service.clone()));
        tasks.close();
        Ok(service)
    }

    pub(crate) fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub(crate) fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    /// Whether the database answers and, with several instances, the bus listens.
    pub async fn ready(&self) -> Result<(), NotReady> {
        let ping = tokio::time::timeout(Duration::from_secs(2), self.store().ping()).await;
        ping.unwrap_or(Err(sqlx::Error::PoolTimedOut))
            .doing("reach the database")?;
        if self.inner.bus_down.load(Relaxed) {
            return Err(NotReady::Bus);
        }
        Ok(())
    }

    /// The counters behind `/metrics`.
    pub fn metrics(&self) -> Metrics {
        let (hub, service, ledger) = (
            self.hub().metrics(),
            &self.inner.metrics,
            &self.inner.ledger,
        );
        Metrics {
            open_streams: self.hub().len() as u64,
            connections: ledger.connections(),
            events_published: service.events_published.load(Relaxed),
            publish_failures: service.publish_failures.load(Relaxed),
            events_written: ledger.events_written(),
            frames_written: hub.frames_written.load(Relaxed),
            dropped_slow: hub.dropped_slow.load(Relaxed),
            dropped_stale: hub.dropped_stale.load(Relaxed),
            dropped_behind: hub.dropped_behind.load(Relaxed),
            dropped_orphaned: hub.dropped_orphaned.load(Relaxed),
            unreadable_filters: service.unreadable_filters.load(Relaxed),
            history_rows_read: service.history_rows_read.load(Relaxed),
            unsaved_sessions_dropped: ledger.dropped_sessions.load(Relaxed),
            unsaved_settlements_dropped: ledger.dropped_settlements.load(Relaxed),
        }
    }

    /// Sends `data` as event `event` to the clients that match `filter`.
    pub async fn notify<T: Serialize + ?Sized>(
        &self,
        filter: Filter,
        event: &str,
        data: &T,
    ) -> Result<Published, PublishError> {
        filter.validate().map_err(PublishError::Invalid)?;
        self.publish(Some(filter), event, data).await
    }

    /// Sends to every stream of one user (and stores it for them if they have none).
    pub async fn notify_user<T: Serialize + ?Sized>(
        &self,
        user_id: &str,
        event: &str,
        data: &T,
    ) -> Result<Published, PublishError> {
        self.notify(Filter::user(user_id), event, data).await
    }

    /// Sends to the streams whose metadata has every given pair.
    pub async fn notify_with_metadata<T, K, V>(
        &self,
        metadata: impl IntoIterator<Item = (K, V)>,
        event: &str,
        data: &T,
    ) -> Result<Published, PublishError>
    where
        T: Serialize + ?Sized,
        K: Into<String>,
        V: Into<String>,
    {
        self.notify(Filter::metadata(metadata), event, data).await
    }

    /// Sends to every stream.
    pub async fn broadcast<T: Serialize + ?Sized>(
        &self,
        event: &str,
        data: &T,
    ) -> Result<Published, PublishError> {
        self.publish(None, event, data).await
    }

    /// Sends several events, stored in one transaction (all or none) and dispatched in
    /// order; `None` as a filter means everyone. One invalid event refuses the whole batch,
    /// naming its index.
    pub async fn batch<'a, T: Serialize + ?Sized + 'a>(
        &self,
        events: impl IntoIterator<Item = (Option<Filter>, &'a str, &'a T)>,
    ) -> Result<Vec<Published>, PublishError> {
        let events = events
            .into_iter()
            .enumerate()
            .map(|(i, (filter, event, data))| {
                if let Some(filter) = &filter {
                    filter
                        .validate()
                        .map_err(|e| PublishError::Invalid(format!("events[{i}].filter: {e}")))?;
                }
                prepare(filter, event, data).map_err(|error| match error {
                    PublishError::Invalid(e) => PublishError::Invalid(format!("events[{i}]: {e}")),
                    PublishError::TooLarge { .. } => PublishError::TooLarge { event: Some(i) },
                    PublishError::Serialize(e) => {
                        PublishError::Invalid(format!("events[{i}]: {e}"))
                    }
                    other => other,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if events.is_empty() || events.len() > MAX_BATCH_EVENTS {
            return Err(PublishError::Invalid(format!(
                "a batch holds 1 to {MAX_BATCH_EVENTS} events"
            )));
        }
        self.send(events).await
    }

    async fn publish<T: Serialize + ?Sized>(
        &self,
        filter: Option<Filter>,
        event: &str,
        data: &T,
    ) -> Result<Published, PublishError> {
        let mut published = self.send(vec![prepare(filter, event, data)?]).await?;
        // One event in, one result out.
        Ok(published.remove(0))
    }

    async fn send(&self, events: Vec<publisher::Prepared>) -> Result<Vec<Published>, PublishError> {
        let count = events.len() as u64;
        let started = std::time::Instant::now();
        let bytes: usize = events.iter().map(|e| e.data.len() + 64).sum();
        // At least 1 KiB a request; a batch's 8 MiB is well under the whole room.
        let kib = bytes.div_ceil(1024).clamp(1, PUBLISH_QUEUE_KIB) as u32;
        let room = self
            .inner
            .queue_room
            .clone()
            .acquire_many_owned(kib)
            .await
            .map_err(|_| PublishError::ShuttingDown)?;
        let (reply, answer) = oneshot::channel();
        let request = publisher::Request {
            events,
            reply,
            room,
        };
        self.inner
            .requests
            .send(request)
            .await
            .map_err(|_| PublishError::ShuttingDown)?;
        let result = answer.await.unwrap_or(Err(PublishError::ShuttingDown));
        self.inner
            .instruments
            .publish_seconds
            .observe(started.elapsed().as_secs_f64());
        let counter = match &result {
            Ok(_) => &self.inner.metrics.events_published,
            Err(_) => &self.inner.metrics.publish_failures,
        };
        counter.fetch_add(count, Relaxed);
        result
    }

    /// A stored event's filter (`None` for a broadcast), or `None` overall when it cannot
    /// be read: such an event is delivered to no one (it might be a private event written
    /// by a newer version), logged and counted.
    fn stored_filter(&self, stored: &StoredEvent) -> Option<Option<Filter>> {
        match parse_filter(stored.filter.as_deref()) {
            Ok(filter) => Some(filter),
            Err(error) => {
                self.inner.metrics.unreadable_filters.fetch_add(1, Relaxed);
                tracing::error!(
                    event_id = stored.event_id,
                    %error,
                    "an event's filter cannot be read; delivering it to no one"
                );
                None
            }
        }
    }

    /// Heartbeats older than this mark an instance (and its sessions) as gone.
    fn alive_since(&self) -> i64 {
        now_millis() - self.inner.config.client_timeout.as_millis() as i64
    }

    /// Saves counts and sessions now.
    pub async fn flush(&self) -> Result<(), StoreError> {
        workers::flush(self, true).await
    }

    /// Waits for the workers to finish after shutdown, saves what is left and removes this
    /// instance from the shared state. Call after the streams have closed.
    pub async fn finish(&self, within: Duration) {
        if tokio::time::timeout(within, self.inner.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("background tasks did not stop in time");
        }
        if let Err(error) = self.flush().await {
            tracing::error!(%error, "at shutdown");
        }
        let instance_id = self.inner.hub.instance_id();
        if let Err(error) = self
            .inner
            .store
            .remove_instance(instance_id, now_millis())
            .await
            .doing("remove this instance from the shared state")
        {
            tracing::error!(%error, "at shutdown");
        }
    }
}

/// Most events one batch may hold.
pub const MAX_BATCH_EVENTS: usize = 1000;

/// Checks an event's name and serializes its data once: every recipient shares the frame.
fn prepare<T: Serialize + ?Sized>(
    filter: Option<Filter>,
    event: &str,
    data: &T,
) -> Result<publisher::Prepared, PublishError> {
    let kind = EventName::parse(event).map_err(PublishError::Invalid)?;
    let data = serde_json::to_string(data)?;
    if data.len() > MAX_DATA_BYTES {
        return Err(PublishError::TooLarge { event: None });
    }
    Ok(publisher::Prepared { kind, data, filter })
}

/// A filter as the log stores it: JSON, or null for a broadcast.
fn parse_filter(filter: Option<&str>) -> Result<Option<Filter>, serde_json::Error> {
    filter.map(serde_json::from_str).transpose()
}

/// A stream's session as the store saves it.
fn session_record(
    client: &Client,
    instance_id: &str,
    disconnected_at: Option<i64>,
) -> SessionRecord {
    let info = &client.info;
    SessionRecord {
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
