//! TLS on the listener: the server certificate, client certificates (mutual TLS) checked
//! against the listener's trusted roots, and who the client proved to be.
//!
//! ```text
//! handshake ──rustls (WebPKI client verifier: chain to the client roots)──▶ verified or refused
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
//! replaced live when the config or a certificate file changes. A mesh listener serves the
//! proxy's workload certificate instead, replaced live when it is renewed; its client
//! roots (the mesh's trust bundle, SDS `ROOTCA`) are replaced live when the control plane
//! pushes a new bundle: rotations need no restart and drop no connection.

use arc_swap::ArcSwap;
use async_trait::async_trait;
use nip_xds::identity::CertificateFacts;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use prometheus_client::metrics::counter::Counter;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::UnixTime;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
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
    /// `None`: no certificate yet (a workload certificate before the proxy joined).
    default: Option<Arc<CertifiedKey>>,
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
            default: Some(default.ok_or("no certificate")?),
            exact,
            wildcard,
        })
    }

    /// The proxy's workload certificate for every name (`None`: not joined yet, so every
    /// handshake fails until it has one).
    pub fn workload(certificate: Option<Arc<CertifiedKey>>) -> CertificateSet {
        CertificateSet {
            default: certificate,
            exact: HashMap::new(),
            wildcard: HashMap::new(),
        }
    }

    /// The certificate for a client that asked for `server_name` (or none).
    pub fn choose(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let Some(name) = server_name.map(str::to_ascii_lowercase) else {
            return self.default.clone();
        };
        if let Some(exact) = self.exact.get(&name) {
            return Some(Arc::clone(exact));
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent))
            .map_or_else(|| self.default.clone(), |c| Some(Arc::clone(c)))
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
        self.current.load().choose(client_hello.server_name())
    }
}

/// Verifies client certificates against roots that can be replaced while the listener
/// runs (a new trust bundle verifies the next handshake; open connections stay).
#[derive(Debug)]
pub struct ClientVerifier {
    current: ArcSwap<WebPki>,
    required: bool,
}

#[derive(Debug)]
struct WebPki(Arc<dyn ClientCertVerifier>);

fn webpki(roots: &ClientRoots, required: bool) -> Result<WebPki, String> {
    let mut store = rustls::RootCertStore::empty();
    for certificate in CertificateDer::pem_slice_iter(roots.pem.as_bytes()) {
        let certificate = certificate.map_err(|e| format!("{}: {e}", roots.origin))?;
        store
            .add(certificate)
            .map_err(|e| format!("{}: {e}", roots.origin))?;
    }
    if store.is_empty() {
        return Err(format!("{}: no certificate", roots.origin));
    }
    let builder = WebPkiClientVerifier::builder_with_provider(
        Arc::new(store),
        Arc::new(rustls::crypto::ring::default_provider()),
    );
    let builder = if required {
        builder
    } else {
        builder.allow_unauthenticated()
    };
    Ok(WebPki(builder.build().map_err(|e| e.to_string())?))
}

impl ClientVerifier {
    /// A verifier of certificates chaining to `roots`; `required`: refuse clients that
    /// present none.
    pub fn new(roots: &ClientRoots, required: bool) -> Result<ClientVerifier, String> {
        Ok(ClientVerifier {
            current: ArcSwap::from_pointee(webpki(roots, required)?),
            required,
        })
    }

    /// Verifies with `roots` from the next handshake on; roots that do not load leave the
    /// old ones in use.
    pub fn replace(&self, roots: &ClientRoots) -> Result<(), String> {
        self.current.store(Arc::new(webpki(roots, self.required)?));
        Ok(())
    }
}

impl ClientCertVerifier for ClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.required
    }

    /// No hints: the roots may change under a running listener, and clients send the
    /// certificate they have either way.
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.current
            .load()
            .0
            .verify_client_cert(end_entity, intermediates, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.current
            .load()
            .0
            .verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.current.load().0.supported_verify_schemes()
    }
}

/// PEM roots the listener verifies client certificates with, and where they came from (a
/// file, or an SDS secret such as the mesh's `ROOTCA`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientRoots {
    /// Where they came from, for messages.
    pub origin: String,
    /// The certificates.
    pub pem: String,
}

/// pingora's TLS settings for the listener: HTTP/2 and HTTP/1.1 by ALPN, certificates from
/// `certificates`, clients verified by `clients` (if any), the peer recorded.
pub fn settings(
    certificates: &Arc<SniResolver>,
    clients: Option<&Arc<ClientVerifier>>,
) -> Result<TlsSettings, String> {
    let mut settings =
        TlsSettings::with_callbacks(Box::new(RecordPeer)).map_err(|e| e.to_string())?;
    settings.set_cert_resolver(Arc::clone(certificates) as Arc<dyn ResolvesServerCert>);
    if let Some(clients) = clients {
        settings.set_client_cert_verifier(Arc::clone(clients) as Arc<dyn ClientCertVerifier>);
    }
    settings.enable_h2();
    Ok(settings)
}
