//! Builds a project's plugin with its language's tools, into `.nip/build/` (replaced
//! whole, by rename, so a proxy watching the module never reads half a build). A build
//! that fails returns the compiler's own messages.

use super::{Language, Project};
use anyhow::{anyhow, bail, Context as _};
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A finished build.
#[derive(Debug, Clone)]
pub struct Build {
    /// Hex SHA-256 of the wasm module (what the proxy's admin `/plugins` shows once it
    /// serves it); `None` for process plugins.
    pub module_sha256: Option<String>,
    /// How long it took.
    pub took: Duration,
}

/// Builds the plugin. The error of a build that failed holds the compiler's messages.
pub fn build(project: &Project) -> anyhow::Result<Build> {
    let started = Instant::now();
    project.work_dir()?;
    let artifact = project.artifact();
    let staged = artifact.with_extension("partial");
    match project.manifest.language {
        Language::Rust => {
            let built = cargo_build(&project.root)?;
            std::fs::copy(&built, &staged).with_context(|| {
                format!("cannot copy {} to {}", built.display(), staged.display())
            })?;
        }
        Language::Typescript => {
            if !project.path(Path::new("node_modules/.bin/asc")).exists() {
                run_tool(
                    Command::new("npm").args(["install", "--no-audit", "--no-fund"]),
                    &project.root,
                    "npm install",
                )?;
            }
            run_tool(
                Command::new(project.path(Path::new("node_modules/.bin/asc")))
                    .arg("assembly/index.ts")
                    .arg("-b")
                    .arg(&staged)
                    .args([
                        "--use",
                        "abort=abort_proc_exit",
                        "--path",
                        "node_modules",
                        "--optimize",
                    ]),
                &project.root,
                "asc",
            )?;
        }
        Language::Python => {
            // Nothing to build; a syntax error is caught here rather than as a process
            // that keeps exiting.
            run_tool(
                Command::new("python3").args(["-m", "py_compile", "plugin.py"]),
                &project.root,
                "python3 -m py_compile",
            )?;
        }
        Language::Go => go_build(project, &staged)?,
    }
    let module_sha256 = if project.manifest.language.is_wasm() {
        let bytes = std::fs::read(&staged)
            .with_context(|| format!("the build made no {}", staged.display()))?;
        Some(nip_proxy::plugins::fetch::hex_sha256(&bytes))
    } else {
        None
    };
    if staged.exists() {
        std::fs::rename(&staged, &artifact).with_context(|| {
            format!("cannot move {} to {}", staged.display(), artifact.display())
        })?;
    }
    Ok(Build {
        module_sha256,
        took: started.elapsed(),
    })
}

/// `cargo build --release --target wasm32-wasip1`; the module's path comes from cargo's
/// own account of what it made.
fn cargo_build(root: &Path) -> anyhow::Result<PathBuf> {
    let format = if std::io::stderr().is_terminal() {
        "json-diagnostic-rendered-ansi"
    } else {
        "json"
    };
    let mut child = Command::new("cargo")
        .args(["build", "--release", "--target", "wasm32-wasip1"])
        .arg(format!("--message-format={format}"))
        .current_dir(root)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("cannot run cargo (install Rust: https://rustup.rs)")?;
    let stdout = child.stdout.take().context("cargo's output")?;
    let mut diagnostics = String::new();
    let mut module = None;
    for line in std::io::BufReader::new(stdout).lines() {
        let line = line.context("reading cargo's output")?;
        let Ok(message) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        match message["reason"].as_str() {
            Some("compiler-message") => {
                if let Some(rendered) = message["message"]["rendered"].as_str() {
                    diagnostics.push_str(rendered);
                }
            }
            Some("compiler-artifact") => {
                let is_cdylib = message["target"]["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k == "cdylib"));
                if is_cdylib {
                    module = message["filenames"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|f| f.as_str())
                        .find(|f| f.ends_with(".wasm"))
                        .map(PathBuf::from);
                }
            }
            _ => {}
        }
    }
    let status = child.wait().context("waiting for cargo")?;
    if !status.success() {
        let hint = if diagnostics.contains("wasm32-wasip1") && diagnostics.contains("E0463") {
            "\n(add the target: rustup target add wasm32-wasip1)"
        } else {
            ""
        };
        bail!("cargo build failed:\n{diagnostics}{hint}");
    }
    if !diagnostics.is_empty() {
        eprint!("{diagnostics}");
    }
    module.ok_or_else(|| anyhow!("cargo built no .wasm module (is the crate type cdylib?)"))
}

/// A Go plugin against the vendored SDK with Debian's Go, offline (GOPATH mode: the SDK
/// is `nip/nipplugin`; gRPC and protobuf come from /usr/share/gocode).
fn go_build(project: &Project, output: &Path) -> anyhow::Result<()> {
    let gopath = tempfile_dir("nip-gopath")?;
    let package = gopath.join("src/nip");
    std::fs::create_dir_all(&package)?;
    std::os::unix::fs::symlink(
        project.path(Path::new("nip-plugin/nipplugin")),
        package.join("nipplugin"),
    )?;
    let sources: Vec<PathBuf> = std::fs::read_dir(&project.root)?
        .filter_map(|entry| entry.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "go"))
        .collect();
    let cache = std::env::var_os("GOCACHE")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/go-build")))
        .unwrap_or_else(|| gopath.join("cache"));
    let result = run_tool(
        Command::new("go")
            .arg("build")
            .arg("-o")
            .arg(output)
            .args(&sources)
            .env("GO111MODULE", "off")
            .env("GOPATH", format!("{}:/usr/share/gocode", gopath.display()))
            .env("GOCACHE", cache)
            .env("GOFLAGS", ""),
        &project.root,
        "go build",
    );
    let _ = std::fs::remove_dir_all(&gopath);
    result
}

/// Runs a build tool in `dir`; its messages become the error when it fails.
fn run_tool(command: &mut Command, dir: &Path, what: &str) -> anyhow::Result<()> {
    let output = command
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!(
            "{what} failed:\n{}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// A fresh directory under the system's temporary directory.
fn tempfile_dir(prefix: &str) -> anyhow::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!("{prefix}-{}-{nanos}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot make {}", dir.display()))?;
    Ok(dir)
}
