//! Built-in private CA: `init_ca` makes `DIR/ca.crt` + `DIR/ca.key`, `issue_server` and
//! `issue_client` sign leaves (`PREFIX.crt` holds the leaf only, `PREFIX.key` its key).
//!
//! Client identity is the CN (or a SPIFFE URI SAN); groups are one OU attribute each.
//! Private keys are created with mode 0600 from the first byte, and every file is written
//! to a temporary name then renamed, so a reloading listener never reads half a file.

use std::fmt;
use std::fs::{DirBuilder, OpenOptions};
use std::io::Write;
use std::net::IpAddr;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SerialNumber, SigningKey,
};
use ring::rand::SecureRandom;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;
use x509_parser::extensions::GeneralName;

use crate::{cert_fingerprint_sha256, fmt_time, unix_to_system_time};

/// Default lifetime of a server certificate: 90 days.
pub const DEFAULT_SERVER_TTL: Duration = Duration::from_secs(90 * 24 * 3600);
/// Default lifetime of a client certificate: 12 hours.
pub const DEFAULT_CLIENT_TTL: Duration = Duration::from_secs(12 * 3600);
const CA_TTL: Duration = Duration::from_secs(3650 * 24 * 3600);
/// Allowance for clocks that run behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(60);
/// X.520 upper bound for CN and OU values.
const MAX_NAME_LEN: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("{} already exists; refusing to overwrite a CA key (move it away or use another --dir)", path.display())]
    CaKeyExists { path: PathBuf },
    #[error("{action} {}: {source}", path.display())]
    Io {
        action: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} is not a usable CA: {reason}", dir.display())]
    BadCa { dir: PathBuf, reason: String },
    #[error("invalid certificate request: {0}")]
    InvalidSpec(String),
    #[error(
        "invalid TTL {input:?}: expected a number followed by s, m, h or d (e.g. 30m, 12h, 7d)"
    )]
    InvalidTtl { input: String },
    #[error("cannot parse certificate {}: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
}

/// Files written by an init or issue.
#[derive(Clone, Debug)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

#[derive(Clone, Debug)]
pub struct ServerCertSpec {
    pub dns: Vec<String>,
    pub ips: Vec<IpAddr>,
    pub ttl: Duration,
    /// None = now minus one minute.
    pub not_before: Option<SystemTime>,
}

#[derive(Clone, Debug)]
pub struct ClientCertSpec {
    /// Becomes the CN.
    pub name: String,
    /// Optional `spiffe://...` URI SAN.
    pub spiffe: Option<String>,
    /// One OU attribute each.
    pub groups: Vec<String>,
    pub ttl: Duration,
    /// None = now minus one minute.
    pub not_before: Option<SystemTime>,
}

/// Parse "90s", "30m", "12h" or "7d".
pub fn parse_ttl(s: &str) -> Result<Duration, PkiError> {
    let err = || PkiError::InvalidTtl {
        input: s.to_string(),
    };
    let s = s.trim();
    let unit = s.chars().last().ok_or_else(err)?;
    let secs_per = match unit {
        's' => 1,
        'm' => 60,
        'h' => 3600,
        'd' => 86_400,
        _ => return Err(err()),
    };
    let n: u64 = s[..s.len() - 1].parse().map_err(|_| err())?;
    if n == 0 {
        return Err(err());
    }
    n.checked_mul(secs_per)
        .map(Duration::from_secs)
        .ok_or_else(err)
}

/// Create a new CA in `dir`: `ca.crt` (0644) and `ca.key` (0600), ECDSA P-256, 10 years.
pub fn init_ca(dir: &Path, common_name: &str) -> Result<IssuedFiles, PkiError> {
    check_name("CA common name", common_name)?;
    if !dir.exists() {
        DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|source| PkiError::Io {
                action: "cannot create directory",
                path: dir.to_path_buf(),
                source,
            })?;
    }
    let files = IssuedFiles {
        cert: dir.join("ca.crt"),
        key: dir.join("ca.key"),
    };
    if files.key.exists() {
        return Err(PkiError::CaKeyExists { path: files.key });
    }

    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    set_validity(&mut params, None, CA_TTL)?;
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key)?;

    // create_new makes the existence check race-free: a concurrent init cannot clobber us.
    write_new(&files.key, key.serialize_pem().as_bytes(), 0o600, true)?;
    write_new(&files.cert, cert.pem().as_bytes(), 0o644, false)?;
    Ok(files)
}

/// Issue a server certificate (EKU serverAuth, SANs from dns + ips, CN = first name).
pub fn issue_server(
    ca_dir: &Path,
    spec: &ServerCertSpec,
    out_prefix: &Path,
) -> Result<IssuedFiles, PkiError> {
    let cn = spec
        .dns
        .first()
        .cloned()
        .or_else(|| spec.ips.first().map(|ip| ip.to_string()))
        .ok_or_else(|| {
            PkiError::InvalidSpec("a server certificate needs at least one DNS name or IP".into())
        })?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, cn);
    for dns in &spec.dns {
        let name = rcgen::string::Ia5String::try_from(dns.clone())
            .map_err(|_| PkiError::InvalidSpec(format!("DNS name {dns:?} is not ASCII")))?;
        params.subject_alt_names.push(SanType::DnsName(name));
    }
    for ip in &spec.ips {
        params.subject_alt_names.push(SanType::IpAddress(*ip));
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let ca = Ca::load(ca_dir)?;
    ca.issue(params, spec.not_before, spec.ttl, &[], out_prefix)
}

/// Issue a client certificate (EKU clientAuth, CN = name, one OU per group, optional SPIFFE URI).
pub fn issue_client(
    ca_dir: &Path,
    spec: &ClientCertSpec,
    out_prefix: &Path,
) -> Result<IssuedFiles, PkiError> {
    check_name("client name", &spec.name)?;
    for group in &spec.groups {
        check_name("group", group)?;
    }
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, spec.name.as_str());
    if let Some(uri) = &spec.spiffe {
        if !uri.starts_with("spiffe://") || uri.len() <= "spiffe://".len() {
            return Err(PkiError::InvalidSpec(format!(
                "SPIFFE ID {uri:?} must look like spiffe://trust-domain/path"
            )));
        }
        let uri = rcgen::string::Ia5String::try_from(uri.clone())
            .map_err(|_| PkiError::InvalidSpec(format!("SPIFFE ID {uri:?} is not ASCII")))?;
        params.subject_alt_names.push(SanType::URI(uri));
    }
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let ca = Ca::load(ca_dir)?;
    ca.issue(params, spec.not_before, spec.ttl, &spec.groups, out_prefix)
}

