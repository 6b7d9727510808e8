//! SAML 2.0 sign-in: the gateway is the service provider (SP) of one identity provider (IdP),
//! `[identity.saml]`.
//!
//! [`SamlSp`] is built from the IdP's metadata (its entity id, its HTTP-Redirect sign-in URL and
//! its signing certificates; metadata without a signing certificate is refused, since then
//! nothing could be verified). It makes AuthnRequests (SP-initiated, HTTP-Redirect binding, a
//! fresh 128-bit request id) and checks the IdP's HTTP-POST answers with `samael`, whose XML
//! signatures are verified by libxmlsec1 against the metadata's certificates only, and whose
//! reduction keeps only signed content (a signature-wrapping attacker's unsigned copy is cut
//! away). On top of samael: exactly one assertion per response, an AudienceRestriction that
//! names our entity id (samael skips the check when the restriction is absent), a subject, and
//! only SHA-2 signature algorithms. Request ids, the replay cache and one-time codes live in the
//! store (the API crate), so that every replica shares them.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use samael::crypto::AllowedSignatureAlgorithm;
use samael::metadata::{EntityDescriptor, HTTP_REDIRECT_BINDING};
use samael::schema::Assertion;
use samael::service_provider::{Error as SpError, ServiceProvider, ServiceProviderBuilder};
use tollgate_config::{Saml, SamlMetadataSource};

use crate::{AuthMethod, Identity, Principal};

/// Clock skew allowed on NotBefore / NotOnOrAfter.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// How long after its IssueInstant an assertion is still taken.
const MAX_ISSUE_DELAY: Duration = Duration::from_secs(120);
/// Largest SAMLResponse (base64) read.
pub const MAX_RESPONSE: usize = 256 * 1024;

const ALGORITHMS: [AllowedSignatureAlgorithm; 6] = [
    AllowedSignatureAlgorithm::RsaSha256,
    AllowedSignatureAlgorithm::RsaSha384,
    AllowedSignatureAlgorithm::RsaSha512,
    AllowedSignatureAlgorithm::EcdsaSha256,
    AllowedSignatureAlgorithm::EcdsaSha384,
    AllowedSignatureAlgorithm::EcdsaSha512,
];

/// Why an IdP answer was refused: a short reason for logs, metrics and audit events (the
/// client sees a generic message).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SamlError {
    #[error("the SAMLResponse is not base64 of a UTF-8 XML document")]
    Malformed,
    #[error("the response carries {0} assertions; exactly one is accepted (signature wrapping?)")]
    AssertionCount(usize),
    #[error("the response or its assertion is not signed by the IdP's metadata key (unsigned, signed by another key, altered after signing, or a SHA-1/unknown algorithm)")]
    Signature,
    #[error("the assertion is for another audience (not {0})")]
    Audience(String),
    #[error(
        "the assertion's Recipient or the response's Destination is not this gateway's ACS URL"
    )]
    Recipient,
    #[error("the assertion has expired or is not valid yet ({0})")]
    Expired(String),
    #[error("the answer is not for a sign-in this gateway started (InResponseTo)")]
    InResponseTo,
    #[error("the answer was issued by {0:?}, not the configured IdP")]
    Issuer(String),
    #[error("the IdP did not sign the person in (status {0})")]
    Status(String),
    #[error("encrypted assertions are not supported")]
    Encrypted,
    #[error("the assertion names no subject ({0})")]
    NoSubject(String),
    #[error("the assertion is not usable: {0}")]
    Invalid(String),
}

impl SamlError {
    /// A short, stable reason (metric label and audit field).
    pub fn reason(&self) -> &'static str {
        match self {
            SamlError::Malformed => "malformed",
            SamlError::AssertionCount(_) => "assertion_count",
            SamlError::Signature => "signature",
            SamlError::Audience(_) => "audience",
            SamlError::Recipient => "recipient",
            SamlError::Expired(_) => "expired",
            SamlError::InResponseTo => "in_response_to",
            SamlError::Issuer(_) => "issuer",
            SamlError::Status(_) => "status",
            SamlError::Encrypted => "encrypted",
            SamlError::NoSubject(_) => "no_subject",
            SamlError::Invalid(_) => "invalid",
        }
    }
}

/// A person the IdP signed in, from a verified assertion.
#[derive(Debug, Clone)]
pub struct SamlLogin {
    pub identity: Identity,
    /// The assertion's ID: the replay cache's key.
    pub assertion_id: String,
    /// Until when the assertion could be presented (its latest NotOnOrAfter, plus leeway): how
    /// long the replay cache must remember it.
    pub replay_until: SystemTime,
}

