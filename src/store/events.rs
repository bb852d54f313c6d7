//! The event log and pending notifications.

use sqlx::{Row, any::AnyRow};

use super::{CHUNK_PARAMS, Store, cacheable, values_list};

/// An event to append.
#[derive(Clone, Debug)]
pub struct NewEvent {
    pub kind: String,
    /// Serialized JSON.
    pub data: String,
    /// Serialized `Filter`, `None` for a broadcast.
    pub filter: Option<String>,
    /// The key replay finds the event under (`Filter::audience`).
    pub audience: String,
    /// The users the event names who have no open stream on this instance. Each gets a
    /// pending row, which the instance that hands the event to a stream of theirs settles.
    /// (Deciding "no stream anywhere" from other instances' saved sessions would race with
    /// streams that just closed there.) The users with a stream here get no row unless
    /// that stream is not handed the event after all (`add_pending`): most targeted
    /// events then write one row, not three, and delete none. The answer's `pending` says
    /// whether any of these users has no stream on another live instance either.
    pub absent_here: Vec<String>,
    pub created_at: i64,
}

/// An event read back from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StoredEvent {
    pub event_id: i64,
    pub kind: String,
    pub data: String,
    pub filter: Option<String>,
    pub created_at: i64,
}

impl StoredEvent {
    fn from_row(row: &AnyRow) -> Result<Self, sqlx::Error> {
        Ok(Self {
            event_id: row.try_get("event_id")?,
            kind: row.try_get("kind")?,
            data: row.try_get("data")?,
            filter: row.try_get("filter")?,
            created_at: row.try_get("created_at")?,
        })
    }
}

/// What an append wrote: the first id (the batch's ids are consecutive) and, per event,
/// whether a user it names had no open stream on any live instance.
#[derive(Debug)]
pub struct Appended {
    pub first_id: i64,
    pub pending: Vec<bool>,
}

/// The publisher's own connection, kept from one batch to the next: a connection handed
/// back to the pool costs sqlx a ping, a round trip, each time.
#[derive(Debug, Default)]
pub struct Writer(Option<sqlx::pool::PoolConnection<sqlx::Any>>);

/// The Postgres channel on which every committed batch is announced, with the payload
/// `<first id>:<last id>`, so that every instance hands those events to its streams.
pub const ANNOUNCE_CHANNEL: &str = "nomey_sse_events";

const EVENT_COLUMNS: &str = "event_id, kind, data, filter, created_at";

impl Store {
    /// Appends a batch of events in one transaction (group commit) and returns their ids.
    ///
    /// The ids come from `event_counter` inside the transaction, whose row lock is held
    /// until commit, so batches commit in id order and readers never see a later id before
    /// an earlier one.
    pub async fn append(
        &self,
        batch: &[NewEvent],
        instance_id: &str,
        alive_since: i64,
    ) -> Result<Appended, sqlx::Error> {
        self.append_on(&mut Writer::default(), batch, instance_id, alive_since)
            .await
    }

    /// `append` on the writer's connection, which it keeps for the next batch (Postgres
    /// only: on SQLite the pool's few connections are shared). After an error the
    /// connection goes back to the pool, which drops it if it is broken.
    pub async fn append_on(
        &self,
        writer: &mut Writer,
        batch: &[NewEvent],
        instance_id: &str,
        alive_since: i64,
    ) -> Result<Appended, sqlx::Error> {
        if self.backend != super::Backend::Postgres {
            let mut conn = self.pool.acquire().await?;
            return self
                .append_in_transaction(&mut conn, batch, instance_id, alive_since)
                .await;
        }
        let conn = match &mut writer.0 {
            Some(conn) => conn,
            None => writer.0.insert(self.pool.acquire().await?),
        };
        let pending_rows: usize = batch.iter().map(|e| e.absent_here.len()).sum();
        // Large batches keep the transaction: a statement of that many values is not
        // cached, and planning it anew costs more than the round trips it saves.
        let appended = if cacheable(batch.len() * 5 + pending_rows, 1) {
            append_in_one_statement(conn, batch, instance_id, alive_since).await
        } else {
            self.append_in_transaction(conn, batch, instance_id, alive_since)
                .await
        };
        if appended.is_err() {
            writer.0 = None;
        }
        appended
    }

