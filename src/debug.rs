//! `nip debug`: a console on one proxy's admin port, for a plain terminal — one command per
//! line, plain text back. What the proxy routes, its clusters with each endpoint's health
//! and latency prediction, its plugins, a live tap of one route's requests (bounded by a
//! count and a time), and the lines its plugins logged. Given a command on the command
//! line, it runs that one and exits. The config dump is proto3 JSON (Envoy's camelCase
//! field names).

use serde_json::Value;
use std::io::{BufRead, Write};
use std::time::Duration;

/// How long one admin call may take (a tap has its own bound).
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a tap watches.
const TAP_SECONDS: u64 = 30;

const HELP: &str = "\
commands:
  routes                      the routes in force: name, match, where they go, filters
  clusters                    each cluster's endpoints: health, load, latency and prediction
  plugins                     plugins: module digest, health, process state
  tap ROUTE [COUNT] [STATUS]  the next COUNT (10) requests of ROUTE as they finish, at most
                              30 s; STATUS filters (503, 5xx); ROUTE '*' for any route
  logs [PLUGIN] [COUNT]       the latest COUNT (20) lines the plugins (or one) logged
  help                        this
  quit                        leave (or end the input)";

/// Runs the console on `admin` (`127.0.0.1:9901` or a URL): `command` once, or commands
/// read from standard input until `quit` or its end.
pub fn run(admin: &str, command: &[String]) -> std::process::ExitCode {
    let base = if admin.starts_with("http://") || admin.starts_with("https://") {
        admin.trim_end_matches('/').to_string()
    } else {
        format!("http://{admin}")
    };
    let console = Console { base };
    if !command.is_empty() {
        return match console.execute(&command.join(" ")) {
            Ok(_) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nip debug: {e}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    println!("nip debug on {} — type help", console.base);
    let stdin = std::io::stdin();
    let mut line = String::new();
    loop {
        print!("nip debug> ");
        let _ = std::io::stdout().flush();
        line.clear();
        match stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        match console.execute(line.trim()) {
            Ok(true) => {}
            Ok(false) => break,
            Err(e) => println!("error: {e}"),
        }
    }
    std::process::ExitCode::SUCCESS
}

struct Console {
    base: String,
}

impl Console {
    /// Runs one command line; false to leave.
    fn execute(&self, line: &str) -> Result<bool, String> {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            [] => {}
            ["help"] | ["?"] => println!("{HELP}"),
            ["quit"] | ["exit"] => return Ok(false),
            ["routes"] => self.routes()?,
            ["clusters"] => self.clusters()?,
            ["plugins"] => self.plugins()?,
            ["tap", route, rest @ ..] if rest.len() <= 2 => {
                let count = match rest.first() {
                    Some(n) => n
                        .parse::<usize>()
                        .map_err(|_| format!("tap: COUNT {n:?} is not a number"))?,
                    None => 10,
                };
                self.tap(route, count, rest.get(1).copied())?;
            }
            ["logs", rest @ ..] if rest.len() <= 2 => {
                let (plugin, count) = match rest {
                    [] => (None, 20),
                    [one] => match one.parse::<usize>() {
                        Ok(n) => (None, n),
                        Err(_) => (Some(*one), 20),
                    },
                    [plugin, n, ..] => (
                        Some(*plugin),
                        n.parse::<usize>()
                            .map_err(|_| format!("logs: COUNT {n:?} is not a number"))?,
                    ),
                };
                self.logs(plugin, count)?;
            }
            _ => println!("unknown command {line:?}; type help"),
        }
        Ok(true)
    }

    fn get(&self, path: &str, timeout: Duration) -> Result<ureq::Body, String> {
        let url = format!("{}{path}", self.base);
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let response = agent
            .get(&url)
            .call()
            .map_err(|e| format!("cannot reach {url}: {e}"))?;
        let status = response.status();
        let mut body = response.into_body();
        if !status.is_success() {
            let text = body.read_to_string().unwrap_or_default();
            return Err(format!("{url}: {status}: {}", text.trim()));
        }
        Ok(body)
    }

    fn json(&self, path: &str) -> Result<Value, String> {
        let text = self
            .get(path, CALL_TIMEOUT)?
            .read_to_string()
            .map_err(|e| format!("{path}: {e}"))?;
        serde_json::from_str(&text).map_err(|e| format!("{path}: not JSON: {e}"))
    }

    fn routes(&self) -> Result<(), String> {
        let dump = self.json("/config_dump")?;
        println!("config version {}", text(&dump["version_info"]));
        for config in array(&dump["route_configs"]) {
            for host in array(&config["virtualHosts"]) {
                let domains: Vec<String> = array(&host["domains"]).iter().map(text).collect();
                println!(
                    "virtual host {} ({})",
                    text(&host["name"]),
                    domains.join(", ")
                );
                for route in array(&host["routes"]) {
                    let filters: Vec<&String> = route["typedPerFilterConfig"]
                        .as_object()
                        .map(|m| m.keys().collect())
                        .unwrap_or_default();
                    println!(
                        "  {:<24} {:<32} → {}{}",
                        text(&route["name"]),
                        route_match(&route["match"]),
                        route_target(route),
                        if filters.is_empty() {
                            String::new()
                        } else {
                            format!(
                                "  [{}]",
                                filters
                                    .iter()
                                    .map(|f| f.as_str())
                                    .collect::<Vec<_>>()
                                    .join(", ")
                            )
                        }
                    );
                }
            }
        }
        Ok(())
    }

    fn clusters(&self) -> Result<(), String> {
        let clusters = self.json("/clusters")?;
        for cluster in array(&clusters["clusters"]) {
            println!(
                "{} ({}, {} healthy, {} active requests{})",
                text(&cluster["name"]),
                text(&cluster["lb_policy"]),
                cluster["healthy_endpoints"],
                cluster["rq_active"],
                match cluster["current_region"].as_str() {
                    Some(region) if !region.is_empty() => format!(", serving from {region}"),
                    _ => String::new(),
                }
            );
            for endpoint in array(&cluster["endpoints"]) {
                let state = if endpoint["ejected"] == true {
                    "ejected"
                } else if endpoint["healthy"] == true {
                    "healthy"
                } else {
                    "unhealthy"
                };
                println!(
                    "  {:<22} {:<9} region {:<10} active {:<4} latency {:>7.1} ms  predicted {:>7.1} ms  requests {}",
                    text(&endpoint["address"]),
                    state,
                    text(&endpoint["region"]),
                    endpoint["active_requests"],
                    endpoint["latency_ewma_ms"].as_f64().unwrap_or(0.0),
                    endpoint["predicted_ms"].as_f64().unwrap_or(0.0),
                    endpoint["requests_total"],
                );
            }
        }
        Ok(())
    }

    fn plugins(&self) -> Result<(), String> {
        let plugins = self.json("/plugins")?;
        for plugin in array(&plugins["plugins"]) {
            let digest = text(&plugin["module_sha256"]);
            println!(
                "{} (wasm, module {}, fail {}){}",
                text(&plugin["name"]),
                digest.get(..12).unwrap_or(&digest),
                if plugin["fail_open"] == true {
                    "open"
                } else {
                    "closed"
                },
                health(&plugin["health"]),
            );
        }
        if let Some(processes) = plugins["processes"].as_object() {
            for (name, process) in processes {
                println!(
                    "{name} (process {}, pid {}, restarts {}){}",
                    text(&process["state"]),
                    process["pid"],
                    process["restarts"],
                    health(&process["health"]),
                );
            }
        }
        Ok(())
    }

    /// The names of the routes in force.
    fn route_names(&self) -> Result<Vec<String>, String> {
        let dump = self.json("/config_dump")?;
        Ok(array(&dump["route_configs"])
            .iter()
            .flat_map(|config| array(&config["virtualHosts"]))
            .flat_map(|host| array(&host["routes"]))
            .map(|route| text(&route["name"]))
            .collect())
    }

    fn tap(&self, route: &str, count: usize, status: Option<&str>) -> Result<(), String> {
        if route != "*" {
            // Watching a route that is not there would only wait out the time.
            let names = self.route_names()?;
            if !names.iter().any(|n| n == route) {
                return Err(format!(
                    "tap: no route named {route:?} (routes: {}; '*' for any)",
                    names.join(", ")
                ));
            }
        }
        let mut path = format!("/tap?limit={count}&seconds={TAP_SECONDS}");
        if route != "*" {
            path.push_str(&format!("&route={}", crate::remote::percent_encode(route)));
        }
        if let Some(status) = status {
            path.push_str(&format!(
                "&status={}",
                crate::remote::percent_encode(status)
            ));
        }
        println!(
            "watching {} for {count} request(s), at most {TAP_SECONDS} s…",
            if route == "*" { "every route" } else { route }
        );
        let _ = std::io::stdout().flush();
        let body = self.get(&path, Duration::from_secs(TAP_SECONDS + 5))?;
        let mut seen = 0;
        for line in std::io::BufReader::new(body.into_reader()).lines() {
            let line = line.map_err(|e| format!("tap: {e}"))?;
            let Ok(record) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            if let Some(lost) = record["tap_lost"].as_u64() {
                println!("  ({lost} request(s) went by too fast to show)");
                continue;
            }
            seen += 1;
            println!(
                "  {} {} {} {} {} ms → {} {} {}",
                text(&record["start_time"]),
                record["response_code"],
                text(&record["method"]),
                text(&record["path"]),
                record["duration_ms"],
                text(&record["upstream_cluster"]),
                text(&record["upstream_host"]),
                text(&record["response_flags"]),
            );
            let _ = std::io::stdout().flush();
        }
        println!("{seen} request(s) shown");
        Ok(())
    }

    fn logs(&self, plugin: Option<&str>, count: usize) -> Result<(), String> {
        let mut path = format!("/plugins/logs?limit={count}");
        if let Some(plugin) = plugin {
            path.push_str(&format!(
                "&plugin={}",
                crate::remote::percent_encode(plugin)
            ));
        }
        let lines = self.json(&path)?;
        if array(&lines).is_empty() {
            println!("no plugin has logged anything yet");
        }
        for line in array(&lines) {
            println!(
                "{} {:<5} {}: {}",
                text(&line["time"]),
                text(&line["level"]),
                text(&line["plugin"]),
                text(&line["message"])
            );
        }
        Ok(())
    }
}

fn array(value: &Value) -> &[Value] {
    value.as_array().map(Vec::as_slice).unwrap_or_default()
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

fn health(value: &Value) -> String {
    match value["healthy"].as_bool() {
        Some(true) => ", healthy".to_string(),
        Some(false) => format!(", UNHEALTHY: {}", text(&value["message"])),
        None => String::new(),
    }
}

/// A route's match in a few words.
fn route_match(m: &Value) -> String {
    let path = if let Some(prefix) = m["prefix"].as_str() {
        format!("prefix {prefix}")
    } else if let Some(path) = m["path"].as_str() {
        format!("path {path}")
    } else if let Some(prefix) = m["pathSeparatedPrefix"].as_str() {
        format!("prefix {prefix}")
    } else if let Some(regex) = m["safeRegex"]["regex"].as_str() {
        format!("regex {regex}")
    } else {
        "any".to_string()
    };
    let headers = array(&m["headers"]).len();
    if headers > 0 {
        format!("{path} +{headers} header(s)")
    } else {
        path
    }
}

/// Where a route sends requests.
fn route_target(route: &Value) -> String {
    if let Some(cluster) = route["route"]["cluster"].as_str() {
        return cluster.to_string();
    }
    let weighted = array(&route["route"]["weightedClusters"]["clusters"]);
    if !weighted.is_empty() {
        return weighted
            .iter()
            .map(|c| format!("{} ({})", text(&c["name"]), text(&c["weight"])))
            .collect::<Vec<_>>()
            .join(", ");
    }
    if route["redirect"].is_object() {
        return "redirect".to_string();
    }
    if route["directResponse"].is_object() {
        return format!("direct response {}", route["directResponse"]["status"]);
    }
    "-".to_string()
}
