//! What a PostgreSQL client is told when the gateway refuses its connection ([`Refusal`]), a
//! command ([`CommandRefusal`]) or ends its session from the relay ([`SessionEnd`]): the
//! SQLSTATE, a message that names nothing internal (no upstream address, no credential), a hint
//! that says what to do, and for connections the label its audit record and metrics carry.

use crate::limits::Cap;
use crate::proto::backend::{self, Severity};
use tollgate_gate::standing::{EndCause, Ended};

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
    /// The resource's `max_client_conn` is reached.
    ResourceFull {
        resource: String,
    },
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
            Refusal::OverCap(_) | Refusal::ResourceFull { .. } => "53300",
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
            Refusal::ResourceFull { resource } => format!("sorry, too many clients already for resource \"{resource}\" (max_client_conn)"),
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
            Refusal::ResourceFull { .. } => "retry later; an administrator can raise the resource's max_client_conn".into(),
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
            Refusal::ResourceFull { .. } => "max_client_conn",
        }
    }
}

/// Why the relay refuses one command: the client gets an ErrorResponse in its place, and the
/// session goes on.
#[derive(Debug, Clone)]
pub(crate) enum CommandRefusal {
    /// A rule refused it (the rule's message).
    Rule(String),
    /// A statement after one that may change session settings, in the same pipeline.
    UnsettledPipeline,
    /// A rule holds it for review, and the gateway has no review service.
    NoReviewService { rule: String },
    /// The review could not be opened.
    ReviewNotOpened,
    ReviewDenied {
        review: String,
        reviewer: String,
        reason: Option<String>,
    },
    /// `timeout` as people read it.
    ReviewExpired { review: String, timeout: String },
    /// The client cancelled the held command (or its review was withdrawn).
    Withdrawn,
    /// The review's state could not be read.
    ReviewUnreadable { review: String },
    /// COPY TO under column masking rules (its output does not name its columns).
    CopyUnderColumnRules { resource: String },
    /// Session-level state a transaction-pooled connection cannot carry (what it is).
    PoolMode(&'static str),
}

impl CommandRefusal {
    /// `insufficient_privilege`: what a refused COPY's result records.
    pub const REFUSED: &'static str = "42501";

    pub fn sqlstate(&self) -> &'static str {
        match self {
            CommandRefusal::Rule(_)
            | CommandRefusal::NoReviewService { .. }
            | CommandRefusal::ReviewDenied { .. }
            | CommandRefusal::ReviewExpired { .. }
            | CommandRefusal::CopyUnderColumnRules { .. } => Self::REFUSED,
            CommandRefusal::UnsettledPipeline | CommandRefusal::PoolMode(_) => "0A000",
            CommandRefusal::ReviewNotOpened | CommandRefusal::ReviewUnreadable { .. } => "58030",
            CommandRefusal::Withdrawn => "57014",
        }
    }

    pub fn message(&self) -> String {
        match self {
            CommandRefusal::Rule(message) => message.clone(),
            CommandRefusal::UnsettledPipeline => UNSETTLED_PIPELINE.into(),
            CommandRefusal::PoolMode(what) => format!(
                "{what} is not supported on this resource: its connections are shared between transactions (pool_mode = \"transaction\")"
            ),
            CommandRefusal::NoReviewService { rule } => format!(
                "this statement needs a review (rule \"{rule}\"), and this gateway has no review service"
            ),
            CommandRefusal::ReviewNotOpened => {
                "tollgate could not open a review for this statement, so it was not run".into()
            }
            CommandRefusal::ReviewDenied {
                review,
                reviewer,
                reason,
            } => format!(
                "review {review} denied by {reviewer}: {}",
                reason.as_deref().unwrap_or("no reason given")
            ),
            CommandRefusal::ReviewExpired { review, timeout } => format!(
                "review {review} expired after {timeout} without a decision; the statement was not run"
            ),
            CommandRefusal::Withdrawn => "canceling statement due to user request".into(),
            CommandRefusal::ReviewUnreadable { review } => {
                format!("tollgate could not read review {review}, so the statement was not run")
            }
            CommandRefusal::CopyUnderColumnRules { resource } => format!(
                "COPY TO is not available on resource \"{resource}\": column masking rules apply to you, and COPY output does not name its columns"
            ),
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            CommandRefusal::UnsettledPipeline => Some("send Sync after a command that may change settings (SET, DO, CALL, a function the gateway cannot inspect) and wait for ReadyForQuery before the next statement"),
            CommandRefusal::ReviewNotOpened => Some("try again later or contact the gateway's operator"),
            CommandRefusal::ReviewExpired { .. } => Some("ask a reviewer to decide sooner, then run it again"),
            CommandRefusal::CopyUnderColumnRules { .. } => Some("select the rows with SELECT instead, which tollgate can mask column by column"),
            CommandRefusal::PoolMode(_) => Some("keep such state inside one transaction (SET LOCAL, set_config(..., true), pg_advisory_xact_lock), send a plain SET on its own (the gateway carries it), or use a resource with pool_mode = \"session\""),
            CommandRefusal::Rule(_)
            | CommandRefusal::NoReviewService { .. }
            | CommandRefusal::ReviewDenied { .. }
            | CommandRefusal::Withdrawn
            | CommandRefusal::ReviewUnreadable { .. } => None,
        }
    }

