//! The hub: who is connected to this instance, and fan-out to them. Knows no HTTP and no
//! database.
//!
//! Each stream has its own bounded queue. A publish takes the registry's read lock, finds
//! candidates through the user, session and client-id indexes (a publish to one user never
//! visits other users' streams), and hands each match the event's shared `Bytes` with
//! `try_send`: nothing here awaits or writes to a socket while a lock is held. A stream
//! whose queue is full is cut off; it resumes from the event log with `Last-Event-ID`.

mod ledger;
mod stream;

use std::{
    collections::{BTreeMap, HashMap},
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::Duration,
};

use bytes::Bytes;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use ledger::{Ledger, SessionRecord, Tallies};
pub use stream::{ClientStream, HistoryStream, Replayed};

use crate::{event::now_millis, filter::Filter};

/// Events a stream may have queued before it counts as too slow (mercure uses 1000).
const QUEUE_EVENTS: usize = 1024;
/// Bytes a stream may have queued before it counts as too slow. With events up to 64 KiB
/// this, not the count, is what bounds a slow reader's memory.
const QUEUE_BYTES: usize = 4 * 1024 * 1024;

const NEVER_SAVED: u64 = u64::MAX;

/// Who a stream belongs to, as given when it connected.
#[derive(Clone, Debug)]
pub struct ClientInfo {
    pub client_id: Uuid,
    pub user_id: Option<String>,
    pub session_id: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Unix milliseconds.
    pub connected_at: i64,
}

/// One frame in a stream's queue. `id` is 0 for frames that are not stored events.
#[derive(Debug)]
pub struct Frame {
    id: i64,
    bytes: Bytes,
    /// The event waits in the pending table for this stream's user: handing it over
    /// settles that.
    settles_pending: bool,
}

/// A connected stream as the hub and the monitoring routes see it.
#[derive(Debug)]
pub struct Client {
    pub info: ClientInfo,
    queued_bytes: AtomicUsize,
    /// Unix ms of the last write, or of the moment the queue stopped being empty.
    last_progress: AtomicI64,
    events_sent: AtomicU64,
    /// Unix ms of the last stored event written, 0 for none.
    last_event_at: AtomicI64,
    /// `events_sent` as last saved (`NEVER_SAVED` before the first save), so the flusher
    /// writes only sessions that changed.
    saved_events: AtomicU64,
    /// Cancels this stream's connection; set for streams that are cut off.
    kill: CancellationToken,
    dropped: AtomicBool,
}

impl Client {
    pub fn events_sent(&self) -> u64 {
        self.events_sent.load(Relaxed)
    }

    pub fn last_event_at(&self) -> Option<i64> {
        Some(self.last_event_at.load(Relaxed)).filter(|&t| t > 0)
    }

    /// Record that a frame was handed to the connection.
    fn wrote(&self, frame_len: usize, stored: bool, now: i64, from_queue: bool) {
        if from_queue {
            self.queued_bytes.fetch_sub(frame_len, Relaxed);
        }
        self.last_progress.store(now, Relaxed);
        if stored {
            self.events_sent.fetch_add(1, Relaxed);
            self.last_event_at.store(now, Relaxed);
        }
    }

    /// A queued frame that the stream will not send after all.
    fn skipped(&self, frame_len: usize) {
        self.queued_bytes.fetch_sub(frame_len, Relaxed);
    }

    fn is_stalled(&self, now: i64, timeout: Duration) -> bool {
        self.queued_bytes.load(Relaxed) > 0
            && now - self.last_progress.load(Relaxed) > timeout.as_millis() as i64
    }
}

enum Offer {
    TooSlow,
    Gone,
}

/// Why the hub cut a stream off.
#[derive(Clone, Copy)]
enum CutOff {
    /// Its queue was full.
    TooSlow,
    /// It had data waiting and accepted none for the client timeout.
    Stale,
}

/// A registry entry: the stream's client and the sending end of its queue. Only the
/// registry holds the sender, so removing the entry ends the stream once its queue is
/// written.
#[derive(Debug)]
struct Slot {
    client: Arc<Client>,
    tx: mpsc::Sender<Frame>,
}

impl Slot {
    /// Queues a frame without waiting.
    fn offer(&self, frame: Frame) -> Result<(), Offer> {
        let client = &self.client;
        if client.dropped.load(Relaxed) {
            return Err(Offer::Gone);
        }
        let len = frame.bytes.len();
        let before = client.queued_bytes.fetch_add(len, Relaxed);
        if before > 0 && before + len > QUEUE_BYTES {
            client.queued_bytes.fetch_sub(len, Relaxed);
            return Err(Offer::TooSlow);
        }
        match self.tx.try_send(frame) {
            Ok(()) => {
                if before == 0 {
                    // The stall clock starts when there is something to write.
                    client.last_progress.store(now_millis(), Relaxed);
                }
                Ok(())
            }
            Err(err) => {
                client.queued_bytes.fetch_sub(len, Relaxed);
                match err {
                    mpsc::error::TrySendError::Full(_) => Err(Offer::TooSlow),
                    mpsc::error::TrySendError::Closed(_) => Err(Offer::Gone),
                }
            }
        }
    }
}

