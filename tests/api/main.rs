//! Integration tests: the real app over HTTP with a real SSE client, on SQLite and on a
//! fresh Postgres database per test.

mod auth;
mod batch;
mod delivery;
#[cfg(any(feature = "shuttle", feature = "lambda"))]
mod deploy;
mod helpers;
mod history;
mod hostile;
mod instances;
mod monitoring;
mod postgres;
mod process;
mod publishing;
mod storage;
mod streams;
mod web;
