//! TLS to a cluster's endpoints (Envoy's `UpstreamTlsContext`): the name sent as SNI, the
//! roots the endpoint's certificate must chain to, the names it must carry
//! (`match_typed_subject_alt_names`, URI SANs such as `spiffe://…` included), and a client
//! certificate for mutual TLS.
//!
//! pingora's TLS connector verifies only the name sent (DNS or IP) and takes a fixed client
//! certificate. Settings within that ([`NativeTls`]) go through it: it pools the TCP socket
//! itself. SAN matchers and the workload certificate (renewed in place) need NIP's own
//! connector: each such cluster gets its rustls configs once, when the config is compiled,
//! and a new connection is a TCP connect and a handshake under the cluster's
//! `connect_timeout`, handed to pingora as a connected stream ([`UpstreamTls::connector`]):
//! one end of a socket pair a task relays to the TLS connection (pingora pools connections
//! by file descriptor and checks a pooled socket's peer; see `http::peer` for how the
//! relay's socket passes). The relay measured within noise of pingora's connector per
//! kept-alive request (bench/mtls.py); pingora's path still saves a task and a socket pair
//! per connection.
//!
//! ```text
//! compile: files ──UpstreamTls::load──▶ ClientConfig (roots + SAN verifier + client cert)
//! compile: each endpoint ──UpstreamTls::for_endpoint──▶ EndpointTls (name, pool group, connector)
//! try:     peer::for_try ──▶ pingora connects through the endpoint's Connector:
//!          TCP ─▶ handshake (verify chain, then SANs or the name) ─▶ Stream
//! ```
//!
//! Everything is read and checked when the config is compiled: a file that does not hold
//! a certificate or key is a compile error, never a panic at connect time. A certificate
//! that does not verify fails the try like a refused connection (503 `UF`, counted in
//! `nip_upstream_cx_connect_fail_total` and `nip_upstream_cx_tls_fail_total`).

use crate::matchers::StringMatch;
use async_trait::async_trait;
use nip_xds::identity::{certificates_der, CertificateFacts};
use pingora::connectors::L4Connect;
use pingora::protocols::l4::socket::SocketAddr as PeerAddress;
use pingora::protocols::l4::stream::Stream;
use pingora::{Error, ErrorType};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

/// Which kind of subject alternative name a matcher looks at (Envoy's `SubjectAltNameMatcher.san_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SanType {
    /// A DNS name.
    Dns,
    /// A URI (a SPIFFE ID is one).
    Uri,
}

/// One accepted name of the endpoint's certificate (Envoy's `SubjectAltNameMatcher`).
#[derive(Debug, Clone)]
pub struct SanMatcher {
    /// The kind of name.
    pub san_type: SanType,
    /// How it is compared.
    pub matcher: StringMatch,
}

impl SanMatcher {
    fn matches(&self, facts: &CertificateFacts) -> bool {
        let names = match self.san_type {
            SanType::Dns => &facts.dns_names,
            SanType::Uri => &facts.uris,
        };
        names.iter().any(|name| self.matcher.matches(name))
    }
}

/// The roots a cluster's endpoints must chain to.
#[derive(Debug, Clone, Default)]
pub enum Roots {
    /// The system's.
    #[default]
    System,
    /// PEM roots, read by the compiler from `origin` (a file, or an SDS secret).
    Pem {
        /// Where they came from, for messages.
        origin: String,
        /// The certificates.
        pem: String,
    },
}

/// The certificate a proxy presents to a cluster's endpoints (mutual TLS).
#[derive(Clone)]
pub enum ClientCertificate {
    /// A chain and key in PEM, read by the compiler from `origin`.
    Pem {
        /// Where they came from, for messages.
        origin: String,
        /// The leaf and its intermediates.
        chain: String,
        /// The private key.
        key: String,
    },
    /// The proxy's workload certificate (SDS secret `default`), following its renewals.
    Workload(Arc<crate::identity::WorkloadIdentity>),
}

impl std::fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientCertificate::Pem { origin, .. } => write!(f, "Pem({origin})"),
            ClientCertificate::Workload(_) => f.write_str("Workload"),
        }
    }
}

