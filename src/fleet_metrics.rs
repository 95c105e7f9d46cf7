//! `nip metrics`: the fleet's metrics from each proxy's admin port — a summary per route
//! (requests, 5xx share, p50 and p99 from the latency histogram), or the Prometheus text of
//! every proxy with an `instance` label (`--export prometheus`), to paste into a scrape or a
//! file.

use std::collections::BTreeMap;

/// One route's numbers, summed over the proxies.
#[derive(Debug, Default)]
struct RouteSummary {
    requests: f64,
    errors: f64,
    /// Cumulative latency buckets: upper bound → count.
    buckets: BTreeMap<OrderedBound, f64>,
}

/// A bucket bound that sorts (`+Inf` last).
#[derive(Debug, Clone, Copy, PartialEq)]
struct OrderedBound(f64);

impl Eq for OrderedBound {}

impl PartialOrd for OrderedBound {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for OrderedBound {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.0.total_cmp(&other.0)
    }
}

/// A sample: its name, labels and value.
type Sample<'a> = (&'a str, Vec<(&'a str, &'a str)>, f64);

/// One sample line, read.
fn sample(line: &str) -> Option<Sample<'_>> {
    if line.starts_with('#') || line.trim().is_empty() {
        return None;
    }
    let (head, value) = line.rsplit_once(' ')?;
    let value: f64 = value.parse().ok()?;
    let (name, labels) = match head.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (head, ""),
    };
    let labels = labels
        .split("\",")
        .filter(|l| !l.is_empty())
        .filter_map(|pair| {
            let (key, value) = pair.split_once("=\"")?;
            Some((key, value.trim_end_matches('"')))
        })
        .collect();
    Some((name, labels, value))
}

fn label<'a>(labels: &[(&'a str, &'a str)], key: &str) -> &'a str {
    labels
        .iter()
        .find(|(k, _)| *k == key)
        .map_or("", |(_, v)| v)
}

/// Adds one proxy's `/metrics` text to the per-route summaries.
fn add(text: &str, routes: &mut BTreeMap<String, RouteSummary>) {
    for (name, labels, value) in text.lines().filter_map(sample) {
        let route = label(&labels, "route");
        match name {
            "nip_requests_total" => {
                let summary = routes.entry(route.to_string()).or_default();
                summary.requests += value;
                if label(&labels, "status_class") == "5xx" {
                    summary.errors += value;
                }
            }
            "nip_request_duration_seconds_bucket" => {
                let bound = match label(&labels, "le") {
                    "+Inf" => f64::INFINITY,
                    other => match other.parse() {
                        Ok(bound) => bound,
                        Err(_) => continue,
                    },
                };
                *routes
                    .entry(route.to_string())
                    .or_default()
                    .buckets
                    .entry(OrderedBound(bound))
                    .or_default() += value;
            }
            _ => {}
        }
    }
}

/// The `q` quantile from cumulative buckets, interpolated within a bucket as Prometheus's
/// `histogram_quantile` does; `None` without observations.
fn quantile(buckets: &BTreeMap<OrderedBound, f64>, q: f64) -> Option<f64> {
    let total = buckets.values().copied().fold(0.0, f64::max);
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for (bound, count) in buckets {
        if *count >= rank {
            if bound.0.is_infinite() {
                return Some(lower.0);
            }
            let in_bucket = count - lower.1;
            let share = if in_bucket > 0.0 {
                (rank - lower.1) / in_bucket
            } else {
                1.0
            };
            return Some(lower.0 + (bound.0 - lower.0) * share);
        }
        lower = (bound.0, *count);
    }
    Some(lower.0)
}

/// The per-route table.
fn table(routes: &BTreeMap<String, RouteSummary>, proxies: usize) -> String {
    let mut out = format!(
        "{proxies} proxies\n{:<24} {:>10} {:>8} {:>10} {:>10}\n",
        "route", "requests", "5xx", "p50 ms", "p99 ms"
    );
    let ms = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |s| format!("{:.1}", s * 1e3));
    for (route, summary) in routes {
        let name = if route.is_empty() {
            "(no route)"
        } else {
            route.as_str()
        };
        let share = if summary.requests > 0.0 {
            format!("{:.1}%", summary.errors / summary.requests * 100.0)
        } else {
            "-".to_string()
        };
        out.push_str(&format!(
            "{name:<24} {:>10} {share:>8} {:>10} {:>10}\n",
            summary.requests,
            ms(quantile(&summary.buckets, 0.5)),
            ms(quantile(&summary.buckets, 0.99)),
        ));
    }
    out
}