    /// The ErrorResponse the client gets in the command's place.
    pub fn error(&self) -> Vec<u8> {
        backend::error(
            Severity::Error,
            self.sqlstate(),
            &self.message(),
            self.hint(),
        )
    }
}

/// The message of [`CommandRefusal::UnsettledPipeline`].
pub(crate) const UNSETTLED_PIPELINE: &str = "tollgate refused this statement: it follows a command that may change session settings in the same pipeline (rule \"sql_safety\")";

/// Why the relay ends a session, as the client is told (a FATAL error).
#[derive(Debug, Clone)]
pub(crate) enum SessionEnd<'a> {
    UpstreamLost {
        resource: &'a str,
    },
    /// A malformed or oversized message (what was wrong with it).
    Protocol(Option<&'a str>),
    /// A command's audit event could not be written (fail-closed audit).
    AuditUnavailable,
    /// A setting the guardrails' SQL parser depends on changed upstream (the setting).
    DialectChanged(Option<&'a str>),
    /// A per-session limit was reached (which).
    LimitReached(Option<&'a str>),
    /// `pool_mode = "transaction"`: no upstream connection became free within `pool_timeout`.
    PoolTimeout {
        resource: &'a str,
        waited: std::time::Duration,
        pool_size: usize,
    },
    /// `pool_mode = "transaction"`: a new upstream connection could not be opened.
    PoolConnectFailed {
        resource: &'a str,
    },
    /// `pool_mode = "transaction"`: the session's settings could not be applied to the
    /// connection leased for its next transaction.
    PoolSettingsFailed {
        resource: &'a str,
    },
    /// `pool_mode = "transaction"`: a prepared `SET` ran where a transaction block may keep or
    /// undo it, so the session's settings are unknown.
    PoolSettingsUnknown,
}

impl SessionEnd<'_> {
    pub fn sqlstate(&self) -> &'static str {
        match self {
            SessionEnd::UpstreamLost { .. } => "08006",
            SessionEnd::Protocol(_) | SessionEnd::DialectChanged(_) => "08P01",
            SessionEnd::AuditUnavailable => "58030",
            SessionEnd::LimitReached(_) => "54000",
            SessionEnd::PoolTimeout { .. } => "53300",
            SessionEnd::PoolConnectFailed { .. } => "08001",
            SessionEnd::PoolSettingsFailed { .. } => "08006",
            SessionEnd::PoolSettingsUnknown => "0A000",
        }
    }

    pub fn message(&self) -> String {
        match self {
            SessionEnd::UpstreamLost { resource } => {
                format!("tollgate lost the connection to resource \"{resource}\"")
            }
            SessionEnd::Protocol(e) => {
                format!("protocol error: {}", e.unwrap_or("invalid message"))
            }
            SessionEnd::AuditUnavailable => "tollgate could not record this command in the audit trail, so it was not forwarded".into(),
            SessionEnd::DialectChanged(setting) => format!(
                "tollgate ended this session: the server reported {}, which the gateway's guardrails cannot read SQL under",
                setting.unwrap_or("a changed setting")
            ),
            SessionEnd::LimitReached(limit) => format!(
                "tollgate ended this session: {}",
                limit.unwrap_or("a limit was reached")
            ),
            SessionEnd::PoolTimeout {
                resource,
                waited,
                pool_size,
            } => format!(
                "no upstream connection of resource \"{resource}\" became free within {}s (pool_mode = \"transaction\", pool_size = {pool_size})",
                waited.as_secs_f64()
            ),
            SessionEnd::PoolConnectFailed { resource } => {
                format!("tollgate could not connect to resource \"{resource}\"")
            }
            SessionEnd::PoolSettingsFailed { resource } => format!(
                "tollgate could not apply this session's settings (its earlier SETs) to a connection of resource \"{resource}\" (pool_mode = \"transaction\")"
            ),
            SessionEnd::PoolSettingsUnknown => "tollgate ended this session: a session-level SET ran inside a transaction block, which is not supported on this resource: its connections are shared between transactions (pool_mode = \"transaction\")".into(),
        }
    }

    pub fn hint(&self) -> Option<&'static str> {
        match self {
            SessionEnd::UpstreamLost { .. }
            | SessionEnd::Protocol(_)
            | SessionEnd::PoolConnectFailed { .. }
            | SessionEnd::PoolSettingsFailed { .. } => None,
            SessionEnd::PoolSettingsUnknown => Some("reconnect; use SET LOCAL inside a transaction, or send SET on its own outside it"),
            SessionEnd::PoolTimeout { .. } => Some("retry later; an administrator can raise pool_size, reserve_pool or pool_timeout"),
            SessionEnd::AuditUnavailable => Some("the gateway's audit store is unavailable; try again later or contact the gateway's operator"),
            SessionEnd::DialectChanged(_) => Some("reconnect; standard_conforming_strings must stay on and client_encoding UTF8 through the gateway"),
            SessionEnd::LimitReached(_) => Some("close prepared statements and portals the session no longer uses (Close, DEALLOCATE), or ask the operator to raise max_prepared_statements / max_portals"),
        }
    }

    /// The FATAL ErrorResponse the client is sent before the connection closes.
    pub fn fatal(&self) -> Vec<u8> {
        backend::error(
            Severity::Fatal,
            self.sqlstate(),
            &self.message(),
            self.hint(),
        )
    }
}

