//! Who is calling: one order for every listener. A bearer token, when the request carries an
//! `Authorization` header, is the only credential considered (a per-request choice: an agent
//! behind a shared machine certificate names itself); else the verified client certificate.
//! PostgreSQL asks for a token (as the password) only when no certificate identified the client,
//! which is the same order.

use tollgate_identity::oidc::{looks_like_jwt, Audience, OidcVerifiers};
use tollgate_identity::{Identity, IdentityError, TokenVerifier};

/// Why a caller could not be identified. The messages are safe to send to the client.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AuthError {
    #[error("the client certificate cannot identify you: {0}")]
    BadCertificate(String),
    #[error("the Authorization header is not \"Bearer <token>\"")]
    MalformedAuthorization,
    #[error("the token is not valid")]
    InvalidToken,
    #[error("authentication required")]
    Missing,
}

impl AuthError {
    /// A metrics label (bounded, no secret).
    pub fn label(&self) -> &'static str {
        match self {
            AuthError::BadCertificate(_) => "bad_certificate",
            AuthError::MalformedAuthorization => "malformed_authorization",
            AuthError::InvalidToken => "invalid_token",
            AuthError::Missing => "missing",
        }
    }
}

/// The bearer token of an `Authorization` header value (`Err` when the header is something else).
pub fn bearer(header: &[u8]) -> Result<&str, AuthError> {
    let v = std::str::from_utf8(header).map_err(|_| AuthError::MalformedAuthorization)?;
    let (scheme, token) = v
        .trim()
        .split_once(' ')
        .ok_or(AuthError::MalformedAuthorization)?;
    let token = token.trim();
    if !scheme.eq_ignore_ascii_case("bearer") || token.is_empty() {
        return Err(AuthError::MalformedAuthorization);
    }
    Ok(token)
}

/// Identify a caller from what its connection and request carry. A bearer token is a static
/// service token, else (when it has a JWT's shape) an OIDC token of a configured issuer.
pub async fn identify(
    cert: Option<&Result<Identity, IdentityError>>,
    authorization: Option<&[u8]>,
    tokens: &TokenVerifier,
    oidc: &OidcVerifiers,
) -> Result<Identity, AuthError> {
    identify_for(cert, authorization, tokens, oidc, Audience::Gateway).await
}

/// [`identify`] where an OIDC token must be for `audience` (an MCP resource's own, RFC 8707).
pub async fn identify_for(
    cert: Option<&Result<Identity, IdentityError>>,
    authorization: Option<&[u8]>,
    tokens: &TokenVerifier,
    oidc: &OidcVerifiers,
    audience: Audience<'_>,
) -> Result<Identity, AuthError> {
    if let Some(header) = authorization {
        return verify_token_for(bearer(header)?, tokens, oidc, audience)
            .await
            .ok_or(AuthError::InvalidToken);
    }
    match cert {
        Some(Ok(identity)) => Ok(identity.clone()),
        Some(Err(e)) => Err(AuthError::BadCertificate(e.to_string())),
        None => Err(AuthError::Missing),
    }
}

/// A token presented as a credential (bearer header, PostgreSQL password): a static service
/// token, else an OIDC token. Why an OIDC token was refused is logged and counted there.
pub async fn verify_token(
    token: &str,
    tokens: &TokenVerifier,
    oidc: &OidcVerifiers,
) -> Option<Identity> {
    verify_token_for(token, tokens, oidc, Audience::Gateway).await
}

/// [`verify_token`] where an OIDC token must be for `audience`.
pub async fn verify_token_for(
    token: &str,
    tokens: &TokenVerifier,
    oidc: &OidcVerifiers,
    audience: Audience<'_>,
) -> Option<Identity> {
    if let Some(id) = tokens.verify(token) {
        return Some(id);
    }
    if oidc.is_empty() || !looks_like_jwt(token) {
        return None;
    }
    oidc.verify_for(token, audience).await.ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tollgate_config::StaticToken;

    fn tokens() -> TokenVerifier {
        let digest = ring::digest::digest(&ring::digest::SHA256, b"s3cret");
        TokenVerifier::new(&[StaticToken {
            subject: "ci-bot".into(),
            sha256: hex::encode(digest.as_ref()),
            groups: vec!["ci".into()],
        }])
    }

    fn identify(
        cert: Option<&Result<Identity, IdentityError>>,
        authorization: Option<&[u8]>,
        tokens: &TokenVerifier,
    ) -> Result<Identity, AuthError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(super::identify(
            cert,
            authorization,
            tokens,
            &OidcVerifiers::default(),
        ))
    }

    #[test]
    fn bearer_token_identifies() {
        let id = identify(None, Some(b"Bearer s3cret"), &tokens()).unwrap();
        assert_eq!(id.subject, "ci-bot");
        assert_eq!(id.groups, vec!["ci".to_string()]);
        let id = identify(None, Some(b"bearer   s3cret "), &tokens()).unwrap();
        assert_eq!(id.subject, "ci-bot");
    }

    #[test]
    fn wrong_or_malformed_tokens_are_refused() {
        let t = tokens();
        assert_eq!(
            identify(None, Some(b"Bearer nope"), &t),
            Err(AuthError::InvalidToken)
        );
        assert_eq!(
            identify(None, Some(b"Basic czNjcmV0"), &t),
            Err(AuthError::MalformedAuthorization)
        );
        assert_eq!(
            identify(None, Some(b"Bearer "), &t),
            Err(AuthError::MalformedAuthorization)
        );
        assert_eq!(identify(None, None, &t), Err(AuthError::Missing));
    }

    #[test]
    fn a_sent_token_is_the_only_credential_considered() {
        let bad: Result<Identity, IdentityError> = Err(IdentityError::NoSubject);
        assert!(matches!(
            identify(Some(&bad), None, &tokens()),
            Err(AuthError::BadCertificate(_))
        ));
        assert_eq!(
            identify(Some(&bad), Some(b"Bearer s3cret"), &tokens())
                .unwrap()
                .subject,
            "ci-bot"
        );
        assert_eq!(
            identify(Some(&bad), Some(b"Bearer wrong"), &tokens()),
            Err(AuthError::InvalidToken)
        );
    }
}
