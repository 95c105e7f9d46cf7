//! A `nip control-plane` process for tests, and what tests do with one: apply configs,
//! make tokens, join proxies and xDS clients to it.

use super::*;
use nip_xds::client::{AdsClient, ResourceSink};
use nip_xds::envoy_types::pb::envoy::config::core::v3::{Locality, Node};
use nip_xds::ResourceSet;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Records the cluster names of every set it is given.
#[derive(Clone, Default)]
pub struct Clusters(pub Arc<Mutex<Vec<Vec<String>>>>);

impl ResourceSink for Clusters {
    fn apply(&mut self, resources: &ResourceSet) -> Result<(), String> {
        let names = resources.clusters.iter().map(|c| c.name.clone()).collect();
        self.0.lock().unwrap().push(names);
        Ok(())
    }
}

impl Clusters {
    pub fn last(&self) -> Vec<String> {
        self.0.lock().unwrap().last().cloned().unwrap_or_default()
    }
}

/// A `nip control-plane` process with its own store, ports and log; killed when dropped.
pub struct ControlPlane {
    pub child: Option<Child>,
    pub store: String,
    pub config: Option<std::path::PathBuf>,
    pub xds_port: u16,
    pub api_port: u16,
    pub log: std::path::PathBuf,
    pub admin_token_file: std::path::PathBuf,
    /// Extra arguments of `nip control-plane`.
    pub extra: Vec<String>,
    /// The network namespace it runs in (its xDS port then on every address there), and
    /// where the CLI verbs run.
    pub netns: Option<String>,
    pub _dir: tempfile::TempDir,
}

impl ControlPlane {
    /// Starts one on a fresh SQLite store, following `config` if given.
    pub fn start(config: Option<&std::path::Path>) -> ControlPlane {
        ControlPlane::start_on(None, config)
    }

    /// Starts one on `store` (a fresh SQLite store when `None`).
    pub fn start_on(store: Option<&str>, config: Option<&std::path::Path>) -> ControlPlane {
        ControlPlane::start_with(store, config, &[])
    }