/// A certificate revocation list signed by the CA in `ca_dir`, revoking the certificates in
/// `revoked` (PEM files it issued), valid for `valid_for`; written to `out` as PEM. What
/// `server.client_crl` reads (as it reads a CRL from any other CA).
pub fn issue_crl(
    ca_dir: &Path,
    revoked: &[&Path],
    valid_for: Duration,
    out: &Path,
) -> Result<PathBuf, PkiError> {
    let ca = Ca::load(ca_dir)?;
    let now = SystemTime::now();
    let mut revoked_certs = Vec::with_capacity(revoked.len());
    for path in revoked {
        let pem = read_string(path)?;
        let bad = |reason: String| PkiError::BadCertificate {
            path: path.to_path_buf(),
            reason,
        };
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
        revoked_certs.push(rcgen::RevokedCertParams {
            serial_number: SerialNumber::from_slice(cert.raw_serial()),
            revocation_time: time::OffsetDateTime::from(now),
            reason_code: None,
            invalidity_date: None,
        });
    }
    let params = rcgen::CertificateRevocationListParams {
        this_update: time::OffsetDateTime::from(now - CLOCK_SKEW),
        next_update: time::OffsetDateTime::from(now + valid_for),
        crl_number: random_serial()?,
        issuing_distribution_point: None,
        revoked_certs,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(&ca.issuer)?;
    write_replace(out, crl.pem()?.as_bytes(), 0o644)?;
    Ok(out.to_path_buf())
}

/// Add the certificates in `revoked` (PEM files issued by the CA in `ca_dir`) to the CRL at
/// `crl` (created if missing; the certificates it already revokes stay revoked) and re-sign it,
/// valid for `valid_for`. Returns how many certificates the CRL revokes now.
pub fn revoke(
    ca_dir: &Path,
    revoked: &[&Path],
    valid_for: Duration,
    crl: &Path,
) -> Result<usize, PkiError> {
    let ca = Ca::load(ca_dir)?;
    let ca_pem = read_string(&ca_dir.join("ca.crt"))?;
    let ca_der =
        CertificateDer::from_pem_slice(ca_pem.as_bytes()).map_err(|e| PkiError::BadCa {
            dir: ca_dir.to_path_buf(),
            reason: e.to_string(),
        })?;
    let ca_subject = x509_parser::parse_x509_certificate(&ca_der)
        .map_err(|e| PkiError::BadCa {
            dir: ca_dir.to_path_buf(),
            reason: e.to_string(),
        })?
        .1
        .subject()
        .as_raw()
        .to_vec();
    let now = SystemTime::now();
    let mut entries: Vec<rcgen::RevokedCertParams> = Vec::new();
    if crl.exists() {
        let bad = |reason: String| PkiError::BadCertificate {
            path: crl.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(crl).map_err(|source| PkiError::Io {
            action: "cannot read",
            path: crl.to_path_buf(),
            source,
        })?;
        let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(&bytes)
            .map(|d| d.as_ref().to_vec())
            .unwrap_or(bytes);
        let (_, existing) =
            x509_parser::parse_x509_crl(&der).map_err(|e| bad(format!("not a CRL: {e}")))?;
        if existing.issuer().as_raw() != ca_subject.as_slice() {
            return Err(bad(format!(
                "issued by {}, not by this CA",
                existing.issuer()
            )));
        }
        for r in existing.iter_revoked_certificates() {
            entries.push(rcgen::RevokedCertParams {
                serial_number: SerialNumber::from_slice(r.raw_serial()),
                revocation_time: time::OffsetDateTime::from(unix_to_system_time(
                    r.revocation_date.timestamp(),
                )),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    for path in revoked {
        let pem = read_string(path)?;
        let bad = |reason: String| PkiError::BadCertificate {
            path: path.to_path_buf(),
            reason,
        };
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| bad(e.to_string()))?;
        let (_, cert) =
            x509_parser::parse_x509_certificate(&der).map_err(|e| bad(e.to_string()))?;
        if cert.issuer().as_raw() != ca_subject.as_slice() {
            return Err(bad(format!("issued by {}, not by this CA", cert.issuer())));
        }
        let serial = SerialNumber::from_slice(cert.raw_serial());
        if !entries.iter().any(|e| e.serial_number == serial) {
            entries.push(rcgen::RevokedCertParams {
                serial_number: serial,
                revocation_time: time::OffsetDateTime::from(now),
                reason_code: None,
                invalidity_date: None,
            });
        }
    }
    let count = entries.len();
    let params = rcgen::CertificateRevocationListParams {
        this_update: time::OffsetDateTime::from(now - CLOCK_SKEW),
        next_update: time::OffsetDateTime::from(now + valid_for),
        crl_number: random_serial()?,
        issuing_distribution_point: None,
        revoked_certs: entries,
        key_identifier_method: rcgen::KeyIdMethod::Sha256,
    };
    let signed = params.signed_by(&ca.issuer)?;
    write_replace(crl, signed.pem()?.as_bytes(), 0o644)?;
    Ok(count)
}

struct Ca {
    dir: PathBuf,
    issuer: Issuer<'static, KeyPair>,
    not_after: SystemTime,
}

impl Ca {
    fn load(dir: &Path) -> Result<Self, PkiError> {
        Self::load_files(dir, &dir.join("ca.crt"), &dir.join("ca.key"))
    }

    /// `dir` only names the CA in errors.
    fn load_files(dir: &Path, cert_path: &Path, key_path: &Path) -> Result<Self, PkiError> {
        let bad = |reason: String| PkiError::BadCa {
            dir: dir.to_path_buf(),
            reason,
        };
        let cert_pem = read_string(cert_path)?;
        let key_pem = read_string(key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| bad(format!("cannot parse {}: {e}", key_path.display())))?;
        let der = CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| bad(format!("cannot parse {}: {e}", cert_path.display())))?;
        let (_, parsed) = x509_parser::parse_x509_certificate(&der)
            .map_err(|e| bad(format!("cannot parse {}: {e}", cert_path.display())))?;
        if !parsed.is_ca() {
            return Err(bad(format!(
                "{} is not a CA certificate",
                cert_path.display()
            )));
        }
        if parsed.tbs_certificate.subject_pki.raw != key.subject_public_key_info().as_slice() {
            return Err(bad(format!(
                "{} does not match {}",
                key_path.display(),
                cert_path.display()
            )));
        }
        let not_after = unix_to_system_time(parsed.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&der, key)
            .map_err(|e| bad(format!("cannot use {}: {e}", cert_path.display())))?;
        Ok(Self {
            dir: dir.to_path_buf(),
            issuer,
            not_after,
        })
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        not_before: Option<SystemTime>,
        ttl: Duration,
        groups: &[String],
        out_prefix: &Path,
    ) -> Result<IssuedFiles, PkiError> {
        let not_after = set_validity(&mut params, not_before, ttl)?;
        if not_after > self.not_after {
            return Err(PkiError::InvalidSpec(format!(
                "certificate would outlive the CA in {} (CA expires {}); use a shorter TTL",
                self.dir.display(),
                fmt_time(self.not_after)
            )));
        }
        params.serial_number = Some(random_serial()?);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
        let cert = params.signed_by(&key, &self.issuer)?;
        let der = if groups.is_empty() {
            cert.der().to_vec()
        } else {
            // rcgen's DistinguishedName holds one value per attribute type; write the
            // subject ourselves so each group gets its own OU and re-sign.
            let cn = match params.distinguished_name.get(&DnType::CommonName) {
                Some(rcgen::DnValue::Utf8String(s)) => s.clone(),
                _ => {
                    return Err(PkiError::InvalidSpec(
                        "client certificate needs a CN".into(),
                    ))
                }
            };
            resign_with_subject(cert.der(), &subject_der(groups, &cn), self.issuer.key())?
        };
        let files = IssuedFiles {
            cert: with_ext(out_prefix, "crt"),
            key: with_ext(out_prefix, "key"),
        };
        if let Some(parent) = files.cert.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|source| PkiError::Io {
                action: "cannot create directory",
                path: parent.to_path_buf(),
                source,
            })?;
        }
        let pem = CertificateDer::from(der);
        write_replace(&files.key, key.serialize_pem().as_bytes(), 0o600)?;
        write_replace(&files.cert, pem_encode(&pem).as_bytes(), 0o644)?;
        Ok(files)
    }
}

/// The URI SAN prefix of a replica's certificate (followed by the replica id).
pub const REPLICA_URI_PREFIX: &str = "urn:tollgate:replica:";
const REPLICA_CN: &str = "tollgate replica";
/// Clock skew a replica certificate tolerates between hosts.
const REPLICA_SKEW: Duration = Duration::from_secs(60);

/// The CA the gateway issues client certificates with (`server.issuing_ca_cert`/`_key`), for
/// `POST /api/v1/certificates`: the gateway's client CA itself or an intermediate signed by it.
pub struct IssuingCa {
    ca: Ca,
    cert_der: Vec<u8>,
    cert_pem: String,
}

/// A certificate issued from a CSR.
#[derive(Clone, Debug)]
pub struct IssuedCert {
    /// The leaf, PEM.
    pub pem: String,
    pub serial_hex: String,
    pub not_after: SystemTime,
}

impl IssuingCa {
    /// Read the CA certificate and its key (a CA certificate whose public key matches the key).
    pub fn load(cert: &Path, key: &Path) -> Result<IssuingCa, PkiError> {
        let ca = Ca::load_files(cert, cert, key)?;
        let pem = read_string(cert)?;
        let der = CertificateDer::from_pem_slice(pem.as_bytes()).map_err(|e| {
            PkiError::BadCertificate {
                path: cert.to_path_buf(),
                reason: e.to_string(),
            }
        })?;
        Ok(IssuingCa {
            ca,
            cert_pem: pem_encode(&der),
            cert_der: der.to_vec(),
        })
    }

    /// The issuing CA certificate (PEM): the chain a client presents after its leaf.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    pub fn not_after(&self) -> SystemTime {
        self.ca.not_after
    }

    /// Whether certificates issued here chain to the CA bundle `client_ca` (PEM): the issuing
    /// CA is one of its certificates, or is signed by one. `Err` says why not.
    pub fn check_chains_to(&self, client_ca: &Path) -> Result<(), String> {
        match signed_by_bundle(&self.cert_der, client_ca)? {
            true => Ok(()),
            false => Err(format!(
                "the issuing CA ({}) is neither a certificate of server.client_ca ({}) nor signed by one, so the gateway would refuse the certificates it issues",
                subject_of(&self.cert_der),
                client_ca.display()
            )),
        }
    }

    /// A fresh key and a short-lived certificate (`ttl`) naming replica `id` (CN
    /// `tollgate replica`, URI SAN [`REPLICA_URI_PREFIX`]`id`), for one replica's connection to
    /// another: (certificate PEM, key PEM). Sign-ins never get a URI SAN from this CA, so no
    /// user can hold such a certificate.
    pub fn issue_replica(&self, id: &str, ttl: Duration) -> Result<(String, String), PkiError> {
        let (key_pem, csr_pem) = key_and_csr(REPLICA_CN)?;
        let now = SystemTime::now();
        let spec = ClientCertSpec {
            name: REPLICA_CN.into(),
            spiffe: Some(format!("{REPLICA_URI_PREFIX}{id}")),
            groups: Vec::new(),
            ttl: ttl + REPLICA_SKEW,
            not_before: Some(now - REPLICA_SKEW),
        };
        Ok((self.issue_for_csr(&csr_pem, &spec)?.pem, key_pem))
    }

    /// The replica id a client certificate (DER leaf) names, if this CA signed it for a
    /// replica ([`IssuingCa::issue_replica`]); `None` for any other certificate.
    pub fn replica_of(&self, leaf: &[u8]) -> Option<String> {
        let (_, me) = x509_parser::parse_x509_certificate(&self.cert_der).ok()?;
        let (_, cert) = x509_parser::parse_x509_certificate(leaf).ok()?;
        if cert.issuer() != me.subject() || cert.verify_signature(Some(me.public_key())).is_err() {
            return None;
        }
        let san = cert.subject_alternative_name().ok()??;
        san.value.general_names.iter().find_map(|n| match n {
            GeneralName::URI(u) => u.strip_prefix(REPLICA_URI_PREFIX).map(str::to_string),
            _ => None,
        })
    }

    /// Issue a client certificate (EKU clientAuth, CN = `spec.name`, one OU per group, optional
    /// SPIFFE URI SAN) for the public key of `csr_pem`, a PKCS#10 request whose self-signature
    /// is checked; whatever subject or extensions the request asks for are ignored.
    pub fn issue_for_csr(
        &self,
        csr_pem: &str,
        spec: &ClientCertSpec,
    ) -> Result<IssuedCert, PkiError> {
        let bad = |m: String| PkiError::InvalidSpec(m);
        let der =
            rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
                .map_err(|e| bad(format!("the CSR is not a PEM CERTIFICATE REQUEST: {e}")))?;
        let (_, csr) = <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(der.as_ref())
            .map_err(|e| bad(format!("the CSR is not a valid PKCS#10 request: {e}")))?;
        csr.verify_signature().map_err(|_| {
            bad("the CSR's signature does not verify with its own public key".into())
        })?;
        let spki =
            rcgen::SubjectPublicKeyInfo::from_der(csr.certification_request_info.subject_pki.raw)
                .map_err(|e| bad(format!("the CSR's public key is not usable: {e}")))?;

        check_name("client name", &spec.name)?;
        for group in &spec.groups {
            check_name("group", group)?;
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, spec.name.as_str());
        if let Some(uri) = &spec.spiffe {
            let uri = rcgen::string::Ia5String::try_from(uri.clone())
                .map_err(|_| PkiError::InvalidSpec(format!("URI {uri:?} is not ASCII")))?;
            params.subject_alt_names.push(SanType::URI(uri));
        }
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let not_after = set_validity(&mut params, spec.not_before, spec.ttl)?;
        if not_after > self.ca.not_after {
            return Err(PkiError::InvalidSpec(format!(
                "certificate would outlive the issuing CA (expires {})",
                fmt_time(self.ca.not_after)
            )));
        }
        let serial = random_serial()?;
        let serial_hex = hex::encode(serial.as_ref());
        params.serial_number = Some(serial);
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&spki, &self.ca.issuer)?;
        let der = if spec.groups.is_empty() {
            cert.der().to_vec()
        } else {
            resign_with_subject(
                cert.der(),
                &subject_der(&spec.groups, &spec.name),
                self.ca.issuer.key(),
            )?
        };
        Ok(IssuedCert {
            pem: pem_encode(&CertificateDer::from(der)),
            serial_hex,
            not_after,
        })
    }
}