/// A session ended because what its standing rested on went (certificate, token, issuer,
/// grant): the FATAL the client receives.
pub(crate) struct StandingLost<'a> {
    pub ended: &'a Ended,
    pub resource: &'a str,
}

impl StandingLost<'_> {
    pub fn sqlstate(&self) -> &'static str {
        match self.ended.cause() {
            // invalid_authorization_specification
            EndCause::Credential => "28000",
            // admin_shutdown: a reviewer's decision ended it
            EndCause::Grant => "57P01",
        }
    }

    /// The SQLSTATE, the message (also recorded in the audit event) and the FATAL message.
    pub fn fatal(&self) -> (&'static str, String, Vec<u8>) {
        let (msg, hint) = self.ended.client_message(self.resource);
        let code = self.sqlstate();
        let fatal = backend::error(Severity::Fatal, code, &msg, Some(&hint));
        (code, msg, fatal)
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

    #[test]
    fn a_lost_standing_ends_with_an_authorization_or_shutdown_sqlstate() {
        let lost = |ended: &Ended| {
            let (code, msg, fatal) = StandingLost {
                ended,
                resource: "app",
            }
            .fatal();
            assert!(String::from_utf8_lossy(&fatal).contains(&msg));
            (code, msg)
        };
        for ended in [
            Ended::CertExpired,
            Ended::CertRevoked,
            Ended::TokenRemoved,
            Ended::TokenExpired,
            Ended::IssuerRemoved,
        ] {
            assert_eq!(lost(&ended).0, "28000", "{ended:?}");
        }
        let (code, msg) = lost(&Ended::AccessGrant {
            review: "rv1".into(),
            revoked: true,
        });
        assert_eq!(code, "57P01");
        assert!(
            msg.contains("resource \"app\" (review rv1) was revoked"),
            "{msg}"
        );
        let unmask = Ended::UnmaskGrant {
            review: "rv2".into(),
            revoked: false,
        };
        assert_eq!(lost(&unmask).0, "57P01");
    }

    #[test]
    fn relay_refusals_keep_their_sqlstates() {
        assert_eq!(CommandRefusal::Rule("no".into()).sqlstate(), "42501");
        assert_eq!(CommandRefusal::UnsettledPipeline.sqlstate(), "0A000");
        assert_eq!(CommandRefusal::Withdrawn.sqlstate(), "57014");
        assert_eq!(CommandRefusal::ReviewNotOpened.sqlstate(), "58030");
        let err = CommandRefusal::Rule("no deletes".into()).error();
        assert!(String::from_utf8_lossy(&err).contains("no deletes"));
        assert_eq!(
            SessionEnd::UpstreamLost { resource: "r" }.sqlstate(),
            "08006"
        );
        assert_eq!(
            SessionEnd::Protocol(None).message(),
            "protocol error: invalid message"
        );
        assert_eq!(SessionEnd::LimitReached(None).sqlstate(), "54000");
        assert_eq!(SessionEnd::AuditUnavailable.sqlstate(), "58030");
        let timeout = SessionEnd::PoolTimeout {
            resource: "app",
            waited: std::time::Duration::from_millis(1500),
            pool_size: 3,
        };
        assert_eq!(timeout.sqlstate(), "53300");
        assert!(
            timeout.message().contains("within 1.5s"),
            "{}",
            timeout.message()
        );
        assert!(timeout.message().contains("pool_size = 3"));
        assert_eq!(
            SessionEnd::PoolConnectFailed { resource: "app" }.sqlstate(),
            "08001"
        );
    }
}
