//! CLI verbs that talk to a control plane's REST API: `nip apply`, `nip get proxies`,
//! `nip history`, `nip rollback`, `nip token`, `nip logs`, and `nip deploy`'s upload. Each prints what happened for a human (or
//! the API's JSON with `--json`) and exits 0 on success, 2 when the config must be fixed,
//! 1 otherwise.
//!
//! Every call carries a bearer token, the first found of: `--token-file`, `$NIP_TOKEN`,
//! `~/.config/nip/token`, and the admin token file a control plane on this machine wrote
//! (its default place; sent only to a control plane URL on this machine). The token is
//! never printed.

use serde_json::{json, Value};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, UNIX_EPOCH};

/// Where the control plane is and who is asking.
#[derive(clap::Args, Debug, Clone)]
pub struct Remote {
    /// The control plane's REST API.
    #[arg(
        long,
        global = true,
        env = "NIP_CONTROL_PLANE",
        default_value = "https://127.0.0.1:18001"
    )]
    pub control_plane: String,
    /// The trust bundle the control plane's certificate chains to (default: the bundle a
    /// control plane on this machine wrote).
    #[arg(long, global = true, env = "NIP_CA_FILE")]
    pub ca_file: Option<std::path::PathBuf>,
    /// A file holding the API token (else $NIP_TOKEN, ~/.config/nip/token, or the admin
    /// token a local control plane wrote).
    #[arg(long, global = true, env = "NIP_TOKEN_FILE")]
    pub token_file: Option<std::path::PathBuf>,
}

/// A failed call: what to print and how to exit.
struct Failure {
    message: String,
    code: ExitCode,
}

impl Failure {
    fn other(message: String) -> Failure {
        Failure {
            message,
            code: ExitCode::FAILURE,
        }
    }
}

impl Remote {
    /// The API token, from the first place that has one (see the module documentation).
    fn token(&self) -> Result<Option<String>, Failure> {
        let read = |path: &Path| {
            std::fs::read_to_string(path)
                .map(|t| t.trim().to_string())
                .map_err(|e| {
                    Failure::other(format!(
                        "cannot read the token file {}: {e}",
                        path.display()
                    ))
                })
        };
        if let Some(path) = &self.token_file {
            return read(path).map(Some);
        }
        if let Some(token) = std::env::var("NIP_TOKEN")
            .ok()
            .filter(|t| !t.trim().is_empty())
        {
            return Ok(Some(token.trim().to_string()));
        }
        let home_token =
            std::env::var_os("HOME").map(|h| std::path::PathBuf::from(h).join(".config/nip/token"));
        // The admin token a control plane on this machine wrote goes to that control plane
        // only: never to one named by a URL elsewhere.
        let local_admin = self.on_this_machine().then(crate::default_admin_token_file);
        for path in home_token.into_iter().chain(local_admin) {
            if path.is_file() {
                return read(&path).map(Some);
            }
        }
        Ok(None)
    }

    /// Whether the control plane's URL names this machine (a loopback address or
    /// `localhost`).
    fn on_this_machine(&self) -> bool {
        let rest = self
            .control_plane
            .split_once("://")
            .map_or(self.control_plane.as_str(), |(_, rest)| rest);
        let authority = rest.split(['/', '?']).next().unwrap_or("");
        let host = match authority.rsplit_once(':') {
            Some((host, port)) if port.bytes().all(|b| b.is_ascii_digit()) => host,
            _ => authority,
        };
        host.eq_ignore_ascii_case("localhost")
            || host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
    }

    /// The roots to trust for an `https://` control plane: `--ca-file`, else the bundle a
    /// local control plane wrote (`None`: the system's roots).
    fn trusted_roots(&self) -> Result<Option<Vec<ureq::tls::Certificate<'static>>>, Failure> {
        let local = crate::default_ca_dir().join(nip_control_plane::ca::TRUST_BUNDLE_FILE);
        let path = match &self.ca_file {
            Some(path) => path.clone(),
            None if local.is_file() => local,
            None => return Ok(None),
        };
        let pem = std::fs::read(&path).map_err(|e| {
            Failure::other(format!("cannot read the CA file {}: {e}", path.display()))
        })?;
        let roots: Vec<_> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(ureq::tls::PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if roots.is_empty() {
            return Err(Failure::other(format!(
                "the CA file {} holds no certificate",
                path.display()
            )));
        }
        Ok(Some(roots))
    }

