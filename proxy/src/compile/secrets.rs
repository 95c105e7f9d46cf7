//! TLS material of listeners and clusters: where each certificate and set of roots comes
//! from, as Envoy's `CommonTlsContext` says — files named inline, or secrets named over SDS
//! (`tls_certificate_sds_secret_configs`, `validation_context_sds_secret_config`,
//! `combined_validation_context`) — and, in a proxy, that material found and read.
//!
//! ```text
//! CommonTlsContext ──tls_context()──▶ TlsContextRefs (pure: names and files)
//!        prepare (a proxy) ──SecretSource──▶ "default": the workload identity
//!                                            other names: the set's Secret resources
//!                                            files: read here
//! ```

use crate::identity::WorkloadIdentity;
use envoy_types::pb::envoy::config::core::v3::{data_source, DataSource};
use envoy_types::pb::envoy::extensions::transport_sockets::tls::v3::{
    common_tls_context::ValidationContextType, secret, CommonTlsContext, Secret,
    SubjectAltNameMatcher,
};
use nip_xds::secrets::WORKLOAD_CERTIFICATE;
use std::sync::Arc;

/// Where a certificate and its key come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertificateRef {
    /// PEM files named in the resource.
    Files {
        /// The certificate chain file.
        chain: String,
        /// The private key file.
        key: String,
    },
    /// An SDS secret by name (`default`: the proxy's workload certificate).
    Secret(String),
}

/// Where a set of trusted roots comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TrustRef {
    /// A PEM file named in the resource (`trusted_ca.filename`).
    File(String),
    /// An SDS secret holding a validation context (`ROOTCA`: the mesh's trust bundle).
    Secret(String),
}

/// What a `CommonTlsContext` refers to.
#[derive(Debug, Clone, Default)]
pub(super) struct TlsContextRefs {
    /// The certificates to present, in order.
    pub certificates: Vec<CertificateRef>,
    /// The roots peers must chain to.
    pub trust: Option<TrustRef>,
    /// Names the peer's certificate must carry (`match_typed_subject_alt_names`).
    pub san_matchers: Vec<SubjectAltNameMatcher>,
}

fn filename(source: &Option<DataSource>, field: &str) -> Result<String, String> {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::Filename(f)) => Ok(f.clone()),
        _ => Err(format!("{field} must be a filename")),
    }
}

/// Reads what a `CommonTlsContext` refers to; the fields NIP does not implement are refused
/// by the coverage check before this runs.
pub(super) fn tls_context(common: &CommonTlsContext) -> Result<TlsContextRefs, String> {
    if !common.tls_certificates.is_empty() && !common.tls_certificate_sds_secret_configs.is_empty()
    {
        return Err(
            "tls_certificates and tls_certificate_sds_secret_configs: set one of them".into(),
        );
    }
    let mut refs = TlsContextRefs::default();
    for (i, certificate) in common.tls_certificates.iter().enumerate() {
        refs.certificates.push(CertificateRef::Files {
            chain: filename(
                &certificate.certificate_chain,
                &format!("tls_certificates[{i}].certificate_chain"),
            )?,
            key: filename(
                &certificate.private_key,
                &format!("tls_certificates[{i}].private_key"),
            )?,
        });
    }
    for (i, sds) in common.tls_certificate_sds_secret_configs.iter().enumerate() {
        if sds.name.is_empty() {
            return Err(format!(
                "tls_certificate_sds_secret_configs[{i}].name is empty"
            ));
        }
        refs.certificates
            .push(CertificateRef::Secret(sds.name.clone()));
    }
    match &common.validation_context_type {
        None => {}
        Some(ValidationContextType::ValidationContext(validation)) => {
            if validation.trusted_ca.is_some() {
                refs.trust = Some(TrustRef::File(filename(
                    &validation.trusted_ca,
                    "validation_context.trusted_ca",
                )?));
            }
            refs.san_matchers = validation.match_typed_subject_alt_names.clone();
        }
        Some(ValidationContextType::ValidationContextSdsSecretConfig(sds)) => {
            if sds.name.is_empty() {
                return Err("validation_context_sds_secret_config.name is empty".into());
            }
            refs.trust = Some(TrustRef::Secret(sds.name.clone()));
        }
        Some(ValidationContextType::CombinedValidationContext(combined)) => {
            let Some(sds) = &combined.validation_context_sds_secret_config else {
                return Err(
                    "combined_validation_context.validation_context_sds_secret_config is missing"
                        .into(),
                );
            };
            let default = combined
                .default_validation_context
                .clone()
                .unwrap_or_default();
            if default.trusted_ca.is_some() {
                return Err("combined_validation_context.default_validation_context.trusted_ca: the roots come from the secret".into());
            }
            refs.trust = Some(TrustRef::Secret(sds.name.clone()));
            refs.san_matchers = default.match_typed_subject_alt_names;
        }
        Some(_) => return Err("this kind of validation context is not supported".into()),
    }
    Ok(refs)
}

