//! Sessions, instances and the running totals.

use sqlx::{AnyConnection, Row, any::AnyRow};

use super::{CHUNK_PARAMS, Store, cacheable, values_list};

/// A stream's session as it is saved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SessionRecord {
    pub client_id: String,
    pub instance_id: String,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    /// JSON object of string values.
    pub metadata: String,
    pub connected_at: i64,
    pub disconnected_at: Option<i64>,
    pub last_event_at: Option<i64>,
    pub events_sent: i64,
}

impl SessionRecord {
    /// How long a closed session lasted, in ms.
    pub fn duration_ms(&self) -> i64 {
        self.disconnected_at
            .map_or(0, |end| end - self.connected_at)
    }
}

/// What one flush saves besides sessions: counts since the last flush, sessions that
/// ended, and settled pending events.
#[derive(Debug, Default)]
pub struct Tallies {
    pub events_sent: u64,
    pub last_event_at: Option<i64>,
    pub connections: u64,
    pub closed: Vec<SessionRecord>,
    /// Sessions that ended but whose rows could not be kept in memory (a long outage):
    /// only their number and summed length are saved.
    pub closed_unrecorded: u64,
    pub closed_unrecorded_ms: i64,
    /// (user, event id) pairs whose pending row can go.
    pub settled: Vec<(String, i64)>,
}

impl Tallies {
    pub fn is_empty(&self) -> bool {
        self.events_sent == 0
            && self.connections == 0
            && self.closed.is_empty()
            && self.closed_unrecorded == 0
            && self.settled.is_empty()
    }

    /// Sessions that ended, recorded or not.
    pub fn closed_count(&self) -> i64 {
        (self.closed.len() as u64 + self.closed_unrecorded) as i64
    }

    /// Summed durations of the ended sessions, in ms.
    pub fn closed_duration_ms(&self) -> i64 {
        self.closed
            .iter()
            .map(SessionRecord::duration_ms)
            .sum::<i64>()
            + self.closed_unrecorded_ms
    }
}

/// The saved totals behind `/api/sse/stats`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Totals {
    pub events_sent: i64,
    pub connections: i64,
    pub closed_connections: i64,
    pub closed_duration_ms: i64,
    pub last_event_at: Option<i64>,
}

const SESSION_COLUMNS: &str = "client_id, instance_id, user_id, session_id, metadata, connected_at, \
                               disconnected_at, last_event_at, events_sent";

/// Session rows per statement.
const SESSION_BATCH: usize = 500;

async fn upsert_sessions(
    conn: &mut AnyConnection,
    rows: impl ExactSizeIterator<Item = &SessionRecord>,
) -> Result<(), sqlx::Error> {
    let sql = format!(
        "insert into client_session ({SESSION_COLUMNS}) values {} on conflict (client_id) do update set \
         disconnected_at = coalesce(client_session.disconnected_at, excluded.disconnected_at), last_event_at = excluded.last_event_at, \
         events_sent = excluded.events_sent",
        values_list(rows.len(), 9, 0)
    );
    let mut query = sqlx::query(&sql).persistent(cacheable(rows.len(), 9));
    for s in rows {
        query = query
            .bind(&s.client_id)
            .bind(&s.instance_id)
            .bind(s.user_id.as_deref())
            .bind(s.session_id.as_deref())
            .bind(&s.metadata)
            .bind(s.connected_at)
            .bind(s.disconnected_at)
            .bind(s.last_event_at)
            .bind(s.events_sent);
    }
    query.execute(conn).await?;
    Ok(())
}

fn session_from_row(row: &AnyRow) -> Result<SessionRecord, sqlx::Error> {
    Ok(SessionRecord {
        client_id: row.try_get("client_id")?,
        instance_id: row.try_get("instance_id")?,
        user_id: row.try_get("user_id")?,
        session_id: row.try_get("session_id")?,
        metadata: row.try_get("metadata")?,
        connected_at: row.try_get("connected_at")?,
        disconnected_at: row.try_get("disconnected_at")?,
        last_event_at: row.try_get("last_event_at")?,
        events_sent: row.try_get("events_sent")?,
    })
}

impl Store {
    /// Saves open sessions, a few hundred rows per statement: on SQLite every write holds
    /// the one write lock, and publishes must not wait behind thousands of rows.
    pub async fn save_sessions(&self, sessions: &[SessionRecord]) -> Result<(), sqlx::Error> {
        let mut conn = self.pool.acquire().await?;
        for chunk in sessions.chunks(SESSION_BATCH) {
            upsert_sessions(&mut conn, chunk.iter()).await?;
        }
        Ok(())
    }

