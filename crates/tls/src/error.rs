use std::path::PathBuf;

/// Errors loading or building TLS material. Messages name the file and say what to do;
/// they are for operators and logs, never sent to a client.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {}: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{} contains no PEM certificate (expected a -----BEGIN CERTIFICATE----- block)", path.display())]
    NoCertificates { path: PathBuf },
    #[error("certificate file {} is invalid: {reason}", path.display())]
    BadCertificate { path: PathBuf, reason: String },
    #[error("cannot parse private key {}: {reason} (expected a PEM PKCS#8, SEC1 or PKCS#1 key)", path.display())]
    BadKey { path: PathBuf, reason: String },
    #[error("tls_key {} does not match certificate {}; use the key that was issued with this certificate", key.display(), cert.display())]
    KeyMismatch { key: PathBuf, cert: PathBuf },
    #[error("certificate {} expired at {not_after}; issue a new one (e.g. `tollgate pki issue`)", path.display())]
    Expired { path: PathBuf, not_after: String },
    #[error("certificate {} is not valid before {not_before}; check the system clock or the certificate", path.display())]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("certificate revocation list {} is unusable: {reason}", path.display())]
    BadCrl { path: PathBuf, reason: String },
    #[error("client CA file {} is unusable: {reason}", path.display())]
    ClientCa { path: PathBuf, reason: String },
    #[error("upstream TLS mode {mode} requires `tls.ca`: tollgate has no implicit system trust store; set tls.ca to the CA certificate that signed the upstream's certificate")]
    CaRequired { mode: &'static str },
    #[error("{context}: {source}")]
    Rustls {
        context: String,
        source: rustls::Error,
    },
    #[error("{0}")]
    Other(String),
}
