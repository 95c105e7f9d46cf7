//! Multi-region routing (issue 5's results): three regions behind userspace WAN links
//! (2, 30 and 90 ms round trips with jitter — the same relay the tests use), a `nip proxy`
//! in region r1 balancing over one endpoint per region, and closed-loop HTTP/1.1 clients.
//!
//! For `lb: latency`, `lb: round_robin` and static priorities (r1 → r2 → r3, Envoy's
//! spill-over) it measures p50/p99 and each region's share of the traffic in steady state;
//! then, for each policy, how long traffic takes to leave r1 when it slows from 2 to 60 ms
//! and to come back when it recovers (and whether it flaps), and how many requests fail
//! when r1 is black-holed (with and without retries). r1's own latency (clients straight
//! through its link, no proxy) is the yardstick for the steady-state p50.
//!
//! Usage: `nip-bench-regions NIP_BINARY [RESULTS_MD]` (env CLIENTS=8 SECONDS=10
//! DARK_SECONDS=60: the black hole without retries; ONLY=steady: the steady-state table
//! alone, printed, for quick comparisons).
//! Prints a markdown section; with RESULTS_MD, also writes it there between
//! `<!-- multi-region:begin -->` and `<!-- multi-region:end -->`.

#[path = "../../../tests/common/wan.rs"]
#[allow(dead_code)]
mod wan;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use wan::WanLink;

type Failure = Box<dyn std::error::Error + Send + Sync>;

/// Region name, round trip and jitter (ms).
const REGIONS: [(&str, f64, f64); 3] = [("r1", 2.0, 0.5), ("r2", 30.0, 3.0), ("r3", 90.0, 9.0)];

/// How long one client waits for an answer before counting a failure.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);

fn env_number(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// One answered (or failed) request.
#[derive(Debug, Clone, Copy)]
struct Sample {
    done: Instant,
    latency: Duration,
    /// Which region answered; `None`: failed (not 200, or no answer in time).
    region: Option<usize>,
}

/// A backend that names its region in `x-region`.
async fn backend(region: usize) -> Result<SocketAddr, Failure> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |_req: Request<Incoming>| async move {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"ok\n")));
                        response
                            .headers_mut()
                            .insert("x-region", hyper::header::HeaderValue::from(region));
                        Ok::<_, std::convert::Infallible>(response)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(address)
}

/// Closed-loop clients, each on its own keep-alive connection, recording every request.
struct Load {
    stop: Arc<AtomicBool>,
    samples: Arc<Mutex<Vec<Sample>>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Load {
    fn start(target: SocketAddr, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|_| {
                let (stop, samples) = (Arc::clone(&stop), Arc::clone(&samples));
                tokio::spawn(client_loop(target, stop, samples))
            })
            .collect();
        Load {
            stop,
            samples,
            tasks,
        }
    }

    /// The samples so far (and forgets them).
    fn take(&self) -> Vec<Sample> {
        std::mem::take(&mut *self.samples.lock().unwrap_or_else(|p| p.into_inner()))
    }

    async fn stop(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        for task in std::mem::take(&mut self.tasks) {
            let _ = task.await;
        }
        self.take()
    }
}

async fn client_loop(target: SocketAddr, stop: Arc<AtomicBool>, samples: Arc<Mutex<Vec<Sample>>>) {
    while !stop.load(Ordering::Relaxed) {
        let Ok(Ok(stream)) =
            tokio::time::timeout(CLIENT_TIMEOUT, tokio::net::TcpStream::connect(target)).await
        else {
            tokio::time::sleep(Duration::from_millis(10)).await;
            continue;
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut sender, connection)) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream)).await
        else {
            continue;
        };
        tokio::spawn(connection);
        while !stop.load(Ordering::Relaxed) {
            let request = Request::get("/")
                .header("host", "bench")
                .body(Empty::new())
                .expect("a static request");
            let started = Instant::now();
            let answer = tokio::time::timeout(CLIENT_TIMEOUT, async {
                let response = sender.send_request(request).await?;
                let region = response
                    .headers()
                    .get("x-region")
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.parse::<usize>().ok());
                let ok = response.status() == 200;
                response.into_body().collect().await?;
                Ok::<_, hyper::Error>(region.filter(|_| ok))
            })
            .await;
            let (region, keep) = match answer {
                Ok(Ok(region)) => (region, true),
                _ => (None, false),
            };
            let sample = Sample {
                done: Instant::now(),
                latency: started.elapsed(),
                region,
            };
            samples
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push(sample);
            if !keep || sender.ready().await.is_err() {
                break;
            }
        }
    }
}

