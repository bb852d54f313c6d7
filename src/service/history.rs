//! What a stream catches up on before live events: the replay after its `Last-Event-ID`,
//! or, for a stream that starts fresh, its user's pending notifications.
//!
//! Both stop at the hub's cursor as it was when the stream registered: every later event
//! reaches the stream's queue, so the history and the queue meet with no gap and no
//! overlap, in id order. Replay reads through the audience index (only rows the client
//! could match, plus the shared 'several users or metadata only' key) and sends at most
//! `MAX_REPLAY_EVENTS`, the most recent.

use std::{collections::VecDeque, sync::Arc, sync::atomic::Ordering::Relaxed};

use futures_util::stream;

use super::{
    EventService,
    error::{Doing, StoreError},
    stream::{HistoryStream, Replayed},
};
use crate::{event, hub::Client, store::StoredEvent};

/// Events read per query. Also a denial-of-service guard: a stream never holds more.
const PAGE: i64 = 500;
/// Ids and filters read per query while looking for where a bounded replay starts.
const SCAN_PAGE: i64 = 2000;

/// The stream's history, with the first page already read (so a database failure is
/// reported before the response starts), and whether the client may have missed events
/// (retention deleted some, or more than `MAX_REPLAY_EVENTS` were due).
pub(super) async fn open(
    service: &EventService,
    client: Arc<Client>,
    last_event_id: Option<i64>,
    cursor: i64,
) -> Result<(Option<HistoryStream>, bool), StoreError> {
    let store = service.store();
    let (source, mut after, mut history_gap) = match last_event_id {
        Some(last_seen) => {
            let (_, retained_through) = store
                .event_horizon()
                .await
                .doing("read the event log's horizon")?;
            let audiences = client.info.audiences();
            (
                Source::Log(audiences),
                last_seen,
                last_seen < retained_through,
            )
        }
        None => match client.info.user_id.clone() {
            Some(user) => (Source::Pending(user), 0, false),
            None => return Ok((None, false)),
        },
    };
    if after >= cursor {
        return Ok((None, history_gap));
    }
    if let Source::Log(audiences) = &source
        && let Some(start) = bounded_start(service, &client, audiences, after, cursor).await?
    {
        after = start;
        history_gap = true;
    }
    let mut pager = Pager {
        service: service.clone(),
        source,
        client,
        after,
        up_to: cursor,
        buffer: VecDeque::new(),
        done: false,
    };
    pager.fill().await?;
    if pager.done && pager.buffer.is_empty() {
        return Ok((None, history_gap));
    }
    let history = stream::unfold(pager, |mut pager| async move {
        loop {
            if let Some(replayed) = pager.buffer.pop_front() {
                return Some((Ok(replayed), pager));
            }
            if pager.done {
                return None;
            }
            if let Err(error) = pager.fill().await {
                tracing::warn!(%error, "ending the stream so that the client resumes");
                pager.done = true;
                return Some((Err(()), pager));
            }
        }
    });
    Ok((Some(Box::pin(history)), history_gap))
}

/// When more than `MAX_REPLAY_EVENTS` events after `after` match the client, the id after
/// which the most recent that many start. Counts the candidates first, so that a client
/// with few pays one indexed count; otherwise scans ids and filters newest first.
async fn bounded_start(
    service: &EventService,
    client: &Client,
    audiences: &[String],
    after: i64,
    up_to: i64,
) -> Result<Option<i64>, StoreError> {
    let max = service.config().max_replay_events;
    let store = service.store();
    let candidates = store
        .count_for(audiences, after, up_to)
        .await
        .doing("count the events to replay")?;
    if candidates <= max as i64 {
        return Ok(None);
    }
    let mut before = up_to + 1;
    let mut matched = 0;
    let mut oldest_kept = before;
    loop {
        let page = store
            .filters_for_desc(audiences, after, before, SCAN_PAGE)
            .await
            .doing("find where a bounded replay starts")?;
        service.count_rows_read(page.len());
        let Some(&(last, _)) = page.last() else {
            return Ok(None);
        };
        for (id, filter) in page {
            let matches = match super::parse_filter(filter.as_deref()) {
                Ok(filter) => filter.is_none_or(|f| f.matches(&client.info)),
                Err(_) => false,
            };
            if matches {
                if matched == max {
                    return Ok(Some(oldest_kept - 1));
                }
                matched += 1;
                oldest_kept = id;
            }
        }
        before = last;
    }
}

enum Source {
    /// The log, through the client's audience keys.
    Log(Vec<String>),
    /// This user's pending rows.
    Pending(String),
}

struct Pager {
    service: EventService,
    source: Source,
    client: Arc<Client>,
    after: i64,
    up_to: i64,
    buffer: VecDeque<Replayed>,
    done: bool,
}

impl Pager {
    async fn fill(&mut self) -> Result<(), StoreError> {
        let store = self.service.store();
        let page = match &self.source {
            Source::Log(audiences) => store
                .events_for(audiences, self.after, self.up_to, PAGE)
                .await
                .doing("read events to replay")?,
            Source::Pending(user) => store
                .pending_between(user, self.after, self.up_to, PAGE)
                .await
                .doing("read pending notifications")?,
        };
        self.service.count_rows_read(page.len());
        self.done = page.len() < PAGE as usize;
        if let Some(last) = page.last() {
            self.after = last.event_id;
        }
        let free = match &self.source {
            // Another fresh stream of this user here may have taken some already.
            Source::Pending(user) => {
                let ids: Vec<i64> = page.iter().map(|e| e.event_id).collect();
                self.service.inner.ledger.take_pending(user, &ids)
            }
            Source::Log(_) => vec![true; page.len()],
        };
        for (stored, free) in page.into_iter().zip(free) {
            match self.for_client(&stored) {
                Some(replayed) if free => self.buffer.push_back(replayed),
                // Taken just now but not for this client: give it back.
                None if free => self.release([stored.event_id]),
                _ => {}
            }
        }
        Ok(())
    }

    /// The event as this client gets it, or `None` when it is meant for others or its
    /// filter cannot be read (delivery fails closed).
    fn for_client(&self, stored: &StoredEvent) -> Option<Replayed> {
        let info = &self.client.info;
        let filter = self.service.stored_filter(stored)?;
        if filter.as_ref().is_some_and(|f| !f.matches(info)) {
            return None;
        }
        let settles_pending = match &self.source {
            Source::Pending(_) => true,
            Source::Log(_) => filter.is_some_and(|f| {
                info.user_id
                    .as_ref()
                    .is_some_and(|u| f.target_users().contains(u))
            }),
        };
        Some(Replayed {
            id: stored.event_id,
            frame: event::encode(stored.event_id, &stored.kind, &stored.data),
            settles_pending,
        })
    }

    fn release(&self, ids: impl IntoIterator<Item = i64>) {
        if let Source::Pending(user) = &self.source {
            self.service.inner.ledger.release_pending(user, ids);
        }
    }
}

impl Drop for Pager {
    fn drop(&mut self) {
        // Pending events read for this stream but never written go back to the user.
        let unsent: Vec<i64> = self.buffer.iter().map(|r| r.id).collect();
        self.release(unsent);
    }
}

impl EventService {
    fn count_rows_read(&self, rows: usize) {
        self.inner
            .metrics
            .history_rows_read
            .fetch_add(rows as u64, Relaxed);
    }
}
