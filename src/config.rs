//! Typed configuration, read once from the environment (see the contract's table).

use std::{collections::HashMap, net::SocketAddr, time::Duration};

/// Everything the service can be told, with the seed module's defaults.
#[derive(Clone, Debug)]
pub struct Config {
    /// Address a plain run listens on (`BIND_ADDR`, else `0.0.0.0:$PORT`).
    pub bind_addr: SocketAddr,
    /// Where durable state lives.
    pub database: DatabaseUrl,
    /// Heartbeat interval (`PING_INTERVAL_MS`).
    pub ping_interval: Duration,
    /// A stream that accepts no data for this long, or a session row whose instance
    /// stopped heart-beating for this long, is stale (`CLIENT_TIMEOUT_MS`).
    pub client_timeout: Duration,
    /// Concurrent streams on this instance (`MAX_CLIENTS`).
    pub max_clients: usize,
    /// Concurrent streams of one user on this instance (`MAX_STREAMS_PER_USER`, 0 = no
    /// limit).
    pub max_streams_per_user: usize,
    /// Most events one resuming stream is sent from the log (`MAX_REPLAY_EVENTS`).
    pub max_replay_events: usize,
    /// Structured logs on or off (`ENABLE_LOGGING`).
    pub enable_logging: bool,
    /// `LOG_FORMAT=json` for JSON lines.
    pub log_json: bool,
    /// Streams end cleanly after this long (`MAX_STREAM_DURATION_MS`, 0 = never).
    pub max_stream_duration: Option<Duration>,
    /// The `retry:` hint before jitter (`RETRY_MS`).
    pub retry: Duration,
    /// How long events stay replayable and pending (`HISTORY_RETENTION_MS`).
    pub history_retention: Duration,
    /// HS256 secret for subscriber tokens (`SSE_JWT_SECRET`).
    pub jwt_secret: Option<Secret>,
    /// Bearer key for publishing and monitoring (`SSE_PUBLISH_KEY`).
    pub publish_key: Option<Secret>,
    /// Origins allowed to call from a browser (`CORS_ORIGINS`).
    pub cors_origins: Vec<String>,
    /// How long a request's headers and body may take to arrive (`REQUEST_TIMEOUT_MS`).
    pub request_timeout: Duration,
}

/// A secret that never shows in `Debug` output, so logging the config is safe.
#[derive(Clone)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret([redacted])")
    }
}

/// A validated `DATABASE_URL`: the backend is known before anything connects.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DatabaseUrl {
    Postgres(String),
    Sqlite(String),
}

impl DatabaseUrl {
    /// The embedded default: a SQLite file in the working directory.
    pub const DEFAULT: &'static str = "sqlite://nomey-sse.db";

    pub fn parse(url: &str) -> Result<Self, String> {
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Self::Postgres(url.to_owned()))
        } else if url.starts_with("sqlite:") {
            Ok(Self::Sqlite(url.to_owned()))
        } else {
            Err("expected a postgres://, sqlite:// or sqlite::memory: URL".to_owned())
        }
    }

    pub fn as_str(&self) -> &str {
        match self {
            Self::Postgres(url) | Self::Sqlite(url) => url,
        }
    }
}

/// A configuration value that stops the start; the message names the variable.
#[derive(Debug, thiserror::Error)]
#[error("invalid {name}={value:?}: {reason}")]
pub struct ConfigError {
    pub name: &'static str,
    pub value: String,
    pub reason: String,
}

