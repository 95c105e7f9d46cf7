//! The proxy's workload identity: its key and certificate from the control plane's CA,
//! kept current for as long as the proxy runs.
//!
//! ```text
//! start: identity_dir has a certificate for this node, valid for a while ──▶ use it
//!        else: new key + CSR ──POST /v1/certificates (join token)──▶ chain + trust bundle
//! half-life: new key + CSR ──POST /v1/certificates (mutual TLS, current certificate)──▶ swap
//!        a failure keeps the current certificate and tries again with back-off
//! each xDS connection asks tls_settings() for the current certificate and bundle
//! ```
//!
//! The private key is made here and never leaves the proxy (it is written only to
//! `identity_dir`, mode 0600). The trust bundle starts as `control_plane.ca_file` and
//! follows what the CA sends with each certificate (so a rotated root is learned).

use arc_swap::ArcSwap;
use nip_xds::client::TlsSettings;
use nip_xds::identity::{key_and_csr, CertificateFacts, SpiffeId};
use nip_xds::translate::ControlPlaneIdentity;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// First wait before retrying a failed renewal.
const RETRY_MIN: Duration = Duration::from_secs(1);
/// Longest wait between renewal attempts.
const RETRY_MAX: Duration = Duration::from_secs(60);
/// How long a call to the certificate endpoint may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// A certificate with its key and the bundle to verify peers with.
#[derive(Debug, Clone)]
pub struct Credentials {
    /// PEM: the leaf and its intermediates.
    pub chain_pem: String,
    /// PEM: the private key.
    pub key_pem: String,
    /// PEM: the roots to trust.
    pub bundle_pem: String,
    /// What the leaf says.
    pub facts: CertificateFacts,
    /// The chain and key ready for rustls (`None` before the proxy joined).
    pub certified_key: Option<Arc<rustls::sign::CertifiedKey>>,
}

impl Credentials {
    /// Credentials from PEM text; the chain and key are parsed for TLS once, here.
    fn new(
        chain_pem: String,
        key_pem: String,
        bundle_pem: String,
        facts: CertificateFacts,
    ) -> Credentials {
        let certified_key = certified_key(&chain_pem, &key_pem)
            .map_err(|e| tracing::warn!("the workload certificate cannot serve TLS: {e}"))
            .ok()
            .map(Arc::new);
        Credentials {
            chain_pem,
            key_pem,
            bundle_pem,
            facts,
            certified_key,
        }
    }

    /// The SPIFFE ID the certificate names.
    pub fn spiffe_id(&self) -> Option<&SpiffeId> {
        self.facts.spiffe_id()
    }
}

/// The proxy's identity, renewed in the background.
pub struct WorkloadIdentity {
    current: ArcSwap<Credentials>,
    node_id: String,
    region: String,
    /// `https://host:port` of the control plane's xDS port.
    endpoint: String,
    /// The host name its certificate must carry.
    server_name: String,
    dir: Option<PathBuf>,
    /// The join token, kept while the proxy has not joined yet (a start that could not
    /// reach the control plane keeps trying with it).
    join_token: std::sync::Mutex<Option<String>>,
}

impl std::fmt::Debug for WorkloadIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkloadIdentity")
            .field("node_id", &self.node_id)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// Writes `text` to `path` through a temporary file (never a half-written file), mode 0600.
fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let temporary = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temporary);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&temporary)?;
    file.write_all(text.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&temporary, path)
}

impl WorkloadIdentity {
    /// Loads the identity kept in `identity_dir`, or joins with the join token when there
    /// is none usable (blocking: called once at start).
    pub fn obtain(
        settings: &ControlPlaneIdentity,
        target: &str,
        node_id: &str,
        region: &str,
    ) -> Result<Arc<WorkloadIdentity>, String> {
        Self::obtain_or_defer(settings, target, node_id, region, false)
    }

