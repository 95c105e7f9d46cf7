//! Plugin projects: what `nip init` makes and `nip dev`, `nip test --integration` and
//! `nip deploy` work on.
//!
//! ```text
//! nip init ──▶ scaffold: nip-project.yaml, nip.yaml, cases.yaml, the plugin on its
//!              language's SDK (the SDK vendored beside it)
//! nip-project.yaml ──▶ Project ──▶ build (per language) ──▶ .nip/build/NAME[.wasm]
//!                                   └▶ session: echo backend + `nip proxy` on .nip/run.yaml
//!                                        ├▶ dev: watch, rebuild, wait for the new build
//!                                        │       to serve (the admin page's module digest)
//!                                        └▶ cases: request → expected status/headers/body
//!                                   └▶ deploy: module to the control plane's store, the
//!                                       config naming it by digest, applied (canary)
//! ```
//!
//! Layers: this module (the manifest) ← `build` ← `session` ← `dev`, `cases`;
//! `build` ← `deploy` (with the CLI's control-plane client);
//! `scaffold` reads only this module; `v3_plugin` (nip migrate plugin-scaffold) builds on
//! `scaffold`.

pub mod build;
pub mod cases;
pub mod deploy;
pub mod dev;
pub mod scaffold;
pub mod session;
pub mod v3_plugin;

use anyhow::{bail, Context as _};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The project file's name.
pub const MANIFEST: &str = "nip-project.yaml";
/// Where nip keeps what it makes for a project (builds, the config it runs, logs).
pub const WORK_DIR: &str = ".nip";

/// A plugin's language: which SDK it is written on and how it is built and run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum Language {
    /// Rust on the `nip-plugin` crate, built to wasm32-wasip1 with cargo.
    Rust,
    /// TypeScript on the AssemblyScript SDK, built to wasm with asc (npm).
    Typescript,
    /// Python on the `nip_plugin` package, a process plugin (ext_proc).
    Python,
    /// Go on the `nipplugin` package, a process plugin built with Debian's Go.
    Go,
}

impl Language {
    /// As written in the project file.
    pub fn name(self) -> &'static str {
        match self {
            Language::Rust => "rust",
            Language::Typescript => "typescript",
            Language::Python => "python",
            Language::Go => "go",
        }
    }

    /// What a project of this language watches when its manifest lists nothing.
    pub fn sources(self) -> &'static [&'static str] {
        match self {
            Language::Rust => &["src", "Cargo.toml", "nip-plugin"],
            Language::Typescript => &["assembly", "package.json", "nip-plugin"],
            Language::Python => &["plugin.py", "nip-plugin"],
            Language::Go => &["main.go", "nip-plugin"],
        }
    }

    /// Whether the plugin runs in the proxy as a wasm module (else in a process of its own).
    pub fn is_wasm(self) -> bool {
        matches!(self, Language::Rust | Language::Typescript)
    }
}

/// `nip-project.yaml`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// The plugin's name: its key in the config's `plugins`.
    pub name: String,
    /// What it is written in.
    pub language: Language,
    /// The proxy config `nip dev` and `nip test` run, relative to the project.
    #[serde(default = "default_config")]
    pub config: PathBuf,
    /// The integration cases, relative to the project.
    #[serde(default = "default_cases")]
    pub cases: PathBuf,
    /// Files and directories whose change makes `nip dev` rebuild.
    #[serde(default)]
    pub watch: Vec<PathBuf>,
    /// Where `nip deploy --env NAME` ships to.
    #[serde(default)]
    pub environments: BTreeMap<String, Environment>,
}

fn default_config() -> PathBuf {
    PathBuf::from("nip.yaml")
}

fn default_cases() -> PathBuf {
    PathBuf::from("cases.yaml")
}

/// One place `nip deploy` ships to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Environment {
    /// The control plane's REST API (`https://host:18001`).
    pub control_plane: String,
    /// Push to this region first and promote only when its proxies ACK.
    #[serde(default)]
    pub canary: Option<String>,
    /// How long the canary region's proxies have to ACK (default 30s).
    #[serde(default)]
    pub canary_timeout: Option<String>,
    /// The API token's file (else `$NIP_TOKEN` or `~/.config/nip/token`).
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    /// Roots to trust for the control plane's certificate.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// The proxy config to ship there (default: the project's `config`).
    #[serde(default)]
    pub config: Option<PathBuf>,
}

/// A project on disk: its directory and manifest.
#[derive(Debug, Clone)]
pub struct Project {
    /// The directory holding `nip-project.yaml`; commands run there.
    pub root: PathBuf,
    /// The manifest.
    pub manifest: Manifest,
}

impl Project {
    /// Opens the project in `dir` (or the nearest directory above it holding a manifest).
    pub fn open(dir: &Path) -> anyhow::Result<Project> {
        let start = std::path::absolute(dir)
            .with_context(|| format!("cannot resolve {}", dir.display()))?;
        let Some(root) = start.ancestors().find(|d| d.join(MANIFEST).is_file()) else {
            bail!(
                "no {MANIFEST} in {} or above it: make a project with `nip init NAME --lang rust`",
                start.display()
            );
        };
        let path = root.join(MANIFEST);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let manifest: Manifest = serde_path_to_error::deserialize(
            serde_yaml::Deserializer::from_str(&text),
        )
        .map_err(|e| {
            let field = e.path().to_string();
            anyhow::anyhow!("{}: {field}: {}", path.display(), e.inner())
        })?;
        if manifest.name.is_empty() {
            bail!("{}: name: must not be empty", path.display());
        }
        Ok(Project {
            root: root.to_path_buf(),
            manifest,
        })
    }

    /// A path of the project (relative paths are the project's).
    pub fn path(&self, relative: &Path) -> PathBuf {
        self.root.join(relative)
    }

    /// `.nip/` inside the project, made if missing.
    pub fn work_dir(&self) -> anyhow::Result<PathBuf> {
        let dir = self.root.join(WORK_DIR);
        std::fs::create_dir_all(dir.join("build"))
            .with_context(|| format!("cannot make {}", dir.display()))?;
        Ok(dir)
    }

    /// Where the build goes: the module the config's `source.file` names, or the
    /// process plugin's program.
    pub fn artifact(&self) -> PathBuf {
        let name = &self.manifest.name;
        let file = if self.manifest.language.is_wasm() {
            format!("{name}.wasm")
        } else {
            name.clone()
        };
        self.root.join(WORK_DIR).join("build").join(file)
    }

    /// What `nip dev` watches: the manifest's list, or the language's sources.
    pub fn watched(&self) -> Vec<PathBuf> {
        let listed: Vec<PathBuf> = if self.manifest.watch.is_empty() {
            self.manifest
                .language
                .sources()
                .iter()
                .map(PathBuf::from)
                .collect()
        } else {
            self.manifest.watch.clone()
        };
        listed.iter().map(|p| self.path(p)).collect()
    }
}