/// Why a stream was not registered.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// `MAX_CLIENTS` streams are open.
    Full,
    /// The instance is shutting down.
    Closed,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct HubMetrics {
    pub frames_written: AtomicU64,
    pub dropped_slow: AtomicU64,
    pub dropped_stale: AtomicU64,
}

/// A cheap handle to the registry of this instance's open streams.
#[derive(Clone, Debug)]
pub struct Hub {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    instance_id: String,
    registry: RwLock<Registry>,
    max_clients: usize,
    client_timeout: Duration,
    ledger: Ledger,
    metrics: HubMetrics,
}

#[derive(Debug, Default)]
struct Registry {
    clients: HashMap<Uuid, Slot>,
    by_user: HashMap<String, Vec<Uuid>>,
    by_session: HashMap<String, Vec<Uuid>>,
    /// The id of the last event dispatched: every later event reaches streams registered
    /// now. Moved under the read lock by the one publisher; registration reads it under the
    /// write lock, so it sees the cursor and the set of streams sent to as one state.
    cursor: AtomicI64,
    closed: bool,
}

/// A registered stream's receiving end. Dropping it unregisters the stream.
#[derive(Debug)]
pub struct Registration {
    pub client: Arc<Client>,
    /// Events up to this id were dispatched before the stream registered: they come from
    /// the store (replay, pending); every later one arrives on the queue.
    pub cursor: i64,
    rx: mpsc::Receiver<Frame>,
    hub: Hub,
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.hub.unregister(self.client.info.client_id);
    }
}

/// An event ready to fan out.
#[derive(Debug)]
pub struct Dispatch<'a> {
    pub id: i64,
    pub frame: Bytes,
    /// `None` for a broadcast.
    pub filter: Option<&'a Filter>,
    /// Users for whom the event also waits in the pending table.
    pub pending_users: &'a [String],
}

