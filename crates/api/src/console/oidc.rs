//! Console sign-in with an OpenID provider (authorization code + PKCE S256).
//!
//! `GET /auth/oidc/start?issuer=&next=` (the "Sign in with …" links of `/login`) makes a fresh
//! `state`, `nonce` and PKCE verifier, keeps them in the store (shared by the replicas, so the
//! provider's redirect may come back to any of them) under the SHA-256 of a random id that only
//! this browser's short-lived `__Host-tollgate_oidc` cookie carries, and sends the browser to the
//! provider. `GET /auth/oidc/callback` takes that pending sign-in (once), checks `state`,
//! redeems the code with the verifier, validates the ID token as every OIDC token is
//! (signature, issuer, audience, expiry) plus its `nonce`, and opens the usual console session
//! (bound to the token, which is verified again on every request; groups come from it). A
//! refusal at the provider, a foreign or expired sign-in and an unaccepted token each get a
//! page that says what happened and how to start again.

use std::time::Duration;

use hyper::{Request, Response, StatusCode};
use serde_json::json;
use tollgate_identity::oidc_login::{AuthorizationRequest, Provider, DEFAULT_SCOPE};
use tollgate_identity::Identity;

use super::auth::{self, Credential};
use super::{add_cookie, html, pages, redirect, secure, signed_in};
use crate::params;
use crate::routes::{api_event, ApiBody};
use crate::{ApiState, Conn, KIND_API_WRITE};

/// The pre-login cookie: which pending sign-in this browser started.
pub(crate) const OIDC_COOKIE: &str = "__Host-tollgate_oidc";
/// A sign-in must come back from the provider within this long.
const PENDING_TTL: Duration = Duration::from_secs(600);
/// Pending sign-ins held at once; past it new ones are refused until some expire.
const MAX_PENDING: usize = 10_000;
pub(crate) const CALLBACK_PATH: &str = "/auth/oidc/callback";

/// A sign-in sent to the provider, waiting for its redirect back.
struct Pending {
    provider: Provider,
    request: AuthorizationRequest,
    next: String,
}

/// [`Pending`] as the store keeps it (the provider by its issuer, discovered again on return).
#[derive(serde::Serialize, serde::Deserialize)]
struct StoredPending {
    issuer: String,
    client_id: String,
    redirect_uri: String,
    scope: String,
    state: String,
    nonce: String,
    verifier: String,
    challenge: String,
    next: String,
}

/// The store's kind for pending OIDC sign-ins (one-time values, keyed by the cookie's SHA-256).
const KIND_PENDING: &str = "console.oidc.pending";

/// Keeps `pending` in the store; the id for the browser's cookie (`None`: too many, or the
/// store failed).
async fn put_pending(state: &ApiState, pending: &Pending) -> Option<String> {
    if !state.console.sign_ins.admit(PENDING_TTL, MAX_PENDING) {
        return None;
    }
    let r = &pending.request;
    let value = serde_json::to_string(&StoredPending {
        issuer: pending.provider.issuer.clone(),
        client_id: r.client_id.clone(),
        redirect_uri: r.redirect_uri.clone(),
        scope: r.scope.clone(),
        state: r.state.clone(),
        nonce: r.nonce.clone(),
        verifier: r.pkce.verifier.clone(),
        challenge: r.pkce.challenge.clone(),
        next: pending.next.clone(),
    })
    .ok()?;
    let id = auth::random_hex();
    let (store, key) = (state.store.clone(), super::saml::digest(&id));
    let now = tollgate_store::unix_ms(std::time::SystemTime::now());
    let expires = now + PENDING_TTL.as_millis() as i64;
    match super::saml::blocking(move || store.once_put(KIND_PENDING, &key, &value, expires, now))
        .await
    {
        Ok(true) => Some(id),
        Ok(false) => None,
        Err(e) => {
            tracing::warn!(error = %e, "console sign-in: the pending sign-in could not be stored");
            None
        }
    }
}

/// The pending sign-in of cookie `id`, removed (each is used once, on whichever replica the
/// provider's redirect reaches), its provider discovered again.
async fn take_pending(state: &ApiState, id: &str) -> Option<Pending> {
    let (store, key) = (state.store.clone(), super::saml::digest(id));
    let now = tollgate_store::unix_ms(std::time::SystemTime::now());
    let stored = match super::saml::blocking(move || store.once_take(KIND_PENDING, &key, now)).await
    {
        Ok(v) => serde_json::from_str::<StoredPending>(&v?).ok()?,
        Err(e) => {
            tracing::warn!(error = %e, "console sign-in: the pending sign-in could not be read");
            return None;
        }
    };
    let tls = state.oidc.issuer_tls(&stored.issuer)?;
    let provider = match Provider::discover(&stored.issuer, tls).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(issuer = %stored.issuer, error = %e, "console sign-in: the identity provider's discovery failed on return");
            return None;
        }
    };
    Some(Pending {
        provider,
        request: AuthorizationRequest {
            client_id: stored.client_id,
            redirect_uri: stored.redirect_uri,
            scope: stored.scope,
            state: stored.state,
            nonce: stored.nonce,
            pkce: tollgate_identity::oidc_login::Pkce {
                verifier: stored.verifier,
                challenge: stored.challenge,
            },
        },
        next: stored.next,
    })
}

