//! nomey-sse: real-time notifications over Server-Sent Events, with durable replay.
//!
//! # Layout
//! Each room uses only the rooms below it (the imports show it):
//!
//! ```text
//! main.rs, bin/, startup  build and run everything; shuttle and lambda adapt it to
//!                         those runtimes
//! http, server          the HTTP API over EventService; the accept loop and its
//!                       transport types (connection handles, the open-files budget)
//! service               EventService: publishing, subscribing, history, workers
//! bus                   wake-ups from other instances (reads nothing but its channel)
//! hub, store            live streams in memory; durable state (no hub in the store,
//!                       no database in the hub)
//! event, filter, config, telemetry   leaves
//! ```

/// Wake-ups between instances (Postgres LISTEN/NOTIFY).
pub(crate) mod bus;
/// Typed configuration from the environment.
pub mod config;
/// Event names, the SSE wire format and times.
pub mod event;
/// Who an event is for, and who a stream is.
pub mod filter;
/// The HTTP API.
pub(crate) mod http;
/// The registry of open streams and fan-out; no HTTP, no database.
pub(crate) mod hub;
/// The AWS Lambda entry point: the router under Lambda's runtime, with streaming.
#[cfg(feature = "lambda")]
pub mod lambda;
/// The accept loop over hyper, and its transport types.
pub(crate) mod server;
/// `EventService`: publishing, subscribing, history and the background workers.
pub mod service;
/// The Shuttle entry point's service, with the same drain as a plain run.
#[cfg(feature = "shuttle")]
pub mod shuttle;
/// Building and running the application.
pub mod startup;
/// Durable state on Postgres or SQLite; public so that it can be read and tested alone.
pub mod store;
/// Structured logging.
pub mod telemetry;

pub use config::Config;
pub use filter::Filter;
pub use service::{EventService, PublishError, Published};
pub use startup::Application;
