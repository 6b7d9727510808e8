//! SAML 2.0 sign-in (`[identity.saml]`), for the console and for `tollgate login --saml`.
//!
//! - `GET /saml/metadata`: our SP metadata (entity id, ACS URL with the HTTP-POST binding).
//! - `GET /saml/login?next=` (the console's "Sign in with SAML") or
//!   `GET /saml/login?cli_port=&cli_state=&cli_key=` (the CLI's browser): a fresh AuthnRequest,
//!   remembered in the store under a random RelayState (so any replica can take the answer),
//!   and a redirect to the IdP (HTTP-Redirect binding). A console sign-in also binds the
//!   browser: a short-lived `__Host-tollgate_saml` cookie whose hash the request keeps.
//! - `POST /saml/acs` (HTTP-POST binding, from the IdP's page, so cross-site): the RelayState
//!   must name an outstanding request; the response is verified against that request's id
//!   ([`tollgate_identity::saml`]); its assertion id is claimed in the store's replay cache
//!   (accepted once, by every replica); only then is the request marked answered (once). A console sign-in
//!   continues at `GET /saml/finish?code=` (same-site, so the browser-binding cookie comes
//!   along) where the console session is opened; a CLI sign-in goes back to the CLI's loopback
//!   listener with a one-time code bound to the CLI's key, redeemed at
//!   `POST /api/v1/certificates` with a CSR for that key.
//!
//! Every refusal is logged with its reason, counted in `tollgate_saml_responses_total`, and
//! audited; the browser only learns that the sign-in was not accepted.

use std::time::{Duration, SystemTime};

use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tollgate_identity::saml::SamlSp;
use tollgate_identity::Identity;

use super::auth::{self, Credential};
use super::oidc::query_param;
use super::{add_cookie, body, redirect, secure};
use crate::routes::{api_event, ApiBody};
use crate::{ApiState, Conn, KIND_API_WRITE};

pub(crate) const METADATA_PATH: &str = "/saml/metadata";
pub(crate) const LOGIN_PATH: &str = "/saml/login";
pub(crate) const ACS_PATH: &str = tollgate_config::SAML_ACS_PATH;
pub(crate) const FINISH_PATH: &str = "/saml/finish";
/// The console sign-in's browser binding.
const SAML_COOKIE: &str = "__Host-tollgate_saml";
/// An AuthnRequest must be answered within this long.
const REQUEST_TTL: Duration = Duration::from_secs(600);
/// A verified sign-in waits this long for the browser (console) or the CLI to collect it.
const FINISH_TTL: Duration = Duration::from_secs(60);
pub(crate) const CODE_TTL: Duration = Duration::from_secs(120);

const KIND_REQUEST: &str = "saml.request";
const KIND_ASSERTION: &str = "saml.assertion";
/// Requests already answered (by RelayState).
const KIND_ANSWERED: &str = "saml.answered";
const KIND_FINISH: &str = "saml.finish";
/// One-time codes of `tollgate login --saml` (keyed by their SHA-256).
pub(crate) const KIND_CODE: &str = "saml.code";

/// An AuthnRequest we sent, waiting for its answer.
#[derive(Serialize, Deserialize)]
struct Outstanding {
    request_id: String,
    /// Console: where to go afterwards, and the hash of the browser-binding cookie.
    #[serde(default)]
    next: Option<String>,
    #[serde(default)]
    browser: Option<String>,
    /// CLI: where its loopback listener waits, its state, and the SHA-256 of its public key.
    #[serde(default)]
    cli: Option<CliReturn>,
}

#[derive(Serialize, Deserialize)]
struct CliReturn {
    port: u16,
    state: String,
    key: String,
}

/// A verified sign-in, waiting to be collected by the browser or redeemed by the CLI.
#[derive(Serialize, Deserialize)]
pub(crate) struct SignedIn {
    pub idp: String,
    pub subject: String,
    pub groups: Vec<String>,
    /// The IdP's SessionNotOnOrAfter (unix ms), if it said one.
    #[serde(default)]
    pub session_until_ms: Option<i64>,
    #[serde(default)]
    pub next: Option<String>,
    #[serde(default)]
    pub browser: Option<String>,
    /// CLI codes: the SHA-256 (hex) of the public key the certificate must be for.
    #[serde(default)]
    pub key: Option<String>,
}

