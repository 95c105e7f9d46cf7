//! `nip`: the one user-facing binary. Each subcommand is a role (`nip proxy`,
//! `nip control-plane`, `nip validate`, `nip demo`); the work itself lives in the library
//! crates.

mod debug;
mod demo;
mod fleet_metrics;
mod iptables;
mod kubernetes;
mod migrate_verify;
mod project;
mod remote;

use clap::{Parser, Subcommand};
use nip_proxy::{ConfigSource, ProxyOptions};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Exit code for a config the user must fix.
pub(crate) const EXIT_BAD_CONFIG: u8 = 2;

#[derive(Parser)]
#[command(
    name = "nip",
    version,
    about = "NIP: an edge and sidecar proxy with an xDS control plane"
)]
struct Cli {
    /// Log filter (tracing syntax), e.g. `info` or `nip_proxy=debug`.
    #[arg(long, global = true, env = "NIP_LOG", default_value = "info")]
    log: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a proxy from a v4 config file (reloaded on SIGHUP and when the file changes).
    Proxy {
        /// The v4 YAML config.
        #[arg(short, long)]
        config: PathBuf,
        /// Worker threads (default: one per CPU).
        #[arg(long)]
        threads: Option<usize>,
        /// Longest wait for in-flight requests after SIGTERM.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        drain_timeout: Duration,
        /// Where listening sockets pass to a proxy taking over (default:
        /// /tmp/nip-upgrade-ADMINPORT.sock); SIGQUIT sends them there.
        #[arg(long)]
        upgrade_socket: Option<PathBuf>,
        /// Take over the listening sockets of the proxy running on --upgrade-socket: start
        /// this, then send the running one SIGQUIT; it hands its sockets over, finishes
        /// what it has in flight and exits, and no connection is refused meanwhile.
        #[arg(long)]
        take_over: bool,
    },
    /// Run a control plane: store the desired config with its history and serve it to
    /// proxies and xDS clients over ADS. Changes come from `nip apply`, the REST API, or a
    /// config file it follows.
    ControlPlane(Box<ControlPlaneArgs>),
    /// Apply a whole v4 config through the control plane: stored as a new version and
    /// pushed to every proxy (or to one region first with --canary).
    Apply {
        /// The v4 YAML config.
        #[arg(short, long)]
        file: PathBuf,
        /// Why (kept in the history).
        #[arg(short, long, default_value = "")]
        message: String,
        /// Push to this region first; promote when all its proxies ACK, roll back
        /// automatically if any NACKs.
        #[arg(long)]
        canary: Option<String>,
        /// How long the canary region's proxies have to ACK.
        #[arg(long, default_value = "30s", value_parser = parse_duration)]
        canary_timeout: Duration,
        /// Apply even a config that serves nothing (no routes, or a routed service with
        /// no endpoints).
        #[arg(long)]
        allow_empty: bool,
        /// Print the API's JSON answer.
        #[arg(long)]
        json: bool,
        /// Replace only this tenant's routes and services (the file holds just those:
        /// what a token limited to the tenant may change).
        #[arg(long)]
        tenant: Option<String>,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// The fleet's metrics: with --admin, from each proxy's admin port (per route requests,
    /// 5xx share, p50 and p99; with --export prometheus every proxy's samples with an
    /// `instance` label); without, the control plane's per-route figures over the last
    /// minute, from the access records proxies stream to it.
    Metrics {
        /// A proxy's admin address (`127.0.0.1:9901` or a URL); repeat for each proxy.
        #[arg(long = "admin", env = "NIP_ADMIN", value_delimiter = ',')]
        admins: Vec<String>,
        /// Print the samples instead of the summary (`prometheus`).
        #[arg(long)]
        export: Option<String>,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Make a plugin project: the plugin on its language's SDK, a proxy config running it
    /// in front of an echo backend, and integration cases it passes.
    Init(project::scaffold::InitOptions),
    /// Develop the plugin of the project here: build it, serve it through a local proxy in
    /// front of an echo backend, rebuild and hot-swap it on every save.
    Dev {
        /// The project's directory (default: this one or the nearest above with a
        /// nip-project.yaml).
        #[arg(long, default_value = ".")]
        project: PathBuf,
    },
    /// Test the project's plugin: `--integration` builds it and sends cases.yaml's
    /// requests through a real proxy, checking each answer (exit 1 when one fails).
    Test {
        /// Run the integration cases (the only kind of test nip runs itself).
        #[arg(long, required = true)]
        integration: bool,
        /// The project's directory.
        #[arg(long, default_value = ".")]
        project: PathBuf,
    },
    /// Ship the project's plugin and routes to an environment of its nip-project.yaml:
    /// the module uploaded to that control plane, the config applied (with the
    /// environment's canary region first; exit 1 when it rolls back).
    Deploy {
        /// The environment (`environments.NAME` in nip-project.yaml).
        #[arg(long)]
        env: String,
        /// Why (kept in the control plane's history).
        #[arg(short, long, default_value = "")]
        message: String,
        /// The project's directory.
        #[arg(long, default_value = ".")]
        project: PathBuf,
    },
    /// A console on one proxy's admin port: routes, clusters with endpoint predictions,
    /// plugins, a live tap of one route's requests, plugin logs (type help). Give a
    /// command to run it once.
    Debug {
        /// The proxy's admin address (`127.0.0.1:9901` or a URL).
        #[arg(long, env = "NIP_ADMIN", default_value = "127.0.0.1:9901")]
        admin: String,
        /// A command to run instead of the console (`routes`, `tap web 5`…).
        command: Vec<String>,
    },
    /// The access records proxies stream to the control plane
    /// (`control_plane.stream_access_logs: true` in a proxy's file): the newest kept ones,
    /// and with --follow each as it comes.
    Logs {
        #[command(flatten)]
        options: remote::LogsOptions,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Move a v3 config to v4: `analyze` reports what changes, `config --from-v3` writes
    /// the v4 file (TODO comments where a human must decide).
    Migrate {
        /// What to do.
        #[command(subcommand)]
        action: MigrateAction,
    },
    /// Rotate or retire the control plane's self-made roots (in its CA directory; the
    /// control plane applies the change at its next start).
    Ca {
        /// What to do.
        #[command(subcommand)]
        action: CaAction,
        /// The control plane's CA directory.
        #[arg(long, global = true, env = "NIP_CA_DIR", default_value_os_t = default_ca_dir())]
        ca_dir: PathBuf,
    },
    /// Send a pod's TCP traffic through its NIP sidecar (iptables `nat` rules, as an init
    /// step run with NET_ADMIN), or remove those rules.
    Iptables {
        /// What to do.
        #[command(subcommand)]
        action: IptablesAction,
        /// The iptables binary (`iptables-legacy` or `iptables-nft` to pick a backend).
        #[arg(long, global = true, default_value = "iptables")]
        iptables: String,
        /// Print the commands instead of running them.
        #[arg(long, global = true)]
        dry_run: bool,
        /// IPv6 too (the same rules with ip6tables).
        #[arg(long, global = true)]
        ipv6: bool,
    },
    /// Create, list and revoke the API tokens of a control plane (admin role).
    Token {
        /// What to do.
        #[command(subcommand)]
        action: TokenAction,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Show what a control plane knows.
    Get {
        /// What to show.
        #[command(subcommand)]
        what: GetWhat,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// List the stored config versions, or show one version's diff.
    History {
        /// A version to show in full.
        version: Option<u64>,
        /// How many versions to list.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Restore a past version's config as a new version, pushed to every proxy.
    Rollback {
        /// The version to restore (see `nip history`).
        version: u64,
        /// Why (kept in the history).
        #[arg(short, long, default_value = "")]
        message: String,
        #[command(flatten)]
        remote: remote::Remote,
    },
    /// Add the NIP sidecar to the pods of Kubernetes manifests (Pods, Deployments,
    /// StatefulSets, DaemonSets, ReplicaSets, Jobs, CronJobs), as `linkerd inject --manual`
    /// does; prints the manifests. The control plane's admission webhook does the same.
    Inject {
        /// The manifests (YAML, several documents), or - for standard input.
        #[arg(short, long)]
        file: PathBuf,
        /// The NIP image of the init step and the proxy.
        #[arg(long, default_value = concat!("nip:", env!("CARGO_PKG_VERSION")))]
        image: String,
    },
    /// Wait until a proxy's admin port says it is ready: a pod's postStart hook, so the
    /// application's containers start once the sidecar serves.
    WaitReady {
        /// The proxy's admin address.
        #[arg(long, default_value = "127.0.0.1:15020")]
        admin: String,
        /// Give up (exit 1) after this long.
        #[arg(long, default_value = "60s", value_parser = parse_duration)]
        timeout: Duration,
    },
    /// Check a config file; print every problem with its field path.
    Validate {
        /// The v4 YAML config.
        #[arg(short, long)]
        file: PathBuf,
        /// Print the xDS resources it translates to, as JSON.
        #[arg(long)]
        xds: bool,
    },
    /// Run the demo: two backends, a control plane, and a proxy it feeds over xDS.
    Demo {
        /// Proxy port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
        /// Admin port.
        #[arg(long, default_value_t = 9901)]
        admin_port: u16,
        /// Control plane ADS port.
        #[arg(long, default_value_t = 18000)]
        xds_port: u16,
        /// Control plane REST API port.
        #[arg(long, default_value_t = 18001)]
        api_port: u16,
        /// A proxy-wasm plugin to run on the default route (`./dev demo` passes the
        /// add-header example).
        #[arg(long)]
        plugin: Option<PathBuf>,
    },
    /// Serve the rate limit service (Envoy's RateLimitService gRPC API) that counts the
    /// config's global rate limits (`rate_limit.scope: global`) in Redis, for every proxy.
    Ratelimit {
        /// The config whose global limits are served (reloaded when it changes).
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Redis, `host:port`.
        #[arg(long, default_value = "127.0.0.1:6379")]
        redis: String,
        /// Address to serve gRPC on (the config's `rate_limit_service.address`).
        #[arg(long, default_value = "127.0.0.1:8081")]
        listen: std::net::SocketAddr,
    },
    /// Serve a small HTTP backend that echoes what it received (for demos and benchmarks).
    Backend {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:9100")]
        listen: std::net::SocketAddr,
        /// Name reported in the `x-backend` header and the body.
        #[arg(long, default_value = "backend")]
        name: String,
    },
}

#[derive(Subcommand)]
enum GetWhat {
    /// Every proxy that connected: locality, connected, versions ACKed, last NACK.
    Proxies {
        /// Print the API's JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The current config as YAML (with `--tenant T`, only that tenant's services and
    /// routes: what `nip apply --tenant T` replaces).
    Config {
        /// Only this tenant's part.
        #[arg(long)]
        tenant: Option<String>,
    },
}

/// The flags of `nip control-plane`.
#[derive(clap::Args)]
struct ControlPlaneArgs {
    /// Where versions and the audit trail are kept: sqlite://PATH or postgres://URL
    /// (several replicas may share one PostgreSQL database).
    #[arg(long, env = "NIP_STORE", default_value_t = default_store())]
    store: String,
    /// A v4 YAML config to follow: applied at start and whenever the file changes.
    #[arg(short, long)]
    config: Option<PathBuf>,
    /// Address ADS is served on.
    #[arg(long, default_value = "127.0.0.1:18000")]
    xds_address: std::net::SocketAddr,
    /// The first admin token: read from this file, or made and written here (0600)
    /// when the store has no usable admin token.
    #[arg(long, env = "NIP_ADMIN_TOKEN_FILE", default_value_os_t = default_admin_token_file())]
    admin_token_file: PathBuf,
    /// The trust domain of the identities its CA signs (spiffe://TRUST_DOMAIN/…).
    #[arg(long, env = "NIP_TRUST_DOMAIN", default_value = "nip.local")]
    trust_domain: String,
    /// Where the CA keeps the roots it made (keys 0600).
    #[arg(long, env = "NIP_CA_DIR", default_value_os_t = default_ca_dir())]
    ca_dir: PathBuf,
    /// An intermediate CA certificate (PEM, with its chain) to sign with instead of a
    /// root of its own; needs --ca-key.
    #[arg(long, requires = "ca_key")]
    ca_cert: Option<PathBuf>,
    /// The key of --ca-cert (PKCS#8 PEM).
    #[arg(long, requires = "ca_cert")]
    ca_key: Option<PathBuf>,
    /// The roots proxies trust with --ca-cert (default: the last certificate of its chain).
    #[arg(long, requires = "ca_cert")]
    ca_bundle: Option<PathBuf>,
    /// How long a proxy's certificate lives (renewed at half-life).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    certificate_lifetime: Duration,
    /// A DNS name or IP proxies reach the xDS port by (repeat; its bind IP is added).
    #[arg(long = "server-name", default_value = "localhost")]
    server_names: Vec<String>,
    /// The image the admission webhook (`POST /v1/inject`) puts in pods.
    #[arg(long, default_value = concat!("nip:", env!("CARGO_PKG_VERSION")))]
    inject_image: String,
    /// Serve the xDS port and the REST API without TLS, and ADS to anyone without a
    /// certificate (development only).
    #[arg(long)]
    plaintext: bool,
    /// Also accept JWTs of this OIDC issuer on the REST API (https://, or http:// on
    /// loopback); roles and tenants come from the claims below.
    #[arg(long, env = "NIP_OIDC_ISSUER")]
    oidc_issuer: Option<String>,
    /// The audience (`aud`) those JWTs must be for.
    #[arg(long, env = "NIP_OIDC_AUDIENCE", default_value = "nip")]
    oidc_audience: String,
    /// The claim holding a caller's role (viewer, operator or admin).
    #[arg(long, default_value = "nip_role")]
    oidc_role_claim: String,
    /// The claim holding a caller's tenants (absent: every tenant).
    #[arg(long, default_value = "nip_tenants")]
    oidc_tenants_claim: String,
    /// PEM roots to trust for the OIDC issuer (default: the system's).
    #[arg(long)]
    oidc_ca_file: Option<PathBuf>,
    /// A host plugin `source.url`s may name (repeat; `*.example.com` for subdomains).
    /// None: configs with plugin URLs are refused.
    #[arg(long = "allow-plugin-host")]
    plugin_hosts: Vec<String>,
    /// Address the REST API is served on.
    #[arg(long, default_value = "127.0.0.1:18001")]
    api_address: std::net::SocketAddr,
}

impl ControlPlaneArgs {
    fn into_options(self) -> nip_control_plane::ControlPlaneOptions {
        let ControlPlaneArgs {
            store,
            config,
            xds_address,
            admin_token_file,
            trust_domain,
            ca_dir,
            ca_cert,
            ca_key,
            ca_bundle,
            certificate_lifetime,
            server_names,
            inject_image,
            plaintext,
            oidc_issuer,
            oidc_audience,
            oidc_role_claim,
            oidc_tenants_claim,
            oidc_ca_file,
            plugin_hosts,
            api_address,
        } = self;
        nip_control_plane::ControlPlaneOptions {
            oidc: oidc_issuer.map(|issuer| nip_control_plane::oidc::OidcOptions {
                issuer,
                audience: oidc_audience,
                role_claim: oidc_role_claim,
                tenants_claim: oidc_tenants_claim,
                ca_file: oidc_ca_file,
            }),
            store,
            config,
            xds_address,
            api_address,
            watch_interval: Duration::from_millis(200),
            admin_token_file,
            policy: nip_control_plane::service::ChangePolicy { plugin_hosts },
            identity: (!plaintext).then(|| nip_control_plane::IdentityOptions {
                ca: nip_control_plane::ca::CaOptions {
                    trust_domain,
                    dir: ca_dir,
                    issuer: ca_cert.zip(ca_key).map(|(cert, key)| {
                        nip_control_plane::ca::IssuerFiles {
                            cert,
                            key,
                            bundle: ca_bundle,
                        }
                    }),
                    workload_lifetime: certificate_lifetime,
                },
                server_names,
            }),
            inject: nip_control_plane::inject::InjectSettings {
                image: inject_image,
                ..Default::default()
            },
        }
    }
}

/// What `nip migrate` does.
#[derive(Subcommand)]
enum MigrateAction {
    /// Report what a v3 config uses and what a conversion changes or leaves to a human.
    Analyze {
        /// The v3 YAML config.
        file: PathBuf,
    },
    /// Convert a v3 config to v4: the v4 YAML on standard output (or --output), the report
    /// on standard error.
    Config {
        /// The v3 YAML config.
        #[arg(long = "from-v3")]
        from_v3: PathBuf,
        /// Write the v4 file here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// Upgrade v3 JSON messages (`{ id, type, data }`; one object, an array, or one per
    /// line) to v4 envelopes, one JSON line each.
    Message {
        /// The v3 messages (`-` for standard input).
        file: PathBuf,
    },
    /// Check that a converted v4 file loads and routes as the v3 one did: it passes the
    /// proxy's compiler, listens where v3's server did, and a local proxy running it takes
    /// each sample request through v3's enabled plugins in v3's order (exit 1 if not).
    Verify {
        /// The v3 YAML config.
        #[arg(long = "from-v3")]
        from_v3: PathBuf,
        /// The v4 YAML config.
        v4: PathBuf,
        /// Sample requests, `METHOD /path` per line (default: a few of each method).
        #[arg(long)]
        requests: Option<PathBuf>,
    },
    /// Make a v4 plugin project from a v3 plugin (its `init`, `process` and `cleanup`
    /// functions): `nip init`'s project for the language, the v3 code as comments where
    /// its logic goes.
    PluginScaffold {
        /// The v3 plugin's source file (.rs, .ts, .js, .py, .go).
        file: PathBuf,
        /// The plugin's language (default: from the extension).
        #[arg(long = "lang", value_enum)]
        language: Option<project::Language>,
        /// The plugin's name (default: the file's stem).
        #[arg(long)]
        name: Option<String>,
        /// Where to make the project (default: ./NAME).
        #[arg(long)]
        dir: Option<PathBuf>,
    },
}

/// What `nip ca` does.
#[derive(Subcommand)]
enum CaAction {
    /// Add a new root: it signs proxies' certificates from the control plane's next start,
    /// while the old roots stay trusted (proxies learn the new one as they renew).
    Rotate {
        /// The trust domain (as the control plane's --trust-domain).
        #[arg(long, env = "NIP_TRUST_DOMAIN", default_value = "nip.local")]
        trust_domain: String,
    },
    /// Remove every root but the newest from the trust bundle: run it once the
    /// certificates the old roots signed have expired (one certificate lifetime after the
    /// restart that followed `rotate`).
    Retire,
}

/// What `nip iptables` does.
#[derive(Subcommand)]
enum IptablesAction {
    /// Redirect inbound and outbound TCP to the proxy's ports, except the proxy's own
    /// traffic (its UID), loopback, and what is excluded.
    Setup {
        /// The UID the proxy runs as (its connections are never redirected).
        #[arg(long)]
        proxy_uid: u32,
        /// The proxy's inbound port.
        #[arg(long, default_value_t = 15006)]
        inbound_port: u16,
        /// The proxy's outbound port.
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// Inbound ports left alone, comma-separated (e.g. 22,15021).
        #[arg(long, value_delimiter = ',')]
        inbound_ports_exclude: Vec<u16>,
        /// Outbound ports left alone, comma-separated.
        #[arg(long, value_delimiter = ',')]
        outbound_ports_exclude: Vec<u16>,
        /// Outbound destinations left alone, comma-separated CIDRs (e.g. 169.254.169.254/32).
        #[arg(long, value_delimiter = ',')]
        outbound_cidrs_exclude: Vec<iptables::Cidr>,
    },
    /// Remove NIP's chains and the jumps into them (nothing else).
    Cleanup,
}

/// What `nip token` does.
#[derive(Subcommand)]
enum TokenAction {
    /// Make a token; it is printed once and only its digest is kept.
    Create {
        /// A name for it (what `nip token revoke` takes, and the audit trail shows).
        name: String,
        /// viewer (reads), operator (also applies and rolls back), admin (also tokens), or
        /// join (gets a proxy its first certificate; 24 h unless --ttl).
        #[arg(long)]
        role: String,
        /// A join token for this node id only.
        #[arg(long)]
        node: Option<String>,
        /// A join token for nodes of this region only.
        #[arg(long)]
        region: Option<String>,
        /// Limit it to a tenant's config (repeat for several; none: every tenant).
        #[arg(long = "tenant")]
        tenants: Vec<String>,
        /// How long it works, e.g. 30d or 12h (none: until revoked).
        #[arg(long)]
        ttl: Option<String>,
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every token: name, role, tenants, state (never a secret).
    List {
        /// Print the API's JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token at once and for good.
    Revoke {
        /// Its name.
        name: String,
    },
}

/// NIP's folder under the user's data directory (`$XDG_DATA_HOME` or `~/.local/share`).
fn data_dir() -> PathBuf {
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("nip")
}

/// `sqlite://` in [`data_dir`].
fn default_store() -> String {
    format!("sqlite://{}", data_dir().join("control-plane.db").display())
}

/// Where a control plane keeps its CA (and writes the trust bundle the CLI trusts).
pub(crate) fn default_ca_dir() -> PathBuf {
    data_dir().join("ca")
}

/// Where a control plane keeps its first admin token, and the CLI looks for it last.
pub(crate) fn default_admin_token_file() -> PathBuf {
    data_dir().join("admin-token")
}

fn parse_duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text).map_err(|e| format!("{text:?}: {e} (write it like 30s)"))
}

/// pingora logs an ERROR each time its pool loses a race to reuse an idle upstream
/// connection (its idle watcher still holds the connection; a new one is opened instead) —
/// benign, and thousands of times a minute under load. That module is silenced unless the
/// filter names it.
const QUIET_BY_DEFAULT: &str = "pingora_core::connectors=off";

fn init_logging(filter: &str) {
    let filter = if filter.contains("pingora_core::connectors") {
        filter.to_string()
    } else {
        format!("{filter},{QUIET_BY_DEFAULT}")
    };
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("info,{QUIET_BY_DEFAULT}")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Reports a role's failure on stderr; a config the user must fix exits with 2.
fn exit_code<E: std::fmt::Display>(
    role: &str,
    result: Result<(), E>,
    is_config_error: impl Fn(&E) -> bool,
) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nip {role}: {e}");
            if is_config_error(&e) {
                ExitCode::from(EXIT_BAD_CONFIG)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn run_proxy(options: ProxyOptions) -> ExitCode {
    exit_code(
        "proxy",
        nip_proxy::run(options),
        nip_proxy::StartError::is_config_error,
    )
}

fn run_control_plane(options: nip_control_plane::ControlPlaneOptions) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nip control-plane: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    exit_code(
        "control-plane",
        runtime.block_on(nip_control_plane::run(options)),
        nip_control_plane::ControlPlaneError::is_config_error,
    )
}

/// `nip ratelimit`: the rate limit service for global limits.
fn run_ratelimit(file: PathBuf, redis: String, listen: std::net::SocketAddr) -> ExitCode {
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nip ratelimit: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(nip_control_plane::ratelimit::run_standalone(
        file, redis, listen,
    )) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nip ratelimit: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Gives what mimalloc keeps for the calling thread back to the OS: its delayed purges
/// otherwise wait for that thread's next allocations, so a worker that went quiet after a
/// burst of connections kept the burst's peak (an immediate purge instead costs ~3 µs per
/// request in madvise churn, measured).
fn release_thread_memory() {
    // SAFETY: mi_collect only walks the calling thread's own heap.
    unsafe { libmimalloc_sys::mi_collect(true) };
}

/// Transparent huge pages are off for the process: after a burst of connections,
/// khugepaged fills the allocator's sparse arena with 2 MiB pages, growing RSS by memory
/// nobody uses.
fn return_freed_memory_promptly() {
    // SAFETY: PR_SET_THP_DISABLE takes integer arguments and touches no memory of ours;
    // where the kernel refuses it, nothing changes.
    let _ = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

fn main() -> ExitCode {
    return_freed_memory_promptly();
    let cli = Cli::parse();
    init_logging(&cli.log);
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    match cli.command {
        Command::Proxy {
            config,
            threads,
            drain_timeout,
            upgrade_socket,
            take_over,
        } => run_proxy(ProxyOptions {
            source: ConfigSource::File(config),
            threads: threads.unwrap_or(cpus),
            drain_timeout,
            upgrade_socket,
            take_over,
            watch_interval: Duration::from_millis(500),
            release_memory: Some(release_thread_memory),
        }),
        Command::Get {
            what: GetWhat::Proxies { json },
            remote,
        } => remote::get_proxies(&remote, json),
        Command::Get {
            what: GetWhat::Config { tenant },
            remote,
        } => remote::get_config(&remote, tenant.as_deref()),
        Command::Apply {
            file,
            message,
            canary,
            canary_timeout,
            allow_empty,
            json,
            tenant,
            remote,
        } => remote::apply(
            &remote,
            &file,
            &remote::ApplyOptions {
                message,
                canary,
                canary_timeout,
                allow_empty,
                json,
                tenant,
            },
        ),
        Command::History {
            version,
            limit,
            json,
            remote,
        } => remote::history(&remote, version, limit, json),
        Command::Rollback {
            version,
            message,
            remote,
        } => remote::rollback(&remote, version, &message),
        Command::ControlPlane(args) => run_control_plane(args.into_options()),
        Command::Iptables {
            action,
            iptables: binary,
            dry_run,
            ipv6,
        } => {
            let families: &[iptables::Family] = if ipv6 {
                &[iptables::Family::V4, iptables::Family::V6]
            } else {
                &[iptables::Family::V4]
            };
            for &family in families {
                let binary = family.binary(&binary);
                let (rules, cleanup) = match &action {
                    IptablesAction::Setup {
                        proxy_uid,
                        inbound_port,
                        outbound_port,
                        inbound_ports_exclude,
                        outbound_ports_exclude,
                        outbound_cidrs_exclude,
                    } => (
                        iptables::setup_rules(
                            &iptables::Interception {
                                proxy_uid: *proxy_uid,
                                inbound_port: *inbound_port,
                                outbound_port: *outbound_port,
                                inbound_ports_excluded: inbound_ports_exclude.clone(),
                                outbound_ports_excluded: outbound_ports_exclude.clone(),
                                outbound_cidrs_excluded: outbound_cidrs_exclude.clone(),
                            },
                            family,
                        ),
                        false,
                    ),
                    IptablesAction::Cleanup => (iptables::cleanup_rules(), true),
                };
                if dry_run {
                    print!("{}", iptables::shell_lines(&binary, &rules));
                } else if let Err(e) = iptables::run(&binary, &rules, cleanup) {
                    eprintln!("nip iptables: {e}");
                    return ExitCode::FAILURE;
                }
            }
            ExitCode::SUCCESS
        }
        Command::Migrate { action } => migrate(action),
        Command::Init(options) => match project::scaffold::init(&options) {
            Ok(dir) => {
                print!("{}", project::scaffold::next_steps(&dir, &options));
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("nip init: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Dev { project: dir } => {
            match project::Project::open(&dir).and_then(|p| project::dev::run(&p)) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("nip dev: {e:#}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Debug { admin, command } => debug::run(&admin, &command),
        Command::Logs { options, remote } => remote::logs(&remote, &options),
        Command::Deploy {
            env,
            message,
            project: dir,
        } => match project::Project::open(&dir)
            .and_then(|p| project::deploy::run(&p, &env, &message))
        {
            Ok(code) => code,
            Err(e) => {
                eprintln!("nip deploy: {e:#}");
                ExitCode::FAILURE
            }
        },
        Command::Test {
            integration: _,
            project: dir,
        } => match project::Project::open(&dir).and_then(|p| project::cases::run(&p)) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("nip test: {e:#}");
                ExitCode::from(EXIT_BAD_CONFIG)
            }
        },
        Command::Metrics {
            admins,
            export,
            remote,
        } => {
            if admins.is_empty() {
                remote::traffic(&remote, export.as_deref())
            } else {
                fleet_metrics::run(&admins, export.as_deref())
            }
        }
        Command::Ca { action, ca_dir } => {
            let done = match action {
                CaAction::Rotate { trust_domain } => {
                    nip_control_plane::ca::rotate(&ca_dir, &trust_domain).map(|root| {
                        format!(
                            "new root {}; restart the control plane to sign with it (the old roots stay trusted)",
                            root.display()
                        )
                    })
                }
                CaAction::Retire => nip_control_plane::ca::retire(&ca_dir).map(|n| {
                    format!("{n} old root(s) retired; restart the control plane to serve the new bundle")
                }),
            };
            match done {
                Ok(message) => {
                    println!("{message}");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nip ca: {e}");
                    ExitCode::FAILURE
                }
            }
        }
        Command::Token { action, remote } => match action {
            TokenAction::Create {
                name,
                role,
                node,
                region,
                tenants,
                ttl,
                json,
            } => remote::token_create(
                &remote,
                &remote::NewTokenOptions {
                    name,
                    role,
                    node,
                    region,
                    tenants,
                    ttl,
                    json,
                },
            ),
            TokenAction::List { json } => remote::token_list(&remote, json),
            TokenAction::Revoke { name } => remote::token_revoke(&remote, &name),
        },
        Command::Validate { file, xds } => validate(&file, xds),
        Command::Inject { file, image } => kubernetes::run_inject(&file, image),
        Command::WaitReady { admin, timeout } => kubernetes::run_wait_ready(&admin, timeout),
        Command::Demo {
            port,
            admin_port,
            xds_port,
            api_port,
            plugin,
        } => run_demo(
            demo::DemoPorts {
                port,
                admin_port,
                xds_port,
                api_port,
            },
            plugin.as_deref(),
            cpus,
        ),
        Command::Ratelimit {
            file,
            redis,
            listen,
        } => run_ratelimit(file, redis, listen),
        Command::Backend { listen, name } => match demo::serve_backend_blocking(listen, name) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("nip backend: {e}");
                ExitCode::FAILURE
            }
        },
    }
}

/// `nip demo`: backends, a control plane following a desired-config file in a temporary
/// directory, and a proxy fed by it.
fn run_demo(ports: demo::DemoPorts, plugin: Option<&std::path::Path>, cpus: usize) -> ExitCode {
    let backends = match demo::start_backends() {
        Ok(backends) => backends,
        Err(e) => {
            eprintln!("nip demo: cannot start the demo backends: {e}");
            return ExitCode::FAILURE;
        }
    };
    // The control plane serves the plugin's path to the proxy: make it absolute.
    let plugin = plugin.map(|p| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf()));
    let plugin = plugin.as_deref();
    let dir = std::env::temp_dir().join(format!("nip-demo-{}", std::process::id()));
    let desired = dir.join("desired.yaml");
    let written = std::fs::create_dir_all(&dir).and_then(|()| {
        std::fs::write(
            &desired,
            demo::desired_config(ports.port, &backends, plugin),
        )
    });
    if let Err(e) = written {
        eprintln!("nip demo: cannot write {}: {e}", desired.display());
        return ExitCode::FAILURE;
    }
    let options = nip_control_plane::ControlPlaneOptions {
        store: format!("sqlite://{}", dir.join("store.db").display()),
        config: Some(desired.clone()),
        xds_address: std::net::SocketAddr::from(([127, 0, 0, 1], ports.xds_port)),
        api_address: std::net::SocketAddr::from(([127, 0, 0, 1], ports.api_port)),
        watch_interval: Duration::from_millis(200),
        admin_token_file: dir.join("admin-token"),
        policy: nip_control_plane::service::ChangePolicy::default(),
        oidc: None,
        identity: Some(nip_control_plane::IdentityOptions {
            ca: nip_control_plane::ca::CaOptions {
                trust_domain: "nip.local".into(),
                dir: dir.join("ca"),
                issuer: None,
                workload_lifetime: nip_control_plane::ca::DEFAULT_WORKLOAD_LIFETIME,
            },
            server_names: vec!["localhost".into()],
        }),
        inject: nip_control_plane::inject::InjectSettings::default(),
    };
    let control_plane = std::thread::Builder::new()
        .name("nip-demo-control-plane".into())
        .spawn(move || {
            if run_control_plane(options) != ExitCode::SUCCESS {
                eprintln!(
                    "nip demo: the control plane stopped; is port {} or {} taken?",
                    ports.xds_port, ports.api_port
                );
                std::process::exit(1);
            }
        });
    if let Err(e) = control_plane {
        eprintln!("nip demo: cannot start the control plane: {e}");
        return ExitCode::FAILURE;
    }
    demo::print_instructions(
        &demo::DemoLayout {
            port: ports.port,
            admin_port: ports.admin_port,
            api_port: ports.api_port,
            desired: &desired,
            admin_token_file: &dir.join("admin-token"),
        },
        plugin.is_some(),
    );
    let join_token = dir.join("join-token");
    let bundle = dir
        .join("ca")
        .join(nip_control_plane::ca::TRUST_BUNDLE_FILE);
    if let Err(e) = demo::make_join_token(
        ports.api_port,
        &dir.join("admin-token"),
        &bundle,
        &join_token,
    ) {
        eprintln!("nip demo: {e}");
        return ExitCode::FAILURE;
    }
    run_proxy(ProxyOptions {
        source: ConfigSource::Embedded(demo::proxy_bootstrap(
            ports.admin_port,
            ports.xds_port,
            &bundle,
            &join_token,
        )),
        threads: cpus.min(2),
        drain_timeout: Duration::from_secs(5),
        upgrade_socket: None,
        take_over: false,
        watch_interval: Duration::from_secs(3600),
        release_memory: Some(release_thread_memory),
    })
}

/// `nip migrate message`: v3 messages in, v4 envelopes out (a bad one names its place).
fn migrate_messages(file: &std::path::Path) -> ExitCode {
    use std::io::Read;
    let mut text = String::new();
    let read = if file == std::path::Path::new("-") {
        std::io::stdin().read_to_string(&mut text).map(drop)
    } else {
        std::fs::read_to_string(file).map(|t| text = t)
    };
    if let Err(e) = read {
        eprintln!("nip migrate message: cannot read {}: {e}", file.display());
        return ExitCode::FAILURE;
    }
    // One document (an object or an array), else one object per line.
    let messages: Vec<serde_json::Value> = match serde_json::from_str(&text) {
        Ok(serde_json::Value::Array(all)) => all,
        Ok(one) => vec![one],
        Err(_) => {
            let mut all = Vec::new();
            for (i, line) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                match serde_json::from_str(line) {
                    Ok(message) => all.push(message),
                    Err(e) => {
                        eprintln!(
                            "nip migrate message: {}:{}: not JSON: {e}",
                            file.display(),
                            i + 1
                        );
                        return ExitCode::from(EXIT_BAD_CONFIG);
                    }
                }
            }
            all
        }
    };
    let now = humantime::format_rfc3339_millis(std::time::SystemTime::now()).to_string();
    for (i, message) in messages.iter().enumerate() {
        match nip_xds::config::migrate::message_from_v3(message, &now) {
            Ok(v4) => println!("{v4}"),
            Err(e) => {
                eprintln!(
                    "nip migrate message: {} message {}: {e}",
                    file.display(),
                    i + 1
                );
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
        }
    }
    ExitCode::SUCCESS
}

/// `nip migrate`.
fn migrate(action: MigrateAction) -> ExitCode {
    use nip_xds::config::migrate;
    let (file, output, write) = match &action {
        MigrateAction::Analyze { file } => (file, None, false),
        MigrateAction::Config { from_v3, output } => (from_v3, output.as_ref(), true),
        MigrateAction::Message { file } => return migrate_messages(file),
        MigrateAction::Verify {
            from_v3,
            v4,
            requests,
        } => return migrate_verify::run(from_v3, v4, requests.as_deref()),
        MigrateAction::PluginScaffold {
            file,
            language,
            name,
            dir,
        } => {
            return match project::v3_plugin::scaffold_from_v3(
                file,
                *language,
                name.clone(),
                dir.clone(),
            ) {
                Ok(made) => {
                    println!(
                        "made {}: the v3 code ({}) is in {} as TODO(migrate) comments where it goes{}",
                        made.dir.display(),
                        made.found.join(", "),
                        made.source.display(),
                        if made.missing.is_empty() {
                            String::new()
                        } else {
                            format!("; not found: {}", made.missing.join(", "))
                        }
                    );
                    println!(
                        "next: cd {} && nip dev   (it builds and serves as made; port the logic, save, and it reloads)",
                        made.dir.display()
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("nip migrate plugin-scaffold: {e:#}");
                    ExitCode::FAILURE
                }
            };
        }
    };
    let text = match std::fs::read_to_string(file) {
        Ok(text) => text,
        Err(e) => {
            eprintln!("nip migrate: cannot read {}: {e}", file.display());
            return ExitCode::FAILURE;
        }
    };
    let migration = match migrate::from_v3(&text) {
        Ok(migration) => migration,
        Err(e) => {
            eprintln!("nip migrate: {}: {e}", file.display());
            return ExitCode::from(EXIT_BAD_CONFIG);
        }
    };
    let mut report = format!(
        "{}: a v3 config
changed:
",
        file.display()
    );
    for line in &migration.changed {
        report.push_str(&format!(
            "  - {line}
"
        ));
    }
    report.push_str(
        "for a human (TODO in the file):
",
    );
    for line in &migration.todo {
        report.push_str(&format!(
            "  - {line}
"
        ));
    }
    if !write {
        print!("{report}");
        return ExitCode::SUCCESS;
    }
    eprint!("{report}");
    match output {
        Some(path) => {
            if let Err(e) = std::fs::write(path, &migration.yaml) {
                eprintln!("nip migrate: cannot write {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            eprintln!(
                "wrote {} (check it with `nip validate {}`)",
                path.display(),
                path.display()
            );
        }
        None => print!("{}", migration.yaml),
    }
    ExitCode::SUCCESS
}

fn validate(file: &std::path::Path, print_xds: bool) -> ExitCode {
    match nip_xds::config::Config::from_file(file) {
        Ok(config) => {
            let translation = nip_xds::translate::translate(&config);
            // The proxy's own compiler, without loading plugins or resolving host names.
            if let Err(e) =
                nip_proxy::compile::check(&translation.bootstrap, &translation.resources)
            {
                eprintln!("{}: invalid config", file.display());
                eprintln!("  the proxy's compiler refuses it: {e}");
                return ExitCode::from(EXIT_BAD_CONFIG);
            }
            for note in &translation.not_applied {
                eprintln!("note: {note}");
            }
            if print_xds {
                let r = &translation.resources;
                let json = serde_json::json!({
                    "version_info": r.version,
                    "bootstrap": nip_xds::json::to_json(&translation.bootstrap),
                    "listeners": r.listeners.iter().map(nip_xds::json::to_json).collect::<Vec<_>>(),
                    "route_configs": r.routes.iter().map(nip_xds::json::to_json).collect::<Vec<_>>(),
                    "clusters": r.clusters.iter().map(nip_xds::json::to_json).collect::<Vec<_>>(),
                    "endpoints": r.endpoints.iter().map(nip_xds::json::to_json).collect::<Vec<_>>(),
                });
                println!(
                    "{}",
                    serde_json::to_string_pretty(&json).unwrap_or_default()
                );
            } else {
                println!(
                    "{}: valid (version {})",
                    file.display(),
                    translation.resources.version
                );
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{}: invalid config", file.display());
            for error in e.field_errors() {
                eprintln!("  {error}");
            }
            ExitCode::from(EXIT_BAD_CONFIG)
        }
    }
}
