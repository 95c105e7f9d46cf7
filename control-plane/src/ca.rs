//! The control plane's certificate authority: it vouches for each proxy's identity
//! (`spiffe://TRUST_DOMAIN/node/NODE_ID`) with short-lived certificates, and for its own.
//!
//! ```text
//! start: CA dir roots/*.crt+key (made at first start) ─┐
//!        or --ca-cert/--ca-key (an operator's intermediate) ──▶ CertificateAuthority
//! a proxy's CSR (signature checked: it holds the key) + the identity the caller proved
//!        ──sign_csr──▶ leaf (URI SAN = identity, server+client auth, lifetime) + chain
//! ```
//!
//! Trust anchors rotate with an overlap: [`rotate`] adds a new root that signs from then
//! on while the old one stays in the trust bundle (proxies keep trusting certificates it
//! signed, and learn the new root with their next certificate); [`retire`] removes the old
//! root once every certificate it signed has expired. A self-made root's key is a file only
//! its owner may read (0600). The CA never sees a proxy's private key.

use nip_xds::identity::{certificates_der, CertificateFacts, SpiffeId};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose, SanType,
};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

/// How long a workload certificate lives unless asked otherwise (Istio's and Linkerd's
/// default).
pub const DEFAULT_WORKLOAD_LIFETIME: Duration = Duration::from_secs(24 * 3600);

/// The shortest lifetime a certificate may be asked for (tests rotate in seconds).
pub const MIN_LIFETIME: Duration = Duration::from_secs(2);

/// How long a self-made root lives.
const ROOT_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);

/// The file in the CA directory holding the trust bundle (what proxies are given as
/// `control_plane.ca_file`).
pub const TRUST_BUNDLE_FILE: &str = "trust-bundle.pem";

/// Clock skew allowed for: a certificate is valid from a minute before it was made.
const BACKDATE: Duration = Duration::from_secs(60);

/// Why the CA could not start or sign.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: String,
        /// What failed.
        reason: String,
    },
    /// The CA's own certificate or key is unusable.
    #[error("CA: {0}")]
    Invalid(String),
    /// A CSR that is unreadable or whose signature does not verify.
    #[error("csr: {0}")]
    BadCsr(String),
    /// Signing failed.
    #[error("signing failed: {0}")]
    Sign(String),
}

/// Where the CA's key and certificates come from.
#[derive(Debug, Clone)]
pub struct CaOptions {
    /// The trust domain of every identity it signs.
    pub trust_domain: String,
    /// Where self-made roots live (`roots/<created>.crt` and `.key`).
    pub dir: PathBuf,
    /// An operator's intermediate instead of a self-made root.
    pub issuer: Option<IssuerFiles>,
    /// The lifetime of a workload certificate.
    pub workload_lifetime: Duration,
}

/// An intermediate CA an operator gives the control plane.
#[derive(Debug, Clone)]
pub struct IssuerFiles {
    /// PEM: the intermediate's certificate, then the rest of its chain.
    pub cert: PathBuf,
    /// PEM: its private key.
    pub key: PathBuf,
    /// PEM: the roots proxies trust (default: the last certificate of `cert`).
    pub bundle: Option<PathBuf>,
}

/// A certificate the CA signed, with what follows it in a chain.
#[derive(Debug, Clone)]
pub struct Issued {
    /// PEM: the leaf, then the intermediates up to (not including) a root.
    pub chain_pem: String,
    /// When the leaf stops being valid.
    pub not_after: SystemTime,
}

/// A CA certificate with its key, and what follows a leaf it signs in a chain.
struct Signer {
    certificate: rcgen::Certificate,
    key: KeyPair,
    /// PEM: the issuer unless it is a root, and its own chain up to a root.
    intermediates_pem: String,
}

