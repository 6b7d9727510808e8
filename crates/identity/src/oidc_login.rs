//! The relying party's side of a person signing in with an OpenID provider: discovery of the
//! provider's endpoints, the authorization code flow with PKCE (S256) and the device
//! authorization grant (RFC 8628). `tollgate login` runs both from a terminal; the console runs
//! the code flow from the browser. Validation of the ID token they end with is [`crate::oidc`]'s.
//!
//! Every request goes over HTTPS with the issuer's trust (its `ca`, else the system roots); no
//! token or code is ever logged, and errors carry the provider's error code and description only.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine;
use serde_json::Value;

use crate::oidc::{client_config, fetch_json};

/// The scopes asked for when none are given: the ID token, and the profile claims most
/// providers put a person's name, e-mail and (with a groups mapper) groups in.
pub const DEFAULT_SCOPE: &str = "openid profile email";
/// RFC 8628 §3.5: the polling interval when the provider names none, and the step `slow_down`
/// adds to it.
pub const DEFAULT_INTERVAL_SECS: u64 = 5;
pub const SLOW_DOWN_SECS: u64 = 5;
/// The RFC 8628 grant type.
const DEVICE_GRANT: &str = "urn:ietf:params:oauth:grant-type:device_code";

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoginError {
    /// The provider could not be reached or answered something unreadable.
    #[error("{0}")]
    Unreachable(String),
    /// The discovery document lacks what the flow needs.
    #[error("the identity provider's discovery document {0}")]
    Discovery(String),
    /// An OAuth error answer (`error`, `error_description`).
    #[error("the identity provider refused: {code}{}", .description.as_ref().map(|d| format!(" ({d})")).unwrap_or_default())]
    Refused {
        code: String,
        description: Option<String>,
    },
}

/// The TLS trust for an issuer: `ca` when given, else the system roots.
pub fn issuer_tls(ca: Option<&Path>) -> Result<Arc<rustls::ClientConfig>, String> {
    let bundle = ca.map_or_else(
        || PathBuf::from(tollgate_webhook::SYSTEM_BUNDLE),
        Path::to_path_buf,
    );
    client_config(&bundle, "the identity provider's CA")
}

/// An OpenID provider's endpoints, from its discovery document.
#[derive(Debug, Clone)]
pub struct Provider {
    pub issuer: String,
    pub authorization_endpoint: String,
    pub token_endpoint: String,
    pub device_authorization_endpoint: Option<String>,
    pub jwks_uri: String,
    /// The whole discovery document (for `tollgate scan`).
    pub document: Value,
    tls: Arc<rustls::ClientConfig>,
}

