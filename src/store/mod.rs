//! Durable state: the event log, pending notifications, sessions and running totals.
//!
//! One `Store` serves Postgres and SQLite through sqlx's `Any` driver: the queries are
//! written once in the SQL both dialects share (`$n` placeholders, `returning`,
//! `on conflict`), times are integer milliseconds and JSON is text, so the two backends
//! differ only in their migrations and pool settings. The compile-time query macros check
//! against one database per crate (sqlx#916), so queries here are checked by the test
//! suite, which runs every one of them on both backends.

mod events;
mod sessions;

use std::{str::FromStr, time::Duration};

use sqlx::{
    AnyPool, Executor,
    any::{AnyConnectOptions, AnyPoolOptions},
    migrate::Migrator,
};

pub use events::{ANNOUNCE_CHANNEL, NewEvent, StoredEvent, Writer};
pub use sessions::{SessionRecord, Tallies, Totals};

use crate::config::DatabaseUrl;

static POSTGRES_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/postgres");
static SQLITE_MIGRATIONS: Migrator = sqlx::migrate!("./migrations/sqlite");

/// Which database is behind the pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    /// The statement that begins a transaction that will write (see `Store::begin_write`).
    fn begin_write(self) -> &'static str {
        match self {
            Backend::Postgres => "BEGIN",
            Backend::Sqlite => "BEGIN IMMEDIATE",
        }
    }
}

/// A cheap handle to the database.
#[derive(Clone, Debug)]
pub struct Store {
    pool: AnyPool,
    backend: Backend,
}

/// A pooled connection idle for longer than this is pinged before it is handed out.
const IDLE_CHECK: Duration = Duration::from_secs(1);

