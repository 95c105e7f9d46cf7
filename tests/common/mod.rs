//! Shared harness for end-to-end tests: real `nip` processes, real HTTP backends, ports
//! chosen by the OS, readiness by polling the admin port (never a fixed sleep).

#![allow(dead_code)]

pub mod control_plane;
pub mod wan;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long a test waits for something that should happen quickly.
pub const DEADLINE: Duration = Duration::from_secs(15);

/// A port that was free a moment ago, for a process the test starts to listen on.
///
/// Ports come from below the kernel's ephemeral range (32768–60999 here), handed out by a
/// counter: a port the OS picked with `bind(:0)` could be taken as the source port of some
/// other test's outgoing connection before the child process binds it (CI saw exactly that
/// — "Address already in use"); below the range nothing takes a port unasked.
pub fn free_port() -> u16 {
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: std::sync::OnceLock<std::sync::atomic::AtomicU32> = std::sync::OnceLock::new();
    let next = NEXT.get_or_init(|| {
        // Spread concurrent test processes apart.
        std::sync::atomic::AtomicU32::new(std::process::id().wrapping_mul(7919) % SPAN)
    });
    for _ in 0..SPAN {
        let port = (FIRST + next.fetch_add(1, Ordering::Relaxed) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between {FIRST} and {}", FIRST + SPAN)
}

/// An address where nothing listens.
pub fn dead_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// What a test backend does, changeable while it runs.
#[derive(Debug)]
pub struct BackendControl {
    /// Name returned in `x-backend`.
    pub name: String,
    /// `/healthz` answers 200 when true, 503 when false.
    pub healthy: AtomicBool,
    /// Status for normal requests.
    pub status: AtomicU16,
    /// Delay before answering, in ms.
    pub delay_ms: AtomicU64,
    /// When set, only this many requests are worked on at once (each for `delay_ms`); the
    /// others queue in arrival order — a backend with a fixed capacity.
    pub workers: Mutex<Option<Arc<tokio::sync::Semaphore>>>,
    /// Normal (non-health) requests served.
    pub requests: AtomicUsize,
    /// Headers of the last normal request.
    pub last_headers: Mutex<HashMap<String, String>>,
    /// HTTP version of the last normal request.
    pub last_version: Mutex<String>,
    /// Body of the last normal request.
    pub last_body: Mutex<Vec<u8>>,
    /// Path and query of the last normal request.
    pub last_target: Mutex<String>,
    /// When set, the backend is an auth service: 200 with `x-user: user-of-<token>` for
    /// `authorization: Bearer <token>`, 401 `bad token` otherwise.
    pub auth_token: Mutex<Option<String>>,
}

/// A running in-process HTTP/1.1 + h2c backend.
pub struct Backend {
    pub address: SocketAddr,
    pub control: Arc<BackendControl>,
}

impl Backend {
    /// Starts a backend on the current tokio runtime.
    pub async fn start(name: &str) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let control = Arc::new(BackendControl {
            name: name.to_string(),
            healthy: AtomicBool::new(true),
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            workers: Mutex::new(None),
            requests: AtomicUsize::new(0),
            last_headers: Mutex::new(HashMap::new()),
            last_version: Mutex::new(String::new()),
            last_body: Mutex::new(Vec::new()),
            last_target: Mutex::new(String::new()),
            auth_token: Mutex::new(None),
        });
        let shared = Arc::clone(&control);
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let control = Arc::clone(&shared);
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| {
                        let control = Arc::clone(&control);
                        async move { Ok::<_, std::convert::Infallible>(answer(req, &control).await) }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Backend { address, control }
    }

    pub fn requests(&self) -> usize {
        self.control.requests.load(Ordering::SeqCst)
    }

    pub fn set_healthy(&self, healthy: bool) {
        self.control.healthy.store(healthy, Ordering::SeqCst);
    }

    pub fn set_status(&self, status: u16) {
        self.control.status.store(status, Ordering::SeqCst);
    }

    /// Serves at most `workers` requests at once; the rest wait their turn.
    pub fn set_workers(&self, workers: usize) {
        *self.control.workers.lock().unwrap() =
            Some(Arc::new(tokio::sync::Semaphore::new(workers)));
    }

    pub fn set_delay(&self, delay: Duration) {
        self.control
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::SeqCst);
    }

    pub fn last_header(&self, name: &str) -> Option<String> {
        self.control.last_headers.lock().unwrap().get(name).cloned()
    }

    /// The path and query of the last request.
    pub fn last_target(&self) -> String {
        self.control.last_target.lock().unwrap().clone()
    }

    pub fn last_body(&self) -> Vec<u8> {
        self.control.last_body.lock().unwrap().clone()
    }

    /// Turns the backend into an auth service accepting `Bearer <token>`.
    pub fn accept_token(&self, token: &str) {
        *self.control.auth_token.lock().unwrap() = Some(token.to_string());
    }
}

async fn answer(req: Request<Incoming>, control: &BackendControl) -> Response<Full<Bytes>> {
    if req.uri().path() == "/healthz" {
        let ok = control.healthy.load(Ordering::SeqCst);
        let mut response = Response::new(Full::new(Bytes::from_static(b"health\n")));
        if !ok {
            *response.status_mut() = hyper::StatusCode::SERVICE_UNAVAILABLE;
        }
        return response;
    }
    control.requests.fetch_add(1, Ordering::SeqCst);
    *control.last_target.lock().unwrap() = req
        .uri()
        .path_and_query()
        .map_or_else(String::new, |p| p.to_string());
    {
        let mut headers = control.last_headers.lock().unwrap();
        headers.clear();
        for (k, v) in req.headers() {
            headers.insert(k.as_str().to_string(), v.to_str().unwrap_or("").to_string());
        }
        *control.last_version.lock().unwrap() = format!("{:?}", req.version());
    }
    let token = control.auth_token.lock().unwrap().clone();
    if let Some(token) = token {
        let presented = req
            .headers()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string();
        return if presented == format!("Bearer {token}") {
            let mut response = Response::new(Full::new(Bytes::from_static(b"ok\n")));
            response
                .headers_mut()
                .insert("x-user", format!("user-of-{token}").parse().unwrap());
            response
        } else {
            let mut response = Response::new(Full::new(Bytes::from_static(b"bad token\n")));
            *response.status_mut() = hyper::StatusCode::UNAUTHORIZED;
            response
        };
    }
    let body = http_body_util::BodyExt::collect(req.into_body())
        .await
        .map(|b| b.to_bytes().to_vec())
        .unwrap_or_default();
    *control.last_body.lock().unwrap() = body;
    let workers = control.workers.lock().unwrap().clone();
    let _worker = match &workers {
        Some(workers) => workers.acquire().await.ok(),
        None => None,
    };
    let delay = control.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    let mut response = Response::new(Full::new(Bytes::from(format!("{}\n", control.name))));
    *response.status_mut() =
        hyper::StatusCode::from_u16(control.status.load(Ordering::SeqCst)).unwrap();
    response
        .headers_mut()
        .insert("x-backend", control.name.parse().unwrap());
    // A header a route may want to hide from clients.
    response
        .headers_mut()
        .insert("x-internal", "backend-only".parse().unwrap());
    response
}

/// Serves `bytes` at every path (a plugin registry for URL sources); counts downloads.
pub async fn serve_bytes(bytes: Vec<u8>) -> (SocketAddr, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let bytes = Bytes::from(bytes);
    let downloads = Arc::new(AtomicUsize::new(0));
    let counter = Arc::clone(&downloads);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (bytes, counter) = (bytes.clone(), Arc::clone(&counter));
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    counter.fetch_add(1, Ordering::SeqCst);
                    let body = Full::new(bytes.clone());
                    async move { Ok::<_, std::convert::Infallible>(Response::new(body)) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (address, downloads)
}

/// What a [`Pages`] backend last got.
#[derive(Debug, Clone, Default)]
pub struct PageRequest {
    pub method: String,
    pub path: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}

/// A backend answering fixed pages by path — `(path, status, content type, body)`, 404
/// elsewhere — that keeps the last request it got.
pub struct Pages {
    pub address: SocketAddr,
    pub last: Arc<Mutex<Option<PageRequest>>>,
    pub hits: Arc<AtomicUsize>,
}

impl Pages {
    pub async fn start(pages: &[(&str, u16, &str, &str)]) -> Pages {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let pages: Arc<Vec<(String, u16, String, String)>> = Arc::new(
            pages
                .iter()
                .map(|(p, s, t, b)| (p.to_string(), *s, t.to_string(), b.to_string()))
                .collect(),
        );
        let last = Arc::new(Mutex::new(None));
        let hits = Arc::new(AtomicUsize::new(0));
        let (seen, count) = (Arc::clone(&last), Arc::clone(&hits));
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (pages, seen, count) =
                    (Arc::clone(&pages), Arc::clone(&seen), Arc::clone(&count));
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                        let (pages, seen, count) =
                            (Arc::clone(&pages), Arc::clone(&seen), Arc::clone(&count));
                        async move {
                            use http_body_util::BodyExt;
                            let (head, body) = request.into_parts();
                            let body = body.collect().await.map(|b| b.to_bytes().to_vec());
                            let path = head.uri.path().to_string();
                            *seen.lock().unwrap() = Some(PageRequest {
                                method: head.method.to_string(),
                                path: head
                                    .uri
                                    .path_and_query()
                                    .map_or(path.clone(), |p| p.to_string()),
                                headers: head
                                    .headers
                                    .iter()
                                    .map(|(n, v)| {
                                        (n.to_string(), v.to_str().unwrap_or("").to_string())
                                    })
                                    .collect(),
                                body: body.unwrap_or_default(),
                            });
                            count.fetch_add(1, Ordering::SeqCst);
                            let page = pages.iter().find(|(p, ..)| *p == path);
                            let response = match page {
                                Some((_, status, content_type, body)) => Response::builder()
                                    .status(*status)
                                    .header("content-type", content_type.as_str())
                                    .body(Full::new(Bytes::from(body.clone()))),
                                None => Response::builder()
                                    .status(404)
                                    .body(Full::new(Bytes::from_static(b"no such page\n"))),
                            };
                            Ok::<_, std::convert::Infallible>(response.unwrap())
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Pages {
            address,
            last,
            hits,
        }
    }

    /// The last request.
    pub fn last(&self) -> PageRequest {
        self.last.lock().unwrap().clone().unwrap_or_default()
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }
}

/// An h2c backend whose responses (of `content_type`, body "with trailers\n") end with
/// trailers (`grpc-status: 0`), like gRPC's.
pub async fn trailer_backend(content_type: &'static str) -> std::net::SocketAddr {
    use bytes::Bytes;
    use http_body_util::StreamBody;
    use hyper::body::Frame;
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| async move {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
                    let frames = vec![
                        Ok::<_, std::convert::Infallible>(Frame::data(Bytes::from_static(
                            b"with trailers\n",
                        ))),
                        Ok(Frame::trailers(trailers)),
                    ];
                    let mut response =
                        hyper::Response::new(StreamBody::new(futures_util::stream::iter(frames)));
                    response
                        .headers_mut()
                        .insert("content-type", http::HeaderValue::from_static(content_type));
                    Ok::<_, std::convert::Infallible>(response)
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    address
}

/// What an HTTP/2 call got, trailers included.
pub struct H2Answer {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
    pub trailers: http::HeaderMap,
}

/// An HTTP/2 (prior knowledge) connection to a proxy's port, for calls whose trailers
/// matter (gRPC's).
pub struct H2Client {
    sender: hyper::client::conn::http2::SendRequest<Full<Bytes>>,
    port: u16,
}

impl H2Client {
    pub async fn connect(port: u16) -> H2Client {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        let (sender, connection) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(connection);
        H2Client { sender, port }
    }

    /// Sends `method path` with `headers` and `body`; the whole answer.
    pub async fn call(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &'static [u8],
    ) -> H2Answer {
        use http_body_util::BodyExt;
        let mut request = Request::builder()
            .method(method)
            .uri(format!("http://127.0.0.1:{}{path}", self.port));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(Full::new(Bytes::from_static(body))).unwrap();
        let response = self.sender.send_request(request).await.unwrap();
        let (head, body) = response.into_parts();
        let body = body.collect().await.unwrap();
        H2Answer {
            status: head.status.as_u16(),
            headers: head.headers,
            trailers: body.trailers().cloned().unwrap_or_default(),
            body: body.to_bytes(),
        }
    }

    /// A gRPC-like call: `POST path` as `application/grpc`, no body.
    pub async fn grpc(&mut self, path: &str) -> H2Answer {
        self.call("POST", path, &[("content-type", "application/grpc")], b"")
            .await
    }
}

/// A backend that answers its first request 503 and every later one 200, keeping the
/// bodies it got.
pub async fn fails_once_backend() -> (std::net::SocketAddr, Arc<std::sync::Mutex<Vec<Vec<u8>>>>) {
    use http_body_util::BodyExt;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    let bodies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = Arc::clone(&bodies);
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let seen = Arc::clone(&seen);
            tokio::spawn(async move {
                let service = hyper::service::service_fn(
                    move |request: hyper::Request<hyper::body::Incoming>| {
                        let seen = Arc::clone(&seen);
                        async move {
                            let body = request.into_body().collect().await.unwrap().to_bytes();
                            let mut seen = seen.lock().unwrap();
                            seen.push(body.to_vec());
                            let status = if seen.len() == 1 { 503 } else { 200 };
                            Ok::<_, std::convert::Infallible>(
                                hyper::Response::builder()
                                    .status(status)
                                    .body(http_body_util::Full::new(bytes::Bytes::new()))
                                    .unwrap(),
                            )
                        }
                    },
                );
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (address, bodies)
}

/// A backend that accepts, reads the request, and closes without answering.
pub async fn resetting_backend() -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let address = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut buf = [0u8; 4096];
                let _ = stream.read(&mut buf).await;
                // Dropping the stream closes it before any response byte.
            });
        }
    });
    address
}