    /// [`WorkloadIdentity::obtain`], but with `may_defer` a join that fails (the control
    /// plane is down) is retried in the background ([`WorkloadIdentity::renew_forever`])
    /// instead of failing: a proxy with a saved config serves it meanwhile.
    pub fn obtain_or_defer(
        settings: &ControlPlaneIdentity,
        target: &str,
        node_id: &str,
        region: &str,
        may_defer: bool,
    ) -> Result<Arc<WorkloadIdentity>, String> {
        let bundle = read(&settings.ca_file).map_err(|e| format!("control_plane.ca_file: {e}"))?;
        let server_name = target
            .rsplit_once(':')
            .map_or(target, |(host, _)| host)
            .trim_matches(['[', ']'])
            .to_string();
        let saved = settings.identity_dir.as_deref().and_then(|dir| {
            let loaded = Self::load(dir, node_id)?;
            // A certificate past half its life is renewed at once; one that has expired
            // (or nearly) cannot renew itself and the proxy joins again.
            let usable = loaded.facts.not_after > SystemTime::now() + Duration::from_secs(5);
            usable.then_some(loaded)
        });
        let fresh = saved.is_none();
        // Not joined yet: only the bundle, to reach the control plane with.
        let placeholder = Credentials {
            chain_pem: String::new(),
            key_pem: String::new(),
            bundle_pem: bundle,
            facts: CertificateFacts::default(),
            certified_key: None,
        };
        let identity = WorkloadIdentity {
            current: ArcSwap::from_pointee(saved.unwrap_or(placeholder)),
            node_id: node_id.to_string(),
            region: region.to_string(),
            endpoint: format!("https://{target}"),
            server_name,
            dir: settings.identity_dir.clone(),
            join_token: std::sync::Mutex::new(None),
        };
        if fresh {
            let token = match &settings.join_token_file {
                Some(path) => read(path)
                    .map_err(|e| format!("control_plane.join_token_file: {e}"))?
                    .trim()
                    .to_string(),
                None => std::env::var("NIP_JOIN_TOKEN").unwrap_or_default(),
            };
            if token.is_empty() {
                return Err("no certificate yet and no join token to get one \
                            (control_plane.join_token_file or NIP_JOIN_TOKEN)"
                    .into());
            }
            match identity.request(Some(&token)) {
                Ok(()) => {}
                Err(e) if may_defer => {
                    tracing::warn!(
                        "cannot join the control plane yet, trying again in the background: {e}"
                    );
                    *identity
                        .join_token
                        .lock()
                        .unwrap_or_else(|p| p.into_inner()) = Some(token);
                }
                Err(e) => return Err(e),
            }
        }
        if let Some(id) = identity.current.load().spiffe_id() {
            tracing::info!(identity = %id, "workload identity ready");
        }
        Ok(Arc::new(identity))
    }

    fn load(dir: &Path, node_id: &str) -> Option<Credentials> {
        let chain_pem = read(&dir.join("cert.pem")).ok()?;
        let key_pem = read(&dir.join("key.pem")).ok()?;
        let bundle_pem = read(&dir.join("bundle.pem")).ok()?;
        let facts = CertificateFacts::from_pem(&chain_pem).ok()?;
        let names_this_node = facts
            .spiffe_id()
            .is_some_and(|id| id.node_id() == Some(node_id));
        names_this_node.then(|| Credentials::new(chain_pem, key_pem, bundle_pem, facts))
    }

    /// The certificate in use now.
    pub fn current(&self) -> Arc<Credentials> {
        self.current.load_full()
    }

    /// The workload certificate as a rustls client certificate that follows renewals (a
    /// cluster's mesh mutual TLS, SDS secret `default`).
    pub fn client_certificate(self: &Arc<Self>) -> Arc<dyn rustls::client::ResolvesClientCert> {
        Arc::new(WorkloadClientCertificate(Arc::clone(self)))
    }

    /// TLS settings for each xDS connection: the current bundle and certificate.
    pub fn tls_settings(self: &Arc<Self>) -> TlsSettings {
        let identity = Arc::clone(self);
        Arc::new(move || {
            let current = identity.current();
            Ok(tonic::transport::ClientTlsConfig::new()
                .domain_name(identity.server_name.clone())
                .ca_certificate(tonic::transport::Certificate::from_pem(&current.bundle_pem))
                .identity(tonic::transport::Identity::from_pem(
                    &current.chain_pem,
                    &current.key_pem,
                )))
        })
    }

