//! `nip test --integration`: the project's declared cases (`cases.yaml`: a request and
//! what its answer must be) sent through a real proxy running the project's config with
//! the freshly built plugin, in front of the echo backend.

use super::build::build;
use super::session::{Expect, Session};
use super::Project;
use anyhow::{anyhow, bail, Context as _};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;

/// How long one case's request may take.
const CASE_TIMEOUT: Duration = Duration::from_secs(10);

/// `cases.yaml`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cases {
    /// The cases, run in order.
    pub cases: Vec<Case>,
}

/// One request and what its answer must be.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Case {
    /// What it checks (printed).
    pub name: String,
    /// What is sent.
    pub request: CaseRequest,
    /// What must come back.
    pub expect: CaseExpect,
}

/// A case's request.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseRequest {
    /// `GET` unless said.
    #[serde(default = "default_method")]
    pub method: String,
    /// Path and query.
    pub path: String,
    /// Request headers.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Request body.
    #[serde(default)]
    pub body: Option<String>,
}

fn default_method() -> String {
    "GET".into()
}

/// What a case's answer must be; what is left out is not checked.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CaseExpect {
    /// The status code.
    #[serde(default)]
    pub status: Option<u16>,
    /// Response headers, each equal.
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// The whole body.
    #[serde(default)]
    pub body: Option<String>,
    /// Text the body holds.
    #[serde(default)]
    pub body_contains: Option<String>,
    /// Fields the JSON body has with these values (objects match by the keys given, at
    /// any depth).
    #[serde(default)]
    pub json: Option<serde_yaml::Value>,
}

/// Reads a cases file; the error names the field.
pub fn read(path: &std::path::Path) -> anyhow::Result<Cases> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let cases: Cases = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text))
        .map_err(|e| anyhow!("{}: {}: {}", path.display(), e.path(), e.inner()))?;
    for (index, case) in cases.cases.iter().enumerate() {
        if !case.request.path.starts_with('/') {
            bail!(
                "{}: cases[{index}].request.path: must start with /",
                path.display()
            );
        }
    }
    Ok(cases)
}

/// Builds the plugin, starts the proxy, runs every case; true when all passed.
pub fn run(project: &Project) -> anyhow::Result<bool> {
    let cases = read(&project.path(&project.manifest.cases))?;
    eprintln!(
        "building {} ({})…",
        project.manifest.name,
        project.manifest.language.name()
    );
    let built = build(project)?;
    eprintln!("built in {:.1}s", built.took.as_secs_f64());
    let mut session = Session::start(project, 0, false)?;
    session.wait_serving(
        &project.manifest.name,
        &Expect {
            module_sha256: built.module_sha256.clone(),
            previous_pid: None,
            refusals_before: None,
        },
    )?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(CASE_TIMEOUT))
        .build()
        .into();
    let mut failed = 0;
    for case in &cases.cases {
        match check(&agent, &session.url, case) {
            Ok(()) => println!("ok    {}", case.name),
            Err(problems) => {
                failed += 1;
                println!("FAIL  {}", case.name);
                for problem in problems {
                    println!("      {problem}");
                }
            }
        }
    }
    println!(
        "{} passed, {failed} failed ({} cases)",
        cases.cases.len() - failed,
        cases.cases.len()
    );
    if failed > 0 {
        println!("proxy log: {}", session.log.display());
    }
    Ok(failed == 0)
}

/// Sends a case's request; the problems with its answer.
fn check(agent: &ureq::Agent, base: &str, case: &Case) -> Result<(), Vec<String>> {
    let request = &case.request;
    let url = format!("{base}{}", request.path);
    let mut builder = ureq::http::Request::builder()
        .method(request.method.as_str())
        .uri(&url);
    for (name, value) in &request.headers {
        builder = builder.header(name, value);
    }
    let body = request.body.clone().unwrap_or_default();
    let sent = builder
        .body(body)
        .map_err(|e| vec![format!("request: {e}")])
        .and_then(|r| {
            agent
                .run(r)
                .map_err(|e| vec![format!("{} {url}: {e}", request.method)])
        })?;
    let mut response = sent;
    let status = response.status().as_u16();
    let headers: BTreeMap<String, String> = response
        .headers()
        .iter()
        .map(|(n, v)| {
            (
                n.as_str().to_string(),
                String::from_utf8_lossy(v.as_bytes()).into(),
            )
        })
        .collect();
    let text = response
        .body_mut()
        .read_to_string()
        .map_err(|e| vec![format!("reading the body: {e}")])?;
    let expect = &case.expect;
    let mut problems = Vec::new();
    if let Some(want) = expect.status {
        if want != status {
            problems.push(format!("status: want {want}, got {status}"));
        }
    }
    for (name, want) in &expect.headers {
        match headers.get(&name.to_ascii_lowercase()) {
            Some(got) if got == want => {}
            Some(got) => problems.push(format!("header {name}: want {want:?}, got {got:?}")),
            None => problems.push(format!("header {name}: want {want:?}, missing")),
        }
    }
    if let Some(want) = &expect.body {
        if *want != text {
            problems.push(format!("body: want {want:?}, got {text:?}"));
        }
    }
    if let Some(want) = &expect.body_contains {
        if !text.contains(want.as_str()) {
            problems.push(format!("body: want text {want:?}, got {text:?}"));
        }
    }
    if let Some(want) = &expect.json {
        match (
            serde_json::to_value(want),
            serde_json::from_str::<serde_json::Value>(&text),
        ) {
            (Ok(want), Ok(got)) => json_subset(&want, &got, "json", &mut problems),
            (Err(e), _) => problems.push(format!("json: {e}")),
            (_, Err(e)) => problems.push(format!("json: the body is not JSON ({e}): {text:?}")),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(problems)
    }
}

/// Whether `got` has what `want` has: objects by the keys `want` names, arrays item by
/// item, anything else equal.
fn json_subset(
    want: &serde_json::Value,
    got: &serde_json::Value,
    at: &str,
    problems: &mut Vec<String>,
) {
    use serde_json::Value;
    match (want, got) {
        (Value::Object(want), Value::Object(got)) => {
            for (key, want) in want {
                match got.get(key) {
                    Some(got) => json_subset(want, got, &format!("{at}.{key}"), problems),
                    None => problems.push(format!("{at}.{key}: want {want}, missing")),
                }
            }
        }
        (Value::Array(want_items), Value::Array(got_items))
            if want_items.len() == got_items.len() =>
        {
            for (index, (want, got)) in want_items.iter().zip(got_items).enumerate() {
                json_subset(want, got, &format!("{at}[{index}]"), problems);
            }
        }
        _ if want == got => {}
        _ => problems.push(format!("{at}: want {want}, got {got}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn json_expectations_match_by_the_fields_they_name() {
        let got =
            json!({ "headers": { "x-hello": "p", "host": "h" }, "items": [1, { "a": 2, "b": 3 }] });
        let mut problems = Vec::new();
        json_subset(
            &json!({ "headers": { "x-hello": "p" }, "items": [1, { "a": 2 }] }),
            &got,
            "json",
            &mut problems,
        );
        assert!(problems.is_empty(), "{problems:?}");
        json_subset(
            &json!({ "headers": { "x-hello": "q", "x-gone": "1" }, "items": [1] }),
            &got,
            "json",
            &mut problems,
        );
        assert_eq!(
            problems,
            vec![
                r#"json.headers.x-gone: want "1", missing"#.to_string(),
                r#"json.headers.x-hello: want "q", got "p""#.to_string(),
                r#"json.items: want [1], got [1,{"a":2,"b":3}]"#.to_string(),
            ]
        );
    }
}
