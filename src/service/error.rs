//! The service's errors. The HTTP layer maps them to statuses without knowing the driver.

use std::sync::Arc;

use crate::event::MAX_DATA_BYTES;

/// The database could not do something; `doing` says what, for the log line.
#[derive(Clone, Debug, thiserror::Error)]
#[error("could not {doing}: {source}")]
pub struct StoreError {
    doing: &'static str,
    #[source]
    source: Arc<sqlx::Error>,
}

/// Adds what was being done to a database error.
pub(crate) trait Doing<T> {
    fn doing(self, what: &'static str) -> Result<T, StoreError>;
}

impl<T> Doing<T> for Result<T, sqlx::Error> {
    fn doing(self, doing: &'static str) -> Result<T, StoreError> {
        self.map_err(|source| StoreError {
            doing,
            source: Arc::new(source),
        })
    }
}

/// Why the instance is not ready to serve.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error(transparent)]
    Database(#[from] StoreError),
    #[error("not listening to the other instances; reconnecting")]
    Bus,
}

/// Why a publish was refused.
#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("{0}")]
    Invalid(String),
    #[error("{}data is larger than {MAX_DATA_BYTES} bytes once serialized",
        .event.map(|i| format!("events[{i}]: ")).unwrap_or_default())]
    TooLarge {
        /// The index of the batch event whose data it was.
        event: Option<usize>,
    },
    #[error("data could not be serialized as JSON")]
    Serialize(#[from] serde_json::Error),
    #[error("the event could not be stored")]
    Unavailable(#[source] StoreError),
    #[error("the service is shutting down")]
    ShuttingDown,
}

/// Why a stream was not opened.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// `MAX_CLIENTS` streams are open here.
    #[error("{0} streams are open, the most this instance takes")]
    Full(usize),
    /// The user has `MAX_STREAMS_PER_USER` streams open here.
    #[error("this user already has {0} streams open here, the most allowed")]
    UserFull(usize),
    #[error("the service is shutting down")]
    ShuttingDown,
    #[error(transparent)]
    Unavailable(#[from] StoreError),
}
