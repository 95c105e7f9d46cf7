//! `nip demo` and `nip backend`: small echo backends and the embedded demo config.
//!
//! The demo is the whole product on one machine: two backends, a control plane (SQLite
//! store in a temporary directory, following a desired-config file it writes there), and a
//! proxy whose own config only says who it is and where the control plane is.
//!
//! The backends are real HTTP/1.1 + h2c servers (hyper). Each answers with a JSON echo of
//! what it received — so you can see the headers the proxy added — plus:
//! `/healthz` (200), `/status/NNN` (that status), `/delay/MS` (answer after MS ms).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

/// The most of a request body an echo answer repeats.
const ECHOED_BODY_LIMIT: usize = 1 << 20;

/// Starts the two demo backends on ports chosen by the OS, on their own thread.
pub fn start_backends() -> std::io::Result<Vec<SocketAddr>> {
    let mut listeners = Vec::new();
    for name in ["backend-a", "backend-b"] {
        listeners.push((
            std::net::TcpListener::bind("127.0.0.1:0")?,
            name.to_string(),
        ));
    }
    spawn_backends(listeners)
}

/// Starts echo backends on the given addresses (each named `name`), on their own thread;
/// an address that cannot be bound is the error.
pub fn start_echo_backends(addresses: &[SocketAddr], name: &str) -> std::io::Result<()> {
    let mut listeners = Vec::new();
    for address in addresses {
        let listener = std::net::TcpListener::bind(address).map_err(|e| {
            std::io::Error::new(e.kind(), format!("cannot listen on {address}: {e}"))
        })?;
        listeners.push((listener, name.to_string()));
    }
    spawn_backends(listeners).map(drop)
}

/// Serves each bound listener as an echo backend on a thread of their own.
fn spawn_backends(
    listeners: Vec<(std::net::TcpListener, String)>,
) -> std::io::Result<Vec<SocketAddr>> {
    let mut addresses = Vec::new();
    for (listener, _) in &listeners {
        listener.set_nonblocking(true)?;
        addresses.push(listener.local_addr()?);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("nip-echo-backends".into())
        .spawn(move || {
            runtime.block_on(async move {
                let mut tasks = Vec::new();
                for (listener, name) in listeners {
                    match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => tasks.push(tokio::spawn(serve(listener, name))),
                        Err(e) => eprintln!("echo backend {name}: {e}"),
                    }
                }
                for task in tasks {
                    let _ = task.await;
                }
            });
        })?;
    Ok(addresses)
}

/// Runs one backend in the foreground (`nip backend`).
pub fn serve_backend_blocking(listen: SocketAddr, name: String) -> std::io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(listen).await?;
        eprintln!("nip backend {name} listening on {listen}");
        serve(listener, name).await;
        Ok(())
    })
}

