//! Who is calling: turns a verified client certificate or a presented token into an [`Identity`],
//! and answers group-membership questions about it.
//!
//! It trusts its inputs to be already verified where that is the TLS layer's job (the certificate
//! chain is checked by rustls before we see it); it never decides policy beyond "is a member of".

use std::time::SystemTime;
use tollgate_config::StaticToken;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    Cert,
    Token,
    Oidc,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Cert => "cert",
            AuthMethod::Token => "token",
            AuthMethod::Oidc => "oidc",
        }
    }
}

/// A caller, as every protocol adapter and the policy engine see it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Identity {
    pub subject: String,
    pub groups: Vec<String>,
    pub method: AuthMethod,
    pub cert_fingerprint: Option<String>,
    #[serde(skip)]
    pub cert_not_after: Option<SystemTime>,
}

impl Identity {
    /// True when the identity belongs to at least one of `groups`.
    pub fn in_any(&self, groups: &[String]) -> bool {
        self.groups.iter().any(|g| groups.iter().any(|w| w == g))
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum IdentityError {
    #[error("client certificate could not be parsed")]
    BadCertificate,
    #[error("client certificate names no subject (no SPIFFE URI and no CN)")]
    NoSubject,
}

/// Identity from a client certificate that rustls already verified against `client_ca`:
/// the SPIFFE URI SAN when present, else the CN; groups from the subject's OU attributes.
pub fn from_certificate(der: &[u8]) -> Result<Identity, IdentityError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|_| IdentityError::BadCertificate)?;
    let spiffe = cert
        .subject_alternative_name()
        .ok()
        .flatten()
        .and_then(|san| {
            san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) if u.starts_with("spiffe://") => Some(u.to_string()),
                _ => None,
            })
        });
    let cn = cert
        .subject()
        .iter_common_name()
        .next()
        .and_then(|a| a.as_str().ok())
        .map(str::to_string);
    let subject = spiffe
        .or(cn)
        .filter(|s| !s.is_empty())
        .ok_or(IdentityError::NoSubject)?;
    let groups = cert
        .subject()
        .iter_organizational_unit()
        .filter_map(|a| a.as_str().ok())
        .map(str::to_string)
        .collect();
    let not_after = cert.validity().not_after.timestamp();
    Ok(Identity {
        subject,
        groups,
        method: AuthMethod::Cert,
        cert_fingerprint: Some(hex::encode(ring::digest::digest(
            &ring::digest::SHA256,
            der,
        ))),
        cert_not_after: u64::try_from(not_after)
            .ok()
            .map(|s| SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(s)),
    })
}

/// Static service-account tokens; config holds only their SHA-256.
pub struct TokenVerifier {
    tokens: Vec<([u8; 32], StaticToken)>,
}

impl TokenVerifier {
    pub fn new(tokens: &[StaticToken]) -> Self {
        let tokens = tokens
            .iter()
            .filter_map(|t| {
                let mut h = [0u8; 32];
                hex::decode_to_slice(&t.sha256, &mut h).ok()?;
                Some((h, t.clone()))
            })
            .collect();
        TokenVerifier { tokens }
    }

    /// The identity a token stands for, comparing digests in constant time.
    pub fn verify(&self, token: &str) -> Option<Identity> {
        let digest = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        let mut found = None;
        for (h, t) in &self.tokens {
            if ct_eq(h, digest.as_ref()) {
                found = Some(t);
            }
        }
        found.map(|t| Identity {
            subject: t.subject.clone(),
            groups: t.groups.clone(),
            method: AuthMethod::Token,
            cert_fingerprint: None,
            cert_not_after: None,
        })
    }
}

/// Compare without an early exit, so timing does not reveal how many leading bytes matched.
fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_verification() {
        let tokens = vec![StaticToken {
            subject: "ci-bot".into(),
            // sha256("test")
            sha256: "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08".into(),
            groups: vec!["ci".into()],
        }];
        let v = TokenVerifier::new(&tokens);
        let id = v.verify("test").unwrap();
        assert_eq!(id.subject, "ci-bot");
        assert_eq!(id.method, AuthMethod::Token);
        assert!(id.in_any(&["ci".to_string()]));
        assert!(!id.in_any(&["sre".to_string()]));
        assert!(v.verify("tesT").is_none());
        assert!(v.verify("").is_none());
    }

    #[test]
    fn garbage_certificate_is_an_error() {
        assert_eq!(
            from_certificate(b"not a cert"),
            Err(IdentityError::BadCertificate)
        );
    }
}
