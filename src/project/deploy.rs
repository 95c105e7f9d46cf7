//! `nip deploy --env NAME`: ships the project's plugin and routes to an environment's
//! control plane. The plugin is built fresh and its module uploaded to the control plane's
//! store; the config goes out naming the module by digest (`source: { sha256 }`), so
//! every proxy gets the module with the config over xDS. With the environment's `canary`
//! region it is applied there first and promoted only when those proxies ACK; a rollback
//! exits non-zero.

use super::build::build;
use super::Project;
use crate::remote::{self, ApplyOptions, Remote};
use anyhow::{anyhow, bail, Context as _};
use serde_yaml::Value;
use std::process::ExitCode;
use std::time::Duration;

/// How long a canary region has to ACK when the environment does not say.
const DEFAULT_CANARY_TIMEOUT: Duration = Duration::from_secs(30);

/// Deploys to `env`; the exit code says how it ended (apply's codes: 2 for a config the
/// control plane refused, 1 for a rollback or another failure).
pub fn run(project: &Project, env: &str, message: &str) -> anyhow::Result<ExitCode> {
    let Some(environment) = project.manifest.environments.get(env) else {
        let known: Vec<&str> = project
            .manifest
            .environments
            .keys()
            .map(String::as_str)
            .collect();
        bail!(
            "no environment {env:?} in {}: environments are {}",
            super::MANIFEST,
            if known.is_empty() {
                "not set (add `environments: { NAME: { control_plane: URL } }`)".to_string()
            } else {
                known.join(", ")
            }
        );
    };
    let field = |name: &str| format!("{}: environments.{env}.{name}", super::MANIFEST);
    let canary_timeout = match &environment.canary_timeout {
        Some(text) => humantime::parse_duration(text)
            .map_err(|e| anyhow!("{}: {text:?}: {e}", field("canary_timeout")))?,
        None => DEFAULT_CANARY_TIMEOUT,
    };
    let remote = Remote {
        control_plane: environment.control_plane.clone(),
        ca_file: environment.ca_file.as_ref().map(|p| project.path(p)),
        token_file: environment.token_file.as_ref().map(|p| project.path(p)),
    };
    let config_path = project.path(
        environment
            .config
            .as_ref()
            .unwrap_or(&project.manifest.config),
    );
    let text = std::fs::read_to_string(&config_path)
        .with_context(|| format!("cannot read {}", config_path.display()))?;
    let mut config: Value = serde_yaml::from_str(&text)
        .with_context(|| format!("cannot parse {}", config_path.display()))?;
    let name = &project.manifest.name;
    eprintln!("deploy: building {name}…");
    build(project)?;
    if project.manifest.language.is_wasm() {
        let module = std::fs::read(project.artifact())
            .with_context(|| format!("cannot read {}", project.artifact().display()))?;
        let digest = remote::upload_module(&remote, &module).map_err(|e| anyhow!("deploy: {e}"))?;
        eprintln!(
            "deploy: module {digest} ({} bytes) in the store of {}",
            module.len(),
            environment.control_plane
        );
        let source = config
            .get_mut("plugins")
            .and_then(|p| p.get_mut(name.as_str()))
            .and_then(Value::as_mapping_mut)
            .ok_or_else(|| {
                anyhow!(
                    "{}: plugins.{name}: the project's plugin is not in the config",
                    config_path.display()
                )
            })?;
        let mut stored = serde_yaml::Mapping::new();
        stored.insert(Value::from("sha256"), Value::from(digest));
        source.insert(Value::from("source"), Value::Mapping(stored));
    } else {
        eprintln!(
            "deploy: {name} runs in a process of its own: install it where the proxies run \
             (its `process.command`); the config names how they reach it"
        );
    }
    let shipped = project.work_dir()?.join(format!("deploy-{env}.yaml"));
    std::fs::write(&shipped, serde_yaml::to_string(&config)?)
        .with_context(|| format!("cannot write {}", shipped.display()))?;
    let message = if message.is_empty() {
        format!("nip deploy {name} --env {env}")
    } else {
        message.to_string()
    };
    Ok(remote::apply(
        &remote,
        &shipped,
        &ApplyOptions {
            message,
            canary: environment.canary.clone(),
            canary_timeout,
            allow_empty: false,
            json: false,
            tenant: None,
        },
    ))
}
