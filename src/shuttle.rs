//! Shuttle: the plain run's drain under Shuttle's runtime.
//!
//! Shuttle's runtime answers SIGTERM or SIGINT by exiting the process at once, dropping
//! the service's future. So the service runs in its own task, and a hook that runs at
//! process exit asks that task to drain and waits for it (at most `STOP_BOUND`).

use std::{
    net::SocketAddr,
    os::{fd::AsRawFd, unix::net::UnixStream},
    sync::OnceLock,
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpListener,
};

use crate::{Application, Config, config::ConfigError, startup::STOP_BOUND, store::Store};

/// The service Shuttle binds once it has an address.
pub struct ShuttleService {
    config: Config,
    store: Store,
}

impl ShuttleService {
    pub fn new(config: Config, store: Store) -> Self {
        Self { config, store }
    }

    /// The configuration from Shuttle's secrets (the service's variables by name) and
    /// the database Shuttle provides.
    pub fn config(
        secrets: impl IntoIterator<Item = (String, String)>,
        database_url: String,
    ) -> Result<Config, ConfigError> {
        let mut vars: std::collections::HashMap<String, String> = secrets.into_iter().collect();
        vars.insert("DATABASE_URL".to_owned(), database_url);
        Config::from_vars(vars)
    }
}

#[shuttle_runtime::async_trait]
impl shuttle_runtime::Service for ShuttleService {
    async fn bind(self, addr: SocketAddr) -> Result<(), shuttle_runtime::Error> {
        let listener = TcpListener::bind(addr).await?;
        let app = Application::with_listener(self.config, self.store, listener).await?;
        let shutdown = app.shutdown_token();
        let (hook_end, service_end) = UnixStream::pair()?;
        service_end.set_nonblocking(true)?;
        let mut service_end = tokio::net::UnixStream::from_std(service_end)?;
        if EXIT_HOOK.set(hook_end).is_ok() {
            // SAFETY: registers a plain `extern "C"` function that makes only libc calls.
            unsafe { libc::atexit(drain_before_exit) };
        }
        let running = tokio::spawn(async move {
            let serving = app.run_until_stopped();
            tokio::pin!(serving);
            let mut byte = [0u8];
            let result = tokio::select! {
                result = &mut serving => result,
                _ = service_end.read(&mut byte) => {
                    tracing::info!("shutting down");
                    shutdown.cancel();
                    serving.await
                }
            };
            // Tells the exit hook that the drain is over.
            let _ = service_end.write_all(&byte).await;
            result
        });
        running
            .await
            .map_err(|error| shuttle_runtime::Error::BindPanic(error.to_string()))?
            .map_err(shuttle_runtime::Error::Custom)
    }
}

/// The exit hook's end of a socket pair whose other end the service's task holds.
static EXIT_HOOK: OnceLock<UnixStream> = OnceLock::new();

/// Runs inside `exit`, after this thread's thread-locals are gone: hence only libc
/// calls. The runtime's worker threads keep running the drain meanwhile.
extern "C" fn drain_before_exit() {
    let Some(socket) = EXIT_HOOK.get() else {
        return;
    };
    let fd = socket.as_raw_fd();
    let wait_ms = (STOP_BOUND.as_millis() + 1000) as libc::c_int;
    // SAFETY: `fd` is a socket this process owns for its whole life; the buffers are
    // locals that outlive the calls.
    unsafe {
        // A closed other end (the service already stopped) fails the write: nothing to wait for.
        if libc::write(fd, [1u8].as_ptr().cast(), 1) != 1 {
            return;
        }
        let mut done = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        libc::poll(&mut done, 1, wait_ms);
    }
}
