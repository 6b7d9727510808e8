//! Who is calling: turns a verified client certificate or a presented token into an [`Identity`],
//! and answers group-membership questions about it.
//!
//! It also owns the [`Principal`]: who a caller is regardless of the credential used, so that
//! one person with a certificate and a token counts once, and a token subject can never pass
//! for a certificate user of the same name ([`Principals`], `[[identity.principals]]`).
//!
//! OpenID Connect bearer tokens are validated in [`oidc`] (discovery, JWKS, signature, claims);
//! [`oidc_login`] is the relying party's side of people signing in (authorization code + PKCE,
//! device authorization grant), used by `tollgate login` and the console. [`saml`] is the SAML
//! 2.0 service provider (AuthnRequests, signed-assertion checks with samael + libxmlsec1).
//!
//! It trusts its inputs to be already verified where that is the TLS layer's job (the certificate
//! chain is checked by rustls before we see it); it never decides policy beyond "is a member of".

pub mod oidc;
pub mod oidc_login;
pub mod saml;

use std::collections::HashMap;
use std::fmt;
use std::time::SystemTime;
use tollgate_config::{PrincipalMapping, StaticToken};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::*;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMethod {
    Cert,
    Token,
    Oidc,
    Saml,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::Cert => "cert",
            AuthMethod::Token => "token",
            AuthMethod::Oidc => "oidc",
            AuthMethod::Saml => "saml",
        }
    }
}

/// Who is behind a credential, in one namespace for every kind of credential:
/// `cert:spiffe://…` (a certificate's SPIFFE URI), `cert:cn:<CN>` (a certificate without one),
/// `token:<subject>` (a static token), `oidc:<issuer>#<sub>`, or the `name` of an
/// `[[identity.principals]]` entry that several credentials map to (names hold no `:`, so a
/// name never equals a credential's own principal). Reviews compare principals, never subjects.
#[derive(
    Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
#[serde(transparent)]
pub struct Principal(String);

impl Principal {
    /// A certificate's principal from its subject as [`from_certificate`] reads it.
    pub fn certificate(subject: &str) -> Principal {
        if subject.starts_with("spiffe://") {
            Principal(format!("cert:{subject}"))
        } else {
            Principal(format!("cert:cn:{subject}"))
        }
    }

    pub fn token(subject: &str) -> Principal {
        Principal(format!("token:{subject}"))
    }

    pub fn oidc(issuer: &str, subject: &str) -> Principal {
        Principal(format!("oidc:{issuer}#{subject}"))
    }

    /// A person signed in through the SAML IdP `idp` (its entity id).
    pub fn saml(idp: &str, subject: &str) -> Principal {
        Principal(format!("saml:{idp}#{subject}"))
    }

    /// The issuer of an OIDC principal (an issuer URL holds no `#`).
    pub fn oidc_issuer(&self) -> Option<&str> {
        self.0
            .strip_prefix("oidc:")?
            .split_once('#')
            .map(|(i, _)| i)
    }

    /// A principal read back from storage (written by [`Principal::as_str`]).
    pub fn from_stored(s: impl Into<String>) -> Principal {
        Principal(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The `[[identity.principals]]` mapping: credentials that belong to one named principal.
#[derive(Debug, Clone, Default)]
pub struct Principals {
    by_credential: HashMap<Principal, Principal>,
}

impl Principals {
    /// From validated config (`certificates` entries are `spiffe://…` or `cn:<CN>`).
    pub fn new(mappings: &[PrincipalMapping]) -> Principals {
        let mut by_credential = HashMap::new();
        for m in mappings {
            let name = Principal(m.name.clone());
            for c in &m.certificates {
                let credential = match c.strip_prefix("cn:") {
                    Some(cn) => Principal(format!("cert:cn:{cn}")),
                    None => Principal(format!("cert:{c}")),
                };
                by_credential.insert(credential, name.clone());
            }
            for t in &m.tokens {
                by_credential.insert(Principal::token(t), name.clone());
            }
            for o in &m.oidc {
                by_credential.insert(Principal(format!("oidc:{o}")), name.clone());
            }
        }
        Principals { by_credential }
    }

    /// The principal a credential's own principal belongs to: its mapped name, else itself.
    pub fn resolve(&self, credential: &Principal) -> Principal {
        self.by_credential
            .get(credential)
            .unwrap_or(credential)
            .clone()
    }

    /// `identity` with its principal resolved through the mapping.
    pub fn apply(&self, mut identity: Identity) -> Identity {
        identity.principal = self.resolve(&identity.principal);
        identity
    }
}

/// A caller, as every protocol adapter and the policy engine see it. It reads back what it
/// writes; the two skipped times come back `None` (a reader that needs them keeps them beside).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Identity {
    /// The name the credential carries (SPIFFE URI, CN or token subject): what people read.
    pub subject: String,
    /// Who that is, for comparisons across credentials (see [`Principal`]).
    pub principal: Principal,
    pub groups: Vec<String>,
    pub method: AuthMethod,
    pub cert_fingerprint: Option<String>,
    #[serde(skip)]
    pub cert_not_after: Option<SystemTime>,
    /// When the credential stops being valid other than a certificate's notAfter: an OIDC
    /// token's `exp` (sessions end then).
    #[serde(skip)]
    pub expires_at: Option<SystemTime>,
}

impl Identity {
    /// True when the identity belongs to at least one of `groups`.
    pub fn in_any(&self, groups: &[String]) -> bool {
        self.groups.iter().any(|g| groups.iter().any(|w| w == g))
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
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
        principal: Principal::certificate(&subject),
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
        expires_at: None,
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
            principal: Principal::token(&t.subject),
            groups: t.groups.clone(),
            method: AuthMethod::Token,
            cert_fingerprint: None,
            cert_not_after: None,
            expires_at: None,
        })
    }

