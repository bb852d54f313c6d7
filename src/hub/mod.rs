//! The hub: who is connected to this instance, and fan-out to them. Knows no HTTP and no
//! database.
//!
//! Each stream has its own bounded queue ([`client`]). A publish takes the registry's read
//! lock, finds candidates through the user, session and client-id indexes ([`registry`]),
//! and hands each match the event's shared `Bytes` with `try_send`. A stream waiting with
//! nothing queued may have lent its connection ([`LentConnection`]): then, with the lock
//! released, the dispatcher writes the event to it without waiting, sparing the wake-up
//! and poll of its task (and queues it after all if the socket is full). Nothing here
//! awaits, or writes to a socket, while a lock is held. A stream that falls behind is cut
//! off ([`cutoff`]) and resumes from the event log with `Last-Event-ID`.

mod client;
mod cutoff;
mod registry;

use std::{
    sync::{
        Arc, RwLock, RwLockReadGuard, RwLockWriteGuard,
        atomic::{AtomicU64, Ordering::Relaxed},
    },
    task::{Context, Poll},
    time::Duration,
};

use bytes::Bytes;
use futures_channel::mpsc;
use futures_util::StreamExt;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

pub use client::{Client, Frame, LentConnection, Wrote};

use client::{Offer, Slot};
use cutoff::CutOff;
use registry::Registry;

use crate::filter::{ClientInfo, Filter};

/// Why a stream was not registered.
#[derive(Debug, PartialEq, Eq)]
pub enum RegisterError {
    /// `MAX_CLIENTS` streams are open.
    Full,
    /// The user has `MAX_STREAMS_PER_USER` streams open.
    UserFull,
    /// The instance is shutting down.
    Closed,
}

/// Counters for `/metrics`.
#[derive(Debug)]
pub struct HubMetrics {
    /// Bytes a stream had waiting when it was cut off as too slow.
    pub queued_at_cutoff: prometheus_client::metrics::histogram::Histogram,
    pub frames_written: AtomicU64,
    pub dropped_slow: AtomicU64,
    pub dropped_stale: AtomicU64,
    pub dropped_behind: AtomicU64,
    pub dropped_orphaned: AtomicU64,
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
    /// 0 = no limit.
    max_per_user: usize,
    client_timeout: Duration,
    /// The stall check's clock starts here. It is tokio's monotonic clock, so a step of
    /// the wall clock cannot cut every stream at once, and tests can pause it.
    epoch: Instant,
    metrics: HubMetrics,
}

/// A registered stream's receiving end. Dropping it unregisters the stream.
#[derive(Debug)]
pub struct Registration {
    pub client: Arc<Client>,
    /// Events up to this id were dispatched before the stream registered: they come from
    /// the store (replay, pending); every later one arrives on the queue.
    pub cursor: i64,
    rx: mpsc::UnboundedReceiver<Frame>,
    hub: Hub,
}

impl Registration {
    /// The next queued frame; `None` once the hub has let the stream go.
    pub fn poll_frame(&mut self, cx: &mut Context<'_>) -> Poll<Option<Frame>> {
        self.rx.poll_next_unpin(cx)
    }

    /// Records that a frame of `len` bytes was written at `wall` (Unix ms) (`stored`: it
    /// has an id; `from_queue`: it came from `poll_frame`).
    pub fn wrote(&self, len: usize, stored: bool, from_queue: bool, wall: i64) {
        let hub = &self.hub;
        self.client
            .wrote(len, stored, from_queue, hub.clock(), wall);
        hub.inner.metrics.frames_written.fetch_add(1, Relaxed);
    }

    /// A queued frame that will not be written after all.
    pub fn skipped(&self, len: usize) {
        self.client.skipped(len);
    }

    pub fn instance_id(&self) -> &str {
        self.hub.instance_id()
    }

