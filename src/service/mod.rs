//! `EventService`: the library API for sending events, named after the seed module's.
//!
//! A publish serializes its data once, goes through the publisher task (which stores a
//! batch of publishes in one transaction and then fans them out in id order), and returns
//! the stored event's id. Background workers save counts and sessions, send heartbeats and
//! apply retention; all of them stop on the shutdown token.

mod history;
mod publisher;
mod stats;
mod workers;

use std::{
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    time::Duration,
};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};
use tokio_util::{sync::CancellationToken, task::TaskTracker};

pub use history::{HistoryRequest, open_history};
pub use stats::{ClientView, Stats};

use crate::{
    config::Config,
    event::{EventName, MAX_DATA_BYTES, now_millis},
    filter::Filter,
    hub::Hub,
    store::Store,
};

/// The result of a publish, as `POST /api/sse/notify` answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Published {
    pub event_id: i64,
    /// Streams on this instance that were handed the event.
    pub delivered: usize,
    /// At least one named user had no open stream anywhere: the event waits for them.
    pub pending: bool,
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(String),
    #[error("data is larger than {MAX_DATA_BYTES} bytes once serialized")]
    TooLarge,
    #[error("data could not be serialized as JSON")]
    Serialize(#[from] serde_json::Error),
    #[error("the event could not be stored")]
    Unavailable(#[source] Arc<sqlx::Error>),
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct ServiceMetrics {
    pub events_published: AtomicU64,
    pub publish_failures: AtomicU64,
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
    started_at: i64,
    metrics: ServiceMetrics,
    /// Held by a flush from taking the ledger until its transaction commits, and by the
    /// stats while they add saved and unsaved counts, so that they never see a count in
    /// flight (in neither place) or twice.
    flushing: tokio::sync::Mutex<()>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// Publishes waiting for the publisher; beyond this, publishers wait (backpressure).
const PUBLISH_QUEUE: usize = 4096;

impl EventService {
    /// Starts the publisher and the background workers.
    pub async fn start(
        hub: Hub,
        store: Store,
        config: Arc<Config>,
        shutdown: CancellationToken,
    ) -> Result<Self, sqlx::Error> {
        // Everything already stored is history to streams that connect from now on.
        let (last_event_id, _) = store.event_horizon().await?;
        hub.advance_cursor(last_event_id);
        let (requests, receiver) = mpsc::channel(PUBLISH_QUEUE);
        let service = Self {
            inner: Arc::new(Inner {
                hub,
                store,
                config,
                requests,
                started_at: now_millis(),
                metrics: ServiceMetrics::default(),
                flushing: tokio::sync::Mutex::new(()),
                shutdown,
                tasks: TaskTracker::new(),
            }),
        };
        // Register this instance before serving, so other instances see it at once.
        service.flush().await?;
        let tasks = &service.inner.tasks;
        tasks.spawn(publisher::run(service.clone(), receiver));
        tasks.spawn(workers::flush_loop(service.clone()));
        tasks.spawn(workers::heartbeat_loop(service.clone()));
        tasks.spawn(workers::retention_loop(service.clone()));
        tasks.close();
        Ok(service)
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn config(&self) -> &Config {
        &self.inner.config
    }

    pub fn metrics(&self) -> &ServiceMetrics {
        &self.inner.metrics
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

    async fn publish<T: Serialize + ?Sized>(
        &self,
        filter: Option<Filter>,
        event: &str,
        data: &T,
    ) -> Result<Published, PublishError> {
        let kind = EventName::parse(event).map_err(PublishError::Invalid)?;
        // Serialized once here; every recipient shares the encoded frame.
        let data = serde_json::to_string(data)?;
        if data.len() > MAX_DATA_BYTES {
            return Err(PublishError::TooLarge);
        }
        let (reply, answer) = oneshot::channel();
        let request = publisher::Request {
            kind,
            data,
            filter,
            reply,
        };
        self.inner
            .requests
            .send(request)
            .await
            .map_err(|_| PublishError::ShuttingDown)?;
        let result = answer.await.unwrap_or(Err(PublishError::ShuttingDown));
        let counter = match &result {
            Ok(_) => &self.inner.metrics.events_published,
            Err(_) => &self.inner.metrics.publish_failures,
        };
        counter.fetch_add(1, Relaxed);
        result
    }

    /// Heartbeats older than this mark an instance (and its sessions) as gone.
    fn alive_since(&self) -> i64 {
        now_millis() - self.inner.config.client_timeout.as_millis() as i64
    }

    /// Saves counts and sessions now.
    pub async fn flush(&self) -> Result<(), sqlx::Error> {
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
            tracing::error!(%error, "could not save counts and sessions at shutdown");
        }
        let instance_id = self.inner.hub.instance_id();
        if let Err(error) = self
            .inner
            .store
            .remove_instance(instance_id, now_millis())
            .await
        {
            tracing::error!(%error, "could not remove this instance from the shared state");
        }
    }
}
