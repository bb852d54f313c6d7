//! A small load tool for a running nomey-sse (not a Criterion bench): see BENCHMARKS.md.
//!
//! ```text
//! cargo bench --bench load -- streams --url http://127.0.0.1:8000 --pid <server pid> --streams 10000
//! cargo bench --bench load -- publish --url http://127.0.0.1:8000 --requests 20000 --concurrency 32
//! ```
//!
//! `streams` opens idle streams over raw TCP (so the client costs little), reports the
//! server's resident memory per stream, then times broadcasts until every stream has them.
//! `publish` sends user-targeted events from many tasks and reports rate and latency.
//! `churn` keeps opening and closing streams while broadcasting, then watches the server's
//! memory while it idles. `replay` fills the log with other users' events and times one
//! user's replay (and the log rows it read, from `/metrics`).

use std::{
    collections::HashMap,
    sync::Arc,
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
};

type Error = Box<dyn std::error::Error + Send + Sync>;

#[tokio::main]
async fn main() -> Result<(), Error> {
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
    let url = flags
        .get("url")
        .copied()
        .unwrap_or("http://127.0.0.1:8000")
        .trim_end_matches('/')
        .to_owned();
    let number =
        |name: &str, default: usize| flags.get(name).map_or(Ok(default), |v| v.parse::<usize>());
    match mode.as_str() {
        "streams" => {
            let pid = flags
                .get("pid")
                .ok_or("--pid <server pid> is required")?
                .parse()?;
            streams(&url, pid, number("streams", 10_000)?, number("rounds", 5)?).await
        }
        "publish" => {
            let requests = number("requests", 20_000)?;
            publish(
                &url,
                requests,
                number("concurrency", 32)?,
                number("users", 1000)?,
            )
            .await
        }
        "churn" => {
            let pid = flags
                .get("pid")
                .ok_or("--pid <server pid> is required")?
                .parse()?;
            churn(
                &url,
                pid,
                number("streams", 200)?,
                number("connections", 100_000)?,
                number("idle", 60)?,
            )
            .await
        }
        "bus" => {
            let sub_url = flags.get("sub-url").map_or(url.clone(), |u| u.trim_end_matches('/').to_owned());
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
                number("target", 100)?,
            )
            .await
        }
        _ => Err(
            "usage: load (streams --pid PID [--streams N] | publish [--requests N] | churn --pid PID \
             | replay [--events N]) [--url URL]"
                .into(),
        ),
    }
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

/// One raw SSE client: reports when it is connected, then each time a `bench` event arrives.
/// `opening` is held until the stream is connected, which bounds connects in flight.
async fn idle_stream(
    addr: String,
    user: usize,
    opening: OwnedSemaphorePermit,
    ready: mpsc::Sender<()>,
    seen: mpsc::UnboundedSender<Instant>,
) {
    let mut opening = Some(opening);
    let Ok(mut socket) = TcpStream::connect(&addr).await else {
        eprintln!("connect failed");
        return;
    };
    let request = format!("GET /api/sse?userId=u{user} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
    if socket.write_all(request.as_bytes()).await.is_err() {
        return;
    }
    let mut buf = vec![0u8; 2048];
    let mut carry = Vec::new();
    let mut connected = false;
    loop {
        let Ok(n) = socket.read(&mut buf).await else {
            return;
        };
        if n == 0 {
            return;
        }
        let at = Instant::now();
        carry.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&carry).into_owned();
        if !connected && text.contains("event: connected") {
            connected = true;
            opening.take();
            let _ = ready.send(()).await;
        }
        let markers = text.matches("event: bench").count();
        for _ in 0..markers {
            let _ = seen.send(at);
        }
        if markers > 0 {
            carry.clear();
        } else {
            // Keep a tail, in case a marker straddles two reads.
            carry.drain(..carry.len().saturating_sub(16));
        }
    }
}

async fn streams(url: &str, pid: u32, count: usize, rounds: usize) -> Result<(), Error> {
    let before = resident_kib(pid)?;
    let addr = host_port(url);
    let (ready_tx, mut ready_rx) = mpsc::channel(count);
    let (seen_tx, mut seen_rx) = mpsc::unbounded_channel();
    let opening = Arc::new(Semaphore::new(256));
    let started = Instant::now();
    for user in 0..count {
        let permit = opening.clone().acquire_owned().await?;
        tokio::spawn(idle_stream(
            addr.clone(),
            user,
            permit,
            ready_tx.clone(),
            seen_tx.clone(),
        ));
    }
    for _ in 0..count {
        ready_rx.recv().await.ok_or("a stream failed to connect")?;
    }
    let connect_secs = started.elapsed().as_secs_f64();
    // Let allocations settle before reading memory.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = resident_kib(pid)?;
    println!(
        "streams: {count} opened in {connect_secs:.2} s ({:.0}/s)",
        count as f64 / connect_secs
    );
    println!(
        "server RSS: {before} KiB before, {after} KiB after: {:.1} KiB per idle stream",
        (after.saturating_sub(before)) as f64 / count as f64
    );

    let http = reqwest::Client::new();
    for round in 0..rounds {
        let sent = Instant::now();
        let response = http
            .post(format!("{url}/api/sse/broadcast"))
            .json(&serde_json::json!({ "event": "bench", "data": { "round": round } }))
            .send()
            .await?;
        let accepted = sent.elapsed();
        if !response.status().is_success() {
            return Err(format!("broadcast refused: {}", response.status()).into());
        }
        let mut latencies = Vec::with_capacity(count);
        for _ in 0..count {
            let at = seen_rx.recv().await.ok_or("streams ended")?;
            latencies.push(at.saturating_duration_since(sent));
        }
        latencies.sort();
        println!(
            "broadcast {round}: accepted in {:.1} ms; first stream {:.1} ms, p50 {:.1} ms, p99 {:.1} ms, all {count} {:.1} ms",
            ms(accepted),
            ms(latencies[0]),
            ms(latencies[count / 2]),
            ms(latencies[count * 99 / 100]),
            ms(latencies[count - 1])
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    Ok(())
}

async fn publish(
    url: &str,
    requests: usize,
    concurrency: usize,
    users: usize,
) -> Result<(), Error> {
    let http = reqwest::Client::new();
    let url = format!("{url}/api/sse/notify");
    let per_task = requests / concurrency;
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|task| {
            let (http, url) = (http.clone(), url.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::with_capacity(per_task);
                for n in 0..per_task {
                    let user = (task * per_task + n) % users;
                    let body = serde_json::json!({
                        "filter": { "userId": format!("u{user}") },
                        "event": "notification",
                        "data": { "message": "bench", "n": n },
                    });
                    let sent = Instant::now();
                    let response = http.post(&url).json(&body).send().await?;
                    if response.status() != reqwest::StatusCode::ACCEPTED {
                        return Err(format!("publish refused: {}", response.status()).into());
                    }
                    latencies.push(sent.elapsed());
                }
                Ok::<_, Error>(latencies)
            })
        })
        .collect();
    let mut latencies = Vec::with_capacity(requests);
    for task in tasks {
        latencies.extend(task.await??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort();
    let total = latencies.len();
    println!(
        "publish: {total} user-targeted events from {concurrency} tasks in {elapsed:.2} s: {:.0}/s; p50 {:.2} ms, p99 {:.2} ms",
        total as f64 / elapsed,
        ms(latencies[total / 2]),
        ms(latencies[total * 99 / 100])
    );
    Ok(())
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