/// What a cluster's TLS is made of, resolved by the compiler (files read, secrets found).
#[derive(Debug, Clone, Default)]
pub struct UpstreamTlsSettings {
    /// `sni`: the name sent, and verified unless SAN matchers are given (`None`: the
    /// endpoint's host name, or its IP address for an IP endpoint).
    pub sni: Option<String>,
    /// The roots (`validation_context.trusted_ca` or an SDS validation context).
    pub roots: Roots,
    /// `match_typed_subject_alt_names`: when not empty, the certificate must carry a name
    /// one of them accepts, and the SNI name is not checked (Envoy's semantics).
    pub san_matchers: Vec<SanMatcher>,
    /// The client certificate, for mutual TLS.
    pub client: Option<ClientCertificate>,
}

/// A cluster's TLS as pingora's connector takes it.
#[derive(Clone)]
pub struct NativeTls {
    /// The roots (`None`: the system's).
    pub roots: Option<Arc<[pingora::utils::tls::WrappedX509]>>,
    /// The client certificate and key.
    pub client: Option<Arc<pingora::utils::tls::CertKey>>,
}

/// How a cluster's connections are secured: built once per compiled config.
pub struct UpstreamTls {
    /// The name the endpoint's certificate must carry, sent as SNI (`None`: the endpoint's
    /// host name, or its IP address for an IP endpoint).
    pub sni: Option<String>,
    /// Offers `http/1.1` by ALPN.
    http1: Arc<ClientConfig>,
    /// Offers `h2` by ALPN.
    http2: Arc<ClientConfig>,
    /// Tells pooled connections of different TLS settings apart (pingora sees a plaintext
    /// peer and pools by address and group: [`UpstreamTls::pool_group`]).
    settings_group: u64,
    /// Settings pingora's own TLS can carry (no SAN matchers, no renewing certificate):
    /// such a cluster connects through pingora, which pools the TCP socket itself (no relay
    /// task or socket pair per connection).
    pub native: Option<NativeTls>,
    description: String,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("settings", &self.description)
            .finish()
    }
}

/// DER certificates of PEM text, each checked to parse.
fn certificates(pem: &str, origin: &str) -> Result<Vec<Vec<u8>>, String> {
    let ders = certificates_der(pem).map_err(|e| format!("{origin}: {e}"))?;
    if ders.is_empty() {
        return Err(format!("{origin}: no certificate"));
    }
    for der in &ders {
        CertificateFacts::from_der(der).map_err(|e| format!("{origin}: {e}"))?;
    }
    Ok(ders)
}

/// The system's roots, read once per process.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: std::sync::OnceLock<Arc<RootCertStore>> = std::sync::OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        let mut store = RootCertStore::empty();
        let found = pingora::tls::load_native_certs().unwrap_or_else(|error| {
            tracing::warn!(%error, "reading the system's root certificates");
            Vec::new()
        });
        let (added, ignored) = store.add_parsable_certificates(found);
        if ignored > 0 {
            tracing::warn!(added, ignored, "some system root certificates do not parse");
        }
        Arc::new(store)
    }))
}