impl Provider {
    /// Fetch `<issuer>/.well-known/openid-configuration`; its `issuer` must be `issuer` exactly
    /// and every endpoint must be https://.
    pub async fn discover(
        issuer: &str,
        tls: Arc<rustls::ClientConfig>,
    ) -> Result<Provider, LoginError> {
        let url = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        );
        let doc = match fetch_json(&url, &tls, None).await {
            Ok((200, doc)) => doc,
            Ok((status, _)) => {
                return Err(LoginError::Unreachable(format!(
                    "GET {url}: the identity provider answered {status}"
                )))
            }
            Err(e) => return Err(LoginError::Unreachable(e)),
        };
        let named = doc.get("issuer").and_then(Value::as_str);
        if named != Some(issuer) {
            return Err(LoginError::Discovery(format!(
                "names issuer {named:?}, not {issuer:?}"
            )));
        }
        let endpoint = |k: &str| -> Result<Option<String>, LoginError> {
            match doc.get(k).and_then(Value::as_str) {
                None => Ok(None),
                Some(u) if u.starts_with("https://") => Ok(Some(u.to_string())),
                Some(u) => Err(LoginError::Discovery(format!(
                    "has a {k} that is not https:// ({u:?})"
                ))),
            }
        };
        let required = |k: &str| -> Result<String, LoginError> {
            endpoint(k)?.ok_or_else(|| LoginError::Discovery(format!("has no {k}")))
        };
        Ok(Provider {
            issuer: issuer.to_string(),
            authorization_endpoint: required("authorization_endpoint")?,
            token_endpoint: required("token_endpoint")?,
            device_authorization_endpoint: endpoint("device_authorization_endpoint")?,
            jwks_uri: required("jwks_uri")?,
            tls,
            document: doc,
        })
    }

    /// Where to send the person's browser: the authorization code flow with PKCE (S256).
    pub fn authorization_url(&self, req: &AuthorizationRequest) -> String {
        let sep = if self.authorization_endpoint.contains('?') {
            '&'
        } else {
            '?'
        };
        format!(
            "{}{sep}{}",
            self.authorization_endpoint,
            form(&[
                ("response_type", "code"),
                ("client_id", &req.client_id),
                ("redirect_uri", &req.redirect_uri),
                ("scope", &req.scope),
                ("state", &req.state),
                ("nonce", &req.nonce),
                ("code_challenge", &req.pkce.challenge),
                ("code_challenge_method", "S256"),
            ])
        )
    }

    /// Redeem an authorization code: `client_id` and the PKCE verifier, and for a confidential
    /// client its `secret` (HTTP Basic, RFC 6749 §2.3.1, unless the provider's discovery
    /// document offers only `client_secret_post`); the ID token of the answer.
    pub async fn redeem_code(
        &self,
        client_id: &str,
        code: &str,
        redirect_uri: &str,
        verifier: &str,
        secret: Option<&str>,
    ) -> Result<String, LoginError> {
        let mut fields = vec![
            ("grant_type", "authorization_code"),
            ("code", code),
            ("redirect_uri", redirect_uri),
            ("client_id", client_id),
            ("code_verifier", verifier),
        ];
        let mut basic = None;
        if let Some(secret) = secret {
            if self.client_secret_basic() {
                // Both halves form-encoded first (RFC 6749 §2.3.1).
                let pair = format!("{}:{}", percent_encode(client_id), percent_encode(secret));
                basic = Some(format!(
                    "Basic {}",
                    base64::engine::general_purpose::STANDARD.encode(pair)
                ));
            } else {
                fields.push(("client_secret", secret));
            }
        }
        let answer = self
            .token_request_with(&form(&fields), basic.as_deref())
            .await?;
        id_token_of(&answer)
    }

    /// Whether a client secret goes in an HTTP Basic header: the default of OpenID Connect
    /// Discovery when the provider lists no methods, and whenever it lists that one.
    fn client_secret_basic(&self) -> bool {
        match self
            .document
            .get("token_endpoint_auth_methods_supported")
            .and_then(Value::as_array)
        {
            None => true,
            Some(m) => {
                m.iter().any(|v| v == "client_secret_basic")
                    || !m.iter().any(|v| v == "client_secret_post")
            }
        }
    }

    /// Start a device authorization (RFC 8628 §3.1).
    pub async fn device_authorization(
        &self,
        client_id: &str,
        scope: &str,
    ) -> Result<DeviceAuthorization, LoginError> {
        let url = self.device_authorization_endpoint.as_deref().ok_or_else(|| {
            LoginError::Discovery(
                "has no device_authorization_endpoint: this provider (or its client) does not offer the device flow; sign in with the browser instead".into(),
            )
        })?;
        let body = form(&[("client_id", client_id), ("scope", scope)]);
        let v = match fetch_json(url, &self.tls, Some(&body)).await {
            Ok((200, v)) => v,
            Ok((status, v)) => return Err(refused(status, &v)),
            Err(e) => return Err(LoginError::Unreachable(e)),
        };
        let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_string);
        let missing = |k: &str| LoginError::Discovery(format!("device answer has no {k}"));
        Ok(DeviceAuthorization {
            device_code: s("device_code").ok_or_else(|| missing("device_code"))?,
            user_code: s("user_code").ok_or_else(|| missing("user_code"))?,
            verification_uri: s("verification_uri").ok_or_else(|| missing("verification_uri"))?,
            verification_uri_complete: s("verification_uri_complete"),
            expires_in: v.get("expires_in").and_then(Value::as_u64).unwrap_or(600),
            interval: v
                .get("interval")
                .and_then(Value::as_u64)
                .unwrap_or(DEFAULT_INTERVAL_SECS)
                .max(1),
        })
    }

    /// One poll of the token endpoint for a device authorization (RFC 8628 §3.4/3.5).
    pub async fn poll_device(
        &self,
        client_id: &str,
        device_code: &str,
    ) -> Result<DevicePoll, LoginError> {
        let body = form(&[
            ("grant_type", DEVICE_GRANT),
            ("device_code", device_code),
            ("client_id", client_id),
        ]);
        match self.token_request(&body).await {
            Ok(answer) => id_token_of(&answer).map(DevicePoll::Done),
            Err(LoginError::Refused { code, description }) => Ok(match code.as_str() {
                "authorization_pending" => DevicePoll::Pending,
                "slow_down" => DevicePoll::SlowDown,
                "expired_token" => DevicePoll::Expired,
                "access_denied" => DevicePoll::Denied(description),
                _ => return Err(LoginError::Refused { code, description }),
            }),
            Err(e) => Err(e),
        }
    }

    async fn token_request(&self, body: &str) -> Result<Value, LoginError> {
        self.token_request_with(body, None).await
    }

    async fn token_request_with(
        &self,
        body: &str,
        authorization: Option<&str>,
    ) -> Result<Value, LoginError> {
        match crate::oidc::fetch_json_with(
            &self.token_endpoint,
            &self.tls,
            Some(body),
            authorization,
        )
        .await
        {
            Ok((200, v)) => Ok(v),
            Ok((status, v)) => Err(refused(status, &v)),
            Err(e) => Err(LoginError::Unreachable(e)),
        }
    }
}