    /// Writes an instance's heartbeat. Returns `true` when its row had to be created: at
    /// its first heartbeat, or after other instances declared it dead (a freeze longer
    /// than `CLIENT_TIMEOUT_MS`) and closed its sessions.
    pub async fn heartbeat(
        &self,
        instance_id: &str,
        started_at: i64,
        now: i64,
    ) -> Result<bool, sqlx::Error> {
        let updated = sqlx::query("update instance set heartbeat_at = $2 where instance_id = $1")
            .bind(instance_id)
            .bind(now)
            .execute(&self.pool)
            .await?
            .rows_affected();
        if updated > 0 {
            return Ok(false);
        }
        sqlx::query(
            "insert into instance (instance_id, started_at, heartbeat_at) values ($1, $2, $3) \
             on conflict (instance_id) do update set heartbeat_at = excluded.heartbeat_at",
        )
        .bind(instance_id)
        .bind(started_at)
        .bind(now)
        .execute(&self.pool)
        .await?;
        Ok(true)
    }

    /// Saves one instance's closed sessions and tallies in one transaction.
    pub async fn flush(&self, tallies: &Tallies) -> Result<(), sqlx::Error> {
        let mut tx = self.begin_write().await?;
        for chunk in tallies.closed.chunks(SESSION_BATCH) {
            upsert_sessions(&mut tx, chunk.iter()).await?;
        }

        if !tallies.is_empty() || tallies.last_event_at.is_some() {
            sqlx::query(
                "update stat set total_events_sent = total_events_sent + $1, \
                 total_connections = total_connections + $2, closed_connections = closed_connections + $3, \
                 closed_duration_ms = closed_duration_ms + $4, \
                 last_event_at = case when $5 > coalesce(last_event_at, 0) then $5 else last_event_at end",
            )
            .bind(tallies.events_sent as i64)
            .bind(tallies.connections as i64)
            .bind(tallies.closed_count())
            .bind(tallies.closed_duration_ms())
            .bind(tallies.last_event_at.unwrap_or(0))
            .execute(&mut *tx)
            .await?;
        }

        for chunk in tallies.settled.chunks(CHUNK_PARAMS / 2) {
            let sql = format!(
                "delete from pending where (user_id, event_id) in (values {})",
                values_list(chunk.len(), 2, 0)
            );
            let mut query = sqlx::query(&sql).persistent(cacheable(chunk.len(), 2));
            for (user, id) in chunk {
                query = query.bind(user).bind(*id);
            }
            query.execute(&mut *tx).await?;
        }
        tx.commit().await
    }