/// Whether certificate `der` is one of the CA bundle's certificates (PEM file `bundle`) or is
/// signed by one of them; `Err` if the bundle or the certificate cannot be read.
pub fn signed_by_bundle(der: &[u8], bundle: &Path) -> Result<bool, String> {
    let pem =
        std::fs::read(bundle).map_err(|e| format!("cannot read {}: {e}", bundle.display()))?;
    let roots: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot parse {}: {e}", bundle.display()))?;
    let (_, me) = x509_parser::parse_x509_certificate(der)
        .map_err(|e| format!("cannot parse the certificate: {e}"))?;
    Ok(roots.iter().any(|root| {
        root.as_ref() == der
            || x509_parser::parse_x509_certificate(root).is_ok_and(|(_, r)| {
                r.subject() == me.issuer() && me.verify_signature(Some(r.public_key())).is_ok()
            })
    }))
}

/// Whether the certificate chain file `chain` (PEM, leaf first) reaches the CA bundle `bundle`:
/// one of its certificates is in the bundle or signed by one of the bundle's.
pub fn chain_reaches_bundle(chain: &Path, bundle: &Path) -> Result<bool, String> {
    let pem = std::fs::read(chain).map_err(|e| format!("cannot read {}: {e}", chain.display()))?;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| format!("cannot parse {}: {e}", chain.display()))?;
        if signed_by_bundle(&cert, bundle)? {
            return Ok(true);
        }
    }
    Ok(false)
}