impl Hub {
    pub fn new(instance_id: String, max_clients: usize, client_timeout: Duration) -> Self {
        Self {
            inner: Arc::new(Inner {
                instance_id,
                registry: RwLock::default(),
                max_clients,
                client_timeout,
                ledger: Ledger::default(),
                metrics: HubMetrics::default(),
            }),
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    pub fn ledger(&self) -> &Ledger {
        &self.inner.ledger
    }

    pub fn metrics(&self) -> &HubMetrics {
        &self.inner.metrics
    }

    // A poisoned lock means a panic mid-update of plain maps; the maps are still usable,
    // and refusing every later request would be worse.
    fn read(&self) -> RwLockReadGuard<'_, Registry> {
        self.inner
            .registry
            .read()
            .unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, Registry> {
        self.inner
            .registry
            .write()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a stream. `kill` cancels its connection when the hub cuts it off.
    pub fn register(
        &self,
        info: ClientInfo,
        kill: CancellationToken,
    ) -> Result<Registration, RegisterError> {
        let (tx, rx) = mpsc::channel(QUEUE_EVENTS);
        let client = Arc::new(Client {
            queued_bytes: AtomicUsize::new(0),
            last_progress: AtomicI64::new(info.connected_at),
            events_sent: AtomicU64::new(0),
            last_event_at: AtomicI64::new(0),
            saved_events: AtomicU64::new(NEVER_SAVED),
            kill,
            dropped: AtomicBool::new(false),
            info,
        });
        let id = client.info.client_id;
        let mut reg = self.write();
        if reg.closed {
            return Err(RegisterError::Closed);
        }
        if reg.clients.len() >= self.inner.max_clients {
            return Err(RegisterError::Full);
        }
        if let Some(user) = &client.info.user_id {
            reg.by_user.entry(user.clone()).or_default().push(id);
        }
        if let Some(session) = &client.info.session_id {
            reg.by_session.entry(session.clone()).or_default().push(id);
        }
        reg.clients.insert(
            id,
            Slot {
                client: client.clone(),
                tx,
            },
        );
        let cursor = reg.cursor.load(Relaxed);
        drop(reg);
        Ok(Registration {
            client,
            cursor,
            rx,
            hub: self.clone(),
        })
    }

    fn unregister(&self, id: Uuid) {
        let mut reg = self.write();
        let Some(Slot { client, .. }) = reg.clients.remove(&id) else {
            return;
        };
        if let Some(user) = &client.info.user_id {
            remove_from_index(&mut reg.by_user, user, id);
        }
        if let Some(session) = &client.info.session_id {
            remove_from_index(&mut reg.by_session, session, id);
        }
    }

    /// Cuts streams off: their connections close and their queues are released. Counted
    /// and logged once per stream, whichever path noticed first.
    fn cut_off(&self, ids: &[Uuid], reason: CutOff) {
        for id in ids {
            if let Some(slot) = self.read().clients.get(id) {
                if !slot.client.dropped.swap(true, Relaxed) {
                    let (counter, why) = match reason {
                        CutOff::TooSlow => (
                            &self.inner.metrics.dropped_slow,
                            "too slow to read its events",
                        ),
                        CutOff::Stale => (
                            &self.inner.metrics.dropped_stale,
                            "accepted no data for the client timeout",
                        ),
                    };
                    counter.fetch_add(1, Relaxed);
                    tracing::info!(client_id = %id, "stream cut off: {why}");
                }
                slot.client.kill.cancel();
            }
            self.unregister(*id);
        }
    }

    /// Hands an event to every matching stream; returns how many took it.
    pub fn dispatch(&self, event: &Dispatch<'_>) -> usize {
        let mut delivered = 0;
        let mut too_slow = Vec::new();
        {
            let reg = self.read();
            reg.cursor.fetch_max(event.id, Relaxed);
            reg.for_each_candidate(event.filter, |slot| {
                let client = &slot.client;
                if !event.filter.is_none_or(|f| f.matches(&client.info)) {
                    return;
                }
                let settles_pending = client
                    .info
                    .user_id
                    .as_ref()
                    .is_some_and(|u| event.pending_users.iter().any(|p| p == u));
                let frame = Frame {
                    id: event.id,
                    bytes: event.frame.clone(),
                    settles_pending,
                };
                match slot.offer(frame) {
                    Ok(()) => delivered += 1,
                    Err(Offer::TooSlow) => too_slow.push(client.info.client_id),
                    Err(Offer::Gone) => {}
                }
            });
        }
        self.cut_off(&too_slow, CutOff::TooSlow);
        delivered
    }

    /// Sends a heartbeat to every stream; one whose queue is full is cut off. (Stalled
    /// streams are `sweep_stale`'s.)
    pub fn heartbeat(&self, frame: Bytes) {
        let mut too_slow = Vec::new();
        for slot in self.read().clients.values() {
            let ping = Frame {
                id: 0,
                bytes: frame.clone(),
                settles_pending: false,
            };
            if let Err(Offer::TooSlow) = slot.offer(ping) {
                too_slow.push(slot.client.info.client_id);
            }
        }
        self.cut_off(&too_slow, CutOff::TooSlow);
    }

    /// Cuts off streams that accepted no data for `CLIENT_TIMEOUT_MS`.
    pub fn sweep_stale(&self) {
        let now = now_millis();
        let stale: Vec<Uuid> = self
            .read()
            .clients
            .values()
            .filter(|s| s.client.is_stalled(now, self.inner.client_timeout))
            .map(|s| s.client.info.client_id)
            .collect();
        self.cut_off(&stale, CutOff::Stale);
    }

    /// Refuses new streams and ends the open ones once their queues are written.
    pub fn close(&self) {
        let mut reg = self.write();
        reg.closed = true;
        // Dropping the senders ends each stream after what is already queued.
        reg.clients.clear();
        reg.by_user.clear();
        reg.by_session.clear();
    }

    pub fn has_user(&self, user: &str) -> bool {
        self.read().by_user.contains_key(user)
    }

    pub fn len(&self) -> usize {
        self.read().clients.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The open streams.
    pub fn clients(&self) -> Vec<Arc<Client>> {
        self.read()
            .clients
            .values()
            .map(|s| s.client.clone())
            .collect()
    }

    /// Sessions never saved, and with `with_counts` those whose event count moved since.
    pub fn unsaved_sessions(&self, with_counts: bool) -> Vec<SessionRecord> {
        self.read()
            .clients
            .values()
            .map(|s| &s.client)
            .filter(|c| {
                let saved = c.saved_events.load(Relaxed);
                saved == NEVER_SAVED || (with_counts && saved != c.events_sent())
            })
            .map(|c| SessionRecord::new(c, &self.inner.instance_id, None))
            .collect()
    }

    /// Notes that these sessions were saved as recorded.
    pub fn mark_saved(&self, sessions: &[SessionRecord]) {
        let reg = self.read();
        for session in sessions {
            let slot = session
                .client_id
                .parse()
                .ok()
                .and_then(|id: Uuid| reg.clients.get(&id));
            if let Some(Slot { client, .. }) = slot {
                client
                    .saved_events
                    .store(session.events_sent as u64, Relaxed);
            }
        }
    }

    /// Every event up to `id` is already in the store: streams registered from now on
    /// catch up on it there.
    pub fn advance_cursor(&self, id: i64) {
        self.read().cursor.fetch_max(id, Relaxed);
    }

    pub fn cursor(&self) -> i64 {
        self.read().cursor.load(Relaxed)
    }
}

impl Registry {
    /// Visits the streams that may match `filter`, through the most selective index.
    fn for_each_candidate(&self, filter: Option<&Filter>, mut visit: impl FnMut(&Slot)) {
        let by_ids = |ids: &mut dyn Iterator<Item = &Uuid>, visit: &mut dyn FnMut(&Slot)| {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn info(user: &str) -> ClientInfo {
        ClientInfo {
            client_id: Uuid::new_v4(),
            user_id: Some(user.into()),
            session_id: None,
            metadata: BTreeMap::new(),
            connected_at: now_millis(),
        }
    }

    fn dispatch(hub: &Hub, id: i64, filter: Option<&Filter>) -> usize {
        hub.dispatch(&Dispatch {
            id,
            frame: Bytes::from_static(b"x"),
            filter,
            pending_users: &[],
        })
    }

    #[test]
    fn a_user_targeted_event_reaches_only_that_users_streams() {
        let hub = Hub::new("i".into(), 10, Duration::from_secs(90));
        let mut a = hub.register(info("a"), CancellationToken::new()).unwrap();
        let mut b = hub.register(info("b"), CancellationToken::new()).unwrap();
        assert_eq!(dispatch(&hub, 1, Some(&Filter::user("a"))), 1);
        assert_eq!(a.rx.try_recv().unwrap().id, 1);
        assert!(b.rx.try_recv().is_err());
        assert_eq!(dispatch(&hub, 2, None), 2);
    }

    #[test]
    fn registration_sees_the_cursor_of_the_last_dispatch() {
        let hub = Hub::new("i".into(), 10, Duration::from_secs(90));
        dispatch(&hub, 7, None);
        let reg = hub.register(info("a"), CancellationToken::new()).unwrap();
        assert_eq!(reg.cursor, 7);
    }

    #[test]
    fn max_clients_refuses_then_frees_a_place_on_drop() {
        let hub = Hub::new("i".into(), 1, Duration::from_secs(90));
        let first = hub.register(info("a"), CancellationToken::new()).unwrap();
        assert_eq!(
            hub.register(info("b"), CancellationToken::new())
                .unwrap_err(),
            RegisterError::Full
        );
        drop(first);
        assert!(hub.register(info("b"), CancellationToken::new()).is_ok());
        assert!(!hub.has_user("a"));
    }

    #[test]
    fn a_stream_with_data_waiting_and_no_write_for_the_timeout_is_cut_off_as_stale() {
        let hub = Hub::new("i".into(), 10, Duration::from_millis(100));
        let kill = CancellationToken::new();
        let reg = hub.register(info("a"), kill.clone()).unwrap();
        let idle = hub.register(info("b"), CancellationToken::new()).unwrap();
        dispatch(&hub, 1, Some(&Filter::user("a")));
        hub.sweep_stale();
        assert!(
            !kill.is_cancelled(),
            "waiting less than the timeout is fine"
        );

        // Nothing written for longer than the timeout.
        reg.client.last_progress.fetch_sub(1_000, Relaxed);
        idle.client.last_progress.fetch_sub(1_000, Relaxed);
        hub.sweep_stale();

        assert!(kill.is_cancelled());
        assert_eq!(hub.len(), 1, "an idle stream with nothing waiting stays");
        assert_eq!(hub.metrics().dropped_stale.load(Relaxed), 1);
    }

    #[test]
    fn a_full_queue_cuts_the_stream_off() {
        let hub = Hub::new("i".into(), 10, Duration::from_secs(90));
        let kill = CancellationToken::new();
        let _reg = hub.register(info("a"), kill.clone()).unwrap();
        let big = Bytes::from(vec![b'x'; 64 * 1024]);
        let mut id = 0;
        while !kill.is_cancelled() && id < 10_000 {
            id += 1;
            hub.dispatch(&Dispatch {
                id,
                frame: big.clone(),
                filter: None,
                pending_users: &[],
            });
        }
        assert!(kill.is_cancelled());
        assert!(id as usize <= QUEUE_BYTES / big.len() + 1);
        assert!(hub.is_empty());
        assert_eq!(hub.metrics().dropped_slow.load(Relaxed), 1);
    }
}
