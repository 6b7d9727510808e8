//! tollgate-scan: proof that every byte is encrypted and every session goes through the gateway.
//!
//! Owns the offline lint of a configuration ([`check`]: upstream TLS opt-outs, certificate
//! expiry, key-file permissions, dangling references, unreachable resources, unknown groups,
//! fail-open audit, injected secrets that will not load), the live scan of every PostgreSQL and
//! HTTP upstream ([`scan`]: TLS handshake, chain, hostname, expiry, accepted protocol versions,
//! plaintext downgrade path or an `http://` upstream, PostgreSQL sessions that bypass the
//! gateway), the `[[identity.oidc]]` issuers ([`scan_issuers`]: discovery and JWKS over
//! verified TLS, usable keys, algorithms), the pure TLS probe builders it uses ([`probe`]), and
//! delivering findings to a webhook ([`alert`]).
//!
//! Must not: change any upstream state (the scan only reads `pg_stat_activity` and sends HTTP
//! `HEAD /`), send a password or injected credential to an upstream, or decide anything for
//! the gateway — it reports, the operator acts.

pub mod alert;
mod issuers;
mod lint;
pub mod probe;
mod scan;

use serde::Serialize;
use std::fmt;

pub use issuers::{scan_issuers, IssuerReport};
pub use lint::{check, CheckOptions};
pub use scan::{scan, scan_resource, GatewaySource, ResourceReport, ScanOptions};

/// How bad a finding is. Every finding fails `check`/`scan`; severity orders the work.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Severity {
    Critical,
    High,
    Medium,
    Low,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Severity::Critical => "critical",
            Severity::High => "high",
            Severity::Medium => "medium",
            Severity::Low => "low",
        }
    }
}

/// One weakness: a stable `kind` code, where it is (resource, config key), what and how to fix it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Finding {
    pub kind: &'static str,
    pub severity: Severity,
    /// The resource it concerns; `None` for server-wide findings.
    pub resource: Option<String>,
    /// The config key to change, e.g. `resources.tls.mode` or `server.tls_key`.
    pub key: String,
    pub message: String,
    pub fix: String,
}

impl Finding {
    pub(crate) fn new(
        kind: &'static str,
        severity: Severity,
        resource: Option<&str>,
        key: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Finding {
        Finding {
            kind,
            severity,
            resource: resource.map(str::to_string),
            key: key.into(),
            message: message.into(),
            fix: fix.into(),
        }
    }
}

/// One line: `SEVERITY kind [resource] key: message (fix: ...)`.
impl fmt::Display for Finding {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<8} {}",
            self.severity.as_str().to_uppercase(),
            self.kind
        )?;
        if let Some(r) = &self.resource {
            write!(f, " [{r}]")?;
        }
        write!(f, " {}: {} (fix: {})", self.key, self.message, self.fix)
    }
}

/// Whole days from `now` until `t` (negative once `t` has passed).
pub(crate) fn days_until(t: std::time::SystemTime, now: std::time::SystemTime) -> i64 {
    match t.duration_since(now) {
        Ok(d) => (d.as_secs() / 86_400) as i64,
        Err(e) => -(e.duration().as_secs().div_ceil(86_400) as i64),
    }
}

pub(crate) fn rfc3339(t: std::time::SystemTime) -> String {
    time::OffsetDateTime::from(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn finding_line_names_resource_key_and_fix() {
        let f = Finding::new(
            "audit_fail_open",
            Severity::High,
            Some("orders"),
            "server.audit_failure",
            "m",
            "f",
        );
        assert_eq!(
            f.to_string(),
            "HIGH     audit_fail_open [orders] server.audit_failure: m (fix: f)"
        );
    }

    #[test]
    fn dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(UNIX_EPOCH + Duration::from_secs(1_709_251_199)),
            "2024-02-29T23:59:59Z"
        );
        let now = UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(
            days_until(now + Duration::from_secs(86_400 * 3 + 5), now),
            3
        );
        assert_eq!(days_until(now - Duration::from_secs(10), now), -1);
    }
}
