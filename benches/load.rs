//! A small load tool for a running nomey-sse or nchan (not a Criterion bench): see
//! BENCHMARKS.md.
//!
//! ```text
//! cargo bench --bench load -- streams --url http://127.0.0.1:8000 --pid <server pid> --streams 10000
//! cargo bench --bench load -- streams --target nchan --pid "$(benches/nchan.sh)" --streams 10000
//! cargo bench --bench load -- publish --url http://127.0.0.1:8000 --users 10000 --requests 20000 --concurrency 64
//! ```
//!
//! `--target nomey` (the default, `--url` defaults to `http://127.0.0.1:8000`) or
//! `--target nchan` (nginx's pub/sub module as `benches/nchan.conf` sets it up and
//! `benches/nchan.sh` starts it; `--url` defaults to `http://127.0.0.1:8090`) picks the
//! routes:
//!
//! | | nomey | nchan |
//! |---|---|---|
//! | stream of user `u{n}` | `GET /api/sse?userId=u{n}` | `GET /sub/u{n}` (channels `u{n}` and `all`) |
//! | event for user `u{n}` | `POST /api/sse/notify`, or K at a time to `/api/sse/batch` | `POST /pub/u{n}` |
//! | event for every stream | `POST /api/sse/broadcast` | `POST /pub/all` |
//!
//! Every event's data is `{"bench":[run,n,sent]}`: the run (events left over from another
//! run are ignored), the event's number, and when it was published, in µs since the Unix
//! epoch. Streams find that marker in their raw bytes; the time they read it minus `sent`
//! is the event's publish-to-receive latency (one machine, one clock).
//!
//! `streams` opens idle streams over raw TCP (so the client costs little), reports the
//! server's resident memory per stream, then times broadcasts sent at a steady rate until
//! every stream has each, and a burst of broadcasts sent as fast as they go.
//! `publish` opens one stream per user, then sends user-targeted events and reports their
//! rate, their delivery and both latencies.
//! For nomey only: `churn` keeps opening and closing streams while broadcasting, then
//! watches the server's memory while it idles; `bus` times delivery between two instances;
//! `replay` fills the log with other users' events and times one user's replay (and the
//! log rows it read, from `/metrics`).
//!
//! Streams come from the source addresses 127.0.0.1 to 127.0.0.N in turn (`--sources N`,
//! default 8) when the server is on loopback, so that each address keeps well clear of the
//! ephemeral port range. The tool raises its own open-files limit to the hard limit.

use std::{
    collections::HashMap,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};

type Error = Box<dyn std::error::Error + Send + Sync>;

const USAGE: &str = "usage: load MODE [--target nomey|nchan] [--url URL] [flags]
  streams --pid PID [--streams N] [--rounds N] [--rate PER_S] [--burst N] [--concurrency N] [--sources N] [--connecting N]
  publish [--users N] [--requests N] [--concurrency N] [--rate PER_S] [--batch K (nomey)] [--subscribe 0|1] [--pid PID] [--sources N] [--connecting N]
  churn --pid PID [--streams N] [--connections N] [--idle S]        (nomey)
  bus [--sub-url URL] [--streams N] [--rate PER_S] [--seconds S]    (nomey)
  replay [--events N] [--users N] [--target-events N]               (nomey; also --target N)
  coldstart --binary PATH [--database URL] [--runs N]               (nomey: start to /readyz 200)";

#[tokio::main]
async fn main() {
    if let Err(error) = run().await {
        eprintln!("load: {error}");
        std::process::exit(1);
    }
}