    /// One call: the status and the JSON answer. Connection failures and non-JSON answers
    /// are failures; HTTP error statuses are returned for the caller to explain.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
        timeout: Duration,
    ) -> Result<(u16, Value), Failure> {
        let (agent, url, authorization) = self.agent(path, Some(timeout))?;
        let authorization = authorization.as_str();
        let response = match (method, body) {
            ("GET", _) => agent
                .get(&url)
                .header("authorization", authorization)
                .call(),
            ("DELETE", _) => agent
                .delete(&url)
                .header("authorization", authorization)
                .call(),
            ("PUT", Some(body)) => agent
                .put(&url)
                .header("authorization", authorization)
                .header("content-type", "application/json")
                .send(body.to_string()),
            (_, Some(body)) => agent
                .post(&url)
                .header("authorization", authorization)
                .header("content-type", "application/json")
                .send(body.to_string()),
            (_, None) => agent
                .post(&url)
                .header("authorization", authorization)
                .send_empty(),
        };
        Self::answer(&url, response)
    }

    /// An agent trusting the control plane's roots (calls bounded by `timeout`, if any), the
    /// URL of `path`, and the `authorization` header value.
    fn agent(
        &self,
        path: &str,
        timeout: Option<Duration>,
    ) -> Result<(ureq::Agent, String, String), Failure> {
        let url = format!("{}{path}", self.control_plane.trim_end_matches('/'));
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(timeout);
        if let Some(roots) = self.trusted_roots()? {
            config = config.tls_config(
                ureq::tls::TlsConfig::builder()
                    .root_certs(ureq::tls::RootCerts::new_with_certs(&roots))
                    .build(),
            );
        }
        let authorization = self
            .token()?
            .map(|t| format!("Bearer {t}"))
            .unwrap_or_default();
        Ok((config.build().into(), url, authorization))
    }

    /// The status and JSON of an answer.
    fn answer(
        url: &str,
        response: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> Result<(u16, Value), Failure> {
        let mut response =
            response.map_err(|e| Failure::other(format!("cannot reach {url}: {e}")))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| Failure::other(format!("bad answer from {url}: {e}")))?;
        let value = serde_json::from_str(&text)
            .map_err(|e| Failure::other(format!("bad answer from {url} (status {status}): {e}")))?;
        Ok((status, value))
    }
}

/// Turns an error answer into a failure; 422 lists every field problem and exits 2.
fn explain(status: u16, answer: &Value, subject: &str) -> Failure {
    let error = answer["error"].as_str().unwrap_or("request failed");
    if status == 422 {
        let mut message = format!("{subject}: {error}");
        for problem in answer["errors"].as_array().into_iter().flatten() {
            let path = problem["path"].as_str().unwrap_or("");
            let text = problem["message"].as_str().unwrap_or("");
            if path.is_empty() {
                message.push_str(&format!("\n  {text}"));
            } else {
                message.push_str(&format!("\n  {path}: {text}"));
            }
        }
        return Failure {
            message,
            code: ExitCode::from(crate::EXIT_BAD_CONFIG),
        };
    }
    let hint = match status {
        401 => " — give a token: NIP_TOKEN, --token-file or ~/.config/nip/token",
        _ => "",
    };
    Failure::other(format!("{subject}: {error} (HTTP {status}){hint}"))
}

fn finish(verb: &str, result: Result<(), Failure>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            eprintln!("nip {verb}: {}", failure.message);
            failure.code
        }
    }
}

