//! nomey-sse: real-time notifications over Server-Sent Events, with durable replay.
//!
//! # Layout
//! Live streams are held in memory by the [`hub`]; everything a user would be upset to
//! lose goes through the [`store`]. [`service::EventService`] joins them: it stores each
//! publish and fans it out. The [`http`] layer is thin; [`startup`] builds and runs it all
//! for every entry point.

/// Typed configuration from the environment.
pub mod config;
/// Event names, the SSE wire format and times.
pub mod event;
/// Who an event is for.
pub mod filter;
/// The HTTP API.
pub mod http;
/// The registry of open streams and fan-out; no HTTP, no database.
pub mod hub;
/// The accept loop over hyper.
pub mod server;
/// `EventService`: publishing, history and the background workers.
pub mod service;
/// Building and running the application.
pub mod startup;
/// Durable state on Postgres or SQLite.
pub mod store;
/// Structured logging.
pub mod telemetry;

pub use config::Config;
pub use filter::Filter;
pub use service::{EventService, PublishError, Published};
pub use startup::Application;
