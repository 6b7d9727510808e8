//! OpenID Connect bearer tokens (`[[identity.oidc]]`): a JWT signed by a configured issuer
//! becomes an [`Identity`] (`AuthMethod::Oidc`, `Principal::oidc(issuer, sub)`, groups from a
//! claim, expiry from `exp`).
//!
//! Keys come from the issuer's discovery document and JWKS over HTTPS, cached by `kid`; a token
//! naming an unknown `kid` makes the issuer's keys be fetched again, at most once per
//! [`REFRESH_INTERVAL`], so a key rotated at the IdP is picked up without a restart. A failed fetch
//! never makes a token valid. Signatures are checked with `ring` for the asymmetric algorithms
//! of [`tollgate_config::OIDC_ALGORITHMS`]; the header's `alg` must be on the issuer's allow-list
//! and fit the key's type, so `none` and HS* (an HMAC "signed" with a public key) never pass.
//! Errors carry a fixed reason label for logs and metrics, never the token.

use crate::{AuthMethod, Identity, Principal};
use base64::Engine;
use serde_json::Value;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant, SystemTime};
use tollgate_config::Oidc;
use tollgate_metrics::registry;

/// Least time between two key fetches of one issuer caused by unknown `kid`s.
pub const REFRESH_INTERVAL: Duration = Duration::from_secs(30);
/// After a failed fetch, the next one waits this long (an IdP outage is not hammered).
pub const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// Clock skew tolerated on `exp`, `nbf` and `iat`.
pub const LEEWAY: Duration = Duration::from_secs(60);
/// Longest a discovery or JWKS fetch (connect, TLS, request, body) may take.
pub const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Largest token considered, and largest discovery document or JWKS read.
const MAX_TOKEN: usize = 16 * 1024;
const MAX_DOCUMENT: usize = 1024 * 1024;
/// The system CA bundle, as for webhooks, when an issuer names no `ca`.
const SYSTEM_BUNDLE: &str = tollgate_webhook::SYSTEM_BUNDLE;

/// Why a token was refused. The message is safe for logs; clients get a generic answer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OidcError {
    #[error("the token is not a well-formed JWT")]
    Malformed,
    #[error("the token's issuer is not configured")]
    UnknownIssuer,
    #[error("the token's algorithm is not accepted for its issuer")]
    BadAlgorithm,
    #[error("the token names a key the issuer does not publish")]
    UnknownKey,
    #[error("the issuer's keys could not be fetched")]
    KeysUnavailable,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token has expired")]
    Expired,
    #[error("the token has no expiry")]
    NoExpiry,
    #[error("the token is not valid yet")]
    NotYetValid,
    #[error("the token was issued in the future")]
    IssuedInFuture,
    #[error("the token is for another audience")]
    WrongAudience,
    #[error("the token names no subject")]
    NoSubject,
    #[error("the token's e-mail address, its subject, is marked unverified by the issuer")]
    UnverifiedEmail,
    #[error("the ID token's nonce is not the one this sign-in sent")]
    NonceMismatch,
}

impl OidcError {
    /// A bounded metrics and log label.
    pub fn reason(&self) -> &'static str {
        match self {
            OidcError::Malformed => "malformed",
            OidcError::UnknownIssuer => "unknown_issuer",
            OidcError::BadAlgorithm => "bad_algorithm",
            OidcError::UnknownKey => "unknown_kid",
            OidcError::KeysUnavailable => "keys_unavailable",
            OidcError::BadSignature => "bad_signature",
            OidcError::Expired => "expired",
            OidcError::NoExpiry => "no_expiry",
            OidcError::NotYetValid => "not_yet_valid",
            OidcError::IssuedInFuture => "issued_in_future",
            OidcError::WrongAudience => "wrong_audience",
            OidcError::NoSubject => "no_subject",
            OidcError::UnverifiedEmail => "unverified_email",
            OidcError::NonceMismatch => "nonce_mismatch",
        }
    }
}

