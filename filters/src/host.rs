//! The host side of the ABI: the state a plugin's store carries and the `env` functions
//! plugins import.
//!
//! During an HTTP callback the request's data sits in [`HttpState`] inside the store; host
//! functions read and edit it there, and the caller copies edits back to the real request
//! afterwards (only what the plugin changed). `proxy_http_call` only records a [`Callout`];
//! the proxy performs it and hands the answer back through
//! [`crate::PluginInstance::on_http_call_response`]. Functions this host does not implement
//! (gRPC callouts, foreign functions, `proxy_set_property`, `proxy_get_status`) are still
//! defined — returning `UNIMPLEMENTED` — so that every SDK's module links.

use crate::abi::{self, buffer, map, Pairs, Status};
use crate::shared::{MetricKind, QueueError, SetError, SharedState};
use bytes::Bytes;
use std::sync::Arc;
use std::time::Duration;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use wasmtime::{Caller, Linker, Memory, StoreLimits};

/// What identifies a plugin to itself (properties, buffers).
#[derive(Debug, Clone, Default)]
pub struct PluginIdentity {
    /// Plugin name (`plugin_name` property, log prefix).
    pub name: String,
    /// Root id (`plugin_root_id` property); empty by default.
    pub root_id: String,
    /// VM id: instances with the same id share data (defaults to the name when empty).
    pub vm_id: String,
    /// Bytes handed to `on_vm_start`.
    pub vm_config: Vec<u8>,
    /// Bytes handed to `on_configure`.
    pub plugin_config: Vec<u8>,
}

/// A reply the plugin asked for instead of proxying.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LocalResponse {
    /// HTTP status.
    pub status: u16,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
    /// Why (for logs).
    pub details: String,
}

/// What a client's verified certificate says about it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PeerCertificate {
    /// URI SANs (a workload's SPIFFE ID).
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns_names: Vec<String>,
    /// The subject, as text.
    pub subject: String,
}

impl PeerCertificate {
    /// The first URI SAN (what Envoy's `%DOWNSTREAM_PEER_URI_SAN%` shows), or empty.
    pub fn uri(&self) -> &str {
        self.uris.first().map_or("", String::as_str)
    }
}

/// Request facts plugins read as properties.
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// Request id (`request.id`).
    pub id: String,
    /// `HTTP/1.1` or `HTTP/2` (`request.protocol`).
    pub protocol: String,
    /// Client address (`source.address`, `source.port`).
    pub source: Option<std::net::SocketAddr>,
    /// Listener address (`destination.*`).
    pub destination: Option<std::net::SocketAddr>,
    /// TLS on the downstream connection (`connection.tls`).
    pub tls: bool,
    /// The client's verified certificate, on a mutual TLS connection (`connection.mtls`,
    /// `connection.uri_san_peer_certificate`, …).
    pub peer_certificate: Option<Arc<PeerCertificate>>,
    /// Route name (`route_name`).
    pub route_name: Arc<str>,
    /// Cluster name (`cluster_name`).
    pub cluster_name: Arc<str>,
    /// Response status once known (`response.code`).
    pub response_code: Option<u16>,
    /// The connection manager's `stat_prefix` (`listener_name`).
    pub listener_name: Arc<str>,
    /// The request's tenant, once the proxy's policy named one (`nip.tenant`).
    pub tenant: Option<Arc<str>>,
    /// Who the request was authenticated as (`nip.principal`): a verified JWT's
    /// `iss/sub`, else the client certificate's URI SAN, DNS SAN or subject.
    pub principal: Option<Arc<str>>,
    /// The request's priority class after the proxy's policy (`nip.priority`: `low`,
    /// `normal`, `high`).
    pub priority: &'static str,
}

/// Turns the proxy's own header representation into pairs, when a plugin first needs them.
type ConvertHeaders = Box<dyn FnOnce() -> Pairs + Send + Sync>;

/// A header map as plugins see it: (name, value) pairs, pseudo-headers included.
///
/// The proxy may hand a map over unconverted ([`Headers::lazy`]); it becomes pairs the first
/// time a plugin reads or writes it, so a plugin that never looks at headers costs no
/// conversion. Writes are remembered, so the proxy copies edits back only when there are any.
#[derive(Default)]
pub struct Headers {
    pairs: Pairs,
    convert: Option<ConvertHeaders>,
    len: usize,
    changed: bool,
}

impl Headers {
    /// A map given as pairs.
    pub fn from_pairs(pairs: Pairs) -> Self {
        Headers {
            len: pairs.len(),
            pairs,
            convert: None,
            changed: false,
        }
    }

    /// A map of `len` entries that `convert` produces when first needed.
    pub fn lazy(len: usize, convert: impl FnOnce() -> Pairs + Send + Sync + 'static) -> Self {
        Headers {
            pairs: Pairs::new(),
            convert: Some(Box::new(convert)),
            len,
            changed: false,
        }
    }