pub(super) fn query_param(query: &str, name: &str) -> Option<String> {
    params::parse_query(query)
        .unwrap_or_default()
        .into_iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v)
}

/// A sign-in failure page; the pre-login cookie is cleared with it.
fn failed(status: StatusCode, text: &str, hint: &str) -> Response<ApiBody> {
    sign_in_failed(OIDC_COOKIE, status, text, hint)
}

/// A sign-in failure page (OIDC or SAML) that clears the pre-login cookie `cookie`.
pub(super) fn sign_in_failed(
    cookie: &str,
    status: StatusCode,
    text: &str,
    hint: &str,
) -> Response<ApiBody> {
    let mut a = html(status, pages::sign_in_failed(text, hint));
    add_cookie(&mut a.resp, &auth::set_cookie(cookie, "", Duration::ZERO));
    secure(&mut a.resp);
    a.resp
}

/// `GET /auth/oidc/start`: off to the provider.
pub(super) async fn start(
    state: &ApiState,
    req: &Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let query = req.uri().query().unwrap_or("");
    let next = auth::local_next(query_param(query, "next").as_deref());
    let issuers = state.oidc.sign_in_issuers();
    let chosen = match query_param(query, "issuer") {
        Some(i) => issuers.into_iter().find(|o| o.issuer == i),
        None if issuers.len() == 1 => issuers.into_iter().next(),
        None => None,
    };
    let Some(config) = chosen else {
        return failed(
            StatusCode::NOT_FOUND,
            "This gateway offers no sign-in with that identity provider.",
            "choose one of the sign-in buttons at /login",
        );
    };
    let client_id = config.client_id.clone().unwrap_or_default();
    let redirect_uri = match &state.config.load().server.console_url {
        Some(u) => format!("{}{CALLBACK_PATH}", u.trim_end_matches('/')),
        None => {
            let authority = req
                .uri()
                .authority()
                .map(|a| a.to_string())
                .or_else(|| {
                    req.headers()
                        .get(hyper::header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .unwrap_or_default();
            format!("https://{authority}{CALLBACK_PATH}")
        }
    };
    let Some(tls) = state.oidc.issuer_tls(&config.issuer) else {
        return failed(
            StatusCode::NOT_FOUND,
            "This gateway offers no sign-in with that identity provider.",
            "choose one of the sign-in buttons at /login",
        );
    };
    let provider = match Provider::discover(&config.issuer, tls).await {
        Ok(p) => p,
        Err(e) => {
            tracing::warn!(issuer = %config.issuer, error = %e, "console sign-in: the identity provider's discovery failed");
            return failed(
                StatusCode::BAD_GATEWAY,
                "The identity provider cannot be reached right now.",
                "try again in a moment; the gateway's log says why",
            );
        }
    };
    let request = AuthorizationRequest::new(&client_id, &redirect_uri, DEFAULT_SCOPE);
    let url = provider.authorization_url(&request);
    let pending = Pending {
        provider,
        request,
        next,
    };
    let Some(id) = put_pending(state, &pending).await else {
        return failed(
            StatusCode::SERVICE_UNAVAILABLE,
            "The gateway cannot start a sign-in right now: too many are under way, or its store is unavailable.",
            "retry in a few minutes",
        );
    };
    let mut a = redirect(&url);
    add_cookie(
        &mut a.resp,
        &auth::set_cookie(OIDC_COOKIE, &id, PENDING_TTL),
    );
    secure(&mut a.resp);
    a.resp
}

/// `GET /auth/oidc/callback`: back from the provider. Every outcome is an `api.write` event.
pub(super) async fn callback(
    state: &ApiState,
    conn: &Conn,
    req: &Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let query = req.uri().query().unwrap_or("");
    let pending = match auth::cookie(req.headers(), OIDC_COOKIE) {
        Some(id) => take_pending(state, &id).await,
        None => None,
    };
    let issuer = pending.as_ref().map(|p| p.provider.issuer.clone());
    let (status, who, reason, resp) = finish(state, query, pending).await;
    let event = api_event(
        state,
        conn,
        who.as_ref(),
        KIND_API_WRITE,
        CALLBACK_PATH,
        ("", &[]),
        status,
        json!({"console": true, "route": CALLBACK_PATH, "method": "GET", "issuer": issuer, "outcome": reason}),
    );
    if status == StatusCode::SEE_OTHER {
        state.recorder.record(event);
    } else {
        state.record_refused(conn, status, event);
    }
    resp
}

/// The callback's outcome: status, who signed in, a short reason for the audit event, and the
/// answer.
async fn finish(
    state: &ApiState,
    query: &str,
    pending: Option<Pending>,
) -> (
    StatusCode,
    Option<Identity>,
    &'static str,
    Response<ApiBody>,
) {
    let again = "start again at /login";
    let Some(pending) = pending else {
        return (
            StatusCode::BAD_REQUEST,
            None,
            "no_pending_sign_in",
            failed(
                StatusCode::BAD_REQUEST,
                "This sign-in has expired, was already used, or was started in another browser.",
                again,
            ),
        );
    };
    let state_ok = query_param(query, "state")
        .is_some_and(|s| tollgate_identity::ct_eq(s.as_bytes(), pending.request.state.as_bytes()));
    if !state_ok {
        return (
            StatusCode::BAD_REQUEST,
            None,
            "state_mismatch",
            failed(
                StatusCode::BAD_REQUEST,
                "The identity provider's answer does not belong to the sign-in this browser started.",
                again,
            ),
        );
    }
    if let Some(error) = query_param(query, "error") {
        let description = query_param(query, "error_description")
            .map(|d| format!(" ({})", d.chars().take(200).collect::<String>()))
            .unwrap_or_default();
        let (status, text) = if error == "access_denied" {
            (
                StatusCode::FORBIDDEN,
                format!("The sign-in was declined at the identity provider{description}."),
            )
        } else {
            (
                StatusCode::BAD_REQUEST,
                format!("The identity provider did not sign you in: {error}{description}."),
            )
        };
        return (
            status,
            None,
            "refused_by_provider",
            failed(status, &text, again),
        );
    }
    let Some(code) = query_param(query, "code").filter(|c| !c.is_empty()) else {
        return (
            StatusCode::BAD_REQUEST,
            None,
            "no_code",
            failed(
                StatusCode::BAD_REQUEST,
                "The identity provider's answer carries no authorization code.",
                again,
            ),
        );
    };
    let r = &pending.request;
    // A confidential client's secret, read now (a rotated secret needs no restart).
    let secret = match state
        .oidc
        .issuer_config(&pending.provider.issuer)
        .map(|c| c.client_secret.read())
        .transpose()
    {
        Ok(s) => s.flatten(),
        Err(e) => {
            tracing::error!(issuer = %pending.provider.issuer, error = %e, "console sign-in: the client secret could not be read");
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                "client_secret_unavailable",
                failed(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "The gateway cannot finish this sign-in: its client secret for this identity provider is not available. An administrator must fix client_secret_env or client_secret_file.",
                    again,
                ),
            );
        }
    };
    let token = match pending
        .provider
        .redeem_code(
            &r.client_id,
            &code,
            &r.redirect_uri,
            &r.pkce.verifier,
            secret.as_deref(),
        )
        .await
    {
        Ok(t) => t,
        Err(e) => {
            tracing::info!(issuer = %pending.provider.issuer, error = %e, "console sign-in: the authorization code was not redeemed");
            return (
                StatusCode::BAD_GATEWAY,
                None,
                "code_not_redeemed",
                failed(
                    StatusCode::BAD_GATEWAY,
                    "The identity provider did not accept this sign-in's code (it may have expired).",
                    again,
                ),
            );
        }
    };
    let who = match state.oidc.verify_id_token(&token, &r.nonce).await {
        Ok(who) => who,
        Err(e) => {
            return (
                StatusCode::UNAUTHORIZED,
                None,
                e.reason(),
                failed(
                    StatusCode::UNAUTHORIZED,
                    &format!("The identity provider's token is not accepted here: {e}."),
                    again,
                ),
            )
        }
    };
    let Some((sid, _)) = state
        .console
        .create(&state.store, &who, Credential::Token(token))
        .await
    else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Some(who),
            "too_many_sessions",
            failed(
                StatusCode::SERVICE_UNAVAILABLE,
                auth::NO_SESSION,
                "retry in a few minutes",
            ),
        );
    };
    let resp = signed_in(&pending.next, &sid, OIDC_COOKIE);
    (StatusCode::SEE_OTHER, Some(who), "signed_in", resp)
}