    /// Whether a token with this SHA-256 (hex) is configured for `subject` (a running session
    /// checks the token it authenticated with after a reload).
    pub fn holds(&self, sha256_hex: &str, subject: &str) -> bool {
        let mut h = [0u8; 32];
        hex::decode_to_slice(sha256_hex, &mut h).is_ok()
            && self
                .tokens
                .iter()
                .any(|(d, t)| d == &h && t.subject == subject)
    }
}

/// Compare without an early exit, so timing does not reveal how many leading bytes matched.
pub fn ct_eq(a: &[u8], b: &[u8]) -> bool {
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
        assert_eq!(id.principal.as_str(), "token:ci-bot");
        assert_eq!(id.method, AuthMethod::Token);
        assert!(id.in_any(&["ci".to_string()]));
        assert!(!id.in_any(&["sre".to_string()]));
        assert!(v.verify("tesT").is_none());
        assert!(v.verify("").is_none());
    }

    #[test]
    fn credentials_have_distinct_principals_unless_mapped() {
        let cn = Principal::certificate("alice");
        let token = Principal::token("alice");
        let spiffe = Principal::certificate("spiffe://corp/alice");
        assert_eq!(cn.as_str(), "cert:cn:alice");
        assert_eq!(spiffe.as_str(), "cert:spiffe://corp/alice");
        assert_eq!(
            Principal::oidc("https://idp", "42").as_str(),
            "oidc:https://idp#42"
        );
        assert_eq!(
            Principal::oidc("https://idp", "a#b").oidc_issuer(),
            Some("https://idp")
        );
        assert_eq!(token.oidc_issuer(), None);
        assert_ne!(cn, token);

        let map = Principals::new(&[PrincipalMapping {
            name: "alice".into(),
            certificates: vec!["spiffe://corp/alice".into(), "cn:alice".into()],
            tokens: vec!["alice-bot".into()],
            oidc: vec!["https://idp#00u1alice".into()],
        }]);
        let alice = Principal::from_stored("alice");
        assert_eq!(map.resolve(&cn), alice);
        assert_eq!(
            map.resolve(&Principal::oidc("https://idp", "00u1alice")),
            alice
        );
        let other_idp = Principal::oidc("https://other", "00u1alice");
        assert_eq!(map.resolve(&other_idp), other_idp);
        assert_eq!(map.resolve(&spiffe), alice);
        assert_eq!(map.resolve(&Principal::token("alice-bot")), alice);
        // Unmapped credentials keep their own principal; a token named like a CN stays apart.
        assert_eq!(map.resolve(&token), token);
        assert_eq!(
            map.resolve(&Principal::certificate("bob")).as_str(),
            "cert:cn:bob"
        );
        // Resolving twice changes nothing.
        assert_eq!(map.resolve(&alice), alice);
    }

    fn certificate(cn: &str, spiffe: Option<&str>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, cn);
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationalUnitName, "sre");
        if let Some(uri) = spiffe {
            params
                .subject_alt_names
                .push(rcgen::SanType::URI(uri.try_into().unwrap()));
        }
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn certificate_identity_carries_its_principal() {
        let cn = from_certificate(&certificate("alice", None)).unwrap();
        assert_eq!(
            (cn.subject.as_str(), cn.principal.as_str()),
            ("alice", "cert:cn:alice")
        );
        assert_eq!(cn.groups, ["sre"]);
        let uri = from_certificate(&certificate("alice", Some("spiffe://corp/alice"))).unwrap();
        assert_eq!(uri.subject, "spiffe://corp/alice");
        assert_eq!(uri.principal.as_str(), "cert:spiffe://corp/alice");
        let map = Principals::new(&[PrincipalMapping {
            name: "alice".into(),
            certificates: vec!["cn:alice".into()],
            tokens: vec![],
            oidc: vec![],
        }]);
        let mapped = map.apply(cn);
        assert_eq!(
            (mapped.subject.as_str(), mapped.principal.as_str()),
            ("alice", "alice")
        );
    }

    #[test]
    fn garbage_certificate_is_an_error() {
        assert_eq!(
            from_certificate(b"not a cert"),
            Err(IdentityError::BadCertificate)
        );
    }
}