    /// Number of entries (without converting).
    pub fn len(&self) -> usize {
        if self.convert.is_some() {
            self.len
        } else {
            self.pairs.len()
        }
    }

    /// Whether the map has no entries.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The pairs, converted if they were not yet.
    pub fn pairs(&mut self) -> &Pairs {
        if let Some(convert) = self.convert.take() {
            self.pairs = convert();
        }
        &self.pairs
    }

    /// The pairs for editing; the map counts as changed from here on.
    pub fn pairs_mut(&mut self) -> &mut Pairs {
        self.pairs();
        self.changed = true;
        &mut self.pairs
    }

    /// The value of `name` (lower case), converting if needed.
    pub fn get(&mut self, name: &str) -> Option<&str> {
        self.pairs()
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The edited pairs, if a plugin changed the map since the last call (the flag resets).
    pub fn take_changes(&mut self) -> Option<&Pairs> {
        if std::mem::take(&mut self.changed) {
            Some(&self.pairs)
        } else {
            None
        }
    }

    /// Whether a plugin changed the map.
    pub fn is_changed(&self) -> bool {
        self.changed
    }
}

impl std::fmt::Debug for Headers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.convert {
            Some(_) => write!(f, "Headers(<{} unconverted>)", self.len),
            None => f.debug_list().entries(&self.pairs).finish(),
        }
    }
}

/// One request as a plugin sees it during a callback.
#[derive(Debug, Default)]
pub struct HttpState {
    /// Request headers, pseudo-headers included.
    pub request_headers: Headers,
    /// Response headers, `:status` included.
    pub response_headers: Headers,
    /// Request trailers (pingora has no request-trailer phase: always empty).
    pub request_trailers: Headers,
    /// Response trailers, during `on_response_trailers`.
    pub response_trailers: Headers,
    /// A local reply the plugin sent, if any.
    pub local_response: Option<LocalResponse>,
    /// The request body the current callback sees (buffered chunks, then this one).
    pub request_body: Bytes,
    /// The response body the current callback sees.
    pub response_body: Bytes,
    /// Set when the plugin resumed the request (`proxy_continue_stream(HTTP_REQUEST)`).
    pub request_resumed: bool,
    /// Set when the plugin resumed the response.
    pub response_resumed: bool,
    /// Set when the plugin reset the stream (`proxy_close_stream`): the proxy drops the
    /// request without an answer, or cuts the response off.
    pub reset: bool,
    /// Facts for properties.
    pub info: RequestInfo,
}

/// An HTTP call a plugin dispatched (`proxy_http_call`), for the proxy to perform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Callout {
    /// Token the plugin got back; the answer is delivered under it.
    pub token: u32,
    /// The context that was effective when the call was made (an HTTP context or the root).
    pub context: u32,
    /// The cluster to call.
    pub upstream: String,
    /// Request headers, with `:method`, `:path` and `:authority`.
    pub headers: Pairs,
    /// Request body.
    pub body: Vec<u8>,
    /// Request trailers.
    pub trailers: Pairs,
    /// How long the proxy waits for the whole answer.
    pub timeout: Duration,
}

/// The answer to a [`Callout`]; empty headers mean it failed (connect error, timeout).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CalloutResponse {
    /// Response headers, `:status` first.
    pub headers: Pairs,
    /// Response body.
    pub body: Vec<u8>,
    /// Response trailers.
    pub trailers: Pairs,
}

/// Facts about the proxy node, for `node.*` properties.
#[derive(Debug, Clone, Default)]
pub struct NodeInfo {
    /// Node id.
    pub id: String,
    /// Region.
    pub region: String,
    /// Zone.
    pub zone: String,
}

/// The data of one plugin store.
pub struct HostState {
    /// Who the plugin is.
    pub plugin: Arc<PluginIdentity>,
    /// The node it runs on.
    pub node: Arc<NodeInfo>,
    /// Memory ceiling.
    pub limits: StoreLimits,
    /// When this instance started (monotonic clock for the guest).
    pub started: Instant,
    /// Tick period the plugin asked for, 0 = none.
    pub tick_period_ms: u32,
    /// The context host calls act on: the one whose callback runs, unless the plugin chose
    /// another (`proxy_set_effective_context`). Callouts are filed under it.
    pub effective_context: u32,
    /// The request being filtered, during HTTP callbacks.
    pub http: Option<HttpState>,
    /// Data and metrics shared with every other instance.
    pub shared: Arc<SharedState>,
    /// Calls dispatched and not yet handed to the proxy.
    pub callouts: Vec<Callout>,
    /// The last callout token handed out.
    pub last_token: u32,
    /// The answer being delivered, during `proxy_on_http_call_response`.
    pub callout_response: Option<CalloutResponse>,
    /// Notified when a queue this instance registered gets an item.
    pub wake: Arc<Notify>,
    /// Tokens of the queues this instance registered.
    pub queues: Vec<u32>,
    /// What an SDK plugin declared about itself (`nip_sdk_declare`).
    pub declaration: Option<crate::sdk::Declaration>,
    /// The SDK's last answer to a host request (`nip_sdk_report`), taken by the host.
    pub report: Option<Vec<u8>>,
}

