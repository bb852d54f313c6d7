//! Building and running the application: shared by every entry point.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use anyhow::Context;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{
    config::{Config, DatabaseUrl},
    http::{self, AppParts, AppState},
    hub::Hub,
    server::{self, FileBudget},
    service::EventService,
    store::{SoleUse, Store},
};

/// How long shutdown waits for streams to end before it stops waiting.
const DRAIN: Duration = Duration::from_secs(5);
/// How long shutdown waits for background tasks.
const TASKS_GRACE: Duration = Duration::from_secs(2);
/// The most the last save may take, so that a stop ends within 10 s even when the
/// database hangs (`DRAIN` + this).
const FINISH: Duration = Duration::from_secs(4);
/// The longest a stop may take: the drain, then the last save.
pub const STOP_BOUND: Duration = Duration::from_secs(DRAIN.as_secs() + FINISH.as_secs());

/// A bound, ready-to-run instance of the service.
pub struct Application {
    listener: TcpListener,
    parts: Parts,
}

impl Application {
    /// Starts the workers and binds `config.bind_addr` (port 0 picks a free port).
    pub async fn build(config: Config, store: Store) -> anyhow::Result<Self> {
        let listener = TcpListener::bind(config.bind_addr)
            .await
            .with_context(|| format!("could not listen on {}", config.bind_addr))?;
        Self::with_listener(config, store, listener).await
    }

    /// Like `build`, with a listener the caller bound (Shuttle, tests).
    pub async fn with_listener(
        config: Config,
        store: Store,
        listener: TcpListener,
    ) -> anyhow::Result<Self> {
        let parts = Parts::start(config, store).await?;
        Ok(Self { listener, parts })
    }

    pub fn local_addr(&self) -> SocketAddr {
        // A bound listener always has an address.
        self.listener
            .local_addr()
            .expect("a bound listener has a local address")
    }

    pub fn port(&self) -> u16 {
        self.local_addr().port()
    }

    /// Cancelling this token shuts the application down gracefully.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.parts.state.shutdown.clone()
    }

    pub fn events(&self) -> &EventService {
        &self.parts.state.events
    }

    /// Serves until the shutdown token fires; then ends every stream cleanly, saves the
    /// counts and sessions and leaves the shared state.
    pub async fn run_until_stopped(self) -> anyhow::Result<()> {
        let Self { listener, parts } = self;
        tracing::info!(
            addr = %listener.local_addr()?,
            instance_id = parts.hub.instance_id(),
            store = ?parts.store.backend(),
            "nomey-sse listening"
        );
        let state = &parts.state;
        let router = http::router(state.clone());
        parts.close_streams_on_shutdown();
        server::serve(
            listener,
            router,
            state.files.clone(),
            state.shutdown.clone(),
            state.config.client_timeout,
            state.config.request_timeout,
            DRAIN,
        )
        .await;
        parts.finish().await;
        Ok(())
    }
}

/// The application without a listener, for a runtime that brings its own HTTP front
/// (AWS Lambda): its router, and the same ending as a plain run's stop.
pub struct Detached {
    parts: Parts,
}

impl Detached {
    /// Starts the workers; nothing listens until the router is served.
    pub async fn start(config: Config, store: Store) -> anyhow::Result<Self> {
        let parts = Parts::start(config, store).await?;
        tracing::info!(
            instance_id = parts.hub.instance_id(),
            store = ?parts.store.backend(),
            "nomey-sse ready"
        );
        parts.close_streams_on_shutdown();
        Ok(Self { parts })
    }

    pub fn router(&self) -> axum::Router {
        http::router(self.parts.state.clone())
    }

    pub fn events(&self) -> &EventService {
        &self.parts.state.events
    }

    /// Ends every stream, then saves the counts and sessions and leaves the shared state.
    pub async fn stop(self) {
        self.parts.state.shutdown.cancel();
        self.parts.hub.close();
        self.parts.finish().await;
    }
}

/// What every entry point runs: the state behind the router, the workers and the store.
struct Parts {
    state: AppState,
    hub: Hub,
    store: Store,
    _sole_use: SoleUse,
}

impl Parts {
    async fn start(config: Config, store: Store) -> anyhow::Result<Self> {
        let sole_use = SoleUse::take(&config.database).map_err(|reason| anyhow::anyhow!(reason))?;
        warn_if_open(&config);
        let files = FileBudget::new(raise_open_files_limit());
        let config = Arc::new(config);
        let shutdown = CancellationToken::new();
        let hub = Hub::new(
            Uuid::new_v4().to_string(),
            config.max_clients,
            config.max_streams_per_user,
            config.client_timeout,
        );
        let events =
            EventService::start(hub.clone(), store.clone(), config.clone(), shutdown.clone())
                .await
                .context("could not start the event service")?;
        let state = AppState::new(AppParts {
            events,
            config,
            shutdown,
            files,
        });
        Ok(Self {
            state,
            hub,
            store,
            _sole_use: sole_use,
        })
    }

    fn close_streams_on_shutdown(&self) {
        let shutdown = self.state.shutdown.clone();
        let hub = self.hub.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            // Streams end once their queues are written; clients resume elsewhere.
            hub.close();
        });
    }

    /// The last save, bounded so that a stop ends even when the database hangs.
    async fn finish(self) {
        if tokio::time::timeout(FINISH, self.state.events.finish(TASKS_GRACE))
            .await
            .is_err()
        {
            tracing::error!("the last save did not finish in time; stopping without it");
        }
        self.store.close().await;
        tracing::info!("nomey-sse stopped");
    }
}

fn warn_if_open(config: &Config) {
    match (&config.publish_key, &config.jwt_secret) {
        (None, None) => tracing::warn!(
            "neither SSE_PUBLISH_KEY nor SSE_JWT_SECRET is set: anyone can publish, read stats and open any user's stream (development mode)"
        ),
        (None, Some(_)) => {
            tracing::warn!("SSE_PUBLISH_KEY is not set: anyone can publish and read stats")
        }
        (Some(_), None) => {
            tracing::warn!("SSE_JWT_SECRET is not set: anyone can open any user's stream")
        }
        (Some(_), Some(_)) => {}
    }
}

/// Connects to the database, retrying with backoff while it is unreachable, so that a
/// service started before its database waits for it instead of crash-looping.
pub async fn connect_store(url: &DatabaseUrl) -> Store {
    let mut delay = Duration::from_millis(500);
    loop {
        match Store::connect(url).await {
            Ok(store) => return store,
            Err(error) => {
                tracing::error!(%error, retry_in_ms = delay.as_millis() as u64, "could not open the database");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(30));
            }
        }
    }
}

/// Completes on Ctrl-C or SIGTERM.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if tokio::signal::ctrl_c().await.is_err() {
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {}
        () = terminate => {}
    }
}

/// Raises the soft open-files limit to the hard one (a stream is a descriptor) and
/// returns the limit in force.
fn raise_open_files_limit() -> u64 {
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    let raised = rlimit::increase_nofile_limit(hard).unwrap_or(soft);
    tracing::info!(
        soft_before = soft,
        hard,
        soft_now = raised,
        "open-files limit"
    );
    raised
}