    async fn append_in_transaction(
        &self,
        conn: &mut sqlx::AnyConnection,
        batch: &[NewEvent],
        instance_id: &str,
        alive_since: i64,
    ) -> Result<Appended, sqlx::Error> {
        let mut tx = sqlx::Connection::begin_with(conn, self.backend.begin_write()).await?;
        let last: i64 = sqlx::query_scalar(
            "update event_counter set last_event_id = last_event_id + $1 returning last_event_id",
        )
        .bind(batch.len() as i64)
        .fetch_one(&mut *tx)
        .await?;
        let first_id = last - batch.len() as i64 + 1;

        let elsewhere = users_elsewhere(&mut tx, batch, instance_id, alive_since).await?;
        let pending = pending_flags(batch, &elsewhere);

        let mut done = 0;
        while done < batch.len() {
            let (rows, prepared) = insert_chunk(batch.len() - done, self.backend);
            let chunk = &batch[done..done + rows];
            let sql = format!(
                "insert into event ({EVENT_COLUMNS}, audience) values {}",
                values_list(rows, 6, 0)
            );
            let mut query = sqlx::query(&sql).persistent(prepared);
            for (i, event) in chunk.iter().enumerate() {
                let id = first_id + (done + i) as i64;
                query = query
                    .bind(id)
                    .bind(&event.kind)
                    .bind(&event.data)
                    .bind(event.filter.as_deref())
                    .bind(event.created_at)
                    .bind(&event.audience);
            }
            query.execute(&mut *tx).await?;
            done += rows;
        }

        let rows: Vec<(&str, i64)> = batch
            .iter()
            .enumerate()
            .flat_map(|(i, e)| {
                e.absent_here
                    .iter()
                    .map(move |u| (u.as_str(), first_id + i as i64))
            })
            .collect();
        insert_pending(&mut tx, &rows).await?;
        if self.backend == super::Backend::Postgres {
            // Sent at commit, once per batch: commits that notify are serialized.
            sqlx::query("select pg_notify($1, $2)")
                .bind(ANNOUNCE_CHANNEL)
                .bind(format!("{first_id}:{last}"))
                .execute(&mut *tx)
                .await?;
        }
        tx.commit().await?;
        Ok(Appended { first_id, pending })
    }

    /// Stores pending rows for users who had a stream here when their event was
    /// published but whose stream was not handed it (it closed, or its metadata did not
    /// match the filter).
    pub async fn add_pending(&self, rows: &[(&str, i64)]) -> Result<(), sqlx::Error> {
        let mut tx = self.begin_write().await?;
        insert_pending(&mut tx, rows).await?;
        tx.commit().await
    }

    /// Events with `after < id <= up_to`, oldest first, at most `limit`.
    pub async fn events_between(
        &self,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let sql = format!(
            "select {EVENT_COLUMNS} from event where event_id > $1 and event_id <= $2 order by event_id limit $3"
        );
        let rows = sqlx::query(&sql)
            .bind(after)
            .bind(up_to)
            .bind(limit)
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(StoredEvent::from_row).collect()
    }