    /// Lets the dispatcher write to the stream's connection itself whenever the stream
    /// lends it (`Client::lend`).
    pub fn attach(&self, connection: Arc<dyn LentConnection>) {
        if let Some(slot) = self.hub.read().clients.get(&self.client.info.client_id) {
            let _ = slot.connection.set(connection);
        }
    }
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
    /// Users for whom the event also waits in the pending table. Sorted, as
    /// `Filter::target_users` gives them: every matching stream looks its user up here.
    pub pending_users: &'a [String],
    /// Users with no pending row, because they had a stream here when the event was
    /// published: `dispatch` says which of them no stream was handed it to. Sorted too.
    pub expected_users: &'a [String],
    /// Write to idle streams' connections here rather than wake their tasks. The
    /// publisher asks it for the last event of a commit, or of a page of other instances'
    /// events, when no publish waits: while more follow, the queue lets each stream's
    /// task write several events at once, spread over the cores.
    pub write_idle: bool,
}

/// What `dispatch` did.
#[derive(Debug, PartialEq, Eq)]
pub struct Handed<'a> {
    /// Streams that took the event.
    pub streams: usize,
    /// Of those, the streams it was written to here, not queued.
    pub written: usize,
    /// Those of `expected_users` with no stream that took it.
    pub missed: Vec<&'a str>,
}

impl Hub {
    pub fn new(
        instance_id: String,
        max_clients: usize,
        max_per_user: usize,
        client_timeout: Duration,
    ) -> Self {
        Self {
            inner: Arc::new(Inner {
                instance_id,
                registry: RwLock::default(),
                max_clients,
                max_per_user,
                client_timeout,
                epoch: Instant::now(),
                metrics: HubMetrics {
                    // 64 KiB to 8 MiB.
                    queued_at_cutoff: prometheus_client::metrics::histogram::Histogram::new(
                        prometheus_client::metrics::histogram::exponential_buckets(65536.0, 2.0, 8),
                    ),
                    frames_written: AtomicU64::default(),
                    dropped_slow: AtomicU64::default(),
                    dropped_stale: AtomicU64::default(),
                    dropped_behind: AtomicU64::default(),
                    dropped_orphaned: AtomicU64::default(),
                },
            }),
        }
    }

    pub fn instance_id(&self) -> &str {
        &self.inner.instance_id
    }

    pub fn metrics(&self) -> &HubMetrics {
        &self.inner.metrics
    }

    /// Milliseconds on the hub's monotonic clock.
    fn clock(&self) -> i64 {
        self.inner.epoch.elapsed().as_millis() as i64
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
        let (tx, rx) = mpsc::unbounded();
        let client = Arc::new(Client::new(info, kill, self.clock()));
        let mut reg = self.write();
        if reg.closed {
            return Err(RegisterError::Closed);
        }
        if reg.clients.len() >= self.inner.max_clients {
            return Err(RegisterError::Full);
        }
        let max_per_user = self.inner.max_per_user;
        if let Some(user) = &client.info.user_id
            && max_per_user > 0
            && reg.streams_of(user) >= max_per_user
        {
            return Err(RegisterError::UserFull);
        }
        reg.insert(Arc::new(Slot {
            client: client.clone(),
            tx,
            connection: std::sync::OnceLock::new(),
        }));
        let cursor = reg.cursor();
        drop(reg);
        Ok(Registration {
            client,
            cursor,
            rx,
            hub: self.clone(),
        })
    }

    fn unregister(&self, id: Uuid) {
        self.write().remove(id);
    }