fn subject_of(der: &[u8]) -> String {
    x509_parser::parse_x509_certificate(der)
        .map(|(_, c)| c.subject().to_string())
        .unwrap_or_default()
}

/// SHA-256 (hex) of the public key (SubjectPublicKeyInfo DER) a PKCS#10 request asks for, its
/// self-signature checked: what binds a `tollgate login --saml` one-time code to the key the CLI
/// generated before the sign-in started.
pub fn csr_key_sha256(csr_pem: &str) -> Result<String, PkiError> {
    let bad = |m: String| PkiError::InvalidSpec(m);
    let der = rustls_pki_types::CertificateSigningRequestDer::from_pem_slice(csr_pem.as_bytes())
        .map_err(|e| bad(format!("the CSR is not a PEM CERTIFICATE REQUEST: {e}")))?;
    let (_, csr) = <x509_parser::certification_request::X509CertificationRequest as x509_parser::prelude::FromDer<_>>::from_der(der.as_ref())
        .map_err(|e| bad(format!("the CSR is not a valid PKCS#10 request: {e}")))?;
    csr.verify_signature()
        .map_err(|_| bad("the CSR's signature does not verify with its own public key".into()))?;
    let digest = ring::digest::digest(
        &ring::digest::SHA256,
        csr.certification_request_info.subject_pki.raw,
    );
    Ok(hex::encode(digest.as_ref()))
}

/// A new ECDSA P-256 key (PKCS#8 PEM) and a CSR for it (PEM), for `tollgate login`.
pub fn key_and_csr(common_name: &str) -> Result<(String, String), PkiError> {
    let key = KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?;
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// Summary of one certificate, for `tollgate pki inspect` and expiry checks.
#[derive(Clone, Debug)]
pub struct CertSummary {
    pub subject: String,
    pub issuer: String,
    pub common_name: Option<String>,
    /// OU values.
    pub groups: Vec<String>,
    pub dns_names: Vec<String>,
    pub ip_addresses: Vec<String>,
    pub uris: Vec<String>,
    pub not_before: SystemTime,
    pub not_after: SystemTime,
    pub fingerprint_sha256: String,
    pub is_ca: bool,
    /// Lowercase hex.
    pub serial: String,
}

impl fmt::Display for CertSummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "subject:     {}", self.subject)?;
        writeln!(f, "issuer:      {}", self.issuer)?;
        if self.is_ca {
            writeln!(f, "type:        CA")?;
        }
        if !self.groups.is_empty() {
            writeln!(f, "groups:      {}", self.groups.join(", "))?;
        }
        if !self.dns_names.is_empty() {
            writeln!(f, "dns:         {}", self.dns_names.join(", "))?;
        }
        if !self.ip_addresses.is_empty() {
            writeln!(f, "ip:          {}", self.ip_addresses.join(", "))?;
        }
        if !self.uris.is_empty() {
            writeln!(f, "uri:         {}", self.uris.join(", "))?;
        }
        writeln!(f, "not before:  {}", fmt_time(self.not_before))?;
        let now = SystemTime::now();
        let status = match self.not_after.duration_since(now) {
            Ok(left) => format!("expires in {} days", left.as_secs() / 86_400),
            Err(_) => "EXPIRED".to_string(),
        };
        writeln!(f, "not after:   {} ({status})", fmt_time(self.not_after))?;
        writeln!(f, "serial:      {}", self.serial)?;
        write!(f, "sha256:      {}", self.fingerprint_sha256)
    }
}