fn when(ms: &Value) -> String {
    let ms = ms.as_u64().unwrap_or(0);
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

fn print_json(value: &Value) {
    println!(
        "{}",
        serde_json::to_string_pretty(value).unwrap_or_default()
    );
}

/// Uploads a plugin module to the control plane's store (`PUT /v1/modules`); its digest.
pub fn upload_module(remote: &Remote, module: &[u8]) -> Result<String, String> {
    let inner = || -> Result<String, Failure> {
        let (agent, url, authorization) =
            remote.agent("/v1/modules", Some(Duration::from_secs(60)))?;
        let response = agent
            .put(&url)
            .header("authorization", &authorization)
            .header("content-type", "application/wasm")
            .send(module);
        let (status, answer) = Remote::answer(&url, response)?;
        if !(200..300).contains(&status) {
            return Err(explain(status, &answer, "the plugin module"));
        }
        answer["sha256"]
            .as_str()
            .map(str::to_string)
            .ok_or_else(|| Failure::other(format!("{url} answered without a sha256: {answer}")))
    };
    inner().map_err(|f| f.message)
}

/// `nip metrics` without `--admin`: the control plane's per-route figures over the last
/// minute (from the access records proxies stream), as a table or, with `--export
/// prometheus`, as gauges.
pub fn traffic(remote: &Remote, export: Option<&str>) -> ExitCode {
    finish("metrics", traffic_inner(remote, export))
}

fn traffic_inner(remote: &Remote, export: Option<&str>) -> Result<(), Failure> {
    if let Some(format) = export.filter(|f| *f != "prometheus") {
        return Err(Failure {
            message: format!("--export {format:?}: the one format is prometheus"),
            code: ExitCode::from(crate::EXIT_BAD_CONFIG),
        });
    }
    let (status, answer) = remote.call("GET", "/v1/traffic", None, Duration::from_secs(30))?;
    if status != 200 {
        return Err(explain(status, &answer, "metrics"));
    }
    let routes = answer["routes"].as_array().cloned().unwrap_or_default();
    let number = |v: &Value, key: &str| v[key].as_f64().unwrap_or(0.0);
    if export.is_some() {
        for (name, key, help) in [
            (
                "nip_fleet_route_requests_per_second",
                "requests_per_second",
                "Requests per second over the last minute, from streamed access records",
            ),
            (
                "nip_fleet_route_error_ratio",
                "error_rate",
                "Share of 5xx answers over the last minute",
            ),
            (
                "nip_fleet_route_latency_p50_ms",
                "p50_ms",
                "Median duration over the last minute (ms)",
            ),
            (
                "nip_fleet_route_latency_p99_ms",
                "p99_ms",
                "99th percentile duration over the last minute (ms)",
            ),
        ] {
            println!("# HELP {name} {help}\n# TYPE {name} gauge");
            for route in &routes {
                let label = route["route"]
                    .as_str()
                    .unwrap_or("")
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"");
                println!("{name}{{route=\"{label}\"}} {}", number(route, key));
            }
        }
        return Ok(());
    }
    if routes.is_empty() {
        println!(
            "no access records in the last {} s: proxies stream them with control_plane.stream_access_logs: true (or give --admin to read proxies' own metrics)",
            answer["window_seconds"]
        );
        return Ok(());
    }
    println!(
        "{:<32} {:>12} {:>8} {:>10} {:>10}",
        "route", "requests/s", "5xx", "p50 ms", "p99 ms"
    );
    for route in &routes {
        println!(
            "{:<32} {:>12.2} {:>7.1}% {:>10.1} {:>10.1}",
            route["route"].as_str().unwrap_or(""),
            number(route, "requests_per_second"),
            number(route, "error_rate") * 100.0,
            number(route, "p50_ms"),
            number(route, "p99_ms"),
        );
    }
    Ok(())
}

/// What `nip logs` shows.
#[derive(Debug, Clone, clap::Args)]
pub struct LogsOptions {
    /// Keep following until interrupted.
    #[arg(short, long)]
    pub follow: bool,
    /// Only this proxy's records (its node id).
    #[arg(long)]
    pub proxy: Option<String>,
    /// Only this route's.
    #[arg(long)]
    pub route: Option<String>,
    /// Only these statuses: a code (503) or a class (5xx).
    #[arg(long)]
    pub status: Option<String>,
    /// How many kept records to start with.
    #[arg(long, default_value_t = 20)]
    pub limit: usize,
    /// Print each record's JSON.
    #[arg(long)]
    pub json: bool,
}

