//! `nip init`: a new plugin project that works as made — the plugin on its language's
//! SDK (the SDK's sources written beside it, so the project builds anywhere), a proxy
//! config running it in front of an echo backend, and integration cases it passes.

use super::{Language, MANIFEST};
use anyhow::{bail, Context as _};
use std::path::{Path, PathBuf};

/// What `nip init` is asked for.
#[derive(Debug, Clone, clap::Args)]
pub struct InitOptions {
    /// The plugin's name (lowercase letters, digits, dashes); the directory's too, unless
    /// --dir says otherwise.
    pub name: String,
    /// Its language.
    #[arg(long = "lang", value_enum, default_value = "rust")]
    pub language: Language,
    /// Where the project goes (default: ./NAME).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// The proxy's port in the project's config.
    #[arg(long, default_value_t = 8080)]
    pub port: u16,
    /// The proxy's admin port.
    #[arg(long, default_value_t = 9901)]
    pub admin_port: u16,
    /// The echo backend's port.
    #[arg(long, default_value_t = 9100)]
    pub echo_port: u16,
    /// The plugin process's port (Python and Go plugins).
    #[arg(long, default_value_t = 9200)]
    pub plugin_port: u16,
}

/// One file of a template: its path in the project and its text (`{{…}}` filled in) or
/// bytes (copied as they are).
enum Template {
    Text(&'static str, &'static str),
    Bytes(&'static str, &'static [u8]),
    /// A vendored crate's manifest: its `[workspace]` table dropped (the project's own
    /// is the one workspace).
    CrateManifest(&'static str, &'static str),
}

/// The files every project gets.
const COMMON: &[Template] = &[
    Template::Text(MANIFEST, include_str!("templates/common/nip-project.yaml")),
    Template::Text("cases.yaml", include_str!("templates/common/cases.yaml")),
    Template::Text(".gitignore", include_str!("templates/common/gitignore")),
];

const RUST: &[Template] = &[
    Template::Text("nip.yaml", include_str!("templates/common/nip-wasm.yaml")),
    Template::Text("Cargo.toml", include_str!("templates/rust/Cargo.toml")),
    Template::Text("src/lib.rs", include_str!("templates/rust/src/lib.rs")),
    Template::CrateManifest(
        "nip-plugin/Cargo.toml",
        include_str!("../../filters/sdk/rust/Cargo.toml"),
    ),
    Template::Bytes(
        "nip-plugin/src/lib.rs",
        include_bytes!("../../filters/sdk/rust/src/lib.rs"),
    ),
    Template::Bytes(
        "nip-plugin/src/context.rs",
        include_bytes!("../../filters/sdk/rust/src/context.rs"),
    ),
    Template::Bytes(
        "nip-plugin/src/message.rs",
        include_bytes!("../../filters/sdk/rust/src/message.rs"),
    ),
    Template::Bytes(
        "nip-plugin/src/plugin.rs",
        include_bytes!("../../filters/sdk/rust/src/plugin.rs"),
    ),
    Template::Bytes(
        "nip-plugin/src/runtime.rs",
        include_bytes!("../../filters/sdk/rust/src/runtime.rs"),
    ),
];

const TYPESCRIPT: &[Template] = &[
    Template::Text("nip.yaml", include_str!("templates/common/nip-wasm.yaml")),
    Template::Text(
        "package.json",
        include_str!("templates/typescript/package.json"),
    ),
    Template::Text(
        "assembly/index.ts",
        include_str!("templates/typescript/assembly/index.ts"),
    ),
    Template::Bytes(
        "nip-plugin/package.json",
        include_bytes!("../../filters/sdk/assemblyscript/package.json"),
    ),
    Template::Bytes(
        "nip-plugin/assembly/abi.ts",
        include_bytes!("../../filters/sdk/assemblyscript/assembly/abi.ts"),
    ),
    Template::Bytes(
        "nip-plugin/assembly/host.ts",
        include_bytes!("../../filters/sdk/assemblyscript/assembly/host.ts"),
    ),
    Template::Bytes(
        "nip-plugin/assembly/index.ts",
        include_bytes!("../../filters/sdk/assemblyscript/assembly/index.ts"),
    ),
    Template::Bytes(
        "nip-plugin/assembly/json.ts",
        include_bytes!("../../filters/sdk/assemblyscript/assembly/json.ts"),
    ),
];

const PYTHON: &[Template] = &[
    Template::Text(
        "nip.yaml",
        include_str!("templates/common/nip-process.yaml"),
    ),
    Template::Text("plugin.py", include_str!("templates/python/plugin.py")),
    Template::Bytes(
        "nip-plugin/pyproject.toml",
        include_bytes!("../../filters/sdk/python/pyproject.toml"),
    ),
    Template::Bytes(
        "nip-plugin/nip_plugin/__init__.py",
        include_bytes!("../../filters/sdk/python/nip_plugin/__init__.py"),
    ),
    Template::Bytes(
        "nip-plugin/nip_plugin/message.py",
        include_bytes!("../../filters/sdk/python/nip_plugin/message.py"),
    ),
    Template::Bytes(
        "nip-plugin/nip_plugin/plugin.py",
        include_bytes!("../../filters/sdk/python/nip_plugin/plugin.py"),
    ),
];

const GO: &[Template] = &[
    Template::Text(
        "nip.yaml",
        include_str!("templates/common/nip-process.yaml"),
    ),
    Template::Text("main.go", include_str!("templates/go/main.go")),
    Template::Bytes(
        "nip-plugin/nipplugin/nipplugin.go",
        include_bytes!("../../filters/sdk/go/nipplugin/nipplugin.go"),
    ),
    Template::Bytes(
        "nip-plugin/nipplugin/ext_proc.pb",
        include_bytes!("../../filters/sdk/go/nipplugin/ext_proc.pb"),
    ),
];