/// Each proxy's text with an `instance` label on every sample (comments kept once).
fn export(texts: &[(String, String)]) -> String {
    let mut out = String::new();
    let mut seen_comments = std::collections::HashSet::new();
    for (instance, text) in texts {
        for line in text.lines() {
            if line.starts_with('#') {
                if seen_comments.insert(line.to_string()) {
                    out.push_str(line);
                    out.push('\n');
                }
                continue;
            }
            let Some((head, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let labelled = match head.split_once('{') {
                Some((name, rest)) => format!("{name}{{instance=\"{instance}\",{rest}"),
                None => format!("{head}{{instance=\"{instance}\"}}"),
            };
            out.push_str(&format!("{labelled} {value}\n"));
        }
    }
    out
}

/// `nip metrics`: reads every admin address and prints the summary or the export.
pub fn run(admins: &[String], export_format: Option<&str>) -> std::process::ExitCode {
    use std::process::ExitCode;
    if let Some(format) = export_format.filter(|f| *f != "prometheus") {
        eprintln!("nip metrics: --export {format:?}: the one format is prometheus");
        return ExitCode::from(2);
    }
    let mut texts = Vec::new();
    for admin in admins {
        let base = if admin.contains("://") {
            admin.clone()
        } else {
            format!("http://{admin}")
        };
        let url = format!("{}/metrics", base.trim_end_matches('/'));
        match ureq::get(&url)
            .call()
            .map_err(|e| e.to_string())
            .and_then(|mut r| r.body_mut().read_to_string().map_err(|e| e.to_string()))
        {
            Ok(text) => texts.push((admin.clone(), text)),
            Err(e) => {
                eprintln!("nip metrics: {url}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    if export_format.is_some() {
        print!("{}", export(&texts));
        return ExitCode::SUCCESS;
    }
    let mut routes = BTreeMap::new();
    for (_, text) in &texts {
        add(text, &mut routes);
    }
    print!("{}", table(&routes, texts.len()));
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_are_summed_over_proxies_and_quantiles_interpolated() {
        let proxy = |n: f64| {
            format!(
                "# TYPE nip_requests counter\nnip_requests_total{{route=\"api\",cluster=\"c\",status_class=\"2xx\"}} {n}\nnip_requests_total{{route=\"api\",cluster=\"c\",status_class=\"5xx\"}} 1\nnip_request_duration_seconds_bucket{{route=\"api\",le=\"0.01\"}} {}\nnip_request_duration_seconds_bucket{{route=\"api\",le=\"0.1\"}} {}\nnip_request_duration_seconds_bucket{{route=\"api\",le=\"+Inf\"}} {}\n",
                n / 2.0,
                n + 1.0,
                n + 1.0
            )
        };
        let mut routes = BTreeMap::new();
        add(&proxy(9.0), &mut routes);
        add(&proxy(9.0), &mut routes);
        let api = &routes["api"];
        assert_eq!(api.requests, 20.0);
        assert_eq!(api.errors, 2.0);
        // 9 of 20 under 10 ms: the median sits just past it.
        let p50 = quantile(&api.buckets, 0.5).unwrap();
        assert!(p50 > 0.01 && p50 < 0.02, "{p50}");
        let table = table(&routes, 2);
        assert!(table.contains("2 proxies"));
        assert!(table.contains("10.0%"), "{table}");
        let exported = export(&[("a:1".into(), proxy(1.0))]);
        assert!(exported.contains(
            "nip_requests_total{instance=\"a:1\",route=\"api\",cluster=\"c\",status_class=\"5xx\"} 1"
        ));
        assert_eq!(exported.matches("# TYPE").count(), 1);
    }
}