impl SignedIn {
    pub(crate) fn identity(&self) -> Identity {
        let until = self
            .session_until_ms
            .map(|ms| SystemTime::UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64));
        tollgate_identity::saml::identity(&self.idp, &self.subject, self.groups.clone(), until)
    }
}

/// SHA-256 hex: codes and cookies are stored by hash only.
pub(crate) fn digest(s: &str) -> String {
    let d = ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

fn now_ms() -> i64 {
    tollgate_store::unix_ms(SystemTime::now())
}

fn failed(status: StatusCode, text: &str, hint: &str) -> Response<ApiBody> {
    super::oidc::sign_in_failed(SAML_COOKIE, status, text, hint)
}

fn not_configured() -> Response<ApiBody> {
    failed(
        StatusCode::NOT_FOUND,
        "This gateway offers no SAML sign-in.",
        "ask its operator to configure [identity.saml], or sign in another way at /login",
    )
}

fn count(outcome: &str, reason: &str) {
    tollgate_metrics::registry()
        .counter(
            "tollgate_saml_responses_total",
            "SAML responses posted to the ACS, by outcome and refusal reason.",
            &[("outcome", outcome), ("reason", reason)],
        )
        .inc();
}

pub(super) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, tollgate_store::StoreError> + Send + 'static,
) -> Result<T, String> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map_err(|e| e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// `GET /saml/metadata`.
pub(super) fn metadata(state: &ApiState) -> Response<ApiBody> {
    let Some(sp) = state.saml.load_full() else {
        return not_configured();
    };
    match sp.metadata_xml() {
        Ok(xml) => {
            let mut resp = Response::new(body(xml));
            resp.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/samlmetadata+xml"),
            );
            resp
        }
        Err(e) => {
            tracing::error!(error = %e, "SAML: rendering the SP metadata failed");
            failed(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The SAML metadata cannot be made right now.",
                "the gateway's log says why",
            )
        }
    }
}

/// The CLI's return address, checked: a loopback port, its state, the hash of its key.
fn cli_return(query: &str) -> Result<Option<CliReturn>, &'static str> {
    let (Some(port), Some(state), Some(key)) = (
        query_param(query, "cli_port"),
        query_param(query, "cli_state"),
        query_param(query, "cli_key"),
    ) else {
        return match query_param(query, "cli_port") {
            Some(_) => Err("cli_port, cli_state and cli_key go together"),
            None => Ok(None),
        };
    };
    let port: u16 = port
        .parse()
        .ok()
        .filter(|p| *p != 0)
        .ok_or("cli_port is not a port number")?;
    let token_chars = |s: &str| {
        s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    };
    if !(16..=128).contains(&state.len()) || !token_chars(&state) {
        return Err("cli_state must be 16 to 128 characters of [A-Za-z0-9_-]");
    }
    if key.len() != 64 || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("cli_key must be the SHA-256 (hex) of the CLI's public key");
    }
    Ok(Some(CliReturn {
        port,
        state,
        key: key.to_ascii_lowercase(),
    }))
}

