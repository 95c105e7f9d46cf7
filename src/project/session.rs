//! A project running locally: an echo backend on the config's `echo` service, and a
//! `nip proxy` (this binary, a child process that dies with its parent) on
//! `.nip/run.yaml` — the project's config plus, for process plugins, the build revision
//! in the plugin's environment, so a rebuild starts the process anew.

use super::Project;
use anyhow::{anyhow, bail, Context as _};
use serde_yaml::Value;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The longest wait for a proxy, or a new build, to serve.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The proxy and its echo backend, stopped when dropped.
pub struct Session {
    proxy: Child,
    run_config: PathBuf,
    config: Value,
    /// The proxy's URL (`http://127.0.0.1:8080`).
    pub url: String,
    /// The proxy's admin URL.
    pub admin: String,
    /// Where the proxy's log goes.
    pub log: PathBuf,
}

/// Which build a session waits for.
#[derive(Debug, Clone, Default)]
pub struct Expect {
    /// A wasm plugin's module digest.
    pub module_sha256: Option<String>,
    /// A process plugin's process before the rebuild (a new one must replace it).
    pub previous_pid: Option<u64>,
    /// The proxy's refused reloads before the rebuild: one more means it refused the new
    /// build (a module that does not compile or start there), and waiting is over.
    pub refusals_before: Option<u64>,
}

impl Session {
    /// Checks the project's config, starts the echo backend and the proxy (its log lines
    /// also on this terminal when `show_log`).
    pub fn start(project: &Project, revision: u64, show_log: bool) -> anyhow::Result<Session> {
        let (config, config_path) = read_config(project)?;
        let address = |path: &[&str]| -> Option<String> {
            let mut value = &config;
            for key in path {
                value = value.get(key)?;
            }
            value.as_str().map(str::to_string)
        };
        let listen = address(&["api_gateway", "address"])
            .ok_or_else(|| anyhow!("{}: api_gateway.address is missing", config_path.display()))?;
        let admin = address(&["admin", "address"])
            .ok_or_else(|| anyhow!("{}: admin.address is missing", config_path.display()))?;
        let echo: Vec<SocketAddr> = config["services"]["echo"]["endpoints"]
            .as_sequence()
            .into_iter()
            .flatten()
            .filter_map(|e| e.as_str().and_then(|a| a.parse().ok()))
            .collect();
        crate::demo::start_echo_backends(&echo, "echo")?;
        let work = project.work_dir()?;
        let run_config = work.join("run.yaml");
        let log = work.join("proxy.log");
        let mut session_config = config;
        with_revision(&mut session_config, &project.manifest.name, revision);
        write_atomically(&run_config, &serde_yaml::to_string(&session_config)?)?;
        let proxy = start_proxy(project, &run_config, &log, show_log)?;
        Ok(Session {
            proxy,
            run_config,
            config: session_config,
            url: format!("http://{}", local(&listen)),
            admin: format!("http://{}", local(&admin)),
            log,
        })
    }

    /// Reads the project's config again (edited while `nip dev` runs): checked first, a
    /// bad one is the error and the proxy keeps the one it has.
    pub fn reload_config(&mut self, project: &Project, revision: u64) -> anyhow::Result<()> {
        let (mut config, _) = read_config(project)?;
        with_revision(&mut config, &project.manifest.name, revision);
        self.config = config;
        write_atomically(&self.run_config, &serde_yaml::to_string(&self.config)?)
    }

    /// Tells the proxy about a new build of a process plugin (its revision changes its
    /// process spec, which the proxy restarts).
    pub fn new_revision(&mut self, name: &str, revision: u64) -> anyhow::Result<()> {
        with_revision(&mut self.config, name, revision);
        write_atomically(&self.run_config, &serde_yaml::to_string(&self.config)?)
    }

