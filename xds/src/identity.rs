//! Workload identity: the SPIFFE IDs NIP's certificates carry, the key and CSR a proxy
//! makes for itself, and what a certificate says about its holder.
//!
//! ```text
//! proxy: KeyPair::generate ──csr_for(identity)──▶ CSR (PEM) ──join token / current cert──▶
//! control plane CA: checks who asks, signs for spiffe://TRUST_DOMAIN/node/NODE_ID ──▶ chain
//! xDS server: peer certificate ──peer_identity──▶ SpiffeId ──node()──▶ must equal node.id
//! ```
//!
//! A proxy's identity is `spiffe://TRUST_DOMAIN/node/NODE_ID` (the URI SAN of its
//! certificate, as Istio and Linkerd name workloads); the control plane's is
//! `spiffe://TRUST_DOMAIN/control-plane`. The private key never leaves the process that
//! made it: only the CSR travels.

use std::fmt;
use std::time::{Duration, SystemTime};

/// Why an identity, key or certificate could not be made or read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdentityError {
    /// Not a `spiffe://` ID NIP can use.
    #[error("{0:?} is not a SPIFFE ID (spiffe://TRUST_DOMAIN/PATH)")]
    NotSpiffe(String),
    /// A node id that cannot be part of a SPIFFE ID.
    #[error("node id {0:?} must be 1–128 letters, digits, '-', '_' or '.'")]
    BadNodeId(String),
    /// Key or CSR generation failed.
    #[error("cannot make a key or CSR: {0}")]
    Generate(String),
    /// A certificate that could not be parsed.
    #[error("not a readable certificate: {0}")]
    Certificate(String),
}

/// A SPIFFE ID: `spiffe://TRUST_DOMAIN/PATH`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SpiffeId {
    /// The trust domain (a DNS-like name: which CA vouches for it).
    pub trust_domain: String,
    /// The path, with its leading `/`.
    pub path: String,
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "spiffe://{}{}", self.trust_domain, self.path)
    }
}

impl SpiffeId {
    /// Parses `spiffe://TRUST_DOMAIN/PATH`.
    pub fn parse(text: &str) -> Result<SpiffeId, IdentityError> {
        let bad = || IdentityError::NotSpiffe(text.to_string());
        let rest = text.strip_prefix("spiffe://").ok_or_else(bad)?;
        let (domain, path) = rest.split_once('/').ok_or_else(bad)?;
        let domain_ok = !domain.is_empty()
            && domain
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "-._".contains(c));
        let path_ok = !path.is_empty()
            && path.split('/').all(|segment| {
                !segment.is_empty()
                    && segment != "."
                    && segment != ".."
                    && segment
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._".contains(c))
            });
        if !(domain_ok && path_ok) {
            return Err(bad());
        }
        Ok(SpiffeId {
            trust_domain: domain.to_string(),
            path: format!("/{path}"),
        })
    }

    /// A proxy's identity: `spiffe://TRUST_DOMAIN/node/NODE_ID`.
    pub fn node(trust_domain: &str, node_id: &str) -> Result<SpiffeId, IdentityError> {
        check_node_id(node_id)?;
        SpiffeId::parse(&format!("spiffe://{trust_domain}/node/{node_id}"))
    }

    /// The control plane's identity: `spiffe://TRUST_DOMAIN/control-plane`.
    pub fn control_plane(trust_domain: &str) -> Result<SpiffeId, IdentityError> {
        SpiffeId::parse(&format!("spiffe://{trust_domain}/control-plane"))
    }

    /// The node id, when this is a proxy's identity.
    pub fn node_id(&self) -> Option<&str> {
        self.path
            .strip_prefix("/node/")
            .filter(|id| !id.contains('/'))
    }
}

/// Refuses a node id that could not name a certificate's holder.
pub fn check_node_id(node_id: &str) -> Result<(), IdentityError> {
    let ok = !node_id.is_empty()
        && node_id.len() <= 128
        && node_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
        && node_id != "."
        && node_id != "..";
    if ok {
        Ok(())
    } else {
        Err(IdentityError::BadNodeId(node_id.to_string()))
    }
}