/// A certificate and key, or the roots, as PEM text with where they came from.
#[derive(Debug, Clone)]
pub(super) enum Material {
    /// A certificate chain and its key.
    Certificate {
        /// Where it came from, for messages.
        origin: String,
        /// The chain.
        chain: String,
        /// The key.
        key: String,
    },
    /// The proxy's workload certificate (follows renewals).
    Workload(Arc<WorkloadIdentity>),
}

/// What a proxy resolves secret names and files with.
pub(super) struct SecretSource<'a> {
    /// The Secret resources of the set.
    pub secrets: &'a [Secret],
    /// The proxy's workload identity, when it has one.
    pub identity: Option<&'a Arc<WorkloadIdentity>>,
}

fn read(path: &str, what: &str) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("{what} {path:?}: {e}"))
}

fn text(source: &Option<DataSource>, what: &str) -> Result<String, String> {
    match source.as_ref().and_then(|s| s.specifier.as_ref()) {
        Some(data_source::Specifier::Filename(f)) => read(f, what),
        Some(data_source::Specifier::InlineString(s)) => Ok(s.clone()),
        Some(data_source::Specifier::InlineBytes(b)) => {
            String::from_utf8(b.clone()).map_err(|_| format!("{what}: not PEM text"))
        }
        _ => Err(format!("{what} is missing")),
    }
}

impl SecretSource<'_> {
    fn secret(&self, name: &str) -> Result<&Secret, String> {
        self.secrets
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("secret {name:?} was not received over SDS"))
    }

    /// The certificate `reference` names.
    pub fn certificate(&self, reference: &CertificateRef) -> Result<Material, String> {
        match reference {
            CertificateRef::Files { chain, key } => Ok(Material::Certificate {
                origin: format!("certificate_chain {chain:?}"),
                chain: read(chain, "certificate_chain")?,
                key: read(key, "private_key")?,
            }),
            CertificateRef::Secret(name) if name == WORKLOAD_CERTIFICATE => {
                match self.identity {
                    Some(identity) => Ok(Material::Workload(Arc::clone(identity))),
                    None => Err(format!(
                        "secret {name:?} is the proxy's workload certificate, and this proxy has none (control_plane.ca_file makes it join the mesh)"
                    )),
                }
            }
            CertificateRef::Secret(name) => match &self.secret(name)?.r#type {
                Some(secret::Type::TlsCertificate(certificate)) => {
                    let origin = format!("secret {name:?}");
                    Ok(Material::Certificate {
                        chain: text(
                            &certificate.certificate_chain,
                            &format!("{origin} certificate_chain"),
                        )?,
                        key: text(&certificate.private_key, &format!("{origin} private_key"))?,
                        origin,
                    })
                }
                _ => Err(format!("secret {name:?} is not a tls_certificate")),
            },
        }
    }

    /// The roots `reference` names: (origin, PEM).
    pub fn trust(&self, reference: &TrustRef) -> Result<(String, String), String> {
        match reference {
            TrustRef::File(path) => Ok((format!("trusted_ca {path:?}"), read(path, "trusted_ca")?)),
            TrustRef::Secret(name) => match &self.secret(name)?.r#type {
                Some(secret::Type::ValidationContext(validation)) => {
                    let origin = format!("secret {name:?}");
                    let pem = text(&validation.trusted_ca, &format!("{origin} trusted_ca"))?;
                    Ok((origin, pem))
                }
                _ => Err(format!("secret {name:?} is not a validation_context")),
            },
        }
    }
}