impl Signer {
    fn load(
        certificate_pem: &str,
        key_pem: &str,
        intermediates_pem: String,
    ) -> Result<Signer, CaError> {
        let key = KeyPair::from_pem(key_pem)
            .map_err(|e| invalid(format!("the CA key is not a PKCS#8 key rcgen can use: {e}")))?;
        let facts = CertificateFacts::from_pem(certificate_pem).map_err(invalid)?;
        if facts.public_key_der != key.public_key_der() {
            return Err(invalid("the CA key does not belong to the CA certificate"));
        }
        let certificate = CertificateParams::from_ca_cert_pem(certificate_pem)
            .map_err(invalid)?
            .self_signed(&key)
            .map_err(|e| invalid(format!("the CA key does not fit its certificate: {e}")))?;
        Ok(Signer {
            certificate,
            key,
            intermediates_pem,
        })
    }
}

/// Signs identities for one trust domain.
pub struct CertificateAuthority {
    trust_domain: String,
    /// Signs workload certificates: the newest root, or the operator's intermediate.
    workload: Signer,
    /// Signs the control plane's own certificate: during a root rotation the oldest root
    /// still trusted (every proxy trusts it, including those that have not yet learned the
    /// new root); otherwise the same as `workload`.
    server: Signer,
    bundle_pem: String,
    workload_lifetime: Duration,
}

impl std::fmt::Debug for CertificateAuthority {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CertificateAuthority")
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|e| CaError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn write_key(path: &Path, pem: &str) -> Result<(), CaError> {
    crate::auth::write_private(path, pem).map_err(|e| CaError::File {
        path: path.display().to_string(),
        reason: e.to_string(),
    })
}

fn invalid(e: impl std::fmt::Display) -> CaError {
    CaError::Invalid(e.to_string())
}

/// The self-made roots in `dir/roots`, newest first: (certificate path, key path).
fn roots(dir: &Path) -> Result<Vec<(PathBuf, PathBuf)>, CaError> {
    let roots = dir.join("roots");
    let entries = match std::fs::read_dir(&roots) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(CaError::File {
                path: roots.display().to_string(),
                reason: e.to_string(),
            })
        }
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "crt"))
        .collect();
    // Names are creation times in milliseconds, zero-padded: newest sorts last.
    found.sort();
    found.reverse();
    Ok(found
        .into_iter()
        .map(|crt| {
            let key = crt.with_extension("key");
            (crt, key)
        })
        .collect())
}

/// Makes a new self-signed root for `trust_domain` in `dir/roots`; it signs from now on.
/// Returns its certificate's path.
pub fn rotate(dir: &Path, trust_domain: &str) -> Result<PathBuf, CaError> {
    let key = KeyPair::generate().map_err(invalid)?;
    let mut params = CertificateParams::default();
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "NIP");
    name.push(
        DnType::CommonName,
        format!("NIP root CA for {trust_domain}"),
    );
    params.distinguished_name = name;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let now = SystemTime::now();
    params.not_before = (now - BACKDATE).into();
    params.not_after = (now + ROOT_LIFETIME).into();
    let root = params.self_signed(&key).map_err(invalid)?;
    let created = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let base = dir.join("roots").join(format!("{created:016}"));
    write_key(&base.with_extension("key"), &key.serialize_pem())?;
    let crt = base.with_extension("crt");
    std::fs::write(&crt, root.pem()).map_err(|e| CaError::File {
        path: crt.display().to_string(),
        reason: e.to_string(),
    })?;
    Ok(crt)
}

/// Removes every self-made root but the newest from the trust bundle (run once all
/// certificates the old roots signed have expired: a day after [`rotate`] by default).
/// Returns how many were retired.
pub fn retire(dir: &Path) -> Result<usize, CaError> {
    let all = roots(dir)?;
    let mut retired = 0;
    for (crt, key) in all.iter().skip(1) {
        for path in [crt, key] {
            std::fs::remove_file(path).map_err(|e| CaError::File {
                path: path.display().to_string(),
                reason: e.to_string(),
            })?;
        }
        retired += 1;
    }
    Ok(retired)
}