/// Whether a bearer token has the shape of a JWS compact serialization (three base64url parts),
/// so it is worth checking against the configured issuers.
pub fn looks_like_jwt(token: &str) -> bool {
    let parts: Vec<&str> = token.split('.').collect();
    token.len() <= MAX_TOKEN
        && parts.len() == 3
        && parts[..2].iter().all(|p| !p.is_empty())
        && parts.iter().all(|p| {
            p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Every configured issuer. Shared by the listeners; [`OidcVerifiers::apply`] swaps in the
/// issuers of a reloaded config, keeping the key cache of an issuer whose settings are unchanged.
#[derive(Default)]
pub struct OidcVerifiers {
    issuers: arc_swap::ArcSwap<Vec<Arc<Issuer>>>,
}

/// Issuers of a new config, built (CA files read) but not in force yet.
pub struct PreparedOidc(Vec<Arc<Issuer>>);

impl OidcVerifiers {
    pub fn new(configs: &[Oidc]) -> Result<OidcVerifiers, String> {
        let v = OidcVerifiers::default();
        let prepared = v.prepare(configs)?;
        v.apply(prepared);
        Ok(v)
    }

    /// Build the issuers of `configs`; `Err` names the issuer whose CA cannot be used.
    pub fn prepare(&self, configs: &[Oidc]) -> Result<PreparedOidc, String> {
        let current = self.issuers.load();
        configs
            .iter()
            .map(|c| match current.iter().find(|i| i.config == *c) {
                Some(same) => Ok(same.clone()),
                None => Issuer::new(c).map(Arc::new),
            })
            .collect::<Result<Vec<_>, _>>()
            .map(PreparedOidc)
    }

    pub fn apply(&self, prepared: PreparedOidc) {
        self.issuers.store(Arc::new(prepared.0));
    }

    pub fn is_empty(&self) -> bool {
        self.issuers.load().is_empty()
    }

    /// The configured issuers' URLs (the authorization servers MCP clients are pointed at).
    pub fn issuers(&self) -> Vec<String> {
        self.issuers
            .load()
            .iter()
            .map(|i| i.config.issuer.clone())
            .collect()
    }

    /// Whether `issuer` is (still) configured.
    pub fn has_issuer(&self, issuer: &str) -> bool {
        self.issuers
            .load()
            .iter()
            .any(|i| i.config.issuer == issuer)
    }

    /// Fetch the keys of every issuer that has none yet in the background, logging the outcome: an IdP that is down
    /// at start-up delays nothing (its keys are fetched again when a token needs them).
    pub fn warm_up(&self) {
        for issuer in self.issuers.load().iter() {
            let issuer = issuer.clone();
            tokio::spawn(async move {
                let mut fetch = issuer.fetch.lock().await;
                if fetch.last_ok.is_some() {
                    return;
                }
                if let Ok(n) = issuer.refresh(&mut fetch).await {
                    tracing::info!(issuer = %issuer.config.issuer, keys = n, "OIDC issuer's signing keys fetched");
                }
            });
        }
    }

    /// Validate a token against the issuer its `iss` names, counting the outcome in
    /// `tollgate_oidc_validations_total` and logging a refusal's reason.
    pub async fn verify(&self, token: &str) -> Result<Identity, OidcError> {
        self.verify_for(token, Audience::Gateway).await
    }

    /// [`OidcVerifiers::verify`] with the audience the token must be for.
    pub async fn verify_for(&self, token: &str, aud: Audience<'_>) -> Result<Identity, OidcError> {
        let issuers = self.issuers.load_full();
        let (label, result) = match Jwt::parse(token) {
            Err(e) => ("unknown".to_string(), Err(e)),
            Ok(jwt) => match issuers
                .iter()
                .find(|i| jwt.claims.get("iss").and_then(Value::as_str) == Some(&i.config.issuer))
            {
                None => ("unknown".to_string(), Err(OidcError::UnknownIssuer)),
                Some(issuer) => (issuer.label.clone(), issuer.verify(&jwt, aud).await),
            },
        };
        let (outcome, reason) = match &result {
            Ok(_) => ("accepted", "ok"),
            Err(e) => ("refused", e.reason()),
        };
        registry()
            .counter(
                "tollgate_oidc_validations_total",
                "OIDC bearer token validations by issuer host, outcome and reason.",
                &[("issuer", &label), ("outcome", outcome), ("reason", reason)],
            )
            .inc();
        if let Err(e) = &result {
            tracing::info!(issuer = %label, reason, error = %e, "OIDC token refused");
        }
        result
    }
}

impl OidcVerifiers {
    /// The settings of a configured issuer (the console's sign-in links and its token exchange).
    pub fn issuer_config(&self, issuer: &str) -> Option<Oidc> {
        self.issuers
            .load()
            .iter()
            .find(|i| i.config.issuer == issuer)
            .map(|i| i.config.clone())
    }

    /// Every configured issuer that has a `client_id` (people can sign in with it).
    pub fn sign_in_issuers(&self) -> Vec<Oidc> {
        self.issuers
            .load()
            .iter()
            .filter(|i| i.config.client_id.is_some())
            .map(|i| i.config.clone())
            .collect()
    }

    /// The TLS trust of a configured issuer, for the sign-in's own requests to it.
    pub fn issuer_tls(&self, issuer: &str) -> Option<Arc<rustls::ClientConfig>> {
        self.issuers
            .load()
            .iter()
            .find(|i| i.config.issuer == issuer)
            .map(|i| i.tls.clone())
    }

    /// An ID token of an interactive sign-in: [`OidcVerifiers::verify`], and its `nonce` must
    /// be the one the sign-in sent (a token injected from another sign-in is refused).
    pub async fn verify_id_token(&self, token: &str, nonce: &str) -> Result<Identity, OidcError> {
        let who = self.verify(token).await?;
        let sent = Jwt::parse(token)?
            .claims
            .get("nonce")
            .and_then(Value::as_str)
            .map(str::to_string)
            .unwrap_or_default();
        if sent.is_empty() || !crate::ct_eq(sent.as_bytes(), nonce.as_bytes()) {
            tracing::info!(reason = "nonce_mismatch", "OIDC ID token refused");
            return Err(OidcError::NonceMismatch);
        }
        Ok(who)
    }
}

/// Which `aud` values a token must carry (one of them suffices).
#[derive(Debug, Clone, Copy)]
pub enum Audience<'a> {
    /// The gateway's own: the issuer's `audiences` or its `client_id` (PostgreSQL and MySQL
    /// passwords, the API, HTTP resources).
    Gateway,
    /// One resource's only (RFC 8707: an MCP resource accepts only tokens issued for it): its
    /// URL(s) as the protected resource metadata names it, and its configured `audiences`.
    Resource(&'a [String]),
}

/// What `tollgate scan` learns about a configured issuer over verified TLS.
#[derive(Debug, Clone, Default)]
pub struct IssuerFacts {
    /// Why discovery or the JWKS could not be fetched (TLS verified with the issuer's `ca` or
    /// the system roots); `None` when both were.
    pub error: Option<String>,
    /// `id_token_signing_alg_values_supported` of the discovery document.
    pub advertised_algorithms: Vec<String>,
    /// Signature keys in the JWKS that tollgate can use.
    pub usable_keys: usize,
    /// The configured `algorithms` some published key can verify.
    pub algorithms_with_keys: Vec<String>,
    /// `code_challenge_methods_supported` lists S256.
    pub pkce_s256: bool,
    pub device_flow: bool,
}

/// Discovery, then the JWKS, of `config`'s issuer, as the gateway fetches them.
pub async fn inspect_issuer(config: &Oidc) -> IssuerFacts {
    let issuer = match Issuer::new(config) {
        Ok(i) => i,
        Err(e) => {
            return IssuerFacts {
                error: Some(e),
                ..Default::default()
            }
        }
    };
    let provider =
        match crate::oidc_login::Provider::discover(&config.issuer, issuer.tls.clone()).await {
            Ok(p) => p,
            Err(e) => {
                return IssuerFacts {
                    error: Some(e.to_string()),
                    ..Default::default()
                }
            }
        };
    let doc = &provider.document;
    let strings = |k: &str| -> Vec<String> {
        doc.get(k)
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(Value::as_str)
                    .map(String::from)
                    .collect()
            })
            .unwrap_or_default()
    };
    let mut facts = IssuerFacts {
        error: None,
        advertised_algorithms: strings("id_token_signing_alg_values_supported"),
        pkce_s256: strings("code_challenge_methods_supported")
            .iter()
            .any(|m| m == "S256"),
        device_flow: provider.device_authorization_endpoint.is_some(),
        ..Default::default()
    };
    let mut fetch = FetchState {
        jwks_uri: Some(provider.jwks_uri.clone()),
        ..Default::default()
    };
    match issuer.fetch_keys(&mut fetch).await {
        Ok(keys) => {
            facts.usable_keys = keys.len();
            facts.algorithms_with_keys = config
                .algorithms
                .iter()
                .filter(|a| keys.iter().any(|k| k.fits(a)))
                .cloned()
                .collect();
        }
        Err(e) => facts.error = Some(format!("JWKS {}: {e}", provider.jwks_uri)),
    }
    facts
}

/// A JWS compact token split and decoded, not yet verified.
struct Jwt {
    alg: String,
    kid: Option<String>,
    claims: Value,
    signing_input: String,
    signature: Vec<u8>,
}

fn b64(part: &str) -> Result<Vec<u8>, OidcError> {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| OidcError::Malformed)
}

