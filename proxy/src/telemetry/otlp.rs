//! Span export over OTLP, off the request path.
//!
//! The request path pushes finished spans into a bounded queue ([`SpanQueue::push`], never
//! waiting: a full queue drops the span and counts it). A thread of its own drains the
//! queue in batches (up to [`MAX_BATCH`] spans or [`BATCH_DELAY`]) and sends each batch
//! with `opentelemetry-otlp` — OTLP/gRPC to a collector's address, or OTLP/HTTP
//! (protobuf) to a URL. One queue per collector, kept across config reloads.

use opentelemetry_sdk::error::OTelSdkError;
use opentelemetry_sdk::trace::{SpanData, SpanExporter as _};
use opentelemetry_sdk::Resource;
use prometheus_client::metrics::counter::Counter;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// Spans that may wait for export before new ones are dropped.
const QUEUE_SPANS: usize = 8192;
/// The most spans in one export.
const MAX_BATCH: usize = 512;
/// How long the first span of a batch waits for others.
const BATCH_DELAY: Duration = Duration::from_millis(500);

/// Where spans go.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Collector {
    /// OTLP/gRPC (`TraceService/Export`).
    Grpc {
        /// The collector's address.
        address: SocketAddr,
        /// `:authority` of the calls.
        authority: String,
        /// How long one export may take.
        timeout: Duration,
    },
    /// OTLP/HTTP with protobuf bodies.
    Http {
        /// The collector's address.
        address: SocketAddr,
        /// The URL posted to (`http://HOST/v1/traces`).
        url: String,
        /// How long one export may take.
        timeout: Duration,
    },
}

/// What happened to spans.
#[derive(Debug, Clone, Default)]
pub struct SpanCounters {
    /// Sent and accepted by the collector.
    pub exported: Counter,
    /// Dropped: the queue was full.
    pub dropped: Counter,
    /// Lost in an export the collector refused or that failed.
    pub failed: Counter,
}

/// Where a connection manager's spans go: its collector's queue, started when the first
/// span is pushed (so that compiling a config — also to check one — starts nothing).
#[derive(Debug)]
pub struct SpanExport {
    collector: Collector,
    service_name: String,
    counters: SpanCounters,
    queue: OnceLock<Option<Arc<SpanQueue>>>,
}

impl SpanExport {
    /// Spans of `service_name` for `collector`.
    pub fn new(collector: Collector, service_name: String, counters: SpanCounters) -> Self {
        SpanExport {
            collector,
            service_name,
            counters,
            queue: OnceLock::new(),
        }
    }

    /// Queues a finished span (see [`SpanQueue::push`]).
    pub fn push(&self, span: SpanData) {
        let queue = self.queue.get_or_init(|| {
            SpanQueue::of(&self.collector, &self.service_name, &self.counters)
                .map_err(|e| tracing::error!(collector = ?self.collector, "trace export cannot start: {e}"))
                .ok()
        });
        match queue {
            Some(queue) => queue.push(span),
            None => {
                self.counters.dropped.inc();
            }
        }
    }

    /// An export into `queue` (tests).
    #[cfg(test)]
    pub fn into_queue(queue: Arc<SpanQueue>) -> Self {
        SpanExport {
            collector: Collector::Http {
                address: SocketAddr::from(([127, 0, 0, 1], 9)),
                url: "http://127.0.0.1:9/v1/traces".into(),
                timeout: Duration::from_secs(1),
            },
            service_name: "test".into(),
            counters: SpanCounters::default(),
            queue: OnceLock::from(Some(queue)),
        }
    }
}

/// The running queues, by collector and service name.
type Queues = HashMap<(Collector, String), Arc<SpanQueue>>;

/// The bounded queue in front of one collector's exporter.
#[derive(Debug)]
pub struct SpanQueue {
    tx: tokio::sync::mpsc::Sender<SpanData>,
    counters: SpanCounters,
    #[cfg(test)]
    test_rx: Option<Mutex<tokio::sync::mpsc::Receiver<SpanData>>>,
}

impl SpanQueue {
    /// The queue of `collector` for spans of `service_name`: the running one, or a new
    /// one with its export thread.
    pub fn of(
        collector: &Collector,
        service_name: &str,
        counters: &SpanCounters,
    ) -> std::io::Result<Arc<SpanQueue>> {
        static QUEUES: OnceLock<Mutex<Queues>> = OnceLock::new();
        let mut queues = QUEUES
            .get_or_init(Default::default)
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (collector.clone(), service_name.to_string());
        if let Some(queue) = queues.get(&key) {
            return Ok(Arc::clone(queue));
        }
        let queue = Arc::new(SpanQueue::start(
            collector.clone(),
            service_name.to_string(),
            counters.clone(),
        )?);
        queues.insert(key, Arc::clone(&queue));
        Ok(queue)
    }

