//! TLS to a cluster's endpoints (Envoy's `UpstreamTlsContext`): the name the endpoint's
//! certificate must carry (sent as SNI), the roots it must chain to, and a client
//! certificate for mutual TLS.
//!
//! Everything is read and checked when the config is compiled: a file that does not hold
//! a certificate or key is a compile error, never a panic at connect time. A certificate
//! that does not verify fails the try like a refused connection (503 `UF`, counted in
//! `nip_upstream_cx_connect_fail_total` and `nip_upstream_cx_tls_fail_total`).

use nip_xds::identity::{certificates_der, CertificateFacts};
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use std::sync::Arc;

/// How a cluster's connections are secured.
pub struct UpstreamTls {
    /// The name the endpoint's certificate must carry, sent as SNI (`None`: the endpoint's
    /// host name, or its IP address for an IP endpoint).
    pub sni: Option<String>,
    /// The roots to trust (`None`: the system's).
    pub roots: Option<Arc<[WrappedX509]>>,
    /// The client certificate and key, for mutual TLS.
    pub client: Option<Arc<CertKey>>,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("sni", &self.sni)
            .field("roots", &self.roots.as_ref().map(|r| r.len()))
            .field("client", &self.client.is_some())
            .finish()
    }
}

/// DER certificates of a PEM file, each checked to parse (pingora panics on one that
/// does not).
fn certificates(path: &str, what: &str) -> Result<Vec<Vec<u8>>, String> {
    let pem = std::fs::read_to_string(path).map_err(|e| format!("{what} {path:?}: {e}"))?;
    let ders = certificates_der(&pem).map_err(|e| format!("{what} {path:?}: {e}"))?;
    if ders.is_empty() {
        return Err(format!("{what} {path:?}: no certificate"));
    }
    for der in &ders {
        CertificateFacts::from_der(der).map_err(|e| format!("{what} {path:?}: {e}"))?;
    }
    Ok(ders)
}

impl UpstreamTls {
    /// Reads and checks the files of a cluster's TLS settings.
    pub fn load(
        sni: Option<String>,
        ca_file: Option<&str>,
        client: Option<(&str, &str)>,
    ) -> Result<UpstreamTls, String> {
        let roots = match ca_file {
            None => None,
            Some(path) => {
                let roots: Vec<WrappedX509> = certificates(path, "trusted_ca")?
                    .into_iter()
                    .map(|der| WrappedX509::new(der, parse_x509))
                    .collect();
                Some(Arc::from(roots.into_boxed_slice()))
            }
        };
        let client = match client {
            None => None,
            Some((cert_file, key_file)) => {
                let chain = certificates(cert_file, "certificate_chain")?;
                let key_pem = std::fs::read_to_string(key_file)
                    .map_err(|e| format!("private_key {key_file:?}: {e}"))?;
                let key = {
                    use rustls::pki_types::pem::PemObject;
                    rustls::pki_types::PrivateKeyDer::from_pem_slice(key_pem.as_bytes())
                        .map_err(|e| format!("private_key {key_file:?}: {e}"))?
                };
                Some(Arc::new(CertKey::new(chain, key.secret_der().to_vec())))
            }
        };
        Ok(UpstreamTls { sni, roots, client })
    }
}