impl Config {
    /// Reads the process environment.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_vars(std::env::vars().collect())
    }

    /// Reads a given set of variables (Shuttle secrets, tests).
    pub fn from_vars(vars: HashMap<String, String>) -> Result<Self, ConfigError> {
        let env = Vars(vars);
        let port: u16 = env.parse("PORT", 8000)?;
        let bind_addr = match env.get("BIND_ADDR") {
            Some(addr) => addr
                .parse()
                .map_err(|_| env.error("BIND_ADDR", "expected host:port"))?,
            None => SocketAddr::from(([0, 0, 0, 0], port)),
        };
        let database = DatabaseUrl::parse(env.get("DATABASE_URL").unwrap_or(DatabaseUrl::DEFAULT))
            .map_err(|reason| env.error("DATABASE_URL", &reason))?;
        let ping_interval = env.millis("PING_INTERVAL_MS", 45_000)?;
        let client_timeout = env.millis("CLIENT_TIMEOUT_MS", 90_000)?;
        let retry = env.millis("RETRY_MS", 3_000)?;
        let history_retention = env.millis("HISTORY_RETENTION_MS", 86_400_000)?;
        let request_timeout = env.millis("REQUEST_TIMEOUT_MS", 30_000)?;
        for (name, value) in [
            ("REQUEST_TIMEOUT_MS", request_timeout),
            ("PING_INTERVAL_MS", ping_interval),
            ("CLIENT_TIMEOUT_MS", client_timeout),
            ("HISTORY_RETENTION_MS", history_retention),
        ] {
            if value.is_zero() {
                return Err(env.error(name, "must be greater than 0"));
            }
        }
        let max_stream_duration =
            Some(env.millis("MAX_STREAM_DURATION_MS", 0)?).filter(|d| !d.is_zero());
        let max_clients: usize = env.parse("MAX_CLIENTS", 1000)?;
        let max_streams_per_user: usize = env.parse("MAX_STREAMS_PER_USER", 32)?;
        let max_replay_events: usize = env.parse("MAX_REPLAY_EVENTS", 10_000)?;
        if max_replay_events == 0 {
            return Err(env.error("MAX_REPLAY_EVENTS", "must be greater than 0"));
        }
        let log_json = match env.get("LOG_FORMAT") {
            None | Some("text") | Some("pretty") => false,
            Some("json") => true,
            Some(_) => return Err(env.error("LOG_FORMAT", "expected json or text")),
        };
        let cors_origins: Vec<String> = env
            .get("CORS_ORIGINS")
            .map(|list| {
                list.split(',')
                    .map(str::trim)
                    .filter(|o| !o.is_empty())
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default();
        // `*` cannot go with credentials; each origin must be named.
        if cors_origins.iter().any(|o| {
            axum::http::HeaderValue::from_str(o).is_err() || o.contains(' ') || o.contains('*')
        }) {
            return Err(env.error(
                "CORS_ORIGINS",
                "expected comma-separated origins such as https://app.example",
            ));
        }
        Ok(Self {
            bind_addr,
            database,
            ping_interval,
            client_timeout,
            max_clients,
            max_streams_per_user,
            max_replay_events,
            enable_logging: env.bool("ENABLE_LOGGING", true)?,
            log_json,
            max_stream_duration,
            retry,
            history_retention,
            jwt_secret: env.secret("SSE_JWT_SECRET"),
            publish_key: env.secret("SSE_PUBLISH_KEY"),
            cors_origins,
            request_timeout,
        })
    }
}

struct Vars(HashMap<String, String>);

impl Vars {
    /// An empty variable counts as unset, as shells and `.env` files produce them.
    fn get(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(|v| v.trim()).filter(|v| !v.is_empty())
    }

    fn error(&self, name: &'static str, reason: &str) -> ConfigError {
        ConfigError {
            name,
            value: self.get(name).unwrap_or_default().to_owned(),
            reason: reason.to_owned(),
        }
    }

    fn parse<T: std::str::FromStr>(
        &self,
        name: &'static str,
        default: T,
    ) -> Result<T, ConfigError> {
        match self.get(name) {
            None => Ok(default),
            Some(value) => value.parse().map_err(|_| {
                let digits = !value.is_empty() && value.bytes().all(|b| b.is_ascii_digit());
                let reason = if digits {
                    "too large for this setting"
                } else {
                    "expected a non-negative whole number"
                };
                self.error(name, reason)
            }),
        }
    }

    /// Milliseconds, at most ten years: a deadline that far ahead is "never", and one
    /// much further would overflow the clock it is added to.
    fn millis(&self, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
        const TEN_YEARS_MS: u64 = 10 * 366 * 24 * 3600 * 1000;
        match self.parse(name, default)? {
            ms if ms > TEN_YEARS_MS => Err(self.error(name, "more than ten years")),
            ms => Ok(Duration::from_millis(ms)),
        }
    }

    fn bool(&self, name: &'static str, default: bool) -> Result<bool, ConfigError> {
        match self.get(name).map(str::to_ascii_lowercase).as_deref() {
            None => Ok(default),
            Some("true" | "1" | "yes" | "on") => Ok(true),
            Some("false" | "0" | "no" | "off") => Ok(false),
            Some(_) => Err(self.error(name, "expected true or false")),
        }
    }

    fn secret(&self, name: &str) -> Option<Secret> {
        self.get(name).map(|v| Secret(v.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_vars(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn defaults_are_the_seed_modules() {
        let c = config(&[]).unwrap();
        assert_eq!(c.bind_addr.port(), 8000);
        assert_eq!(c.ping_interval, Duration::from_secs(45));
        assert_eq!(c.client_timeout, Duration::from_secs(90));
        assert_eq!(c.max_clients, 1000);
        assert_eq!(
            c.database,
            DatabaseUrl::Sqlite("sqlite://nomey-sse.db".into())
        );
        assert!(c.max_stream_duration.is_none());
    }

    #[test]
    fn a_bad_value_names_its_variable() {
        let err = config(&[("PING_INTERVAL_MS", "soon")]).unwrap_err();
        assert_eq!(err.name, "PING_INTERVAL_MS");
        let err = config(&[("DATABASE_URL", "mysql://x")]).unwrap_err();
        assert_eq!(err.name, "DATABASE_URL");
        assert!(err.to_string().contains("DATABASE_URL"));
        let err = config(&[("MAX_CLIENTS", "-1")]).unwrap_err();
        assert_eq!(err.name, "MAX_CLIENTS");
        let err = config(&[("REQUEST_TIMEOUT_MS", "18446744073709551615")]).unwrap_err();
        assert_eq!(
            (err.name, err.reason.as_str()),
            ("REQUEST_TIMEOUT_MS", "more than ten years")
        );
        let err = config(&[("PORT", "99999")]).unwrap_err();
        assert_eq!(
            (err.name, err.reason.as_str()),
            ("PORT", "too large for this setting")
        );
        let err = config(&[("CORS_ORIGINS", "*")]).unwrap_err();
        assert_eq!(err.name, "CORS_ORIGINS");
    }

    #[test]
    fn secrets_stay_out_of_debug_output() {
        let c = config(&[("SSE_PUBLISH_KEY", "hunter2")]).unwrap();
        assert!(!format!("{c:?}").contains("hunter2"));
    }
}