impl Jwt {
    fn parse(token: &str) -> Result<Jwt, OidcError> {
        if !looks_like_jwt(token) {
            return Err(OidcError::Malformed);
        }
        let mut parts = token.split('.');
        let (h, p, s) = (
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
            parts.next().unwrap_or(""),
        );
        let header: Value = serde_json::from_slice(&b64(h)?).map_err(|_| OidcError::Malformed)?;
        let claims: Value = serde_json::from_slice(&b64(p)?).map_err(|_| OidcError::Malformed)?;
        if !header.is_object() || !claims.is_object() {
            return Err(OidcError::Malformed);
        }
        // Extensions we do not understand must not be ignored (RFC 7515 §4.1.11).
        if header.get("crit").is_some() {
            return Err(OidcError::Malformed);
        }
        let alg = header
            .get("alg")
            .and_then(Value::as_str)
            .ok_or(OidcError::Malformed)?
            .to_string();
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) => Some(k.clone()),
            Some(_) => return Err(OidcError::Malformed),
        };
        Ok(Jwt {
            alg,
            kid,
            claims,
            signing_input: format!("{h}.{p}"),
            signature: b64(s)?,
        })
    }
}

/// A public key from a JWKS.
#[derive(Debug, Clone)]
struct Jwk {
    kid: Option<String>,
    alg: Option<String>,
    key: KeyMaterial,
}

#[derive(Debug, Clone)]
enum KeyMaterial {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// Uncompressed point (0x04 ‖ x ‖ y).
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

impl Jwk {
    /// `None` for keys that cannot verify signatures here (encryption keys, symmetric keys,
    /// other curves, malformed members).
    fn parse(v: &Value) -> Option<Jwk> {
        let s = |k: &str| v.get(k).and_then(Value::as_str);
        let bytes = |k: &str| s(k).and_then(|x| b64(x).ok());
        if s("use").is_some_and(|u| u != "sig") {
            return None;
        }
        let point = |len: usize| {
            let (x, y) = (bytes("x")?, bytes("y")?);
            (x.len() == len && y.len() == len).then(|| [&[4u8][..], &x, &y].concat())
        };
        let key = match (s("kty")?, s("crv")) {
            ("RSA", _) => KeyMaterial::Rsa {
                n: bytes("n")?,
                e: bytes("e")?,
            },
            ("EC", Some("P-256")) => KeyMaterial::P256(point(32)?),
            ("EC", Some("P-384")) => KeyMaterial::P384(point(48)?),
            ("OKP", Some("Ed25519")) => {
                let x = bytes("x")?;
                (x.len() == 32).then_some(KeyMaterial::Ed25519(x))?
            }
            _ => return None,
        };
        Some(Jwk {
            kid: s("kid").map(str::to_string),
            alg: s("alg").map(str::to_string),
            key,
        })
    }

    /// Whether this key can verify `alg` (the key's type decides, never the token alone).
    fn fits(&self, alg: &str) -> bool {
        let type_fits = matches!(
            (alg, &self.key),
            ("RS256" | "RS384" | "RS512", KeyMaterial::Rsa { .. })
                | ("ES256", KeyMaterial::P256(_))
                | ("ES384", KeyMaterial::P384(_))
                | ("EdDSA", KeyMaterial::Ed25519(_))
        );
        type_fits && self.alg.as_deref().is_none_or(|a| a == alg)
    }

    fn verify(&self, alg: &str, message: &[u8], signature: &[u8]) -> bool {
        use ring::signature as sig;
        match (&self.key, alg) {
            (KeyMaterial::Rsa { n, e }, _) => {
                let params = match alg {
                    "RS256" => &sig::RSA_PKCS1_2048_8192_SHA256,
                    "RS384" => &sig::RSA_PKCS1_2048_8192_SHA384,
                    "RS512" => &sig::RSA_PKCS1_2048_8192_SHA512,
                    _ => return false,
                };
                sig::RsaPublicKeyComponents { n, e }
                    .verify(params, message, signature)
                    .is_ok()
            }
            (KeyMaterial::P256(p), "ES256") => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P256_SHA256_FIXED, p)
                    .verify(message, signature)
                    .is_ok()
            }
            (KeyMaterial::P384(p), "ES384") => {
                sig::UnparsedPublicKey::new(&sig::ECDSA_P384_SHA384_FIXED, p)
                    .verify(message, signature)
                    .is_ok()
            }
            (KeyMaterial::Ed25519(x), "EdDSA") => sig::UnparsedPublicKey::new(&sig::ED25519, x)
                .verify(message, signature)
                .is_ok(),
            _ => false,
        }
    }
}