    /// Hands an event to every matching stream: queued, or written to the connections
    /// of idle streams (`Dispatch::write_idle`) once the registry's lock is released.
    /// One task calls it (the publisher): events reach each stream in the order of the
    /// calls, which two concurrent callers would not keep.
    pub fn dispatch<'a>(&self, event: &Dispatch<'a>) -> Handed<'a> {
        debug_assert!(event.pending_users.is_sorted() && event.expected_users.is_sorted());
        let mut reached = vec![false; event.expected_users.len()];
        let (mut streams, mut written) = (0, 0);
        let mut too_slow = Vec::new();
        let mut idle = Vec::new();
        let now = self.clock();
        let mut took = |client: &Client, result: Result<(), Offer>| match result {
            Ok(()) => {
                streams += 1;
                if let Some(user) = &client.info.user_id
                    && let Ok(i) = event.expected_users.binary_search(user)
                {
                    reached[i] = true;
                }
            }
            Err(Offer::TooSlow) => too_slow.push(client.info.client_id),
            Err(Offer::Gone) => {}
        };
        {
            let reg = self.read();
            reg.cursor.fetch_max(event.id, Relaxed);
            reg.for_each_candidate(event.filter, |slot| {
                let client = &slot.client;
                if !event.filter.is_none_or(|f| f.matches(&client.info)) {
                    return;
                }
                let frame = Frame {
                    id: event.id,
                    bytes: event.frame.clone(),
                    settles_pending: client
                        .info
                        .user_id
                        .as_ref()
                        .is_some_and(|u| event.pending_users.binary_search(u).is_ok()),
                };
                // Only streams that look idle now wait for the writes: the rest are
                // queued at once. (`write_lent` looks again.)
                if event.write_idle
                    && !frame.settles_pending
                    && client.is_lent()
                    && slot.connection.get().is_some()
                {
                    idle.push((slot.clone(), frame));
                } else {
                    took(client, slot.offer(frame, now));
                }
            });
        }
        // No lock is held across these writes.
        if !idle.is_empty() {
            let wall = crate::event::now_millis();
            let results = write_to_idle(&idle, now, wall);
            for ((slot, frame), done) in idle.into_iter().zip(results) {
                if done {
                    written += 1;
                    took(&slot.client, Ok(()));
                } else {
                    took(&slot.client, slot.offer(frame, now));
                }
            }
            let frames = &self.inner.metrics.frames_written;
            frames.fetch_add(written as u64, Relaxed);
        }
        self.cut_off(&too_slow, CutOff::TooSlow);
        Handed {
            streams,
            written,
            missed: event
                .expected_users
                .iter()
                .zip(reached)
                .filter(|(_, reached)| !reached)
                .map(|(user, _)| user.as_str())
                .collect(),
        }
    }

    /// Sends a heartbeat to every stream; one whose queue is full is cut off. (Stalled
    /// streams are `sweep_stale`'s.)
    pub fn heartbeat(&self, frame: Bytes) {
        let mut too_slow = Vec::new();
        let now = self.clock();
        for slot in self.read().clients.values() {
            let ping = Frame {
                id: 0,
                bytes: frame.clone(),
                settles_pending: false,
            };
            if let Err(Offer::TooSlow) = slot.offer(ping, now) {
                too_slow.push(slot.client.info.client_id);
            }
        }
        self.cut_off(&too_slow, CutOff::TooSlow);
    }

    /// Refuses new streams and ends the open ones once their queues are written.
    pub fn close(&self) {
        let mut reg = self.write();
        reg.closed = true;
        // Dropping the senders ends each stream after what is already queued.
        reg.clear();
    }

    /// `users` split into those with no stream here and those with one, each in the order
    /// given, under one look at the index.
    pub fn split_by_streams(&self, users: Vec<String>) -> (Vec<String>, Vec<String>) {
        let reg = self.read();
        users.into_iter().partition(|u| reg.streams_of(u) == 0)
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

    /// Streams whose saved session lags behind (see [`Client::needs_saving`]).
    pub fn unsaved_clients(&self, counts: bool) -> Vec<Arc<Client>> {
        self.read()
            .clients
            .values()
            .filter(|s| s.client.needs_saving(counts))
            .map(|s| s.client.clone())
            .collect()
    }

    /// Every event up to `id` is already in the store: streams registered from now on
    /// catch up on it there.
    pub fn advance_cursor(&self, id: i64) {
        self.read().cursor.fetch_max(id, Relaxed);
    }

    pub fn cursor(&self) -> i64 {
        self.read().cursor()
    }
}

/// Fewest idle streams worth a writer thread of their own in one dispatch.
const STREAMS_PER_WRITER: usize = 1024;