    /// Asks the CA for a certificate for a new key: with the join token, or (`None`) with
    /// the current certificate. Blocking.
    fn request(&self, join_token: Option<&str>) -> Result<(), String> {
        let made = key_and_csr(&self.node_id).map_err(|e| e.to_string())?;
        let current = self.current();
        let roots = parse_certificates(&current.bundle_pem)?;
        let mut tls = ureq::tls::TlsConfig::builder()
            .root_certs(ureq::tls::RootCerts::new_with_certs(&roots));
        if join_token.is_none() {
            let chain = parse_certificates(&current.chain_pem)?;
            let key = ureq::tls::PrivateKey::from_pem(current.key_pem.as_bytes())
                .map_err(|e| format!("the current key: {e}"))?;
            tls = tls.client_cert(Some(ureq::tls::ClientCert::new_with_certs(&chain, key)));
        }
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .tls_config(tls.build())
            .http_status_as_error(false)
            .timeout_global(Some(CALL_TIMEOUT))
            .build()
            .into();
        let body = serde_json::json!({
            "node_id": self.node_id,
            "region": self.region,
            "csr": made.csr_pem,
        });
        let url = format!("{}/v1/certificates", self.endpoint);
        let mut call = agent.post(&url).header("content-type", "application/json");
        let authorization;
        if let Some(token) = join_token {
            authorization = format!("Bearer {token}");
            call = call.header("authorization", &authorization);
        }
        let mut response = call
            .send(body.to_string())
            .map_err(|e| format!("{url}: {e}"))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .map_err(|e| format!("{url}: {e}"))?;
        let answer: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{url}: HTTP {status}: {e}"))?;
        if status != 200 {
            return Err(format!(
                "{url}: HTTP {status}: {}",
                answer["error"].as_str().unwrap_or("refused")
            ));
        }
        let field = |name: &str| {
            answer[name]
                .as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("{url}: the answer has no {name}"))
        };
        let chain_pem = field("certificate_chain")?;
        let bundle_pem = field("trust_bundle")?;
        let facts = CertificateFacts::from_pem(&chain_pem).map_err(|e| e.to_string())?;
        let names_this_node = facts
            .spiffe_id()
            .is_some_and(|id| id.node_id() == Some(self.node_id.as_str()));
        if !names_this_node {
            return Err(format!(
                "{url}: the certificate does not name node {:?}",
                self.node_id
            ));
        }
        let credentials = Credentials::new(chain_pem, made.key_pem, bundle_pem, facts);
        if let Some(dir) = &self.dir {
            let saved = std::fs::create_dir_all(dir)
                .and_then(|()| write_private(&dir.join("key.pem"), &credentials.key_pem))
                .and_then(|()| write_private(&dir.join("cert.pem"), &credentials.chain_pem))
                .and_then(|()| write_private(&dir.join("bundle.pem"), &credentials.bundle_pem));
            if let Err(e) = saved {
                tracing::warn!(dir = %dir.display(), "cannot keep the certificate for restarts: {e}");
            }
        }
        self.current.store(Arc::new(credentials));
        Ok(())
    }

    /// Renews at half-life, for as long as the proxy runs; a failure keeps the current
    /// certificate and is retried with back-off (1 s doubling to 60 s, never past the
    /// certificate's end).
    pub async fn renew_forever(self: Arc<Self>) {
        let mut retry = RETRY_MIN;
        loop {
            let due = self.current().facts.renew_at();
            let wait = due
                .duration_since(SystemTime::now())
                .unwrap_or(Duration::ZERO);
            tokio::time::sleep(wait).await;
            let identity = Arc::clone(&self);
            // Not joined yet (the control plane was down at start): join, else renew.
            let join = self
                .join_token
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone();
            let renewed = tokio::task::spawn_blocking(move || identity.request(join.as_deref()))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r);
            if renewed.is_ok() {
                *self.join_token.lock().unwrap_or_else(|p| p.into_inner()) = None;
            }
            match renewed {
                Ok(()) => {
                    retry = RETRY_MIN;
                    // A CA that hands out certificates already past half-life must not
                    // make this a busy loop.
                    if self.current().facts.renew_at() <= SystemTime::now() {
                        tokio::time::sleep(RETRY_MIN).await;
                    }
                    let current = self.current();
                    tracing::info!(
                        valid_until = %humantime::format_rfc3339_seconds(current.facts.not_after),
                        "certificate renewed"
                    );
                }
                Err(e) => {
                    tracing::warn!("certificate renewal failed, keeping the current one: {e}");
                    tokio::time::sleep(retry).await;
                    retry = (retry * 2).min(RETRY_MAX);
                }
            }
        }
    }
}

fn parse_certificates(pem: &str) -> Result<Vec<ureq::tls::Certificate<'static>>, String> {
    let certificates: Vec<_> = ureq::tls::parse_pem(pem.as_bytes())
        .filter_map(|item| match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => Some(Ok(c)),
            Ok(_) => None,
            Err(e) => Some(Err(e.to_string())),
        })
        .collect::<Result<_, _>>()?;
    if certificates.is_empty() {
        return Err("no certificate in the PEM".into());
    }
    Ok(certificates)
}

/// A chain and key in PEM, ready for rustls.
fn certified_key(chain_pem: &str, key_pem: &str) -> Result<rustls::sign::CertifiedKey, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let chain = CertificateDer::pem_slice_iter(chain_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("certificate: {e}"))?;
    let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes()).map_err(|e| format!("key: {e}"))?;
    rustls::sign::CertifiedKey::from_der(chain, key, &rustls::crypto::ring::default_provider())
        .map_err(|e| e.to_string())
}

/// The current workload certificate, each handshake (renewals apply to new connections).
#[derive(Debug)]
struct WorkloadClientCertificate(Arc<WorkloadIdentity>);

impl rustls::client::ResolvesClientCert for WorkloadClientCertificate {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[rustls::SignatureScheme],
    ) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.current().certified_key.clone()
    }

    fn has_certs(&self) -> bool {
        true
    }
}
