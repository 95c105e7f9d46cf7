//! `nip migrate verify V3 V4`: does the v4 file load, and route as the v3 one did?
//!
//! v3 had one server that ran every request through its enabled plugins, in order. The
//! check: the v4 file passes the proxy's own compiler; it listens where v3's server did;
//! and a real proxy running it (its services replaced by local echo backends, its
//! listener and admin on free local ports) answers each sample request through a route
//! whose plugins are exactly v3's enabled ones, in v3's order. Which route took a request
//! comes from the proxy's own tap (admin `/tap`).

use anyhow::{anyhow, bail, Context as _};
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

/// The requests tried when no file gives them.
const SAMPLE_REQUESTS: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/api/v1/items?page=2"),
    ("POST", "/api/v1/items"),
    ("PUT", "/api/v1/items/7"),
    ("GET", "/health"),
];

/// Runs the check; exit 0 when the v4 file behaves as the v3 one did, 1 when it does not,
/// 2 when a file cannot be read as what it should be.
pub fn run(v3: &Path, v4: &Path, requests: Option<&Path>) -> ExitCode {
    match verify(v3, v4, requests) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("nip migrate verify: {e:#}");
            ExitCode::from(crate::EXIT_BAD_CONFIG)
        }
    }
}

fn verify(v3: &Path, v4: &Path, requests: Option<&Path>) -> anyhow::Result<bool> {
    let v3_text =
        std::fs::read_to_string(v3).with_context(|| format!("cannot read {}", v3.display()))?;
    let expected = nip_xds::config::migrate::v3_behaviour(&v3_text)
        .map_err(|e| anyhow!("{}: {e}", v3.display()))?;
    let config =
        nip_xds::config::Config::from_file(v4).map_err(|e| anyhow!("{}: {e}", v4.display()))?;
    let translation = nip_xds::translate::translate(&config);
    nip_proxy::compile::check(&translation.bootstrap, &translation.resources)
        .map_err(|e| anyhow!("{}: the proxy's compiler refuses it: {e}", v4.display()))?;
    println!("loads: {} passes the proxy's compiler", v4.display());
    let samples = match requests {
        Some(path) => read_requests(path)?,
        None => SAMPLE_REQUESTS
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect(),
    };

    let mut same = true;
    if config.api_gateway.address == expected.address {
        println!("listens: {} as v3's server did", expected.address);
    } else {
        same = false;
        println!(
            "DIFFERS  listens on {:?}; v3's server listened on {:?}",
            config.api_gateway.address, expected.address
        );
    }

    let text =
        std::fs::read_to_string(v4).with_context(|| format!("cannot read {}", v4.display()))?;
    let routed = route_samples(&text, &samples)?;
    let plugins_of = |route: &str| -> Option<Vec<String>> {
        config
            .routes
            .iter()
            .enumerate()
            .find(|(i, r)| nip_xds::config::route_name(r, *i) == route)
            .map(|(_, r)| r.plugins.clone())
    };
    for ((method, path), (status, route)) in samples.iter().zip(&routed) {
        let plugins = plugins_of(route).unwrap_or_default();
        let verdict = if route.is_empty() || *status == 404 {
            same = false;
            format!("DIFFERS  no route took it ({status}); v3 served every request")
        } else if plugins != expected.plugins {
            same = false;
            format!(
                "DIFFERS  route {route} runs [{}]; v3 ran [{}]",
                plugins.join(", "),
                expected.plugins.join(", ")
            )
        } else {
            format!("as v3   route {route}, plugins [{}]", plugins.join(", "))
        };
        println!("{method:<6} {path:<28} {verdict}");
    }
    println!(
        "{}",
        if same {
            "the v4 file routes as the v3 one did"
        } else {
            "the v4 file does not route as the v3 one did (lines marked DIFFERS)"
        }
    );
    Ok(same)
}

/// `METHOD PATH` per line (`#` comments and blank lines skipped).
fn read_requests(path: &Path) -> anyhow::Result<Vec<(String, String)>> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let mut requests = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_whitespace().collect::<Vec<_>>().as_slice() {
            [method, target] if target.starts_with('/') => {
                requests.push((method.to_ascii_uppercase(), target.to_string()))
            }
            _ => bail!(
                "{}:{}: {line:?} is not `METHOD /path`",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(requests)
}

fn free_address() -> anyhow::Result<SocketAddr> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Runs the v4 config on a local proxy (services → echo backends, free local ports) and
/// sends each sample; the status and the route (from the tap) of each, in order.
fn route_samples(v4: &str, samples: &[(String, String)]) -> anyhow::Result<Vec<(u16, String)>> {
    let mut config: serde_yaml::Value = serde_yaml::from_str(v4)?;
    let listen = free_address()?;
    let admin = free_address()?;
    config["api_gateway"]["address"] = listen.to_string().into();
    config["admin"] = serde_yaml::to_value(std::collections::BTreeMap::from([(
        "address",
        admin.to_string(),
    )]))?;
    if let Some(map) = config.as_mapping_mut() {
        map.remove("control_plane");
    }
    if let Some(services) = config["services"].as_mapping_mut() {
        for (name, service) in services.iter_mut() {
            let echo = free_address()?;
            crate::demo::start_echo_backends(&[echo], name.as_str().unwrap_or("service"))?;
            service["endpoints"] = serde_yaml::to_value(vec![echo.to_string()])?;
        }
    }
    let dir = std::env::temp_dir().join(format!("nip-migrate-verify-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let file = dir.join("v4.yaml");
    std::fs::write(&file, serde_yaml::to_string(&config)?)?;
    let exe = std::env::current_exe().context("cannot find the nip binary")?;
    let mut proxy = Command::new(exe)
        .args(["proxy", "--config"])
        .arg(&file)
        .args(["--drain-timeout", "1s"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(dir.join("proxy.log"))?))
        .spawn()
        .context("cannot start a proxy")?;
    let result = (|| {
        wait_until_listening(listen, &mut proxy, &dir)?;
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(10)))
            .build()
            .into();
        let tap = agent
            .get(&format!(
                "http://{admin}/tap?limit={}&seconds=30",
                samples.len()
            ))
            .call()?;
        let mut records = std::io::BufReader::new(tap.into_body().into_reader()).lines();
        let mut routed = Vec::new();
        for (method, path) in samples {
            let request = ureq::http::Request::builder()
                .method(method.as_str())
                .uri(format!("http://{listen}{path}"))
                .body(String::new())?;
            let status = agent.run(request)?.status().as_u16();
            let record: serde_json::Value = match records.next() {
                Some(line) => serde_json::from_str(&line?)?,
                None => bail!("the proxy's tap ended early"),
            };
            let route = record["route_name"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            routed.push((status, route));
        }
        Ok(routed)
    })();
    let _ = proxy.kill();
    let _ = proxy.wait();
    let _ = std::fs::remove_dir_all(&dir);
    result
}

fn wait_until_listening(
    listen: SocketAddr,
    proxy: &mut std::process::Child,
    dir: &Path,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Some(status) = proxy.try_wait()? {
            let log = std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default();
            bail!("the proxy exited ({status}):\n{log}");
        }
        if std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    bail!("the proxy did not listen on {listen} within 30 s")
}