impl CertificateAuthority {
    /// Loads the CA (making a root at first start when no intermediate is given).
    pub fn open(options: &CaOptions) -> Result<CertificateAuthority, CaError> {
        SpiffeId::control_plane(&options.trust_domain).map_err(invalid)?;
        let (workload, server, bundle_pem) = match &options.issuer {
            Some(files) => {
                let chain = read(&files.cert)?;
                let key = read(&files.key)?;
                let blocks = certificates_der(&chain).map_err(invalid)?;
                let Some(issuer) = blocks.first().map(|der| pem_encode(der)) else {
                    return Err(invalid(format!("{}: no certificate", files.cert.display())));
                };
                let bundle = match &files.bundle {
                    Some(path) => read(path)?,
                    None => blocks.last().map(|der| pem_encode(der)).unwrap_or_default(),
                };
                // What follows a leaf: the intermediate and its chain, without the roots.
                let roots = certificates_der(&bundle).map_err(invalid)?;
                let intermediates: String = blocks
                    .iter()
                    .filter(|der| !roots.contains(der))
                    .map(|der| pem_encode(der))
                    .collect();
                let signer = || Signer::load(&issuer, &key, intermediates.clone());
                (signer()?, signer()?, bundle)
            }
            None => {
                let mut all = roots(&options.dir)?;
                if all.is_empty() {
                    rotate(&options.dir, &options.trust_domain)?;
                    all = roots(&options.dir)?;
                }
                let (Some((newest_crt, newest_key)), Some((oldest_crt, oldest_key))) =
                    (all.first(), all.last())
                else {
                    return Err(invalid("no root could be made"));
                };
                let bundle = all
                    .iter()
                    .map(|(crt, _)| read(crt))
                    .collect::<Result<String, _>>()?;
                let load =
                    |crt: &Path, key: &Path| Signer::load(&read(crt)?, &read(key)?, String::new());
                (
                    load(newest_crt, newest_key)?,
                    load(oldest_crt, oldest_key)?,
                    bundle,
                )
            }
        };
        if certificates_der(&bundle_pem).map_err(invalid)?.is_empty() {
            return Err(invalid("the trust bundle holds no certificate"));
        }
        // The bundle is public: operators hand it to proxies as control_plane.ca_file.
        let bundle_file = options.dir.join(TRUST_BUNDLE_FILE);
        std::fs::create_dir_all(&options.dir)
            .and_then(|()| std::fs::write(&bundle_file, &bundle_pem))
            .map_err(|e| CaError::File {
                path: bundle_file.display().to_string(),
                reason: e.to_string(),
            })?;
        Ok(CertificateAuthority {
            trust_domain: options.trust_domain.clone(),
            workload,
            server,
            bundle_pem,
            workload_lifetime: options.workload_lifetime,
        })
    }