async fn run() -> Result<(), Error> {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let mode = args.first().cloned().unwrap_or_default();
    let flags: HashMap<&str, &str> = args[1.min(args.len())..]
        .chunks(2)
        .filter_map(|pair| {
            Some((
                pair.first()?.trim_start_matches("--"),
                pair.get(1)?.as_str(),
            ))
        })
        .collect();
    let target_flag = flags.get("target").copied().unwrap_or("nomey");
    // `replay --target N` (the number of the target user's events) predates `--target`
    // naming the server, and still works.
    let replay_target = (mode == "replay")
        .then(|| target_flag.parse::<usize>().ok())
        .flatten();
    let target = match target_flag {
        "nomey" => Target::Nomey,
        "nchan" => Target::Nchan,
        _ if replay_target.is_some() => Target::Nomey,
        other => return Err(format!("--target {other}: nomey or nchan\n{USAGE}").into()),
    };
    let url = flags
        .get("url")
        .copied()
        .unwrap_or(target.default_url())
        .trim_end_matches('/')
        .to_owned();
    let number =
        |name: &str, default: usize| flags.get(name).map_or(Ok(default), |v| v.parse::<usize>());
    let real = |name: &str, default: f64| flags.get(name).map_or(Ok(default), |v| v.parse::<f64>());
    let pid = || -> Result<u32, Error> {
        Ok(flags
            .get("pid")
            .ok_or("--pid <server pid> is required")?
            .parse()?)
    };
    let open_files = raise_open_files_limit();
    let setup = || -> Result<Setup, Error> {
        Ok(Setup {
            target,
            server: server_address(&url)?,
            url: url.clone(),
            sources: number("sources", 8)?.clamp(1, 254),
            connecting: number("connecting", 100)?.max(1),
            open_files,
        })
    };
    if target == Target::Nchan && ["churn", "bus", "replay", "coldstart"].contains(&mode.as_str()) {
        return Err(format!("{mode} is for nomey only").into());
    }
    match mode.as_str() {
        "streams" => {
            streams(
                &setup()?,
                pid()?,
                number("streams", 10_000)?,
                Broadcasts {
                    rounds: number("rounds", 5)?,
                    rate: real("rate", 2.0)?,
                    burst: number("burst", 100)?,
                    concurrency: number("concurrency", 1)?.max(1),
                },
            )
            .await
        }
        "publish" => {
            if target == Target::Nchan && number("batch", 1)? != 1 {
                return Err(
                    "--batch is for nomey only: nchan takes one message per request".into(),
                );
            }
            publish(
                &setup()?,
                flags.contains_key("pid").then(pid).transpose()?,
                Publishes {
                    users: number("users", 1000)?.max(1),
                    events: number("requests", 20_000)?,
                    concurrency: number("concurrency", 32)?.max(1),
                    rate: real("rate", 0.0)?,
                    batch: number("batch", 1)?.clamp(1, 1000),
                    subscribe: number("subscribe", 1)? != 0,
                },
            )
            .await
        }
        "churn" => {
            churn(
                &url,
                pid()?,
                number("streams", 200)?,
                number("connections", 100_000)?,
                number("idle", 60)?,
            )
            .await
        }
        "bus" => {
            let sub_url = flags
                .get("sub-url")
                .map_or(url.clone(), |u| u.trim_end_matches('/').to_owned());
            bus(
                &url,
                &sub_url,
                number("streams", 100)?,
                number("rate", 1000)?,
                number("seconds", 10)?,
            )
            .await
        }
        "replay" => {
            replay(
                &url,
                number("events", 100_000)?,
                number("users", 10_000)?,
                replay_target.map_or_else(|| number("target-events", 100), Ok)?,
            )
            .await
        }
        "coldstart" => {
            let binary = flags
                .get("binary")
                .ok_or("--binary <server binary> is required")?;
            let database = flags.get("database").copied().unwrap_or("sqlite::memory:");
            coldstart(binary, database, number("runs", 20)?).await
        }
        _ => Err(USAGE.into()),
    }
}

/// Starts the server binary `runs` times on a free port and times each start until
/// `/readyz` answers 200 (polled every millisecond), then stops it with SIGTERM.
async fn coldstart(binary: &str, database: &str, runs: usize) -> Result<(), Error> {
    let size = std::fs::metadata(binary)?.len();
    let http = reqwest::Client::new();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let started = Instant::now();
        let mut child = tokio::process::Command::new(binary)
            .env("BIND_ADDR", format!("127.0.0.1:{port}"))
            .env("DATABASE_URL", database)
            .env("ENABLE_LOGGING", "false")
            .stdout(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()?;
        let url = format!("http://127.0.0.1:{port}/readyz");
        loop {
            if let Ok(response) = http.get(&url).send().await
                && response.status() == reqwest::StatusCode::OK
            {
                break;
            }
            if started.elapsed() > Duration::from_secs(30) {
                return Err("not ready within 30 s".into());
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        times.push(started.elapsed());
        let pid = child.id().ok_or("the server exited")?;
        std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()?;
        child.wait().await?;
    }
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "coldstart: {binary} ({:.1} MiB) on {database}: {runs} starts to /readyz 200, min {:.1} ms, median {:.1} ms, max {:.1} ms",
        size as f64 / 1_048_576.0,
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
    );
    Ok(())
}

/// The server under test: which routes it has.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Target {
    Nomey,
    Nchan,
}

impl Target {
    fn default_url(self) -> &'static str {
        match self {
            Target::Nomey => "http://127.0.0.1:8000",
            Target::Nchan => "http://127.0.0.1:8090",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Target::Nomey => "nomey-sse",
            Target::Nchan => "nchan",
        }
    }

    /// The request that opens user `u{user}`'s stream.
    fn stream_request(self, host: &str, user: usize) -> String {
        let path = match self {
            Target::Nomey => format!("/api/sse?userId=u{user}"),
            Target::Nchan => format!("/sub/u{user}"),
        };
        format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nAccept: text/event-stream\r\n\r\n")
    }
}

/// What every mode that opens streams needs to know.
struct Setup {
    target: Target,
    url: String,
    server: SocketAddr,
    sources: usize,
    /// Streams connecting at once (a listen backlog smaller than this drops SYNs, which
    /// the kernel retries after a second).
    connecting: usize,
    open_files: u64,
}

impl Setup {
    /// The local addresses streams connect from, in turn: several on loopback, so that
    /// tens of thousands of streams do not exhaust one address's ephemeral ports.
    fn source_addresses(&self) -> Vec<Option<IpAddr>> {
        match self.server.ip() {
            IpAddr::V4(ip) if ip.is_loopback() => (0..self.sources)
                .map(|i| Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1 + i as u8))))
                .collect(),
            _ => vec![None],
        }
    }
}

/// Raises the soft open-files limit to the hard one (each stream is a descriptor) and
/// returns the limit in force.
fn raise_open_files_limit() -> u64 {
    let (soft, hard) = rlimit::Resource::NOFILE.get().unwrap_or((1024, 1024));
    rlimit::increase_nofile_limit(hard).unwrap_or(soft)
}

