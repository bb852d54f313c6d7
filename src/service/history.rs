//! What a stream catches up on before live events: the replay after its `Last-Event-ID`,
//! or, for a stream that starts fresh, its user's pending notifications.
//!
//! Both stop at the hub's cursor as it was when the stream registered: every later event
//! reaches the stream's queue, so the history and the queue meet with no gap and no
//! overlap, in id order.

use std::{collections::VecDeque, sync::Arc};

use futures_util::stream;

use super::EventService;
use crate::{
    event,
    filter::Filter,
    hub::{Client, HistoryStream, Replayed},
    store::{Store, StoredEvent},
};

/// Events read per query. Also a denial-of-service guard: a stream never holds more.
const PAGE: i64 = 500;

/// Where a new stream starts.
#[derive(Clone, Copy, Debug)]
pub struct HistoryRequest {
    /// `Last-Event-ID`, if the client is resuming.
    pub last_event_id: Option<i64>,
    /// Events up to here were dispatched before the stream registered.
    pub cursor: i64,
}

/// The stream's history, with the first page already read (so a database failure is
/// reported before the response starts), and whether retention has deleted events the
/// client has not seen.
pub async fn open_history(
    service: &EventService,
    client: Arc<Client>,
    request: HistoryRequest,
) -> Result<(Option<HistoryStream>, bool), sqlx::Error> {
    let store = service.store().clone();
    let (source, after, history_gap) = match request.last_event_id {
        Some(last_seen) => {
            let (_, retained_through) = store.event_horizon().await?;
            (Source::Log, last_seen, last_seen < retained_through)
        }
        None => match client.info.user_id.clone() {
            Some(user) => (Source::Pending(user), 0, false),
            None => return Ok((None, false)),
        },
    };
    if after >= request.cursor {
        return Ok((None, history_gap));
    }
    let mut pager = Pager {
        store,
        source,
        client,
        after,
        up_to: request.cursor,
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
                tracing::warn!(%error, "could not read history; ending the stream so the client resumes");
                pager.done = true;
                return Some((Err(()), pager));
            }
        }
    });
    Ok((Some(Box::pin(history)), history_gap))
}

enum Source {
    /// Every stored event, filtered for this client.
    Log,
    /// This user's pending rows.
    Pending(String),
}

struct Pager {
    store: Store,
    source: Source,
    client: Arc<Client>,
    after: i64,
    up_to: i64,
    buffer: VecDeque<Replayed>,
    done: bool,
}

impl Pager {
    async fn fill(&mut self) -> Result<(), sqlx::Error> {
        let page = match &self.source {
            Source::Log => {
                self.store
                    .events_between(self.after, self.up_to, PAGE)
                    .await?
            }
            Source::Pending(user) => {
                self.store
                    .pending_between(user, self.after, self.up_to, PAGE)
                    .await?
            }
        };
        self.done = page.len() < PAGE as usize;
        if let Some(last) = page.last() {
            self.after = last.event_id;
        }
        for stored in page {
            if let Some(replayed) = self.for_client(stored) {
                self.buffer.push_back(replayed);
            }
        }
        Ok(())
    }

    /// The event as this client gets it, or `None` when it is meant for others.
    fn for_client(&self, stored: StoredEvent) -> Option<Replayed> {
        let info = &self.client.info;
        let filter: Option<Filter> = match stored.filter.as_deref().map(serde_json::from_str) {
            None => None,
            Some(Ok(filter)) => Some(filter),
            // Unreadable targeting must never widen to everyone.
            Some(Err(_)) => return None,
        };
        if filter.as_ref().is_some_and(|f| !f.matches(info)) {
            return None;
        }
        let settles_pending = match &self.source {
            Source::Pending(_) => true,
            Source::Log => filter.is_some_and(|f| {
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
}
