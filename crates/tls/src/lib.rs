//! tollgate-tls: everything about certificate material and rustls configuration.
//!
//! Owns: the one crypto provider ([`provider`]), listener TLS material that is validated
//! completely and hot-swapped ([`ReloadableServerTls`]), upstream client configs
//! ([`resource_client_config`], [`upstream_client_config`]), handshake-failure labels for metrics
//! ([`classify_handshake_error`]), session summaries for audit ([`session_info`]) and the
//! built-in private CA ([`pki`]).
//!
//! Must not: accept sockets or run accept loops, decide policy, or map certificates to
//! identities (that belongs to the server and identity crates).

mod classify;
mod error;
pub mod pki;
mod server;
mod upstream;

use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rustls::crypto::{ring as ring_provider, CryptoProvider};
use rustls::CommonState;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateDer;

pub use classify::{classify_handshake_error, HandshakeFailure};
pub use error::TlsError;
pub use server::{ClientAuth, ListenerTlsSpec, ReloadStatus, ReloadableServerTls};
pub use upstream::{
    replica_client_config, resource_client_config, upstream_client_config, UpstreamVerify,
};

/// The TLS versions tollgate speaks, newest first. Nothing older than TLS 1.2.
pub(crate) static PROTOCOL_VERSIONS: &[&rustls::SupportedProtocolVersion] =
    &[&rustls::version::TLS13, &rustls::version::TLS12];

/// The one crypto provider tollgate uses: ring, TLS 1.3 + TLS 1.2 only, AEAD ECDHE suites only.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| {
            use ring_provider::cipher_suite::*;
            Arc::new(CryptoProvider {
                // Listed explicitly so that a rustls upgrade cannot widen the set silently.
                cipher_suites: vec![
                    TLS13_AES_256_GCM_SHA384,
                    TLS13_AES_128_GCM_SHA256,
                    TLS13_CHACHA20_POLY1305_SHA256,
                    TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384,
                    TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
                    TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                    TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384,
                    TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                    TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                ],
                ..ring_provider::default_provider()
            })
        })
        .clone()
}

/// Summary of a negotiated session, for audit events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsSessionInfo {
    /// "TLSv1.3" or "TLSv1.2".
    pub version: String,
    /// IANA name, e.g. "TLS13_AES_256_GCM_SHA384".
    pub cipher: String,
    pub alpn: Option<String>,
    /// SHA-256 of the peer's leaf certificate, lowercase hex.
    pub peer_cert_fingerprint: Option<String>,
    pub peer_cert_not_after: Option<SystemTime>,
}

/// Summarize a (handshaken) connection, server or client side.
pub fn session_info(conn: &CommonState) -> TlsSessionInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map(|s| {
            let suite = s.suite();
            suite
                .as_str()
                .map(str::to_string)
                .unwrap_or_else(|| format!("{suite:?}"))
        })
        .unwrap_or_default();
    let alpn = conn
        .alpn_protocol()
        .map(|p| String::from_utf8_lossy(p).into_owned());
    let leaf = conn.peer_certificates().and_then(|c| c.first());
    TlsSessionInfo {
        version,
        cipher,
        alpn,
        peer_cert_fingerprint: leaf.map(|c| cert_fingerprint_sha256(c)),
        peer_cert_not_after: leaf.and_then(|c| cert_not_after(c)),
    }
}

/// SHA-256 of a DER certificate, lowercase hex without colons.
pub fn cert_fingerprint_sha256(der: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, der))
}

/// The notAfter of a DER certificate, or None when it does not parse.
pub fn cert_not_after(der: &[u8]) -> Option<SystemTime> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    Some(unix_to_system_time(cert.validity().not_after.timestamp()))
}

/// Every certificate of a PEM file, in order. An empty file is an error.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_file(path, "certificate")?;
    certs_from_pem(&bytes, path)
}

pub(crate) fn read_file(path: &Path, what: &'static str) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_path_buf(),
        source,
    })
}

pub(crate) fn certs_from_pem(
    bytes: &[u8],
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::BadCertificate {
            path: path.to_path_buf(),
            reason: format!("invalid PEM: {e}"),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificates {
            path: path.to_path_buf(),
        });
    }
    for cert in &certs {
        if let Err(e) = x509_parser::parse_x509_certificate(cert) {
            return Err(TlsError::BadCertificate {
                path: path.to_path_buf(),
                reason: format!("not a valid X.509 certificate: {e}"),
            });
        }
    }
    Ok(certs)
}

pub(crate) fn unix_to_system_time(secs: i64) -> SystemTime {
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64)
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs())
    }
}

/// RFC 3339 rendering for error messages and summaries.
pub(crate) fn fmt_time(t: SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|_| format!("{t:?}"))
}