fn server_address(url: &str) -> Result<SocketAddr, Error> {
    use std::net::ToSocketAddrs;
    host_port(url)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| format!("{url}: no address").into())
}

fn resident_kib(pid: u32) -> Result<u64, Error> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .ok_or("no VmRSS")?;
    Ok(line.split_whitespace().nth(1).ok_or("bad VmRSS")?.parse()?)
}

fn host_port(url: &str) -> String {
    url.trim_start_matches("http://").to_owned()
}

/// What the streams of one run received, by event number.
struct Tally {
    run: u64,
    /// How many streams read each event.
    arrivals: Vec<AtomicU32>,
    /// Each event's shortest and longest publish-to-receive time, in µs.
    fastest: Vec<AtomicU64>,
    slowest: Vec<AtomicU64>,
    /// Deliveries of every event, and when the latest was read (µs since the epoch).
    total: AtomicU64,
    latest: AtomicU64,
    /// Streams that ended after they had connected.
    closed: AtomicUsize,
}

impl Tally {
    fn new(events: usize) -> Self {
        Tally {
            run: unix_micros(),
            arrivals: (0..events).map(|_| AtomicU32::new(0)).collect(),
            fastest: (0..events).map(|_| AtomicU64::new(u64::MAX)).collect(),
            slowest: (0..events).map(|_| AtomicU64::new(0)).collect(),
            total: AtomicU64::new(0),
            latest: AtomicU64::new(0),
            closed: AtomicUsize::new(0),
        }
    }

    fn record(&self, run: u64, n: u64, sent: u64, now: u64) {
        let Some(arrivals) = usize::try_from(n)
            .ok()
            .filter(|_| run == self.run)
            .and_then(|n| self.arrivals.get(n).map(|a| (n, a)))
        else {
            return;
        };
        let (n, arrivals) = arrivals;
        let took = now.saturating_sub(sent);
        arrivals.fetch_add(1, Relaxed);
        self.fastest[n].fetch_min(took, Relaxed);
        self.slowest[n].fetch_max(took, Relaxed);
        self.total.fetch_add(1, Relaxed);
        self.latest.fetch_max(now, Relaxed);
    }

    /// Waits until `done` holds, or until nothing has arrived for `quiet`; says whether
    /// `done` held. The times reported come from the streams, not from this poll.
    async fn settle(&self, quiet: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let mut seen = self.total.load(Relaxed);
        let mut since = Instant::now();
        loop {
            if done(self) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
            let now = self.total.load(Relaxed);
            if now != seen {
                (seen, since) = (now, Instant::now());
            } else if since.elapsed() >= quiet {
                return done(self);
            }
        }
    }
}

/// The marker every published event carries: `"bench":[run,n,sent]`.
const MARKER: &[u8] = b"\"bench\":[";

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Records every marker in one line of a stream.
fn scan(mut line: &[u8], now: u64, tally: &Tally) {
    while let Some(at) = find(line, MARKER) {
        line = &line[at + MARKER.len()..];
        let mut numbers = [0u64; 3];
        let mut whole = true;
        for (i, slot) in numbers.iter_mut().enumerate() {
            let digits = line.iter().take_while(|b| b.is_ascii_digit()).count();
            let after = if i < 2 { b',' } else { b']' };
            match std::str::from_utf8(&line[..digits]).map(str::parse) {
                Ok(Ok(value)) if line.get(digits) == Some(&after) => *slot = value,
                _ => {
                    whole = false;
                    break;
                }
            }
            line = &line[digits + 1..];
        }
        if whole {
            tally.record(numbers[0], numbers[1], numbers[2], now);
        }
    }
}

/// Records the markers in every complete line of `pending`, and keeps the unfinished rest.
fn consume(pending: &mut Vec<u8>, now: u64, tally: &Tally) {
    let mut start = 0;
    while let Some(end) = pending[start..].iter().position(|&b| b == b'\n') {
        let line = &pending[start..start + end];
        // Both servers put the event's data on `data:` lines.
        if line.starts_with(b"data:") {
            scan(line, now, tally);
        }
        start += end + 1;
    }
    pending.drain(..start);
    if pending.len() > 1 << 20 {
        pending.clear();
    }
}

/// How one stream is opened.
struct StreamSpec {
    target: Target,
    server: SocketAddr,
    host: String,
}