/// Summaries of every certificate in a PEM file.
pub fn inspect(path: &Path) -> Result<Vec<CertSummary>, PkiError> {
    let bytes = std::fs::read(path).map_err(|source| PkiError::Io {
        action: "cannot read",
        path: path.to_path_buf(),
        source,
    })?;
    let bad = |reason: String| PkiError::BadCertificate {
        path: path.to_path_buf(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(e.to_string()))?;
    if certs.is_empty() {
        return Err(bad("no PEM certificate found".into()));
    }
    certs
        .iter()
        .map(|c| summarize(c).map_err(|e| bad(e.to_string())))
        .collect()
}

/// Summary of one DER certificate.
pub fn summarize(der: &[u8]) -> Result<CertSummary, PkiError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(der).map_err(|e| PkiError::BadCertificate {
            path: PathBuf::from("<der>"),
            reason: e.to_string(),
        })?;
    let subject = cert.subject();
    let attr_strings = |it: &mut dyn Iterator<Item = &x509_parser::x509::AttributeTypeAndValue>| {
        it.filter_map(|a| a.as_str().ok().map(str::to_string))
            .collect::<Vec<_>>()
    };
    let mut summary = CertSummary {
        subject: subject.to_string(),
        issuer: cert.issuer().to_string(),
        common_name: attr_strings(&mut subject.iter_common_name())
            .into_iter()
            .next(),
        groups: attr_strings(&mut subject.iter_organizational_unit()),
        dns_names: Vec::new(),
        ip_addresses: Vec::new(),
        uris: Vec::new(),
        not_before: unix_to_system_time(cert.validity().not_before.timestamp()),
        not_after: unix_to_system_time(cert.validity().not_after.timestamp()),
        fingerprint_sha256: cert_fingerprint_sha256(der),
        is_ca: cert.is_ca(),
        serial: hex::encode(cert.raw_serial()),
    };
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            match name {
                GeneralName::DNSName(s) => summary.dns_names.push(s.to_string()),
                GeneralName::URI(s) => summary.uris.push(s.to_string()),
                GeneralName::IPAddress(b) => {
                    let ip = match b.len() {
                        4 => <[u8; 4]>::try_from(*b).ok().map(IpAddr::from),
                        16 => <[u8; 16]>::try_from(*b).ok().map(IpAddr::from),
                        _ => None,
                    };
                    summary
                        .ip_addresses
                        .push(ip.map_or_else(|| hex::encode(b), |ip| ip.to_string()));
                }
                _ => {}
            }
        }
    }
    Ok(summary)
}

fn check_name(what: &str, value: &str) -> Result<(), PkiError> {
    if value.trim().is_empty() || value.len() > MAX_NAME_LEN || value.chars().any(char::is_control)
    {
        return Err(PkiError::InvalidSpec(format!(
            "{what} {value:?} must be 1 to {MAX_NAME_LEN} printable characters"
        )));
    }
    Ok(())
}

/// Sets notBefore/notAfter; returns notAfter.
fn set_validity(
    params: &mut CertificateParams,
    not_before: Option<SystemTime>,
    ttl: Duration,
) -> Result<SystemTime, PkiError> {
    if ttl.is_zero() {
        return Err(PkiError::InvalidSpec("TTL must be positive".into()));
    }
    let not_before = not_before.unwrap_or_else(|| SystemTime::now() - CLOCK_SKEW);
    let not_after = not_before + ttl;
    params.not_before = time::OffsetDateTime::from(not_before);
    params.not_after = time::OffsetDateTime::from(not_after);
    Ok(not_after)
}

fn random_serial() -> Result<SerialNumber, PkiError> {
    let mut bytes = [0u8; 16];
    ring::rand::SystemRandom::new()
        .fill(&mut bytes)
        .map_err(|_| PkiError::InvalidSpec("system random generator failed".into()))?;
    // Positive and without a leading zero byte, so the DER INTEGER stays 16 bytes.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok(SerialNumber::from_slice(&bytes))
}

fn with_ext(prefix: &Path, ext: &str) -> PathBuf {
    let mut s = prefix.as_os_str().to_owned();
    s.push(".");
    s.push(ext);
    PathBuf::from(s)
}

fn read_string(path: &Path) -> Result<String, PkiError> {
    std::fs::read_to_string(path).map_err(|source| PkiError::Io {
        action: "cannot read",
        path: path.to_path_buf(),
        source,
    })
}

fn pem_encode(der: &CertificateDer<'_>) -> String {
    const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = String::new();
    for chunk in der.chunks(3) {
        let n = chunk.iter().fold(0u32, |acc, b| (acc << 8) | *b as u32) << (8 * (3 - chunk.len()));
        for i in 0..4 {
            if i <= chunk.len() {
                b64.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                b64.push('=');
            }
        }
    }
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).expect("base64 is ASCII"));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// Create `path` with `mode` from the start; fails if it exists.
fn write_new(path: &Path, bytes: &[u8], mode: u32, exclusive_key: bool) -> Result<(), PkiError> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(|source| {
            if exclusive_key && source.kind() == std::io::ErrorKind::AlreadyExists {
                PkiError::CaKeyExists {
                    path: path.to_path_buf(),
                }
            } else {
                PkiError::Io {
                    action: "cannot create",
                    path: path.to_path_buf(),
                    source,
                }
            }
        })?;
    file.write_all(bytes)
        .and_then(|_| file.sync_all())
        .map_err(|source| PkiError::Io {
            action: "cannot write",
            path: path.to_path_buf(),
            source,
        })
}

/// Write to a fresh temporary file (created with `mode`) next to `path`, then rename over it.
fn write_replace(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PkiError> {
    let mut rnd = [0u8; 6];
    let _ = ring::rand::SystemRandom::new().fill(&mut rnd);
    let tmp = with_ext(path, &format!("tmp-{}", hex::encode(rnd)));
    write_new(&tmp, bytes, mode, false)?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        PkiError::Io {
            action: "cannot replace",
            path: path.to_path_buf(),
            source,
        }
    })
}

// --- minimal DER, only for rewriting the subject of a certificate we just made ---

