//! TLS on the listener: the server certificate, client certificates (mutual TLS) checked
//! against the listener's trusted roots, and who the client proved to be.
//!
//! ```text
//! handshake ──rustls (WebPKI client verifier: chain to client_ca_file)──▶ verified or refused
//!     └─ handshake_complete_callback ──▶ VerifiedPeer {certificate, request counter} in
//!        the connection's SslDigest extension ──▶ every request on it (plugins, access
//!        log, metrics)
//! ```
//!
//! With `require_client_certificate` a client without a verified certificate is refused
//! at the handshake; without it a client may present none, but one it presents must verify.
//!
//! Several certificates may serve one listener: each handshake gets the one whose DNS SANs
//! name the client's SNI (exactly, then by `*.` wildcard), else the first; the set is
//! replaced live when the config or a certificate file changes.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use nip_xds::identity::CertificateFacts;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use prometheus_client::metrics::counter::Counter;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use std::any::Any;
use std::collections::HashMap;
use std::sync::{Arc, OnceLock};

/// What a client's verified certificate says about it (the plugins' type, so requests
/// hand it on as is).
pub use nip_filters::host::PeerCertificate;

/// The verified client of a mutual TLS connection, recorded once per connection: its
/// certificate, shared as is with the plugins of every request on the connection, and the
/// counter of its requests, looked up by its first request (later ones only increment it).
#[derive(Debug)]
pub struct VerifiedPeer {
    /// What the certificate says about the client.
    pub certificate: Arc<PeerCertificate>,
    /// `nip_downstream_peer_requests_total{peer}` for this client, once known.
    pub requests: OnceLock<Counter>,
}

/// Records the client certificate after each handshake.
struct RecordPeer;

#[async_trait]
impl TlsAccept for RecordPeer {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn Any + Send + Sync>> {
        // Only verified certificates reach here: the verifier refused the rest.
        let facts = CertificateFacts::from_der(tls.peer_certificate_der()?).ok()?;
        Some(Arc::new(VerifiedPeer {
            certificate: Arc::new(PeerCertificate {
                uris: facts.uris,
                dns_names: facts.dns_names,
                subject: facts.subject,
            }),
            requests: OnceLock::new(),
        }))
    }
}

/// The listener's certificates, chosen by the name a client asks for (SNI): a certificate
/// whose DNS SANs name it exactly, else one with a matching `*.` wildcard, else the first.
#[derive(Debug)]
pub struct CertificateSet {
    default: Arc<CertifiedKey>,
    exact: HashMap<String, Arc<CertifiedKey>>,
    wildcard: HashMap<String, Arc<CertifiedKey>>,
}

impl CertificateSet {
    /// Reads `(certificate chain, private key)` PEM file pairs; the first is the default.
    pub fn load(pairs: &[(String, String)]) -> Result<CertificateSet, String> {
        let provider = rustls::crypto::ring::default_provider();
        let mut exact = HashMap::new();
        let mut wildcard = HashMap::new();
        let mut default = None;
        for (cert_file, key_file) in pairs {
            let chain = CertificateDer::pem_file_iter(cert_file)
                .and_then(|certificates| certificates.collect::<Result<Vec<_>, _>>())
                .map_err(|e| format!("{cert_file}: {e}"))?;
            let Some(leaf) = chain.first() else {
                return Err(format!("{cert_file}: no certificate"));
            };
            let names = CertificateFacts::from_der(leaf)
                .map_err(|e| format!("{cert_file}: {e}"))?
                .dns_names;
            let key =
                PrivateKeyDer::from_pem_file(key_file).map_err(|e| format!("{key_file}: {e}"))?;
            let certified = Arc::new(
                CertifiedKey::from_der(chain, key, &provider)
                    .map_err(|e| format!("{cert_file} with {key_file}: {e}"))?,
            );
            for name in names {
                let name = name.to_ascii_lowercase();
                match name.strip_prefix("*.") {
                    Some(suffix) => wildcard.entry(suffix.to_string()),
                    None => exact.entry(name),
                }
                .or_insert_with(|| Arc::clone(&certified));
            }
            default.get_or_insert(certified);
        }
        Ok(CertificateSet {
            default: default.ok_or("no certificate")?,
            exact,
            wildcard,
        })
    }

    /// The certificate for a client that asked for `server_name` (or none).
    pub fn choose(&self, server_name: Option<&str>) -> Arc<CertifiedKey> {
        let Some(name) = server_name.map(str::to_ascii_lowercase) else {
            return Arc::clone(&self.default);
        };
        if let Some(exact) = self.exact.get(&name) {
            return Arc::clone(exact);
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .map_or_else(|| Arc::clone(&self.default), Arc::clone)
    }
}

/// Chooses each handshake's certificate from the current [`CertificateSet`], which a reload
/// or a changed certificate file replaces without restarting the listener.
#[derive(Debug)]
pub struct SniResolver {
    current: ArcSwap<CertificateSet>,
}

impl SniResolver {
    /// A resolver serving `set`.
    pub fn new(set: CertificateSet) -> SniResolver {
        SniResolver {
            current: ArcSwap::from_pointee(set),
        }
    }

    /// Serves `set` from the next handshake on.
    pub fn replace(&self, set: CertificateSet) {
        self.current.store(Arc::new(set));
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.load().choose(client_hello.server_name()))
    }
}

/// What the listener's TLS is made of.
#[derive(Debug, Clone)]
pub struct ListenerTls<'a> {
    /// The certificates, chosen by SNI (the first is the default).
    pub certificates: Arc<SniResolver>,
    /// PEM roots client certificates must chain to.
    pub client_ca_file: Option<&'a str>,
    /// Refuse clients without a verified certificate.
    pub require_client_certificate: bool,
}

/// pingora's TLS settings for the listener: HTTP/2 and HTTP/1.1 by ALPN, the peer recorded.
pub fn settings(tls: &ListenerTls<'_>) -> Result<TlsSettings, String> {
    let mut settings =
        TlsSettings::with_callbacks(Box::new(RecordPeer)).map_err(|e| e.to_string())?;
    settings.set_cert_resolver(Arc::clone(&tls.certificates) as Arc<dyn ResolvesServerCert>);
    if let Some(ca_file) = tls.client_ca_file {
        let mut roots = rustls::RootCertStore::empty();
        let certificates = CertificateDer::pem_file_iter(ca_file)
            .map_err(|e| format!("client_ca_file {ca_file}: {e}"))?;
        for certificate in certificates {
            let certificate = certificate.map_err(|e| format!("client_ca_file {ca_file}: {e}"))?;
            roots
                .add(certificate)
                .map_err(|e| format!("client_ca_file {ca_file}: {e}"))?;
        }
        if roots.is_empty() {
            return Err(format!("client_ca_file {ca_file}: no certificate"));
        }
        let builder = WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            Arc::new(rustls::crypto::ring::default_provider()),
        );
        let builder = if tls.require_client_certificate {
            builder
        } else {
            builder.allow_unauthenticated()
        };
        settings.set_client_cert_verifier(builder.build().map_err(|e| e.to_string())?);
    }
    settings.enable_h2();
    Ok(settings)
}