/// Makes the project; returns its directory.
pub fn init(options: &InitOptions) -> anyhow::Result<PathBuf> {
    check_name(&options.name)?;
    let dir = options
        .dir
        .clone()
        .unwrap_or_else(|| PathBuf::from(&options.name));
    if dir.exists()
        && std::fs::read_dir(&dir)
            .with_context(|| format!("cannot read {}", dir.display()))?
            .next()
            .is_some()
    {
        bail!(
            "{} exists and is not empty: choose another name or --dir",
            dir.display()
        );
    }
    let language = options.language;
    let (command, env) = match language {
        Language::Python => (
            r#"["python3", "plugin.py"]"#.to_string(),
            "{ PYTHONPATH: nip-plugin }".to_string(),
        ),
        Language::Go => (
            format!(r#"[".nip/build/{}"]"#, options.name),
            "{}".to_string(),
        ),
        Language::Rust | Language::Typescript => (String::new(), String::new()),
    };
    let watch = format!(
        "[{}]",
        language
            .sources()
            .iter()
            .map(|s| s.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let values: [(&str, String); 9] = [
        ("name", options.name.clone()),
        ("language", language.name().to_string()),
        ("port", options.port.to_string()),
        ("admin_port", options.admin_port.to_string()),
        ("echo_port", options.echo_port.to_string()),
        ("plugin_port", options.plugin_port.to_string()),
        ("command", command),
        ("env", env),
        ("watch", watch),
    ];
    let files = match language {
        Language::Rust => RUST,
        Language::Typescript => TYPESCRIPT,
        Language::Python => PYTHON,
        Language::Go => GO,
    };
    for template in COMMON.iter().chain(files) {
        let (path, bytes) = match template {
            Template::Text(path, text) => (*path, fill(text, &values).into_bytes()),
            Template::Bytes(path, bytes) => (*path, bytes.to_vec()),
            Template::CrateManifest(path, text) => (*path, without_workspace(text).into_bytes()),
        };
        write(&dir.join(path), &bytes)?;
    }
    Ok(dir)
}

/// What `nip init` prints: the next steps.
pub fn next_steps(dir: &Path, options: &InitOptions) -> String {
    let needs = match options.language {
        Language::Rust => "cargo with the wasm32-wasip1 target (rustup target add wasm32-wasip1)",
        Language::Typescript => "node and npm (nip dev runs npm install once)",
        Language::Python => {
            "python3 with grpcio, xds-protos and protobuf (pip install grpcio xds-protos protobuf)"
        }
        Language::Go => "Debian's Go with golang-google-grpc-dev and golang-google-protobuf-dev",
    };
    format!(
        "made {dir}: plugin {name} ({language}), nip.yaml, cases.yaml\n\
         needs: {needs}\n\
         next:\n  cd {dir}\n  nip dev                  # build, serve on http://127.0.0.1:{port}, rebuild on save\n  nip test --integration   # the cases in cases.yaml through a real proxy\n",
        dir = dir.display(),
        name = options.name,
        language = options.language.name(),
        port = options.port,
    )
}

/// A plugin name is a config key, a package name and a file name: lowercase letters,
/// digits and dashes, starting with a letter.
fn check_name(name: &str) -> anyhow::Result<()> {
    let mut chars = name.chars();
    let starts_well = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !starts_well
        || name.len() > 63
        || !name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
    {
        bail!(
            "plugin name {name:?}: use lowercase letters, digits and dashes, starting with a letter (at most 63)"
        );
    }
    Ok(())
}

/// A Cargo manifest without its `[workspace]` table (and the comment lines just above it).
fn without_workspace(manifest: &str) -> String {
    let mut kept: Vec<&str> = Vec::new();
    let mut in_workspace = false;
    for line in manifest.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('[') {
            in_workspace = trimmed == "[workspace]";
            if in_workspace {
                while kept.last().is_some_and(|l| l.trim_start().starts_with('#')) {
                    kept.pop();
                }
            }
        }
        if !in_workspace {
            kept.push(line);
        }
    }
    let mut out = kept.join("\n");
    out.push('\n');
    out
}

/// Fills `{{key}}` in a template.
fn fill(text: &str, values: &[(&str, String)]) -> String {
    let mut out = text.to_string();
    for (key, value) in values {
        out = out.replace(&format!("{{{{{key}}}}}"), value);
    }
    out
}

fn write(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot make {}", parent.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_placeholder_of_every_template_is_filled() {
        let values: Vec<(&str, String)> = [
            "name",
            "language",
            "port",
            "admin_port",
            "echo_port",
            "plugin_port",
            "command",
            "env",
            "watch",
        ]
        .into_iter()
        .map(|k| (k, "x".to_string()))
        .collect();
        for template in COMMON
            .iter()
            .chain(RUST)
            .chain(TYPESCRIPT)
            .chain(PYTHON)
            .chain(GO)
        {
            if let Template::Text(path, text) = template {
                let filled = fill(text, &values);
                assert!(!filled.contains("{{"), "{path} keeps a placeholder");
            }
        }
    }

    #[test]
    fn names_that_cannot_be_a_package_and_a_config_key_are_refused() {
        for bad in ["", "My", "1st", "a_b", "a b", "a/b", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad:?} accepted");
        }
        check_name("my-plugin2").unwrap();
    }

    #[test]
    fn the_vendored_sdk_is_no_workspace_of_its_own() {
        let manifest = "[package]\nname = \"x\"\n\n# Guest code: own workspace.\n[workspace]\n\n[dependencies]\na = \"1\"\n";
        assert_eq!(
            without_workspace(manifest),
            "[package]\nname = \"x\"\n\n[dependencies]\na = \"1\"\n"
        );
    }
}