/// The keys for a token: by `kid` when it names one, else every key of a fitting type.
fn candidates<'a>(keys: &'a [Jwk], jwt: &Jwt) -> Vec<&'a Jwk> {
    keys.iter()
        .filter(|k| match &jwt.kid {
            Some(kid) => k.kid.as_deref() == Some(kid.as_str()),
            None => true,
        })
        .filter(|k| k.fits(&jwt.alg))
        .collect()
}

/// One `[[identity.oidc]]` issuer: its settings, HTTPS client and cached keys.
struct Issuer {
    config: Oidc,
    /// Metrics label: the issuer's host (bounded by config).
    label: String,
    tls: Arc<rustls::ClientConfig>,
    keys: RwLock<Arc<Vec<Jwk>>>,
    fetch: tokio::sync::Mutex<FetchState>,
}

#[derive(Default)]
struct FetchState {
    jwks_uri: Option<String>,
    last_ok: Option<Instant>,
    last_failure: Option<Instant>,
}

impl FetchState {
    fn may_fetch(&self, now: Instant) -> bool {
        let waited = |at: Option<Instant>, gap| at.is_none_or(|t| now.duration_since(t) >= gap);
        waited(self.last_ok, REFRESH_INTERVAL) && waited(self.last_failure, RETRY_AFTER_FAILURE)
    }
}

impl Issuer {
    fn new(config: &Oidc) -> Result<Issuer, String> {
        let what = format!("identity.oidc {:?}: ca", config.issuer);
        let bundle = config
            .ca
            .clone()
            .unwrap_or_else(|| PathBuf::from(SYSTEM_BUNDLE));
        let label = tollgate_webhook::WebhookUrl::parse(&config.issuer)
            .map(|u| u.host)
            .unwrap_or_else(|_| "invalid".into());
        Ok(Issuer {
            config: config.clone(),
            label,
            tls: client_config(&bundle, &what)?,
            keys: RwLock::new(Arc::new(Vec::new())),
            fetch: tokio::sync::Mutex::new(FetchState::default()),
        })
    }