impl UpstreamTls {
    /// Checks a cluster's TLS material and builds its configs.
    pub fn load(settings: UpstreamTlsSettings) -> Result<UpstreamTls, String> {
        let mut group = std::collections::hash_map::DefaultHasher::new();
        settings.sni.hash(&mut group);
        let mut root_ders = Vec::new();
        let roots = match &settings.roots {
            Roots::System => system_roots(),
            Roots::Pem { origin, pem } => {
                let mut store = RootCertStore::empty();
                for der in certificates(pem, origin)? {
                    der.hash(&mut group);
                    store
                        .add(CertificateDer::from(der.clone()))
                        .map_err(|e| format!("{origin}: {e}"))?;
                    root_ders.push(der);
                }
                Arc::new(store)
            }
        };
        let mut native_client = None;
        let verifier = WebPkiServerVerifier::builder_with_provider(
            roots,
            Arc::new(rustls::crypto::ring::default_provider()),
        )
        .build()
        .map_err(|e| format!("trusted_ca: {e}"))?;
        let san_verifier = Arc::new(SanVerifier {
            webpki: verifier,
            san_matchers: settings.san_matchers.clone(),
        });
        let builder =
            ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_protocol_versions(&[&rustls::version::TLS12, &rustls::version::TLS13])
                .map_err(|e| e.to_string())?
                .dangerous()
                .with_custom_certificate_verifier(san_verifier);
        let config = match &settings.client {
            None => builder.with_no_client_auth(),
            Some(ClientCertificate::Workload(identity)) => {
                "workload".hash(&mut group);
                builder.with_client_cert_resolver(identity.client_certificate())
            }
            Some(ClientCertificate::Pem { origin, chain, key }) => {
                let chain: Vec<CertificateDer<'static>> = certificates(chain, origin)?
                    .into_iter()
                    .map(CertificateDer::from)
                    .collect();
                let key = {
                    use rustls::pki_types::pem::PemObject;
                    PrivateKeyDer::from_pem_slice(key.as_bytes())
                        .map_err(|e| format!("{origin}: private key: {e}"))?
                };
                for der in &chain {
                    der.hash(&mut group);
                }
                native_client = Some(Arc::new(pingora::utils::tls::CertKey::new(
                    chain.iter().map(|c| c.to_vec()).collect(),
                    key.secret_der().to_vec(),
                )));
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| format!("{origin}: {e}"))?
            }
        };
        let description = format!(
            "roots: {}, names: [{}], client certificate: {:?}",
            match &settings.roots {
                Roots::System => "system",
                Roots::Pem { origin, .. } => origin,
            },
            settings
                .san_matchers
                .iter()
                .map(|m| format!("{:?} {}", m.san_type, m.matcher.describe()))
                .collect::<Vec<_>>()
                .join(", "),
            settings.client
        );
        description.hash(&mut group);
        let with_alpn = |protocol: &[u8]| {
            let mut config = config.clone();
            config.alpn_protocols = vec![protocol.to_vec()];
            Arc::new(config)
        };
        let native = (settings.san_matchers.is_empty()
            && !matches!(settings.client, Some(ClientCertificate::Workload(_))))
        .then(|| NativeTls {
            roots: (!root_ders.is_empty()).then(|| {
                root_ders
                    .into_iter()
                    .map(|der| {
                        pingora::utils::tls::WrappedX509::new(der, pingora::utils::tls::parse_x509)
                    })
                    .collect()
            }),
            client: native_client,
        });
        Ok(UpstreamTls {
            native,
            sni: settings.sni,
            http1: with_alpn(b"http/1.1"),
            http2: with_alpn(b"h2"),
            settings_group: group.finish(),
            description,
        })
    }

    /// How `address` (named `hostname` in its cluster, if it has a name) is reached:
    /// the name its certificate is checked against — the cluster's `sni`, else the host
    /// name, else the IP — and, unless pingora's own TLS carries the settings, NIP's
    /// connector with TCP + handshake under `timeout`. Made once per compiled endpoint; an
    /// unusable name is a compile error.
    pub fn for_endpoint(
        self: &Arc<Self>,
        address: std::net::SocketAddr,
        hostname: Option<&str>,
        http2: bool,
        timeout: Duration,
    ) -> Result<EndpointTls, String> {
        let name = match (&self.sni, hostname) {
            (Some(sni), _) => sni.clone(),
            (None, Some(hostname)) => hostname.to_string(),
            (None, None) => address.ip().to_string(),
        };
        let connector: Option<Arc<dyn L4Connect + Send + Sync>> = match self.native {
            Some(_) => None,
            None => {
                let server_name = ServerName::try_from(name.clone())
                    .map_err(|e| format!("server name {name:?}: {e}"))?;
                let config = if http2 { &self.http2 } else { &self.http1 };
                Some(Arc::new(Connector {
                    connector: pingora::tls::TlsConnector::from(Arc::clone(config)),
                    address,
                    server_name,
                    timeout,
                }))
            }
        };
        // Pooled connections are shared only for the same settings, address and name.
        let mut group = std::collections::hash_map::DefaultHasher::new();
        self.settings_group.hash(&mut group);
        address.hash(&mut group);
        name.hash(&mut group);
        Ok(EndpointTls {
            settings: Arc::clone(self),
            server_name: name,
            pool_group: group.finish(),
            connector,
        })
    }
}

