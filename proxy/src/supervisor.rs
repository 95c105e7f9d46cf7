//! Process plugins a proxy runs itself (`plugins.X.process.command`): the plan's process
//! sandbox beside WebAssembly.
//!
//! ```text
//! config load ──▶ reconcile(specs) ──▶ per plugin: COMMAND --describe (an SDK's declaration;
//!                                       another API major: refused, never started)
//!                                      ──▶ start: its user, its limits, NIP_PLUGIN_PORT
//!                                      ──▶ SDK processes: health and resource usage asked
//!                                          (nip.plugin.v2.Plugin/Report) every 10 s
//!                                      ──▶ exits? started again after a back-off
//!                                          (100 ms doubling to 10 s; reset after 10 s up)
//! ```
//!
//! Limits go into a cgroup (v2) of the plugin's own where the kernel lets the proxy make
//! one (`memory.max`, `cpu.max`); otherwise into rlimits (memory as address space, open
//! files; no CPU share). A process is killed when its plugin leaves the config, when its
//! spec changes (and started anew), and when the proxy exits, even killed (the kernel's
//! parent-death signal). Runs on the control thread, which lives as long as the proxy:
//! the parent-death signal follows the thread that started the process.

use nip_filters::sdk::Declaration;
use nip_xds::translate::PluginProcess;
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The longest wait between two starts of a process that keeps exiting.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A process up this long has recovered: its back-off starts over.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// When a started SDK process is first asked how it is.
const FIRST_HEALTH_CHECK: Duration = Duration::from_millis(500);
/// How often after that.
const HEALTH_INTERVAL: Duration = Duration::from_secs(10);
/// How long `--describe` may take (a program that does not know it may start serving).
const DESCRIBE_TIMEOUT: Duration = Duration::from_secs(3);
/// Where plugin cgroups are made (cgroup v2).
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// What the admin page says about a supervised process.
#[derive(Debug, Clone, Default, Serialize)]
pub struct ProcessStatus {
    /// `starting`, `running`, `restarting`, `refused` or `stopped`.
    pub state: String,
    /// The running process.
    pub pid: Option<u32>,
    /// Starts after the first.
    pub restarts: u64,
    /// Why it is not running, when it is not.
    pub reason: Option<String>,
    /// What its SDK declared (`--describe`).
    pub declared: Option<Declaration>,
    /// How its limits are held: `cgroup`, `rlimit` or `none`.
    pub limits: String,
    /// Its SDK's last health report (`{ healthy, message? }`).
    pub health: Option<serde_json::Value>,
    /// Its SDK's last resource-usage report.
    pub resource_usage: Option<serde_json::Value>,
}

/// Status of every supervised process, by plugin name.
pub type ProcessStatuses = Arc<Mutex<BTreeMap<String, ProcessStatus>>>;

/// Finds a plugin's restart counter.
pub type RestartCounter = Arc<dyn Fn(&str) -> Counter + Send + Sync>;
/// Records a plugin's health.
pub type HealthRecorder = Arc<dyn Fn(&str, bool) + Send + Sync>;

/// Where the supervisor counts: a plugin's restart counter, and its health.
#[derive(Clone)]
pub struct SupervisorMetrics {
    /// The restart counter of a plugin's process.
    pub restarts: RestartCounter,
    /// Records a plugin's health.
    pub health: HealthRecorder,
}

struct Supervised {
    spec: PluginProcess,
    stop: tokio::sync::watch::Sender<bool>,
}