impl HostState {
    fn vm_id(&self) -> &str {
        if self.plugin.vm_id.is_empty() {
            &self.plugin.name
        } else {
            &self.plugin.vm_id
        }
    }

    /// Routes guest stdout (info) and stderr (error) to the proxy log.
    pub fn guest_output(&self, stderr: bool, bytes: &[u8]) {
        let text = String::from_utf8_lossy(bytes);
        let text = text.trim_end();
        if text.is_empty() {
            return;
        }
        if stderr {
            tracing::error!(plugin = %self.plugin.name, "{text}");
        } else {
            tracing::info!(plugin = %self.plugin.name, "{text}");
        }
    }

    fn map(&mut self, map_type: i32) -> Option<&Pairs> {
        match (map_type, &self.callout_response) {
            (map::HTTP_CALL_RESPONSE_HEADERS, Some(r)) => return Some(&r.headers),
            (map::HTTP_CALL_RESPONSE_TRAILERS, Some(r)) => return Some(&r.trailers),
            _ => {}
        }
        let http = self.http.as_mut()?;
        match map_type {
            map::HTTP_REQUEST_HEADERS => Some(http.request_headers.pairs()),
            map::HTTP_RESPONSE_HEADERS => Some(http.response_headers.pairs()),
            map::HTTP_REQUEST_TRAILERS => Some(http.request_trailers.pairs()),
            map::HTTP_RESPONSE_TRAILERS => Some(http.response_trailers.pairs()),
            _ => None,
        }
    }

    fn map_mut(&mut self, map_type: i32) -> Option<&mut Pairs> {
        let http = self.http.as_mut()?;
        match map_type {
            map::HTTP_REQUEST_HEADERS => Some(http.request_headers.pairs_mut()),
            map::HTTP_RESPONSE_HEADERS => Some(http.response_headers.pairs_mut()),
            map::HTTP_REQUEST_TRAILERS => Some(http.request_trailers.pairs_mut()),
            map::HTTP_RESPONSE_TRAILERS => Some(http.response_trailers.pairs_mut()),
            _ => None,
        }
    }

    /// The bytes of a buffer the plugin may read now.
    fn buffer(&self, kind: i32) -> Option<&[u8]> {
        match kind {
            buffer::VM_CONFIGURATION => Some(&self.plugin.vm_config),
            buffer::PLUGIN_CONFIGURATION => Some(&self.plugin.plugin_config),
            buffer::HTTP_REQUEST_BODY => {
                Some(self.http.as_ref().map_or(&[], |h| &h.request_body[..]))
            }
            buffer::HTTP_RESPONSE_BODY => {
                Some(self.http.as_ref().map_or(&[], |h| &h.response_body[..]))
            }
            buffer::HTTP_CALL_RESPONSE_BODY => {
                Some(self.callout_response.as_ref().map_or(&[], |r| &r.body))
            }
            _ => None,
        }
    }

