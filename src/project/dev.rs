//! `nip dev`: build the plugin, serve it through a local proxy in front of an echo backend,
//! and on every save rebuild and hot-swap it — the proxy picks the new module up (or
//! starts the new process) without dropping the old one until the new one loaded. A build
//! that fails prints the compiler's messages and the previous build keeps serving.

use super::build::{build, Build};
use super::session::{Expect, Session};
use super::Project;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How often the sources are looked at.
const POLL: Duration = Duration::from_millis(100);
/// Directories never watched (build outputs and dependencies).
const SKIPPED: &[&str] = &["target", "node_modules", ".nip", ".git", "__pycache__"];

/// What a watched file looked like.
type Seen = BTreeMap<PathBuf, (Option<SystemTime>, u64)>;

/// Runs until interrupted.
pub fn run(project: &Project) -> anyhow::Result<()> {
    let name = project.manifest.name.clone();
    let config_path = project.path(&project.manifest.config);
    let mut sources = look(&project.watched());
    let mut config = look(std::slice::from_ref(&config_path));
    eprintln!(
        "nip dev: building {name} ({})…",
        project.manifest.language.name()
    );
    let first = loop {
        match build(project) {
            Ok(built) => break built,
            Err(e) => {
                eprintln!("{e:#}\nnip dev: fix it and save; watching…");
                sources = wait_for_change(project, &sources);
            }
        }
    };
    let mut revision = 1;
    let mut session = Session::start(project, revision, true)?;
    session.wait_serving(&name, &expect(&first, None, None))?;
    println!(
        "nip dev: serving {url} (plugin {name}, built in {took:.1}s; echo backend behind it)\n  try: curl -i {url}/hello\n  save a source to rebuild and reload; Ctrl-C stops",
        url = session.url,
        took = first.took.as_secs_f64(),
    );
    loop {
        std::thread::sleep(POLL);
        let now_config = look(std::slice::from_ref(&config_path));
        if now_config != config {
            config = now_config;
            match session.reload_config(project, revision) {
                Ok(()) => println!(
                    "nip dev: {} changed; the proxy reloads it",
                    config_path.display()
                ),
                Err(e) => eprintln!("nip dev: {e:#}\n  the proxy keeps the config it has"),
            }
        }
        let now = look(&project.watched());
        if now == sources {
            continue;
        }
        let saved = newest_change(&sources, &now);
        sources = now;
        let refusals_before = session.refused_reloads();
        let built = match build(project) {
            Ok(built) => built,
            Err(e) => {
                eprintln!("{e:#}\nnip dev: build failed; still serving build {revision}");
                continue;
            }
        };
        revision += 1;
        let previous_pid = session.plugin_pid(&name);
        if !project.manifest.language.is_wasm() {
            session.new_revision(&name, revision)?;
        }
        match session.wait_serving(&name, &expect(&built, previous_pid, refusals_before)) {
            Ok(()) => {
                let after = saved
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .map(|d| format!("{:.2}s after the save", d.as_secs_f64()))
                    .unwrap_or_default();
                println!(
                    "nip dev: build {revision} serving, {after} (build {:.2}s)",
                    built.took.as_secs_f64()
                );
            }
            Err(e) => eprintln!("nip dev: build {revision} is not serving: {e:#}"),
        }
    }
}

fn expect(built: &Build, previous_pid: Option<u64>, refusals_before: Option<u64>) -> Expect {
    Expect {
        module_sha256: built.module_sha256.clone(),
        previous_pid,
        refusals_before,
    }
}

/// Waits until a watched file changes; what they look like then.
fn wait_for_change(project: &Project, seen: &Seen) -> Seen {
    loop {
        std::thread::sleep(POLL);
        let now = look(&project.watched());
        if now != *seen {
            return now;
        }
    }
}

/// When the newest changed file was written.
fn newest_change(before: &Seen, after: &Seen) -> Option<SystemTime> {
    after
        .iter()
        .filter(|(path, seen)| before.get(*path) != Some(seen))
        .filter_map(|(_, (modified, _))| *modified)
        .max()
}

/// Every file under `paths` with its modification time and length.
fn look(paths: &[PathBuf]) -> Seen {
    let mut seen = Seen::new();
    for path in paths {
        walk(path, &mut seen);
    }
    seen
}

fn walk(path: &Path, seen: &mut Seen) {
    let Ok(meta) = std::fs::metadata(path) else {
        return;
    };
    if meta.is_dir() {
        let skipped = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| SKIPPED.contains(&n));
        if skipped {
            return;
        }
        if let Ok(entries) = std::fs::read_dir(path) {
            for entry in entries.flatten() {
                walk(&entry.path(), seen);
            }
        }
    } else {
        seen.insert(path.to_path_buf(), (meta.modified().ok(), meta.len()));
    }
}