/// A private key and the CSR asking to certify it (PEM both); the key stays with the caller.
#[derive(Debug)]
pub struct KeyAndCsr {
    /// PKCS#8 private key (ECDSA P-256).
    pub key_pem: String,
    /// The certificate signing request, signed with that key.
    pub csr_pem: String,
}

/// Makes a fresh key and a CSR for `node_id` (the CA writes the identity it vouches for
/// into the certificate whatever the CSR asks; the CSR proves the key is held).
pub fn key_and_csr(node_id: &str) -> Result<KeyAndCsr, IdentityError> {
    check_node_id(node_id)?;
    let fail = |e: rcgen::Error| IdentityError::Generate(e.to_string());
    let key = rcgen::KeyPair::generate().map_err(fail)?;
    let mut params = rcgen::CertificateParams::default();
    let mut name = rcgen::DistinguishedName::new();
    name.push(rcgen::DnType::CommonName, node_id);
    params.distinguished_name = name;
    let csr = params.serialize_request(&key).map_err(fail)?;
    Ok(KeyAndCsr {
        key_pem: key.serialize_pem(),
        csr_pem: csr.pem().map_err(fail)?,
    })
}

/// What a certificate says about its holder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateFacts {
    /// Its URI SANs that are SPIFFE IDs.
    pub spiffe_ids: Vec<SpiffeId>,
    /// All its URI SANs, as written.
    pub uris: Vec<String>,
    /// Its subject, as text (`CN=…, O=…`).
    pub subject: String,
    /// Its DNS SANs.
    pub dns_names: Vec<String>,
    /// When it starts to be valid.
    pub not_before: SystemTime,
    /// When it stops being valid.
    pub not_after: SystemTime,
    /// Its SubjectPublicKeyInfo (DER): which key it certifies.
    pub public_key_der: Vec<u8>,
}

impl Default for CertificateFacts {
    /// No certificate: no names, valid never (its validity is the Unix epoch).
    fn default() -> Self {
        CertificateFacts {
            spiffe_ids: Vec::new(),
            uris: Vec::new(),
            subject: String::new(),
            dns_names: Vec::new(),
            not_before: SystemTime::UNIX_EPOCH,
            not_after: SystemTime::UNIX_EPOCH,
            public_key_der: Vec::new(),
        }
    }
}

impl CertificateFacts {
    /// Reads a DER certificate.
    pub fn from_der(der: &[u8]) -> Result<CertificateFacts, IdentityError> {
        use x509_parser::extensions::GeneralName;
        use x509_parser::prelude::FromDer;
        let (_, certificate) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|e| IdentityError::Certificate(e.to_string()))?;
        let mut facts = CertificateFacts {
            spiffe_ids: Vec::new(),
            uris: Vec::new(),
            subject: certificate.subject().to_string(),
            dns_names: Vec::new(),
            not_before: unix(certificate.validity().not_before.timestamp()),
            not_after: unix(certificate.validity().not_after.timestamp()),
            public_key_der: certificate.public_key().raw.to_vec(),
        };
        if let Ok(Some(san)) = certificate.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::URI(uri) => {
                        facts.uris.push(uri.to_string());
                        if let Ok(id) = SpiffeId::parse(uri) {
                            facts.spiffe_ids.push(id);
                        }
                    }
                    GeneralName::DNSName(dns) => facts.dns_names.push(dns.to_string()),
                    _ => {}
                }
            }
        }
        Ok(facts)
    }

    /// Reads the first certificate of a PEM chain.
    pub fn from_pem(pem: &str) -> Result<CertificateFacts, IdentityError> {
        let der = first_certificate_der(pem)?;
        CertificateFacts::from_der(&der)
    }

    /// The one SPIFFE ID of a workload certificate.
    pub fn spiffe_id(&self) -> Option<&SpiffeId> {
        match self.spiffe_ids.as_slice() {
            [one] => Some(one),
            _ => None,
        }
    }

    /// When a holder should renew: half-way through the certificate's life.
    pub fn renew_at(&self) -> SystemTime {
        let life = self
            .not_after
            .duration_since(self.not_before)
            .unwrap_or(Duration::ZERO);
        self.not_before + life / 2
    }
}