    /// The trust domain it signs for.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// PEM of every root a holder of one of its certificates should trust.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.bundle_pem
    }

    /// The default workload lifetime.
    pub fn workload_lifetime(&self) -> Duration {
        self.workload_lifetime
    }

    /// Signs `csr_pem`'s key for `identity` (whatever the CSR itself asks for), valid for
    /// `lifetime` (default: the workload lifetime).
    pub fn sign_csr(
        &self,
        csr_pem: &str,
        identity: &SpiffeId,
        lifetime: Option<Duration>,
    ) -> Result<Issued, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem)
            .map_err(|e| CaError::BadCsr(e.to_string()))?;
        let lifetime = lifetime.unwrap_or(self.workload_lifetime);
        csr.params = self.leaf_params(identity, &[], &[], lifetime)?;
        let leaf = csr
            .signed_by(&self.workload.certificate, &self.workload.key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        issued(leaf.pem(), &self.workload)
    }

    /// A certificate and its key for the control plane's own TLS (the key is made here and
    /// stays in this process).
    pub fn issue_server(
        &self,
        dns_names: &[String],
        ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<(Issued, String), CaError> {
        let identity = SpiffeId::control_plane(&self.trust_domain).map_err(invalid)?;
        let key = KeyPair::generate().map_err(|e| CaError::Sign(e.to_string()))?;
        let params = self.leaf_params(&identity, dns_names, ips, lifetime)?;
        let leaf = params
            .signed_by(&key, &self.server.certificate, &self.server.key)
            .map_err(|e| CaError::Sign(e.to_string()))?;
        Ok((issued(leaf.pem(), &self.server)?, key.serialize_pem()))
    }

    fn leaf_params(
        &self,
        identity: &SpiffeId,
        dns_names: &[String],
        ips: &[IpAddr],
        lifetime: Duration,
    ) -> Result<CertificateParams, CaError> {
        if identity.trust_domain != self.trust_domain {
            return Err(CaError::Sign(format!(
                "{identity} is not in trust domain {}",
                self.trust_domain
            )));
        }
        let lifetime = lifetime.max(MIN_LIFETIME);
        let mut params = CertificateParams::default();
        let mut name = DistinguishedName::new();
        name.push(
            DnType::CommonName,
            identity
                .node_id()
                .unwrap_or(identity.path.trim_start_matches('/')),
        );
        params.distinguished_name = name;
        let sign = |e: rcgen::Error| CaError::Sign(e.to_string());
        params.subject_alt_names = vec![SanType::URI(
            rcgen::Ia5String::try_from(identity.to_string()).map_err(sign)?,
        )];
        for dns in dns_names {
            params.subject_alt_names.push(SanType::DnsName(
                rcgen::Ia5String::try_from(dns.as_str()).map_err(sign)?,
            ));
        }
        params
            .subject_alt_names
            .extend(ips.iter().map(|ip| SanType::IpAddress(*ip)));
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        // Backdated for clock skew, but by no more than a quarter of the lifetime: holders
        // renew at half of not_before..not_after, which must stay ahead of now.
        let now = SystemTime::now();
        params.not_before = (now - BACKDATE.min(lifetime / 4)).into();
        params.not_after = (now + lifetime).into();
        Ok(params)
    }
}

/// A leaf signed by `signer`, with the chain that follows it.
fn issued(leaf_pem: String, signer: &Signer) -> Result<Issued, CaError> {
    let facts = CertificateFacts::from_pem(&leaf_pem).map_err(invalid)?;
    Ok(Issued {
        chain_pem: format!("{leaf_pem}{}", signer.intermediates_pem),
        not_after: facts.not_after,
    })
}