    /// Events filed under one of `audiences` with `after < id <= up_to`, oldest first, at
    /// most `limit`: a replay's candidates, read through the audience index.
    pub async fn events_for(
        &self,
        audiences: &[String],
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let sql = format!(
            "select {EVENT_COLUMNS} from event where audience in ({}) and event_id > $1 and event_id <= $2 \
             order by event_id limit $3",
            placeholders(audiences.len(), 3)
        );
        let mut query = sqlx::query(&sql).bind(after).bind(up_to).bind(limit);
        for audience in audiences {
            query = query.bind(audience);
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(StoredEvent::from_row).collect()
    }

    /// How many events are filed under one of `audiences` with `after < id <= up_to`.
    pub async fn count_for(
        &self,
        audiences: &[String],
        after: i64,
        up_to: i64,
    ) -> Result<i64, sqlx::Error> {
        let sql = format!(
            "select count(*) from event where audience in ({}) and event_id > $1 and event_id <= $2",
            placeholders(audiences.len(), 2)
        );
        let mut query = sqlx::query_scalar(&sql).bind(after).bind(up_to);
        for audience in audiences {
            query = query.bind(audience);
        }
        query.fetch_one(&self.pool).await
    }

    /// The ids and filters of events filed under one of `audiences` with
    /// `after < id < before`, newest first, at most `limit`: how a bounded replay finds
    /// where to start without reading the events' data.
    pub async fn filters_for_desc(
        &self,
        audiences: &[String],
        after: i64,
        before: i64,
        limit: i64,
    ) -> Result<Vec<(i64, Option<String>)>, sqlx::Error> {
        let sql = format!(
            "select event_id, filter from event where audience in ({}) and event_id > $1 and event_id < $2 \
             order by event_id desc limit $3",
            placeholders(audiences.len(), 3)
        );
        let mut query = sqlx::query_as(&sql).bind(after).bind(before).bind(limit);
        for audience in audiences {
            query = query.bind(audience);
        }
        query.fetch_all(&self.pool).await
    }

    /// A user's pending events with `after < id <= up_to`, oldest first, at most `limit`.
    pub async fn pending_between(
        &self,
        user_id: &str,
        after: i64,
        up_to: i64,
        limit: i64,
    ) -> Result<Vec<StoredEvent>, sqlx::Error> {
        let rows = sqlx::query(
            "select e.event_id, e.kind, e.data, e.filter, e.created_at \
             from pending p join event e on e.event_id = p.event_id \
             where p.user_id = $1 and p.event_id > $2 and p.event_id <= $3 order by p.event_id limit $4",
        )
        .bind(user_id)
        .bind(after)
        .bind(up_to)
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(StoredEvent::from_row).collect()
    }

    /// The last id handed out, and the id through which retention has deleted events.
    pub async fn event_horizon(&self) -> Result<(i64, i64), sqlx::Error> {
        sqlx::query_as("select last_event_id, retained_through from event_counter")
            .fetch_one(&self.pool)
            .await
    }

    /// Deletes events (and their pending rows) created before `cutoff`, and sessions that
    /// closed before it. Returns the number of events deleted.
    pub async fn prune(&self, cutoff: i64) -> Result<u64, sqlx::Error> {
        let mut tx = self.begin_write().await?;
        let through: Option<i64> =
            sqlx::query_scalar("select max(event_id) from event where created_at < $1")
                .bind(cutoff)
                .fetch_one(&mut *tx)
                .await?;
        let mut deleted = 0;
        if let Some(through) = through {
            sqlx::query("delete from pending where event_id <= $1")
                .bind(through)
                .execute(&mut *tx)
                .await?;
            deleted = sqlx::query("delete from event where event_id <= $1")
                .bind(through)
                .execute(&mut *tx)
                .await?
                .rows_affected();
            sqlx::query(
                "update event_counter set retained_through = $1 where retained_through < $1",
            )
            .bind(through)
            .execute(&mut *tx)
            .await?;
        }
        sqlx::query("delete from client_session where disconnected_at < $1")
            .bind(cutoff)
            .execute(&mut *tx)
            .await?;
        tx.commit().await?;
        Ok(deleted)
    }

    /// How many pending rows wait for delivery.
    pub async fn pending_count(&self) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("select count(*) from pending")
            .fetch_one(&self.pool)
            .await
    }
}

/// The rows of the next insert of a long batch with `left` rows to go, and whether its
/// statement stays prepared. On Postgres every size above the cache's bound is the full
/// chunk or a power of two, so all of them stay prepared: a handful of statements, where
/// parsing and planning one of thousands of parameters anew had taken a millisecond per
/// insert (batches of 1,000 events went from about 68,000 to 87,000 a second). SQLite
/// takes the rest at once, and keeps only small statements.
fn insert_chunk(left: usize, backend: super::Backend) -> (usize, bool) {
    let full = CHUNK_PARAMS / 6;
    let postgres = backend == super::Backend::Postgres;
    let rows = if left >= full || !postgres || cacheable(left, 6) {
        left.min(full)
    } else {
        1 << left.ilog2()
    };
    (rows, postgres || cacheable(rows, 6))
}

/// `append` on Postgres as one statement in its own transaction: the counter, the
/// events, their pending rows and the announcement in one round trip instead of six.
/// The counter's row lock is still held until the commit, so ids commit in order.
async fn append_in_one_statement(
    conn: &mut sqlx::AnyConnection,
    batch: &[NewEvent],
    instance_id: &str,
    alive_since: i64,
) -> Result<Appended, sqlx::Error> {
    let elsewhere = users_elsewhere(conn, batch, instance_id, alive_since).await?;
    let count = batch.len();
    let mut sql = format!(
        "with c as (update event_counter set last_event_id = last_event_id + {count} \
         returning last_event_id - {count} + 1 as first_id), \
         e as (insert into event ({EVENT_COLUMNS}, audience) \
         select c.first_id + v.n, v.kind, v.data, v.filter, v.created_at, v.audience from c, (values "
    );
    let mut param = 0;
    let mut next = || {
        param += 1;
        param
    };
    for (n, _) in batch.iter().enumerate() {
        let sep = if n == 0 { "" } else { ", " };
        sql.push_str(&format!(
            "{sep}({n}::int8, ${}, ${}, ${}, ${}::int8, ${})",
            next(),
            next(),
            next(),
            next(),
            next()
        ));
    }
    sql.push_str(") as v(n, kind, data, filter, created_at, audience))");
    let rows: Vec<(&str, usize)> = batch
        .iter()
        .enumerate()
        .flat_map(|(n, e)| e.absent_here.iter().map(move |u| (u.as_str(), n)))
        .collect();
    if !rows.is_empty() {
        sql.push_str(
            ", p as (insert into pending (user_id, event_id) \
             select v.user_id, c.first_id + v.n from c, (values ",
        );
        for (i, (_, n)) in rows.iter().enumerate() {
            let sep = if i == 0 { "" } else { ", " };
            sql.push_str(&format!("{sep}(${}, {n}::int8)", next()));
        }
        sql.push_str(") as v(user_id, n))");
    }
    // A select in a `with` runs only if used: the final select uses it.
    sql.push_str(&format!(
        ", x as (select pg_notify('{ANNOUNCE_CHANNEL}', \
         c.first_id::text || ':' || (c.first_id + {last})::text) from c) \
         select c.first_id from c, x",
        last = count - 1
    ));
    let mut query =
        sqlx::query_scalar::<_, i64>(&sql).persistent(cacheable(count * 5 + rows.len(), 1));
    for event in batch {
        query = query
            .bind(&event.kind)
            .bind(&event.data)
            .bind(event.filter.as_deref())
            .bind(event.created_at)
            .bind(&event.audience);
    }
    for (user, _) in &rows {
        query = query.bind(*user);
    }
    let first_id = query.fetch_one(&mut *conn).await?;
    Ok(Appended {
        first_id,
        pending: pending_flags(batch, &elsewhere),
    })
}

