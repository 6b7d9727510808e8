//! What a PostgreSQL client is told when the gateway refuses its connection: one type with the
//! SQLSTATE, a message that names nothing internal (no upstream address, no credential), a hint
//! that says what to do, and the label its audit record and metrics carry.

use crate::limits::Cap;

#[derive(Debug)]
pub(crate) enum Refusal {
    /// A StartupMessage without encryption.
    Plaintext,
    /// A start-up packet that does not parse.
    BadStartup(String),
    /// PostgreSQL 17 direct TLS without ALPN `postgresql`.
    DirectTlsWithoutAlpn,
    /// An SSLRequest or GSSENCRequest inside TLS.
    EncryptionInsideTls,
    /// A certificate that names no identity.
    BadCertificate(String),
    /// Neither a certificate nor a valid token.
    AuthenticationFailed {
        user: String,
    },
    CertificateExpired,
    TokenExpired,
    /// The resource does not exist or the caller may not reach it.
    Forbidden(tollgate_gate::Forbidden),
    /// The upstream could not be reached; the log has the details under the session id.
    UpstreamUnavailable {
        resource: String,
        session: String,
    },
    OverCap(Cap),
}

impl Refusal {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            Refusal::Plaintext
            | Refusal::BadCertificate(_)
            | Refusal::CertificateExpired
            | Refusal::TokenExpired => "28000",
            Refusal::BadStartup(_)
            | Refusal::DirectTlsWithoutAlpn
            | Refusal::EncryptionInsideTls => "08P01",
            Refusal::AuthenticationFailed { .. } => "28P01",
            Refusal::Forbidden(_) => "42501",
            Refusal::UpstreamUnavailable { .. } => "08001",
            Refusal::OverCap(_) => "53300",
        }
    }

    pub fn message(&self) -> String {
        match self {
            Refusal::Plaintext => {
                "tollgate requires TLS: this connection did not request encryption".into()
            }
            Refusal::BadStartup(e) => format!("invalid start-up packet: {e}"),
            Refusal::DirectTlsWithoutAlpn => {
                "direct TLS connections must negotiate ALPN \"postgresql\"".into()
            }
            Refusal::EncryptionInsideTls => "unexpected encryption request inside TLS".into(),
            Refusal::BadCertificate(e) => {
                format!("tollgate could not read an identity from the client certificate: {e}")
            }
            Refusal::AuthenticationFailed { user } => format!(
                "authentication failed for user \"{user}\": tollgate needs a client certificate or a valid service token as the password"
            ),
            Refusal::CertificateExpired => "your client certificate has expired".into(),
            Refusal::TokenExpired => "your token has expired".into(),
            Refusal::Forbidden(f) => f.to_string(),
            Refusal::UpstreamUnavailable { resource, .. } => {
                format!("tollgate could not connect to resource \"{resource}\"")
            }
            Refusal::OverCap(Cap::Total) => "sorry, too many clients already: tollgate is at its connection limit (server.max_connections)".into(),
            Refusal::OverCap(Cap::Source) => "sorry, too many clients already from this address (server.max_connections_per_source)".into(),
            Refusal::OverCap(Cap::Identity) => "sorry, too many sessions already for this identity (server.max_connections_per_identity)".into(),
        }
    }

    pub fn hint(&self) -> Option<String> {
        Some(match self {
            Refusal::Plaintext => "connect with sslmode=require or stronger (sslmode=verify-full with the gateway's CA is best)".into(),
            Refusal::AuthenticationFailed { .. } => "present a certificate issued by the gateway's client CA (sslcert/sslkey), or set the password to a tollgate service token or an OIDC token of a configured issuer".into(),
            Refusal::CertificateExpired => "renew it (e.g. `tollgate login` or `tollgate pki issue`)".into(),
            Refusal::TokenExpired => "get a new token from your identity provider".into(),
            Refusal::Forbidden(_) => "the database name selects the tollgate resource; ask an administrator for access".into(),
            Refusal::UpstreamUnavailable { session, .. } => {
                format!("the gateway log has the details under session {session}")
            }
            Refusal::OverCap(Cap::Total) => "retry later, or pool connections".into(),
            Refusal::OverCap(Cap::Source) => "close idle connections or pool them; an administrator can raise the limit".into(),
            Refusal::OverCap(Cap::Identity) => "close idle sessions or pool them; an administrator can raise the limit".into(),
            Refusal::BadStartup(_)
            | Refusal::DirectTlsWithoutAlpn
            | Refusal::EncryptionInsideTls
            | Refusal::BadCertificate(_) => return None,
        })
    }

    /// The `reason` of the audit record and the refusal metrics.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::Plaintext => "plaintext",
            Refusal::BadStartup(_) | Refusal::EncryptionInsideTls => "protocol",
            Refusal::DirectTlsWithoutAlpn => "alpn",
            Refusal::BadCertificate(_) => "bad_certificate",
            Refusal::AuthenticationFailed { .. } => "authentication",
            Refusal::CertificateExpired => "cert_expired",
            Refusal::TokenExpired => "token_expired",
            Refusal::Forbidden(_) => "forbidden",
            Refusal::UpstreamUnavailable { .. } => "upstream",
            Refusal::OverCap(cap) => cap.as_label(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_has_a_class_and_leaks_nothing_internal() {
        let all = [
            Refusal::Plaintext,
            Refusal::BadStartup("short".into()),
            Refusal::DirectTlsWithoutAlpn,
            Refusal::EncryptionInsideTls,
            Refusal::BadCertificate("no subject".into()),
            Refusal::AuthenticationFailed { user: "u".into() },
            Refusal::CertificateExpired,
            Refusal::TokenExpired,
            Refusal::UpstreamUnavailable {
                resource: "app".into(),
                session: "s1".into(),
            },
            Refusal::OverCap(Cap::Source),
        ];
        for r in &all {
            assert_eq!(r.sqlstate().len(), 5, "{r:?}");
            assert!(!r.message().is_empty());
            assert!(!r.reason().is_empty());
        }
        let up = Refusal::UpstreamUnavailable {
            resource: "app".into(),
            session: "s1".into(),
        };
        assert_eq!(
            up.message(),
            "tollgate could not connect to resource \"app\""
        );
        assert!(up.hint().unwrap().contains("s1"));
    }
}