/// Connects (from `source`, if given), sends the request and reads until the stream is
/// connected: for nomey its `connected` event, for nchan the `200` response head (nchan
/// has subscribed the stream by then; it follows with a `: hi` comment). Returns the
/// socket and the bytes read after the head.
async fn open_stream(
    spec: &StreamSpec,
    source: Option<IpAddr>,
    user: usize,
) -> Result<(TcpStream, Vec<u8>), String> {
    let socket = if spec.server.is_ipv4() {
        TcpSocket::new_v4()
    } else {
        TcpSocket::new_v6()
    }
    .map_err(|e| format!("socket: {e}"))?;
    if let Some(ip) = source {
        socket
            .bind(SocketAddr::new(ip, 0))
            .map_err(|e| format!("bind {ip}: {e}"))?;
    }
    let mut stream = socket
        .connect(spec.server)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    stream
        .write_all(spec.target.stream_request(&spec.host, user).as_bytes())
        .await
        .map_err(|e| format!("write: {e}"))?;
    let mut got = Vec::with_capacity(512);
    let mut buf = [0u8; 1024];
    let mut body_at = None;
    loop {
        let n = stream
            .read(&mut buf)
            .await
            .map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            let first = got.split(|&b| b == b'\r').next().unwrap_or_default();
            return Err(format!(
                "closed before connected: {}",
                String::from_utf8_lossy(first)
            ));
        }
        got.extend_from_slice(&buf[..n]);
        if body_at.is_none() {
            if let Some(end) = find(&got, b"\r\n\r\n") {
                if !(got.starts_with(b"HTTP/1.1 200 ") || got.starts_with(b"HTTP/1.0 200 ")) {
                    let status = got.split(|&b| b == b'\r').next().unwrap_or_default();
                    return Err(String::from_utf8_lossy(status).into_owned());
                }
                body_at = Some(end + 4);
            } else if got.len() > 16 * 1024 {
                return Err("no end to the response head".into());
            }
        }
        if let Some(at) = body_at
            && (spec.target == Target::Nchan || find(&got[at..], b"event: connected").is_some())
        {
            return Ok((stream, got.split_off(at)));
        }
    }
}

