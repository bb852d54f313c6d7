//! AWS Lambda with response streaming: the same router, one invocation per request.
//!
//! A stream holds its invocation open, so it must end before Lambda's 15-minute cap
//! cuts it: the client then resumes with `Last-Event-ID` and loses nothing. Events
//! published elsewhere reach this instance through the Postgres bus.

use std::collections::HashMap;

use crate::{
    Config,
    config::ConfigError,
    startup::{Detached, shutdown_signal},
    store::Store,
};

/// `MAX_STREAM_DURATION_MS` unless set: 14.5 minutes, under Lambda's 15-minute cap
/// with room for the last write.
pub const DEFAULT_MAX_STREAM_DURATION_MS: u64 = 870_000;

/// The configuration from the environment, with Lambda's default stream lifetime.
pub fn config_from_env() -> Result<Config, ConfigError> {
    let mut vars: HashMap<String, String> = std::env::vars().collect();
    let lifetime = vars.entry("MAX_STREAM_DURATION_MS".to_owned()).or_default();
    if lifetime.trim().is_empty() {
        *lifetime = DEFAULT_MAX_STREAM_DURATION_MS.to_string();
    }
    Config::from_vars(vars)
}

/// Serves invocations until the runtime stops, then ends streams and saves as a plain
/// run's stop does. (Lambda sends SIGTERM only to a function with an extension; without
/// one, the periodic saves are what survives a frozen and reclaimed instance.)
pub async fn run(config: Config, store: Store) -> anyhow::Result<()> {
    let app = Detached::start(config, store).await?;
    let served = lambda_http::run_with_streaming_response(app.router());
    let result = tokio::select! {
        result = served => result.map_err(|error| anyhow::anyhow!(error)),
        () = shutdown_signal() => Ok(()),
    };
    app.stop().await;
    result
}