    /// A property by its NUL-separated path, as bytes.
    fn property(&mut self, path: &[&str]) -> Option<Vec<u8>> {
        let (mut request_headers, info) = match self.http.as_mut() {
            Some(HttpState {
                request_headers,
                info,
                ..
            }) => (Some(request_headers), Some(&*info)),
            None => (None, None),
        };
        let mut header = |name: &str| -> Option<Vec<u8>> {
            request_headers
                .as_mut()?
                .get(name)
                .map(|v| v.as_bytes().to_vec())
        };
        let text = |s: &str| Some(s.as_bytes().to_vec());
        match path {
            ["plugin_name"] => text(&self.plugin.name),
            ["plugin_root_id"] => text(&self.plugin.root_id),
            ["node", "id"] => text(&self.node.id),
            ["node", "region"] | ["node", "locality", "region"] => text(&self.node.region),
            ["node", "zone"] | ["node", "locality", "zone"] => text(&self.node.zone),
            ["request", "path"] => header(":path"),
            ["request", "url_path"] => header(":path").map(|p| {
                let end = p.iter().position(|b| *b == b'?').unwrap_or(p.len());
                p[..end].to_vec()
            }),
            ["request", "host"] => header(":authority"),
            ["request", "method"] => header(":method"),
            ["request", "scheme"] => header(":scheme"),
            ["request", "headers", name] => header(&name.to_ascii_lowercase()),
            ["request", "id"] => info.map(|i| i.id.as_bytes().to_vec()),
            ["request", "protocol"] => info.map(|i| i.protocol.as_bytes().to_vec()),
            ["request", "time"] => Some(
                (SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos() as u64))
                .to_le_bytes()
                .to_vec(),
            ),
            ["source", "address"] => info
                .and_then(|i| i.source)
                .map(|a| a.to_string().into_bytes()),
            ["source", "port"] => info
                .and_then(|i| i.source)
                .map(|a| u64::from(a.port()).to_le_bytes().to_vec()),
            ["destination", "address"] => info
                .and_then(|i| i.destination)
                .map(|a| a.to_string().into_bytes()),
            ["destination", "port"] => info
                .and_then(|i| i.destination)
                .map(|a| u64::from(a.port()).to_le_bytes().to_vec()),
            ["connection", "tls"] => info.map(|i| vec![u8::from(i.tls)]),
            ["connection", "mtls"] => info.map(|i| vec![u8::from(i.peer_certificate.is_some())]),
            ["connection", "uri_san_peer_certificate"] => info
                .and_then(|i| i.peer_certificate.as_ref())
                .map(|p| p.uri().as_bytes().to_vec()),
            ["connection", "dns_san_peer_certificate"] => info
                .and_then(|i| i.peer_certificate.as_ref())
                .and_then(|p| p.dns_names.first())
                .map(|d| d.as_bytes().to_vec()),
            ["connection", "subject_peer_certificate"] => info
                .and_then(|i| i.peer_certificate.as_ref())
                .map(|p| p.subject.as_bytes().to_vec()),
            ["route_name"] => info.map(|i| i.route_name.as_bytes().to_vec()),
            ["listener_name"] => info.map(|i| i.listener_name.as_bytes().to_vec()),
            ["nip", "tenant"] => info
                .and_then(|i| i.tenant.as_ref())
                .map(|t| t.as_bytes().to_vec()),
            ["nip", "principal"] => info
                .and_then(|i| i.principal.as_ref())
                .map(|p| p.as_bytes().to_vec()),
            ["nip", "priority"] => info
                .map(|i| i.priority)
                .filter(|p| !p.is_empty())
                .map(|p| p.as_bytes().to_vec()),
            ["cluster_name"] => info.map(|i| i.cluster_name.as_bytes().to_vec()),
            ["response", "code"] => info
                .and_then(|i| i.response_code)
                .map(|c| u64::from(c).to_le_bytes().to_vec()),
            _ => None,
        }
    }
}

/// The guest's exported linear memory.
pub fn guest_memory(caller: &mut Caller<'_, HostState>) -> Option<Memory> {
    caller.get_export("memory").and_then(|e| e.into_memory())
}