/// The service provider for `[identity.saml]`.
pub struct SamlSp {
    config: Saml,
    sp: ServiceProvider,
    idp_entity_id: String,
    sso_url: String,
}

impl std::fmt::Debug for SamlSp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SamlSp")
            .field("idp", &self.idp_entity_id)
            .field("entity_id", &self.config.entity_id)
            .finish()
    }
}

/// What the IdP's metadata says that matters to a deployment (for `tollgate check`).
#[derive(Debug, Clone)]
pub struct IdpFacts {
    pub entity_id: String,
    pub sso_url: String,
    pub signing_certs: usize,
}

impl SamlSp {
    /// Reads the IdP's metadata (the file, or the URL over verified TLS) and builds the SP.
    pub async fn load(config: &Saml) -> Result<SamlSp, String> {
        let xml = read_metadata(config).await?;
        SamlSp::new(config, &xml)
    }

    /// The SP for `config` with the IdP's metadata `xml`; refused without an entity id, an
    /// HTTP-Redirect sign-in endpoint or a signing certificate.
    pub fn new(config: &Saml, xml: &str) -> Result<SamlSp, String> {
        let idp: EntityDescriptor = xml
            .parse()
            .map_err(|e| format!("the IdP metadata is not a SAML EntityDescriptor: {e}"))?;
        let idp_entity_id = idp
            .entity_id
            .clone()
            .filter(|e| !e.is_empty())
            .ok_or("the IdP metadata names no entityID")?;
        if idp
            .idp_sso_descriptors
            .as_ref()
            .is_none_or(|d| d.is_empty())
        {
            return Err(format!(
                "the metadata of {idp_entity_id} has no IDPSSODescriptor: it is not an identity provider's"
            ));
        }
        let sp = ServiceProviderBuilder::default()
            .entity_id(config.entity_id.clone())
            .metadata_url(None::<String>)
            .acs_url(config.acs_url.clone())
            .slo_url(config.acs_url.clone())
            .idp_metadata(idp)
            .allow_idp_initiated(false)
            .max_clock_skew(chrono::Duration::seconds(LEEWAY.as_secs() as i64))
            .max_issue_delay(chrono::Duration::seconds(MAX_ISSUE_DELAY.as_secs() as i64))
            .allowed_signature_algorithms(Some(ALGORITHMS.to_vec()))
            .build()
            .map_err(|e| format!("building the SAML service provider: {e}"))?;
        let certs = sp
            .idp_signing_certs()
            .map_err(|e| format!("the IdP metadata's certificate is unreadable: {e}"))?
            .unwrap_or_default();
        if certs.is_empty() {
            return Err(format!("the metadata of {idp_entity_id} has no signing certificate (KeyDescriptor use=\"signing\" with an X509Certificate): assertions could not be verified"));
        }
        let sso_url = sp.sso_binding_location(HTTP_REDIRECT_BINDING).ok_or_else(|| {
            format!("the metadata of {idp_entity_id} has no SingleSignOnService with the HTTP-Redirect binding")
        })?;
        Ok(SamlSp {
            config: config.clone(),
            sp,
            idp_entity_id,
            sso_url,
        })
    }

    pub fn config(&self) -> &Saml {
        &self.config
    }

    pub fn facts(&self) -> IdpFacts {
        IdpFacts {
            entity_id: self.idp_entity_id.clone(),
            sso_url: self.sso_url.clone(),
            signing_certs: self
                .sp
                .idp_signing_certs()
                .ok()
                .flatten()
                .map_or(0, |c| c.len()),
        }
    }

    /// A fresh AuthnRequest: its id (to remember until the answer comes) and the IdP URL
    /// (HTTP-Redirect binding) carrying it and `relay_state`.
    pub fn authn_request(&self, relay_state: &str) -> Result<(String, String), String> {
        let mut req = self
            .sp
            .make_authentication_request(&self.sso_url)
            .map_err(|e| format!("making the AuthnRequest: {e}"))?;
        // xs:ID starts with a letter or '_'; 128 random bits, not samael's 32.
        req.id = format!("_{}", crate::oidc_login::random_token());
        let url = req
            .redirect(relay_state)
            .map_err(|e| format!("encoding the AuthnRequest: {e}"))?
            .ok_or("the AuthnRequest has no destination")?;
        Ok((req.id, url.to_string()))
    }

