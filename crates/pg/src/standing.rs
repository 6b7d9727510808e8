//! The PostgreSQL listener's side of the shared standing watch
//! ([`tollgate_gate::standing`]): where its revocation list, tokens and issuers are.

use crate::PgGateway;
use std::time::Duration;
pub(crate) use tollgate_gate::standing::{Authorities, Ended, Standing};
use tollgate_review::Reviews;

impl Authorities for PgGateway {
    fn cert_revoked(&self, der: &[u8]) -> bool {
        self.tls.is_revoked(der)
    }

    fn token_holds(&self, sha256_hex: &str, subject: &str) -> bool {
        self.tokens.load().holds(sha256_hex, subject)
    }

    fn has_issuer(&self, issuer: &str) -> bool {
        self.oidc.has_issuer(issuer)
    }

    fn reviews(&self) -> Option<&Reviews> {
        self.reviews.as_deref()
    }

    fn standing_changes(&self) -> tokio::sync::watch::Receiver<u64> {
        self.standing.subscribe()
    }

    fn grant_recheck(&self) -> Duration {
        self.grant_recheck
    }
}