async fn insert_pending(
    conn: &mut sqlx::AnyConnection,
    rows: &[(&str, i64)],
) -> Result<(), sqlx::Error> {
    for chunk in rows.chunks(CHUNK_PARAMS / 2) {
        let sql = format!(
            "insert into pending (user_id, event_id) values {} on conflict do nothing",
            values_list(chunk.len(), 2, 0)
        );
        let mut query = sqlx::query(&sql).persistent(cacheable(chunk.len(), 2));
        for (user, id) in chunk {
            query = query.bind(*user).bind(*id);
        }
        query.execute(&mut *conn).await?;
    }
    Ok(())
}

/// `$n, $n+1, …` for `count` values after `offset` parameters.
fn placeholders(count: usize, offset: usize) -> String {
    (1..=count)
        .map(|n| format!("${}", offset + n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Of the users some event names and who have no stream here, those with an open session
/// on another live instance. It only shapes the answer: every user in `absent_here` gets
/// a pending row either way.
async fn users_elsewhere(
    conn: &mut sqlx::AnyConnection,
    batch: &[NewEvent],
    instance_id: &str,
    alive_since: i64,
) -> Result<std::collections::HashSet<String>, sqlx::Error> {
    let mut candidates: Vec<&str> = batch
        .iter()
        .flat_map(|e| e.absent_here.iter().map(String::as_str))
        .collect();
    candidates.sort_unstable();
    candidates.dedup();
    let mut elsewhere = std::collections::HashSet::new();
    for chunk in candidates.chunks(CHUNK_PARAMS) {
        let sql = format!(
            "select distinct s.user_id from client_session s join instance i on i.instance_id = s.instance_id \
             where s.disconnected_at is null and s.instance_id <> $1 and i.heartbeat_at > $2 \
             and s.user_id in ({})",
            (0..chunk.len())
                .map(|n| format!("${}", n + 3))
                .collect::<Vec<_>>()
                .join(", ")
        );
        let mut query = sqlx::query_scalar::<_, String>(&sql)
            .persistent(cacheable(chunk.len(), 1))
            .bind(instance_id)
            .bind(alive_since);
        for user in chunk {
            query = query.bind(*user);
        }
        elsewhere.extend(query.fetch_all(&mut *conn).await?);
    }
    Ok(elsewhere)
}

/// Per event, whether a user it names has no open stream on any live instance.
fn pending_flags(batch: &[NewEvent], elsewhere: &std::collections::HashSet<String>) -> Vec<bool> {
    batch
        .iter()
        .map(|e| e.absent_here.iter().any(|u| !elsewhere.contains(u)))
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::{super::Backend, *};

    #[test]
    fn long_inserts_on_postgres_take_a_handful_of_statement_sizes() {
        let mut large = BTreeSet::new();
        for total in 1..5000 {
            let mut left = total;
            while left > 0 {
                let (rows, prepared) = insert_chunk(left, Backend::Postgres);
                assert!(rows > 0 && rows <= left, "{rows} of {left}");
                if !cacheable(rows, 6) {
                    assert!(prepared, "{rows} rows");
                    large.insert(rows);
                }
                left -= rows;
            }
        }
        assert_eq!(Vec::from_iter(large), [128, 256, 512, 1024, 1333]);
        // SQLite takes the rest at once, and keeps only small statements.
        assert_eq!(insert_chunk(700, Backend::Sqlite), (700, false));
        assert_eq!(insert_chunk(5000, Backend::Sqlite), (1333, false));
    }
}