/// `GET /saml/login`: off to the IdP.
pub(super) async fn login(
    state: &ApiState,
    req: &Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let Some(sp) = state.saml.load_full() else {
        return not_configured();
    };
    let query = req.uri().query().unwrap_or("");
    let cli = match cli_return(query) {
        Ok(c) => c,
        Err(e) => {
            return failed(
                StatusCode::BAD_REQUEST,
                &format!("This sign-in link is not valid: {e}."),
                "run tollgate login --saml again",
            )
        }
    };
    let relay = auth::random_hex();
    let (request_id, url) = match sp.authn_request(&relay) {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "SAML: making the AuthnRequest failed");
            return failed(
                StatusCode::INTERNAL_SERVER_ERROR,
                "The sign-in cannot be started right now.",
                "the gateway's log says why",
            );
        }
    };
    let (browser_cookie, outstanding) = if cli.is_some() {
        (
            None,
            Outstanding {
                request_id,
                next: None,
                browser: None,
                cli,
            },
        )
    } else {
        let cookie = auth::random_hex();
        let next = auth::local_next(query_param(query, "next").as_deref());
        (
            Some(cookie.clone()),
            Outstanding {
                request_id,
                next: Some(next),
                browser: Some(digest(&cookie)),
                cli: None,
            },
        )
    };
    let value = serde_json::to_string(&outstanding).unwrap_or_default();
    let store = state.store.clone();
    let now = now_ms();
    let expires = now + REQUEST_TTL.as_millis() as i64;
    let key = relay.clone();
    match blocking(move || store.once_put(KIND_REQUEST, &key, &value, expires, now)).await {
        Ok(true) => {}
        Ok(false) | Err(_) => {
            tracing::error!("SAML: the outstanding AuthnRequest could not be stored");
            return failed(
                StatusCode::SERVICE_UNAVAILABLE,
                "The sign-in cannot be started right now.",
                "retry in a moment; the gateway's log says why",
            );
        }
    }
    let mut a = redirect(&url);
    if let Some(c) = browser_cookie {
        add_cookie(&mut a.resp, &auth::set_cookie(SAML_COOKIE, &c, REQUEST_TTL));
    }
    secure(&mut a.resp);
    a.resp
}

/// `POST /saml/acs`: the IdP's answer. Every outcome is an `api.write` event.
pub(super) async fn acs(
    state: &ApiState,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let Some(sp) = state.saml.load_full() else {
        return not_configured();
    };
    let (status, who, reason, resp) = consume(state, &sp, req).await;
    if reason == "signed_in" {
        count("accepted", "none");
    } else {
        count("refused", reason);
    }
    let event = api_event(
        state,
        conn,
        who.as_ref(),
        KIND_API_WRITE,
        ACS_PATH,
        ("", &[]),
        status,
        json!({"console": true, "route": ACS_PATH, "method": "POST", "idp": sp.idp_entity_id(), "outcome": reason}),
    );
    if status == StatusCode::SEE_OTHER {
        state.recorder.record(event);
    } else {
        state.record_refused(conn, status, event);
    }
    resp
}

/// Refused: logged with `why` (the reason a person operating the gateway needs), answered with
/// a generic page.
fn refuse(
    reason: &'static str,
    why: &str,
) -> (
    StatusCode,
    Option<Identity>,
    &'static str,
    Response<ApiBody>,
) {
    tracing::warn!(reason, why, "SAML response refused");
    (
        StatusCode::BAD_REQUEST,
        None,
        reason,
        failed(
            StatusCode::BAD_REQUEST,
            "The identity provider's answer was not accepted.",
            "start the sign-in again; if it keeps failing, the gateway's log says why",
        ),
    )
}

/// [`refuse`] for an answer to a request this gateway sent: a `tollgate login --saml`
/// waiting on its loopback listener is sent the refusal (its browser is redirected there with
/// an OAuth-style `error`), so the CLI says so at once instead of waiting for its timeout.
fn refused(
    outstanding: &Outstanding,
    reason: &'static str,
    why: &str,
) -> (
    StatusCode,
    Option<Identity>,
    &'static str,
    Response<ApiBody>,
) {
    let (status, who, reason, resp) = refuse(reason, why);
    let Some(cli) = &outstanding.cli else {
        return (status, who, reason, resp);
    };
    let location = format!(
        "http://127.0.0.1:{}/callback?{}",
        cli.port,
        tollgate_identity::oidc_login::form(&[
            ("error", "access_denied"),
            (
                "error_description",
                &format!("the gateway refused the identity provider's answer ({reason}); its log says why"),
            ),
            ("state", &cli.state),
        ])
    );
    let mut a = redirect(&location);
    secure(&mut a.resp);
    (status, who, reason, a.resp)
}

