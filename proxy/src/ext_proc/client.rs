//! The processors' gRPC streams, on a runtime of their own.
//!
//! A request opens one stream per processor ([`ExtProcClient::open`]); each message is
//! an exchange — the request path hands a [`ProcessingRequest`] to the stream's task and
//! waits for the answer, asynchronously in the async phases, blocking (bounded by the
//! processor's timeout) in the response body phase, which pingora runs synchronously.
//! The streams' tasks run on the client's runtime, never on the worker that waits, so a
//! worker blocked on an answer cannot hold up the stream bringing it. Channels (HTTP/2
//! connections) are kept per endpoint and shared by all streams to it.

use super::ExtProc;
use envoy_types::pb::envoy::service::ext_proc::v3::external_processor_client::ExternalProcessorClient;
use envoy_types::pb::envoy::service::ext_proc::v3::{ProcessingRequest, ProcessingResponse};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::Channel;

/// How a request waits for an answer.
enum Reply {
    Async(tokio::sync::oneshot::Sender<Result<ProcessingResponse, String>>),
    Blocking(std::sync::mpsc::SyncSender<Result<ProcessingResponse, String>>),
}

impl Reply {
    fn send(self, answer: Result<ProcessingResponse, String>) {
        match self {
            Reply::Async(tx) => {
                let _ = tx.send(answer);
            }
            Reply::Blocking(tx) => {
                let _ = tx.try_send(answer);
            }
        }
    }
}

/// Runs processor streams.
pub struct ExtProcClient {
    runtime: tokio::runtime::Runtime,
    channels: Arc<Mutex<HashMap<(SocketAddr, String), Channel>>>,
}

impl std::fmt::Debug for ExtProcClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExtProcClient")
    }
}

impl ExtProcClient {
    /// A client with its runtime (one thread: streams only move bytes).
    pub fn new() -> std::io::Result<Self> {
        Ok(ExtProcClient {
            runtime: tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("nip-ext-proc")
                .enable_all()
                .build()?,
            channels: Arc::default(),
        })
    }

    /// Opens a stream to `processor` at `address`; it closes when the returned handle is
    /// dropped.
    pub fn open(&self, processor: &ExtProc, address: SocketAddr) -> ProcessorStream {
        let (tx, rx) = tokio::sync::mpsc::channel::<(ProcessingRequest, Reply)>(4);
        let channels = Arc::clone(&self.channels);
        let metadata = processor.initial_metadata.clone();
        let authority = processor.authority.clone();
        let timeout = processor.timeout;
        self.runtime.spawn(async move {
            run_stream(channels, address, authority, metadata, timeout, rx).await;
        });
        ProcessorStream { tx, timeout }
    }
}

/// The channel to `address` whose streams carry `:authority` `authority` (the
/// filter's `envoy_grpc.authority`, else its cluster's name), made on first use.
fn channel(
    channels: &Mutex<HashMap<(SocketAddr, String), Channel>>,
    address: SocketAddr,
    authority: &str,
) -> Result<Channel, String> {
    let key = (address, authority.to_string());
    let mut channels = channels.lock().unwrap_or_else(|p| p.into_inner());
    if let Some(channel) = channels.get(&key) {
        return Ok(channel.clone());
    }
    let origin = http::Uri::try_from(format!("http://{authority}"))
        .map_err(|e| format!("authority {authority:?}: {e}"))?;
    let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{address}"))
        .map_err(|e| e.to_string())?
        .origin(origin)
        .connect_timeout(Duration::from_secs(1))
        .tcp_nodelay(true);
    let channel = endpoint.connect_lazy();
    channels.insert(key, channel.clone());
    Ok(channel)
}

/// One stream: takes exchanges in order, answers each with the processor's next message.
async fn run_stream(
    channels: Arc<Mutex<HashMap<(SocketAddr, String), Channel>>>,
    address: SocketAddr,
    authority: String,
    metadata: Vec<(String, String)>,
    timeout: Duration,
    mut exchanges: tokio::sync::mpsc::Receiver<(ProcessingRequest, Reply)>,
) {
    let Some((first, reply)) = exchanges.recv().await else {
        return;
    };
    let channel = match channel(&channels, address, &authority) {
        Ok(channel) => channel,
        Err(e) => return reply.send(Err(e)),
    };
    let (out_tx, out_rx) = tokio::sync::mpsc::channel::<ProcessingRequest>(4);
    let _ = out_tx.send(first).await;
    let mut request = tonic::Request::new(tokio_stream::wrappers::ReceiverStream::new(out_rx));
    for (key, value) in &metadata {
        if let (Ok(key), Ok(value)) = (
            tonic::metadata::MetadataKey::from_bytes(key.as_bytes()),
            value.parse(),
        ) {
            request.metadata_mut().insert(key, value);
        }
    }
    let mut client = ExternalProcessorClient::new(channel);
    let opened = tokio::time::timeout(timeout, client.process(request)).await;
    let mut inbound = match opened {
        Ok(Ok(response)) => response.into_inner(),
        Ok(Err(status)) => {
            return reply.send(Err(format!(
                "the processor refused the stream: {}",
                status.message()
            )))
        }
        Err(_) => return reply.send(Err(format!("no answer within {timeout:?}"))),
    };
    let mut reply = reply;
    loop {
        let answer = match tokio::time::timeout(timeout, inbound.message()).await {
            Ok(Ok(Some(message))) => Ok(message),
            Ok(Ok(None)) => Err("the processor closed the stream".to_string()),
            Ok(Err(status)) => Err(format!("the processor failed: {}", status.message())),
            Err(_) => Err(format!("no answer within {timeout:?}")),
        };
        let failed = answer.is_err();
        reply.send(answer);
        if failed {
            return;
        }
        let Some((next, next_reply)) = exchanges.recv().await else {
            return; // the request is done: dropping out_tx half-closes the stream
        };
        if out_tx.send(next).await.is_err() {
            return next_reply.send(Err("the stream is closed".into()));
        }
        reply = next_reply;
    }
}

/// A request's stream to one processor.
#[derive(Debug)]
pub struct ProcessorStream {
    tx: tokio::sync::mpsc::Sender<(ProcessingRequest, Reply)>,
    timeout: Duration,
}

impl ProcessorStream {
    /// Sends `message` and waits for the answer.
    pub async fn exchange(&self, message: ProcessingRequest) -> Result<ProcessingResponse, String> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .try_send((message, Reply::Async(tx)))
            .map_err(|_| "the stream is closed".to_string())?;
        // The stream's task bounds each wait by the timeout; this bound covers a task
        // that never got to run.
        match tokio::time::timeout(self.timeout + Duration::from_millis(50), rx).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(_)) => Err("the stream is closed".into()),
            Err(_) => Err(format!("no answer within {:?}", self.timeout)),
        }
    }

    /// Sends `message` and blocks this thread for the answer (the response body phase,
    /// which cannot wait otherwise), at most the processor's timeout.
    pub fn exchange_blocking(
        &self,
        message: ProcessingRequest,
    ) -> Result<ProcessingResponse, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        self.tx
            .try_send((message, Reply::Blocking(tx)))
            .map_err(|_| "the stream is closed".to_string())?;
        rx.recv_timeout(self.timeout + Duration::from_millis(50))
            .unwrap_or_else(|_| Err(format!("no answer within {:?}", self.timeout)))
    }
}