/// A running `nip proxy` process.
pub struct Proxy {
    pub port: u16,
    pub admin_port: u16,
    pub dir: tempfile::TempDir,
    pub config_path: PathBuf,
    pub log_path: PathBuf,
    child: Option<Child>,
}

/// The `nip` binary under test.
pub fn nip_bin() -> &'static str {
    env!("CARGO_BIN_EXE_nip")
}

impl Proxy {
    /// Writes `yaml` (with `{port}` and `{admin}` filled in) and starts a proxy on it,
    /// returning once `/ready` answers 200.
    pub async fn start(yaml: &str) -> Proxy {
        let proxy = Proxy::spawn(yaml);
        proxy.wait_ready().await;
        proxy
    }

    /// Starts without waiting for readiness.
    pub fn spawn(yaml: &str) -> Proxy {
        Proxy::spawn_on(yaml, free_port())
    }

    /// Starts with `{port}` = `port` (for a listener whose address comes from elsewhere,
    /// such as a control plane), without waiting for readiness.
    pub fn spawn_on(yaml: &str, port: u16) -> Proxy {
        Proxy::spawn_limited(yaml, port, None)
    }

    /// Starts with at most `nofile` open descriptors (`ulimit -n`, soft and hard), as on a
    /// host with the usual 1,024; returns once `/ready` answers 200.
    pub async fn start_with_nofile(yaml: &str, nofile: u32) -> Proxy {
        let proxy = Proxy::spawn_limited(yaml, free_port(), Some(nofile));
        proxy.wait_ready().await;
        proxy
    }