async fn consume(
    state: &ApiState,
    sp: &std::sync::Arc<SamlSp>,
    req: Request<hyper::body::Incoming>,
) -> (
    StatusCode,
    Option<Identity>,
    &'static str,
    Response<ApiBody>,
) {
    let form = match super::read_form(req).await {
        Ok(f) => f,
        Err(_) => return refuse("malformed", "the ACS POST is not a readable form"),
    };
    let field = |n: &str| super::field(&form, n).map(str::to_string);
    let Some(response) = field("SAMLResponse").filter(|r| !r.is_empty()) else {
        return refuse("malformed", "the ACS POST carries no SAMLResponse");
    };
    if response.len() > tollgate_identity::saml::MAX_RESPONSE {
        return refuse("malformed", "the SAMLResponse is too large");
    }
    // An answer to no request of ours (IdP-initiated, or forged) is refused here.
    let Some(relay) = field("RelayState").filter(|r| !r.is_empty() && r.len() <= 80) else {
        return refuse(
            "unsolicited",
            "the response carries no RelayState: it answers no sign-in this gateway started (IdP-initiated sign-in is not accepted)",
        );
    };
    let store = state.store.clone();
    let now = now_ms();
    let key = relay.clone();
    let outstanding = match blocking(move || store.once_get(KIND_REQUEST, &key, now)).await {
        Ok(Some(v)) => match serde_json::from_str::<Outstanding>(&v) {
            Ok(o) => o,
            Err(_) => return refuse("store", "an outstanding request is unreadable"),
        },
        Ok(None) => {
            return refuse(
                "unsolicited",
                "the RelayState names no outstanding AuthnRequest (expired, already answered, or never sent by this gateway)",
            )
        }
        Err(e) => return refuse("store", &format!("the store is unavailable: {e}")),
    };
    let verifier = sp.clone();
    let request_id = outstanding.request_id.clone();
    let verified =
        tokio::task::spawn_blocking(move || verifier.verify(&response, &request_id)).await;
    let login = match verified {
        Ok(Ok(l)) => l,
        Ok(Err(e)) => return refused(&outstanding, e.reason(), &e.to_string()),
        Err(e) => return refused(&outstanding, "internal", &e.to_string()),
    };
    // The replay cache: an assertion is accepted once, by whichever replica sees it first.
    let store = state.store.clone();
    let id = login.assertion_id.clone();
    let until = tollgate_store::unix_ms(login.replay_until).max(now + 1);
    match blocking(move || store.once_put(KIND_ASSERTION, &id, "", until, now)).await {
        Ok(true) => {}
        Ok(false) => {
            return refuse(
                "replayed",
                &format!(
                    "assertion {} was already used: a replayed response",
                    login.assertion_id
                ),
            )
        }
        Err(e) => {
            return refused(
                &outstanding,
                "store",
                &format!("the store is unavailable: {e}"),
            )
        }
    }
    // One answer per request: the request stays (so a replayed POST meets the replay cache
    // above and is named as such), and is marked answered here.
    let store = state.store.clone();
    let answered_until = now + REQUEST_TTL.as_millis() as i64;
    match blocking(move || store.once_put(KIND_ANSWERED, &relay, "", answered_until, now)).await {
        Ok(true) => {}
        Ok(false) => {
            return refuse(
                "unsolicited",
                "the AuthnRequest was answered already (a second response to one request)",
            )
        }
        Err(e) => {
            return refused(
                &outstanding,
                "store",
                &format!("the store is unavailable: {e}"),
            )
        }
    }
    let who = login.identity;
    tracing::info!(subject = %who.subject, groups = ?who.groups, idp = sp.idp_entity_id(), "SAML sign-in verified");
    let code = tollgate_identity::oidc_login::random_token();
    let signed_in = SignedIn {
        idp: sp.idp_entity_id().to_string(),
        subject: who.subject.clone(),
        groups: who.groups.clone(),
        session_until_ms: who.expires_at.map(tollgate_store::unix_ms),
        next: outstanding.next.clone(),
        browser: outstanding.browser.clone(),
        key: outstanding.cli.as_ref().map(|c| c.key.clone()),
    };
    let (kind, ttl) = match outstanding.cli {
        Some(_) => (KIND_CODE, CODE_TTL),
        None => (KIND_FINISH, FINISH_TTL),
    };
    let value = serde_json::to_string(&signed_in).unwrap_or_default();
    let store = state.store.clone();
    let hashed = digest(&code);
    let expires = now + ttl.as_millis() as i64;
    match blocking(move || store.once_put(kind, &hashed, &value, expires, now)).await {
        Ok(true) => {}
        _ => return refuse("store", "the verified sign-in could not be stored"),
    }
    let location = match &outstanding.cli {
        Some(cli) => format!(
            "http://127.0.0.1:{}/callback?{}",
            cli.port,
            tollgate_identity::oidc_login::form(&[("code", &code), ("state", &cli.state)])
        ),
        None => format!("{FINISH_PATH}?code={code}"),
    };
    let mut a = redirect(&location);
    secure(&mut a.resp);
    (StatusCode::SEE_OTHER, Some(who), "signed_in", a.resp)
}

