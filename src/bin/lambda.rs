//! The AWS Lambda entry point, behind a function URL in `RESPONSE_STREAM` mode.

use std::process::ExitCode;

use nomey_sse::{lambda, startup::connect_store, telemetry};

// jemalloc: see its entry in Cargo.toml.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> ExitCode {
    let config = match lambda::config_from_env() {
        Ok(config) => config,
        Err(error) => {
            eprintln!("nomey-sse: {error}");
            return ExitCode::from(2);
        }
    };
    telemetry::init(config.enable_logging, config.log_json);
    let store = connect_store(&config.database).await;
    match lambda::run(config, store).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            tracing::error!(error = %format!("{error:#}"), "stopped with an error");
            ExitCode::FAILURE
        }
    }
}