    /// Our SP metadata (entity id, ACS with the HTTP-POST binding, signed assertions wanted).
    pub fn metadata_xml(&self) -> Result<String, String> {
        use samael::traits::ToXml;
        let mut md = self.sp.metadata().map_err(|e| e.to_string())?;
        for d in md.sp_sso_descriptors.iter_mut().flatten() {
            d.single_logout_services = None;
        }
        md.to_string().map_err(|e| e.to_string())
    }

    /// Check a base64 `SAMLResponse` answering our AuthnRequest `request_id`: signature,
    /// issuer, audience, recipient and destination, validity window, InResponseTo. CPU-bound
    /// (libxmlsec1): call it off the async runtime.
    pub fn verify(&self, saml_response: &str, request_id: &str) -> Result<SamlLogin, SamlError> {
        use base64::Engine as _;
        let compact: String = saml_response
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(compact.as_bytes())
            .map_err(|_| SamlError::Malformed)?;
        let xml = std::str::from_utf8(&bytes).map_err(|_| SamlError::Malformed)?;
        match count_assertions(xml) {
            Some(1) => {}
            Some(n) => return Err(SamlError::AssertionCount(n)),
            None => return Err(SamlError::Malformed),
        }
        let assertion = self
            .sp
            .parse_xml_response(xml, Some(&[request_id]))
            .map_err(|e| classify(&e))?;
        self.login_of(&assertion)
    }

    /// Subject, groups and lifetimes of a verified assertion, with the checks samael leaves out.
    fn login_of(&self, a: &Assertion) -> Result<SamlLogin, SamlError> {
        let audiences: Vec<&str> = a
            .conditions
            .iter()
            .flat_map(|c| c.audience_restrictions.iter().flatten())
            .flat_map(|r| r.audience.iter().map(String::as_str))
            .collect();
        if !audiences.contains(&self.config.entity_id.as_str()) {
            return Err(SamlError::Audience(self.config.entity_id.clone()));
        }
        let attributes = |name: &str| -> Vec<String> {
            a.attribute_statements
                .iter()
                .flatten()
                .flat_map(|s| &s.attributes)
                .filter(|at| {
                    at.name.as_deref() == Some(name) || at.friendly_name.as_deref() == Some(name)
                })
                .flat_map(|at| at.values.iter().filter_map(|v| v.value.clone()))
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .collect()
        };
        let subject = match &self.config.subject_attribute {
            Some(attr) => attributes(attr)
                .into_iter()
                .next()
                .ok_or_else(|| SamlError::NoSubject(format!("no attribute {attr:?}")))?,
            None => a
                .subject
                .as_ref()
                .and_then(|s| s.name_id.as_ref())
                .map(|n| n.value.trim().to_string())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| SamlError::NoSubject("no NameID".into()))?,
        };
        if subject.len() > 256 || subject.chars().any(char::is_control) {
            return Err(SamlError::NoSubject(
                "the subject is too long or holds control characters".into(),
            ));
        }
        let mut groups = BTreeSet::new();
        for g in attributes(&self.config.groups_attribute) {
            groups.insert(self.config.group_map.get(&g).cloned().unwrap_or(g));
        }
        groups.extend(self.config.static_groups.iter().cloned());
        let confirmation_ends = a
            .subject
            .iter()
            .flat_map(|s| s.subject_confirmations.iter().flatten())
            .filter_map(|c| c.subject_confirmation_data.as_ref()?.not_on_or_after);
        let ends = a
            .conditions
            .iter()
            .filter_map(|c| c.not_on_or_after)
            .chain(confirmation_ends)
            .max()
            .map(to_system_time)
            .unwrap_or_else(|| to_system_time(a.issue_instant) + MAX_ISSUE_DELAY);
        let session_ends = a
            .authn_statements
            .iter()
            .flatten()
            .filter_map(|s| s.session_not_on_or_after)
            .min()
            .map(to_system_time);
        Ok(SamlLogin {
            identity: identity(
                &self.idp_entity_id,
                &subject,
                groups.into_iter().collect(),
                session_ends,
            ),
            assertion_id: a.id.clone(),
            replay_until: ends + LEEWAY,
        })
    }

    pub fn idp_entity_id(&self) -> &str {
        &self.idp_entity_id
    }
}

/// The identity of a person signed in through the SAML IdP `idp` (also how a one-time code's
/// stored sign-in becomes an identity again).
pub fn identity(
    idp: &str,
    subject: &str,
    groups: Vec<String>,
    expires_at: Option<SystemTime>,
) -> Identity {
    Identity {
        subject: subject.to_string(),
        principal: Principal::saml(idp, subject),
        groups,
        method: AuthMethod::Saml,
        cert_fingerprint: None,
        cert_not_after: None,
        expires_at,
    }
}