/// One DER certificate as PEM (LF line endings).
fn pem_encode(der: &[u8]) -> String {
    pem::encode_config(
        &pem::Pem::new("CERTIFICATE", der.to_vec()),
        pem::EncodeConfig::new().set_line_ending(pem::LineEnding::LF),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use nip_xds::identity::key_and_csr;
    use std::process::Command;

    fn options(dir: &Path) -> CaOptions {
        CaOptions {
            trust_domain: "nip.test".into(),
            dir: dir.to_path_buf(),
            issuer: None,
            workload_lifetime: DEFAULT_WORKLOAD_LIFETIME,
        }
    }

    /// `openssl verify` (an independent verifier) of `leaf_chain` against `bundle`.
    fn openssl_verifies(dir: &Path, bundle: &str, chain: &str) -> bool {
        let (bundle_file, chain_file) = (dir.join("bundle.pem"), dir.join("chain.pem"));
        std::fs::write(&bundle_file, bundle).unwrap();
        std::fs::write(&chain_file, chain).unwrap();
        let mut command = Command::new("openssl");
        command
            .args(["verify", "-purpose", "sslclient", "-CAfile"])
            .arg(&bundle_file);
        if chain.matches("BEGIN CERTIFICATE").count() > 1 {
            command.arg("-untrusted").arg(&chain_file);
        }
        command
            .arg(&chain_file)
            .output()
            .expect("openssl")
            .status
            .success()
    }

    fn openssl_text(chain: &str, dir: &Path) -> String {
        let file = dir.join("leaf.pem");
        std::fs::write(&file, chain).unwrap();
        let output = Command::new("openssl")
            .args(["x509", "-noout", "-text", "-in"])
            .arg(&file)
            .output()
            .expect("openssl");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    #[test]
    fn a_self_made_root_signs_node_identities_that_openssl_accepts() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let ca = CertificateAuthority::open(&options(dir.path())).unwrap();
        let (_, key) = &roots(dir.path()).unwrap()[0];
        assert_eq!(
            std::fs::metadata(key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let identity = SpiffeId::node("nip.test", "edge-1").unwrap();
        // The CSR asks for another name: the CA writes the identity it vouches for.
        let csr = key_and_csr("admin").unwrap();
        let issued = ca
            .sign_csr(&csr.csr_pem, &identity, Some(Duration::from_secs(3600)))
            .unwrap();
        assert!(openssl_verifies(
            dir.path(),
            ca.trust_bundle_pem(),
            &issued.chain_pem
        ));
        let text = openssl_text(&issued.chain_pem, dir.path());
        assert!(text.contains("URI:spiffe://nip.test/node/edge-1"), "{text}");
        assert!(!text.contains("node/admin"), "{text}");
        assert!(text.contains("TLS Web Client Authentication"), "{text}");
        let facts = CertificateFacts::from_pem(&issued.chain_pem).unwrap();
        let life = facts.not_after.duration_since(facts.not_before).unwrap();
        assert_eq!(life, Duration::from_secs(3600) + BACKDATE);
        // A short-lived certificate is backdated by a quarter of its life at most, so its
        // half-life lies ahead.
        let short = ca
            .sign_csr(&csr.csr_pem, &identity, Some(Duration::from_secs(8)))
            .unwrap();
        let facts = CertificateFacts::from_pem(&short.chain_pem).unwrap();
        assert!(facts.renew_at() > SystemTime::now(), "{facts:?}");
        // Reopening uses the same root.
        let again = CertificateAuthority::open(&options(dir.path())).unwrap();
        assert_eq!(again.trust_bundle_pem(), ca.trust_bundle_pem());
        // Another trust domain or a tampered CSR is refused.
        let elsewhere = SpiffeId::node("other.test", "edge-1").unwrap();
        assert!(ca.sign_csr(&csr.csr_pem, &elsewhere, None).is_err());
        // One bit of the signed body changed: the signature no longer verifies.
        let mut lines: Vec<String> = csr.csr_pem.lines().map(str::to_string).collect();
        let middle = &mut lines[2];
        let flipped = if middle.starts_with('A') { "B" } else { "A" };
        middle.replace_range(0..1, flipped);
        let tampered = lines.join("\n");
        assert!(matches!(
            ca.sign_csr(&tampered, &identity, None),
            Err(CaError::BadCsr(_))
        ));
    }

    #[test]
    fn a_rotated_root_signs_while_the_old_one_stays_trusted_until_retired() {
        let dir = tempfile::tempdir().unwrap();
        let old_ca = CertificateAuthority::open(&options(dir.path())).unwrap();
        let identity = SpiffeId::node("nip.test", "n").unwrap();
        let csr = key_and_csr("n").unwrap().csr_pem;
        let old_leaf = old_ca.sign_csr(&csr, &identity, None).unwrap().chain_pem;
        std::thread::sleep(Duration::from_millis(2));
        rotate(dir.path(), "nip.test").unwrap();
        let new_ca = CertificateAuthority::open(&options(dir.path())).unwrap();
        let new_leaf = new_ca.sign_csr(&csr, &identity, None).unwrap().chain_pem;
        let overlap = new_ca.trust_bundle_pem();
        assert_eq!(overlap.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(openssl_verifies(dir.path(), overlap, &old_leaf));
        assert!(openssl_verifies(dir.path(), overlap, &new_leaf));
        assert!(!openssl_verifies(
            dir.path(),
            old_ca.trust_bundle_pem(),
            &new_leaf
        ));
        assert_eq!(retire(dir.path()).unwrap(), 1);
        let retired = CertificateAuthority::open(&options(dir.path())).unwrap();
        assert!(openssl_verifies(
            dir.path(),
            retired.trust_bundle_pem(),
            &new_leaf
        ));
        assert!(!openssl_verifies(
            dir.path(),
            retired.trust_bundle_pem(),
            &old_leaf
        ));
    }

    #[test]
    fn an_operators_intermediate_made_with_openssl_signs_with_its_chain() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let run = |args: &[&str]| {
            let output = Command::new("openssl")
                .current_dir(d)
                .args(args)
                .output()
                .expect("openssl");
            assert!(
                output.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&output.stderr)
            );
        };
        std::fs::write(
            d.join("ext.cnf"),
            "[v3_ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n",
        )
        .unwrap();
        run(&[
            "ecparam",
            "-name",
            "prime256v1",
            "-genkey",
            "-noout",
            "-out",
            "root.key",
        ]);
        run(&[
            "req",
            "-x509",
            "-new",
            "-key",
            "root.key",
            "-subj",
            "/CN=Org Root",
            "-days",
            "30",
            "-out",
            "root.crt",
        ]);
        run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "int.key",
        ]);
        run(&[
            "req",
            "-new",
            "-key",
            "int.key",
            "-subj",
            "/CN=NIP intermediate",
            "-out",
            "int.csr",
        ]);
        run(&[
            "x509",
            "-req",
            "-in",
            "int.csr",
            "-CA",
            "root.crt",
            "-CAkey",
            "root.key",
            "-CAcreateserial",
            "-days",
            "30",
            "-extfile",
            "ext.cnf",
            "-extensions",
            "v3_ca",
            "-out",
            "int.crt",
        ]);
        let chain = format!(
            "{}{}",
            std::fs::read_to_string(d.join("int.crt")).unwrap(),
            std::fs::read_to_string(d.join("root.crt")).unwrap()
        );
        std::fs::write(d.join("chain.crt"), chain).unwrap();
        let ca = CertificateAuthority::open(&CaOptions {
            issuer: Some(IssuerFiles {
                cert: d.join("chain.crt"),
                key: d.join("int.key"),
                bundle: None,
            }),
            ..options(&d.join("unused"))
        })
        .unwrap();
        assert!(ca.trust_bundle_pem().contains("BEGIN CERTIFICATE"));
        assert!(!d.join("unused/roots").exists(), "no root of its own");
        assert_eq!(
            std::fs::read_to_string(d.join("unused").join(TRUST_BUNDLE_FILE)).unwrap(),
            ca.trust_bundle_pem()
        );
        let identity = SpiffeId::node("nip.test", "n").unwrap();
        let csr = key_and_csr("n").unwrap().csr_pem;
        let issued = ca.sign_csr(&csr, &identity, None).unwrap();
        assert_eq!(
            issued.chain_pem.matches("BEGIN CERTIFICATE").count(),
            2,
            "leaf + intermediate"
        );
        let root = std::fs::read_to_string(d.join("root.crt")).unwrap();
        assert!(openssl_verifies(d, &root, &issued.chain_pem));
        // A key that is not the intermediate's is refused at open.
        run(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            "other.key",
        ]);
        let wrong = CertificateAuthority::open(&CaOptions {
            issuer: Some(IssuerFiles {
                cert: d.join("chain.crt"),
                key: d.join("other.key"),
                bundle: None,
            }),
            ..options(&d.join("unused"))
        });
        assert!(
            wrong.unwrap_err().to_string().contains("does not belong"),
            "refused for the right reason"
        );
    }
}