    /// Closes the sessions of instances that stopped heart-beating before `alive_since`
    /// (a crash, a hard kill) and forgets those instances.
    pub async fn reap_instances(
        &self,
        instance_id: &str,
        alive_since: i64,
    ) -> Result<u64, sqlx::Error> {
        // A dead instance's sessions end at its last heartbeat (or, with no instance row
        // left, at their last event). They count in the closed-session totals, so that
        // the average connection length does not forget crashes.
        const END: &str = "coalesce((select i.heartbeat_at from instance i \
                           where i.instance_id = client_session.instance_id), \
                           coalesce(last_event_at, connected_at))";
        // Never this instance itself: after an outage its own row may be stale too.
        const ORPHANED: &str = "disconnected_at is null and instance_id <> $2 and instance_id not in \
                                (select instance_id from instance where heartbeat_at > $1)";
        let mut tx = self.begin_write().await?;
        if self.backend == super::Backend::Postgres {
            // Lock the dead rows first: a heartbeat racing with this waits, then finds its
            // row gone and knows it was declared dead, rather than living on with its
            // sessions closed.
            sqlx::query(
                "select instance_id from instance where heartbeat_at <= $1 and instance_id <> $2 for update",
            )
            .bind(alive_since)
            .bind(instance_id)
            .fetch_all(&mut *tx)
                .await?;
        }
        let (closed, duration_ms): (i64, i64) = sqlx::query_as(&format!(
            "select count(*), cast(coalesce(sum({END} - connected_at), 0) as bigint) \
             from client_session where {ORPHANED}"
        ))
        .bind(alive_since)
        .bind(instance_id)
        .fetch_one(&mut *tx)
        .await?;
        if closed > 0 {
            sqlx::query(
                "update stat set closed_connections = closed_connections + $1, \
                 closed_duration_ms = closed_duration_ms + $2",
            )
            .bind(closed)
            .bind(duration_ms)
            .execute(&mut *tx)
            .await?;
            sqlx::query(&format!(
                "update client_session set disconnected_at = {END} where {ORPHANED}"
            ))
            .bind(alive_since)
            .bind(instance_id)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("delete from instance where heartbeat_at <= $1 and instance_id <> $2")
            .bind(alive_since)
            .bind(instance_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(closed as u64)
    }

    /// Forgets an instance that stopped cleanly, after its last flush.
    pub async fn remove_instance(&self, instance_id: &str, now: i64) -> Result<(), sqlx::Error> {
        let mut tx = self.begin_write().await?;
        sqlx::query("update client_session set disconnected_at = $2 where instance_id = $1 and disconnected_at is null")
            .bind(instance_id)
            .bind(now)
            .execute(&mut *tx)
            .await?;
        sqlx::query("delete from instance where instance_id = $1")
            .bind(instance_id)
            .execute(&mut *tx)
            .await?;
        tx.commit().await
    }

    /// Closes this instance's open session rows whose streams are no longer open (`open`
    /// holds the client ids that are): after a long outage the in-memory record of some
    /// ended sessions may have been dropped. Returns how many rows were closed.
    pub async fn close_sessions_except(
        &self,
        instance_id: &str,
        open: &std::collections::HashSet<String>,
        now: i64,
    ) -> Result<u64, sqlx::Error> {
        let saved_open: Vec<String> = sqlx::query_scalar(
            "select client_id from client_session where instance_id = $1 and disconnected_at is null",
        )
        .bind(instance_id)
        .fetch_all(&self.pool)
        .await?;
        let gone: Vec<&String> = saved_open.iter().filter(|id| !open.contains(*id)).collect();
        let mut closed = 0;
        for chunk in gone.chunks(CHUNK_PARAMS) {
            let sql = format!(
                "update client_session set disconnected_at = $1 where disconnected_at is null and client_id in ({})",
                (0..chunk.len())
                    .map(|n| format!("${}", n + 2))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
            let mut query = sqlx::query(&sql).persistent(false).bind(now);
            for id in chunk {
                query = query.bind(*id);
            }
            closed += query.execute(&self.pool).await?.rows_affected();
        }
        Ok(closed)
    }

    /// Open sessions of live instances other than `instance_id`.
    pub async fn remote_sessions(
        &self,
        instance_id: &str,
        alive_since: i64,
    ) -> Result<Vec<SessionRecord>, sqlx::Error> {
        let sql = format!(
            "select {} from client_session s join instance i on i.instance_id = s.instance_id \
             where s.disconnected_at is null and s.instance_id <> $1 and i.heartbeat_at > $2 \
             order by s.connected_at",
            SESSION_COLUMNS
                .split(", ")
                .map(|c| format!("s.{}", c.trim()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let rows = sqlx::query(&sql)
            .bind(instance_id)
            .bind(alive_since)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(session_from_row).collect()
    }

    /// Instances other than `instance_id` that heart-beat after `alive_since`.
    pub async fn other_instances(
        &self,
        instance_id: &str,
        alive_since: i64,
    ) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar(
            "select count(*) from instance where instance_id <> $1 and heartbeat_at > $2",
        )
        .bind(instance_id)
        .bind(alive_since)
        .fetch_one(&self.pool)
        .await
    }

    pub async fn totals(&self) -> Result<Totals, sqlx::Error> {
        let row = sqlx::query(
            "select total_events_sent, total_connections, closed_connections, closed_duration_ms, last_event_at \
             from stat",
        )
        .fetch_one(&self.pool)
        .await?;
        Ok(Totals {
            events_sent: row.try_get(0)?,
            connections: row.try_get(1)?,
            closed_connections: row.try_get(2)?,
            closed_duration_ms: row.try_get(3)?,
            last_event_at: row.try_get(4)?,
        })
    }

    /// A session as saved, for tests and tools.
    pub async fn session(&self, client_id: &str) -> Result<Option<SessionRecord>, sqlx::Error> {
        let sql = format!("select {SESSION_COLUMNS} from client_session where client_id = $1");
        let row = sqlx::query(&sql)
            .bind(client_id)
            .fetch_optional(&self.pool)
            .await?;
        row.as_ref().map(session_from_row).transpose()
    }
}
