//! Fetching remote JWKS off the request path. The control thread hands the fetcher the
//! remote JWKS of each new snapshot; each gets one task that fetches at once, again every
//! `cache_duration`, and after a failure every `failed_refetch_duration` (the old keys
//! staying in use meanwhile). A JWKS no snapshot uses any more loses its task.

use super::keys::{KeySet, RemoteJwks, RemoteSource};
use crate::plugins::callout::CalloutClient;
use crate::telemetry::metrics::Metrics;
use nip_filters::host::Callout;
use std::collections::HashMap;
use std::sync::Arc;

/// The fetch task of each remote JWKS in use.
#[derive(Default)]
pub struct JwksFetcher {
    tasks: HashMap<RemoteSource, (std::sync::Weak<RemoteJwks>, tokio::task::JoinHandle<()>)>,
}

impl JwksFetcher {
    /// Starts a task for each of `remotes` without one and stops those of JWKS no longer
    /// in `remotes` (call on the runtime the tasks are to run on).
    pub fn reconcile(
        &mut self,
        remotes: &[Arc<RemoteJwks>],
        client: &Arc<CalloutClient>,
        metrics: &Arc<Metrics>,
    ) {
        self.tasks.retain(|source, (remote, task)| {
            let live = remote
                .upgrade()
                .is_some_and(|r| remotes.iter().any(|x| Arc::ptr_eq(x, &r)))
                && !task.is_finished();
            if !live {
                tracing::debug!(uri = %source.uri, "JWKS no longer used: its fetches stop");
                task.abort();
            }
            live
        });
        for remote in remotes {
            if self.tasks.contains_key(&remote.source) {
                continue;
            }
            let task = tokio::spawn(keep_fetched(
                Arc::downgrade(remote),
                Arc::clone(client),
                Arc::clone(metrics),
            ));
            self.tasks
                .insert(remote.source.clone(), (Arc::downgrade(remote), task));
        }
    }
}

impl Drop for JwksFetcher {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

/// Fetches `remote` until no snapshot holds it.
async fn keep_fetched(
    remote: std::sync::Weak<RemoteJwks>,
    client: Arc<CalloutClient>,
    metrics: Arc<Metrics>,
) {
    loop {
        let Some(jwks) = remote.upgrade() else { return };
        let source = jwks.source.clone();
        let outcome = fetch(&client, &source).await;
        let wait = match outcome {
            Ok(keys) => {
                tracing::debug!(uri = %source.uri, keys = keys.keys.len(), "JWKS fetched");
                metrics.jwks_fetch(&source.uri, true).inc();
                jwks.fetched(Some(keys));
                source.cache_duration
            }
            Err(reason) => {
                tracing::warn!(uri = %source.uri, "JWKS fetch failed: {reason}; the last keys stay in use");
                metrics.jwks_fetch(&source.uri, false).inc();
                jwks.fetched(None);
                source.failed_refetch
            }
        };
        drop(jwks);
        tokio::time::sleep(wait).await;
    }
}

/// One fetch through the source's cluster.
async fn fetch(client: &CalloutClient, source: &RemoteSource) -> Result<KeySet, String> {
    let callout = Callout {
        token: 0,
        context: 0,
        upstream: source.cluster.clone(),
        headers: vec![
            (":method".into(), "GET".into()),
            (":path".into(), source.path.clone()),
            (":authority".into(), source.authority.clone()),
            ("accept".into(), "application/json".into()),
        ],
        body: Vec::new(),
        trailers: Vec::new(),
        timeout: source.timeout,
    };
    let answer = client.call(&callout).await;
    let status = answer
        .headers
        .iter()
        .find(|(k, _)| k == ":status")
        .map(|(_, v)| v.as_str());
    match status {
        None => Err(format!("no answer from cluster {:?}", source.cluster)),
        Some("200") => {
            let body = std::str::from_utf8(&answer.body)
                .map_err(|_| "the JWKS is not UTF-8".to_string())?;
            KeySet::parse(body)
        }
        Some(other) => Err(format!("status {other}")),
    }
}
