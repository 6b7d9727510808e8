//! Listener TLS material: loaded, fully validated, then swapped whole.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer};

use crate::{certs_from_pem, fmt_time, provider, read_file, unix_to_system_time, TlsError};

/// Whether a listener asks for client certificates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientAuth {
    /// Handshake fails without a certificate chaining to `client_ca`.
    Required,
    /// A certificate is verified if presented; clients may also authenticate otherwise.
    Optional,
    /// No certificate is requested.
    None,
}

/// Where one listener's certificate material lives.
#[derive(Clone, Debug)]
pub struct ListenerTlsSpec {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    pub alpn: Vec<Vec<u8>>,
    /// Revocation lists (PEM or DER) from the client CA, re-read with the certificates: a
    /// revoked client certificate fails the handshake.
    pub client_crls: Vec<PathBuf>,
}

/// Outcome of [`ReloadableServerTls::reload_if_changed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadStatus {
    Unchanged,
    Reloaded,
}

struct Material {
    config: Arc<ServerConfig>,
    digest: [u8; 32],
    cert_not_after: SystemTime,
    client_ca_not_after: Option<SystemTime>,
    /// (issuer DN, serial) of every certificate the loaded CRLs revoke.
    revoked: HashSet<(Vec<u8>, Vec<u8>)>,
}

/// Certificate material of one listener, hot-swappable. Each accept calls `config()`;
/// connections in flight keep the Arc they got.
pub struct ReloadableServerTls {
    spec: ListenerTlsSpec,
    current: ArcSwap<Material>,
    /// Serializes reloads so two concurrent reloads cannot interleave read and swap.
    reload_lock: Mutex<()>,
}

impl std::fmt::Debug for ReloadableServerTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReloadableServerTls")
            .field("spec", &self.spec)
            .field("cert_not_after", &self.cert_not_after())
            .finish_non_exhaustive()
    }
}

impl ReloadableServerTls {
    /// Load and fully validate the material, or fail.
    pub fn load(spec: ListenerTlsSpec) -> Result<Self, TlsError> {
        if spec.client_auth != ClientAuth::None && spec.client_ca.is_none() {
            return Err(TlsError::Other(format!(
                "client authentication {:?} for certificate {} needs a client CA file (client_ca)",
                spec.client_auth,
                spec.cert.display()
            )));
        }
        let files = read_files(&spec)?;
        let material = build(&spec, &files)?;
        Ok(Self {
            spec,
            current: ArcSwap::from_pointee(material),
            reload_lock: Mutex::new(()),
        })
    }

    /// The config for the next accepted connection. Cheap.
    pub fn config(&self) -> Arc<ServerConfig> {
        self.current.load().config.clone()
    }

    /// Re-read the files and swap only when their bytes changed. On any invalid material
    /// returns Err and the previous material keeps serving.
    pub fn reload_if_changed(&self) -> Result<ReloadStatus, TlsError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let files = read_files(&self.spec)?;
        if files.digest() == self.current.load().digest {
            return Ok(ReloadStatus::Unchanged);
        }
        let material = build(&self.spec, &files)?;
        self.current.store(Arc::new(material));
        tracing::info!(cert = %self.spec.cert.display(), "reloaded TLS certificate material");
        Ok(ReloadStatus::Reloaded)
    }

    /// Re-read and swap unconditionally (SIGHUP). Invalid material is refused.
    pub fn reload(&self) -> Result<(), TlsError> {
        let _guard = self.reload_lock.lock().unwrap_or_else(|p| p.into_inner());
        let files = read_files(&self.spec)?;
        let material = build(&self.spec, &files)?;
        self.current.store(Arc::new(material));
        tracing::info!(cert = %self.spec.cert.display(), "reloaded TLS certificate material");
        Ok(())
    }

    /// notAfter of the leaf certificate currently served.
    pub fn cert_not_after(&self) -> SystemTime {
        self.current.load().cert_not_after
    }

    /// Earliest notAfter among the client CA certificates, if client auth is configured.
    pub fn client_ca_not_after(&self) -> Option<SystemTime> {
        self.current.load().client_ca_not_after
    }

    /// Whether the revocation lists loaded now revoke this (DER) certificate: for sessions
    /// opened before a CRL was reloaded. A certificate that does not parse counts as revoked.
    pub fn is_revoked(&self, cert_der: &[u8]) -> bool {
        let current = self.current.load();
        if current.revoked.is_empty() {
            return false;
        }
        match x509_parser::parse_x509_certificate(cert_der) {
            Ok((_, c)) => current
                .revoked
                .contains(&(c.issuer().as_raw().to_vec(), c.raw_serial().to_vec())),
            Err(_) => true,
        }
    }

    /// How many certificates the loaded revocation lists revoke.
    pub fn revoked_count(&self) -> usize {
        self.current.load().revoked.len()
    }
}

