//! The control plane at scale (issue 4's targets): how long from an apply until 100
//! connected proxies have ACKed it, and how much memory the control plane holds with
//! 1,000 and 10,000 connected ADS streams.
//!
//! It starts a real `nip control-plane` (SQLite store in a temporary directory), connects
//! PROXIES clients built on `nip_xds::client::AdsClient` — the proxy's own xDS client, each
//! its own node and connection, all in this process — and applies ROUNDS changes through
//! the REST API, each moving service `web` to another endpoint. Per round it records when
//! every client had the new set and when the control plane saw all their ACKs (polling
//! `/v1/proxies`). Then it opens more ADS streams (50 per HTTP/2 connection, each
//! subscribing to clusters, listeners, routes and endpoints and ACKing like a proxy) and
//! reads the control plane's RSS from /proc at each level.
//!
//! Usage: `nip-bench-xds NIP_BINARY [RESULTS_MD]` (env PROXIES=100 ROUNDS=30 STREAMS=1000,10000).
//! Prints a markdown section; with RESULTS_MD, also writes it there between
//! `<!-- xds-scale:begin -->` and `<!-- xds-scale:end -->`.

use envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use envoy_types::pb::envoy::service::discovery::v3::aggregated_discovery_service_client::AggregatedDiscoveryServiceClient;
use envoy_types::pb::envoy::service::discovery::v3::DiscoveryRequest;
use nip_xds::client::{AdsClient, ResourceSink};
use nip_xds::resources::{CLUSTER_TYPE, ENDPOINT_TYPE, GATEWAY_ROUTES, LISTENER_TYPE, ROUTE_TYPE};
use nip_xds::ResourceSet;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

type Failure = Box<dyn std::error::Error + Send + Sync>;