/// `nip logs`: the access records proxies stream to the control plane
/// (`control_plane.stream_access_logs`), the newest kept ones and, with `--follow`, each
/// as it comes until interrupted.
pub fn logs(remote: &Remote, options: &LogsOptions) -> ExitCode {
    finish("logs", logs_inner(remote, options))
}

fn logs_inner(remote: &Remote, options: &LogsOptions) -> Result<(), Failure> {
    let mut query = format!("/v1/logs?limit={}", options.limit);
    if options.follow {
        query.push_str("&follow=true");
    }
    for (name, value) in [
        ("proxy", &options.proxy),
        ("route", &options.route),
        ("status", &options.status),
    ] {
        if let Some(value) = value {
            query.push_str(&format!("&{name}={}", percent_encode(value)));
        }
    }
    let timeout = (!options.follow).then_some(Duration::from_secs(30));
    let (agent, url, authorization) = remote.agent(&query, timeout)?;
    let response = agent
        .get(&url)
        .header("authorization", &authorization)
        .call()
        .map_err(|e| Failure::other(format!("cannot reach {url}: {e}")))?;
    let status = response.status().as_u16();
    let mut body = response.into_body();
    if !(200..300).contains(&status) {
        let text = body.read_to_string().unwrap_or_default();
        let answer = serde_json::from_str(&text).unwrap_or(Value::Null);
        return Err(explain(status, &answer, "logs"));
    }
    use std::io::{BufRead, Write};
    let stdout = std::io::stdout();
    for line in std::io::BufReader::new(body.into_reader()).lines() {
        let line = line.map_err(|e| Failure::other(format!("{url}: {e}")))?;
        let mut out = stdout.lock();
        if options.json {
            let _ = writeln!(out, "{line}");
        } else if let Ok(record) = serde_json::from_str::<Value>(&line) {
            if let Some(lost) = record["lost"].as_u64() {
                let _ = writeln!(out, "({lost} record(s) went by too fast to show)");
            } else {
                let text = |key: &str| record[key].as_str().unwrap_or("").to_string();
                let _ = writeln!(
                    out,
                    "{} {} {} {} {} {:.1}ms route={} upstream={}",
                    text("start_time"),
                    text("node"),
                    record["status"],
                    text("method"),
                    text("path"),
                    record["duration_ms"].as_f64().unwrap_or(0.0),
                    text("route"),
                    text("upstream_host"),
                );
            }
        }
        let _ = out.flush();
    }
    Ok(())
}

/// A query-string value with the characters that would end or split it escaped.
pub(crate) fn percent_encode(value: &str) -> String {
    value
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// What `nip apply` asks for besides the file.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// Why (recorded with the version).
    pub message: String,
    /// Region to roll out to first.
    pub canary: Option<String>,
    /// How long the canary region has to ACK.
    pub canary_timeout: Duration,
    /// Apply even a config that serves nothing.
    pub allow_empty: bool,
    /// Print the API's JSON.
    pub json: bool,
    /// Replace only this tenant's routes and services (the file holds just those).
    pub tenant: Option<String>,
}

/// `nip apply -f FILE`: store and push a whole config (optionally as a canary), or with
/// `--tenant T` a tenant's routes and services only.
pub fn apply(remote: &Remote, file: &Path, options: &ApplyOptions) -> ExitCode {
    finish("apply", apply_inner(remote, file, options))
}