    fn cached(&self) -> Arc<Vec<Jwk>> {
        self.keys.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn verify(&self, jwt: &Jwt, aud: Audience<'_>) -> Result<Identity, OidcError> {
        if !self.config.algorithms.contains(&jwt.alg) {
            return Err(OidcError::BadAlgorithm);
        }
        let key = self.key_for(jwt).await?;
        check_for(&self.config, jwt, &key, SystemTime::now(), aud)
    }

    /// A key that fits the token, fetching the issuer's keys when none is cached (rate-limited).
    async fn key_for(&self, jwt: &Jwt) -> Result<Vec<Jwk>, OidcError> {
        let found = |keys: &[Jwk]| {
            let c: Vec<Jwk> = candidates(keys, jwt).into_iter().cloned().collect();
            (!c.is_empty()).then_some(c)
        };
        if let Some(k) = found(&self.cached()) {
            return Ok(k);
        }
        let mut fetch = self.fetch.lock().await;
        // Another request may have fetched while this one waited.
        if let Some(k) = found(&self.cached()) {
            return Ok(k);
        }
        if !fetch.may_fetch(Instant::now()) {
            return Err(if fetch.last_ok.is_some() {
                OidcError::UnknownKey
            } else {
                OidcError::KeysUnavailable
            });
        }
        self.refresh(&mut fetch)
            .await
            .map_err(|_| OidcError::KeysUnavailable)?;
        found(&self.cached()).ok_or(OidcError::UnknownKey)
    }

    /// Discovery (when the JWKS location is not known yet) and the JWKS; the cache is replaced
    /// only by a JWKS that parsed. Returns how many usable keys it holds.
    async fn refresh(&self, fetch: &mut FetchState) -> Result<usize, ()> {
        let result = self.fetch_keys(fetch).await;
        match result {
            Ok(keys) => {
                let n = keys.len();
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(keys);
                fetch.last_ok = Some(Instant::now());
                Ok(n)
            }
            Err(e) => {
                // The next attempt starts again from discovery.
                fetch.jwks_uri = None;
                fetch.last_failure = Some(Instant::now());
                registry()
                    .counter(
                        "tollgate_oidc_key_fetch_failures_total",
                        "Failed discovery or JWKS fetches by issuer host.",
                        &[("issuer", &self.label)],
                    )
                    .inc();
                tracing::warn!(issuer = %self.config.issuer, error = %e, "could not fetch the OIDC issuer's signing keys; its tokens are refused until they can be fetched");
                Err(())
            }
        }
    }

    async fn fetch_keys(&self, fetch: &mut FetchState) -> Result<Vec<Jwk>, String> {
        let jwks_uri = match &fetch.jwks_uri {
            Some(u) => u.clone(),
            None => {
                let url = format!(
                    "{}/.well-known/openid-configuration",
                    self.config.issuer.trim_end_matches('/')
                );
                let doc = get_json(&url, &self.tls).await?;
                let issuer = doc.get("issuer").and_then(Value::as_str);
                if issuer != Some(self.config.issuer.as_str()) {
                    return Err(format!(
                        "the discovery document names issuer {issuer:?}, not the configured {:?}",
                        self.config.issuer
                    ));
                }
                let uri = doc
                    .get("jwks_uri")
                    .and_then(Value::as_str)
                    .filter(|u| u.starts_with("https://"))
                    .ok_or("the discovery document has no https:// jwks_uri")?
                    .to_string();
                fetch.jwks_uri = Some(uri.clone());
                uri
            }
        };
        let jwks = get_json(&jwks_uri, &self.tls).await?;
        let keys = jwks
            .get("keys")
            .and_then(Value::as_array)
            .ok_or("the JWKS has no \"keys\" array")?;
        Ok(keys.iter().filter_map(Jwk::parse).collect())
    }
}

/// [`check_for`] a token for the gateway.
#[cfg(test)]
fn check(config: &Oidc, jwt: &Jwt, keys: &[Jwk], now: SystemTime) -> Result<Identity, OidcError> {
    check_for(config, jwt, keys, now, Audience::Gateway)
}

/// Signature, then claims. `keys` are the candidates that fit the token's `kid` and `alg`.
fn check_for(
    config: &Oidc,
    jwt: &Jwt,
    keys: &[Jwk],
    now: SystemTime,
    aud: Audience<'_>,
) -> Result<Identity, OidcError> {
    if !keys
        .iter()
        .any(|k| k.verify(&jwt.alg, jwt.signing_input.as_bytes(), &jwt.signature))
    {
        return Err(OidcError::BadSignature);
    }
    let c = &jwt.claims;
    if c.get("iss").and_then(Value::as_str) != Some(config.issuer.as_str()) {
        return Err(OidcError::UnknownIssuer);
    }
    // The ID tokens of an interactive sign-in (`tollgate login`, the console) are for the
    // issuer's `client_id`: that audience is tollgate's own too.
    let ours = |a: &str| match aud {
        Audience::Gateway => {
            config.audiences.iter().any(|w| w == a) || config.client_id.as_deref() == Some(a)
        }
        Audience::Resource(for_it) => for_it.iter().any(|w| w == a),
    };
    let audience_ok = match c.get("aud") {
        Some(Value::String(a)) => ours(a),
        Some(Value::Array(v)) => v.iter().filter_map(Value::as_str).any(ours),
        _ => false,
    };
    if !audience_ok {
        return Err(OidcError::WrongAudience);
    }
    let now_s = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0);
    let leeway = LEEWAY.as_secs_f64();
    let time = |k: &str| -> Result<Option<f64>, OidcError> {
        match c.get(k) {
            None => Ok(None),
            Some(v) => v
                .as_f64()
                .filter(|t| t.is_finite() && *t >= 0.0)
                .map(Some)
                .ok_or(OidcError::Malformed),
        }
    };
    let exp = time("exp")?.ok_or(OidcError::NoExpiry)?;
    let expires_at = Duration::try_from_secs_f64(exp)
        .ok()
        .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
        .ok_or(OidcError::Malformed)?;
    if now_s >= exp + leeway {
        return Err(OidcError::Expired);
    }
    if time("nbf")?.is_some_and(|nbf| now_s + leeway < nbf) {
        return Err(OidcError::NotYetValid);
    }
    if time("iat")?.is_some_and(|iat| now_s + leeway < iat) {
        return Err(OidcError::IssuedInFuture);
    }
    let subject = claim_at(c, &config.subject_claim)
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .ok_or(OidcError::NoSubject)?
        .to_string();
    if subject_is_unverified_email(config, c) {
        return Err(OidcError::UnverifiedEmail);
    }
    let mut groups = BTreeSet::new();
    match claim_at(c, &config.groups_claim) {
        Some(Value::String(g)) => {
            groups.insert(g.clone());
        }
        Some(Value::Array(v)) => {
            groups.extend(v.iter().filter_map(Value::as_str).map(String::from))
        }
        Some(_) => {}
        None => {
            // Entra ID replaces a long groups claim by a link to Graph (group overage).
            if c.pointer("/_claim_names/groups").is_some() {
                tracing::warn!(issuer = %config.issuer, subject = %subject, "the token's groups claim was left out by the IdP (group overage: too many groups); no groups are taken from it, only identity.oidc.static_groups");
            }
        }
    }
    let mut groups: BTreeSet<String> = groups
        .into_iter()
        .map(|g| config.group_map.get(&g).cloned().unwrap_or(g))
        .collect();
    groups.extend(config.static_groups.iter().cloned());
    Ok(Identity {
        principal: Principal::oidc(&config.issuer, &subject),
        subject,
        groups: groups.into_iter().collect(),
        method: AuthMethod::Oidc,
        cert_fingerprint: None,
        cert_not_after: None,
        expires_at: Some(expires_at),
    })
}

/// An identity named by e-mail is only as good as the issuer's check of that address: where the
/// issuer says `email_verified: false`, anyone who typed the address at sign-up would become its
/// owner here (the "nOAuth" takeover). An absent claim is accepted, as many access tokens omit it.
fn subject_is_unverified_email(config: &Oidc, claims: &Value) -> bool {
    let by_email = config.subject_claim == "email" || config.subject_claim.ends_with(".email");
    let verified = |v: &Value| *v == Value::Bool(true) || v.as_str() == Some("true");
    by_email && claims.get("email_verified").is_some_and(|v| !verified(v))
}

/// A claim by name (which may itself hold dots, as namespaced claims do), else by dotted path.
fn claim_at<'a>(claims: &'a Value, path: &str) -> Option<&'a Value> {
    if let Some(v) = claims.get(path) {
        return Some(v);
    }
    path.split('.').try_fold(claims, |v, k| v.get(k))
}

pub(crate) fn client_config(
    bundle: &Path,
    what: &str,
) -> Result<Arc<rustls::ClientConfig>, String> {
    let mut roots = rustls::RootCertStore::empty();
    let certs = tollgate_tls::load_certs(bundle).map_err(|e| format!("{what}: {e}"))?;
    let (added, _) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(format!(
            "{what}: no usable certificate in {}",
            bundle.display()
        ));
    }
    let mut c = rustls::ClientConfig::builder_with_provider(tollgate_tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?
        .with_root_certificates(roots)
        .with_no_client_auth();
    c.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(c))
}

/// GET an https:// URL and parse its 200 answer as JSON, within [`FETCH_TIMEOUT`].
async fn get_json(url: &str, tls: &Arc<rustls::ClientConfig>) -> Result<Value, String> {
    match fetch_json(url, tls, None).await? {
        (200, v) => Ok(v),
        (status, _) => Err(format!("GET {url}: the server answered {status}")),
    }
}