fn der_len(len: usize, out: &mut Vec<u8>) {
    if len < 0x80 {
        out.push(len as u8);
    } else {
        let bytes = len.to_be_bytes();
        let skip = bytes.iter().take_while(|b| **b == 0).count();
        out.push(0x80 | (bytes.len() - skip) as u8);
        out.extend_from_slice(&bytes[skip..]);
    }
}

fn der_tlv(tag: u8, content: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    der_len(content.len(), &mut out);
    out.extend_from_slice(content);
    out
}

/// The first TLV of a buffer: the whole element, its content, and what follows.
struct Tlv<'a> {
    element: &'a [u8],
    content: &'a [u8],
    rest: &'a [u8],
}

fn der_next(buf: &[u8]) -> Result<Tlv<'_>, PkiError> {
    let bad = || PkiError::InvalidSpec("internal: malformed DER from rcgen".into());
    let first_len = *buf.get(1).ok_or_else(bad)?;
    let (header, len) = if first_len < 0x80 {
        (2, first_len as usize)
    } else {
        let n = (first_len & 0x7f) as usize;
        if n == 0 || n > 4 {
            return Err(bad());
        }
        let len = buf
            .get(2..2 + n)
            .ok_or_else(bad)?
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (2 + n, len)
    };
    let end = header.checked_add(len).ok_or_else(bad)?;
    if buf.len() < end {
        return Err(bad());
    }
    Ok(Tlv {
        element: &buf[..end],
        content: &buf[header..end],
        rest: &buf[end..],
    })
}

/// Name ::= SEQUENCE OF RDN; one RDN per OU (in order), then the CN.
fn subject_der(groups: &[String], cn: &str) -> Vec<u8> {
    const OID_OU: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x0b];
    const OID_CN: &[u8] = &[0x06, 0x03, 0x55, 0x04, 0x03];
    let rdn = |oid: &[u8], value: &str| {
        let mut atv = oid.to_vec();
        atv.extend(der_tlv(0x0c, value.as_bytes()));
        der_tlv(0x31, &der_tlv(0x30, &atv))
    };
    let mut rdns = Vec::new();
    for group in groups {
        rdns.extend(rdn(OID_OU, group));
    }
    rdns.extend(rdn(OID_CN, cn));
    der_tlv(0x30, &rdns)
}