async fn serve(listener: tokio::net::TcpListener, name: String) {
    let name: Arc<str> = name.into();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let name = Arc::clone(&name);
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| answer(req, Arc::clone(&name)));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    name: Arc<str>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let mut status = 200u16;
    if path == "/healthz" {
        return Ok(Response::new(Full::new(Bytes::from_static(b"ok\n"))));
    }
    if let Some(code) = path.strip_prefix("/status/").and_then(|c| c.parse().ok()) {
        status = code;
    }
    if let Some(ms) = path.strip_prefix("/delay/").and_then(|c| c.parse().ok()) {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let header = |n: &str| {
        req.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let mut body = serde_json::json!({
        "backend": name.as_ref(),
        "method": req.method().as_str(),
        "path": req.uri().to_string(),
        "protocol": format!("{:?}", req.version()),
        "x-request-id": header("x-request-id"),
        "x-forwarded-for": header("x-forwarded-for"),
        "x-forwarded-proto": header("x-forwarded-proto"),
        "traceparent": header("traceparent"),
    });
    // Every header and the body as received: what a plugin under development changed.
    let mut headers = serde_json::Map::new();
    for (name, value) in req.headers() {
        headers.insert(
            name.as_str().to_string(),
            String::from_utf8_lossy(value.as_bytes())
                .into_owned()
                .into(),
        );
    }
    body["headers"] = headers.into();
    let received = http_body_util::Limited::new(req.into_body(), ECHOED_BODY_LIMIT)
        .collect()
        .await
        .map(|collected| String::from_utf8_lossy(&collected.to_bytes()).into_owned())
        .unwrap_or_else(|e| format!("(body not read: {e})"));
    body["body"] = received.into();
    let mut response = Response::new(Full::new(Bytes::from(format!("{body:#}\n"))));
    *response.status_mut() = hyper::StatusCode::from_u16(status).unwrap_or(hyper::StatusCode::OK);
    if let Ok(value) = hyper::header::HeaderValue::from_str(&name) {
        response.headers_mut().insert("x-backend", value);
    }
    response.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

/// The demo proxy's node id.
pub const DEMO_NODE: &str = "demo-proxy";

/// The demo proxy's own file: who it is, its admin port, its control plane (mutual TLS:
/// the CA's trust bundle, and the join token that gets it its first certificate).
pub fn proxy_bootstrap(
    admin_port: u16,
    xds_port: u16,
    bundle: &std::path::Path,
    join_token: &std::path::Path,
) -> String {
    format!(
        "node:\n  id: {DEMO_NODE}\n  region: local\nadmin:\n  address: \"127.0.0.1:{admin_port}\"\ncontrol_plane:\n  address: \"127.0.0.1:{xds_port}\"\n  ca_file: \"{}\"\n  join_token_file: \"{}\"\n  stream_access_logs: true\n",
        bundle.display(),
        join_token.display()
    )
}

/// Waits for the demo control plane's admin token, then asks its API for a join token for
/// the demo proxy (as an operator would with `nip token create --role join`) and writes it
/// to `join_token`.
pub fn make_join_token(
    api_port: u16,
    admin_token: &std::path::Path,
    bundle: &std::path::Path,
    join_token: &std::path::Path,
) -> Result<(), String> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let agent = |bundle: &[u8]| -> Result<ureq::Agent, String> {
        let roots: Vec<_> = ureq::tls::parse_pem(bundle)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if roots.is_empty() {
            return Err("the trust bundle is not written yet".into());
        }
        Ok(ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(std::time::Duration::from_secs(5)))
            .tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                    .build(),
            )
            .build()
            .into())
    };
    let body = serde_json::json!({ "name": "demo-proxy-join", "role": "join", "node": DEMO_NODE });
    loop {
        let attempt = std::fs::read(bundle)
            .map_err(|e| e.to_string())
            .and_then(|pem| agent(&pem))
            .and_then(|agent| {
                Ok((
                    agent,
                    std::fs::read_to_string(admin_token).map_err(|e| e.to_string())?,
                ))
            })
            .and_then(|(agent, token)| {
                let mut response = agent
                    .post(&format!("https://127.0.0.1:{api_port}/v1/tokens"))
                    .header("authorization", &format!("Bearer {}", token.trim()))
                    .header("content-type", "application/json")
                    .send(body.to_string())
                    .map_err(|e| e.to_string())?;
                let text = response
                    .body_mut()
                    .read_to_string()
                    .map_err(|e| e.to_string())?;
                let answer: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| e.to_string())?;
                answer["token"]
                    .as_str()
                    .map(str::to_string)
                    .ok_or_else(|| text.clone())
            });
        match attempt {
            Ok(token) => {
                return nip_control_plane::auth::write_private(join_token, &token)
                    .map_err(|e| format!("{}: {e}", join_token.display()))
            }
            Err(e) if std::time::Instant::now() > deadline => {
                return Err(format!("no join token from the demo control plane: {e}"))
            }
            Err(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
        }
    }
}

/// The desired config the demo's control plane serves: the same v4 YAML a user would write.
pub fn desired_config(
    port: u16,
    backends: &[SocketAddr],
    plugin: Option<&std::path::Path>,
) -> String {
    let endpoint = |i: usize| backends.get(i).map(ToString::to_string).unwrap_or_default();
    let (plugins, route_plugins) = match plugin {
        Some(path) => (
            format!(
                "plugins:\n  add-header:\n    source: {{ file: {:?} }}\n    config: \"x-demo-plugin=add-header\"\n",
                path.display().to_string()
            ),
            "    plugins: [add-header]\n",
        ),
        None => (String::new(), ""),
    };
    format!(
        r#"api_gateway:
  address: "127.0.0.1:{port}"
  access_log:
    enabled: true
    format: text
services:
  web:
    endpoints:
      - {{ address: "{a}", region: local, zone: a }}
      - {{ address: "{b}", region: local, zone: b }}
    lb: round_robin
    health_check: {{ path: /healthz, interval: 2s, timeout: 1s }}
  web-a:
    endpoints: ["{a}"]
  web-b:
    endpoints: ["{b}"]
{plugins}routes:
  - name: canary-header
    match: {{ headers: [{{ name: x-canary, exact: "1" }}] }}
    service: web-b
  - name: split
    match: {{ path_prefix: /split }}
    split:
      - {{ service: web-a, weight: 90 }}
      - {{ service: web-b, weight: 10 }}
  - name: default
    match: {{ path_prefix: / }}
    service: web
    timeout: 2s
    retries: {{ on: [connect-failure, 5xx], max: 1 }}
{route_plugins}"#,
        a = endpoint(0),
        b = endpoint(1),
    )
}