    /// [`ControlPlane::start_on`] with more arguments for `nip control-plane`.
    pub fn start_with(
        store: Option<&str>,
        config: Option<&std::path::Path>,
        extra: &[&str],
    ) -> ControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let mut control_plane = ControlPlane {
            child: None,
            store: store.map_or_else(
                || format!("sqlite://{}/store/nip.db", dir.path().display()),
                str::to_string,
            ),
            config: config.map(|c| c.to_path_buf()),
            xds_port: free_port(),
            api_port: free_port(),
            log: dir.path().join("control-plane.log"),
            admin_token_file: dir.path().join("admin-token"),
            extra: extra.iter().map(|a| a.to_string()).collect(),
            netns: None,
            _dir: dir,
        };
        control_plane.spawn();
        control_plane
    }

    /// Starts one inside network namespace `netns`, its xDS port on every address there,
    /// its certificate naming `server_names` as well.
    pub fn start_in_netns(netns: &str, server_names: &[&str]) -> ControlPlane {
        let dir = tempfile::tempdir().unwrap();
        let mut control_plane = ControlPlane {
            child: None,
            store: format!("sqlite://{}/store/nip.db", dir.path().display()),
            config: None,
            xds_port: free_port(),
            api_port: free_port(),
            log: dir.path().join("control-plane.log"),
            admin_token_file: dir.path().join("admin-token"),
            extra: server_names
                .iter()
                .flat_map(|n| ["--server-name".to_string(), n.to_string()])
                .collect(),
            netns: Some(netns.to_string()),
            _dir: dir,
        };
        control_plane.spawn();
        control_plane
    }

    /// `nip` itself, inside the control plane's namespace if it has one.
    fn nip_command(&self) -> Command {
        match &self.netns {
            None => Command::new(nip_bin()),
            Some(netns) => {
                let mut command = Command::new("ip");
                command.args(["netns", "exec", netns, nip_bin()]);
                command
            }
        }
    }

    pub fn command(&self) -> Command {
        let mut command = self.nip_command();
        let xds_ip = if self.netns.is_some() {
            "0.0.0.0"
        } else {
            "127.0.0.1"
        };
        command
            .args(["control-plane", "--store", &self.store])
            .args(["--xds-address", &format!("{xds_ip}:{}", self.xds_port)])
            .args(["--api-address", &format!("127.0.0.1:{}", self.api_port)])
            .arg("--admin-token-file")
            .arg(&self.admin_token_file)
            .arg("--ca-dir")
            .arg(self.ca_dir())
            .args(&self.extra);
        if let Some(config) = &self.config {
            command.arg("--config").arg(config);
        }
        command
    }

    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .unwrap();
        self.child = Some(
            self.command()
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    /// Kills it hard (no goodbye to its streams).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn xds_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.xds_port)
    }

    pub fn api(&self, path: &str) -> String {
        format!("https://127.0.0.1:{}{path}", self.api_port)
    }

    /// Runs a `nip` CLI verb against this control plane.
    pub fn nip(&self, args: &[&str]) -> std::process::Output {
        self.nip_command()
            .args(args)
            .args(["--control-plane", &self.api("")])
            .env("NIP_TOKEN_FILE", &self.admin_token_file)
            .env("NIP_CA_FILE", self.bundle_file())
            .output()
            .unwrap()
    }

    /// `nip apply -f` of `yaml` (written to a file first); the CLI's output.
    pub fn apply(&self, yaml: &str, extra: &[&str]) -> std::process::Output {
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), yaml).unwrap();
        let path = file.path().display().to_string();
        let mut args = vec!["apply", "-f", path.as_str()];
        args.extend_from_slice(extra);
        self.nip(&args)
    }

    /// Where its CA keeps its roots and writes the trust bundle.
    pub fn ca_dir(&self) -> std::path::PathBuf {
        self.admin_token_file.with_file_name("ca")
    }

    /// The trust bundle proxies are given (`control_plane.ca_file`).
    pub fn bundle_file(&self) -> std::path::PathBuf {
        self.ca_dir().join("trust-bundle.pem")
    }

    /// A join token for `node` (via `nip token create`), written to a file in `dir`.
    pub fn join_token_file(&self, node: &str, dir: &std::path::Path) -> std::path::PathBuf {
        let token = create_token(
            self,
            &[
                "--role",
                "join",
                "--node",
                node,
                &format!("join-{node}-{}", free_port()),
            ],
        );
        let file = dir.join(format!("join-{node}"));
        std::fs::write(&file, token).unwrap();
        file
    }

    /// The `control_plane:` block of a proxy that joins this control plane as `node`.
    pub fn control_plane_block(&self, node: &str, dir: &std::path::Path) -> String {
        format!(
            "control_plane: {{ address: \"127.0.0.1:{}\", ca_file: \"{}\", join_token_file: \"{}\" }}\n",
            self.xds_port,
            self.bundle_file().display(),
            self.join_token_file(node, dir).display()
        )
    }

    /// The admin token its first start made (or was given).
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(&self.admin_token_file)
            .unwrap()
            .trim()
            .to_string()
    }

    /// An HTTPS client of its API that sends `token` as its bearer token.
    pub fn client_with(&self, token: &str) -> reqwest::Client {
        api_client(&self.bundle_file(), Some(token)).unwrap()
    }

    /// An HTTPS client of its API without a token.
    pub fn anonymous(&self) -> reqwest::Client {
        api_client(&self.bundle_file(), None).unwrap()
    }

    /// An HTTPS client of its API with the admin token.
    pub fn http(&self) -> reqwest::Client {
        self.client_with(&self.admin_token())
    }

    /// `GET` of an API path with the admin token, as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        self.http()
            .get(self.api(path))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// A workload certificate for `node` from the control plane's CA (a join token, a CSR):
    /// `(certificate chain, key)` PEM files in `dir`, for clients that are mesh members.
    pub async fn member_certificate(
        &self,
        node: &str,
        dir: &std::path::Path,
    ) -> (std::path::PathBuf, std::path::PathBuf) {
        let token = std::fs::read_to_string(self.join_token_file(node, dir)).unwrap();
        let made = nip_xds::identity::key_and_csr(node).unwrap();
        let issued: serde_json::Value = api_client(&self.bundle_file(), Some(token.trim()))
            .unwrap()
            .post(format!(
                "https://127.0.0.1:{}/v1/certificates",
                self.xds_port
            ))
            .json(&serde_json::json!({ "node_id": node, "region": "eu", "csr": made.csr_pem }))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let (cert, key) = (
            dir.join(format!("{node}.crt")),
            dir.join(format!("{node}.key")),
        );
        std::fs::write(&cert, issued["certificate_chain"].as_str().unwrap()).unwrap();
        std::fs::write(&key, &made.key_pem).unwrap();
        (cert, key)
    }

    /// Starts it again after [`ControlPlane::kill`] and waits until it answers.
    pub async fn respawn(&mut self) {
        self.spawn();
        self.wait_ready().await;
    }

    /// Applies [`gateway`] on `port` routed to `backend` and waits until `proxy` routes
    /// there.
    pub async fn route_to(&self, proxy: &Proxy, port: u16, backend: &Backend) {
        let applied = self.apply(&gateway(port, backend, ""), &[]);
        assert!(applied.status.success(), "{}", stderr(&applied));
        wait_routes_to(proxy, &backend.control.name).await;
    }

    /// Waits until its API answers; on a timeout the failure shows its log (a control
    /// plane that could not start says why there).
    pub async fn wait_ready(&self) {
        let deadline = std::time::Instant::now() + crate::common::DEADLINE;
        loop {
            if let Some(client) = api_client(&self.bundle_file(), None) {
                if client
                    .get(self.api("/v1/openapi.json"))
                    .send()
                    .await
                    .is_ok()
                {
                    return;
                }
            }
            assert!(
                std::time::Instant::now() < deadline,
                "timed out waiting for the control plane to answer; its log:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }
}

/// An HTTPS client trusting the CA bundle in `bundle` (`None` while it is not written),
/// sending `token` as a bearer token if given.
pub fn api_client(bundle: &std::path::Path, token: Option<&str>) -> Option<reqwest::Client> {
    let pem = std::fs::read(bundle).ok()?;
    let mut builder = reqwest::Client::builder()
        .no_proxy()
        .timeout(Duration::from_secs(20));
    for certificate in reqwest::Certificate::from_pem_bundle(&pem).ok()? {
        builder = builder.add_root_certificate(certificate);
    }
    if let Some(token) = token {
        let mut headers = reqwest::header::HeaderMap::new();
        headers.insert(
            reqwest::header::AUTHORIZATION,
            format!("Bearer {token}").parse().ok()?,
        );
        builder = builder.default_headers(headers);
    }
    builder.build().ok()
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn stdout(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// A library ADS client (the one proxies use) as node `id` in `region`, joined with a join
/// token for that node, recording what it is sent.
pub async fn ads_client(control_plane: &ControlPlane, id: &str, region: &str) -> Clusters {
    let sink = Clusters::default();
    let node = Node {
        id: id.into(),
        locality: Some(Locality {
            region: region.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    control_plane.wait_ready().await;
    let dir = tempfile::tempdir().unwrap().keep();
    let settings = nip_xds::translate::ControlPlaneIdentity {
        ca_file: control_plane.bundle_file(),
        join_token_file: Some(control_plane.join_token_file(id, &dir)),
        identity_dir: None,
    };
    let target = format!("127.0.0.1:{}", control_plane.xds_port);
    let (id, region) = (id.to_string(), region.to_string());
    let identity = tokio::task::spawn_blocking(move || {
        nip_proxy::identity::WorkloadIdentity::obtain(&settings, &target, &id, &region)
    })
    .await
    .unwrap()
    .expect("join");
    tokio::spawn(
        AdsClient::new(control_plane.xds_url(), node, sink.clone())
            .with_tls(identity.tls_settings())
            .run(),
    );
    sink
}

pub fn services(names: &[&str]) -> String {
    let mut yaml = String::from("services:\n");
    for (i, name) in names.iter().enumerate() {
        yaml.push_str(&format!(
            "  {name}: {{ endpoints: [\"127.0.0.1:{}\"] }}\n",
            9000 + i
        ));
    }
    yaml.push_str(&format!("routes:\n  - {{ service: {} }}\n", names[0]));
    yaml
}

/// A gateway on `port` with one service `web` at `backend`, plus `extra` YAML.
pub fn gateway(port: u16, backend: &Backend, extra: &str) -> String {
    format!(
        "api_gateway: {{ address: \"127.0.0.1:{port}\" }}\nservices:\n  web: {{ endpoints: [\"{}\"] }}\n{extra}routes:\n  - {{ service: web }}\n",
        backend.address
    )
}

/// [`gateway`] whose route runs plugin `broken`: a module (written into `dir`) the control
/// plane accepts as a file but no proxy can compile.
pub fn with_broken_plugin(port: u16, backend: &Backend, dir: &std::path::Path) -> String {
    let garbage = dir.join("garbage.wasm");
    std::fs::write(&garbage, b"\0asm not a module").unwrap();
    gateway(
        port,
        backend,
        &format!(
            "plugins:\n  broken: {{ source: {{ file: \"{}\" }} }}\n",
            garbage.display()
        ),
    )
    .replace(
        "- { service: web }",
        "- { service: web, plugins: [broken] }",
    )
}

/// Backends `a` and `b`, a gateway port, and a control plane already serving that gateway
/// with its route to `a` (version 1).
pub async fn serving_a() -> (Backend, Backend, u16, ControlPlane) {
    let a = Backend::start("a").await;
    let b = Backend::start("b").await;
    let port = free_port();
    let control_plane = ControlPlane::start(None);
    control_plane.wait_ready().await;
    let applied = control_plane.apply(&gateway(port, &a, ""), &[]);
    assert!(applied.status.success(), "{}", stderr(&applied));
    (a, b, port, control_plane)
}

/// A proxy whose own file only says who it is and where its control plane is.
pub async fn proxy_of(control_plane: &ControlPlane, id: &str, region: &str, port: u16) -> Proxy {
    control_plane.wait_ready().await;
    let dir = tempfile::tempdir().unwrap().keep();
    let proxy = Proxy::spawn_on(
        &format!(
            "node: {{ id: {id}, region: {region} }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\n{}",
            control_plane.control_plane_block(id, &dir)
        ),
        port,
    );
    proxy.wait_ready().await;
    proxy
}

/// A proxy joined to `control_plane` as `id` (region `region`) that streams its access
/// records there.
pub async fn streaming_proxy_of(
    control_plane: &ControlPlane,
    id: &str,
    region: &str,
    port: u16,
) -> Proxy {
    control_plane.wait_ready().await;
    let dir = tempfile::tempdir().unwrap().keep();
    let block = control_plane.control_plane_block(id, &dir);
    let block =
        block.trim_end().trim_end_matches('}').to_string() + ", stream_access_logs: true }\n";
    let proxy = Proxy::spawn_on(
        &format!(
            "node: {{ id: {id}, region: {region} }}\nadmin: {{ address: \"127.0.0.1:{{admin}}\" }}\n{block}"
        ),
        port,
    );
    proxy.wait_ready().await;
    proxy
}

/// Waits until the proxy's answers come from `backend`.
pub async fn wait_routes_to(proxy: &Proxy, backend: &str) {
    eventually(&format!("the proxy routes to {backend}"), || async {
        client()
            .get(proxy.url("/"))
            .send()
            .await
            .is_ok_and(|r| r.headers().get("x-backend").is_some_and(|v| v == backend))
    })
    .await;
}

/// The backend that answers the proxy's `/` (which must be a 200).
pub async fn backend_of(proxy: &Proxy) -> String {
    let response = client().get(proxy.url("/")).send().await.unwrap();
    assert_eq!(response.status(), 200);
    response.headers()["x-backend"]
        .to_str()
        .unwrap()
        .to_string()
}

/// `nip token create` as `caller` (a token file); the new token, printed once on stdout.
pub fn create_token(control_plane: &ControlPlane, args: &[&str]) -> String {
    let mut all = vec!["token", "create"];
    all.extend_from_slice(args);
    let output = control_plane.nip(&all);
    assert!(output.status.success(), "{}", stderr(&output));
    let token = stdout(&output).trim().to_string();
    assert!(token.starts_with("nip_"), "{token}");
    token
}