/// `GET /saml/finish?code=`: the browser that started a console sign-in collects it.
pub(super) async fn finish(
    state: &ApiState,
    conn: &Conn,
    req: &Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let again = "start again at /login";
    let code = query_param(req.uri().query().unwrap_or(""), "code").unwrap_or_default();
    let cookie = auth::cookie(req.headers(), SAML_COOKIE);
    let store = state.store.clone();
    let now = now_ms();
    let hashed = digest(&code);
    let taken = blocking(move || store.once_take(KIND_FINISH, &hashed, now)).await;
    let signed_in = match taken {
        Ok(Some(v)) => serde_json::from_str::<SignedIn>(&v).ok(),
        _ => None,
    };
    let (status, who, reason, resp) = match signed_in {
        None => (
            StatusCode::BAD_REQUEST,
            None,
            "no_pending_sign_in",
            failed(
                StatusCode::BAD_REQUEST,
                "This sign-in has expired or was already used.",
                again,
            ),
        ),
        Some(s)
            if !cookie.as_deref().is_some_and(|c| {
                s.browser
                    .as_deref()
                    .is_some_and(|b| auth::same(&digest(c), b))
            }) =>
        {
            tracing::warn!(subject = %s.subject, "SAML sign-in collected by another browser than the one that started it: refused");
            (
                StatusCode::BAD_REQUEST,
                None,
                "browser_mismatch",
                failed(
                    StatusCode::BAD_REQUEST,
                    "This sign-in was started in another browser.",
                    again,
                ),
            )
        }
        Some(s) => {
            let who = s.identity();
            match state
                .console
                .create(&state.store, &who, Credential::Saml(who.clone()))
                .await
            {
                None => (
                    StatusCode::SERVICE_UNAVAILABLE,
                    Some(who),
                    "too_many_sessions",
                    failed(
                        StatusCode::SERVICE_UNAVAILABLE,
                        auth::NO_SESSION,
                        "retry in a few minutes",
                    ),
                ),
                Some((sid, _)) => {
                    let next = auth::local_next(s.next.as_deref());
                    let resp = super::signed_in(&next, &sid, SAML_COOKIE);
                    (StatusCode::SEE_OTHER, Some(who), "signed_in", resp)
                }
            }
        }
    };
    let event = api_event(
        state,
        conn,
        who.as_ref(),
        KIND_API_WRITE,
        FINISH_PATH,
        ("", &[]),
        status,
        json!({"console": true, "route": FINISH_PATH, "method": "GET", "outcome": reason}),
    );
    if status == StatusCode::SEE_OTHER {
        state.recorder.record(event);
    } else {
        state.record_refused(conn, status, event);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cli_return_addresses_are_checked() {
        let key = "a".repeat(64);
        let ok = format!("cli_port=4711&cli_state=abcdefghijklmnop&cli_key={key}");
        let r = cli_return(&ok).unwrap().unwrap();
        assert_eq!((r.port, r.state.as_str()), (4711, "abcdefghijklmnop"));
        assert!(cli_return("next=/reviews").unwrap().is_none());
        for bad in [
            format!("cli_port=0&cli_state=abcdefghijklmnop&cli_key={key}"),
            format!("cli_port=x&cli_state=abcdefghijklmnop&cli_key={key}"),
            format!("cli_port=1&cli_state=short&cli_key={key}"),
            format!("cli_port=1&cli_state=abcdefghijklmnop%3Cx&cli_key={key}"),
            "cli_port=1&cli_state=abcdefghijklmnop&cli_key=zz".to_string(),
            "cli_port=1".to_string(),
        ] {
            assert!(cli_return(&bad).is_err(), "{bad}");
        }
    }
}
