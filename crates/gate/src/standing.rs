//! What a running session's right to continue rests on, and the watch that ends it when that
//! goes: the client certificate's notAfter and revocation, the service token still being
//! configured, the OIDC token's `exp` and its issuer still being configured, the access grant
//! (for an identity outside `allow_groups`) and the unmask grant. One watch for every adapter:
//! each says where its revocation list, tokens and issuers are ([`Authorities`]) and turns
//! [`Ended`] into its own error.

use crate::event::Detail;
use std::time::{Duration, SystemTime};
use tokio::time::Instant;
use tollgate_review::{Grant, Reviews};

/// Where a listener keeps what sessions' standing is checked against.
pub trait Authorities {
    /// Whether the listener's revocation list names this client certificate (DER).
    fn cert_revoked(&self, der: &[u8]) -> bool;
    /// Whether a service token with this SHA-256 (lowercase hex) is configured for `subject`.
    fn token_holds(&self, sha256_hex: &str, subject: &str) -> bool;
    /// Whether the OIDC issuer is still configured.
    fn has_issuer(&self, issuer: &str) -> bool;
    fn reviews(&self) -> Option<&Reviews>;
    /// Bumped whenever tokens, issuers or revocation lists were reloaded.
    fn standing_changes(&self) -> tokio::sync::watch::Receiver<u64>;
    /// How often a session resting on a grant re-reads it from the store.
    fn grant_recheck(&self) -> Duration;
}

/// What an ended session's standing rested on: each adapter answers the two with its own error
/// code (SQLSTATE, MySQL error number).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EndCause {
    /// The credential it authenticated with (certificate, token, issuer) no longer holds.
    Credential,
    /// A reviewer's grant it depended on ran out or was revoked.
    Grant,
}

/// Why a session was ended from outside.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Ended {
    CertExpired,
    CertRevoked,
    TokenRemoved,
    TokenExpired,
    IssuerRemoved,
    /// `revoked`: ended early by a reviewer, rather than run out.
    AccessGrant {
        review: String,
        revoked: bool,
    },
    UnmaskGrant {
        review: String,
        revoked: bool,
    },
}

impl Ended {
    /// Fixed label for metrics and the audit event.
    pub fn label(&self) -> &'static str {
        match self {
            Ended::CertExpired => "cert_expired",
            Ended::CertRevoked => "cert_revoked",
            Ended::TokenRemoved => "token_removed",
            Ended::TokenExpired => "token_expired",
            Ended::IssuerRemoved => "issuer_removed",
            Ended::AccessGrant { revoked: false, .. } => "access_grant_ended",
            Ended::AccessGrant { revoked: true, .. } => "access_grant_revoked",
            Ended::UnmaskGrant { revoked: false, .. } => "unmask_grant_ended",
            Ended::UnmaskGrant { revoked: true, .. } => "unmask_grant_revoked",
        }
    }

    pub fn cause(&self) -> EndCause {
        match self {
            Ended::CertExpired
            | Ended::CertRevoked
            | Ended::TokenRemoved
            | Ended::TokenExpired
            | Ended::IssuerRemoved => EndCause::Credential,
            Ended::AccessGrant { .. } | Ended::UnmaskGrant { .. } => EndCause::Grant,
        }
    }

    /// The message and hint the client receives (the adapter adds its error code).
    pub fn client_message(&self, resource: &str) -> (String, String) {
        match self {
            Ended::CertExpired => (
                "terminating connection: your client certificate has expired".into(),
                "reconnect with a renewed certificate (e.g. `tollgate login` or `tollgate pki issue`)".into(),
            ),
            Ended::CertRevoked => (
                "terminating connection: your client certificate has been revoked".into(),
                "ask an administrator for a new certificate".into(),
            ),
            Ended::TokenRemoved => (
                "terminating connection: the service token this session authenticated with is no longer accepted".into(),
                "reconnect with a current token".into(),
            ),
            Ended::TokenExpired => (
                "terminating connection: the token this session authenticated with has expired".into(),
                "reconnect with a new token from your identity provider".into(),
            ),
            Ended::IssuerRemoved => (
                "terminating connection: the identity provider that issued this session's token is no longer accepted".into(),
                "reconnect with a certificate or a token tollgate accepts".into(),
            ),
            Ended::AccessGrant { review, revoked } => (
                format!("terminating connection: your temporary access to resource \"{resource}\" (review {review}) {}", ended_or_revoked(*revoked)),
                format!("request access again with `tollgate access request {resource}`"),
            ),
            Ended::UnmaskGrant { review, revoked } => (
                format!("terminating connection: your unmasked view of resource \"{resource}\" (review {review}) {}", ended_or_revoked(*revoked)),
                "reconnect to continue with masked results, or request an unmasked view again".into(),
            ),
        }
    }

    pub fn detail(&self) -> Detail {
        match self {
            Ended::AccessGrant { review, .. } | Ended::UnmaskGrant { review, .. } => {
                Detail::Review {
                    review: review.clone(),
                }
            }
            _ => Detail::Empty {},
        }
    }
}

