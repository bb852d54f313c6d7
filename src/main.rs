//! A plain run: environment → telemetry → database → application.

use std::process::ExitCode;

use nomey_sse::{
    Application, Config,
    startup::{connect_store, shutdown_signal},
    telemetry,
};

// jemalloc: see its entry in Cargo.toml.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match Config::from_env() {
        Ok(config) => config,
        Err(error) => {
            // Logging is not set up yet, and this must reach a person.
            eprintln!("nomey-sse: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(config.enable_logging, config.log_json);
    let store = tokio::select! {
        store = connect_store(&config.database) => store,
        () = shutdown_signal() => return ExitCode::SUCCESS,
    };
    let app = match Application::build(config, store).await {
        Ok(app) => app,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "could not start");
            eprintln!("nomey-sse: {error:#}");
            return ExitCode::FAILURE;
        }
    };
    let shutdown = app.shutdown_token();
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        shutdown.cancel();
    });
    match app.run_until_stopped().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}