fn apply_inner(remote: &Remote, file: &Path, options: &ApplyOptions) -> Result<(), Failure> {
    let yaml = std::fs::read_to_string(file)
        .map_err(|e| Failure::other(format!("cannot read {}: {e}", file.display())))?;
    let mut body = json!({
        "yaml": yaml,
        "message": options.message,
        "allow_empty": options.allow_empty,
    });
    if let Some(region) = &options.canary {
        body["canary"] = json!({
            "region": region,
            "timeout_seconds": options.canary_timeout.as_secs_f64(),
        });
        eprintln!(
            "canary: pushing to region {region} first, waiting up to {} for its proxies to ACK",
            humantime::format_duration(options.canary_timeout)
        );
    }
    let (method, path) = match &options.tenant {
        None => ("POST", "/v1/config".to_string()),
        Some(tenant) => ("PUT", format!("/v1/tenants/{tenant}/config")),
    };
    let (status, answer) = remote.call(
        method,
        &path,
        Some(&body),
        options.canary_timeout + Duration::from_secs(30),
    )?;
    if options.json {
        print_json(&answer);
    }
    if !(200..300).contains(&status) {
        if answer["state"] == "aborted" {
            return Err(Failure::other(format!(
                "canary rolled back, version {} not applied: {}",
                answer["version"],
                answer["reason"].as_str().unwrap_or("")
            )));
        }
        return Err(explain(status, &answer, &file.display().to_string()));
    }
    if options.json {
        return Ok(());
    }
    let version = &answer["revision"]["version"];
    match answer["result"].as_str() {
        Some("unchanged") => println!("unchanged: version {version} is already current"),
        Some("promoted") => {
            let acked: Vec<&str> = answer["canary_acked_by"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            println!(
                "version {version}: canary ACKed by {} ({}), promoted to every proxy",
                acked.len(),
                acked.join(", ")
            );
            print!("{}", answer["diff"].as_str().unwrap_or(""));
        }
        _ => {
            println!("version {version} applied and pushed to every proxy");
            print!("{}", answer["diff"].as_str().unwrap_or(""));
        }
    }
    Ok(())
}

/// `nip get config [--tenant T]`: the current config's YAML, or a tenant's part of it.
pub fn get_config(remote: &Remote, tenant: Option<&str>) -> ExitCode {
    finish("get config", get_config_inner(remote, tenant))
}

fn get_config_inner(remote: &Remote, tenant: Option<&str>) -> Result<(), Failure> {
    let path = match tenant {
        None => "/v1/config".to_string(),
        Some(tenant) => format!("/v1/tenants/{tenant}/config"),
    };
    let (status, answer) = remote.call("GET", &path, None, Duration::from_secs(30))?;
    if status != 200 {
        return Err(explain(status, &answer, "config"));
    }
    print!("{}", answer["yaml"].as_str().unwrap_or(""));
    Ok(())
}

/// `nip get proxies`: one line per proxy, NACK reasons in full.
pub fn get_proxies(remote: &Remote, json: bool) -> ExitCode {
    finish("get proxies", get_proxies_inner(remote, json))
}

fn get_proxies_inner(remote: &Remote, json: bool) -> Result<(), Failure> {
    let (status, proxies) = remote.call("GET", "/v1/proxies", None, Duration::from_secs(30))?;
    if status != 200 {
        return Err(explain(status, &proxies, "proxies"));
    }
    if json {
        print_json(&proxies);
        return Ok(());
    }
    println!(
        "{:<24} {:<12} {:<10} {:<8} LAST NACK",
        "NODE", "REGION", "CONNECTED", "VERSION"
    );
    for proxy in proxies.as_array().into_iter().flatten() {
        let text = |key: &str| proxy[key].as_str().unwrap_or("").to_string();
        let nack = match &proxy["last_nack"] {
            Value::Null => "-".to_string(),
            nack => format!(
                "{}: {}",
                nack["type_url"]
                    .as_str()
                    .unwrap_or("")
                    .rsplit('.')
                    .next()
                    .unwrap_or(""),
                nack["reason"].as_str().unwrap_or("")
            ),
        };
        let version = proxy["config_version"].as_str().unwrap_or("updating");
        println!(
            "{:<24} {:<12} {:<10} {:<8} {nack}",
            text("node_id"),
            text("region"),
            proxy["connected"].as_bool().unwrap_or(false),
            version,
        );
    }
    Ok(())
}

/// `nip history [VERSION]`: the list of versions, or one version's diff.
pub fn history(remote: &Remote, version: Option<u64>, limit: u32, json: bool) -> ExitCode {
    finish("history", history_inner(remote, version, limit, json))
}

fn history_inner(
    remote: &Remote,
    version: Option<u64>,
    limit: u32,
    json: bool,
) -> Result<(), Failure> {
    let timeout = Duration::from_secs(30);
    if let Some(version) = version {
        let (status, revision) =
            remote.call("GET", &format!("/v1/history/{version}"), None, timeout)?;
        if status != 200 {
            return Err(explain(status, &revision, &format!("version {version}")));
        }
        if json {
            print_json(&revision);
        } else {
            println!(
                "version {version} by {} at {} ({}, {})",
                revision["author"].as_str().unwrap_or(""),
                when(&revision["created_at_ms"]),
                revision["action"].as_str().unwrap_or(""),
                revision["state"].as_str().unwrap_or(""),
            );
            if let Some(message) = revision["message"].as_str().filter(|m| !m.is_empty()) {
                println!("    {message}");
            }
            print!("{}", revision["diff"].as_str().unwrap_or(""));
        }
        return Ok(());
    }
    let (status, revisions) =
        remote.call("GET", &format!("/v1/history?limit={limit}"), None, timeout)?;
    if status != 200 {
        return Err(explain(status, &revisions, "history"));
    }
    if json {
        print_json(&revisions);
        return Ok(());
    }
    println!(
        "{:<8} {:<21} {:<20} {:<9} {:<8} MESSAGE",
        "VERSION", "WHEN", "AUTHOR", "ACTION", "STATE"
    );
    for revision in revisions.as_array().into_iter().flatten() {
        let action = match revision["restored_from"].as_i64() {
            Some(from) => format!("rollback to {from}"),
            None => revision["action"].as_str().unwrap_or("").to_string(),
        };
        let state = match (
            revision["state"].as_str(),
            revision["canary_region"].as_str(),
        ) {
            (Some(state), Some(region)) => format!("{state} ({region})"),
            (state, _) => state.unwrap_or("").to_string(),
        };
        println!(
            "{:<8} {:<21} {:<20} {:<9} {:<8} {}",
            revision["version"],
            when(&revision["created_at_ms"]),
            revision["author"].as_str().unwrap_or(""),
            action,
            state,
            revision["message"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

/// `nip rollback VERSION`: restore a past version as a new one.
pub fn rollback(remote: &Remote, version: u64, message: &str) -> ExitCode {
    finish("rollback", rollback_inner(remote, version, message))
}

fn rollback_inner(remote: &Remote, version: u64, message: &str) -> Result<(), Failure> {
    let (status, answer) = remote.call(
        "POST",
        &format!("/v1/rollback/{version}"),
        Some(&json!({ "message": message })),
        Duration::from_secs(30),
    )?;
    if !(200..300).contains(&status) {
        return Err(explain(status, &answer, &format!("version {version}")));
    }
    let now = &answer["revision"]["version"];
    if answer["result"] == "unchanged" {
        println!("unchanged: version {now} already holds version {version}'s config");
    } else {
        println!("version {now} restores version {version}; pushed to every proxy");
        print!("{}", answer["diff"].as_str().unwrap_or(""));
    }
    Ok(())
}

/// What `nip token create` asks for.
#[derive(Debug, Clone)]
pub struct NewTokenOptions {
    /// The token's name (what `nip token revoke` takes).
    pub name: String,
    /// viewer, operator, admin or join.
    pub role: String,
    /// A join token's node.
    pub node: Option<String>,
    /// A join token's region.
    pub region: Option<String>,
    /// Tenants it is limited to (none: every tenant).
    pub tenants: Vec<String>,
    /// Lifetime, e.g. 30d (none: until revoked).
    pub ttl: Option<String>,
    /// Print the API's JSON.
    pub json: bool,
}

/// `nip token create NAME --role R`: prints the new token, once.
pub fn token_create(remote: &Remote, options: &NewTokenOptions) -> ExitCode {
    finish("token create", token_create_inner(remote, options))
}

fn token_create_inner(remote: &Remote, options: &NewTokenOptions) -> Result<(), Failure> {
    let mut body = json!({
        "name": options.name,
        "role": options.role,
        "tenants": options.tenants,
    });
    if let Some(ttl) = &options.ttl {
        body["ttl"] = json!(ttl);
    }
    if let Some(node) = &options.node {
        body["node"] = json!(node);
    }
    if let Some(region) = &options.region {
        body["region"] = json!(region);
    }
    let (status, answer) =
        remote.call("POST", "/v1/tokens", Some(&body), Duration::from_secs(30))?;
    if status != 201 {
        return Err(explain(
            status,
            &answer,
            &format!("token {:?}", options.name),
        ));
    }
    if options.json {
        print_json(&answer);
        return Ok(());
    }
    let expires = match &answer["expires_at_ms"] {
        Value::Null => "never expires".to_string(),
        ms => format!("expires {}", when(ms)),
    };
    eprintln!(
        "token {:?} ({}, {expires}); it is shown this once:",
        options.name, options.role
    );
    println!("{}", answer["token"].as_str().unwrap_or(""));
    Ok(())
}

/// `nip token list`: every token's name, role, scope and state (never a secret).
pub fn token_list(remote: &Remote, json: bool) -> ExitCode {
    finish("token list", token_list_inner(remote, json))
}

fn token_list_inner(remote: &Remote, json: bool) -> Result<(), Failure> {
    let (status, tokens) = remote.call("GET", "/v1/tokens", None, Duration::from_secs(30))?;
    if status != 200 {
        return Err(explain(status, &tokens, "tokens"));
    }
    if json {
        print_json(&tokens);
        return Ok(());
    }
    println!(
        "{:<28} {:<9} {:<8} {:<16} {:<21} CREATED BY",
        "NAME", "ROLE", "STATE", "SCOPE", "EXPIRES"
    );
    for token in tokens.as_array().into_iter().flatten() {
        let tenants: Vec<&str> = token["tenants"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(Value::as_str)
            .collect();
        let expires = match &token["expires_at_ms"] {
            Value::Null => "never".to_string(),
            ms => when(ms),
        };
        println!(
            "{:<28} {:<9} {:<8} {:<16} {:<21} {}",
            token["name"].as_str().unwrap_or(""),
            token["role"].as_str().unwrap_or(""),
            token["state"].as_str().unwrap_or(""),
            if tenants.is_empty() {
                "*".to_string()
            } else {
                tenants.join(",")
            },
            expires,
            token["created_by"].as_str().unwrap_or(""),
        );
    }
    Ok(())
}

/// `nip token revoke NAME`: the token stops working at once, for good.
pub fn token_revoke(remote: &Remote, name: &str) -> ExitCode {
    finish("token revoke", token_revoke_inner(remote, name))
}

fn token_revoke_inner(remote: &Remote, name: &str) -> Result<(), Failure> {
    let (status, answer) = remote.call(
        "DELETE",
        &format!("/v1/tokens/{name}"),
        None,
        Duration::from_secs(30),
    )?;
    if status != 200 {
        return Err(explain(status, &answer, &format!("token {name:?}")));
    }
    println!("token {name:?} revoked");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::Remote;

    #[test]
    fn the_local_admin_token_goes_only_to_a_control_plane_on_this_machine() {
        let remote = |url: &str| Remote {
            control_plane: url.to_string(),
            ca_file: None,
            token_file: None,
        };
        for url in [
            "https://127.0.0.1:18001",
            "https://localhost:18001/",
            "http://[::1]:18001",
            "https://127.0.0.2",
        ] {
            assert!(remote(url).on_this_machine(), "{url}");
        }
        for url in [
            "https://cp.example.com:18001",
            "https://10.0.0.1:18001",
            "https://localhost.evil.example",
            "https://127.0.0.1.evil.example:443",
        ] {
            assert!(!remote(url).on_this_machine(), "{url}");
        }
    }
}