    fn spawn_limited(yaml: &str, port: u16, nofile: Option<u32>) -> Proxy {
        let admin_port = free_port();
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("nip.yaml");
        let log_path = dir.path().join("nip.log");
        let yaml = fill(yaml, port, admin_port, dir.path());
        std::fs::write(&config_path, yaml).unwrap();
        let log = std::fs::File::create(&log_path).unwrap();
        let mut command = match nofile {
            // The shell's builtin ulimit, then exec: the limit applies to the proxy itself.
            Some(n) => {
                let mut c = Command::new("sh");
                c.args([
                    "-c",
                    &format!("ulimit -n {n} && exec \"$0\" \"$@\""),
                    nip_bin(),
                ]);
                c
            }
            None => Command::new(nip_bin()),
        };
        let child = command
            .args(["proxy", "--config"])
            .arg(&config_path)
            .args(["--threads", "2", "--drain-timeout", "10s"])
            .env("NIP_LOG", "info")
            // Its own cache: downloads and compiled plugins do not leak between tests.
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start nip proxy");
        Proxy {
            port,
            admin_port,
            dir,
            config_path,
            log_path,
            child: Some(child),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.port, path)
    }

    /// A second `nip proxy` on the same config that takes this one's listening sockets
    /// (`--take-over`), started now; it gets them when this one is sent SIGQUIT.
    pub fn taking_over(&self) -> Proxy {
        let dir = tempfile::tempdir().unwrap();
        let log_path = dir.path().join("nip.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(nip_bin())
            .args(["proxy", "--config"])
            .arg(&self.config_path)
            .args(["--threads", "2", "--drain-timeout", "10s", "--take-over"])
            .env("NIP_LOG", "info")
            .env("XDG_CACHE_HOME", dir.path().join("cache"))
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("start nip proxy --take-over");
        Proxy {
            port: self.port,
            admin_port: self.admin_port,
            config_path: self.config_path.clone(),
            dir,
            log_path,
            child: Some(child),
        }
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{}", self.admin_port, path)
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub async fn wait_ready(&self) {
        let client = client();
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Ok(r) = client.get(self.admin_url("/ready")).send().await {
                if r.status() == 200 {
                    // The admin port comes up before pingora's listener; wait for that too.
                    if tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                        .await
                        .is_ok()
                    {
                        return;
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "proxy not ready within {DEADLINE:?}; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Replaces the config file (atomically, by rename) with `yaml`.
    pub fn rewrite_config(&self, yaml: &str) {
        let tmp = self.dir.path().join("nip.yaml.tmp");
        std::fs::write(
            &tmp,
            fill(yaml, self.port, self.admin_port, self.dir.path()),
        )
        .unwrap();
        std::fs::rename(&tmp, &self.config_path).unwrap();
    }

    pub fn signal(&self, signal: &str) {
        // The shell's builtin `kill`: no dependency on procps being installed.
        let status = Command::new("sh")
            .args(["-c", &format!("kill -{signal} {}", self.pid())])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Waits for the process to exit.
    pub fn wait_exit(&mut self, within: Duration) -> ExitStatus {
        let child = self.child.as_mut().unwrap();
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not exit within {within:?}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The proxy process's resident memory, in KiB.
    pub fn rss_kb(&self) -> u64 {
        self.status_kb("VmRSS:")
    }

    /// Resident heap and stacks only (`RssAnon`): what connections cost, without the pages
    /// of the binary that running new code paths maps in.
    pub fn rss_anon_kb(&self) -> u64 {
        self.status_kb("RssAnon:")
    }

    fn status_kb(&self, field: &str) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("{field} in /proc/PID/status"))
    }

    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        get_json(&self.admin_url(path)).await
    }

    pub async fn metrics(&self) -> String {
        client()
            .get(self.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    /// Polls `/metrics` until a sample has the expected value (requests are counted just
    /// after their response is sent, so a scrape right after a response may be early).
    pub async fn wait_for_sample(&self, name: &str, labels: &[(&str, &str)], expected: f64) {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let value = sample(&self.metrics().await, name, labels);
            if value == expected {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{name}{labels:?} is {value}, expected {expected}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Polls `/config_dump` until its version differs from `old`.
    pub async fn wait_version_change(&self, old: &str) -> String {
        let deadline = Instant::now() + DEADLINE;
        loop {
            let dump = self.admin_json("/config_dump").await;
            let version = dump["version_info"].as_str().unwrap().to_string();
            if version != old {
                return version;
            }
            assert!(
                Instant::now() < deadline,
                "config was not swapped; log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub async fn version(&self) -> String {
        self.admin_json("/config_dump").await["version_info"]
            .as_str()
            .unwrap()
            .to_string()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Fills `{port}`, `{admin}` and `{dir}` (the proxy's own temporary directory).
fn fill(yaml: &str, port: u16, admin: u16, dir: &Path) -> String {
    yaml.replace("{port}", &port.to_string())
        .replace("{admin}", &admin.to_string())
        .replace("{dir}", &dir.display().to_string())
}

/// A plain HTTP client (HTTP/1.1, keep-alive, no system proxy).
/// `GET` of `url`, as JSON.
pub async fn get_json(url: &str) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

pub fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20))
        .build()
        .unwrap()
}

/// Runs a `nip` subcommand to completion.
pub fn run_nip(args: &[&str], config: Option<&Path>) -> std::process::Output {
    let mut command = Command::new(nip_bin());
    command.args(args);
    if let Some(config) = config {
        command.arg(config);
    }
    command.stdin(Stdio::null()).output().unwrap()
}

/// Polls `check` until it returns true.
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + DEADLINE;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Value of one sample in Prometheus text, e.g.
/// `sample(text, "nip_requests_total", &[("route", "r")])`; labels not given are summed.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut total = 0.0;
    for line in text.lines() {
        if line.starts_with('#') {
            continue;
        }
        let (series, value) = match line.rsplit_once(' ') {
            Some(p) => p,
            None => continue,
        };
        let (metric, label_text) = match series.split_once('{') {
            Some((m, rest)) => (m, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        if metric != name {
            continue;
        }
        let all = labels
            .iter()
            .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
        if all {
            total += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    total
}

/// Builds the example plugins (Rust proxy-wasm SDK, wasm32-wasip1) once per test binary and
/// returns the path of `name.wasm`.
pub fn example_plugin(name: &str) -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    let dir = BUILT.get_or_init(|| {
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("filters/examples");
        let status = Command::new(env!("CARGO"))
            .args([
                "build",
                "--release",
                "--target",
                "wasm32-wasip1",
                "--manifest-path",
            ])
            .arg(examples.join("Cargo.toml"))
            .status()
            .expect("run cargo for the example plugins");
        assert!(
            status.success(),
            "building the example plugins failed (./dev test adds wasm32-wasip1)"
        );
        examples.join("target/wasm32-wasip1/release")
    });
    dir.join(format!("{name}.wasm"))
}

/// Builds the C example plugin (Debian clang + wasi-libc; `./dev test` installs them).
pub fn c_plugin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| {
            let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join("c_deny.wasm");
            let script =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("filters/examples/c-deny/build.sh");
            let status = Command::new(&script)
                .arg(&out)
                .status()
                .expect("run filters/examples/c-deny/build.sh");
            assert!(
                status.success(),
                "building the C plugin failed (./dev test installs clang, lld and wasi-libc)"
            );
            out
        })
        .clone()
}

/// Builds the AssemblyScript example plugin with npm (`./dev test` installs node and npm).
pub fn assemblyscript_plugin() -> PathBuf {
    static BUILT: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BUILT
        .get_or_init(|| assemblyscript_example("as-tag", "as_tag.wasm"))
        .clone()
}

/// Builds the Go example in filters/examples/`dir` with the Go SDK (Debian's Go and gRPC
/// packages, offline; ./dev test installs them).
pub fn go_plugin(dir: &str) -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(dir);
    let status = Command::new(root.join("filters/sdk/go/build.sh"))
        .arg(root.join("filters/examples").join(dir))
        .arg(&out)
        .status()
        .expect("run filters/sdk/go/build.sh");
    assert!(
        status.success(),
        "building the Go plugin failed (./dev test installs golang-go, golang-google-grpc-dev, golang-google-protobuf-dev)"
    );
    out
}

/// Builds the AssemblyScript example in filters/examples/`dir` (npm ci once, then asc).
pub fn assemblyscript_example(dir: &str, wasm: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("filters/examples")
        .join(dir);
    let npm = |args: &[&str]| {
        let status = Command::new("npm")
            .args(args)
            .current_dir(&dir)
            .status()
            .expect("run npm (./dev test installs node and npm)");
        assert!(status.success(), "npm {args:?} failed in {}", dir.display());
    };
    if !dir.join("node_modules/.bin/asc").exists() {
        npm(&["ci", "--no-audit", "--no-fund"]);
    }
    npm(&["run", "--silent", "build"]);
    dir.join("build").join(wasm)
}

/// `clients` connections each sending GETs to `url` back to back until stopped, counting
/// every answer that is not a 200 (or no answer) as a failure.
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    failures: Arc<AtomicUsize>,
    /// What the first failure was, for the assertion message.
    pub first_failure: Arc<Mutex<Option<String>>>,
    tasks: Vec<tokio::task::JoinHandle<usize>>,
}

impl SteadyLoad {
    pub fn start(url: &str, clients: usize) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let failures = Arc::new(AtomicUsize::new(0));
        let first_failure = Arc::new(Mutex::new(None));
        let tasks = (0..clients)
            .map(|_| {
                let (url, stop, failures, first) = (
                    url.to_string(),
                    Arc::clone(&stop),
                    Arc::clone(&failures),
                    Arc::clone(&first_failure),
                );
                tokio::spawn(async move {
                    let client = client();
                    let mut sent = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let failure = match client.get(&url).send().await {
                            Ok(r) if r.status() == 200 => None,
                            Ok(r) => Some(format!("status {}", r.status())),
                            Err(e) => Some(format!("{e:?}")),
                        };
                        if let Some(failure) = failure {
                            failures.fetch_add(1, Ordering::SeqCst);
                            first.lock().unwrap().get_or_insert(failure);
                        }
                        sent += 1;
                    }
                    sent
                })
            })
            .collect();
        SteadyLoad {
            stop,
            failures,
            first_failure,
            tasks,
        }
    }

    /// Stops the load; returns (requests sent, failures).
    pub async fn stop(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        let mut sent = 0;
        for task in self.tasks {
            sent += task.await.unwrap();
        }
        (sent, self.failures.load(Ordering::SeqCst))
    }
}

/// The config example `examples/NAME.yaml` ready for [`Proxy::start`]: its listener and
/// admin addresses become the test's ports, and each `(address, backend)` pair points an
/// endpoint of the example at a test backend. The examples stay runnable as written;
/// tests exercise them instead of repeating config preambles.
pub fn example(name: &str, backends: &[(&str, SocketAddr)]) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("examples")
        .join(format!("{name}.yaml"));
    let mut yaml = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .replace("\"127.0.0.1:8080\"", "\"127.0.0.1:{port}\"")
        .replace("\"127.0.0.1:9901\"", "\"127.0.0.1:{admin}\"");
    for (address, backend) in backends {
        assert!(yaml.contains(address), "{name}.yaml has no {address}");
        yaml = yaml.replace(address, &backend.to_string());
    }
    yaml
}

/// Which test module runs now, and how many of its tests.
static TURN: Mutex<(Option<&'static str>, usize)> = Mutex::new((None, 0));
static TURN_CHANGED: std::sync::Condvar = std::sync::Condvar::new();

/// Tests of one module run together (as many as libtest runs at once), never beside
/// another module's: the end-to-end tests are one binary, and timing tests written for
/// their own file's neighbours (a WAN bed's latencies, a crowd's memory, a connection
/// limit) must not share the machine with another file's load. Held for the test's life.
pub struct ModuleTurn;

/// Waits for `module`'s turn (`module_path!()` of the test).
pub fn module_turn(module: &'static str) -> ModuleTurn {
    let mut turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
    while turn.0.is_some_and(|running| running != module) {
        turn = TURN_CHANGED.wait(turn).unwrap_or_else(|p| p.into_inner());
    }
    turn.0 = Some(module);
    turn.1 += 1;
    ModuleTurn
}

impl Drop for ModuleTurn {
    fn drop(&mut self) {
        let mut turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        turn.1 -= 1;
        if turn.1 == 0 {
            turn.0 = None;
            TURN_CHANGED.notify_all();
        }
    }
}

/// A CA made here and a server certificate for `name` it signs, as PEM files in `dir`:
/// `ca.pem`, `server.pem`, `server.key` (readable by every user: the pods' applications
/// run as others). Each has a subject of its own: OpenSSL takes a leaf whose subject is its
/// issuer's for a self-signed certificate.
pub fn ca_and_server_certificate(dir: &Path, name: &str) {
    use std::os::unix::fs::PermissionsExt;
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "NIP test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut leaf = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
    leaf.distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let certificate = leaf.signed_by(&key, &ca, &ca_key).unwrap();
    for (file, pem) in [
        ("ca.pem", ca.pem()),
        ("server.pem", certificate.pem()),
        ("server.key", key.serialize_pem()),
    ] {
        std::fs::write(dir.join(file), pem).unwrap();
        std::fs::set_permissions(dir.join(file), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
}

/// The Python with the independent peers of tests/interop/requirements.txt (grpcio,
/// xds-protos, PyJWT, …).
pub fn python() -> String {
    std::env::var("NIP_TEST_PYTHON").expect(
        "NIP_TEST_PYTHON is not set: run the tests with ./dev test, which makes a virtualenv \
         with tests/interop/requirements.txt, or point it at a Python that has them",
    )
}

pub fn script(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interop")
        .join(name)
}

/// A background process whose output goes to a file; killed when dropped.
pub struct Background {
    child: std::process::Child,
    output: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Background {
    pub fn start(command: &mut std::process::Command) -> Background {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("output");
        let file = std::fs::File::create(&output).unwrap();
        let child = command
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Background {
            child,
            output,
            _dir: dir,
        }
    }

    pub fn python(args: &[&str]) -> Background {
        Background::start(std::process::Command::new(python()).args(args))
    }

    pub fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }

    /// Stops the process now.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub async fn wait_for(&self, text: &str) {
        eventually(&format!("{text:?} in the output"), || async {
            self.output().contains(text)
        })
        .await;
    }

    /// Waits for the process to end; its exit code.
    pub async fn exit_code(&mut self) -> Option<i32> {
        for _ in 0..600 {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code();
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        panic!("still running after 30 s:\n{}", self.output());
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An independent JWT issuer (tests/interop/jwt_issuer.py: PyJWT), and a way to mint
/// tokens from it.
pub struct JwtIssuer {
    pub process: Background,
    pub url: String,
}

impl JwtIssuer {
    pub async fn start() -> JwtIssuer {
        let port = free_port();
        let process =
            Background::python(&[script("jwt_issuer.py").to_str().unwrap(), &port.to_string()]);
        process.wait_for("listening").await;
        JwtIssuer {
            process,
            url: format!("http://127.0.0.1:{port}"),
        }
    }

    pub async fn get(&self, path: &str) -> String {
        client()
            .get(format!("{}{path}", self.url))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    }

    pub async fn token(&self, query: &str) -> String {
        self.get(&format!("/token?{query}")).await
    }
}

/// A Redis server of the test's own (Debian's redis-server, installed by ./dev test).
pub fn redis_server(port: u16) -> Background {
    Background::start(std::process::Command::new("redis-server").args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ]))
}

/// `nip ratelimit` serving `config`'s global limits on `listen`, counting in `redis`.
pub fn rate_limit_service(config: &std::path::Path, redis: u16, listen: u16) -> Background {
    Background::start(std::process::Command::new(nip_bin()).args([
        "ratelimit",
        "--file",
        config.to_str().unwrap(),
        "--redis",
        &format!("127.0.0.1:{redis}"),
        "--listen",
        &format!("127.0.0.1:{listen}"),
    ]))
}