fn read(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<Vec<u8>, Status> {
    let memory = guest_memory(caller).ok_or(Status::InvalidMemoryAccess)?;
    let start = ptr as u32 as usize;
    let end = start
        .checked_add(len as u32 as usize)
        .ok_or(Status::InvalidMemoryAccess)?;
    memory
        .data(&*caller)
        .get(start..end)
        .map(<[u8]>::to_vec)
        .ok_or(Status::InvalidMemoryAccess)
}

fn read_string(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<String, Status> {
    String::from_utf8(read(caller, ptr, len)?).map_err(|_| Status::BadArgument)
}

fn write(caller: &mut Caller<'_, HostState>, ptr: i32, bytes: &[u8]) -> Result<(), Status> {
    let memory = guest_memory(caller).ok_or(Status::InvalidMemoryAccess)?;
    memory
        .write(caller, ptr as u32 as usize, bytes)
        .map_err(|_| Status::InvalidMemoryAccess)
}

/// Copies `bytes` into memory the guest allocates (`proxy_on_memory_allocate`, else
/// `malloc`) and stores its address and size at `ret_ptr` / `ret_size`.
fn return_bytes(
    caller: &mut Caller<'_, HostState>,
    bytes: &[u8],
    ret_ptr: i32,
    ret_size: i32,
) -> Result<(), Status> {
    let allocate = caller
        .get_export("proxy_on_memory_allocate")
        .or_else(|| caller.get_export("malloc"))
        .and_then(|e| e.into_func())
        .ok_or(Status::InternalFailure)?
        .typed::<i32, i32>(&*caller)
        .map_err(|_| Status::InternalFailure)?;
    let len = i32::try_from(bytes.len()).map_err(|_| Status::BadArgument)?;
    let ptr = allocate
        .call(&mut *caller, len)
        .map_err(|_| Status::InternalFailure)?;
    if ptr == 0 && len > 0 {
        return Err(Status::InternalFailure);
    }
    write(caller, ptr, bytes)?;
    write(caller, ret_ptr, &ptr.to_le_bytes())?;
    write(caller, ret_size, &len.to_le_bytes())
}

/// Decodes a header map the guest passed; names are lower-cased.
fn read_pairs(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Result<Pairs, Status> {
    let bytes = read(caller, ptr, len)?;
    Ok(abi::decode_pairs(&bytes)
        .map_err(|_| Status::ParseFailure)?
        .into_iter()
        .map(|(k, v)| {
            (
                k.to_ascii_lowercase(),
                String::from_utf8_lossy(&v).into_owned(),
            )
        })
        .collect())
}

/// Replaces `size` bytes at `start` with `data` (ABI: start 0 and size 0 prepends, a start
/// past the end appends).
pub fn splice(body: &mut Vec<u8>, start: usize, size: usize, data: Vec<u8>) {
    let start = start.min(body.len());
    let end = start.saturating_add(size).min(body.len());
    body.splice(start..end, data);
}

/// Marks the current request or response as resumed by the plugin.
fn resume(caller: &mut Caller<'_, HostState>, stream: i32) {
    if let Some(http) = caller.data_mut().http.as_mut() {
        match stream {
            abi::stream::HTTP_REQUEST => http.request_resumed = true,
            abi::stream::HTTP_RESPONSE => http.response_resumed = true,
            _ => {}
        }
    }
}

/// The ABI status for a refused queue operation.
fn queue_status(error: QueueError) -> Status {
    match error {
        QueueError::NotFound => Status::NotFound,
        QueueError::Empty => Status::Empty,
    }
}

fn code(result: Result<(), Status>) -> i32 {
    match result {
        Ok(()) => Status::Ok as i32,
        Err(status) => status as i32,
    }
}

macro_rules! unimplemented_fn {
    ($linker:expr, $name:literal, ($($arg:ty),*)) => {
        $linker.func_wrap("env", $name, |$(_: $arg),*| -> i32 { Status::Unimplemented as i32 })?;
    };
}

/// Defines every `env` function of ABI 0.2.1 on `linker`.
pub fn add_to_linker(linker: &mut Linker<HostState>) -> wasmtime::Result<()> {
    linker.func_wrap(
        "env",
        "proxy_log",
        |mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| {
            let Ok(bytes) = read(&mut c, ptr, len) else {
                return Status::InvalidMemoryAccess as i32;
            };
            let text = String::from_utf8_lossy(&bytes);
            let plugin = c.data().plugin.name.as_str();
            let level = match level {
                abi::log_level::TRACE => {
                    tracing::trace!(%plugin, "{text}");
                    "trace"
                }
                abi::log_level::DEBUG => {
                    tracing::debug!(%plugin, "{text}");
                    "debug"
                }
                abi::log_level::INFO => {
                    tracing::info!(%plugin, "{text}");
                    "info"
                }
                abi::log_level::WARN => {
                    tracing::warn!(%plugin, "{text}");
                    "warn"
                }
                _ => {
                    tracing::error!(%plugin, "{text}");
                    "error"
                }
            };
            crate::logs::record(plugin, level, &text);
            Status::Ok as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_log_level",
        |mut c: Caller<'_, HostState>, ret: i32| {
            let level = if tracing::enabled!(tracing::Level::TRACE) {
                abi::log_level::TRACE
            } else if tracing::enabled!(tracing::Level::DEBUG) {
                abi::log_level::DEBUG
            } else {
                abi::log_level::INFO
            };
            code(write(&mut c, ret, &level.to_le_bytes()))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_effective_context",
        |mut c: Caller<'_, HostState>, ctx: i32| {
            c.data_mut().effective_context = ctx as u32;
            Status::Ok as i32
        },
    )?;
    linker.func_wrap("env", "proxy_done", || Status::Ok as i32)?;
    linker.func_wrap(
        "env",
        "proxy_get_current_time_nanoseconds",
        |mut c: Caller<'_, HostState>, ret: i32| {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos() as u64);
            code(write(&mut c, ret, &now.to_le_bytes()))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_tick_period_milliseconds",
        |mut c: Caller<'_, HostState>, ms: i32| {
            c.data_mut().tick_period_ms = ms as u32;
            Status::Ok as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_bytes",
        |mut c: Caller<'_, HostState>,
         kind: i32,
         start: i32,
         max: i32,
         ret_ptr: i32,
         ret_size: i32| {
            let Some(whole) = c.data().buffer(kind) else {
                return Status::BadArgument as i32;
            };
            // Sizes are u32 on wasm32; SDKs pass u32::MAX for "everything".
            let start = (start as u32 as usize).min(whole.len());
            let end = start.saturating_add(max as u32 as usize).min(whole.len());
            if end == start {
                return Status::NotFound as i32;
            }
            let bytes = whole[start..end].to_vec();
            code(return_bytes(&mut c, &bytes, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_buffer_status",
        |mut c: Caller<'_, HostState>, kind: i32, ret_size: i32, ret_flags: i32| {
            let Some(size) = c.data().buffer(kind).map(<[u8]>::len) else {
                return Status::BadArgument as i32;
            };
            code(
                write(&mut c, ret_size, &(size as u32).to_le_bytes())
                    .and_then(|()| write(&mut c, ret_flags, &0u32.to_le_bytes())),
            )
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_buffer_bytes",
        |mut c: Caller<'_, HostState>, kind: i32, start: i32, size: i32, ptr: i32, len: i32| {
            let result = read(&mut c, ptr, len).and_then(|data| {
                let http = c.data_mut().http.as_mut().ok_or(Status::NotFound)?;
                let body = match kind {
                    buffer::HTTP_REQUEST_BODY => &mut http.request_body,
                    buffer::HTTP_RESPONSE_BODY => &mut http.response_body,
                    _ => return Err(Status::BadArgument),
                };
                // Unshared (the usual case) this reuses the buffer instead of copying it.
                let mut edited = Vec::from(std::mem::take(body));
                splice(
                    &mut edited,
                    start as u32 as usize,
                    size as u32 as usize,
                    data,
                );
                *body = Bytes::from(edited);
                Ok(())
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_pairs",
        |mut c: Caller<'_, HostState>, map_type: i32, ret_ptr: i32, ret_size: i32| {
            let Some(pairs) = c.data_mut().map(map_type) else {
                return Status::BadArgument as i32;
            };
            let encoded = abi::encode_pairs(pairs.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
            code(return_bytes(&mut c, &encoded, ret_ptr, ret_size))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_size",
        |mut c: Caller<'_, HostState>, map_type: i32, ret_size: i32| {
            let Some(pairs) = c.data_mut().map(map_type) else {
                return Status::BadArgument as i32;
            };
            let size = abi::encoded_len(pairs.iter().map(|(k, v)| (k.as_str(), v.as_bytes())));
            code(write(&mut c, ret_size, &(size as u32).to_le_bytes()))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_set_header_map_pairs",
        |mut c: Caller<'_, HostState>, map_type: i32, ptr: i32, len: i32| {
            let result = read_pairs(&mut c, ptr, len).and_then(|pairs| {
                let map = c.data_mut().map_mut(map_type).ok_or(Status::BadArgument)?;
                *map = pairs;
                Ok(())
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_header_map_value",
        |mut c: Caller<'_, HostState>,
         map_type: i32,
         key_ptr: i32,
         key_len: i32,
         ret_ptr: i32,
         ret_size: i32| {
            let result = read_string(&mut c, key_ptr, key_len).and_then(|key| {
                let key = key.to_ascii_lowercase();
                let pairs = c.data_mut().map(map_type).ok_or(Status::BadArgument)?;
                let value = pairs
                    .iter()
                    .find(|(k, _)| *k == key)
                    .map(|(_, v)| v.clone())
                    .ok_or(Status::NotFound)?;
                return_bytes(&mut c, value.as_bytes(), ret_ptr, ret_size)
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_add_header_map_value",
        |mut c: Caller<'_, HostState>,
         map_type: i32,
         key_ptr: i32,
         key_len: i32,
         value_ptr: i32,
         value_len: i32| {
            let result = read_string(&mut c, key_ptr, key_len).and_then(|key| {
                let value = read_string(&mut c, value_ptr, value_len)?;
                let map = c.data_mut().map_mut(map_type).ok_or(Status::BadArgument)?;
                map.push((key.to_ascii_lowercase(), value));
                Ok(())
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_replace_header_map_value",
        |mut c: Caller<'_, HostState>,
         map_type: i32,
         key_ptr: i32,
         key_len: i32,
         value_ptr: i32,
         value_len: i32| {
            let result = read_string(&mut c, key_ptr, key_len).and_then(|key| {
                let value = read_string(&mut c, value_ptr, value_len)?;
                let key = key.to_ascii_lowercase();
                let map = c.data_mut().map_mut(map_type).ok_or(Status::BadArgument)?;
                map.retain(|(k, _)| *k != key);
                map.push((key, value));
                Ok(())
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_remove_header_map_value",
        |mut c: Caller<'_, HostState>, map_type: i32, key_ptr: i32, key_len: i32| {
            let result = read_string(&mut c, key_ptr, key_len).and_then(|key| {
                let key = key.to_ascii_lowercase();
                let map = c.data_mut().map_mut(map_type).ok_or(Status::BadArgument)?;
                map.retain(|(k, _)| *k != key);
                Ok(())
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_send_local_response",
        |mut c: Caller<'_, HostState>,
         status: i32,
         details_ptr: i32,
         details_len: i32,
         body_ptr: i32,
         body_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         _grpc_status: i32| {
            let result = (|| {
                let status = u16::try_from(status)
                    .ok()
                    .filter(|s| (200..600).contains(s))
                    .ok_or(Status::BadArgument)?;
                let details =
                    String::from_utf8_lossy(&read(&mut c, details_ptr, details_len)?).into_owned();
                let body = read(&mut c, body_ptr, body_len)?;
                let headers = read_pairs(&mut c, headers_ptr, headers_len)?;
                let http = c.data_mut().http.as_mut().ok_or(Status::BadArgument)?;
                http.local_response = Some(LocalResponse {
                    status,
                    headers,
                    body,
                    details,
                });
                Ok(())
            })();
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_property",
        |mut c: Caller<'_, HostState>,
         path_ptr: i32,
         path_len: i32,
         ret_ptr: i32,
         ret_size: i32| {
            let result = read(&mut c, path_ptr, path_len).and_then(|path| {
                let path = String::from_utf8(path).map_err(|_| Status::BadArgument)?;
                let segments: Vec<&str> = path.split('\0').filter(|s| !s.is_empty()).collect();
                let value = c.data_mut().property(&segments).ok_or(Status::NotFound)?;
                return_bytes(&mut c, &value, ret_ptr, ret_size)
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_stream",
        |mut c: Caller<'_, HostState>, stream: i32| {
            resume(&mut c, stream);
            Status::Ok as i32
        },
    )?;
    // Resuming a stream explicitly (0.2.0 names).
    linker.func_wrap(
        "env",
        "proxy_continue_request",
        |mut c: Caller<'_, HostState>| {
            resume(&mut c, abi::stream::HTTP_REQUEST);
            Status::Ok as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_continue_response",
        |mut c: Caller<'_, HostState>| {
            resume(&mut c, abi::stream::HTTP_RESPONSE);
            Status::Ok as i32
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_close_stream",
        |mut c: Caller<'_, HostState>, stream: i32| {
            if let Some(http) = c.data_mut().http.as_mut() {
                match stream {
                    abi::stream::HTTP_REQUEST | abi::stream::HTTP_RESPONSE => http.reset = true,
                    _ => {}
                }
            }
            Status::Ok as i32
        },
    )?;
    unimplemented_fn!(linker, "proxy_get_status", (i32, i32, i32));
    unimplemented_fn!(linker, "proxy_set_property", (i32, i32, i32, i32));
    linker.func_wrap(
        "env",
        "proxy_http_call",
        |mut c: Caller<'_, HostState>,
         upstream_ptr: i32,
         upstream_len: i32,
         headers_ptr: i32,
         headers_len: i32,
         body_ptr: i32,
         body_len: i32,
         trailers_ptr: i32,
         trailers_len: i32,
         timeout_ms: i32,
         ret_token: i32| {
            let result = (|| {
                let upstream = read_string(&mut c, upstream_ptr, upstream_len)?;
                let headers = read_pairs(&mut c, headers_ptr, headers_len)?;
                let body = read(&mut c, body_ptr, body_len)?;
                let trailers = read_pairs(&mut c, trailers_ptr, trailers_len)?;
                let has = |name: &str| headers.iter().any(|(k, v)| k == name && !v.is_empty());
                if !(has(":method") && has(":path") && has(":authority")) {
                    return Err(Status::BadArgument);
                }
                if !c.data().shared.has_upstream(&upstream) {
                    tracing::warn!(
                        plugin = %c.data().plugin.name,
                        "proxy_http_call to {upstream:?}: no such cluster"
                    );
                    return Err(Status::BadArgument);
                }
                let state = c.data_mut();
                state.last_token = state.last_token.wrapping_add(1).max(1);
                let token = state.last_token;
                let context = state.effective_context;
                state.callouts.push(Callout {
                    token,
                    context,
                    upstream,
                    headers,
                    body,
                    trailers,
                    timeout: Duration::from_millis(u64::from(timeout_ms as u32)),
                });
                write(&mut c, ret_token, &token.to_le_bytes())
            })();
            code(result)
        },
    )?;
    unimplemented_fn!(
        linker,
        "proxy_grpc_call",
        (i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32, i32)
    );
    unimplemented_fn!(
        linker,
        "proxy_grpc_stream",
        (i32, i32, i32, i32, i32, i32, i32, i32, i32)
    );
    unimplemented_fn!(linker, "proxy_grpc_send", (i32, i32, i32, i32));
    unimplemented_fn!(linker, "proxy_grpc_cancel", (i32));
    unimplemented_fn!(linker, "proxy_grpc_close", (i32));
    linker.func_wrap(
        "env",
        "proxy_set_shared_data",
        |mut c: Caller<'_, HostState>,
         key_ptr: i32,
         key_len: i32,
         value_ptr: i32,
         value_len: i32,
         cas: i32| {
            let result = read_string(&mut c, key_ptr, key_len).and_then(|key| {
                let value = read(&mut c, value_ptr, value_len)?;
                let state = c.data();
                state
                    .shared
                    .set(state.vm_id(), &key, value, cas as u32)
                    .map_err(|SetError::CasMismatch| Status::CasMismatch)
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_shared_data",
        |mut c: Caller<'_, HostState>,
         key_ptr: i32,
         key_len: i32,
         ret_ptr: i32,
         ret_size: i32,
         ret_cas: i32| {
            let result = read_string(&mut c, key_ptr, key_len).and_then(|key| {
                let state = c.data();
                let (value, cas) = state
                    .shared
                    .get(state.vm_id(), &key)
                    .ok_or(Status::NotFound)?;
                return_bytes(&mut c, &value, ret_ptr, ret_size)?;
                write(&mut c, ret_cas, &cas.to_le_bytes())
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_register_shared_queue",
        |mut c: Caller<'_, HostState>, name_ptr: i32, name_len: i32, ret_token: i32| {
            let result = read_string(&mut c, name_ptr, name_len).and_then(|name| {
                let state = c.data_mut();
                let token = state
                    .shared
                    .register_queue(state.vm_id(), &name, &state.wake);
                if !state.queues.contains(&token) {
                    state.queues.push(token);
                }
                write(&mut c, ret_token, &token.to_le_bytes())
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_resolve_shared_queue",
        |mut c: Caller<'_, HostState>,
         vm_ptr: i32,
         vm_len: i32,
         name_ptr: i32,
         name_len: i32,
         ret_token: i32| {
            let result = (|| {
                let vm = read_string(&mut c, vm_ptr, vm_len)?;
                let name = read_string(&mut c, name_ptr, name_len)?;
                let state = c.data();
                let vm = if vm.is_empty() { state.vm_id() } else { &vm };
                let token = state
                    .shared
                    .resolve_queue(vm, &name)
                    .ok_or(Status::NotFound)?;
                write(&mut c, ret_token, &token.to_le_bytes())
            })();
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_enqueue_shared_queue",
        |mut c: Caller<'_, HostState>, token: i32, ptr: i32, len: i32| {
            let result = read(&mut c, ptr, len).and_then(|item| {
                c.data()
                    .shared
                    .enqueue(token as u32, item)
                    .map_err(queue_status)
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_dequeue_shared_queue",
        |mut c: Caller<'_, HostState>, token: i32, ret_ptr: i32, ret_size: i32| {
            let result = c
                .data()
                .shared
                .dequeue(token as u32)
                .map_err(queue_status)
                .and_then(|item| return_bytes(&mut c, &item, ret_ptr, ret_size));
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_define_metric",
        |mut c: Caller<'_, HostState>, kind: i32, name_ptr: i32, name_len: i32, ret_id: i32| {
            let result = read_string(&mut c, name_ptr, name_len).and_then(|name| {
                let kind = MetricKind::from_raw(kind).ok_or(Status::BadArgument)?;
                let state = c.data();
                let id = state.shared.define_metric(&state.plugin.name, &name, kind);
                write(&mut c, ret_id, &id.to_le_bytes())
            });
            code(result)
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_increment_metric",
        |c: Caller<'_, HostState>, id: i32, delta: i64| match c.data().shared.metric(id as u32) {
            Some(metric) if metric.kind != MetricKind::Histogram => {
                metric.increment(delta);
                Status::Ok as i32
            }
            Some(_) => Status::BadArgument as i32,
            None => Status::NotFound as i32,
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_record_metric",
        |c: Caller<'_, HostState>, id: i32, value: i64| match c.data().shared.metric(id as u32) {
            Some(metric) => {
                metric.record(value);
                Status::Ok as i32
            }
            None => Status::NotFound as i32,
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_get_metric",
        |mut c: Caller<'_, HostState>, id: i32, ret: i32| {
            let Some(metric) = c.data().shared.metric(id as u32) else {
                return Status::NotFound as i32;
            };
            code(write(&mut c, ret, &(metric.get() as u64).to_le_bytes()))
        },
    )?;
    linker.func_wrap(
        "env",
        "proxy_call_foreign_function",
        |mut c: Caller<'_, HostState>,
         name_ptr: i32,
         name_len: i32,
         args_ptr: i32,
         args_len: i32,
         ret_ptr: i32,
         ret_size: i32| {
            let result = read_string(&mut c, name_ptr, name_len).and_then(|name| {
                let args = read(&mut c, args_ptr, args_len)?;
                match name.as_str() {
                    crate::sdk::DECLARE => {
                        let declaration = crate::sdk::Declaration::parse(&args).map_err(|e| {
                            tracing::warn!(plugin = %c.data().plugin.name, "{e}");
                            Status::BadArgument
                        })?;
                        c.data_mut().declaration = Some(declaration);
                        return_bytes(&mut c, crate::sdk::host_api().as_bytes(), ret_ptr, ret_size)
                    }
                    crate::sdk::REPORT => {
                        c.data_mut().report = Some(args);
                        return_bytes(&mut c, b"", ret_ptr, ret_size)
                    }
                    _ => Err(Status::NotFound),
                }
            });
            code(result)
        },
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::splice;

    #[test]
    fn splice_follows_the_abi_rules_for_set_buffer_bytes() {
        let mut body = b"world".to_vec();
        splice(&mut body, 0, 0, b"hello ".to_vec());
        assert_eq!(body, b"hello world", "start 0, size 0 prepends");
        splice(&mut body, 99, 0, b"!".to_vec());
        assert_eq!(body, b"hello world!", "a start past the end appends");
        let len = body.len();
        splice(&mut body, 0, len, b"bye".to_vec());
        assert_eq!(body, b"bye", "the whole range replaces");
        splice(&mut body, 1, 1, b"--".to_vec());
        assert_eq!(body, b"b--e", "a middle range is replaced in place");
    }
}