/// GET (or, with `form`, POST `application/x-www-form-urlencoded`) an https:// URL within
/// [`FETCH_TIMEOUT`]: the answer's status and its body as JSON (`Null` when it is not JSON).
pub(crate) async fn fetch_json(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
    form: Option<&str>,
) -> Result<(u16, Value), String> {
    fetch_json_with(url, tls, form, None).await
}

/// [`fetch_json`] with an `Authorization` header (a confidential client's credentials).
pub(crate) async fn fetch_json_with(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
    form: Option<&str>,
    authorization: Option<&str>,
) -> Result<(u16, Value), String> {
    let verb = if form.is_some() { "POST" } else { "GET" };
    match tokio::time::timeout(
        FETCH_TIMEOUT,
        fetch_json_inner(url, tls, form, authorization),
    )
    .await
    {
        Ok(r) => r.map_err(|e| format!("{verb} {url}: {e}")),
        Err(_) => Err(format!(
            "{verb} {url}: timed out after {}s",
            FETCH_TIMEOUT.as_secs()
        )),
    }
}

async fn fetch_json_inner(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
    form: Option<&str>,
    authorization: Option<&str>,
) -> Result<(u16, Value), String> {
    let (status, body) = fetch_inner(url, tls, form, authorization, "application/json").await?;
    match serde_json::from_slice(&body) {
        Ok(v) => Ok((status, v)),
        Err(_) if status != 200 => Ok((status, Value::Null)),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

async fn fetch_inner(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
    form: Option<&str>,
    authorization: Option<&str>,
    accept: &'static str,
) -> Result<(u16, bytes::Bytes), String> {
    use http_body_util::BodyExt;
    let u = tollgate_webhook::WebhookUrl::parse(url)?;
    if !u.tls {
        return Err("only https:// is fetched".into());
    }
    let tcp = tokio::net::TcpStream::connect((u.host.as_str(), u.port))
        .await
        .map_err(|e| e.to_string())?;
    let name = rustls_pki_types::ServerName::try_from(u.host.clone()).map_err(|e| e.to_string())?;
    let stream = tokio_rustls::TlsConnector::from(tls.clone())
        .connect(name, tcp)
        .await
        .map_err(|e| format!("TLS: {e}"))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| e.to_string())?;
    let conn = tokio::spawn(conn);
    let host = if u.host.contains(':') {
        format!("[{}]:{}", u.host, u.port)
    } else {
        format!("{}:{}", u.host, u.port)
    };
    let mut builder = hyper::Request::builder()
        .uri(u.path.as_str())
        .header(hyper::header::HOST, host)
        .header(hyper::header::ACCEPT, accept)
        .header(hyper::header::USER_AGENT, "tollgate");
    if let Some(a) = authorization {
        builder = builder.header(hyper::header::AUTHORIZATION, a);
    }
    let req = match form {
        None => builder
            .method(hyper::Method::GET)
            .body(http_body_util::Full::new(bytes::Bytes::new())),
        Some(f) => builder
            .method(hyper::Method::POST)
            .header(
                hyper::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(http_body_util::Full::new(bytes::Bytes::copy_from_slice(
                f.as_bytes(),
            ))),
    }
    .map_err(|e| e.to_string())?;
    let result = async {
        let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let body = http_body_util::Limited::new(resp.into_body(), MAX_DOCUMENT)
            .collect()
            .await
            .map_err(|e| format!("reading the body: {e}"))?
            .to_bytes();
        Ok((status, body))
    }
    .await;
    conn.abort();
    result
}

/// GET an https:// URL within [`FETCH_TIMEOUT`]: its 200 answer's body (at most 1 MiB).
pub(crate) async fn fetch_bytes(
    url: &str,
    tls: &Arc<rustls::ClientConfig>,
) -> Result<bytes::Bytes, String> {
    match tokio::time::timeout(FETCH_TIMEOUT, fetch_inner(url, tls, None, None, "*/*")).await {
        Ok(Ok((200, body))) => Ok(body),
        Ok(Ok((status, _))) => Err(format!("GET {url}: the server answered {status}")),
        Ok(Err(e)) => Err(format!("GET {url}: {e}")),
        Err(_) => Err(format!(
            "GET {url}: timed out after {}s",
            FETCH_TIMEOUT.as_secs()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};

    const ISS: &str = "https://idp.example";

    fn config() -> Oidc {
        Oidc {
            issuer: ISS.into(),
            ca: None,
            client_id: None,
            client_secret: tollgate_config::SecretSource::None,
            audiences: vec!["tollgate".into()],
            groups_claim: "realm_access.roles".into(),
            group_map: [("6f1c".to_string(), "sre".to_string())].into(),
            static_groups: vec!["staff".into()],
            subject_claim: "sub".into(),
            algorithms: vec!["ES256".into(), "EdDSA".into()],
            max_cert_ttl: None,
            line: 1,
        }
    }

    fn enc(v: &[u8]) -> String {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v)
    }

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap()
            .as_secs()
    }

    struct Keys {
        ec: EcdsaKeyPair,
        ed: Ed25519KeyPair,
        jwks: Vec<Jwk>,
    }

    fn keys() -> Keys {
        let rng = ring::rand::SystemRandom::new();
        let p8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let ec =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, p8.as_ref(), &rng).unwrap();
        let ed = Ed25519KeyPair::from_pkcs8(Ed25519KeyPair::generate_pkcs8(&rng).unwrap().as_ref())
            .unwrap();
        let point = ec.public_key().as_ref();
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "kid": "ec1", "use": "sig", "x": enc(&point[1..33]), "y": enc(&point[33..])},
            {"kty": "OKP", "crv": "Ed25519", "kid": "ed1", "x": enc(ed.public_key().as_ref())},
            {"kty": "EC", "crv": "P-256", "kid": "enc", "use": "enc", "x": enc(&point[1..33]), "y": enc(&point[33..])},
            {"kty": "oct", "kid": "hmac", "k": enc(b"secret")},
        ]});
        let jwks = jwks["keys"]
            .as_array()
            .unwrap()
            .iter()
            .filter_map(Jwk::parse)
            .collect();
        Keys { ec, ed, jwks }
    }

    fn token(k: &Keys, header: Value, claims: Value) -> String {
        let input = format!(
            "{}.{}",
            enc(header.to_string().as_bytes()),
            enc(claims.to_string().as_bytes())
        );
        let sig = match header["alg"].as_str() {
            Some("ES256") => {
                k.ec.sign(&ring::rand::SystemRandom::new(), input.as_bytes())
                    .unwrap()
                    .as_ref()
                    .to_vec()
            }
            Some("EdDSA") => k.ed.sign(input.as_bytes()).as_ref().to_vec(),
            Some("HS256") => ring::hmac::sign(
                &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"secret"),
                input.as_bytes(),
            )
            .as_ref()
            .to_vec(),
            _ => Vec::new(),
        };
        format!("{input}.{}", enc(&sig))
    }

    fn claims() -> Value {
        serde_json::json!({"iss": ISS, "aud": ["other", "tollgate"], "sub": "alice", "exp": now() + 300,
            "iat": now(), "realm_access": {"roles": ["6f1c", "dev"]}})
    }

    fn run(k: &Keys, header: Value, claims: Value) -> Result<Identity, OidcError> {
        let jwt = Jwt::parse(&token(k, header, claims))?;
        let c = config();
        if !c.algorithms.contains(&jwt.alg) {
            return Err(OidcError::BadAlgorithm);
        }
        let keys: Vec<Jwk> = candidates(&k.jwks, &jwt).into_iter().cloned().collect();
        if keys.is_empty() {
            return Err(OidcError::UnknownKey);
        }
        check(&c, &jwt, &keys, SystemTime::now())
    }

    #[test]
    fn a_signed_token_becomes_an_identity() {
        let k = keys();
        assert_eq!(
            k.jwks.len(),
            2,
            "encryption and symmetric keys are not kept"
        );
        let id = run(
            &k,
            serde_json::json!({"alg": "ES256", "kid": "ec1"}),
            claims(),
        )
        .unwrap();
        assert_eq!(id.subject, "alice");
        assert_eq!(id.principal.as_str(), "oidc:https://idp.example#alice");
        assert_eq!(id.method, AuthMethod::Oidc);
        assert_eq!(id.groups, ["dev", "sre", "staff"]);
        assert!(id.expires_at.unwrap() > SystemTime::now());
        let id = run(&k, serde_json::json!({"alg": "EdDSA"}), claims()).unwrap();
        assert_eq!(id.subject, "alice");
    }

    #[test]
    fn forged_or_unfit_tokens_are_refused() {
        let k = keys();
        let h = serde_json::json!({"alg": "ES256", "kid": "ec1"});
        for (header, why) in [
            (
                serde_json::json!({"alg": "none", "kid": "ec1"}),
                OidcError::BadAlgorithm,
            ),
            (
                serde_json::json!({"alg": "HS256", "kid": "hmac"}),
                OidcError::BadAlgorithm,
            ),
            (
                serde_json::json!({"alg": "ES256", "kid": "nope"}),
                OidcError::UnknownKey,
            ),
            // An ES256 token naming the Ed25519 key: the key's type decides.
            (
                serde_json::json!({"alg": "ES256", "kid": "ed1"}),
                OidcError::UnknownKey,
            ),
            (
                serde_json::json!({"alg": "ES256", "kid": "ec1", "crit": ["x"]}),
                OidcError::Malformed,
            ),
        ] {
            assert_eq!(
                run(&k, header.clone(), claims()).unwrap_err(),
                why,
                "{header}"
            );
        }
        // A signature by another key of the same type.
        let other = keys();
        let forged = token(&other, h.clone(), claims());
        let jwt = Jwt::parse(&forged).unwrap();
        let cands: Vec<Jwk> = candidates(&k.jwks, &jwt).into_iter().cloned().collect();
        assert_eq!(
            check(&config(), &jwt, &cands, SystemTime::now()).unwrap_err(),
            OidcError::BadSignature
        );
        // Claims changed after signing.
        let good = token(&k, h.clone(), claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut c = claims();
        c["sub"] = "root".into();
        let changed = enc(c.to_string().as_bytes());
        parts[1] = &changed;
        let jwt = Jwt::parse(&parts.join(".")).unwrap();
        assert_eq!(
            check(&config(), &jwt, &cands, SystemTime::now()).unwrap_err(),
            OidcError::BadSignature
        );
        for t in ["", "a.b", "a.b.c.d", "e30.e30.", "!!.e30.e30"] {
            assert_eq!(Jwt::parse(t).err(), Some(OidcError::Malformed), "{t}");
        }
    }

    /// RFC 8707: a resource's audience accepts only tokens issued for that resource, never one
    /// for the gateway as a whole or for another resource; and a token for a resource is not one
    /// for the gateway.
    #[test]
    fn a_resource_audience_accepts_only_tokens_for_that_resource() {
        let k = keys();
        let h = serde_json::json!({"alg": "EdDSA", "kid": "ed1"});
        let c = config();
        let for_it = vec!["https://gw.example/r/tickets".to_string()];
        let with_aud = |aud: Value, want: Audience<'_>| {
            let mut cl = claims();
            cl["aud"] = aud;
            let jwt = Jwt::parse(&token(&k, h.clone(), cl)).unwrap();
            let keys: Vec<Jwk> = candidates(&k.jwks, &jwt).into_iter().cloned().collect();
            check_for(&c, &jwt, &keys, SystemTime::now(), want)
        };
        let res = Audience::Resource(&for_it);
        assert!(with_aud("https://gw.example/r/tickets".into(), res).is_ok());
        assert!(with_aud(
            serde_json::json!(["tollgate", "https://gw.example/r/tickets"]),
            res
        )
        .is_ok());
        for aud in [
            Value::from("tollgate"),
            Value::from("https://gw.example/r/other"),
            Value::from("https://gw.example/r/tickets/"),
            serde_json::json!(["tollgate"]),
        ] {
            assert_eq!(
                with_aud(aud.clone(), res).unwrap_err(),
                OidcError::WrongAudience,
                "{aud}"
            );
        }
        assert_eq!(
            with_aud("https://gw.example/r/tickets".into(), Audience::Gateway).unwrap_err(),
            OidcError::WrongAudience
        );
    }

    #[test]
    fn claims_are_checked() {
        let k = keys();
        let h = serde_json::json!({"alg": "EdDSA", "kid": "ed1"});
        let with = |key: &str, v: Value| {
            let mut c = claims();
            if v.is_null() {
                c.as_object_mut().unwrap().remove(key);
            } else {
                c[key] = v;
            }
            run(&k, h.clone(), c)
        };
        let t = now();
        assert_eq!(
            with("exp", (t - 61).into()).unwrap_err(),
            OidcError::Expired
        );
        assert!(with("exp", (t - 30).into()).is_ok(), "within the leeway");
        assert_eq!(with("exp", Value::Null).unwrap_err(), OidcError::NoExpiry);
        assert_eq!(
            with("exp", "soon".into()).unwrap_err(),
            OidcError::Malformed
        );
        assert_eq!(with("exp", 1e300.into()).unwrap_err(), OidcError::Malformed);
        assert_eq!(
            with("nbf", (t + 120).into()).unwrap_err(),
            OidcError::NotYetValid
        );
        assert!(with("nbf", (t + 30).into()).is_ok());
        assert_eq!(
            with("iat", (t + 120).into()).unwrap_err(),
            OidcError::IssuedInFuture
        );
        assert_eq!(
            with("aud", "other".into()).unwrap_err(),
            OidcError::WrongAudience
        );
        assert_eq!(
            with("aud", Value::Null).unwrap_err(),
            OidcError::WrongAudience
        );
        assert!(with("aud", "tollgate".into()).is_ok());
        assert_eq!(
            with("iss", "https://idp.example/".into()).unwrap_err(),
            OidcError::UnknownIssuer
        );
        assert_eq!(with("sub", Value::Null).unwrap_err(), OidcError::NoSubject);
        // No groups claim: only the static groups.
        assert_eq!(with("realm_access", Value::Null).unwrap().groups, ["staff"]);
        let mut c = claims();
        c.as_object_mut().unwrap().remove("realm_access");
        c["_claim_names"] = serde_json::json!({"groups": "src1"});
        assert_eq!(run(&k, h.clone(), c).unwrap().groups, ["staff"]);
    }

    #[test]
    fn an_unverified_email_is_no_subject() {
        let k = keys();
        let h = serde_json::json!({"alg": "EdDSA", "kid": "ed1"});
        let mut by_email = config();
        by_email.subject_claim = "email".into();
        let with = |verified: Value| {
            let mut c = claims();
            c["email"] = "ceo@example.com".into();
            if !verified.is_null() {
                c["email_verified"] = verified;
            }
            let jwt = Jwt::parse(&token(&k, h.clone(), c)).unwrap();
            check(&by_email, &jwt, &k.jwks, SystemTime::now())
        };
        for unverified in [Value::Bool(false), "false".into(), 0.into()] {
            assert_eq!(
                with(unverified.clone()).unwrap_err(),
                OidcError::UnverifiedEmail,
                "{unverified}"
            );
        }
        for fine in [Value::Bool(true), "true".into(), Value::Null] {
            assert_eq!(with(fine).unwrap().subject, "ceo@example.com");
        }
        // Identities named by `sub` do not depend on the address.
        let mut c = claims();
        c["email_verified"] = false.into();
        assert!(run(&k, h, c).is_ok());
    }

    #[test]
    fn claim_paths() {
        let c = serde_json::json!({"a": {"b": ["x"]}, "https://ns/roles": "r"});
        assert_eq!(claim_at(&c, "a.b"), Some(&serde_json::json!(["x"])));
        assert_eq!(
            claim_at(&c, "https://ns/roles"),
            Some(&serde_json::json!("r"))
        );
        assert_eq!(claim_at(&c, "a.c"), None);
    }

    #[test]
    fn a_reload_keeps_the_keys_of_unchanged_issuers() {
        let dir = std::env::temp_dir().join(format!("tg-oidc-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["idp.example".into()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(&ca, cert.pem()).unwrap();
        let mut a = config();
        a.ca = Some(ca.clone());
        let mut b = a.clone();
        b.issuer = "https://other.example".into();
        let v = OidcVerifiers::new(&[a.clone(), b.clone()]).unwrap();
        let before = v.issuers.load_full();
        b.audiences = vec!["changed".into()];
        let prepared = v.prepare(&[a.clone(), b]).unwrap();
        v.apply(prepared);
        let after = v.issuers.load_full();
        assert!(Arc::ptr_eq(&before[0], &after[0]), "unchanged: same cache");
        assert!(!Arc::ptr_eq(&before[1], &after[1]), "changed: rebuilt");
        a.ca = Some(dir.join("missing.pem"));
        let e = v.prepare(&[a]).err().unwrap();
        assert!(
            e.contains("identity.oidc \"https://idp.example\": ca"),
            "{e}"
        );
        assert_eq!(v.issuers.load().len(), 2, "a failed prepare swaps nothing");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fetches_are_rate_limited() {
        let now = Instant::now();
        let mut f = FetchState::default();
        assert!(f.may_fetch(now));
        f.last_ok = Some(now);
        assert!(!f.may_fetch(now + Duration::from_secs(29)));
        assert!(f.may_fetch(now + REFRESH_INTERVAL));
        f.last_failure = Some(now + REFRESH_INTERVAL);
        assert!(!f.may_fetch(now + REFRESH_INTERVAL + Duration::from_secs(1)));
    }
}
