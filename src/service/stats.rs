//! Who is connected and the running totals, across every instance that shares the store:
//! this instance from memory (exact), the others from their last flush (about a second old).

use std::collections::BTreeMap;

use serde::Serialize;

use super::{
    EventService,
    error::{Doing, StoreError},
    session_record,
};
use crate::{
    event::{now_millis, rfc3339_millis},
    filter::{ClientInfo, Filter},
    store::SessionRecord,
};

/// The seed's `SSEStats`, durable (`GET /api/sse/stats`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct Stats {
    pub total_clients: usize,
    pub clients_by_user: BTreeMap<String, usize>,
    pub average_connection_duration_ms: i64,
    pub total_events_sent: i64,
    #[schema(format = DateTime)]
    pub last_event_timestamp: Option<String>,
    pub total_connections: i64,
    pub pending_notifications: i64,
    pub instances: i64,
}

/// A page of `GET /api/sse/clients`.
#[derive(Clone, Debug)]
pub struct ClientPage {
    pub clients: Vec<ClientView>,
    /// The last `clientId` of a full page: ask for `after=` it to get the next.
    pub next_after: Option<String>,
}

/// One open stream (`GET /api/sse/clients`).
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClientView {
    #[schema(format = Uuid)]
    pub client_id: String,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    #[schema(format = DateTime)]
    pub connected_at: String,
    #[schema(format = DateTime)]
    pub last_event_at: Option<String>,
    pub events_sent: i64,
    pub instance_id: String,
    #[serde(skip)]
    #[schema(ignore)]
    connected_at_ms: i64,
}

impl ClientView {
    fn from_session(s: SessionRecord) -> Self {
        Self {
            metadata: serde_json::from_str(&s.metadata).unwrap_or_default(),
            connected_at: rfc3339_millis(s.connected_at),
            last_event_at: s.last_event_at.map(rfc3339_millis),
            connected_at_ms: s.connected_at,
            client_id: s.client_id,
            user_id: s.user_id,
            session_id: s.session_id,
            events_sent: s.events_sent,
            instance_id: s.instance_id,
        }
    }

    /// The fields a filter looks at. A saved client id is always a UUID we wrote.
    fn info(&self) -> ClientInfo {
        ClientInfo {
            client_id: self.client_id.parse().unwrap_or_default(),
            user_id: self.user_id.clone(),
            session_id: self.session_id.clone(),
            metadata: self.metadata.clone(),
            connected_at: self.connected_at_ms,
        }
    }
}

impl EventService {
    /// Open streams on every live instance, optionally narrowed by a filter.
    pub async fn clients(&self, filter: Option<&Filter>) -> Result<Vec<ClientView>, StoreError> {
        let mut clients = narrowed(self.all_clients().await?, filter);
        clients.sort_by_key(|v| v.connected_at_ms);
        Ok(clients)
    }

    /// The stats (`GET /api/sse/stats`).
    pub async fn stats(&self) -> Result<Stats, StoreError> {
        self.stats_of(&self.all_clients().await?).await
    }

    /// One page of the open streams a filter picks, in `clientId` order after `after`,
    /// with the stats over all of them, from one read of the other instances' sessions
    /// (`GET /api/sse/clients`).
    pub async fn clients_page(
        &self,
        filter: Option<&Filter>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<(ClientPage, Stats), StoreError> {
        let all = self.all_clients().await?;
        let stats = self.stats_of(&all).await?;
        let mut picked = narrowed(all, filter);
        picked.retain(|c| after.is_none_or(|a| c.client_id.as_str() > a));
        picked.sort_unstable_by(|a, b| a.client_id.cmp(&b.client_id));
        picked.truncate(limit);
        let next_after = (picked.len() == limit)
            .then(|| picked.last().map(|c| c.client_id.clone()))
            .flatten();
        let page = ClientPage {
            clients: picked,
            next_after,
        };
        Ok((page, stats))
    }

    async fn all_clients(&self) -> Result<Vec<ClientView>, StoreError> {
        let hub = self.hub();
        let remote = self
            .store()
            .remote_sessions(hub.instance_id(), self.alive_since())
            .await
            .doing("read other instances' sessions")?;
        let local = hub
            .clients()
            .into_iter()
            .map(|c| session_record(&c, hub.instance_id(), None));
        Ok(local.chain(remote).map(ClientView::from_session).collect())
    }

    async fn stats_of(&self, clients: &[ClientView]) -> Result<Stats, StoreError> {
        let store = self.store();
        let ledger = &self.inner.ledger;
        let flushing = self.inner.flushing.lock().await;
        let totals = store.totals().await.doing("read the totals")?;
        let (unsaved_sent, unsaved_connections, unsaved_closed, unsaved_closed_ms) =
            ledger.unsaved();
        // Rows a stream here was handed but that the next flush has yet to delete.
        let pending_notifications = store
            .pending_count()
            .await
            .doing("count pending notifications")?
            .saturating_sub(ledger.unsaved_settlements())
            .max(0);
        drop(flushing);
        let other_instances = store
            .other_instances(self.hub().instance_id(), self.alive_since())
            .await
            .doing("count the other instances")?;

        let now = now_millis();
        let mut clients_by_user = BTreeMap::new();
        let mut open_ms = 0;
        for client in clients {
            open_ms += now - client.connected_at_ms;
            if let Some(user) = &client.user_id {
                *clients_by_user.entry(user.clone()).or_insert(0) += 1;
            }
        }
        // Over every connection on record: closed ones by their length, open ones so far.
        let sessions = totals.closed_connections + unsaved_closed as i64 + clients.len() as i64;
        let total_ms = totals.closed_duration_ms + unsaved_closed_ms + open_ms;
        let last_event = totals.last_event_at.max(ledger.last_event_at());
        Ok(Stats {
            total_clients: clients.len(),
            clients_by_user,
            average_connection_duration_ms: if sessions > 0 { total_ms / sessions } else { 0 },
            total_events_sent: totals.events_sent + unsaved_sent as i64,
            last_event_timestamp: last_event.map(rfc3339_millis),
            total_connections: totals.connections + unsaved_connections as i64,
            pending_notifications,
            instances: 1 + other_instances,
        })
    }
}

fn narrowed(mut views: Vec<ClientView>, filter: Option<&Filter>) -> Vec<ClientView> {
    if let Some(filter) = filter {
        views.retain(|v| filter.matches(&v.info()));
    }
    views
}