fn refused(status: u16, v: &Value) -> LoginError {
    match v.get("error").and_then(Value::as_str) {
        Some(code) => LoginError::Refused {
            code: code.to_string(),
            description: v
                .get("error_description")
                .and_then(Value::as_str)
                .map(|d| d.chars().take(300).collect()),
        },
        None => LoginError::Unreachable(format!("the identity provider answered {status}")),
    }
}

fn id_token_of(answer: &Value) -> Result<String, LoginError> {
    answer
        .get("id_token")
        .and_then(Value::as_str)
        .map(str::to_string)
        .ok_or_else(|| {
            LoginError::Discovery(
                "token answer has no id_token (is the \"openid\" scope granted?)".into(),
            )
        })
}

/// What an authorization request carries; `state`, `nonce` and the PKCE verifier are kept by
/// the relying party until the redirect comes back.
#[derive(Debug, Clone)]
pub struct AuthorizationRequest {
    pub client_id: String,
    pub redirect_uri: String,
    pub scope: String,
    pub state: String,
    pub nonce: String,
    pub pkce: Pkce,
}

impl AuthorizationRequest {
    /// Fresh random `state`, `nonce` and PKCE verifier.
    pub fn new(client_id: &str, redirect_uri: &str, scope: &str) -> AuthorizationRequest {
        AuthorizationRequest {
            client_id: client_id.to_string(),
            redirect_uri: redirect_uri.to_string(),
            scope: scope.to_string(),
            state: random_token(),
            nonce: random_token(),
            pkce: Pkce::new(),
        }
    }
}

/// RFC 7636 with S256: a random verifier and its SHA-256 challenge.
#[derive(Debug, Clone)]
pub struct Pkce {
    pub verifier: String,
    pub challenge: String,
}

impl Pkce {
    pub fn new() -> Pkce {
        Pkce::from_verifier(random_token())
    }

    fn from_verifier(verifier: String) -> Pkce {
        let digest = ring::digest::digest(&ring::digest::SHA256, verifier.as_bytes());
        Pkce {
            challenge: b64url(digest.as_ref()),
            verifier,
        }
    }
}

impl Default for Pkce {
    fn default() -> Self {
        Pkce::new()
    }
}

/// The answer to a device authorization request.
#[derive(Debug, Clone)]
pub struct DeviceAuthorization {
    pub device_code: String,
    pub user_code: String,
    pub verification_uri: String,
    pub verification_uri_complete: Option<String>,
    pub expires_in: u64,
    pub interval: u64,
}

/// What one poll of a device authorization found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DevicePoll {
    Pending,
    /// Poll less often: the interval grows by [`SLOW_DOWN_SECS`].
    SlowDown,
    /// The person signed in: the ID token.
    Done(String),
    Expired,
    /// The person (or the provider) refused; the provider's description.
    Denied(Option<String>),
}

/// 32 random bytes, base64url: a `state`, `nonce` or PKCE verifier (43 characters).
pub fn random_token() -> String {
    let mut b = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .expect("the system random source works");
    b64url(&b)
}

fn b64url(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

/// `application/x-www-form-urlencoded` (also a URL's query).
pub fn form(pairs: &[(&str, &str)]) -> String {
    pairs
        .iter()
        .map(|(k, v)| format!("{}={}", percent_encode(k), percent_encode(v)))
        .collect::<Vec<_>>()
        .join("&")
}

/// Percent-encode everything but unreserved characters (RFC 3986 §2.3).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The claims of a JWT, its signature not checked: for a client that received an ID token
/// straight from the token endpoint over verified TLS (OIDC Core §3.1.3.7) and checks its
/// `nonce` before passing it on to the gateway, which validates it fully.
pub fn unverified_claims(token: &str) -> Option<Value> {
    let payload = token.split('.').nth(1)?;
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    serde_json::from_slice::<Value>(&bytes)
        .ok()
        .filter(Value::is_object)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc7636_appendix_b() {
        let p = Pkce::from_verifier("dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk".into());
        assert_eq!(p.challenge, "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM");
        assert_eq!(Pkce::new().verifier.len(), 43);
        assert_ne!(random_token(), random_token());
    }

    #[test]
    fn forms_are_percent_encoded() {
        assert_eq!(
            form(&[
                ("redirect_uri", "http://127.0.0.1:5/callback"),
                ("scope", "openid email")
            ]),
            "redirect_uri=http%3A%2F%2F127.0.0.1%3A5%2Fcallback&scope=openid%20email"
        );
    }

    #[test]
    fn claims_without_signature() {
        let t = format!("{}.{}.sig", b64url(b"{}"), b64url(br#"{"nonce":"n"}"#));
        assert_eq!(unverified_claims(&t).unwrap()["nonce"], "n");
        assert!(unverified_claims("x").is_none());
    }
}