struct Files {
    cert: Vec<u8>,
    key: Vec<u8>,
    ca: Option<Vec<u8>>,
    crls: Vec<Vec<u8>>,
}

impl Files {
    fn digest(&self) -> [u8; 32] {
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        // Length-prefixed so that moving bytes between files changes the digest.
        let parts = [Some(&self.cert), Some(&self.key), self.ca.as_ref()];
        for part in parts.into_iter().chain(self.crls.iter().map(Some)) {
            match part {
                Some(bytes) => {
                    ctx.update(&(bytes.len() as u64).to_be_bytes());
                    ctx.update(bytes);
                }
                None => ctx.update(&u64::MAX.to_be_bytes()),
            }
        }
        let mut out = [0u8; 32];
        out.copy_from_slice(ctx.finish().as_ref());
        out
    }
}

fn read_files(spec: &ListenerTlsSpec) -> Result<Files, TlsError> {
    let ca = match (&spec.client_ca, spec.client_auth) {
        (Some(path), ClientAuth::Required | ClientAuth::Optional) => {
            Some(read_file(path, "client CA file")?)
        }
        _ => None,
    };
    let crls = match ca {
        Some(_) => spec
            .client_crls
            .iter()
            .map(|p| read_file(p, "certificate revocation list"))
            .collect::<Result<_, _>>()?,
        None => Vec::new(),
    };
    Ok(Files {
        cert: read_file(&spec.cert, "certificate")?,
        key: read_file(&spec.key, "private key")?,
        ca,
        crls,
    })
}

/// The CRLs of one file: PEM (one or more `X509 CRL` blocks) or a single DER CRL. Each must
/// parse and be issued by one of the client CAs (`ca_subjects`); returns them with the
/// (issuer, serial) pairs they revoke.
fn parse_crls(
    bytes: &[u8],
    path: &Path,
    ca_subjects: &[Vec<u8>],
    revoked: &mut HashSet<(Vec<u8>, Vec<u8>)>,
) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let bad = |reason: String| TlsError::BadCrl {
        path: path.to_path_buf(),
        reason,
    };
    let ders: Vec<CertificateRevocationListDer<'static>> =
        if bytes.trim_ascii_start().starts_with(b"-----BEGIN") {
            CertificateRevocationListDer::pem_slice_iter(bytes)
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("invalid PEM: {e}")))?
        } else {
            vec![CertificateRevocationListDer::from(bytes.to_vec())]
        };
    if ders.is_empty() {
        return Err(bad("no -----BEGIN X509 CRL----- block".into()));
    }
    for der in &ders {
        let (_, crl) =
            x509_parser::parse_x509_crl(der).map_err(|e| bad(format!("not a valid CRL: {e}")))?;
        let issuer = crl.issuer().as_raw().to_vec();
        if !ca_subjects.contains(&issuer) {
            return Err(bad(format!(
                "issued by {}, which is not a CA in server.client_ca",
                crl.issuer()
            )));
        }
        for r in crl.iter_revoked_certificates() {
            revoked.insert((issuer.clone(), r.raw_serial().to_vec()));
        }
    }
    Ok(ders)
}

