//! Transparent interception in network namespaces with real iptables (nft and legacy):
//! `nip iptables setup` sends an application's outbound TCP to the proxy's port with its
//! original destination readable (SO_ORIGINAL_DST), leaves the proxy's own traffic, loopback
//! and excluded ports alone, and `cleanup` restores direct traffic.
//!
//! Needs root and network namespaces; where the kernel forbids them the test says so and
//! passes without running.

use crate::common::control_plane::{stderr, ControlPlane};
use crate::common::*;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};

/// A Python any UID can run (the stand-ins use only its standard library): the system's,
/// else the test virtualenv's.
fn python() -> String {
    if std::path::Path::new("/usr/bin/python3").is_file() {
        return "/usr/bin/python3".to_string();
    }
    std::env::var("NIP_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

fn script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/interception")
        .join(name)
}

/// A network namespace of its own (loopback up, and a veth pair whose one end holds
/// 10.99.0.1/24 and fd00:99::1/64, so those networks are routable and nobody answers
/// there), deleted when dropped.
struct Namespace {
    name: String,
}

/// Runs `ip ARGS`; panics unless it succeeds.
fn ip(args: &[&str]) {
    let status = Command::new("ip").args(args).status().expect("ip");
    assert!(status.success(), "ip {args:?}");
}

impl Namespace {
    /// A namespace of its own with nothing set up in it; `None`, saying so, where the
    /// kernel forbids network namespaces.
    fn bare(tag: &str) -> Option<Namespace> {
        let name = format!("nip-{tag}-{}", std::process::id());
        let made = Command::new("ip")
            .args(["netns", "add", &name])
            .output()
            .ok()?;
        if !made.status.success() {
            eprintln!(
                "SKIPPED: cannot create a network namespace here ({})",
                String::from_utf8_lossy(&made.stderr).trim()
            );
            return None;
        }
        Some(Namespace { name })
    }

    fn create(tag: &str) -> Option<Namespace> {
        let namespace = Namespace::bare(tag)?;
        for args in [
            vec!["link", "set", "lo", "up"],
            vec!["link", "add", "v0", "type", "veth", "peer", "name", "v1"],
            vec!["addr", "add", "10.99.0.1/24", "dev", "v0"],
            vec!["-6", "addr", "add", "fd00:99::1/64", "dev", "v0", "nodad"],
            vec!["link", "set", "v0", "up"],
            vec!["link", "set", "v1", "up"],
        ] {
            let status = Command::new("ip")
                .args(["-n", &namespace.name])
                .args(&args)
                .status()
                .expect("ip");
            assert!(status.success(), "ip {args:?}");
        }
        Some(namespace)
    }

    /// A command run inside the namespace.
    fn command(&self, program: &str) -> Command {
        let mut command = Command::new("ip");
        command.args(["netns", "exec", &self.name, program]);
        command
    }

    /// `nip iptables ARGS` inside the namespace; panics unless it succeeds.
    fn nip_iptables(&self, args: &[&str]) {
        let output = self
            .command(nip_bin())
            .arg("iptables")
            .args(args)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "nip iptables {args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// What an application connecting to `address:port` as `uid` gets: `captured`, or
    /// `unreached`.
    fn connect_as(&self, uid: u32, address: &str, port: u16) -> String {
        let output = self
            .command("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_string(),
            ])
            .arg(python())
            .arg(script("connect.py"))
            .args([address, &port.to_string()])
            .output()
            .unwrap();
        let answer = String::from_utf8_lossy(&output.stdout).trim().to_string();
        if answer.is_empty() {
            // Say why (a Python the UID cannot run, …) rather than an empty answer.
            return format!("no answer: {}", String::from_utf8_lossy(&output.stderr));
        }
        answer
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// The stand-in proxy listener, killed when dropped.
struct Capture {
    child: Child,
    output: PathBuf,
    _dir: tempfile::TempDir,
}

impl Capture {
    async fn start(namespace: &Namespace, port: u16) -> Capture {
        let dir = tempfile::tempdir().unwrap();
        let output = dir.path().join("output");
        let file = std::fs::File::create(&output).unwrap();
        let child = namespace
            .command(&python())
            .arg(script("capture.py"))
            .arg(port.to_string())
            .stdout(file)
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let capture = Capture {
            child,
            output,
            _dir: dir,
        };
        eventually("the capture listener is up", || async {
            capture.seen().contains("listening")
        })
        .await;
        capture
    }

    fn seen(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }
}

impl Drop for Capture {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_applications_outbound_tcp_goes_to_the_proxy_with_its_destination_and_cleanup_undoes_it()
{
    let _turn = crate::common::module_turn(module_path!());
    for binary in ["iptables-nft", "iptables-legacy"] {
        let Some(namespace) = Namespace::create(&binary[9..]) else {
            return;
        };
        const PROXY_UID: u32 = 1337;
        const APP_UID: u32 = 1000;
        let capture = Capture::start(&namespace, 15001).await;
        // Before: the application's connection goes where it was sent (nowhere here).
        assert_eq!(namespace.connect_as(APP_UID, "10.99.0.2", 80), "unreached");

        namespace.nip_iptables(&[
            "setup",
            "--iptables",
            binary,
            "--ipv6",
            "--proxy-uid",
            &PROXY_UID.to_string(),
            "--outbound-ports-exclude",
            "5432",
        ]);
        // The application's connection reaches the proxy's port, which reads where it was
        // going.
        assert_eq!(
            namespace.connect_as(APP_UID, "10.99.0.2", 80),
            "captured",
            "{binary}"
        );
        assert!(
            capture.seen().contains("original 10.99.0.2:80"),
            "{binary}: {}",
            capture.seen()
        );
        // IPv6 too (ip6tables, IP6T_SO_ORIGINAL_DST).
        assert_eq!(
            namespace.connect_as(APP_UID, "fd00:99::2", 80),
            "captured",
            "{binary} IPv6"
        );
        assert!(
            capture.seen().contains("original [fd00:99::2]:80"),
            "{binary}: {}",
            capture.seen()
        );
        // The proxy's own connections and excluded ports are left alone (no loop).
        assert_eq!(
            namespace.connect_as(PROXY_UID, "10.99.0.2", 80),
            "unreached",
            "{binary}: the proxy's UID"
        );
        assert_eq!(
            namespace.connect_as(APP_UID, "10.99.0.2", 5432),
            "unreached",
            "{binary}: an excluded port"
        );

        // Cleanup restores direct traffic, and running it twice is fine.
        namespace.nip_iptables(&["cleanup", "--iptables", binary, "--ipv6"]);
        namespace.nip_iptables(&["cleanup", "--iptables", binary, "--ipv6"]);
        for address in ["10.99.0.2", "fd00:99::2"] {
            assert_eq!(
                namespace.connect_as(APP_UID, address, 80),
                "unreached",
                "{binary}: after cleanup"
            );
        }
        for save in [
            format!("{binary}-save"),
            format!("ip6{}-save", &binary[2..]),
        ] {
            let saved = namespace
                .command(&save)
                .args(["-t", "nat"])
                .output()
                .unwrap();
            assert!(
                saved.status.success() && !String::from_utf8_lossy(&saved.stdout).contains("NIP_"),
                "{save}: no chain left"
            );
        }
    }
}

/// A process run inside the namespace as `uid`, its output in a file; killed when dropped.
struct Running {
    child: Child,
    output: PathBuf,
}

impl Running {
    fn start(
        namespace: &Namespace,
        uid: u32,
        program: &str,
        args: &[&str],
        output: PathBuf,
    ) -> Running {
        let file = std::fs::File::create(&output).unwrap();
        let child = namespace
            .command("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_string(),
            ])
            .arg(program)
            .args(args)
            .stdout(file.try_clone().unwrap())
            .stderr(file)
            .spawn()
            .unwrap();
        Running { child, output }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.output).unwrap_or_default()
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_passes_an_applications_http_to_its_original_destination() {
    let _turn = crate::common::module_turn(module_path!());
    let Some(namespace) = Namespace::create("passthrough") else {
        return;
    };
    const PROXY_UID: u32 = 1337;
    const APP_UID: u32 = 1000;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("index.html"), "from the backend\n").unwrap();
    // The backend and the sidecar run as other users: they must read these files.
    let readable = |path: &std::path::Path, mode: u32| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    readable(dir.path(), 0o755);
    readable(&dir.path().join("index.html"), 0o644);
    // The backend the application calls, in the same pod namespace on its veth address.
    let backend = Running::start(
        &namespace,
        APP_UID,
        &python(),
        &[
            "-m",
            "http.server",
            "8080",
            "--bind",
            "10.99.0.1",
            "--directory",
            dir.path().to_str().unwrap(),
        ],
        dir.path().join("backend.log"),
    );
    // The sidecar: outbound listener on :15001, every request to its original destination.
    let config = dir.path().join("sidecar.yaml");
    std::fs::write(
        &config,
        "admin: { address: \"127.0.0.1:15020\" }\napi_gateway: { address: \"0.0.0.0:15001\" }\nservices:\n  passthrough: { original_destination: true }\nroutes:\n  - { service: passthrough }\n",
    )
    .unwrap();
    readable(&config, 0o644);
    let sidecar = Running::start(
        &namespace,
        PROXY_UID,
        nip_bin(),
        &[
            "proxy",
            "--config",
            config.to_str().unwrap(),
            "--threads",
            "1",
        ],
        dir.path().join("sidecar.log"),
    );
    let curl = |url: &str| {
        let output = namespace
            .command("setpriv")
            .args([
                format!("--reuid={APP_UID}"),
                format!("--regid={APP_UID}"),
                "--clear-groups".to_string(),
            ])
            .args(["curl", "-si", "--max-time", "3", url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&output.stdout).to_string()
    };
    eventually("backend and sidecar are up", || async {
        curl("http://10.99.0.1:8080/").contains("from the backend")
            && curl("http://127.0.0.1:15020/ready").contains("200")
    })
    .await;
    namespace.nip_iptables(&["setup", "--proxy-uid", &PROXY_UID.to_string()]);

    // The application's plain request goes through the sidecar (it adds x-request-id) to
    // where it was sent.
    let answer = curl("http://10.99.0.1:8080/");
    assert!(
        answer.contains("from the backend"),
        "{answer}\n{}",
        sidecar.output()
    );
    assert!(
        answer.to_ascii_lowercase().contains("x-request-id"),
        "{answer}"
    );
    // A request made to the sidecar's own port has no original destination: 503, no loop.
    let direct = curl("http://127.0.0.1:15001/");
    assert!(direct.starts_with("HTTP/1.1 503"), "{direct}");
    assert!(backend.output().contains("GET /"), "{}", backend.output());
}

/// Two pods, each a network namespace with loopback up, joined by a veth pair: the client
/// at 10.98.0.1, the server at 10.98.0.2. Deleted when dropped.
struct Pods {
    client: Namespace,
    server: Namespace,
}

impl Pods {
    fn create() -> Option<Pods> {
        let client = Namespace::bare("client-pod")?;
        let server = Namespace::bare("server-pod")?;
        ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &client.name,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &server.name,
        ]);
        for (pod, address) in [(&client, "10.98.0.1/24"), (&server, "10.98.0.2/24")] {
            ip(&["-n", &pod.name, "link", "set", "lo", "up"]);
            ip(&["-n", &pod.name, "addr", "add", address, "dev", "eth0"]);
            ip(&["-n", &pod.name, "link", "set", "eth0", "up"]);
        }
        Some(Pods { client, server })
    }
}

impl Namespace {
    /// `program ARGS` run inside the namespace as `uid`: its exit status and output.
    fn run_as(&self, uid: u32, program: &str, args: &[&str]) -> (bool, String) {
        let output = self
            .command("setpriv")
            .args([
                format!("--reuid={uid}"),
                format!("--regid={uid}"),
                "--clear-groups".to_string(),
            ])
            .arg(program)
            .args(args)
            .output()
            .unwrap();
        (
            output.status.success(),
            String::from_utf8_lossy(&output.stdout).to_string()
                + &String::from_utf8_lossy(&output.stderr),
        )
    }

    /// The metrics of the sidecar whose admin port is 15020 in this namespace.
    fn sidecar_metrics(&self) -> String {
        self.run_as(
            0,
            "curl",
            &["-s", "--max-time", "3", "http://127.0.0.1:15020/metrics"],
        )
        .1
    }
}

/// Makes `path` readable (and a directory enterable) by the pods' other users.
fn share(path: &std::path::Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_pods_talk_http_tcp_and_tls_through_both_sidecars() {
    let _turn = crate::common::module_turn(module_path!());
    if Command::new("redis-server")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("redis-server is missing: ./dev test installs it (Debian's redis-server)");
    }
    let Some(pods) = Pods::create() else {
        return;
    };
    const PROXY_UID: u32 = 1337;
    const APP_UID: u32 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    share(dir.path(), 0o755);
    std::fs::write(path("index.html"), "from the server pod\n").unwrap();
    share(&path("index.html"), 0o644);
    // A certificate for passthrough.test, signed by a CA only the client application has.
    ca_and_server_certificate(dir.path(), "passthrough.test");
    // Both sidecars run the same short form; the client's routes name the server. Both
    // write their access log lines (HTTP and TCP) to one file.
    std::fs::create_dir(path("logs")).unwrap();
    share(&path("logs"), 0o777);
    let access_log = path("logs").join("access.log");
    std::fs::write(
        path("sidecar.yaml"),
        format!(
            "admin: {{ address: \"127.0.0.1:15020\" }}\napi_gateway: {{ access_log: {{ enabled: true, format: json, path: \"{}\" }} }}\nsidecar: {{}}\nservices:\n  server: {{ endpoints: [\"10.98.0.2:8080\"], addresses: [\"10.98.0.100:80\"] }}\n  cache: {{ endpoints: [\"10.98.0.2:6379\"], addresses: [\"10.98.0.101:6379\"] }}\nroutes:\n  - {{ match: {{ host: server.mesh }}, service: server }}\n",
            access_log.display()
        ),
    )
    .unwrap();
    share(&path("sidecar.yaml"), 0o644);

    // The server pod: a web server, redis and a TLS server, as the application's user.
    let (server, client) = (&pods.server, &pods.client);
    let _web = Running::start(
        server,
        APP_UID,
        &python(),
        &[
            "-m",
            "http.server",
            "8080",
            "--directory",
            dir.path().to_str().unwrap(),
        ],
        path("web.log"),
    );
    let _web_unowned = Running::start(
        server,
        APP_UID,
        &python(),
        &[
            "-m",
            "http.server",
            "8081",
            "--directory",
            dir.path().to_str().unwrap(),
        ],
        path("web-8081.log"),
    );
    let _redis = Running::start(
        server,
        APP_UID,
        "redis-server",
        &[
            "--port",
            "6379",
            "--bind",
            "0.0.0.0",
            "--protected-mode",
            "no",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/tmp",
        ],
        path("redis.log"),
    );
    let _tls = Running::start(
        server,
        APP_UID,
        "openssl",
        &[
            "s_server",
            "-accept",
            "8443",
            "-cert",
            path("server.pem").to_str().unwrap(),
            "-key",
            path("server.key").to_str().unwrap(),
            "-www",
            "-quiet",
        ],
        path("tls.log"),
    );
    let sidecar_args = [
        "proxy",
        "--config",
        path("sidecar.yaml").to_str().unwrap().to_string().leak(),
        "--threads",
        "1",
    ];
    let server_sidecar = Running::start(
        server,
        PROXY_UID,
        nip_bin(),
        &sidecar_args,
        path("server-sidecar.log"),
    );
    let client_sidecar = Running::start(
        client,
        PROXY_UID,
        nip_bin(),
        &sidecar_args,
        path("client-sidecar.log"),
    );
    let http_get = |extra: &[&str], url: &str| {
        let mut args = vec!["-s", "--max-time", "5"];
        args.extend_from_slice(extra);
        args.push(url);
        client.run_as(APP_UID, "curl", &args)
    };
    let redis_ping = || client.run_as(APP_UID, "redis-cli", &["-h", "10.98.0.2", "PING"]);
    let tls_get = || {
        http_get(
            &[
                "--resolve",
                "passthrough.test:8443:10.98.0.2",
                "--cacert",
                path("ca.pem").to_str().unwrap(),
            ],
            "https://passthrough.test:8443/",
        )
    };
    eventually(
        "the server pod's services and both sidecars are up",
        || async {
            http_get(&[], "http://10.98.0.2:8080/")
                .1
                .contains("from the server pod")
                && redis_ping().1.contains("PONG")
                && tls_get().0
                && client.sidecar_metrics().contains("nip_config_reloads")
                && server.sidecar_metrics().contains("nip_config_reloads")
        },
    )
    .await;

    for pod in [client, server] {
        pod.nip_iptables(&["setup", "--proxy-uid", &PROXY_UID.to_string()]);
    }
    let logs = || {
        format!(
            "client sidecar:\n{}\nserver sidecar:\n{}",
            client_sidecar.output(),
            server_sidecar.output()
        )
    };

    // HTTP by a name only the client sidecar's routes know: routed to the service, through
    // the server sidecar's inbound HTTP path, to the application.
    let (ok, body) = http_get(
        &["--resolve", "server.mesh:8080:10.98.0.2"],
        "http://server.mesh:8080/",
    );
    assert!(
        ok && body.contains("from the server pod"),
        "{body}\n{}",
        logs()
    );
    let requests = |metrics: &str, cluster: &str| {
        sample(metrics, "nip_requests_total", &[("cluster", cluster)])
    };
    assert_eq!(requests(&client.sidecar_metrics(), "server"), 1.0);
    assert_eq!(
        requests(&server.sidecar_metrics(), "sidecar_passthrough"),
        1.0
    );
    // A host no route names goes on to where it was going, through both sidecars too.
    // By the server's pod address, an endpoint of the service: the service's way too.
    let (ok, body) = http_get(&[], "http://10.98.0.2:8080/");
    assert!(ok && body.contains("from the server pod"), "{body}");
    assert_eq!(requests(&client.sidecar_metrics(), "server"), 2.0);
    assert_eq!(
        requests(&server.sidecar_metrics(), "sidecar_passthrough"),
        2.0
    );
    // A destination no service owns goes on to where it was going, through both sidecars.
    let (ok, body) = http_get(&[], "http://10.98.0.2:8081/");
    assert!(ok && body.contains("from the server pod"), "{body}");
    assert_eq!(
        requests(&client.sidecar_metrics(), "sidecar_passthrough"),
        1.0
    );
    assert_eq!(
        requests(&server.sidecar_metrics(), "sidecar_passthrough"),
        3.0
    );

    // Redis's protocol is neither HTTP nor TLS: balanced as TCP over the cache service the
    // pod address belongs to, passed by the server's sidecar.
    let (ok, pong) = redis_ping();
    assert!(ok && pong.contains("PONG"), "{pong}\n{}", logs());
    let tcp = |metrics: &str, prefix: &str| {
        sample(
            metrics,
            "nip_tcp_downstream_cx_total",
            &[("stat_prefix", prefix)],
        )
    };
    assert_eq!(tcp(&client.sidecar_metrics(), "outbound_cache_tcp"), 1.0);
    assert_eq!(
        tcp(&server.sidecar_metrics(), "sidecar_inbound_passthrough"),
        1.0
    );
    // A service's own address (a ClusterIP, where nothing listens): the client sidecar
    // sends HTTP to the service, and redis balanced over its endpoints as TCP.
    let (ok, body) = http_get(&[], "http://10.98.0.100/");
    assert!(
        ok && body.contains("from the server pod"),
        "{body}\n{}",
        logs()
    );
    assert_eq!(requests(&client.sidecar_metrics(), "server"), 3.0);
    let (ok, pong) = client.run_as(APP_UID, "redis-cli", &["-h", "10.98.0.101", "PING"]);
    assert!(ok && pong.contains("PONG"), "{pong}\n{}", logs());
    assert_eq!(tcp(&client.sidecar_metrics(), "outbound_cache_tcp"), 2.0);
    assert_eq!(
        tcp(&server.sidecar_metrics(), "sidecar_inbound_passthrough"),
        2.0
    );
    // Each side logged the redis connection as a TCP line: its bytes, where it went.
    eventually("both sidecars logged the redis connection", || async {
        let lines = std::fs::read_to_string(&access_log).unwrap_or_default();
        let tcp: Vec<serde_json::Value> = lines
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|l| l["protocol"] == "TCP" && l["response_flags"] == "-")
            .collect();
        let of = |route: &str| {
            tcp.iter().any(|l| {
                l["route_name"] == route
                    && l["bytes_received"].as_u64() == Some(14)
                    && l["bytes_sent"].as_u64() == Some(7)
                    && l["upstream_host"]
                        .as_str()
                        .is_some_and(|h| h.ends_with(":6379"))
            })
        };
        of("outbound_cache_tcp") && of("sidecar_inbound_passthrough")
    })
    .await;
    // TLS passes untouched: the application verifies the server's own certificate.
    let (ok, page) = tls_get();
    assert!(ok, "{page}\n{}", logs());
    assert_eq!(
        tcp(&client.sidecar_metrics(), "sidecar_outbound_passthrough"),
        1.0
    );
    assert_eq!(
        tcp(&server.sidecar_metrics(), "sidecar_inbound_passthrough"),
        3.0
    );

    // Without the rules, traffic goes direct again and the sidecars see none of it.
    for pod in [client, server] {
        pod.nip_iptables(&["cleanup"]);
    }
    let before = (client.sidecar_metrics(), server.sidecar_metrics());
    assert!(http_get(&[], "http://10.98.0.2:8080/")
        .1
        .contains("from the server pod"));
    assert!(redis_ping().1.contains("PONG"));
    assert!(tls_get().0);
    let after = (client.sidecar_metrics(), server.sidecar_metrics());
    assert_eq!(
        requests(&after.1, "sidecar_passthrough"),
        requests(&before.1, "sidecar_passthrough")
    );
    assert_eq!(
        tcp(&after.0, "sidecar_outbound_passthrough"),
        tcp(&before.0, "sidecar_outbound_passthrough")
    );
}

/// A node and two pods on it: the node namespace routes between the client pod
/// (10.97.1.2, its gateway 10.97.1.1) and the server pod (10.97.2.2, via 10.97.2.1), as a
/// Kubernetes node routes between its pods' one addresses. Deleted when dropped.
struct Node {
    node: Namespace,
    pods: Pods,
}

impl Node {
    fn create() -> Option<Node> {
        let node = Namespace::bare("node")?;
        let client = Namespace::bare("meshed-client")?;
        let server = Namespace::bare("meshed-server")?;
        ip(&["-n", &node.name, "link", "set", "lo", "up"]);
        for (pod, link, subnet) in [(&client, "to-client", 1), (&server, "to-server", 2)] {
            ip(&[
                "link", "add", link, "netns", &node.name, "type", "veth", "peer", "name", "eth0",
                "netns", &pod.name,
            ]);
            let gateway = format!("10.97.{subnet}.1");
            ip(&[
                "-n",
                &node.name,
                "addr",
                "add",
                &format!("{gateway}/24"),
                "dev",
                link,
            ]);
            ip(&["-n", &node.name, "link", "set", link, "up"]);
            ip(&["-n", &pod.name, "link", "set", "lo", "up"]);
            ip(&[
                "-n",
                &pod.name,
                "addr",
                "add",
                &format!("10.97.{subnet}.2/24"),
                "dev",
                "eth0",
            ]);
            ip(&["-n", &pod.name, "link", "set", "eth0", "up"]);
            ip(&["-n", &pod.name, "route", "add", "default", "via", &gateway]);
        }
        let forwarding = node
            .command("sysctl")
            .args(["-qw", "net.ipv4.ip_forward=1"])
            .status()
            .expect("sysctl");
        assert!(forwarding.success(), "the node forwards between its pods");
        Some(Node {
            node,
            pods: Pods { client, server },
        })
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn meshed_sidecars_speak_mutual_tls_and_the_server_knows_its_client() {
    let _turn = crate::common::module_turn(module_path!());
    let Some(cluster) = Node::create() else {
        return;
    };
    const PROXY_UID: u32 = 1337;
    const APP_UID: u32 = 1000;
    let (client, server) = (&cluster.pods.client, &cluster.pods.server);
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    share(dir.path(), 0o755);
    std::fs::write(path("index.html"), "from the meshed server\n").unwrap();
    share(&path("index.html"), 0o644);

    // The control plane runs on the node; each sidecar joins it from its pod's address.
    let control_plane =
        ControlPlane::start_in_netns(&cluster.node.name, &["10.97.1.1", "10.97.2.1"]);
    eventually("the control plane answers", || async {
        control_plane.nip(&["token", "list"]).status.success()
    })
    .await;
    let applied = control_plane.apply(
        "sidecar: { mesh: true }\nservices:\n  server: { endpoints: [\"10.97.2.2:8080\"] }\nroutes:\n  - { match: { host: server.mesh }, service: server }\n",
        &[],
    );
    assert!(applied.status.success(), "{}", stderr(&applied));
    std::fs::copy(control_plane.bundle_file(), path("bundle.pem")).unwrap();
    share(&path("bundle.pem"), 0o644);
    let mut sidecars = Vec::new();
    for (pod, node, gateway) in [
        (client, "client-pod", "10.97.1.1"),
        (server, "server-pod", "10.97.2.1"),
    ] {
        let token = control_plane.join_token_file(node, dir.path());
        share(&token, 0o644);
        let identity = path(&format!("identity-{node}"));
        std::fs::create_dir(&identity).unwrap();
        std::os::unix::fs::chown(&identity, Some(PROXY_UID), Some(PROXY_UID)).unwrap();
        let config = path(&format!("{node}.yaml"));
        std::fs::write(
            &config,
            format!(
                "node: {{ id: {node}, region: eu, role: sidecar }}\nadmin: {{ address: \"127.0.0.1:15020\" }}\ncontrol_plane: {{ address: \"{gateway}:{}\", ca_file: \"{}\", join_token_file: \"{}\", identity_dir: \"{}\" }}\n",
                control_plane.xds_port,
                path("bundle.pem").display(),
                token.display(),
                identity.display()
            ),
        )
        .unwrap();
        share(&config, 0o644);
        sidecars.push(Running::start(
            pod,
            PROXY_UID,
            nip_bin(),
            &[
                "proxy",
                "--config",
                config.to_str().unwrap(),
                "--threads",
                "1",
            ],
            path(&format!("{node}.log")),
        ));
    }
    let _web = Running::start(
        server,
        APP_UID,
        &python(),
        &[
            "-m",
            "http.server",
            "8080",
            "--directory",
            dir.path().to_str().unwrap(),
        ],
        path("web.log"),
    );
    let logs = || {
        sidecars
            .iter()
            .map(Running::output)
            .collect::<Vec<_>>()
            .join("\n")
            + &control_plane.log()
    };
    let ready = |pod: &Namespace| {
        pod.run_as(
            0,
            "curl",
            &[
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "http://127.0.0.1:15020/ready",
            ],
        )
        .1 == "200"
    };
    eventually(
        "both sidecars joined and serve the control plane's config",
        || async { ready(client) && ready(server) },
    )
    .await;
    for pod in [client, server] {
        pod.nip_iptables(&["setup", "--proxy-uid", &PROXY_UID.to_string()]);
    }

    // The application's plain request by a service name: the client sidecar routes it and
    // reaches the server's sidecar over mesh mutual TLS (once the control plane knows the
    // server's sidecar as a member), which sees the client's identity.
    let client_identity = "spiffe://nip.local/node/client-pod";
    let peer_requests = || {
        sample(
            &server.sidecar_metrics(),
            "nip_downstream_peer_requests_total",
            &[("peer", client_identity)],
        )
    };
    eventually(
        "a request arrives over mesh mutual TLS from the client's sidecar",
        || async {
            let (ok, body) = client.run_as(
                APP_UID,
                "curl",
                &[
                    "-s",
                    "--max-time",
                    "5",
                    "--resolve",
                    "server.mesh:8080:10.97.2.2",
                    "http://server.mesh:8080/",
                ],
            );
            assert!(
                ok && body.contains("from the meshed server"),
                "{body}\n{}",
                logs()
            );
            peer_requests() >= 1.0
        },
    )
    .await;
    // By the server's pod address (an endpoint of the service), no Host route needed: the
    // service's way, over mesh mutual TLS as well.
    let before = peer_requests();
    let (ok, body) = client.run_as(
        APP_UID,
        "curl",
        &["-s", "--max-time", "5", "http://10.97.2.2:8080/"],
    );
    assert!(ok && body.contains("from the meshed server"), "{body}");
    assert_eq!(peer_requests(), before + 1.0);
    // A stranger's TLS with the mesh's server name but no mesh certificate is refused.
    let (ok, _) = cluster.node.run_as(
        0,
        "curl",
        &[
            "-sk",
            "--max-time",
            "5",
            "--resolve",
            "mesh.nip.internal:8080:10.97.2.2",
            "https://mesh.nip.internal:8080/",
        ],
    );
    assert!(!ok, "a client without a mesh certificate must not get in");
    // Plaintext from outside the mesh still comes in (permissive), with no peer identity.
    let before = peer_requests();
    let (ok, body) = cluster.node.run_as(
        0,
        "curl",
        &["-s", "--max-time", "5", "http://10.97.2.2:8080/"],
    );
    assert!(ok && body.contains("from the meshed server"), "{body}");
    assert_eq!(peer_requests(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_takes_ipv6_connections_too() {
    let _turn = crate::common::module_turn(module_path!());
    let Some(namespace) = Namespace::create("ipv6") else {
        return;
    };
    const PROXY_UID: u32 = 1337;
    const APP_UID: u32 = 1000;
    let dir = tempfile::tempdir().unwrap();
    let path = |name: &str| dir.path().join(name);
    share(dir.path(), 0o755);
    std::fs::write(path("index.html"), "from the backend\n").unwrap();
    share(&path("index.html"), 0o644);
    let backends: Vec<Running> = ["10.99.0.1", "fd00:99::1"]
        .iter()
        .map(|address| {
            Running::start(
                &namespace,
                APP_UID,
                &python(),
                &[
                    "-m",
                    "http.server",
                    "8080",
                    "--bind",
                    address,
                    "--directory",
                    dir.path().to_str().unwrap(),
                ],
                path(&format!("backend-{}.log", address.replace(':', "_"))),
            )
        })
        .collect();
    std::fs::write(
        path("sidecar.yaml"),
        "admin: { address: \"127.0.0.1:15020\" }\nsidecar: { ipv6: true }\n",
    )
    .unwrap();
    share(&path("sidecar.yaml"), 0o644);
    let sidecar = Running::start(
        &namespace,
        PROXY_UID,
        nip_bin(),
        &[
            "proxy",
            "--config",
            path("sidecar.yaml").to_str().unwrap(),
            "--threads",
            "1",
        ],
        path("sidecar.log"),
    );
    let curl = |url: &str| namespace.run_as(APP_UID, "curl", &["-sg", "--max-time", "3", url]);
    let passthrough = || {
        sample(
            &namespace.sidecar_metrics(),
            "nip_requests_total",
            &[("cluster", "sidecar_passthrough")],
        )
    };
    eventually("the backends and the sidecar are up", || async {
        curl("http://10.99.0.1:8080/")
            .1
            .contains("from the backend")
            && curl("http://[fd00:99::1]:8080/")
                .1
                .contains("from the backend")
            && namespace.sidecar_metrics().contains("nip_config_reloads")
    })
    .await;
    namespace.nip_iptables(&["setup", "--proxy-uid", &PROXY_UID.to_string(), "--ipv6"]);
    for (i, url) in ["http://[fd00:99::1]:8080/", "http://10.99.0.1:8080/"]
        .iter()
        .enumerate()
    {
        let (ok, body) = curl(url);
        assert!(
            ok && body.contains("from the backend"),
            "{url}: {body}\n{}",
            sidecar.output()
        );
        assert_eq!(
            passthrough(),
            (i + 1) as f64,
            "{url} went through the sidecar"
        );
    }
    drop(backends);
}
