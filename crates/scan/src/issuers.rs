//! The live scan of `[[identity.oidc]]` issuers: discovery and JWKS fetched over verified TLS
//! exactly as the gateway fetches them, then what would stop tokens from validating (no usable
//! key, no key for any configured algorithm) or weaken sign-in (an issuer that advertises
//! `none` or HS* ID token signatures, a sign-in client without PKCE S256).

use serde::Serialize;
use tollgate_config::Config;

use crate::{Finding, Severity};

/// One issuer's scan.
#[derive(Clone, Debug, Serialize)]
pub struct IssuerReport {
    pub issuer: String,
    pub reachable: bool,
    pub usable_keys: usize,
    pub advertised_algorithms: Vec<String>,
    pub algorithms_with_keys: Vec<String>,
    pub pkce_s256: bool,
    pub device_flow: bool,
    pub findings: Vec<Finding>,
}

/// Scan every configured issuer, one after another.
pub async fn scan_issuers(config: &Config) -> Vec<IssuerReport> {
    let mut out = Vec::new();
    for o in &config.identity.oidc {
        let facts = tollgate_identity::oidc::inspect_issuer(o).await;
        out.push(report(o, facts));
    }
    out
}

fn report(o: &tollgate_config::Oidc, facts: tollgate_identity::oidc::IssuerFacts) -> IssuerReport {
    let mut findings = Vec::new();
    let finding = |kind, severity, key: &str, message: String, fix: &str| {
        Finding::new(
            kind,
            severity,
            None,
            format!("identity.oidc.{key}"),
            message,
            fix,
        )
    };
    match &facts.error {
        Some(e) => findings.push(finding(
            "oidc_issuer_unreachable",
            Severity::High,
            "issuer",
            format!("{}: discovery or JWKS could not be fetched over verified TLS: {e}", o.issuer),
            "check the issuer URL, the network path and identity.oidc.ca (the IdP's CA); until then every token of this issuer is refused",
        )),
        None if facts.usable_keys == 0 => findings.push(finding(
            "oidc_no_usable_key",
            Severity::High,
            "issuer",
            format!("{}: the JWKS holds no RSA, P-256/P-384 or Ed25519 signature key", o.issuer),
            "publish an asymmetric signing key at the IdP; tokens of this issuer cannot be validated",
        )),
        None if facts.algorithms_with_keys.is_empty() => findings.push(finding(
            "oidc_no_key_for_algorithms",
            Severity::High,
            "algorithms",
            format!(
                "{}: no published key can verify any of the configured algorithms ({})",
                o.issuer,
                o.algorithms.join(", ")
            ),
            "set identity.oidc.algorithms to the IdP's signing algorithm (RS256, ES256, EdDSA...)",
        )),
        None => {}
    }
    let weak: Vec<&String> = facts
        .advertised_algorithms
        .iter()
        .filter(|a| a.eq_ignore_ascii_case("none") || a.to_ascii_uppercase().starts_with("HS"))
        .collect();
    if !weak.is_empty() {
        findings.push(finding(
            "oidc_weak_algorithm_advertised",
            Severity::Medium,
            "issuer",
            format!(
                "{}: the IdP advertises ID token signatures {:?}; tollgate refuses them, but another relying party of this IdP may not",
                o.issuer, weak
            ),
            "turn off unsigned and HMAC-signed ID tokens at the IdP",
        ));
    }
    if o.client_id.is_some() && facts.error.is_none() && !facts.pkce_s256 {
        findings.push(finding(
            "oidc_no_pkce",
            Severity::Medium,
            "client_id",
            format!("{}: the discovery document does not list PKCE S256 (code_challenge_methods_supported), which tollgate login and the console sign-in use", o.issuer),
            "enable PKCE (S256) for the client at the IdP",
        ));
    }
    IssuerReport {
        issuer: o.issuer.clone(),
        reachable: facts.error.is_none(),
        usable_keys: facts.usable_keys,
        advertised_algorithms: facts.advertised_algorithms,
        algorithms_with_keys: facts.algorithms_with_keys,
        pkce_s256: facts.pkce_s256,
        device_flow: facts.device_flow,
        findings,
    }
}
