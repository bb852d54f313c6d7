//! The bus: how an instance learns that another one committed events, so that it hands
//! them to its own streams within milliseconds. A boundary, not a broker: Postgres
//! LISTEN/NOTIFY carries it today ([`postgres`]); a Redis or NATS bus would implement the
//! same trait without touching the hub or the store. The events themselves are always
//! read from the log, by id, in order.

mod postgres;

use std::future::Future;

pub use postgres::PgBus;

/// What the bus tells an instance.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wake {
    /// Events up to this id are committed.
    Committed(i64),
    /// The bus (re)connected: announcements may have been missed, so catch up from the
    /// log.
    Resync,
}

/// Wake-ups from other instances.
pub trait Bus: Send {
    /// The next wake-up. An error means the bus is down: the caller waits and calls
    /// again, and the bus reconnects and answers [`Wake::Resync`] first.
    fn next(&mut self) -> impl Future<Output = Result<Wake, sqlx::Error>> + Send;
}