    fn start(
        collector: Collector,
        service_name: String,
        counters: SpanCounters,
    ) -> std::io::Result<SpanQueue> {
        let (tx, rx) = tokio::sync::mpsc::channel(QUEUE_SPANS);
        let export_counters = counters.clone();
        std::thread::Builder::new()
            .name("nip-otlp".into())
            .spawn(move || {
                let runtime = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime,
                    Err(e) => {
                        tracing::error!("trace export cannot start: {e}");
                        return;
                    }
                };
                runtime.block_on(export(collector, service_name, rx, export_counters));
            })?;
        Ok(SpanQueue {
            tx,
            counters,
            #[cfg(test)]
            test_rx: None,
        })
    }

    /// Queues a finished span; a full queue drops it (counted), never waits.
    pub fn push(&self, span: SpanData) {
        if self.tx.try_send(span).is_err() {
            self.counters.dropped.inc();
        }
    }

    /// A queue nothing drains but the test.
    #[cfg(test)]
    pub fn for_tests(capacity: usize) -> SpanQueue {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        SpanQueue {
            tx,
            counters: SpanCounters::default(),
            test_rx: Some(Mutex::new(rx)),
        }
    }

    /// What was queued so far.
    #[cfg(test)]
    pub fn drain_for_tests(&self) -> Vec<SpanData> {
        let mut out = Vec::new();
        if let Some(rx) = &self.test_rx {
            let mut rx = rx.lock().unwrap();
            while let Ok(span) = rx.try_recv() {
                out.push(span);
            }
        }
        out
    }
}

/// The export thread's loop: batches from the queue to the collector until the queue
/// closes.
async fn export(
    collector: Collector,
    service_name: String,
    mut rx: tokio::sync::mpsc::Receiver<SpanData>,
    counters: SpanCounters,
) {
    let mut exporter = match exporter(&collector) {
        Ok(exporter) => exporter,
        Err(e) => {
            tracing::error!(?collector, "trace exporter cannot be built: {e}");
            return;
        }
    };
    exporter.set_resource(
        &Resource::builder_empty()
            .with_service_name(service_name)
            .build(),
    );
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        let deadline = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                Ok(None) | Err(_) => break,
            }
        }
        let count = batch.len() as u64;
        match exporter.export(std::mem::take(&mut batch)).await {
            Ok(()) => {
                counters.exported.inc_by(count);
            }
            Err(e) => {
                counters.failed.inc_by(count);
                tracing::debug!(?collector, "trace export failed: {e}");
            }
        }
    }
}

fn exporter(collector: &Collector) -> Result<opentelemetry_otlp::SpanExporter, String> {
    use opentelemetry_otlp::{WithExportConfig, WithHttpConfig, WithTonicConfig};
    match collector {
        Collector::Grpc {
            address,
            authority,
            timeout,
        } => {
            let origin: http::Uri = format!("http://{authority}")
                .parse()
                .map_err(|e| format!("authority {authority:?}: {e}"))?;
            let channel = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
                .map_err(|e| e.to_string())?
                .origin(origin)
                .timeout(*timeout)
                .connect_lazy();
            opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_channel(channel)
                .with_timeout(*timeout)
                .build()
                .map_err(|e| e.to_string())
        }
        Collector::Http {
            address,
            url,
            timeout,
        } => opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(PlainHttp {
                address: *address,
                timeout: *timeout,
            })
            .with_endpoint(url.clone())
            .with_protocol(opentelemetry_otlp::Protocol::HttpBinary)
            .with_timeout(*timeout)
            .build()
            .map_err(|e| e.to_string()),
    }
}

/// The HTTP client OTLP/HTTP posts with: one HTTP/1.1 connection per export to the
/// collector's address (exports are batched, so connections are few).
#[derive(Debug)]
struct PlainHttp {
    address: SocketAddr,
    timeout: Duration,
}

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for PlainHttp {
    async fn send_bytes(
        &self,
        request: http::Request<bytes::Bytes>,
    ) -> Result<http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        use http_body_util::BodyExt;
        let exchange = async {
            let stream = tokio::net::TcpStream::connect(self.address).await?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            let (mut head, body) = request.into_parts();
            // HTTP/1.1 to the collector itself: Host, and the path alone as the target.
            if let Some(authority) = head.uri.authority().cloned() {
                head.headers.insert(
                    http::header::HOST,
                    http::HeaderValue::from_str(authority.as_str())?,
                );
            }
            head.uri = head
                .uri
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .parse()?;
            let request = http::Request::from_parts(head, http_body_util::Full::new(body));
            let response = sender.send_request(request).await?;
            let (head, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, opentelemetry_http::HttpError>(http::Response::from_parts(head, body))
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| OTelSdkError::Timeout(self.timeout))?
    }
}