    /// How many reloads the proxy has refused (`nip_config_reload_failures_total`).
    pub fn refused_reloads(&self) -> Option<u64> {
        let url = format!("{}/metrics", self.admin);
        let text = admin_agent()
            .get(&url)
            .call()
            .ok()?
            .body_mut()
            .read_to_string()
            .ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix("nip_config_reload_failures_total "))
            .and_then(|v| v.trim().parse::<f64>().ok())
            .map(|v| v as u64)
    }

    /// The plugin's process id, if it runs in one.
    pub fn plugin_pid(&self, name: &str) -> Option<u64> {
        self.admin_json("/plugins").ok()?["processes"][name]["pid"].as_u64()
    }

    /// Waits until the proxy serves `name` as `expect` says: the module with that digest,
    /// or a new process that listens. Fails early when the proxy exits.
    pub fn wait_serving(&mut self, name: &str, expect: &Expect) -> anyhow::Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut last = String::from("the proxy has not answered yet");
        while Instant::now() < deadline {
            if let Some(status) = self.proxy.try_wait()? {
                bail!("the proxy exited ({status}):\n{}", tail(&self.log, 30));
            }
            if let (Some(before), Some(now)) = (expect.refusals_before, self.refused_reloads()) {
                if now > before {
                    let why = self
                        .admin_json("/config_dump")
                        .ok()
                        .and_then(|d| d["last_reload_error"].as_str().map(str::to_string))
                        .unwrap_or_default();
                    bail!("the proxy refused the new build (it keeps the one it had): {why}");
                }
            }
            match self.admin_json("/plugins") {
                Ok(plugins) => match self
                    .serving(&plugins, name, expect)
                    .and_then(|()| self.accepting())
                {
                    Ok(()) => return Ok(()),
                    Err(why) => last = why,
                },
                Err(e) => last = e.to_string(),
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "plugin {name} not serving after {}s: {last}\nproxy log ({}):\n{}",
            READY_TIMEOUT.as_secs(),
            self.log.display(),
            tail(&self.log, 30)
        )
    }

    fn serving(
        &self,
        plugins: &serde_json::Value,
        name: &str,
        expect: &Expect,
    ) -> Result<(), String> {
        if let Some(sha) = &expect.module_sha256 {
            let serving = plugins["plugins"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["name"] == name && p["module_sha256"] == sha.as_str());
            return if serving {
                Ok(())
            } else {
                Err(format!("the proxy does not serve module {sha} yet"))
            };
        }
        let process = &plugins["processes"][name];
        if process["state"] != "running" {
            return Err(format!("plugin process {name}: {}", process));
        }
        if process["pid"].as_u64() == expect.previous_pid {
            return Err(format!(
                "plugin process {name}: the previous process still runs"
            ));
        }
        let service = self.config["plugins"][name]["process"]["service"]
            .as_str()
            .unwrap_or_default();
        let endpoint = self.config["services"][service]["endpoints"][0]
            .as_str()
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| format!("services.{service}.endpoints[0] is not an address"))?;
        std::net::TcpStream::connect_timeout(&endpoint, Duration::from_millis(200))
            .map(drop)
            .map_err(|e| format!("plugin process {name} does not listen on {endpoint} yet: {e}"))
    }

    /// Whether the proxy's listener takes connections (its admin port opens first).
    fn accepting(&self) -> Result<(), String> {
        let address = self.url.trim_start_matches("http://");
        let address: SocketAddr = address
            .parse()
            .map_err(|e| format!("api_gateway.address {address}: {e}"))?;
        std::net::TcpStream::connect_timeout(&address, Duration::from_millis(200))
            .map(drop)
            .map_err(|e| format!("the proxy does not listen on {address} yet: {e}"))
    }

    fn admin_json(&self, path: &str) -> anyhow::Result<serde_json::Value> {
        let text = admin_agent()
            .get(&format!("{}{path}", self.admin))
            .call()?
            .body_mut()
            .read_to_string()?;
        Ok(serde_json::from_str(&text)?)
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        // SIGTERM first: the proxy stops its plugin processes on the way out.
        if let Ok(pid) = i32::try_from(self.proxy.id()) {
            // SAFETY: signals our own child, which has not been reaped yet.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.proxy.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.proxy.kill();
        let _ = self.proxy.wait();
    }
}

/// The project's config, checked, as YAML to amend; and its path.
fn read_config(project: &Project) -> anyhow::Result<(Value, PathBuf)> {
    let path = project.path(&project.manifest.config);
    nip_xds::config::Config::from_file(&path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let config =
        serde_yaml::from_str(&text).with_context(|| format!("cannot parse {}", path.display()))?;
    Ok((config, path))
}

/// An HTTP agent for the proxy's admin port (local: short timeouts).
fn admin_agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(2)))
        .build()
        .into()
}

/// Sets `plugins.NAME.process.env.NIP_DEV_REVISION` when the plugin has a process.
fn with_revision(config: &mut Value, name: &str, revision: u64) {
    let Some(process) = config
        .get_mut("plugins")
        .and_then(|p| p.get_mut(name))
        .and_then(|p| p.get_mut("process"))
        .and_then(Value::as_mapping_mut)
    else {
        return;
    };
    let env = process
        .entry(Value::from("env"))
        .or_insert_with(|| Value::Mapping(Default::default()));
    if let Some(env) = env.as_mapping_mut() {
        env.insert(
            Value::from("NIP_DEV_REVISION"),
            Value::from(revision.to_string()),
        );
    }
}

/// `0.0.0.0:8080` is reached on 127.0.0.1.
fn local(address: &str) -> String {
    match address.parse::<SocketAddr>() {
        Ok(a) if a.ip().is_unspecified() => format!("127.0.0.1:{}", a.port()),
        _ => address.to_string(),
    }
}

fn start_proxy(
    project: &Project,
    config: &std::path::Path,
    log: &std::path::Path,
    show_log: bool,
) -> anyhow::Result<Child> {
    let exe = std::env::current_exe().context("cannot find the nip binary")?;
    let mut command = Command::new(exe);
    command
        .arg("proxy")
        .arg("--config")
        .arg(config)
        .arg("--drain-timeout")
        .arg("1s")
        .current_dir(&project.root)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut command, || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = command.spawn().context("cannot start the proxy")?;
    let stderr = child.stderr.take().context("the proxy's log")?;
    let mut file =
        std::fs::File::create(log).with_context(|| format!("cannot write {}", log.display()))?;
    std::thread::Builder::new()
        .name("nip-proxy-log".into())
        .spawn(move || {
            for line in std::io::BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                let _ = writeln!(file, "{line}");
                if show_log {
                    eprintln!("{line}");
                }
            }
        })?;
    Ok(child)
}

/// Writes a file whole (a temporary beside it, renamed), so a watcher never reads half.
fn write_atomically(path: &std::path::Path, text: &str) -> anyhow::Result<()> {
    let staged = path.with_extension("partial");
    std::fs::write(&staged, text).with_context(|| format!("cannot write {}", staged.display()))?;
    std::fs::rename(&staged, path).with_context(|| format!("cannot write {}", path.display()))
}

/// The last `lines` lines of a log.
pub fn tail(path: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
