//! The index of open streams: by client id, user and session, so that a publish to one
//! user never visits other users' streams.

use std::{
    collections::HashMap,
    sync::{
        Arc,
        atomic::{AtomicI64, Ordering::Relaxed},
    },
};

use uuid::Uuid;

use super::client::Slot;
use crate::filter::Filter;

#[derive(Debug, Default)]
pub(super) struct Registry {
    pub clients: HashMap<Uuid, Arc<Slot>>,
    by_user: HashMap<String, Vec<Uuid>>,
    by_session: HashMap<String, Vec<Uuid>>,
    /// The id of the last event dispatched: every later event reaches streams registered
    /// now. Moved under the read lock by the one dispatcher; registration reads it under
    /// the write lock, so it sees the cursor and the set of streams sent to as one state.
    pub cursor: AtomicI64,
    pub closed: bool,
}

impl Registry {
    pub fn insert(&mut self, slot: Arc<Slot>) {
        let info = &slot.client.info;
        let id = info.client_id;
        if let Some(user) = &info.user_id {
            self.by_user.entry(user.clone()).or_default().push(id);
        }
        if let Some(session) = &info.session_id {
            self.by_session.entry(session.clone()).or_default().push(id);
        }
        self.clients.insert(id, slot);
    }

    pub fn remove(&mut self, id: Uuid) -> Option<Arc<Slot>> {
        let slot = self.clients.remove(&id)?;
        let info = &slot.client.info;
        if let Some(user) = &info.user_id {
            remove_from_index(&mut self.by_user, user, id);
        }
        if let Some(session) = &info.session_id {
            remove_from_index(&mut self.by_session, session, id);
        }
        self.shrink();
        Some(slot)
    }

    /// Drops every entry (and so every queue's sender).
    pub fn clear(&mut self) {
        self.clients = HashMap::new();
        self.by_user = HashMap::new();
        self.by_session = HashMap::new();
    }

    /// Gives memory back after a crowd has left: a map keeps its largest capacity.
    fn shrink(&mut self) {
        let len = self.clients.len();
        if self.clients.capacity() > 64 && self.clients.capacity() > 4 * len {
            self.clients.shrink_to(2 * len);
            self.by_user.shrink_to(2 * self.by_user.len());
            self.by_session.shrink_to(2 * self.by_session.len());
        }
    }

    pub fn streams_of(&self, user: &str) -> usize {
        self.by_user.get(user).map_or(0, Vec::len)
    }

    pub fn cursor(&self) -> i64 {
        self.cursor.load(Relaxed)
    }

    /// Visits the streams that may match `filter`, through the most selective index.
    pub fn for_each_candidate(&self, filter: Option<&Filter>, mut visit: impl FnMut(&Arc<Slot>)) {
        let by_ids = |ids: &mut dyn Iterator<Item = &Uuid>, visit: &mut dyn FnMut(&Arc<Slot>)| {
            for id in ids {
                if let Some(client) = self.clients.get(id) {
                    visit(client);
                }
            }
        };
        let Some(filter) = filter else {
            self.clients.values().for_each(visit);
            return;
        };
        if let Some(ids) = &filter.client_ids {
            let mut ids = ids.clone();
            ids.sort_unstable();
            ids.dedup();
            by_ids(&mut ids.iter(), &mut visit);
        } else if let Some(user) = &filter.user_id {
            by_ids(
                &mut self.by_user.get(user).into_iter().flatten(),
                &mut visit,
            );
        } else if let Some(users) = &filter.user_ids {
            let mut users: Vec<&String> = users.iter().collect();
            users.sort_unstable();
            users.dedup();
            by_ids(
                &mut users
                    .into_iter()
                    .filter_map(|u| self.by_user.get(u))
                    .flatten(),
                &mut visit,
            );
        } else if let Some(session) = &filter.session_id {
            by_ids(
                &mut self.by_session.get(session).into_iter().flatten(),
                &mut visit,
            );
        } else {
            self.clients.values().for_each(visit);
        }
    }
}

fn remove_from_index(index: &mut HashMap<String, Vec<Uuid>>, key: &str, id: Uuid) {
    if let Some(ids) = index.get_mut(key) {
        ids.retain(|i| *i != id);
        if ids.is_empty() {
            index.remove(key);
        }
    }
}