impl Store {
    /// Connects and runs the migrations.
    pub async fn connect(url: &DatabaseUrl) -> Result<Self, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let (backend, url, in_memory) = match url {
            DatabaseUrl::Postgres(url) => (Backend::Postgres, postgres_url(url), false),
            DatabaseUrl::Sqlite(url) => {
                let in_memory = url.contains(":memory:") || url.contains("mode=memory");
                (Backend::Sqlite, sqlite_url(url), in_memory)
            }
        };
        let options = AnyConnectOptions::from_str(&url)?;
        // A publish that cannot reach the database should fail fast (503), not hang.
        let pool = AnyPoolOptions::new()
            .acquire_timeout(Duration::from_secs(3))
            // By default sqlx pings every connection it hands out: a round trip before each
            // query, a third of a one-event publish's. A connection that was in use a moment
            // ago has just proved itself; one that sat idle (say, across a database
            // restart) is still checked, and replaced if it fails.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for > IDLE_CHECK {
                        sqlx::Connection::ping(conn).await?;
                    }
                    Ok(true)
                })
            });
        let pool = match backend {
            Backend::Postgres => pool.max_connections(16),
            // An in-memory database lives as long as its one connection.
            Backend::Sqlite if in_memory => pool
                .max_connections(1)
                .min_connections(1)
                .idle_timeout(None)
                .max_lifetime(None),
            // One writer at a time anyway; a few readers for replay and monitoring.
            Backend::Sqlite => pool.max_connections(4),
        };
        let pool = pool.connect_with(options).await?;
        let store = Self { pool, backend };
        store.migrate().await?;
        Ok(store)
    }

    async fn migrate(&self) -> Result<(), sqlx::Error> {
        match self.backend {
            Backend::Postgres => POSTGRES_MIGRATIONS.run(&self.pool).await?,
            Backend::Sqlite => {
                // WAL lets readers (replay, stats) run beside the writer; it is a property
                // of the file, so setting it once is enough.
                self.pool.execute("pragma journal_mode = wal").await?;
                SQLITE_MIGRATIONS.run(&self.pool).await?
            }
        }
        Ok(())
    }

    /// Begins a transaction that will write. On SQLite it takes the write lock up front
    /// (`BEGIN IMMEDIATE`), so that it waits its turn (the busy timeout) instead of failing
    /// with "database is locked" when a read inside it meets another writer.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Any>, sqlx::Error> {
        self.pool.begin_with(self.backend.begin_write()).await
    }

    pub fn backend(&self) -> Backend {
        self.backend
    }

    /// Whether the database answers.
    pub async fn ping(&self) -> Result<(), sqlx::Error> {
        self.pool.execute("select 1").await.map(|_| ())
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Holds an SQLite file for one instance (an advisory lock on `<file>.lock`, released
/// when dropped). SQLite serves one instance: several would each deliver only their own
/// events live. Postgres is the store for several instances.
#[derive(Debug)]
pub struct SoleUse(#[allow(dead_code)] Option<std::fs::File>);

impl SoleUse {
    /// Takes the lock for an SQLite file; nothing for Postgres or an in-memory store.
    pub fn take(url: &DatabaseUrl) -> Result<Self, String> {
        let DatabaseUrl::Sqlite(url) = url else {
            return Ok(Self(None));
        };
        if url.contains(":memory:") || url.contains("mode=memory") {
            return Ok(Self(None));
        }
        let path = url
            .trim_start_matches("sqlite:")
            .trim_start_matches("//")
            .split('?')
            .next()
            .unwrap_or_default();
        let lock_path = format!("{path}.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|e| format!("could not open {lock_path}: {e}"))?;
        match file.try_lock() {
            Ok(()) => Ok(Self(Some(file))),
            Err(_) => Err(format!(
                "another nomey-sse instance already uses the SQLite file {path}; SQLite serves one \
                 instance: to run several, give them one Postgres database (DATABASE_URL=postgres://…)"
            )),
        }
    }
}

/// sqlx opens an SQLite file read-write but does not create it; we do.
fn sqlite_url(url: &str) -> String {
    if url.contains(":memory:") || url.contains("mode=") {
        url.to_owned()
    } else if url.contains('?') {
        format!("{url}&mode=rwc")
    } else {
        format!("{url}?mode=rwc")
    }
}

/// The URL this service connects to Postgres with (see `plain_on_loopback`).
pub(crate) fn postgres_url(url: &str) -> String {
    plain_on_loopback(url, std::env::var_os("PGSSLMODE").is_some())
}

/// A Postgres on this host (`localhost`, a loopback address or a socket directory) is
/// reached without TLS unless the URL or `PGSSLMODE` asks for a mode: over loopback TLS
/// protects nothing, and it cost Postgres 12% more CPU per published event. Elsewhere
/// sqlx's default stays (`prefer`: TLS when the server offers it). A URL with a fragment
/// is left as written.
fn plain_on_loopback(url: &str, mode_from_env: bool) -> String {
    let query = url.split_once('?').map_or("", |(_, query)| query);
    let asked = mode_from_env
        || url.contains('#')
        || query.split('&').any(|pair| {
            let key = pair.split_once('=').map_or(pair, |(key, _)| key);
            let key = percent_encoding::percent_decode_str(key).decode_utf8_lossy();
            key.eq_ignore_ascii_case("sslmode") || key.eq_ignore_ascii_case("ssl-mode")
        });
    if asked {
        return url.to_owned();
    }
    let local = sqlx::postgres::PgConnectOptions::from_str(url).is_ok_and(|options| {
        let host = options
            .get_host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        options.get_socket().is_some()
            || host.starts_with('/')
            || host.eq_ignore_ascii_case("localhost")
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    });
    match (local, url.contains('?')) {
        (true, true) => format!("{url}&sslmode=disable"),
        (true, false) => format!("{url}?sslmode=disable"),
        (false, _) => url.to_owned(),
    }
}

/// `($1, $2), ($3, $4), …` for a multi-row statement, starting after `offset` parameters.
fn values_list(rows: usize, columns: usize, offset: usize) -> String {
    let mut sql = String::with_capacity(rows * columns * 5);
    for row in 0..rows {
        sql.push_str(if row == 0 { "(" } else { ", (" });
        for col in 0..columns {
            if col > 0 {
                sql.push_str(", ");
            }
            sql.push('$');
            sql.push_str(&(offset + row * columns + col + 1).to_string());
        }
        sql.push(')');
    }
    sql
}

/// Whether a statement built for `rows` rows of `columns` values should stay prepared in
/// the connection's cache. Each row count is a different statement, and one of hundreds
/// of rows holds tens of KB on SQLite: caching every size kept tens of MB that churn
/// never gave back. Group commit's usual batches stay under the bound, so publishing
/// does not pay a prepare per batch.
fn cacheable(rows: usize, columns: usize) -> bool {
    rows * columns <= 512
}

/// Rows per multi-row statement, well under both backends' parameter limits.
const CHUNK_PARAMS: usize = 8000;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_lists_number_their_placeholders() {
        assert_eq!(values_list(2, 2, 0), "($1, $2), ($3, $4)");
        assert_eq!(values_list(1, 3, 1), "($2, $3, $4)");
    }

    #[test]
    fn a_local_postgres_is_reached_without_tls_unless_a_mode_is_asked_for() {
        for (url, expected) in [
            (
                "postgres://u@127.0.0.1:5432/db",
                "postgres://u@127.0.0.1:5432/db?sslmode=disable",
            ),
            (
                "postgres://u@localhost/db?application_name=a",
                "postgres://u@localhost/db?application_name=a&sslmode=disable",
            ),
            (
                "postgres://u@[::1]:5432/db",
                "postgres://u@[::1]:5432/db?sslmode=disable",
            ),
            (
                "postgres://u@127.0.0.1/db?sslmode=require",
                "postgres://u@127.0.0.1/db?sslmode=require",
            ),
            (
                "postgres://u@db.example.com/db",
                "postgres://u@db.example.com/db",
            ),
            ("postgres://u@10.0.0.5/db", "postgres://u@10.0.0.5/db"),
            (
                "postgres://u@127.0.0.1/db?ssl%6Dode=require",
                "postgres://u@127.0.0.1/db?ssl%6Dode=require",
            ),
            (
                "postgres://u@127.0.0.1/db?SSLMODE=require",
                "postgres://u@127.0.0.1/db?SSLMODE=require",
            ),
            (
                "postgres://u@%2Fvar%2Frun%2Fpostgresql/db",
                "postgres://u@%2Fvar%2Frun%2Fpostgresql/db?sslmode=disable",
            ),
        ] {
            assert_eq!(plain_on_loopback(url, false), expected, "{url}");
        }
        let url = "postgres://u@127.0.0.1/db";
        assert_eq!(plain_on_loopback(url, true), url, "PGSSLMODE is set");
    }

    #[test]
    fn sqlite_files_are_created_if_missing() {
        assert_eq!(sqlite_url("sqlite://a.db"), "sqlite://a.db?mode=rwc");
        assert_eq!(sqlite_url("sqlite::memory:"), "sqlite::memory:");
        assert_eq!(sqlite_url("sqlite://a.db?mode=ro"), "sqlite://a.db?mode=ro");
    }
}