fn to_system_time(t: chrono::DateTime<chrono::Utc>) -> SystemTime {
    let ms = t.timestamp_millis();
    if ms >= 0 {
        SystemTime::UNIX_EPOCH + Duration::from_millis(ms as u64)
    } else {
        SystemTime::UNIX_EPOCH
    }
}

/// `Assertion` and `EncryptedAssertion` elements anywhere in the document (any namespace
/// prefix); `None` when it is not well-formed XML.
fn count_assertions(xml: &str) -> Option<usize> {
    use quick_xml::events::Event;
    let mut reader = quick_xml::Reader::from_str(xml);
    let mut n = 0;
    loop {
        match reader.read_event() {
            Ok(Event::Start(e)) | Ok(Event::Empty(e)) => {
                let local = e.local_name();
                if local.as_ref() == b"Assertion" || local.as_ref() == b"EncryptedAssertion" {
                    n += 1;
                }
            }
            Ok(Event::Eof) => return Some(n),
            Ok(_) => {}
            Err(_) => return None,
        }
    }
}

/// samael's refusal as one of ours.
fn classify(e: &SpError) -> SamlError {
    match e {
        SpError::FailedToValidateSignature | SpError::CryptoXmlError(_) => SamlError::Signature,
        SpError::DestinationValidationError { .. } | SpError::AssertionRecipientMismatch { .. } => {
            SamlError::Recipient
        }
        SpError::AssertionExpired { time }
        | SpError::ResponseExpired { time }
        | SpError::AssertionConditionExpired { time }
        | SpError::AssertionConditionExpiredBefore { time }
        | SpError::AssertionSubjectConfirmationExpired { time }
        | SpError::AssertionSubjectConfirmationExpiredBefore { time } => {
            SamlError::Expired(time.clone())
        }
        SpError::AssertionConditionAudienceRestrictionFailed { requirement } => {
            SamlError::Audience(requirement.clone())
        }
        SpError::AssertionInResponseToInvalid { .. }
        | SpError::ResponseInResponseToInvalid { .. } => SamlError::InResponseTo,
        SpError::AssertionIssuerMismatch { issuer, .. }
        | SpError::ResponseIssuerMismatch { issuer, .. } => {
            SamlError::Issuer(issuer.clone().unwrap_or_default())
        }
        SpError::ResponseBadStatusCode { code } => SamlError::Status(code.clone()),
        SpError::EncryptedAssertionsNotYetSupported
        | SpError::MissingPrivateKeySP
        | SpError::FailedToDecryptAssertion => SamlError::Encrypted,
        SpError::FailedToParseSamlResponse(_) | SpError::FailedToParseSamlAssertion(_) => {
            SamlError::Malformed
        }
        SpError::AssertionBearerSubjectConfirmationMissing
        | SpError::AssertionSubjectConfirmationMissing => {
            SamlError::Invalid("no bearer SubjectConfirmation with NotOnOrAfter".into())
        }
        other => SamlError::Invalid(other.to_string()),
    }
}

/// The metadata document: the file, or a GET over verified TLS (`ca`, else the system roots).
async fn read_metadata(config: &Saml) -> Result<String, String> {
    match &config.idp_metadata {
        SamlMetadataSource::File(p) => std::fs::read_to_string(p)
            .map_err(|e| format!("reading the IdP metadata {}: {e}", p.display())),
        SamlMetadataSource::Url(u) => {
            let tls: Arc<rustls::ClientConfig> =
                crate::oidc_login::issuer_tls(config.ca.as_deref())?;
            let body = crate::oidc::fetch_bytes(u, &tls).await?;
            String::from_utf8(body.to_vec())
                .map_err(|_| format!("the IdP metadata at {u} is not UTF-8"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assertions_are_counted_whatever_their_prefix() {
        let one = r#"<p:Response xmlns:p="urn:oasis:names:tc:SAML:2.0:protocol" xmlns:a="urn:oasis:names:tc:SAML:2.0:assertion"><a:Assertion ID="x"/></p:Response>"#;
        assert_eq!(count_assertions(one), Some(1));
        let wrapped = r#"<p:Response xmlns:p="p"><Assertion ID="evil"><x/></Assertion><p:Extensions><a:Assertion xmlns:a="a" ID="x"/></p:Extensions></p:Response>"#;
        assert_eq!(count_assertions(wrapped), Some(2));
        assert_eq!(count_assertions("<a><b></a>"), None);
        let encrypted = r#"<Response><EncryptedAssertion/></Response>"#;
        assert_eq!(count_assertions(encrypted), Some(1));
    }
}