/// The demo's ports.
#[derive(Debug, Clone, Copy)]
pub struct DemoPorts {
    /// The proxy's listener.
    pub port: u16,
    /// The proxy's admin server.
    pub admin_port: u16,
    /// The control plane's ADS server.
    pub xds_port: u16,
    /// The control plane's REST API.
    pub api_port: u16,
}

/// Where the demo's parts listen, and where its desired config lives.
pub struct DemoLayout<'a> {
    /// The proxy's listener port.
    pub port: u16,
    /// The proxy's admin port.
    pub admin_port: u16,
    /// The control plane's REST port.
    pub api_port: u16,
    /// The file the control plane follows.
    pub desired: &'a std::path::Path,
    /// The admin token the demo's control plane made.
    pub admin_token_file: &'a std::path::Path,
}

/// Tells the user what to try.
pub fn print_instructions(layout: &DemoLayout<'_>, plugin: bool) {
    let DemoLayout {
        port,
        admin_port,
        api_port,
        desired,
        admin_token_file,
    } = layout;
    let desired = desired.display();
    let token_file = admin_token_file.display();
    let bundle = admin_token_file
        .with_file_name("ca")
        .join("trust-bundle.pem");
    let bundle = bundle.display();
    // The binary as it was started (`./target/debug/nip` from ./dev demo): the hints run as
    // printed, with or without nip on the PATH.
    let nip = std::env::args()
        .next()
        .filter(|argv0| argv0.contains('/'))
        .unwrap_or_else(|| "nip".to_string());
    let cp = if *api_port == 18001 {
        String::new()
    } else {
        format!(" --control-plane https://127.0.0.1:{api_port}")
    };
    let plugin_lines = if plugin {
        format!(
            "  curl -si localhost:{port}/ | grep x-demo-plugin       # header added by the add-header wasm plugin\n  curl -si -H 'x-deny: yes' localhost:{port}/          # 403 answered by the plugin itself\n"
        )
    } else {
        String::new()
    };
    println!(
        r#"
NIP demo: a proxy on 127.0.0.1:{port} in front of two backends (admin on 127.0.0.1:{admin_port}),
fed over xDS by a control plane (REST API on 127.0.0.1:{api_port}) that follows {desired}.
Try:
  curl -s localhost:{port}/hello                       # round robin over backend-a and backend-b
  curl -s -H 'x-canary: 1' localhost:{port}/           # header match: always backend-b
  for i in $(seq 20); do curl -s localhost:{port}/split | grep backend; done   # 90/10 split
  curl -s localhost:{port}/delay/3000                  # 504 after the route's 2s timeout
  curl -s --http2-prior-knowledge localhost:{port}/    # h2c on the same port
{plugin_lines}  curl -s localhost:{admin_port}/metrics | grep nip_requests
  curl -s localhost:{admin_port}/clusters
  curl -s localhost:{admin_port}/config_dump
  export NIP_TOKEN_FILE={token_file} NIP_CA_FILE={bundle}   # admin token, CA
  curl -s --cacert $NIP_CA_FILE -H "Authorization: Bearer $(cat $NIP_TOKEN_FILE)" https://localhost:{api_port}/v1/proxies
  {nip} token create ci --role operator --ttl 30d{cp}    # a token for CI (shown once)
  {nip} get proxies{cp}                                   # the proxy, its region, the version it ACKed
  {nip} apply{cp} -f {desired} -m "my change"   # after editing a copy; or edit the file in place
  {nip} history{cp}  /  {nip} rollback{cp} 1
  {nip} logs --follow{cp}                                 # the proxy's requests as they happen
  {nip} debug --admin 127.0.0.1:{admin_port}                    # console: routes, clusters, tap, plugin logs
Dashboard: https://localhost:{api_port}/dashboard (sign in with the token in $NIP_TOKEN_FILE;
the browser will ask about the demo CA's certificate).
Stop with Ctrl-C.
"#
    );
}
