//! TLS on the listener: the server certificate, client certificates (mutual TLS) checked
//! against the listener's trusted roots, and who the client proved to be.
//!
//! ```text
//! handshake ──rustls (WebPKI client verifier: chain to client_ca_file)──▶ verified or refused
//!     └─ handshake_complete_callback ──▶ PeerCertificate {uris, dns, subject} in the
//!        connection's SslDigest extension ──▶ every request on it (plugins, access log)
//! ```
//!
//! With `require_client_certificate` a client without a verified certificate is refused
//! at the handshake; without it a client may present none, but one it presents must verify.

use async_trait::async_trait;
use nip_xds::identity::CertificateFacts;
use pingora::listeners::tls::TlsSettings;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::server::WebPkiClientVerifier;
use std::any::Any;
use std::sync::Arc;

/// What a client's verified certificate says about it (the plugins' type, so requests
/// hand it on as is).
pub use nip_filters::host::PeerCertificate;

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
        Some(Arc::new(PeerCertificate {
            uris: facts.uris,
            dns_names: facts.dns_names,
            subject: facts.subject,
        }))
    }
}

/// What the listener's TLS is made of.
#[derive(Debug, Clone)]
pub struct ListenerTls<'a> {
    /// PEM certificate chain file.
    pub cert_file: &'a str,
    /// PEM private key file.
    pub key_file: &'a str,
    /// PEM roots client certificates must chain to.
    pub client_ca_file: Option<&'a str>,
    /// Refuse clients without a verified certificate.
    pub require_client_certificate: bool,
}

/// pingora's TLS settings for the listener: HTTP/2 and HTTP/1.1 by ALPN, the peer recorded.
pub fn settings(tls: &ListenerTls<'_>) -> Result<TlsSettings, String> {
    let mut settings =
        TlsSettings::with_callbacks(Box::new(RecordPeer)).map_err(|e| e.to_string())?;
    settings
        .set_certificate_chain_file(tls.cert_file)
        .map_err(|e| format!("cert_file: {e}"))?;
    settings
        .set_private_key_file(tls.key_file)
        .map_err(|e| format!("key_file: {e}"))?;
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