/// One idle stream: reports once whether it connected, then records the events it reads.
/// `opening` is held until then, which bounds connects in flight.
async fn stream(
    spec: Arc<StreamSpec>,
    source: Option<IpAddr>,
    user: usize,
    opening: OwnedSemaphorePermit,
    ready: mpsc::UnboundedSender<Result<(), String>>,
    tally: Arc<Tally>,
) {
    let opened = tokio::time::timeout(Duration::from_secs(30), open_stream(&spec, source, user))
        .await
        .unwrap_or_else(|_| Err("not connected within 30 s".into()));
    drop(opening);
    let (mut socket, mut pending) = match opened {
        Ok(opened) => opened,
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    drop(ready);
    consume(&mut pending, unix_micros(), &tally);
    let mut buf = vec![0u8; 2048];
    while let Ok(n @ 1..) = socket.read(&mut buf).await {
        pending.extend_from_slice(&buf[..n]);
        consume(&mut pending, unix_micros(), &tally);
    }
    tally.closed.fetch_add(1, Relaxed);
}

/// Opens streams for users `u0` to `u{count - 1}`, `--connecting` (100) at once, and
/// waits until all are connected; returns how long that took.
async fn open_streams(setup: &Setup, count: usize, tally: &Arc<Tally>) -> Result<Duration, Error> {
    if count as u64 + 64 > setup.open_files {
        return Err(format!(
            "{count} streams need {} open files; this process may have {}",
            count + 64,
            setup.open_files
        )
        .into());
    }
    let sources = setup.source_addresses();
    let spec = Arc::new(StreamSpec {
        target: setup.target,
        server: setup.server,
        host: host_port(&setup.url),
    });
    let (ready_tx, mut ready_rx) = mpsc::unbounded_channel();
    let opening = Arc::new(Semaphore::new(setup.connecting));
    let started = Instant::now();
    for user in 0..count {
        let permit = opening.clone().acquire_owned().await?;
        tokio::spawn(stream(
            spec.clone(),
            sources[user % sources.len()],
            user,
            permit,
            ready_tx.clone(),
            tally.clone(),
        ));
    }
    drop(ready_tx);
    let mut failures: HashMap<String, usize> = HashMap::new();
    let mut connected = 0;
    while let Some(result) = ready_rx.recv().await {
        match result {
            Ok(()) => connected += 1,
            Err(error) => *failures.entry(error).or_default() += 1,
        }
    }
    let took = started.elapsed();
    if connected < count {
        let reasons: Vec<String> = failures
            .iter()
            .map(|(error, n)| format!("{n} × {error}"))
            .collect();
        return Err(format!(
            "{} of {count} streams did not connect: {}",
            count - connected,
            reasons.join("; ")
        )
        .into());
    }
    Ok(took)
}

/// Publishes events marked for a [`Tally`].
struct Publisher {
    target: Target,
    url: String,
    http: reqwest::Client,
}

impl Publisher {
    fn new(target: Target, url: &str) -> Self {
        Publisher {
            target,
            url: url.to_owned(),
            http: reqwest::Client::new(),
        }
    }

    /// Publishes `events`, each `(number, user)`, to user `u{user}` or (`None`) to every
    /// stream, in one request; returns how many the server says reached no stream.
    async fn send(&self, run: u64, events: &[(usize, Option<usize>)]) -> Result<usize, Error> {
        let sent = unix_micros();
        let data = |n: usize| format!("{{\"bench\":[{run},{n},{sent}]}}");
        let nomey = |&(n, user): &(usize, Option<usize>)| match user {
            Some(user) => format!(
                "{{\"filter\":{{\"userId\":\"u{user}\"}},\"event\":\"bench\",\"data\":{}}}",
                data(n)
            ),
            None => format!("{{\"event\":\"bench\",\"data\":{}}}", data(n)),
        };
        let (path, body) = match (self.target, events) {
            (Target::Nchan, [(n, user)]) => (
                user.map_or("/pub/all".to_owned(), |user| format!("/pub/u{user}")),
                data(*n),
            ),
            (Target::Nchan, _) => return Err("nchan takes one event per request".into()),
            (Target::Nomey, [event @ (_, user)]) => (
                if user.is_some() {
                    "/api/sse/notify"
                } else {
                    "/api/sse/broadcast"
                }
                .to_owned(),
                nomey(event),
            ),
            (Target::Nomey, _) => (
                "/api/sse/batch".to_owned(),
                format!(
                    "{{\"events\":[{}]}}",
                    events.iter().map(nomey).collect::<Vec<_>>().join(",")
                ),
            ),
        };
        let mut request = self
            .http
            .post(format!("{}{path}", self.url))
            .header(reqwest::header::CONTENT_TYPE, "application/json");
        if self.target == Target::Nchan {
            // nchan turns this header into the frame's `event:` line.
            request = request.header("X-EventSource-Event", "bench");
        }
        let response = request.body(body).send().await?;
        let status = response.status().as_u16();
        let answer = response.bytes().await?;
        match (self.target, status) {
            // 201: delivered to subscribers; 202: queued, with no subscriber.
            (Target::Nchan, 201) => Ok(0),
            (Target::Nchan, 202) => Ok(1),
            (Target::Nomey, 202) => Ok(answer
                .windows(13)
                .filter(|w| w == b"\"delivered\":0")
                .count()),
            _ => Err(format!(
                "POST {path}: {status} {}",
                String::from_utf8_lossy(&answer).trim()
            )
            .into()),
        }
    }
}

/// Sends `requests` requests, the events of request `j` given by `events(j)`, from
/// `concurrency` tasks; request `j` is not sent before `j × pace` after the start.
/// Returns each request's time and the events the server said reached no stream.
async fn drive(
    publisher: &Arc<Publisher>,
    run: u64,
    requests: usize,
    concurrency: usize,
    pace: Option<Duration>,
    events: impl Fn(usize) -> Vec<(usize, Option<usize>)> + Send + Sync + 'static,
) -> Result<(Vec<Duration>, usize), Error> {
    let next = Arc::new(AtomicUsize::new(0));
    let events = Arc::new(events);
    let started = tokio::time::Instant::now();
    let tasks: Vec<_> = (0..concurrency.min(requests))
        .map(|_| {
            let (publisher, next, events) = (publisher.clone(), next.clone(), events.clone());
            tokio::spawn(async move {
                let mut took = Vec::new();
                let mut unheard = 0;
                loop {
                    let j = next.fetch_add(1, Relaxed);
                    if j >= requests {
                        return Ok::<_, Error>((took, unheard));
                    }
                    if let Some(pace) = pace {
                        tokio::time::sleep_until(started + pace.mul_f64(j as f64)).await;
                    }
                    let batch = events(j);
                    let sent = Instant::now();
                    unheard += publisher.send(run, &batch).await?;
                    took.push(sent.elapsed());
                }
            })
        })
        .collect();
    let mut took = Vec::with_capacity(requests);
    let mut unheard = 0;
    for task in tasks {
        let (times, none) = task.await??;
        took.extend(times);
        unheard += none;
    }
    took.sort();
    Ok((took, unheard))
}

/// The broadcasts `streams` sends once its streams are open.
struct Broadcasts {
    /// Timed one by one, `rate` a second.
    rounds: usize,
    rate: f64,
    /// Then sent as fast as `concurrency` requests in flight allow.
    burst: usize,
    concurrency: usize,
}

async fn streams(setup: &Setup, pid: u32, count: usize, plan: Broadcasts) -> Result<(), Error> {
    if plan.rounds > 0 && (plan.rate.is_nan() || plan.rate <= 0.0) {
        return Err("--rate (broadcasts a second) must be above 0".into());
    }
    let tally = Arc::new(Tally::new(plan.rounds + plan.burst));
    let before = resident_kib(pid)?;
    let sources = setup.source_addresses().len();
    let took = open_streams(setup, count, &tally).await?.as_secs_f64();
    // Let allocations settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resident_kib(pid)?;
    println!(
        "{}: {count} streams opened from {sources} source address(es) in {took:.2} s ({:.0}/s)",
        setup.target.name(),
        count as f64 / took
    );
    println!(
        "server RSS: {before} KiB before, {after} KiB after: {:.1} KiB per idle stream",
        after.saturating_sub(before) as f64 / count as f64
    );
    let publisher = Arc::new(Publisher::new(setup.target, &setup.url));

    if plan.rounds > 0 {
        let pace = Duration::from_secs_f64(1.0 / plan.rate);
        let (requests, _) = drive(&publisher, tally.run, plan.rounds, 4, Some(pace), |j| {
            vec![(j, None)]
        })
        .await?;
        let rounds = plan.rounds;
        let everywhere = |t: &Tally, n: usize| t.arrivals[n].load(Relaxed) as usize >= count;
        tally
            .settle(Duration::from_secs(5), |t| {
                (0..rounds).all(|n| everywhere(t, n))
            })
            .await;
        let mut last = Vec::new();
        let mut first = Vec::new();
        let mut delivered = 0;
        for n in 0..rounds {
            delivered += tally.arrivals[n].load(Relaxed) as usize;
            if everywhere(&tally, n) {
                last.push(tally.slowest[n].load(Relaxed));
                first.push(tally.fastest[n].load(Relaxed));
            }
        }
        let in_order = last.clone();
        last.sort_unstable();
        first.sort_unstable();
        let incomplete = rounds - last.len();
        println!(
            "broadcast, {rounds} at {}/s: every stream had it after p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms \
             (first stream p50 {:.1} ms); {delivered}/{} delivered{}; request p50 {:.1} ms, max {:.1} ms",
            plan.rate,
            micros_ms(quantile(&last, 0.5)),
            micros_ms(quantile(&last, 0.99)),
            micros_ms(quantile(&last, 1.0)),
            micros_ms(quantile(&first, 0.5)),
            rounds * count,
            if incomplete > 0 {
                format!(", {incomplete} round(s) did not reach every stream")
            } else {
                String::new()
            },
            ms(quantile(&requests, 0.5)),
            ms(quantile(&requests, 1.0)),
        );
        if rounds <= 100 {
            let each: Vec<String> = in_order
                .iter()
                .map(|&t| format!("{:.1}", micros_ms(t)))
                .collect();
            println!("  last stream, round by round (ms): {}", each.join(", "));
        }
    }

    if plan.burst > 0 {
        let (base, burst) = (plan.rounds, plan.burst);
        let before = tally.total.load(Relaxed);
        let began = unix_micros();
        let started = Instant::now();
        let (requests, _) = drive(
            &publisher,
            tally.run,
            burst,
            plan.concurrency,
            None,
            move |j| vec![(base + j, None)],
        )
        .await?;
        let publish_secs = started.elapsed().as_secs_f64();
        let expected = (burst * count) as u64;
        tally
            .settle(Duration::from_secs(5), |t| {
                t.total.load(Relaxed) - before >= expected
            })
            .await;
        let delivered = tally.total.load(Relaxed) - before;
        let span = tally.latest.load(Relaxed).saturating_sub(began) as f64 / 1e6;
        println!(
            "burst: {burst} broadcasts from {} request(s) in flight, published in {publish_secs:.2} s ({:.0}/s, \
             request p50 {:.1} ms, p99 {:.1} ms); {delivered}/{expected} delivered within {span:.2} s: {:.0} events/s",
            plan.concurrency,
            burst as f64 / publish_secs,
            ms(quantile(&requests, 0.5)),
            ms(quantile(&requests, 0.99)),
            delivered as f64 / span.max(1e-6),
        );
    }
    let closed = tally.closed.load(Relaxed);
    if closed > 0 {
        println!("{closed} streams were closed by the server");
    }
    Ok(())
}

/// The events `publish` sends.
struct Publishes {
    /// Users `u0`.. each with one stream (unless `subscribe` is off); event `n` is for
    /// user `n % users`.
    users: usize,
    events: usize,
    /// Requests in flight; `rate` events a second when above 0, else as fast as they go.
    concurrency: usize,
    rate: f64,
    /// Events per request (nomey's `/api/sse/batch` when above 1).
    batch: usize,
    subscribe: bool,
}

async fn publish(setup: &Setup, pid: Option<u32>, plan: Publishes) -> Result<(), Error> {
    let Publishes {
        users,
        events,
        concurrency,
        rate,
        batch,
        subscribe,
    } = plan;
    let tally = Arc::new(Tally::new(events));
    if subscribe {
        let took = open_streams(setup, users, &tally).await?.as_secs_f64();
        println!(
            "{}: {users} streams opened in {took:.2} s ({:.0}/s)",
            setup.target.name(),
            users as f64 / took
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let rss_before = pid.map(resident_kib).transpose()?;
    let publisher = Arc::new(Publisher::new(setup.target, &setup.url));
    let requests = events.div_ceil(batch);
    let pace = (rate > 0.0).then(|| Duration::from_secs_f64(batch as f64 / rate));
    let started = Instant::now();
    let (took, unheard) = drive(
        &publisher,
        tally.run,
        requests,
        concurrency,
        pace,
        move |j| {
            (j * batch..((j + 1) * batch).min(events))
                .map(|n| (n, Some(n % users)))
                .collect()
        },
    )
    .await?;
    let publish_secs = started.elapsed().as_secs_f64();
    println!(
        "publish: {events} events to {users} users{}, {} per request, {concurrency} request(s) in flight, {}: \
         {publish_secs:.2} s, {:.0} events/s ({:.0} requests/s); request p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        if subscribe {
            " (one stream each)"
        } else {
            " without streams"
        },
        batch,
        if rate > 0.0 {
            format!("paced at {rate}/s")
        } else {
            "unpaced".to_owned()
        },
        events as f64 / publish_secs,
        requests as f64 / publish_secs,
        ms(quantile(&took, 0.5)),
        ms(quantile(&took, 0.99)),
        ms(quantile(&took, 1.0)),
    );
    if subscribe {
        tally
            .settle(Duration::from_secs(5), |t| {
                t.total.load(Relaxed) >= events as u64
            })
            .await;
        let mut latencies = Vec::with_capacity(events);
        let mut repeats = 0;
        for n in 0..events {
            let arrivals = tally.arrivals[n].load(Relaxed);
            if arrivals > 0 {
                latencies.push(tally.slowest[n].load(Relaxed));
                repeats += arrivals as usize - 1;
            }
        }
        latencies.sort_unstable();
        println!(
            "delivered {}/{events}{}{}; publish to receive p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
            latencies.len(),
            if repeats > 0 {
                format!(" ({repeats} more than once)")
            } else {
                String::new()
            },
            if unheard > 0 {
                format!(", {unheard} reported by the server as reaching no stream")
            } else {
                String::new()
            },
            micros_ms(quantile(&latencies, 0.5)),
            micros_ms(quantile(&latencies, 0.99)),
            micros_ms(quantile(&latencies, 1.0)),
        );
    }
    if let (Some(pid), Some(before)) = (pid, rss_before) {
        println!(
            "server RSS: {before} KiB before publishing, {} KiB after",
            resident_kib(pid)?
        );
    }
    let closed = tally.closed.load(Relaxed);
    if closed > 0 {
        println!("{closed} streams were closed by the server");
    }
    Ok(())
}

/// The value at quantile `q` of sorted values (the nearest rank below), or the default
/// for none.
fn quantile<T: Copy + Default>(sorted: &[T], q: f64) -> T {
    sorted
        .get(((sorted.len().max(1) - 1) as f64 * q) as usize)
        .copied()
        .unwrap_or_default()
}

fn micros_ms(micros: u64) -> f64 {
    micros as f64 / 1000.0
}

fn unix_micros() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_micros() as u64
}

/// A stream that reports, for each `bus` event, how long after its `sent` stamp it came.
async fn timed_stream(
    addr: String,
    user: usize,
    ready: mpsc::Sender<()>,
    seen: mpsc::UnboundedSender<u64>,
) {
    let Ok(mut socket) = TcpStream::connect(&addr).await else {
        return;
    };
    let request = format!("GET /api/sse?userId=b{user} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    if socket.write_all(request.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 8192];
    let mut carry = String::new();
    let mut connected = false;
    while let Ok(n) = socket.read(&mut buf).await {
        if n == 0 {
            return;
        }
        let now = unix_micros();
        carry.push_str(&String::from_utf8_lossy(&buf[..n]));
        if !connected && carry.contains("event: connected") {
            connected = true;
            let _ = ready.send(()).await;
        }
        while let Some(at) = carry.find("\"sent\":") {
            let rest = &carry[at + 7..];
            let end = rest
                .find(|c: char| !c.is_ascii_digit())
                .unwrap_or(rest.len());
            if end == rest.len() {
                break;
            }
            if let Ok(sent) = rest[..end].parse::<u64>() {
                let _ = seen.send(now.saturating_sub(sent));
            }
            carry.drain(..at + 7 + end);
        }
        if carry.len() > 4096 {
            carry.drain(..carry.len() - 64);
        }
    }
}

/// Streams on one instance (`sub_url`), user-targeted publishes to another (`url`): the
/// publish-to-receive latency through the bus, at a steady rate (or as fast as 32
/// publishers go, with `--rate 0`).
async fn bus(
    url: &str,
    sub_url: &str,
    streams: usize,
    rate: usize,
    seconds: usize,
) -> Result<(), Error> {
    let addr = host_port(sub_url);
    let (ready_tx, mut ready_rx) = mpsc::channel(streams);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    for user in 0..streams {
        tokio::spawn(timed_stream(
            addr.clone(),
            user,
            ready_tx.clone(),
            seen_tx.clone(),
        ));
    }
    for _ in 0..streams {
        ready_rx.recv().await.ok_or("a stream failed to connect")?;
    }
    let http = reqwest::Client::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds as u64);
    let sent = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let publishers = if rate == 0 { 32 } else { 4 };
    let tasks: Vec<_> = (0..publishers)
        .map(|task| {
            let (http, url, sent) = (http.clone(), format!("{url}/api/sse/notify"), sent.clone());
            tokio::spawn(async move {
                let mut n = task;
                let mut ticks = (rate > 0).then(|| {
                    let mut t = tokio::time::interval(Duration::from_secs_f64(
                        publishers as f64 / rate as f64,
                    ));
                    t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                    t
                });
                while Instant::now() < deadline {
                    if let Some(ticks) = &mut ticks {
                        ticks.tick().await;
                    }
                    let body = serde_json::json!({
                        "filter": { "userId": format!("b{}", n % streams) },
                        "event": "bus",
                        "data": { "sent": unix_micros() },
                    });
                    let response = http.post(&url).json(&body).send().await?;
                    if response.status() != reqwest::StatusCode::ACCEPTED {
                        return Err::<(), Error>(
                            format!("publish refused: {}", response.status()).into(),
                        );
                    }
                    sent.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    n += publishers;
                }
                Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    let published = sent.load(std::sync::atomic::Ordering::Relaxed);
    let publish_secs = started.elapsed().as_secs_f64();
    let mut latencies = Vec::with_capacity(published);
    while latencies.len() < published {
        match tokio::time::timeout(Duration::from_secs(5), seen_rx.recv()).await {
            Ok(Some(micros)) => latencies.push(micros),
            _ => break,
        }
    }
    latencies.sort_unstable();
    let at = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1000.0
    };
    println!(
        "bus: {published} events published to {url} in {publish_secs:.1} s ({:.0}/s), {} received on {sub_url}; latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        published as f64 / publish_secs,
        latencies.len(),
        at(0.5),
        at(0.99),
        at(1.0)
    );
    Ok(())
}

/// Opens a stream, reads until `connected`, closes it.
async fn open_and_close(addr: &str, user: usize) -> Result<(), Error> {
    let mut socket = TcpStream::connect(addr).await?;
    let request = format!("GET /api/sse?userId=c{user} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    socket.write_all(request.as_bytes()).await?;
    let mut buf = vec![0u8; 4096];
    let mut text = Vec::new();
    while !String::from_utf8_lossy(&text).contains("event: connected") {
        let n = socket.read(&mut buf).await?;
        if n == 0 {
            return Err("closed before connected".into());
        }
        text.extend_from_slice(&buf[..n]);
    }
    Ok(())
}

async fn churn(
    url: &str,
    pid: u32,
    streams: usize,
    connections: usize,
    idle_secs: usize,
) -> Result<(), Error> {
    let start = resident_kib(pid)?;
    let addr = host_port(url);
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let publisher = {
        let (url, done) = (url.to_owned(), done.clone());
        tokio::spawn(async move {
            let http = reqwest::Client::new();
            let mut sent = 0u64;
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let body = serde_json::json!({ "event": "churn", "data": { "n": sent } });
                let _ = http
                    .post(format!("{url}/api/sse/broadcast"))
                    .json(&body)
                    .send()
                    .await;
                sent += 1;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            sent
        })
    };
    let started = Instant::now();
    let per_task = connections / streams;
    let mut peak = start;
    let tasks: Vec<_> = (0..streams)
        .map(|task| {
            let addr = addr.clone();
            tokio::spawn(async move {
                let mut failed = 0;
                for n in 0..per_task {
                    if open_and_close(&addr, (n * streams + task) % 1000)
                        .await
                        .is_err()
                    {
                        failed += 1;
                    }
                }
                failed
            })
        })
        .collect();
    let mut failed = 0;
    for task in tasks {
        while !task.is_finished() {
            tokio::time::sleep(Duration::from_millis(500)).await;
            peak = peak.max(resident_kib(pid)?);
        }
        failed += task.await?;
    }
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let published = publisher.await?;
    let secs = started.elapsed().as_secs_f64();
    let total = per_task * streams;
    println!(
        "churn: {total} connections ({failed} failed) by {streams} clients in {secs:.1} s ({:.0}/s), {published} broadcasts",
        total as f64 / secs
    );
    println!("server RSS: {start} KiB at start, {peak} KiB at the peak");
    for waited in (10..=idle_secs).step_by(10) {
        tokio::time::sleep(Duration::from_secs(10)).await;
        println!("  idle {waited} s: {} KiB", resident_kib(pid)?);
    }
    Ok(())
}

async fn metric(http: &reqwest::Client, url: &str, name: &str) -> Result<Option<u64>, Error> {
    let text = http
        .get(format!("{url}/metrics"))
        .send()
        .await?
        .text()
        .await?;
    Ok(text
        .lines()
        .find_map(|l| l.strip_prefix(name)?.trim().parse().ok()))
}

async fn replay(url: &str, events: usize, users: usize, target: usize) -> Result<(), Error> {
    let http = reqwest::Client::new();
    let every = events / target;
    let started = Instant::now();
    let tasks: Vec<_> = (0..64)
        .map(|task| {
            let (http, url) = (http.clone(), url.to_owned());
            tokio::spawn(async move {
                for n in (task..events).step_by(64) {
                    // One event in `every` is the target user's, the rest other users'.
                    let user = if n % every == 0 {
                        "target".to_owned()
                    } else {
                        format!("u{}", n % users)
                    };
                    let body = serde_json::json!({
                        "filter": { "userId": user }, "event": "n", "data": { "n": n },
                    });
                    let response = http
                        .post(format!("{url}/api/sse/notify"))
                        .json(&body)
                        .send()
                        .await?;
                    if response.status() != reqwest::StatusCode::ACCEPTED {
                        return Err::<(), Error>(
                            format!("publish refused: {}", response.status()).into(),
                        );
                    }
                }
                Ok(())
            })
        })
        .collect();
    for task in tasks {
        task.await??;
    }
    println!(
        "replay: stored {events} events ({target} for the target user, the rest for {users} others) in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let rows_metric = "nomey_sse_history_rows_read_total";
    for round in 0..3 {
        let rows_before = metric(&http, url, rows_metric).await?;
        let sent = Instant::now();
        let mut response = http
            .get(format!("{url}/api/sse?userId=target&lastEventId=0"))
            .send()
            .await?;
        let mut seen = 0;
        let mut text = String::new();
        while seen < target {
            let chunk = response.chunk().await?.ok_or("the stream ended")?;
            text.push_str(&String::from_utf8_lossy(&chunk));
            seen = text.matches("\nid: ").count() + usize::from(text.starts_with("id: "));
        }
        let took = sent.elapsed();
        drop(response);
        let rows = match (rows_before, metric(&http, url, rows_metric).await?) {
            (Some(before), Some(after)) => format!("{} log rows read", after - before),
            _ => "rows read not reported by this server".to_owned(),
        };
        println!(
            "replay {round}: {target} events in {:.1} ms; {rows}",
            ms(took)
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