/// How one endpoint is reached over TLS, made when the config is compiled (nothing is
/// built per try).
pub struct EndpointTls {
    /// The cluster's (or its `transport_socket_matches` entry's) TLS.
    pub settings: Arc<UpstreamTls>,
    /// The name the certificate is checked against (sent as SNI unless an IP address).
    pub server_name: String,
    /// pingora's pool group for NIP-made connections (see `http::peer`).
    pub pool_group: u64,
    /// NIP's connector (`None`: pingora's own TLS, from `settings.native`).
    pub connector: Option<Arc<dyn L4Connect + Send + Sync>>,
}

impl std::fmt::Debug for EndpointTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointTls")
            .field("settings", &self.settings)
            .field("server_name", &self.server_name)
            .field("nip_connector", &self.connector.is_some())
            .finish()
    }
}

/// Verifies the chain with webpki, then the names: the SAN matchers when there are any
/// (a name mismatch with the SNI is then not an error), else the SNI name.
#[derive(Debug)]
struct SanVerifier {
    webpki: Arc<WebPkiServerVerifier>,
    san_matchers: Vec<SanMatcher>,
}

impl ServerCertVerifier for SanVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let checked = self.webpki.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        );
        if self.san_matchers.is_empty() {
            return checked;
        }
        match checked {
            Ok(_)
            | Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => {}
            Err(other) => return Err(other),
        }
        let facts = CertificateFacts::from_der(end_entity)
            .map_err(|_| rustls::Error::InvalidCertificate(CertificateError::BadEncoding))?;
        if self.san_matchers.iter().any(|m| m.matches(&facts)) {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.webpki.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.webpki.supported_verify_schemes()
    }
}

/// Connects to one endpoint of a TLS cluster (pingora's custom L4 connector).
struct Connector {
    connector: pingora::tls::TlsConnector,
    /// Where to connect (pingora's peer address is a placeholder, see `http::peer`).
    address: std::net::SocketAddr,
    server_name: ServerName<'static>,
    timeout: Duration,
}

impl std::fmt::Debug for Connector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connector")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

#[async_trait]
impl L4Connect for Connector {
    async fn connect(&self, _placeholder: &PeerAddress) -> pingora::Result<Stream> {
        let inet = &self.address;
        let connecting = async {
            let tcp = tokio::net::TcpStream::connect(inet).await.map_err(|e| {
                let kind = match e.kind() {
                    std::io::ErrorKind::ConnectionRefused => ErrorType::ConnectRefused,
                    _ => ErrorType::ConnectError,
                };
                Error::because(kind, format!("connecting to {inet}"), e)
            })?;
            let _ = tcp.set_nodelay(true);
            self.connector
                .connect(self.server_name.clone(), tcp)
                .await
                .map_err(|e| {
                    let kind = match e
                        .get_ref()
                        .and_then(|inner| inner.downcast_ref::<rustls::Error>())
                    {
                        Some(rustls::Error::InvalidCertificate(_)) => ErrorType::InvalidCert,
                        _ => ErrorType::TLSHandshakeFailure,
                    };
                    Error::because(kind, format!("TLS handshake with {inet}"), e)
                })
        };
        let tls = match tokio::time::timeout(self.timeout, connecting).await {
            Ok(result) => result?,
            Err(_) => {
                return Error::e_explain(
                    ErrorType::ConnectTimedout,
                    format!("connecting to {inet} over TLS took over {:?}", self.timeout),
                )
            }
        };
        // pingora pools connections by their file descriptor, so it gets one: a socket
        // pair whose other end a task relays to and from the TLS connection.
        let (ours, theirs) = tokio::net::UnixStream::pair()
            .map_err(|e| Error::because(ErrorType::SocketError, "a socket pair for TLS", e))?;
        tokio::spawn(relay(tls, ours));
        Ok(Stream::from(theirs))
    }
}

/// Carries bytes between pingora's end of the socket pair and the TLS connection until
/// either side closes or fails (then both are closed).
async fn relay(
    mut tls: pingora::tls::ClientTlsStream<tokio::net::TcpStream>,
    mut ours: tokio::net::UnixStream,
) {
    let _ = tokio::io::copy_bidirectional(&mut tls, &mut ours).await;
}