fn build(spec: &ListenerTlsSpec, files: &Files) -> Result<Material, TlsError> {
    let certs = certs_from_pem(&files.cert, &spec.cert)?;
    let key = parse_key(&files.key, &spec.key)?;
    let cert_not_after = check_validity(&certs[0], &spec.cert)?;
    let certified = certified_key(certs, key, &spec.cert, &spec.key)?;

    let builder = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(crate::PROTOCOL_VERSIONS)
        .map_err(|source| TlsError::Rustls {
            context: "cannot select TLS versions".into(),
            source,
        })?;
    let mut revoked = HashSet::new();
    let (builder, client_ca_not_after) = match (&files.ca, &spec.client_ca) {
        (Some(ca_bytes), Some(ca_path)) => {
            let (roots, not_after) = client_roots(ca_bytes, ca_path)?;
            let ca_subjects: Vec<Vec<u8>> = certs_from_pem(ca_bytes, ca_path)?
                .iter()
                .filter_map(|c| {
                    x509_parser::parse_x509_certificate(c)
                        .ok()
                        .map(|(_, c)| c.subject().as_raw().to_vec())
                })
                .collect();
            let mut crls = Vec::new();
            for (bytes, path) in files.crls.iter().zip(&spec.client_crls) {
                crls.extend(parse_crls(bytes, path, &ca_subjects, &mut revoked)?);
            }
            let mut verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider());
            if !crls.is_empty() {
                // Leaves only: an intermediate's revocation needs its own issuer's CRL, which
                // deployments with a single client CA do not have.
                verifier = verifier.with_crls(crls).only_check_end_entity_revocation();
            }
            let verifier = if spec.client_auth == ClientAuth::Optional {
                verifier.allow_unauthenticated()
            } else {
                verifier
            };
            let verifier = verifier.build().map_err(|e| TlsError::ClientCa {
                path: ca_path.clone(),
                reason: e.to_string(),
            })?;
            (builder.with_client_cert_verifier(verifier), Some(not_after))
        }
        _ => (builder.with_no_client_auth(), None),
    };
    let mut config =
        builder.with_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(certified)));
    config.alpn_protocols = spec.alpn.clone();

    Ok(Material {
        config: Arc::new(config),
        digest: files.digest(),
        cert_not_after,
        client_ca_not_after,
        revoked,
    })
}

pub(crate) fn parse_key(bytes: &[u8], path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(bytes).map_err(|e| TlsError::BadKey {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

/// Load the key with the provider and check it belongs to the leaf certificate.
pub(crate) fn certified_key(
    certs: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_path: &Path,
    key_path: &Path,
) -> Result<CertifiedKey, TlsError> {
    let signing_key =
        provider()
            .key_provider
            .load_private_key(key)
            .map_err(|e| TlsError::BadKey {
                path: key_path.to_path_buf(),
                reason: e.to_string(),
            })?;
    let certified = CertifiedKey::new(certs, signing_key);
    match certified.keys_match() {
        Ok(()) => Ok(certified),
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                key: key_path.to_path_buf(),
                cert: cert_path.to_path_buf(),
            })
        }
        Err(source) => Err(TlsError::Rustls {
            context: format!(
                "cannot check that {} matches {}",
                key_path.display(),
                cert_path.display()
            ),
            source,
        }),
    }
}

/// Refuse a leaf that is expired or not yet valid; returns its notAfter.
pub(crate) fn check_validity(leaf: &[u8], path: &Path) -> Result<SystemTime, TlsError> {
    let (_, cert) =
        x509_parser::parse_x509_certificate(leaf).map_err(|e| TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let not_before = unix_to_system_time(cert.validity().not_before.timestamp());
    let not_after = unix_to_system_time(cert.validity().not_after.timestamp());
    let now = SystemTime::now();
    if now > not_after {
        return Err(TlsError::Expired {
            path: path.to_path_buf(),
            not_after: fmt_time(not_after),
        });
    }
    if now < not_before {
        return Err(TlsError::NotYetValid {
            path: path.to_path_buf(),
            not_before: fmt_time(not_before),
        });
    }
    Ok(not_after)
}

/// Parse a CA bundle into a root store; returns it with the earliest notAfter.
pub(crate) fn client_roots(
    bytes: &[u8],
    path: &Path,
) -> Result<(RootCertStore, SystemTime), TlsError> {
    let certs = certs_from_pem(bytes, path).map_err(|e| TlsError::ClientCa {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    let mut roots = RootCertStore::empty();
    let mut earliest: Option<SystemTime> = None;
    for cert in certs {
        if let Some(t) = crate::cert_not_after(&cert) {
            earliest = Some(earliest.map_or(t, |e| e.min(t)));
        }
        roots.add(cert).map_err(|e| TlsError::ClientCa {
            path: path.to_path_buf(),
            reason: format!("not a usable trust anchor: {e}"),
        })?;
    }
    match earliest {
        Some(t) if !roots.is_empty() => Ok((roots, t)),
        _ => Err(TlsError::ClientCa {
            path: path.to_path_buf(),
            reason: "no CA certificate found".into(),
        }),
    }
}

// Listeners share one instance across accept tasks.
const _: fn() = || {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<ReloadableServerTls>();
};
