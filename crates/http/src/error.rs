//! What a client of an HTTP resource is told when the gateway refuses or fails its request:
//! an HTTP status and a JSON body `{"error": ..., "code": ..., "hint": ..., "review": ...}`
//! whose message leaks nothing (no upstream address, no credential, no internal error text).

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{header, Response, StatusCode};
use serde::Serialize;

use crate::upstream::UpstreamBody;
use tollgate_gate::AuthError;

/// The `WWW-Authenticate` challenge of a 401 that names no error (no credential was sent).
pub const CHALLENGE: &str = "Bearer realm=\"tollgate\"";

/// The `WWW-Authenticate` challenge of the 401 an authentication failure gets, with its
/// RFC 6750 error code (`invalid_token` for a token that is not valid, whatever the reason).
pub fn challenge_for(e: &AuthError) -> &'static str {
    match e {
        AuthError::InvalidToken => "Bearer realm=\"tollgate\", error=\"invalid_token\"",
        AuthError::MalformedAuthorization => "Bearer realm=\"tollgate\", error=\"invalid_request\"",
        AuthError::BadCertificate(_) | AuthError::Missing => CHALLENGE,
    }
}

/// A refusal, as the client will see it.
#[derive(Debug, Clone, Serialize)]
pub struct Refusal {
    #[serde(skip)]
    pub status: StatusCode,
    /// Stable machine-readable reason (`unauthenticated`, `forbidden`, `denied`, ...).
    pub code: &'static str,
    pub error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub review_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// Close the connection after this answer (`Connection: close`): the request's body was
    /// not read to its end, so nothing after it on the connection can be trusted as a request.
    #[serde(skip)]
    pub close: bool,
    /// The `WWW-Authenticate` challenge of a 401.
    #[serde(skip)]
    pub challenge: Box<str>,
}

impl Refusal {
    pub fn new(status: StatusCode, code: &'static str, error: impl Into<String>) -> Refusal {
        Refusal {
            status,
            code,
            error: error.into(),
            hint: None,
            rule: None,
            review: None,
            review_url: None,
            session: None,
            close: false,
            challenge: CHALLENGE.into(),
        }
    }

    /// Ask for the connection to be closed after this answer.
    pub fn closing(mut self) -> Refusal {
        self.close = true;
        self
    }

    /// The `WWW-Authenticate` challenge (with its error code) a 401 carries.
    pub fn challenge(mut self, challenge: impl Into<Box<str>>) -> Refusal {
        self.challenge = challenge.into();
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Refusal {
        self.hint = Some(hint.into());
        self
    }

    pub fn bad_request(error: impl Into<String>) -> Refusal {
        Refusal::new(StatusCode::BAD_REQUEST, "bad_request", error)
    }

    pub fn into_response(self) -> Response<UpstreamBody> {
        let body = serde_json::to_vec(&self).unwrap_or_default();
        let mut r = Response::new(
            Full::new(Bytes::from(body))
                .map_err(|never| match never {})
                .boxed(),
        );
        *r.status_mut() = self.status;
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        h.insert(header::CACHE_CONTROL, "no-store".parse().unwrap());
        if self.close {
            h.insert(header::CONNECTION, "close".parse().unwrap());
        }
        if self.status == StatusCode::UNAUTHORIZED {
            let challenge = header::HeaderValue::from_str(&self.challenge)
                .unwrap_or(header::HeaderValue::from_static(CHALLENGE));
            h.insert(header::WWW_AUTHENTICATE, challenge);
        }
        r
    }
}