fn env_number(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn free_port() -> Result<u16, Failure> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// The desired config of round `round`: `web` points at a port that names the round.
fn desired(round: usize) -> String {
    format!(
        "api_gateway: {{ address: \"127.0.0.1:18080\" }}\nservices:\n  web: {{ endpoints: [\"127.0.0.1:{}\"] }}\n  api: {{ endpoints: [\"127.0.0.1:9001\"] }}\nroutes:\n  - {{ match: {{ path_prefix: /api }}, service: api }}\n  - {{ service: web }}\n",
        20_000 + round
    )
}

/// The port of `web`'s first endpoint in a set.
fn web_port(resources: &ResourceSet) -> Option<u32> {
    use envoy_types::pb::envoy::config::core::v3::address::Address;
    use envoy_types::pb::envoy::config::core::v3::socket_address::PortSpecifier;
    use envoy_types::pb::envoy::config::endpoint::v3::lb_endpoint::HostIdentifier;
    let assignment = resources
        .endpoints
        .iter()
        .find(|a| a.cluster_name == "web")?;
    let endpoint = assignment.endpoints.first()?.lb_endpoints.first()?;
    let Some(HostIdentifier::Endpoint(endpoint)) = &endpoint.host_identifier else {
        return None;
    };
    match endpoint.address.as_ref()?.address.as_ref()? {
        Address::SocketAddress(socket) => match socket.port_specifier {
            Some(PortSpecifier::PortValue(port)) => Some(port),
            _ => None,
        },
        _ => None,
    }
}

/// Reports (client, web port, when) for every set a client applies.
struct Recorder {
    index: usize,
    deliveries: mpsc::UnboundedSender<(usize, u32, Instant)>,
}

impl ResourceSink for Recorder {
    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String> {
        if let Some(port) = web_port(resources) {
            let _ = self.deliveries.send((self.index, port, Instant::now()));
        }
        Ok(())
    }
}

/// The control plane process; killed when dropped.
struct ControlPlane {
    child: Child,
    api: String,
    xds: String,
    /// `Bearer <the admin token the control plane made>`.
    authorization: String,
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControlPlane {
    fn start(nip: &str, store_dir: &std::path::Path) -> Result<ControlPlane, Failure> {
        let (xds_port, api_port) = (free_port()?, free_port()?);
        let token_file = store_dir.join("admin-token");
        let child = Command::new(nip)
            .args(["control-plane", "--store"])
            .arg(format!("sqlite://{}/store.db", store_dir.display()))
            .arg("--admin-token-file")
            .arg(&token_file)
            // Push fan-out is measured without TLS (a thousand clients would each need a
            // certificate first); the cost of mutual TLS is benched on its own.
            .arg("--plaintext")
            .args(["--xds-address", &format!("127.0.0.1:{xds_port}")])
            .args(["--api-address", &format!("127.0.0.1:{api_port}")])
            .env("NIP_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()?;
        let mut control_plane = ControlPlane {
            child,
            api: format!("http://127.0.0.1:{api_port}"),
            xds: format!("http://127.0.0.1:{xds_port}"),
            authorization: String::new(),
        };
        for _ in 0..500 {
            if ureq::get(&format!("{}/v1/openapi.json", control_plane.api))
                .call()
                .is_ok()
            {
                let token = std::fs::read_to_string(&token_file)?;
                control_plane.authorization = format!("Bearer {}", token.trim());
                return Ok(control_plane);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Err("the control plane did not start".into())
    }

    /// Applies a document; its version.
    fn apply(&self, yaml: &str) -> Result<String, Failure> {
        let body = serde_json::json!({ "yaml": yaml }).to_string();
        let mut response = ureq::post(&format!("{}/v1/config", self.api))
            .header("content-type", "application/json")
            .header("authorization", &self.authorization)
            .send(body)?;
        let answer: serde_json::Value =
            serde_json::from_str(&response.body_mut().read_to_string()?)?;
        Ok(answer["revision"]["version"].to_string())
    }

    /// How many proxies run `version`, as the control plane sees their ACKs.
    fn running(&self, version: &str) -> Result<usize, Failure> {
        let mut response = ureq::get(&format!("{}/v1/proxies", self.api))
            .header("authorization", &self.authorization)
            .call()?;
        let proxies: serde_json::Value =
            serde_json::from_str(&response.body_mut().read_to_string()?)?;
        Ok(proxies.as_array().map_or(0, |all| {
            all.iter()
                .filter(|p| p["config_version"] == version)
                .count()
        }))
    }

    fn rss_mib(&self) -> Result<f64, Failure> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .ok_or("no VmRSS")?;
        Ok(kib / 1024.0)
    }
}

fn node(id: String) -> Node {
    Node {
        id,
        locality: Some(Locality {
            region: "bench".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// One ADS stream that subscribes like a proxy and ACKs everything; counts its first
/// response.
async fn hold_stream(
    channel: tonic::transport::Channel,
    id: String,
    answered: Arc<AtomicUsize>,
) -> Result<(), Failure> {
    let mut client = AggregatedDiscoveryServiceClient::new(channel);
    let (tx, rx) = mpsc::channel(8);
    let request = |type_url: &str, names: &[&str], version: &str, nonce: &str| DiscoveryRequest {
        node: Some(node(id.clone())),
        type_url: type_url.to_string(),
        resource_names: names.iter().map(|n| n.to_string()).collect(),
        version_info: version.to_string(),
        response_nonce: nonce.to_string(),
        ..Default::default()
    };
    tx.send(request(CLUSTER_TYPE, &[], "", "")).await?;
    tx.send(request(LISTENER_TYPE, &[], "", "")).await?;
    tx.send(request(ROUTE_TYPE, &[GATEWAY_ROUTES], "", ""))
        .await?;
    tx.send(request(ENDPOINT_TYPE, &["web", "api"], "", ""))
        .await?;
    let mut responses = client
        .stream_aggregated_resources(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let mut first = true;
    while let Some(response) = responses.message().await? {
        if first {
            answered.fetch_add(1, Ordering::Relaxed);
            first = false;
        }
        let names: &[&str] = match response.type_url.as_str() {
            ROUTE_TYPE => &[GATEWAY_ROUTES],
            ENDPOINT_TYPE => &["web", "api"],
            _ => &[],
        };
        tx.send(request(
            &response.type_url,
            names,
            &response.version_info,
            &response.nonce,
        ))
        .await?;
    }
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Result<(), Failure> {
    let mut args = std::env::args().skip(1);
    let nip = args
        .next()
        .ok_or("usage: nip-bench-xds NIP_BINARY [RESULTS_MD]")?;
    let results_md = args.next();
    let proxies = env_number("PROXIES", 100);
    let rounds = env_number("ROUNDS", 30);
    let stream_levels: Vec<usize> = std::env::var("STREAMS")
        .unwrap_or_else(|_| "1000,10000".to_string())
        .split(',')
        .filter_map(|n| n.trim().parse().ok())
        .collect();

    let store = std::env::temp_dir().join(format!("nip-bench-xds-{}", std::process::id()));
    std::fs::create_dir_all(&store)?;
    let control_plane = ControlPlane::start(&nip, &store)?;
    let version = control_plane.apply(&desired(0))?;

    let (deliveries_tx, mut deliveries) = mpsc::unbounded_channel();
    for index in 0..proxies {
        let sink = Recorder {
            index,
            deliveries: deliveries_tx.clone(),
        };
        tokio::spawn(
            AdsClient::new(
                control_plane.xds.clone(),
                node(format!("bench-proxy-{index}")),
                sink,
            )
            .run(),
        );
    }
    let started = Instant::now();
    while control_plane.running(&version)? < proxies {
        if started.elapsed() > Duration::from_secs(60) {
            return Err(
                format!("{proxies} proxies did not all ACK version {version} in 60 s").into(),
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    while deliveries.try_recv().is_ok() {}
    eprintln!(
        "{proxies} proxies connected and ACKed in {:?}",
        started.elapsed()
    );

    let mut all_acked = Vec::new();
    let mut per_proxy = Vec::new();
    for round in 1..=rounds {
        let port = u32::try_from(20_000 + round)?;
        let applied_at = Instant::now();
        let version = control_plane.apply(&desired(round))?;
        let mut seen = vec![false; proxies];
        let mut count = 0;
        while count < proxies {
            let (index, got, at) = tokio::time::timeout(Duration::from_secs(30), deliveries.recv())
                .await?
                .ok_or("clients stopped")?;
            if got == port && !seen[index] {
                seen[index] = true;
                count += 1;
                per_proxy.push(at - applied_at);
            }
        }
        while control_plane.running(&version)? < proxies {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        all_acked.push(applied_at.elapsed());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all_acked.sort();
    per_proxy.sort();

    let mut memory = vec![(proxies, control_plane.rss_mib()?)];
    let answered = Arc::new(AtomicUsize::new(0));
    let finishing = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut opened = 0usize;
    let mut channels = Vec::new();
    for level in stream_levels {
        let extra = level.saturating_sub(proxies);
        while opened < extra {
            if opened % 50 == 0 {
                channels.push(
                    tonic::transport::Endpoint::from_shared(control_plane.xds.clone())?
                        .connect()
                        .await?,
                );
            }
            let channel = channels.last().ok_or("no channel")?.clone();
            let answered = Arc::clone(&answered);
            let id = format!("bench-stream-{opened}");
            let finishing = Arc::clone(&finishing);
            tokio::spawn(async move {
                if let Err(e) = hold_stream(channel, id, answered).await {
                    if !finishing.load(Ordering::Relaxed) {
                        eprintln!("stream ended: {e}");
                    }
                }
            });
            opened += 1;
        }
        let waiting = Instant::now();
        while answered.load(Ordering::Relaxed) < extra {
            if waiting.elapsed() > Duration::from_secs(120) {
                return Err(format!(
                    "only {} of {extra} streams answered",
                    answered.load(Ordering::Relaxed)
                )
                .into());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        memory.push((level, control_plane.rss_mib()?));
        eprintln!("{level} streams: {:.1} MiB", control_plane.rss_mib()?);
    }

    let p99 = percentile(&all_acked, 0.99);
    let latency_verdict = if proxies < 100 {
        "not measured (fewer than 100 proxies)".to_string()
    } else if p99 <= Duration::from_millis(200) {
        format!("met ({})", ms(p99))
    } else {
        format!("missed ({})", ms(p99))
    };
    let memory_verdict = match memory.iter().find(|(streams, _)| *streams >= 10_000) {
        Some((_, mib)) if *mib <= 1024.0 => format!("met ({mib:.0} MiB)"),
        Some((_, mib)) => format!("missed ({mib:.0} MiB)"),
        None => "not measured (fewer than 10,000 streams)".to_string(),
    };
    let mut section = vec![
        "<!-- xds-scale:begin (generated by bench/xds-scale; rerun with bench/run.sh) -->".to_string(),
        "## Control plane at scale".to_string(),
        String::new(),
        format!(
            "`nip control-plane` ({nip}), SQLite store; {proxies} proxies = `nip_xds::client::AdsClient` (the proxy's own xDS client), each its own node and connection, in one process on the same machine. {rounds} applies through the REST API, each moving a service to a new endpoint; then plain ADS streams subscribing to all four types and ACKing, 50 per HTTP/2 connection."
        ),
        String::new(),
        "| | p50 | p99 | max |".to_string(),
        "|---|---|---|---|".to_string(),
        format!(
            "| apply → all {proxies} proxies ACKed, as the control plane sees it ({rounds} rounds) | {} | {} | {} |",
            ms(percentile(&all_acked, 0.5)),
            ms(p99),
            ms(percentile(&all_acked, 1.0))
        ),
        format!(
            "| apply → one proxy has the new set ({} deliveries) | {} | {} | {} |",
            per_proxy.len(),
            ms(percentile(&per_proxy, 0.5)),
            ms(percentile(&per_proxy, 0.99)),
            ms(percentile(&per_proxy, 1.0))
        ),
        String::new(),
        "| connected ADS streams | control-plane RSS |".to_string(),
        "|---|---|".to_string(),
    ];
    for (streams, mib) in &memory {
        section.push(format!("| {streams} | {mib:.1} MiB |"));
    }
    section.push(String::new());
    section.push(format!(
        "Targets: p99 apply → all ACKed ≤ 200 ms for 100 proxies: {latency_verdict}; ≤ 1 GiB at 10,000 streams: {memory_verdict}."
    ));
    section.push("<!-- xds-scale:end -->".to_string());
    let section = section.join("\n");
    println!("{section}");
    if let Some(path) = results_md {
        let old = std::fs::read_to_string(&path).unwrap_or_default();
        let new = match (
            old.find("<!-- xds-scale:begin"),
            old.find("<!-- xds-scale:end -->"),
        ) {
            (Some(begin), Some(end)) => format!(
                "{}{section}{}",
                &old[..begin],
                &old[end + "<!-- xds-scale:end -->".len()..]
            ),
            _ => format!("{}\n\n{section}\n", old.trim_end()),
        };
        std::fs::write(&path, new)?;
    }
    finishing.store(true, Ordering::Relaxed);
    drop(control_plane);
    let _ = std::fs::remove_dir_all(&store);
    Ok(())
}
