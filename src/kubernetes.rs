//! `nip inject` and `nip wait-ready`: the sidecar for Kubernetes pods, added to manifests
//! (the same injection the control plane's admission webhook does) and waited for by the
//! pod's other containers.

use nip_control_plane::inject::{inject, InjectSettings};
use serde::Deserialize;
use std::io::Read;
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

/// Why manifests could not be injected.
#[derive(Debug, thiserror::Error)]
pub enum InjectCliError {
    /// The input could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file (`-`: standard input).
        path: String,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A document is not YAML, or not a Kubernetes object the injector can read.
    #[error("document {index}{what}: {message}")]
    Document {
        /// Its position, from 1.
        index: usize,
        /// ` (Kind name)` when known.
        what: String,
        /// What is wrong.
        message: String,
    },
}

/// The manifests in `input` (several YAML documents) with the sidecar in every pod, as
/// YAML documents.
pub fn inject_manifests(input: &str, settings: &InjectSettings) -> Result<String, InjectCliError> {
    let mut out = Vec::new();
    for (i, document) in serde_yaml::Deserializer::from_str(input).enumerate() {
        let index = i + 1;
        let fail = |what: String, message: String| InjectCliError::Document {
            index,
            what,
            message,
        };
        let value = serde_yaml::Value::deserialize(document)
            .map_err(|e| fail(String::new(), e.to_string()))?;
        if value.is_null() {
            continue;
        }
        let mut object: serde_json::Value = serde_json::to_value(&value)
            .map_err(|e| fail(String::new(), format!("not a Kubernetes object: {e}")))?;
        let what = format!(
            " ({} {})",
            object["kind"].as_str().unwrap_or("?"),
            object["metadata"]["name"].as_str().unwrap_or("?")
        );
        inject(&mut object, settings).map_err(|e| fail(what.clone(), e.to_string()))?;
        out.push(serde_yaml::to_string(&object).map_err(|e| fail(what, e.to_string()))?);
    }
    Ok(out.join("---\n"))
}

/// Reads `path` (`-`: standard input).
fn read_input(path: &Path) -> Result<String, InjectCliError> {
    let name = path.display().to_string();
    let read = |source| InjectCliError::Read {
        path: name.clone(),
        source,
    };
    if name == "-" {
        let mut text = String::new();
        std::io::stdin().read_to_string(&mut text).map_err(read)?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(read)
    }
}

/// `nip inject`: prints the injected manifests, or says what is wrong (exit 1).
pub fn run_inject(file: &Path, image: String) -> ExitCode {
    let settings = InjectSettings {
        image,
        ..Default::default()
    };
    match read_input(file).and_then(|input| inject_manifests(&input, &settings)) {
        Ok(output) => {
            print!("{output}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("nip inject: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `nip wait-ready`: returns once `admin`'s `/ready` answers 200 (exit 0), or fails at
/// `timeout` (exit 1).
pub fn run_wait_ready(admin: &str, timeout: Duration) -> ExitCode {
    let url = format!("http://{admin}/ready");
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into();
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer yet");
    while Instant::now() < deadline {
        match agent.get(&url).call() {
            Ok(response) if response.status() == 200 => return ExitCode::SUCCESS,
            Ok(response) => last = format!("{url} answered {}", response.status()),
            Err(e) => last = format!("{url}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!("nip wait-ready: the proxy was not ready within {timeout:?} ({last})");
    ExitCode::FAILURE
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_workload_of_a_manifest_gets_the_sidecar_and_the_rest_stays() {
        let input = "apiVersion: v1\nkind: Service\nmetadata: { name: web }\nspec: { ports: [{ port: 80 }] }\n---\napiVersion: apps/v1\nkind: Deployment\nmetadata: { name: web }\nspec:\n  selector: { matchLabels: { app: web } }\n  template:\n    metadata: { labels: { app: web } }\n    spec: { containers: [{ name: web, image: nginx }] }\n---\n";
        let output = inject_manifests(input, &InjectSettings::default()).unwrap();
        let documents: Vec<serde_yaml::Value> = serde_yaml::Deserializer::from_str(&output)
            .map(|d| serde_yaml::Value::deserialize(d).unwrap())
            .collect();
        assert_eq!(documents.len(), 2);
        assert_eq!(documents[0]["kind"], "Service");
        assert!(documents[0]["spec"]["initContainers"].is_null());
        let pod = &documents[1]["spec"]["template"]["spec"];
        assert_eq!(pod["containers"][0]["name"], "nip-proxy");
        assert_eq!(pod["initContainers"][0]["name"], "nip-init");
    }

    #[test]
    fn a_broken_document_is_named_with_its_position_and_path() {
        let input = "kind: Pod\nmetadata: { name: p }\nspec: { containers: nope }\n";
        let e = inject_manifests(input, &InjectSettings::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "document 1 (Pod p): /spec/containers: must be a list"
        );
        let e = inject_manifests("a: [\n", &InjectSettings::default()).unwrap_err();
        assert!(e.to_string().starts_with("document 1: "), "{e}");
    }
}