/// Keeps the configured plugin processes running.
pub struct Supervisor {
    running: HashMap<String, Supervised>,
    statuses: ProcessStatuses,
    metrics: SupervisorMetrics,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("running", &self.running.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl Supervisor {
    /// A supervisor reporting into `statuses` and `metrics`.
    pub fn new(statuses: ProcessStatuses, metrics: SupervisorMetrics) -> Self {
        Supervisor {
            running: HashMap::new(),
            statuses,
            metrics,
        }
    }

    /// Makes the running processes those of `specs`: stops the ones gone or changed,
    /// starts the new and changed. Must run inside the control thread's runtime.
    pub fn reconcile(&mut self, specs: &[PluginProcess]) {
        let wanted: HashMap<&str, &PluginProcess> =
            specs.iter().map(|s| (s.name.as_str(), s)).collect();
        self.running.retain(|name, supervised| {
            let keep = wanted.get(name.as_str()) == Some(&&supervised.spec);
            if !keep {
                let _ = supervised.stop.send(true);
            }
            keep
        });
        {
            let mut statuses = self.statuses.lock().unwrap_or_else(|p| p.into_inner());
            statuses.retain(|name, _| wanted.contains_key(name.as_str()));
        }
        for spec in specs {
            if self.running.contains_key(&spec.name) {
                continue;
            }
            let (stop, stopped) = tokio::sync::watch::channel(false);
            tokio::spawn(supervise(
                spec.clone(),
                stopped,
                Arc::clone(&self.statuses),
                self.metrics.clone(),
            ));
            self.running.insert(
                spec.name.clone(),
                Supervised {
                    spec: spec.clone(),
                    stop,
                },
            );
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        for supervised in self.running.values() {
            let _ = supervised.stop.send(true);
        }
    }
}

fn set_status(statuses: &ProcessStatuses, name: &str, update: impl FnOnce(&mut ProcessStatus)) {
    let mut statuses = statuses.lock().unwrap_or_else(|p| p.into_inner());
    update(statuses.entry(name.to_string()).or_default());
}

/// Keeps one process running until told to stop.
async fn supervise(
    spec: PluginProcess,
    mut stop: tokio::sync::watch::Receiver<bool>,
    statuses: ProcessStatuses,
    metrics: SupervisorMetrics,
) {
    let name = spec.name.clone();
    let restarts = (metrics.restarts)(&name);
    let mut sdk = false;
    set_status(&statuses, &name, |s| s.state = "starting".into());
    let cgroup = cgroup_for(&spec);
    let limits = if cgroup.is_some() {
        "cgroup"
    } else if spec.memory.is_some() || spec.open_files.is_some() {
        "rlimit"
    } else {
        "none"
    };
    set_status(&statuses, &name, |s| s.limits = limits.into());
    if spec.cpu.is_some() && cgroup.is_none() {
        tracing::warn!(plugin = %name, "no cgroup v2 here: the process's CPU limit cannot be held (rlimits have no CPU share)");
    }
    match describe(&spec).await {
        Ok(Some(declared)) => {
            sdk = true;
            let check = declared.check();
            set_status(&statuses, &name, |s| s.declared = Some(declared.clone()));
            if let Err(reason) = check {
                let reason = format!("{} {}: {reason}", declared.name, declared.version);
                tracing::error!(plugin = %name, "not started: {reason}");
                set_status(&statuses, &name, |s| {
                    s.state = "refused".into();
                    s.reason = Some(reason);
                });
                stopped(&mut stop).await;
                return;
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!(plugin = %name, "--describe: {e}"),
    }
    let mut failures: u32 = 0;
    let mut first = true;
    loop {
        if !first {
            restarts.inc();
            set_status(&statuses, &name, |s| s.restarts += 1);
        }
        first = false;
        let started = Instant::now();
        match spawn(&spec, false) {
            Ok(mut child) => {
                let pid = child.id();
                if let (Some(dir), Some(pid)) = (&cgroup, pid) {
                    let _ = std::fs::write(dir.join("cgroup.procs"), pid.to_string());
                }
                tracing::info!(plugin = %name, pid = ?pid, "plugin process started");
                set_status(&statuses, &name, |s| {
                    s.state = "running".into();
                    s.pid = pid;
                    s.reason = None;
                });
                // An SDK process is asked how it is soon after it starts, then every
                // HEALTH_INTERVAL.
                let mut next_check = tokio::time::Instant::now() + FIRST_HEALTH_CHECK;
                loop {
                    tokio::select! {
                        exit = child.wait() => {
                            let reason = match exit {
                                Ok(status) => format!("exited: {status}"),
                                Err(e) => format!("lost: {e}"),
                            };
                            tracing::warn!(plugin = %name, "plugin process {reason}");
                            (metrics.health)(&name, false);
                            set_status(&statuses, &name, |s| {
                                s.state = "restarting".into();
                                s.pid = None;
                                s.reason = Some(reason);
                            });
                            break;
                        }
                        _ = stopped(&mut stop) => {
                            terminate(&mut child).await;
                            set_status(&statuses, &name, |s| {
                                s.state = "stopped".into();
                                s.pid = None;
                            });
                            return;
                        }
                        _ = tokio::time::sleep_until(next_check), if sdk => {
                            next_check = tokio::time::Instant::now() + HEALTH_INTERVAL;
                            let health = ask(spec.port, "health").await;
                            let usage = ask(spec.port, "resource_usage").await;
                            let healthy = health
                                .as_ref()
                                .ok()
                                .and_then(|h| h.get("healthy"))
                                .and_then(serde_json::Value::as_bool)
                                .unwrap_or(false);
                            (metrics.health)(&name, healthy);
                            set_status(&statuses, &name, |s| {
                                s.health = Some(health.unwrap_or_else(|e| {
                                    serde_json::json!({ "healthy": false, "message": e })
                                }));
                                s.resource_usage = usage.ok();
                            });
                        }
                    }
                }
            }
            Err(e) => {
                tracing::error!(plugin = %name, "cannot start the plugin process: {e}");
                set_status(&statuses, &name, |s| {
                    s.state = "restarting".into();
                    s.reason = Some(format!("cannot start: {e}"));
                });
            }
        }
        if started.elapsed() >= HEALTHY_RUN {
            failures = 0;
        }
        failures = failures.saturating_add(1);
        let backoff = (Duration::from_millis(100) * 2u32.saturating_pow(failures.min(7) - 1))
            .min(MAX_BACKOFF);
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = stopped(&mut stop) => return,
        }
    }
}

/// Asks an SDK process for a report (`health`, `resource_usage`): the JSON it answers
/// on `nip.plugin.v2.Plugin/Report`, beside its ExternalProcessor service.
async fn ask(port: u16, what: &str) -> Result<serde_json::Value, String> {
    use envoy_types::pb::google::protobuf::StringValue;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://127.0.0.1:{port}"))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(1))
        .connect()
        .await
        .map_err(|e| format!("cannot reach the process: {e}"))?;
    let mut grpc = tonic::client::Grpc::new(channel);
    grpc.ready().await.map_err(|e| e.to_string())?;
    let codec = tonic_prost::ProstCodec::<StringValue, StringValue>::default();
    let answer = grpc
        .unary(
            tonic::Request::new(StringValue { value: what.into() }),
            http::uri::PathAndQuery::from_static("/nip.plugin.v2.Plugin/Report"),
            codec,
        )
        .await
        .map_err(|status| format!("no report: {}", status.message()))?;
    serde_json::from_str(&answer.into_inner().value).map_err(|e| format!("not JSON: {e}"))
}

/// Until the supervisor says stop (the watch's guard is not held across awaits).
async fn stopped(stop: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = stop.wait_for(|stopped| *stopped).await;
}

/// Asks the program for its SDK declaration (`--describe`): `None` from a program that
/// does not print one.
async fn describe(spec: &PluginProcess) -> Result<Option<Declaration>, String> {
    let mut child = spawn(spec, true).map_err(|e| e.to_string())?;
    let mut stdout = child.stdout.take().ok_or("no stdout")?;
    let read = async {
        use tokio::io::AsyncReadExt;
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out).await;
        out
    };
    let out = match tokio::time::timeout(DESCRIBE_TIMEOUT, read).await {
        Ok(out) => out,
        Err(_) => {
            terminate(&mut child).await;
            return Ok(None);
        }
    };
    let _ = child.wait().await;
    let text = String::from_utf8_lossy(&out);
    Ok(text
        .lines()
        .rev()
        .find_map(|line| Declaration::parse(line.trim().as_bytes()).ok()))
}

/// Starts the process (with `--describe` appended for the version check).
fn spawn(spec: &PluginProcess, describe: bool) -> std::io::Result<tokio::process::Child> {
    let (program, args) = spec
        .command
        .split_first()
        .ok_or_else(|| std::io::Error::other("no command"))?;
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .envs(&spec.env)
        .env("NIP_PLUGIN_PORT", spec.port.to_string())
        .env("NIP_PLUGIN_NAME", &spec.name)
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true);
    if describe {
        command
            .arg("--describe")
            .stdout(std::process::Stdio::piped());
    }
    if let Some(dir) = &spec.working_dir {
        command.current_dir(dir);
    }
    let user = spec.user.as_deref().map(lookup_user).transpose()?;
    let memory = if cgroup_for(spec).is_some() {
        None
    } else {
        spec.memory
    };
    let open_files = spec.open_files;
    // SAFETY: between fork and exec only async-signal-safe calls: setsid, setrlimit,
    // setgroups, setgid, setuid, prctl.
    unsafe {
        command.pre_exec(move || {
            // Its own process group: a stop takes its children too.
            libc::setsid();
            let limit = |resource, value: u64| {
                let limit = libc::rlimit {
                    rlim_cur: value,
                    rlim_max: value,
                };
                if libc::setrlimit(resource, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            };
            if let Some(bytes) = memory {
                limit(libc::RLIMIT_AS, bytes)?;
            }
            if let Some(files) = open_files {
                limit(libc::RLIMIT_NOFILE, files)?;
            }
            if let Some((uid, gid)) = user {
                if libc::setgroups(0, std::ptr::null()) != 0
                    || libc::setgid(gid) != 0
                    || libc::setuid(uid) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // Dies with the proxy, however it ends (set after the user change, which
            // clears it).
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Ends a process and its group: SIGTERM, then SIGKILL after two seconds.
async fn terminate(child: &mut tokio::process::Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        // SAFETY: signalling a process group we made (setsid in the child).
        unsafe {
            libc::kill(-pid, libc::SIGTERM);
        }
        if tokio::time::timeout(Duration::from_secs(2), child.wait())
            .await
            .is_ok()
        {
            return;
        }
        unsafe {
            libc::kill(-pid, libc::SIGKILL);
        }
    }
    let _ = child.kill().await;
}

/// `UID[:GID]`, or a name from /etc/passwd.
fn lookup_user(user: &str) -> std::io::Result<(u32, u32)> {
    let numeric = |s: &str| s.parse::<u32>().ok();
    if let Some(uid) = numeric(user.split(':').next().unwrap_or("")) {
        let gid = user
            .split_once(':')
            .and_then(|(_, g)| numeric(g))
            .unwrap_or(uid);
        return Ok((uid, gid));
    }
    let passwd = std::fs::read_to_string("/etc/passwd")?;
    passwd
        .lines()
        .find_map(|line| {
            let mut fields = line.split(':');
            (fields.next()? == user).then_some(())?;
            let _password = fields.next()?;
            Some((numeric(fields.next()?)?, numeric(fields.next()?)?))
        })
        .ok_or_else(|| std::io::Error::other(format!("no user {user:?} in /etc/passwd")))
}

/// The plugin's own cgroup (v2) with its limits written, where the kernel lets the proxy
/// make one; `None` otherwise (rlimits then).
fn cgroup_for(spec: &PluginProcess) -> Option<std::path::PathBuf> {
    if spec.memory.is_none() && spec.cpu.is_none() {
        return None;
    }
    let root = std::path::Path::new(CGROUP_ROOT);
    let controllers = std::fs::read_to_string(root.join("cgroup.controllers")).ok()?;
    if !controllers.split_whitespace().any(|c| c == "memory") {
        return None;
    }
    let base = root.join("nip-plugins");
    std::fs::create_dir_all(&base).ok()?;
    let _ = std::fs::write(root.join("cgroup.subtree_control"), "+memory +cpu");
    let _ = std::fs::write(base.join("cgroup.subtree_control"), "+memory +cpu");
    let dir = base.join(&spec.name);
    std::fs::create_dir_all(&dir).ok()?;
    if let Some(bytes) = spec.memory {
        std::fs::write(dir.join("memory.max"), bytes.to_string()).ok()?;
    }
    if let Some(cores) = spec.cpu {
        let period = 100_000u64;
        let quota = (cores * period as f64).round().max(1000.0) as u64;
        std::fs::write(dir.join("cpu.max"), format!("{quota} {period}")).ok()?;
    }
    Some(dir)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_are_numbers_or_names_from_passwd() {
        assert_eq!(lookup_user("1234").unwrap(), (1234, 1234));
        assert_eq!(lookup_user("1234:99").unwrap(), (1234, 99));
        assert_eq!(lookup_user("root").unwrap(), (0, 0));
        assert!(lookup_user("no-such-user-here").is_err());
    }
}