fn ended_or_revoked(revoked: bool) -> &'static str {
    if revoked {
        "was revoked"
    } else {
        "has ended"
    }
}

/// A session's standing, re-checked on every deadline, reload notice and grant re-read.
pub struct Standing {
    /// Who the session is (grants are looked up by its principal).
    pub identity: tollgate_identity::Identity,
    pub resource: String,
    /// The client certificate (DER) and its notAfter, when it authenticated with one.
    pub cert: Option<(Vec<u8>, Option<SystemTime>)>,
    /// SHA-256 (lowercase hex) of the service token, when it authenticated with one.
    pub token_sha256: Option<String>,
    /// The access grant the session depends on (`None`: reached through `allow_groups`).
    pub access: Option<Grant>,
    /// The unmask grant the session was opened with.
    pub unmask: Option<Grant>,
}

impl Standing {
    /// The earliest time something runs out.
    fn deadline(&self) -> Option<SystemTime> {
        [
            self.cert.as_ref().and_then(|(_, t)| *t),
            self.identity.expires_at,
            self.access.as_ref().map(|g| g.until),
            self.unmask.as_ref().map(|g| g.until),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    fn has_grant(&self) -> bool {
        self.access.is_some() || self.unmask.is_some()
    }

    /// Whether the session may continue now. Grants are re-read from the store: a newer grant
    /// may extend one that is ending, and a grant shortened elsewhere ends sooner.
    fn check<A: Authorities + ?Sized>(&mut self, gw: &A, now: SystemTime) -> Option<Ended> {
        if let Some((der, not_after)) = &self.cert {
            if not_after.is_some_and(|t| now >= t) {
                return Some(Ended::CertExpired);
            }
            if gw.cert_revoked(der) {
                return Some(Ended::CertRevoked);
            }
        }
        if self.identity.expires_at.is_some_and(|t| now >= t) {
            return Some(Ended::TokenExpired);
        }
        if let Some(issuer) = self.identity.principal.oidc_issuer() {
            if !gw.has_issuer(issuer) {
                return Some(Ended::IssuerRemoved);
            }
        }
        if let Some(sha) = &self.token_sha256 {
            if !gw.token_holds(sha, &self.identity.subject) {
                return Some(Ended::TokenRemoved);
            }
        }
        if let Some(g) = &self.access {
            let current = gw
                .reviews()
                .and_then(|r| r.active_grant_for(&self.identity, &self.resource));
            match current {
                Some(c) if now < c.until => self.access = Some(c),
                _ => {
                    return Some(Ended::AccessGrant {
                        review: g.review_id.clone(),
                        revoked: now < g.until,
                    })
                }
            }
        }
        if let Some(g) = &self.unmask {
            let current = gw
                .reviews()
                .and_then(|r| r.active_unmask_for(&self.identity, &self.resource));
            match current {
                Some(c) if now < c.until => self.unmask = Some(c),
                _ => {
                    return Some(Ended::UnmaskGrant {
                        review: g.review_id.clone(),
                        revoked: now < g.until,
                    })
                }
            }
        }
        None
    }

    /// Resolves when the session must end; never resolves while its standing holds.
    pub async fn lost<A: Authorities + ?Sized>(mut self, gw: &A) -> Ended {
        let mut changes = gw.standing_changes();
        let mut revocations = gw.reviews().map(|r| r.revocations());
        let every = gw.grant_recheck();
        let mut recheck = tokio::time::interval_at(Instant::now() + every, every);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            // Far-off deadlines are re-armed hourly, so a stepped wall clock is noticed.
            let wait = self
                .deadline()
                .map(|d| {
                    d.duration_since(SystemTime::now())
                        .unwrap_or(Duration::ZERO)
                })
                .unwrap_or(Duration::from_secs(3600))
                .min(Duration::from_secs(3600));
            tokio::select! {
                _ = tokio::time::sleep(wait) => {}
                r = changes.changed() => {
                    if r.is_err() {
                        // The gateway is shutting down: nothing will notify again.
                        std::future::pending::<()>().await;
                    }
                }
                _ = recheck.tick(), if self.has_grant() => {}
                r = async { revocations.as_mut().expect("guarded").changed().await }, if self.has_grant() && revocations.is_some() => {
                    if r.is_err() {
                        revocations = None;
                    }
                }
            };
            if let Some(end) = self.check(gw, SystemTime::now()) {
                return end;
            }
        }
    }
}