/// Writes each frame to its stream's connection (`Slot::write_lent`); whether each
/// went. A large broadcast is shared out among the machine's cores: the time a send takes
/// is mostly the kernel's, delivering to the reader, and a core can do only so many.
fn write_to_idle(idle: &[(Arc<Slot>, Frame)], now: i64, wall: i64) -> Vec<bool> {
    let write = |part: &[(Arc<Slot>, Frame)]| -> Vec<bool> {
        part.iter()
            .map(|(slot, frame)| slot.write_lent(frame, now, wall))
            .collect()
    };
    static CORES: std::sync::LazyLock<usize> =
        std::sync::LazyLock::new(|| std::thread::available_parallelism().map_or(1, usize::from));
    let writers = CORES.min(idle.len() / STREAMS_PER_WRITER).max(1);
    if writers == 1 {
        return write(idle);
    }
    let parts: Vec<_> = idle.chunks(idle.len().div_ceil(writers)).collect();
    std::thread::scope(|scope| {
        let others: Vec<_> = parts[1..]
            .iter()
            .map(|&part| {
                let thread = std::thread::Builder::new().spawn_scoped(scope, move || write(part));
                // A thread the system refuses: that part is written here instead.
                thread.map_err(|_| part)
            })
            .collect();
        let mut results = write(parts[0]);
        for other in others {
            results.extend(match other {
                // A writer's panic goes on in the dispatcher, as if it had happened there.
                Ok(thread) => thread
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(part) => write(part),
            });
        }
        results
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::{client::QUEUE_BYTES, *};
    use crate::event::now_millis;

    fn info(user: &str) -> ClientInfo {
        ClientInfo {
            client_id: Uuid::new_v4(),
            user_id: Some(user.into()),
            session_id: None,
            metadata: BTreeMap::new(),
            connected_at: now_millis(),
        }
    }

    fn hub(max_clients: usize, timeout: Duration) -> Hub {
        Hub::new("i".into(), max_clients, 2, timeout)
    }

    fn dispatch(hub: &Hub, id: i64, filter: Option<&Filter>) -> usize {
        hub.dispatch(&Dispatch {
            id,
            frame: Bytes::from_static(b"x"),
            filter,
            pending_users: &[],
            expected_users: &[],
            write_idle: false,
        })
        .streams
    }

    #[tokio::test]
    async fn a_user_targeted_event_reaches_only_that_users_streams() {
        let hub = hub(10, Duration::from_secs(90));
        let mut a = hub.register(info("a"), CancellationToken::new()).unwrap();
        let mut b = hub.register(info("b"), CancellationToken::new()).unwrap();
        assert_eq!(dispatch(&hub, 1, Some(&Filter::user("a"))), 1);
        assert_eq!(a.rx.try_recv().unwrap().id, 1);
        assert!(b.rx.try_recv().is_err());
        assert_eq!(dispatch(&hub, 2, None), 2);
    }

    #[tokio::test]
    async fn dispatch_names_the_expected_users_whom_no_stream_took_it_for() {
        let hub = hub(10, Duration::from_secs(90));
        let _a = hub.register(info("a"), CancellationToken::new()).unwrap();
        let expected = ["a".to_owned(), "gone".to_owned()];
        let handed = hub.dispatch(&Dispatch {
            id: 1,
            frame: Bytes::from_static(b"x"),
            filter: None,
            pending_users: &[],
            expected_users: &expected,
            write_idle: false,
        });
        assert_eq!(
            handed,
            Handed {
                streams: 1,
                written: 0,
                missed: vec!["gone"]
            }
        );
    }

    /// A connection that records what the dispatcher wrote to it and answers `reply`.
    #[derive(Default)]
    struct Recorder {
        frames: std::sync::Mutex<Vec<Bytes>>,
        reply: std::sync::Mutex<Option<Wrote>>,
    }

    impl LentConnection for Recorder {
        fn write_now(&self, frame: &Bytes) -> Wrote {
            let reply = self.reply.lock().unwrap().take().unwrap_or(Wrote::All);
            if reply != Wrote::Nothing {
                self.frames.lock().unwrap().push(frame.clone());
            }
            reply
        }
    }

    fn dispatch_writing_idle(hub: &Hub, id: i64, pending: &[String]) -> Handed<'static> {
        let handed = hub.dispatch(&Dispatch {
            id,
            frame: Bytes::from(format!("e{id}")),
            filter: None,
            pending_users: pending,
            expected_users: &[],
            write_idle: true,
        });
        Handed {
            streams: handed.streams,
            written: handed.written,
            missed: Vec::new(),
        }
    }

    #[tokio::test]
    async fn a_lent_connection_is_written_to_at_once_and_a_busy_one_gets_the_queue() {
        let hub = hub(10, Duration::from_secs(90));
        let mut reg = hub.register(info("a"), CancellationToken::new()).unwrap();
        let conn = Arc::new(Recorder::default());
        reg.attach(conn.clone());
        // Not lent yet (the stream is still writing its opening): queued.
        assert_eq!(dispatch_writing_idle(&hub, 1, &[]).written, 0);
        assert_eq!(reg.rx.try_recv().unwrap().id, 1);
        reg.wrote(2, true, true, 0);
        reg.client.lend();
        let handed = dispatch_writing_idle(&hub, 2, &[]);
        assert_eq!((handed.streams, handed.written), (1, 1));
        assert_eq!(conn.frames.lock().unwrap().as_slice(), [Bytes::from("e2")]);
        assert!(reg.rx.try_recv().is_err());
        assert_eq!(reg.client.events_sent(), 2);
        // Taken back: queued again, and nothing is written behind the task's back.
        assert!(reg.client.reclaim());
        assert_eq!(dispatch_writing_idle(&hub, 3, &[]).written, 0);
        assert_eq!(reg.rx.try_recv().unwrap().id, 3);
        assert_eq!(conn.frames.lock().unwrap().len(), 1);
    }

    #[tokio::test]
    async fn queued_frames_pending_rows_and_a_full_socket_keep_an_event_on_the_queue() {
        let hub = hub(10, Duration::from_secs(90));
        let mut reg = hub.register(info("a"), CancellationToken::new()).unwrap();
        let conn = Arc::new(Recorder::default());
        reg.attach(conn.clone());
        reg.client.lend();
        // A heartbeat waits in the queue: the event goes behind it.
        hub.heartbeat(Bytes::from_static(b":"));
        assert_eq!(dispatch_writing_idle(&hub, 1, &[]).written, 0);
        assert_eq!(reg.rx.try_recv().unwrap().id, 0);
        assert_eq!(reg.rx.try_recv().unwrap().id, 1);
        reg.wrote(1, false, true, 0);
        reg.wrote(2, true, true, 0);
        // The event settles a pending row: the stream's own records do that.
        let pending = ["a".to_owned()];
        assert_eq!(dispatch_writing_idle(&hub, 2, &pending).written, 0);
        assert!(reg.rx.try_recv().unwrap().settles_pending);
        reg.wrote(2, true, true, 0);
        // The socket takes nothing: queued.
        *conn.reply.lock().unwrap() = Some(Wrote::Nothing);
        assert_eq!(dispatch_writing_idle(&hub, 3, &[]).written, 0);
        assert_eq!(reg.rx.try_recv().unwrap().id, 3);
        assert!(conn.frames.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_frame_written_in_part_hands_the_connection_back_and_wakes_the_task() {
        let hub = hub(10, Duration::from_secs(90));
        let mut reg = hub.register(info("a"), CancellationToken::new()).unwrap();
        let conn = Arc::new(Recorder::default());
        reg.attach(conn.clone());
        reg.client.lend();
        *conn.reply.lock().unwrap() = Some(Wrote::Part);
        assert_eq!(dispatch_writing_idle(&hub, 1, &[]).written, 1);
        // An empty frame wakes the task, which writes the rest before anything else.
        let nudge = reg.rx.try_recv().unwrap();
        assert_eq!((nudge.id, nudge.bytes.len()), (0, 0));
        assert_eq!(dispatch_writing_idle(&hub, 2, &[]).written, 0);
        assert_eq!(reg.rx.try_recv().unwrap().id, 2);
    }

    #[test]
    fn a_panic_while_writing_leaves_the_connection_to_the_stream() {
        struct Panics;
        impl LentConnection for Panics {
            fn write_now(&self, _: &Bytes) -> Wrote {
                panic!("a write that fails in a way nobody planned for");
            }
        }
        let hub = hub(10, Duration::from_secs(90));
        let reg = hub.register(info("a"), CancellationToken::new()).unwrap();
        reg.attach(Arc::new(Panics));
        reg.client.lend();
        let dispatched = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            dispatch_writing_idle(&hub, 1, &[])
        }));
        assert!(dispatched.is_err());
        assert!(reg.client.reclaim(), "not left to the dispatcher forever");
    }

    #[test]
    fn a_large_dispatch_to_idle_streams_is_shared_out_and_answers_in_order() {
        let hub = hub(5000, Duration::from_secs(90));
        let conns: Vec<_> = (0..3000)
            .map(|i| {
                let reg = hub.register(info(&format!("u{i}")), CancellationToken::new());
                let reg = reg.unwrap();
                let conn = Arc::new(Recorder::default());
                reg.attach(conn.clone());
                // Every third socket is full.
                if i % 3 == 0 {
                    *conn.reply.lock().unwrap() = Some(Wrote::Nothing);
                }
                reg.client.lend();
                (reg, conn)
            })
            .collect();
        let handed = dispatch_writing_idle(&hub, 1, &[]);
        assert_eq!((handed.streams, handed.written), (3000, 2000));
        for (i, (mut reg, conn)) in conns.into_iter().enumerate() {
            let queued = reg.rx.try_recv().map(|frame| frame.id).ok();
            let written = conn.frames.lock().unwrap().len();
            assert_eq!(
                (queued, written),
                if i % 3 == 0 { (Some(1), 0) } else { (None, 1) }
            );
        }
    }

    #[tokio::test]
    async fn registration_sees_the_cursor_of_the_last_dispatch() {
        let hub = hub(10, Duration::from_secs(90));
        dispatch(&hub, 7, None);
        let reg = hub.register(info("a"), CancellationToken::new()).unwrap();
        assert_eq!(reg.cursor, 7);
    }

    #[tokio::test]
    async fn max_clients_and_streams_per_user_refuse_then_free_a_place_on_drop() {
        let hub = hub(3, Duration::from_secs(90));
        let first = hub.register(info("a"), CancellationToken::new()).unwrap();
        let _second = hub.register(info("a"), CancellationToken::new()).unwrap();
        let refused = hub.register(info("a"), CancellationToken::new());
        assert_eq!(refused.unwrap_err(), RegisterError::UserFull);
        let _other = hub.register(info("b"), CancellationToken::new()).unwrap();
        let full = hub.register(info("c"), CancellationToken::new());
        assert_eq!(full.unwrap_err(), RegisterError::Full);
        drop(first);
        assert!(hub.register(info("a"), CancellationToken::new()).is_ok());
    }

    #[tokio::test(start_paused = true)]
    async fn a_stream_with_data_waiting_and_no_write_for_the_timeout_is_cut_off_as_stale() {
        let hub = hub(10, Duration::from_millis(100));
        let kill = CancellationToken::new();
        let _reg = hub.register(info("a"), kill.clone()).unwrap();
        let _idle = hub.register(info("b"), CancellationToken::new()).unwrap();
        dispatch(&hub, 1, Some(&Filter::user("a")));
        tokio::time::advance(Duration::from_millis(90)).await;
        hub.sweep_stale();
        assert!(
            !kill.is_cancelled(),
            "waiting less than the timeout is fine"
        );

        tokio::time::advance(Duration::from_millis(20)).await;
        hub.sweep_stale();

        assert!(kill.is_cancelled());
        assert_eq!(hub.len(), 1, "an idle stream with nothing waiting stays");
        assert_eq!(hub.metrics().dropped_stale.load(Relaxed), 1);
    }

    #[tokio::test]
    async fn a_full_queue_cuts_the_stream_off() {
        let hub = hub(10, Duration::from_secs(90));
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
                expected_users: &[],
                write_idle: false,
            });
        }
        assert!(kill.is_cancelled());
        assert!(id as usize <= QUEUE_BYTES / big.len() + 1);
        assert!(hub.is_empty());
        assert_eq!(hub.metrics().dropped_slow.load(Relaxed), 1);
    }
}