/// Replace the subject of `cert` and sign the new TBSCertificate with `key`
/// (same algorithm as the original signature, since the same issuer key made it).
fn resign_with_subject(cert: &[u8], subject: &[u8], key: &KeyPair) -> Result<Vec<u8>, PkiError> {
    let cert_content = der_next(cert)?.content;
    let tbs = der_next(cert_content)?;
    let sig_alg = der_next(tbs.rest)?.element;

    // TBSCertificate: [0] version, serial, signature, issuer, validity, subject, ...
    let mut fields = tbs.content;
    let mut new_tbs = Vec::with_capacity(tbs.content.len() + subject.len());
    for _ in 0..5 {
        let field = der_next(fields)?;
        new_tbs.extend_from_slice(field.element);
        fields = field.rest;
    }
    new_tbs.extend_from_slice(subject);
    new_tbs.extend_from_slice(der_next(fields)?.rest);
    let new_tbs = der_tlv(0x30, &new_tbs);

    let signature = key.sign(&new_tbs)?;
    let mut bits = vec![0u8];
    bits.extend(signature);
    let mut body = new_tbs;
    body.extend_from_slice(sig_alg);
    body.extend(der_tlv(0x03, &bits));
    Ok(der_tlv(0x30, &body))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls_pki_types::CertificateSigningRequestDer;
    use std::os::unix::fs::PermissionsExt;
    use std::process::Command;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    fn openssl(args: &[&str]) -> (bool, String) {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl CLI");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    #[test]
    fn issuing_ca_signs_csrs_with_the_callers_identity_only() {
        let tmp = tempfile::tempdir().unwrap();
        let root = init_ca(&tmp.path().join("root"), "root CA").unwrap();
        // An intermediate signed by the root (openssl), as server.issuing_ca_cert.
        let dir = tmp.path();
        let p = |n: &str| dir.join(n).display().to_string();
        let ext = dir.join("ext.cnf");
        std::fs::write(
            &ext,
            "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
        )
        .unwrap();
        for args in [
            vec![
                "ecparam",
                "-name",
                "prime256v1",
                "-genkey",
                "-noout",
                "-out",
                &p("int.ec"),
            ],
            vec![
                "pkcs8",
                "-topk8",
                "-nocrypt",
                "-in",
                &p("int.ec"),
                "-out",
                &p("int.key"),
            ],
            vec![
                "req",
                "-new",
                "-key",
                &p("int.key"),
                "-subj",
                "/CN=issuing",
                "-out",
                &p("int.csr"),
            ],
            vec![
                "x509",
                "-req",
                "-in",
                &p("int.csr"),
                "-CA",
                &root.cert.display().to_string(),
                "-CAkey",
                &root.key.display().to_string(),
                "-days",
                "30",
                "-extfile",
                &p("ext.cnf"),
                "-out",
                &p("int.crt"),
            ],
        ] {
            let (ok, text) = openssl(&args);
            assert!(ok, "{text}");
        }
        let int = IssuingCa::load(&dir.join("int.crt"), &dir.join("int.key")).unwrap();
        int.check_chains_to(&root.cert).unwrap();
        let other = init_ca(&dir.join("other"), "other CA").unwrap();
        let e = int.check_chains_to(&other.cert).unwrap_err();
        assert!(e.contains("server.client_ca"), "{e}");
        let own = IssuingCa::load(&root.cert, &root.key).unwrap();
        own.check_chains_to(&root.cert).unwrap();

        let (_key, csr) = key_and_csr("root-please").unwrap();
        let spec = ClientCertSpec {
            name: "repo:acme/app".into(),
            spiffe: None,
            groups: vec!["ci".into(), "deploy".into()],
            ttl: Duration::from_secs(600),
            not_before: None,
        };
        let issued = int.issue_for_csr(&csr, &spec).unwrap();
        let leaf = dir.join("leaf.crt");
        std::fs::write(&leaf, &issued.pem).unwrap();
        let summary = &inspect(&leaf).unwrap()[0];
        assert_eq!(summary.common_name.as_deref(), Some("repo:acme/app"));
        assert_eq!(summary.groups, ["ci", "deploy"]);
        assert_eq!(summary.serial, issued.serial_hex);
        // It chains to the root through the intermediate.
        let ca_der = der_of(&root.cert);
        let anchors = [webpki::anchor_from_trusted_cert(&ca_der)
            .unwrap()
            .to_owned()];
        let leaf_der = der_of(&leaf);
        let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        ee.verify_for_usage(
            crate::provider().signature_verification_algorithms.all,
            &anchors,
            &[der_of(&dir.join("int.crt"))],
            rustls_pki_types::UnixTime::now(),
            webpki::KeyUsage::client_auth(),
            None,
            None,
        )
        .unwrap();

        assert!(int.issue_for_csr("garbage", &spec).is_err());
        let mut der = CertificateSigningRequestDer::from_pem_slice(csr.as_bytes())
            .unwrap()
            .as_ref()
            .to_vec();
        let n = der.len();
        der[n - 3] ^= 1;
        let tampered = format!(
            "-----BEGIN CERTIFICATE REQUEST-----\n{}\n-----END CERTIFICATE REQUEST-----\n",
            ring_b64(&der)
        );
        let e = int.issue_for_csr(&tampered, &spec).unwrap_err().to_string();
        assert!(e.contains("signature"), "{e}");
    }

    fn ring_b64(der: &[u8]) -> String {
        let pem = pem_encode(&CertificateDer::from(der.to_vec()));
        pem.lines().filter(|l| !l.starts_with("-----")).collect()
    }

    fn der_of(path: &Path) -> CertificateDer<'static> {
        CertificateDer::from_pem_file(path).unwrap()
    }

    fn webpki_verify(ca: &Path, leaf: &Path, usage: webpki::KeyUsage) -> Result<(), webpki::Error> {
        let ca_der = der_of(ca);
        let anchors = [webpki::anchor_from_trusted_cert(&ca_der)
            .unwrap()
            .to_owned()];
        let leaf_der = der_of(leaf);
        let ee = webpki::EndEntityCert::try_from(&leaf_der).unwrap();
        ee.verify_for_usage(
            crate::provider().signature_verification_algorithms.all,
            &anchors,
            &[],
            rustls_pki_types::UnixTime::now(),
            usage,
            None,
            None,
        )
        .map(|_| ())
    }

    #[test]
    fn init_and_issue_produce_verifiable_certs() {
        let tmp = tempfile::tempdir().unwrap();
        let ca_dir = tmp.path().join("pki");
        let ca = init_ca(&ca_dir, "tollgate test CA").unwrap();
        assert_eq!(mode(&ca_dir), 0o700);
        assert_eq!(mode(&ca.key), 0o600);
        assert_eq!(mode(&ca.cert), 0o644);

        let server = issue_server(
            &ca_dir,
            &ServerCertSpec {
                dns: vec!["db.internal".into(), "localhost".into()],
                ips: vec!["127.0.0.1".parse().unwrap()],
                ttl: DEFAULT_SERVER_TTL,
                not_before: None,
            },
            &tmp.path().join("out/gateway"),
        )
        .unwrap();
        let client = issue_client(
            &ca_dir,
            &ClientCertSpec {
                name: "alice".into(),
                spiffe: Some("spiffe://example.org/agent/alice".into()),
                groups: vec!["sre".into(), "agents".into()],
                ttl: DEFAULT_CLIENT_TTL,
                not_before: None,
            },
            &tmp.path().join("alice"),
        )
        .unwrap();
        assert_eq!(server.cert, tmp.path().join("out/gateway.crt"));
        assert_eq!(mode(&server.key), 0o600);
        assert_eq!(mode(&client.key), 0o600);

        webpki_verify(&ca.cert, &server.cert, webpki::KeyUsage::server_auth()).unwrap();
        webpki_verify(&ca.cert, &client.cert, webpki::KeyUsage::client_auth()).unwrap();
        // The EKUs are distinct: a client certificate is not a server certificate.
        assert!(webpki_verify(&ca.cert, &client.cert, webpki::KeyUsage::server_auth()).is_err());

        let ca_s = ca.cert.to_str().unwrap();
        for (leaf, purpose) in [(&server.cert, "sslserver"), (&client.cert, "sslclient")] {
            let (ok, out) = openssl(&[
                "verify",
                "-purpose",
                purpose,
                "-CAfile",
                ca_s,
                leaf.to_str().unwrap(),
            ]);
            assert!(ok, "openssl verify failed: {out}");
        }

        let (ok, text) = openssl(&[
            "x509",
            "-noout",
            "-text",
            "-in",
            server.cert.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        assert!(text.contains("DNS:db.internal"), "{text}");
        assert!(text.contains("DNS:localhost"), "{text}");
        assert!(text.contains("IP Address:127.0.0.1"), "{text}");
        assert!(text.contains("TLS Web Server Authentication"), "{text}");

        let (ok, text) = openssl(&[
            "x509",
            "-noout",
            "-text",
            "-in",
            client.cert.to_str().unwrap(),
        ]);
        assert!(ok, "{text}");
        assert!(text.contains("OU = sre, OU = agents, CN = alice"), "{text}");
        assert!(
            text.contains("URI:spiffe://example.org/agent/alice"),
            "{text}"
        );
        assert!(text.contains("TLS Web Client Authentication"), "{text}");

        let (ok, text) = openssl(&["x509", "-noout", "-text", "-in", ca_s]);
        assert!(ok && text.contains("CA:TRUE"), "{text}");
        assert!(text.contains("Certificate Sign, CRL Sign"), "{text}");

        let summary = &inspect(&client.cert).unwrap()[0];
        assert_eq!(summary.common_name.as_deref(), Some("alice"));
        assert_eq!(summary.groups, vec!["sre", "agents"]);
        assert_eq!(summary.uris, vec!["spiffe://example.org/agent/alice"]);
        assert!(!summary.is_ca);
        assert_eq!(
            summary.fingerprint_sha256,
            cert_fingerprint_sha256(&der_of(&client.cert))
        );
        let left = summary
            .not_after
            .duration_since(summary.not_before)
            .unwrap();
        assert_eq!(left, DEFAULT_CLIENT_TTL);
        assert!(
            summary.to_string().contains("expires in 0 days"),
            "{summary}"
        );

        let summary = &inspect(&server.cert).unwrap()[0];
        assert_eq!(summary.dns_names, vec!["db.internal", "localhost"]);
        assert_eq!(summary.ip_addresses, vec!["127.0.0.1"]);
        assert_eq!(summary.common_name.as_deref(), Some("db.internal"));
        assert!(inspect(&ca.cert).unwrap()[0].is_ca);
    }

    #[test]
    fn replica_certificates_are_recognised_only_from_this_ca_with_the_replica_uri() {
        let tmp = tempfile::tempdir().unwrap();
        let root = init_ca(tmp.path(), "cluster").unwrap();
        let ca = IssuingCa::load(&root.cert, &root.key).unwrap();
        let (cert, _key) = ca
            .issue_replica("gw-0123", Duration::from_secs(300))
            .unwrap();
        let der = CertificateDer::from_pem_slice(cert.as_bytes()).unwrap();
        assert_eq!(ca.replica_of(&der).as_deref(), Some("gw-0123"));
        // A user's certificate from the same CA names no replica, even called like one.
        let spec = ClientCertSpec {
            name: "tollgate replica".into(),
            spiffe: Some("spiffe://example.org/urn:tollgate:replica:gw-0123".into()),
            groups: vec![],
            ttl: Duration::from_secs(600),
            not_before: None,
        };
        let user = issue_client(tmp.path(), &spec, &tmp.path().join("user")).unwrap();
        assert_eq!(ca.replica_of(&der_of(&user.cert)), None);
        // A replica certificate from another CA is not this cluster's.
        let other_dir = tmp.path().join("other");
        let other = init_ca(&other_dir, "other").unwrap();
        let other = IssuingCa::load(&other.cert, &other.key).unwrap();
        let (forged, _) = other
            .issue_replica("gw-0123", Duration::from_secs(300))
            .unwrap();
        let forged = CertificateDer::from_pem_slice(forged.as_bytes()).unwrap();
        assert_eq!(ca.replica_of(&forged), None);
        assert_eq!(ca.replica_of(b"not a certificate"), None);
    }

    #[test]
    fn init_refuses_to_overwrite_a_ca_key() {
        let tmp = tempfile::tempdir().unwrap();
        let first = init_ca(tmp.path(), "one").unwrap();
        let before = std::fs::read(&first.key).unwrap();
        let err = init_ca(tmp.path(), "two").unwrap_err();
        assert!(matches!(err, PkiError::CaKeyExists { .. }), "{err}");
        assert!(err.to_string().contains("refusing to overwrite"), "{err}");
        assert_eq!(std::fs::read(&first.key).unwrap(), before);
    }

    #[test]
    fn expired_cert_shows_expired() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), "ca").unwrap();
        let spec = ClientCertSpec {
            name: "old".into(),
            spiffe: None,
            groups: vec![],
            ttl: Duration::from_secs(3600),
            not_before: Some(SystemTime::now() - Duration::from_secs(7200)),
        };
        let files = issue_client(tmp.path(), &spec, &tmp.path().join("old")).unwrap();
        let summary = &inspect(&files.cert).unwrap()[0];
        assert!(summary.to_string().contains("EXPIRED"), "{summary}");
        assert!(summary.groups.is_empty());
    }

    #[test]
    fn rejects_bad_specs() {
        let tmp = tempfile::tempdir().unwrap();
        init_ca(tmp.path(), "ca").unwrap();
        let mut spec = ClientCertSpec {
            name: "bob".into(),
            spiffe: Some("https://example.org/bob".into()),
            groups: vec![],
            ttl: DEFAULT_CLIENT_TTL,
            not_before: None,
        };
        let err = issue_client(tmp.path(), &spec, &tmp.path().join("bob")).unwrap_err();
        assert!(err.to_string().contains("spiffe://"), "{err}");
        spec.spiffe = None;
        spec.ttl = Duration::from_secs(20 * 365 * 86_400);
        let err = issue_client(tmp.path(), &spec, &tmp.path().join("bob")).unwrap_err();
        assert!(err.to_string().contains("outlive the CA"), "{err}");
        let server = ServerCertSpec {
            dns: vec![],
            ips: vec![],
            ttl: DEFAULT_SERVER_TTL,
            not_before: None,
        };
        assert!(issue_server(tmp.path(), &server, &tmp.path().join("s")).is_err());
        let missing = issue_client(
            &tmp.path().join("nope"),
            &ClientCertSpec {
                spiffe: None,
                ..spec
            },
            &tmp.path().join("x"),
        );
        assert!(missing.unwrap_err().to_string().contains("ca.crt"));
    }

    #[test]
    fn revoke_adds_to_the_crl_and_keeps_earlier_revocations() {
        let dir = tempfile::tempdir().unwrap();
        let ca = dir.path().join("ca");
        init_ca(&ca, "test CA").unwrap();
        let spec = |name: &str| ClientCertSpec {
            name: name.into(),
            spiffe: None,
            groups: vec![],
            ttl: DEFAULT_CLIENT_TTL,
            not_before: None,
        };
        let a = issue_client(&ca, &spec("a"), &dir.path().join("a")).unwrap();
        let b = issue_client(&ca, &spec("b"), &dir.path().join("b")).unwrap();
        let crl = dir.path().join("ca.crl");
        let week = Duration::from_secs(7 * 86_400);
        assert_eq!(revoke(&ca, &[], week, &crl).unwrap(), 0);
        assert_eq!(revoke(&ca, &[&a.cert], week, &crl).unwrap(), 1);
        assert_eq!(revoke(&ca, &[&b.cert, &a.cert], week, &crl).unwrap(), 2);
        let pem = std::fs::read(&crl).unwrap();
        let der = rustls_pki_types::CertificateRevocationListDer::from_pem_slice(&pem).unwrap();
        let (_, parsed) = x509_parser::parse_x509_crl(der.as_ref()).unwrap();
        let serials: Vec<String> = parsed
            .iter_revoked_certificates()
            .map(|r| hex::encode(r.raw_serial()))
            .collect();
        for f in [&a, &b] {
            let serial = inspect(&f.cert).unwrap()[0].serial.clone();
            assert!(serials.contains(&serial), "{serial} not in {serials:?}");
        }
        // A certificate from another CA is refused.
        let other = dir.path().join("other");
        init_ca(&other, "other CA").unwrap();
        let c = issue_client(&other, &spec("c"), &dir.path().join("c")).unwrap();
        assert!(revoke(&ca, &[&c.cert], week, &crl).is_err());
    }

    #[test]
    fn parses_ttls() {
        assert_eq!(parse_ttl("90s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("30m").unwrap(), Duration::from_secs(1800));
        assert_eq!(parse_ttl("12h").unwrap(), Duration::from_secs(43_200));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        for bad in ["", "h", "12", "0h", "-1h", "1.5h", "3w", "12 h"] {
            assert!(parse_ttl(bad).is_err(), "{bad:?} accepted");
        }
    }
}