fn unix(seconds: i64) -> SystemTime {
    match u64::try_from(seconds) {
        Ok(s) => SystemTime::UNIX_EPOCH + Duration::from_secs(s),
        Err(_) => SystemTime::UNIX_EPOCH,
    }
}

/// The DER of the first `CERTIFICATE` block of a PEM text.
pub fn first_certificate_der(pem: &str) -> Result<Vec<u8>, IdentityError> {
    certificates_der(pem)?
        .into_iter()
        .next()
        .ok_or_else(|| IdentityError::Certificate("no CERTIFICATE block".into()))
}

/// The DER of every `CERTIFICATE` block of a PEM text, in order.
pub fn certificates_der(pem: &str) -> Result<Vec<Vec<u8>>, IdentityError> {
    let blocks = x509_parser::pem::Pem::iter_from_buffer(pem.as_bytes())
        .map(|block| {
            block
                .map(|b| (b.label, b.contents))
                .map_err(|e| IdentityError::Certificate(e.to_string()))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(blocks
        .into_iter()
        .filter(|(label, _)| label == "CERTIFICATE")
        .map(|(_, der)| der)
        .collect())
}

/// The node a gRPC call's client certificate names in `trust_domain`
/// (`spiffe://TRUST_DOMAIN/node/ID`): how the control plane's gRPC services (`service`,
/// for the message) know which proxy speaks. No such certificate is `UNAUTHENTICATED`.
pub fn certified_node<T>(
    request: &tonic::Request<T>,
    trust_domain: &str,
    service: &str,
) -> Result<String, tonic::Status> {
    let unauthenticated = |why: &str| {
        tonic::Status::unauthenticated(format!(
            "{why}: {service} needs a client certificate naming spiffe://{trust_domain}/node/NODE_ID \
             (a proxy gets one by joining with a join token)"
        ))
    };
    let certificates = request
        .peer_certs()
        .ok_or_else(|| unauthenticated("no client certificate"))?;
    let leaf = certificates
        .first()
        .ok_or_else(|| unauthenticated("no client certificate"))?;
    let facts = CertificateFacts::from_der(leaf)
        .map_err(|_| unauthenticated("an unreadable client certificate"))?;
    facts
        .spiffe_id()
        .filter(|id| id.trust_domain == trust_domain)
        .and_then(|id| id.node_id().map(str::to_string))
        .ok_or_else(|| unauthenticated("the client certificate names no node of this trust domain"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spiffe_ids_are_parsed_strictly_and_name_nodes() {
        let id = SpiffeId::node("nip.local", "edge-eu-1").unwrap();
        assert_eq!(id.to_string(), "spiffe://nip.local/node/edge-eu-1");
        assert_eq!(id.node_id(), Some("edge-eu-1"));
        assert_eq!(SpiffeId::parse(&id.to_string()).unwrap(), id);
        assert_eq!(
            SpiffeId::control_plane("nip.local").unwrap().node_id(),
            None
        );
        for bad in [
            "http://nip.local/node/a",
            "spiffe://nip.local",
            "spiffe:///node/a",
            "spiffe://NIP.local/node/a",
            "spiffe://nip.local/node/../admin",
            "spiffe://nip.local/node//a",
            "spiffe://nip.local/node/a b",
        ] {
            assert!(SpiffeId::parse(bad).is_err(), "{bad}");
        }
        for bad in ["", "a/b", "..", "x".repeat(129).as_str(), "é"] {
            assert!(SpiffeId::node("nip.local", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_csr_names_the_node_and_proves_the_key() {
        let made = key_and_csr("n1").unwrap();
        assert!(key_and_csr("a/b").is_err());
        assert!(made.key_pem.contains("PRIVATE KEY"));
        assert!(made.csr_pem.contains("CERTIFICATE REQUEST"));
        assert!(!made.csr_pem.contains(made.key_pem.lines().nth(1).unwrap()));
    }
}