/// What a set of samples says.
struct Summary {
    p50: Duration,
    p99: Duration,
    shares: [f64; 3],
    total: usize,
    failed: usize,
}

fn summarize(samples: &[Sample]) -> Summary {
    let mut latencies: Vec<Duration> = samples
        .iter()
        .filter(|s| s.region.is_some())
        .map(|s| s.latency)
        .collect();
    latencies.sort();
    let quantile = |q: f64| {
        latencies
            .get(((latencies.len() as f64 * q) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let mut counts = [0usize; 3];
    for region in samples.iter().filter_map(|s| s.region) {
        if let Some(c) = counts.get_mut(region) {
            *c += 1;
        }
    }
    let answered = counts.iter().sum::<usize>().max(1) as f64;
    Summary {
        p50: quantile(0.5),
        p99: quantile(0.99),
        shares: counts.map(|c| c as f64 / answered),
        total: samples.len(),
        failed: samples.iter().filter(|s| s.region.is_none()).count(),
    }
}

/// The share of the answers completed in [start, start + window) that `region` gave;
/// `None` when nothing was answered then.
fn share_in(samples: &[Sample], start: Instant, window: Duration, region: usize) -> Option<f64> {
    let (mut answered, mut hits) = (0usize, 0usize);
    for s in samples
        .iter()
        .filter(|s| s.done >= start && s.done < start + window)
    {
        if let Some(r) = s.region {
            answered += 1;
            hits += usize::from(r == region);
        }
    }
    (answered > 0).then(|| hits as f64 / answered as f64)
}

/// The first 100 ms window from `from` in which at least 90 % of the answers came from
/// `region`, as time since `from`.
fn time_until_share(samples: &[Sample], from: Instant, region: usize) -> Option<Duration> {
    let window = Duration::from_millis(100);
    let end = samples.iter().map(|s| s.done).max()?;
    let mut start = from;
    while start < end {
        if share_in(samples, start, window, region).is_some_and(|share| share >= 0.9) {
            return Some(start + window - from);
        }
        start += window;
    }
    None
}

/// 500 ms windows after `from` in which `region` had under half of the answers.
fn windows_away(samples: &[Sample], from: Instant, region: usize) -> usize {
    let window = Duration::from_millis(500);
    let Some(end) = samples.iter().map(|s| s.done).max() else {
        return 0;
    };
    let mut start = from;
    let mut away = 0;
    while start + window <= end {
        if share_in(samples, start, window, region).is_some_and(|share| share < 0.5) {
            away += 1;
        }
        start += window;
    }
    away
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Latency,
    RoundRobin,
    Priority,
}

impl Policy {
    const ALL: [Policy; 3] = [Policy::Latency, Policy::RoundRobin, Policy::Priority];

    fn name(self) -> &'static str {
        match self {
            Policy::Latency => "`lb: latency`",
            Policy::RoundRobin => "`lb: round_robin`",
            Policy::Priority => "static priority (r1 → r2 → r3)",
        }
    }
}

/// A running `nip proxy` in r1.
struct Proxy {
    child: Child,
    port: u16,
    admin: u16,
    _dir: TempDir,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn free_port() -> Result<u16, Failure> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Proxy {
    /// Starts a proxy for `policy`; `route` adds to the route's flow map.
    async fn start(
        nip: &str,
        links: &[SocketAddr; 3],
        policy: Policy,
        route: &str,
    ) -> Result<Proxy, Failure> {
        let (port, admin) = (free_port()?, free_port()?);
        let endpoints: Vec<String> = links
            .iter()
            .enumerate()
            .map(|(i, address)| {
                let priority = if policy == Policy::Priority { i } else { 0 };
                format!(
                    "{{ address: \"{address}\", region: {}, priority: {priority} }}",
                    REGIONS[i].0
                )
            })
            .collect();
        let lb = if policy == Policy::Latency {
            "latency"
        } else {
            "round_robin"
        };
        let config = format!(
            "node: {{ id: bench-edge-r1, region: r1 }}\nadmin: {{ address: \"127.0.0.1:{admin}\" }}\napi_gateway: {{ address: \"127.0.0.1:{port}\" }}\nservices:\n  web: {{ endpoints: [{}], lb: {lb}, outlier_detection: {{}}, circuit_breakers: {{ max_retries: 64 }} }}\nroutes:\n  - {{ service: web, timeout: 2s{route} }}\n",
            endpoints.join(", ")
        );
        let dir =
            std::env::temp_dir().join(format!("nip-bench-regions-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let dir = TempDir(dir);
        let path = dir.0.join("nip.yaml");
        std::fs::write(&path, config)?;
        let child = Command::new(nip)
            .args(["proxy", "--config"])
            .arg(&path)
            .args(["--threads", "2"])
            .env("NIP_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()?;
        let proxy = Proxy {
            child,
            port,
            admin,
            _dir: dir,
        };
        proxy.wait_ready().await?;
        Ok(proxy)
    }

    async fn wait_ready(&self) -> Result<(), Failure> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if get_status(SocketAddr::from(([127, 0, 0, 1], self.admin)), "/ready").await
                == Some(200)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("the proxy did not become ready in 20 s".into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn address(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }
}

async fn get_status(address: SocketAddr, path: &str) -> Option<u16> {
    let stream = tokio::net::TcpStream::connect(address).await.ok()?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(connection);
    let request = Request::get(path)
        .header("host", "bench")
        .body(Empty::new())
        .ok()?;
    let response = sender.send_request(request).await.ok()?;
    Some(response.status().as_u16())
}

/// Runs load against `target` for `warm` (discarded) then `measure`.
async fn steady(target: SocketAddr, clients: usize, warm: Duration, measure: Duration) -> Summary {
    let load = Load::start(target, clients);
    tokio::time::sleep(warm).await;
    load.take();
    tokio::time::sleep(measure).await;
    summarize(&load.stop().await)
}

/// Time to leave r1 after it slows to 60 ms, time to come back after it recovers, and
/// the half-second windows r1 lost again after coming back.
struct Shift {
    away: Option<Duration>,
    back: Option<Duration>,
    flaps: usize,
}

async fn slowdown(
    nip: &str,
    links: &[WanLink; 3],
    addresses: &[SocketAddr; 3],
    policy: Policy,
    clients: usize,
) -> Result<Shift, Failure> {
    let proxy = Proxy::start(nip, addresses, policy, "").await?;
    let load = Load::start(proxy.address(), clients);
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.take();
    links[0].set_rtt(Duration::from_millis(60));
    let slowed = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during = load.take();
    links[0].set_rtt(Duration::from_millis(2));
    let recovered = Instant::now();
    tokio::time::sleep(Duration::from_secs(40)).await;
    let after = load.stop().await;
    let back = time_until_share(&after, recovered, 0);
    let flaps = back.map_or(0, |b| windows_away(&after, recovered + b, 0));
    Ok(Shift {
        away: time_until_share(&during, slowed, 1),
        back,
        flaps,
    })
}

/// Requests that failed while r1 was black-holed for `seconds`, of all sent.
async fn black_hole(
    nip: &str,
    links: &[WanLink; 3],
    addresses: &[SocketAddr; 3],
    policy: Policy,
    route: &str,
    clients: usize,
    seconds: u64,
) -> Result<(usize, usize), Failure> {
    let proxy = Proxy::start(nip, addresses, policy, route).await?;
    let load = Load::start(proxy.address(), clients);
    tokio::time::sleep(Duration::from_secs(2)).await;
    load.take();
    links[0].black_hole(true);
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let samples = load.stop().await;
    links[0].black_hole(false);
    let summary = summarize(&samples);
    Ok((summary.failed, summary.total))
}

fn percent(part: usize, whole: usize) -> f64 {
    100.0 * part as f64 / whole.max(1) as f64
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Failure> {
    let mut args = std::env::args().skip(1);
    let nip = args
        .next()
        .ok_or("usage: nip-bench-regions NIP_BINARY [RESULTS_MD]")?;
    let results = args.next();
    let clients = env_number("CLIENTS", 8) as usize;
    let seconds = env_number("SECONDS", 10);
    let measure = Duration::from_secs(seconds);

    let mut addresses = Vec::new();
    let mut links = Vec::new();
    for (i, (_, rtt, jitter)) in REGIONS.iter().enumerate() {
        let link = WanLink::start(backend(i).await?, Duration::from_secs_f64(rtt / 1000.0)).await;
        link.set_jitter(Duration::from_secs_f64(jitter / 1000.0));
        addresses.push(link.address);
        links.push(link);
    }
    let addresses: [SocketAddr; 3] = [addresses[0], addresses[1], addresses[2]];
    let links: [WanLink; 3] = match links.try_into() {
        Ok(links) => links,
        Err(_) => return Err("three links".into()),
    };

    let mut lines = vec![
        "## Multi-region routing (issue 5)".to_string(),
        String::new(),
        "<!-- multi-region:begin (generated by bench/multi-region; rerun with bench/run.sh) -->"
            .to_string(),
        format!(
            "Three regions behind userspace WAN links (r1 2 ms ± 0.5, r2 30 ms ± 3, r3 90 ms ± 9 round trip; the relay of tests/common/wan.rs), one endpoint each; `nip proxy` in r1 (node region r1, 2 worker threads, outlier detection on, route timeout 2 s); {clients} closed-loop HTTP/1.1 clients on keep-alive connections, {seconds} s per steady-state run after 1 s of warm-up. Machine: {}.",
            std::env::var("BENCH_MACHINE").unwrap_or_else(|_| "2 cores, loopback".to_string())
        ),
        String::new(),
        "| policy | p50 ms | p99 ms | share r1 / r2 / r3 | requests | failed |".to_string(),
        "|---|---|---|---|---|---|".to_string(),
    ];
    eprintln!("r1 without a proxy…");
    let own = steady(addresses[0], clients, Duration::from_secs(1), measure).await;
    lines.push(format!(
        "| r1's own (clients straight through r1's link, no proxy) | {:.2} | {:.2} | — | {} | {} |",
        ms(own.p50),
        ms(own.p99),
        own.total,
        own.failed
    ));
    let mut latency_p50 = Duration::ZERO;
    let mut pinned_p50 = Duration::ZERO;
    for policy in Policy::ALL {
        eprintln!("steady state, {}…", policy.name());
        let proxy = Proxy::start(&nip, &addresses, policy, "").await?;
        let s = steady(proxy.address(), clients, Duration::from_secs(1), measure).await;
        match policy {
            Policy::Latency => latency_p50 = s.p50,
            Policy::Priority => pinned_p50 = s.p50,
            Policy::RoundRobin => {}
        }
        lines.push(format!(
            "| {} | {:.2} | {:.2} | {:.1} % / {:.1} % / {:.1} % | {} | {} |",
            policy.name(),
            ms(s.p50),
            ms(s.p99),
            100.0 * s.shares[0],
            100.0 * s.shares[1],
            100.0 * s.shares[2],
            s.total,
            s.failed
        ));
    }
    lines.push(String::new());
    let ratio = |a: Duration, b: Duration| a.as_secs_f64() / b.as_secs_f64().max(1e-9);
    lines.push(format!(
        "Steady state (target: p50 within 10 % of the fastest region's own): `lb: latency` p50 is {:.3}× that of the proxy pinned to r1 (static priority: the cost of balancing itself), and {:.2}× r1's own without any proxy (that adds the proxy's own hop, {:.2} ms here).",
        ratio(latency_p50, pinned_p50),
        ratio(latency_p50, own.p50),
        ms(pinned_p50.saturating_sub(own.p50))
    ));
    lines.push(String::new());

    if std::env::var("ONLY").as_deref() == Ok("steady") {
        println!("{}", lines.join("\n"));
        return Ok(());
    }
    lines.push("| event | `lb: latency` | `lb: round_robin` | static priority |".to_string());
    lines.push("|---|---|---|---|".to_string());
    let mut shifts = Vec::new();
    for policy in [Policy::Latency, Policy::Priority] {
        eprintln!("slowdown and recovery, {}…", policy.name());
        shifts.push(slowdown(&nip, &links, &addresses, policy, clients).await?);
    }
    let moved = |s: &Shift| match s.away {
        Some(d) => format!("{:.1} s", d.as_secs_f64()),
        None => "never (5 s watched)".to_string(),
    };
    let returned = |s: &Shift| match (s.away, s.back) {
        (None, _) => "— (never left)".to_string(),
        (Some(_), back) => match back {
            Some(d) => format!(
                "{:.1} s, then {} half-second windows away (flapping)",
                d.as_secs_f64(),
                s.flaps
            ),
            None => "not within 40 s".to_string(),
        },
    };
    // Round robin never prefers a region: a third each, whatever their speed.
    let spread = "— (a third each, always)";
    lines.push(format!(
        "| r1 slows 2 → 60 ms: ≥ 90 % of traffic in r2 after (target ≤ 2 s) | {} | {spread} | {} |",
        moved(&shifts[0]),
        moved(&shifts[1])
    ));
    lines.push(format!(
        "| r1 back to 2 ms: ≥ 90 % of traffic in r1 again after (target ≤ 30 s, no flapping) | {} | {spread} | {} |",
        returned(&shifts[0]),
        returned(&shifts[1])
    ));

    let dark = 20;
    let dark_without_retries = env_number("DARK_SECONDS", 60);
    let retries = ", retries: { on: [5xx], max: 2, per_try_timeout: 300ms }";
    let mut failures = Vec::new();
    for (policy, route, seconds) in [
        (Policy::Latency, retries, dark),
        (Policy::RoundRobin, retries, dark),
        (Policy::Priority, retries, dark),
        (Policy::Latency, "", dark_without_retries),
        (Policy::RoundRobin, "", dark_without_retries),
        (Policy::Priority, "", dark_without_retries),
    ] {
        eprintln!(
            "r1 black-holed, {}{}…",
            policy.name(),
            if route.is_empty() {
                ""
            } else {
                " with retries"
            }
        );
        failures.push(black_hole(&nip, &links, &addresses, policy, route, clients, seconds).await?);
    }
    let failed = |(f, t): (usize, usize)| format!("{f} of {t} ({:.2} %)", percent(f, t));
    lines.push(format!(
        "| r1 black-holed for {dark} s, retries on (5xx/gateway, per-try timeout 300 ms, 2 retries): failed requests (target 0) | {} | {} | {} |",
        failed(failures[0]),
        failed(failures[1]),
        failed(failures[2])
    ));
    lines.push(format!(
        "| r1 black-holed for {dark_without_retries} s, no retries: failed requests (target < 0.1 %) | {} | {} | {} |",
        failed(failures[3]),
        failed(failures[4]),
        failed(failures[5])
    ));
    lines.push(String::new());
    lines.push("Without retries, the tries in flight in r1 when it goes dark cannot be saved (each of the closed-loop clients has one there, answered 504 after the 2 s route timeout); what `latency` adds is that no further request follows them — the silence of the hanging tries moves traffic within its 100 ms grace plus 1.5 × r2's latency, and exploration sends at most one try at a time into the dark region. Round robin and static priority keep sending r1 its share until outlier detection ejects it (5 consecutive failures, after their 2 s timeouts), and again each time the ejection ends.".to_string());
    lines.push("<!-- multi-region:end -->".to_string());
    let section = lines.join("\n");
    println!("{section}");
    if let Some(path) = results {
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let updated = match (
            old.find("## Multi-region routing (issue 5)"),
            old.find("<!-- multi-region:end -->"),
        ) {
            (Some(start), Some(end)) if start < end => format!(
                "{}{}{}",
                &old[..start],
                section,
                &old[end + "<!-- multi-region:end -->".len()..]
            ),
            _ => format!("{}\n\n{section}\n", old.trim_end()),
        };
        std::fs::write(&path, updated)?;
    }
    Ok(())
}
