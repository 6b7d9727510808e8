//! The web console on `https_listen`: server-rendered HTML for reviewers and auditors.
//!
//! - `GET /` → `/reviews`; `GET /reviews`: what the viewer may decide, other pending reviews
//!   they may see, recent decisions (refreshes itself); `GET /reviews/<id>`: the link in NOTICEs
//!   and webhooks; `POST /reviews/<id>/approve|deny` (form: `reason`, `csrf`).
//! - `GET /sessions?subject=&resource=&outcome=&since=&until=&offset=` and `GET /sessions/<id>`
//!   (auditors and admins), `GET /sessions/<id>/events.jsonl` (the API's event shape, one a line).
//! - `GET /access`: grants in force (the viewer's own; all for auditors and admins) and a form
//!   that asks for access or unmasking (`POST /access`); `POST /grants/<id>/revoke`.
//! - `GET /audit` (auditors and admins): the audit trail's hash chains, verified on request.
//! - `GET /resources` (auditors and admins): each resource's upstream, TLS, who may reach it,
//!   its rules and masks (the config in force, never a secret's value), and what the latest
//!   periodic scan found.
//! - `GET|POST /login` (a token, checked once with `tollgate_gate::identify`), `POST /logout`;
//!   a client certificate signs in without a form. Static `/console/console.css|js`.
//! - `GET /auth/oidc/start` and `GET /auth/oidc/callback`: sign-in with an `[[identity.oidc]]`
//!   issuer that has a `client_id` (authorization code + PKCE; [`oidc`]).
//! - `GET /saml/metadata`, `GET /saml/login`, `POST /saml/acs`, `GET /saml/finish`: SAML 2.0
//!   sign-in with `[identity.saml]` (console and `tollgate login --saml`; [`saml`]).
//!
//! Authorization is the API's: the review workflow's own checks (`Reviews::decide`), and the
//! auditor/admin roles for sessions. Every POST must carry the console session's CSRF token
//! and come from this origin. Every view of reviews or sessions and every action is an
//! `api.read` / `api.write` event, as in the API (with `"console": true`).

mod auth;
mod oidc;
mod pages;
mod saml;

pub use auth::ConsoleSessions;
pub(crate) use saml::{
    digest as saml_digest, SignedIn as SamlSignedIn, KIND_CODE as SAML_CODE_KIND,
};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{HeaderValue, CACHE_CONTROL, CONTENT_TYPE, LOCATION, SET_COOKIE};
use hyper::{Method, Request, Response, StatusCode};
use maud::Markup;
use serde_json::json;
use tollgate_identity::Identity;
use tollgate_review::{Review, ReviewFilter};
use tollgate_store::{EventInput, SessionFilter};

use crate::params;
use crate::routes::{api_event, ApiBody};
use crate::view::{Event, Session};
use crate::{ApiState, Conn, KIND_API_READ, KIND_API_WRITE};
use auth::{Credential, COOKIE_NAME, LOGIN_COOKIE};
use pages::Viewer;

/// Sessions per page of `/sessions`.
const SESSIONS_PAGE: usize = 50;
/// Decided reviews shown on `/reviews`.
const RECENT_DECIDED: usize = 20;
/// Query parameters copied into the audit events of console pages.
const RECORDED_PARAMS: &[&str] = &["subject", "resource", "outcome", "since", "until", "offset"];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Page {
    Root,
    Css,
    Js,
    Login,
    Logout,
    OidcStart,
    OidcCallback,
    SamlMetadata,
    SamlLogin,
    SamlAcs,
    SamlFinish,
    Reviews,
    Review(String),
    Decide {
        id: String,
        approve: bool,
    },
    Sessions,
    Session(String),
    SessionEvents(String),
    /// Grants in force, and the form to ask for access or unmasking (GET shows, POST asks).
    Access,
    GrantRevoke(String),
    /// The audit trail's hash chains, verified now.
    Audit,
    /// The configured resources, read-only (auditors and admins).
    Resources,
}

impl Page {
    fn parse(path: &str) -> Option<Page> {
        let id = |s: &str| params::decode(s).ok().filter(|s| !s.is_empty());
        let parts: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
        Some(match parts.as_slice() {
            [""] => Page::Root,
            ["console", "console.css"] => Page::Css,
            ["console", "console.js"] => Page::Js,
            ["login"] => Page::Login,
            ["logout"] => Page::Logout,
            ["auth", "oidc", "start"] => Page::OidcStart,
            ["auth", "oidc", "callback"] => Page::OidcCallback,
            ["saml", "metadata"] => Page::SamlMetadata,
            ["saml", "login"] => Page::SamlLogin,
            ["saml", "acs"] => Page::SamlAcs,
            ["saml", "finish"] => Page::SamlFinish,
            ["reviews"] => Page::Reviews,
            ["reviews", i] => Page::Review(id(i)?),
            ["reviews", i, "approve"] => Page::Decide {
                id: id(i)?,
                approve: true,
            },
            ["reviews", i, "deny"] => Page::Decide {
                id: id(i)?,
                approve: false,
            },
            ["sessions"] => Page::Sessions,
            ["sessions", i] => Page::Session(id(i)?),
            ["sessions", i, "events.jsonl"] => Page::SessionEvents(id(i)?),
            ["access"] => Page::Access,
            ["audit"] => Page::Audit,
            ["resources"] => Page::Resources,
            ["grants", i, "revoke"] => Page::GrantRevoke(id(i)?),
            _ => return None,
        })
    }

    fn method(&self) -> Method {
        match self {
            Page::Logout | Page::Decide { .. } | Page::GrantRevoke(_) | Page::SamlAcs => {
                Method::POST
            }
            _ => Method::GET,
        }
    }

    fn pattern(&self) -> &'static str {
        match self {
            Page::Root => "/",
            Page::Css | Page::Js => "/console/*",
            Page::Login => "/login",
            Page::Logout => "/logout",
            Page::OidcStart => "/auth/oidc/start",
            Page::OidcCallback => oidc::CALLBACK_PATH,
            Page::SamlMetadata => saml::METADATA_PATH,
            Page::SamlLogin => saml::LOGIN_PATH,
            Page::SamlAcs => saml::ACS_PATH,
            Page::SamlFinish => saml::FINISH_PATH,
            Page::Reviews => "/reviews",
            Page::Review(_) => "/reviews/{id}",
            Page::Decide { approve: true, .. } => "/reviews/{id}/approve",
            Page::Decide { approve: false, .. } => "/reviews/{id}/deny",
            Page::Sessions => "/sessions",
            Page::Session(_) => "/sessions/{id}",
            Page::SessionEvents(_) => "/sessions/{id}/events.jsonl",
            Page::Access => "/access",
            Page::GrantRevoke(_) => "/grants/{id}/revoke",
            Page::Audit => "/audit",
            Page::Resources => "/resources",
        }
    }

    fn fields(&self) -> serde_json::Value {
        let mut f = json!({"console": true, "route": self.pattern()});
        match self {
            Page::Review(id) | Page::Decide { id, .. } | Page::GrantRevoke(id) => {
                f["review"] = json!(id)
            }
            Page::Session(id) | Page::SessionEvents(id) => f["session"] = json!(id),
            _ => {}
        }
        f
    }
}

/// Paths the console answers (the JSON API keeps `/api/`, HTTP resources `/r/`).
pub(crate) fn is_console_path(path: &str) -> bool {
    path == "/"
        || [
            "/reviews",
            "/sessions",
            "/login",
            "/logout",
            "/auth",
            "/saml",
            "/console",
            "/access",
            "/grants",
            "/audit",
            "/resources",
        ]
        .iter()
        .any(|p| path == *p || path.strip_prefix(p).is_some_and(|r| r.starts_with('/')))
}

/// The signed-in viewer of one request.
struct Caller {
    who: Identity,
    csrf: String,
    /// The console session's cookie id.
    sid: String,
    /// A `Set-Cookie` to send (a certificate's session was just made).
    set_cookie: Option<String>,
}

/// An answer still to be decorated (security headers, cookies) and audited.
struct Answer {
    status: StatusCode,
    resp: Response<ApiBody>,
}

fn body(bytes: impl Into<Bytes>) -> ApiBody {
    Full::new(bytes.into()).map_err(|n| match n {}).boxed()
}

fn html(status: StatusCode, markup: Markup) -> Answer {
    let mut resp = Response::new(body(markup.into_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    Answer { status, resp }
}

fn redirect(location: &str) -> Answer {
    let mut resp = Response::new(body(Bytes::new()));
    *resp.status_mut() = StatusCode::SEE_OTHER;
    if let Ok(v) = HeaderValue::from_str(location) {
        resp.headers_mut().insert(LOCATION, v);
    }
    Answer {
        status: StatusCode::SEE_OTHER,
        resp,
    }
}

/// The end of a browser sign-in (OIDC or SAML): the session cookie `sid` is set, the
/// sign-in's pre-login cookie `pre_login` cleared, and the browser sent on to `next`.
fn signed_in(next: &str, sid: &str, pre_login: &str) -> Response<ApiBody> {
    let mut a = redirect(next);
    add_cookie(
        &mut a.resp,
        &auth::set_cookie(COOKIE_NAME, sid, auth::SESSION_TTL),
    );
    add_cookie(
        &mut a.resp,
        &auth::set_cookie(pre_login, "", std::time::Duration::ZERO),
    );
    secure(&mut a.resp);
    a.resp
}

fn problem(status: StatusCode, viewer: Option<&Viewer>, text: &str, hint: Option<&str>) -> Answer {
    let title = match status {
        StatusCode::FORBIDDEN => "Not allowed",
        StatusCode::NOT_FOUND => "Not found",
        StatusCode::CONFLICT => "Already decided",
        StatusCode::UNAUTHORIZED => "Sign in needed",
        s if s.is_server_error() => "Unavailable",
        _ => "Cannot do that",
    };
    html(status, pages::message(title, viewer, text, hint))
}

/// Headers on every console answer: nothing framed, sniffed, cached, or loaded from elsewhere.
fn secure(resp: &mut Response<ApiBody>) {
    let h = resp.headers_mut();
    for (k, v) in [
        ("content-security-policy", "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
        ("x-frame-options", "DENY"),
        ("x-content-type-options", "nosniff"),
        ("referrer-policy", "no-referrer"),
    ] {
        h.insert(k, HeaderValue::from_static(v));
    }
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
}

fn add_cookie(resp: &mut Response<ApiBody>, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        resp.headers_mut().append(SET_COOKIE, v);
    }
}

/// Who is asking: a console session (its credential checked again now), else a verified client
/// certificate (which gets a console session for its CSRF token).
async fn caller(state: &ApiState, conn: &Conn, headers: &hyper::HeaderMap) -> Option<Caller> {
    if let Some(sid) = auth::cookie(headers, COOKIE_NAME) {
        if let Some(entry) = state.console.get(&state.store, &sid).await {
            let who = match &entry.credential {
                Credential::Certificate => match &conn.cert {
                    Some(Ok(id)) => Some(id.clone()),
                    _ => None,
                },
                // A SAML sign-in has no credential to present again: the session is the proof,
                // for at most SESSION_TTL (and the IdP's SessionNotOnOrAfter).
                Credential::Saml(who) => Some(who.clone()),
                Credential::Token(t) => {
                    let header = format!("Bearer {t}");
                    tollgate_gate::identify(
                        None,
                        Some(header.as_bytes()),
                        &state.tokens.load_full(),
                        &state.oidc,
                    )
                    .await
                    .ok()
                }
            };
            match who {
                Some(who) if who.principal.as_str() == entry.principal => {
                    return Some(Caller {
                        who,
                        csrf: entry.csrf,
                        sid,
                        set_cookie: None,
                    })
                }
                // The credential is gone (reload, expiry) or belongs to someone else now.
                _ if matches!(entry.credential, Credential::Token(_)) => {
                    state.console.remove(&state.store, &sid).await
                }
                _ => {}
            }
        }
    }
    let Some(Ok(who)) = &conn.cert else {
        return None;
    };
    let (sid, entry) = state
        .console
        .create(&state.store, who, Credential::Certificate)
        .await?;
    Some(Caller {
        who: who.clone(),
        csrf: entry.csrf,
        set_cookie: Some(auth::set_cookie(COOKIE_NAME, &sid, auth::SESSION_TTL)),
        sid,
    })
}

pub(crate) async fn handle(
    state: &ApiState,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let path = req.uri().path().to_string();
    let query = req.uri().query().unwrap_or("").to_string();
    let method = req.method().clone();
    let Some(page) = Page::parse(&path) else {
        let mut a = problem(
            StatusCode::NOT_FOUND,
            None,
            "There is no such page.",
            Some("the console has /reviews and /sessions"),
        );
        secure(&mut a.resp);
        return a.resp;
    };
    let either = matches!(page, Page::Login | Page::Access);
    if method != page.method() && !(either && method == Method::POST) {
        let mut a = problem(
            StatusCode::METHOD_NOT_ALLOWED,
            None,
            &format!("{method} is not supported on {}", page.pattern()),
            None,
        );
        secure(&mut a.resp);
        return a.resp;
    }
    // Public: the stylesheet, the script and the way in.
    match (&page, &method) {
        (Page::Css, _) => return asset("text/css; charset=utf-8", pages::CSS),
        (Page::Js, _) => return asset("text/javascript; charset=utf-8", pages::JS),
        (Page::Login, &Method::GET) => {
            let next = params::parse_query(&query)
                .unwrap_or_default()
                .into_iter()
                .find(|(k, _)| k == "next")
                .map(|(_, v)| v);
            return login_form(state, StatusCode::OK, next.as_deref(), None);
        }
        (Page::Login, _) => return login(state, conn, req).await,
        (Page::OidcStart, _) => return oidc::start(state, &req).await,
        (Page::OidcCallback, _) => return oidc::callback(state, conn, &req).await,
        (Page::SamlMetadata, _) => return saml::metadata(state),
        (Page::SamlLogin, _) => return saml::login(state, &req).await,
        (Page::SamlAcs, _) => return saml::acs(state, conn, req).await,
        (Page::SamlFinish, _) => return saml::finish(state, conn, &req).await,
        _ => {}
    }

    let headers = req.headers().clone();
    let who = caller(state, conn, &headers).await;
    let audit_kind = if method == Method::POST {
        KIND_API_WRITE
    } else {
        KIND_API_READ
    };
    let event = |who: Option<&Identity>, status: StatusCode| -> EventInput {
        let mut fields = page.fields();
        fields["method"] = json!(method.as_str());
        api_event(
            state,
            conn,
            who,
            audit_kind,
            &path,
            (&query, RECORDED_PARAMS),
            status,
            fields,
        )
    };
    let Some(caller) = who else {
        // Not signed in: a page sends the browser to the sign-in form, a POST is refused.
        let mut a = if method == Method::GET {
            let here = if query.is_empty() {
                path.clone()
            } else {
                format!("{path}?{query}")
            };
            redirect(&format!("/login?next={}", params::encode(&here)))
        } else {
            problem(
                StatusCode::UNAUTHORIZED,
                None,
                "Your console session has ended.",
                Some("sign in again at /login"),
            )
        };
        if page != Page::Root {
            state.record_refused(
                conn,
                StatusCode::UNAUTHORIZED,
                event(None, StatusCode::UNAUTHORIZED),
            );
        }
        secure(&mut a.resp);
        return a.resp;
    };

    let viewer = Viewer {
        who: &caller.who,
        csrf: &caller.csrf,
    };
    let answer = if method == Method::POST {
        match checked_form(&caller, req).await {
            Ok(form) => post(state, &caller, &viewer, &page, &form).await,
            Err(a) => a,
        }
    } else {
        get(state, &caller, &viewer, &page, &query).await
    };
    let mut resp = match answer {
        Ok(a) => a.resp,
        Err(a) => a.resp,
    };
    if let Some(c) = &caller.set_cookie {
        add_cookie(&mut resp, c);
    }
    if page == Page::Logout && resp.status() == StatusCode::SEE_OTHER {
        state.console.remove(&state.store, &caller.sid).await;
        add_cookie(
            &mut resp,
            &auth::set_cookie(COOKIE_NAME, "", std::time::Duration::ZERO),
        );
    }
    secure(&mut resp);
    let status = resp.status();
    if page == Page::Root {
        return resp;
    }
    let event = event(Some(&caller.who), status);
    if method == Method::GET && status.is_success() {
        // Data leaves only once its view is in the audit journal.
        let mut resp = crate::routes::after_recording(state, event, resp).await;
        secure(&mut resp);
        resp
    } else {
        state.record_refused(conn, status, event);
        resp
    }
}

fn asset(content_type: &'static str, text: &'static str) -> Response<ApiBody> {
    let mut resp = Response::new(body(text));
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    secure(&mut resp);
    resp
}

fn login_form(
    state: &ApiState,
    status: StatusCode,
    next: Option<&str>,
    error: Option<&str>,
) -> Response<ApiBody> {
    let csrf = auth::random_hex();
    let issuers: Vec<String> = state
        .oidc
        .sign_in_issuers()
        .into_iter()
        .map(|o| o.issuer)
        .collect();
    let saml = state.saml.load().is_some();
    let mut a = html(
        status,
        pages::login(&csrf, &auth::local_next(next), &issuers, saml, error),
    );
    add_cookie(
        &mut a.resp,
        &auth::set_cookie(LOGIN_COOKIE, &csrf, auth::LOGIN_TTL),
    );
    secure(&mut a.resp);
    a.resp
}

/// `POST /login`: same origin, the sign-in form's double-submit token, then the token itself.
async fn login(
    state: &ApiState,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let headers = req.headers().clone();
    let origin = auth::same_origin(req.uri().authority().map(|a| a.as_str()), &headers);
    let form = read_form(req).await;
    let (status, who, resp) = async {
        if let Err(e) = origin {
            return (StatusCode::FORBIDDEN, None, forbidden(&e.to_string()));
        }
        let form = match form {
            Ok(f) => f,
            Err(a) => return (a.status, None, a.resp),
        };
        let expected = auth::cookie(&headers, LOGIN_COOKIE).unwrap_or_default();
        let sent = field(&form, "csrf").unwrap_or_default();
        if expected.is_empty() || !auth::same(&expected, sent) {
            return (
                StatusCode::FORBIDDEN,
                None,
                forbidden(
                    "the sign-in form has expired or did not come from this console: reload it",
                ),
            );
        }
        let next = field(&form, "next");
        let token = field(&form, "token").unwrap_or_default().trim().to_string();
        let header = format!("Bearer {token}");
        let identified = if token.is_empty() {
            None
        } else {
            tollgate_gate::identify(
                None,
                Some(header.as_bytes()),
                &state.tokens.load_full(),
                &state.oidc,
            )
            .await
            .ok()
        };
        let Some(who) = identified else {
            return (
                StatusCode::UNAUTHORIZED,
                None,
                login_form(
                    state,
                    StatusCode::UNAUTHORIZED,
                    next,
                    Some("That token is not valid here."),
                ),
            );
        };
        let Some((sid, _)) = state
            .console
            .create(&state.store, &who, Credential::Token(token))
            .await
        else {
            let mut a = problem(
                StatusCode::SERVICE_UNAVAILABLE,
                None,
                auth::NO_SESSION,
                Some("retry in a few minutes"),
            );
            secure(&mut a.resp);
            return (StatusCode::SERVICE_UNAVAILABLE, Some(who), a.resp);
        };
        let mut a = redirect(&auth::local_next(next));
        add_cookie(
            &mut a.resp,
            &auth::set_cookie(COOKIE_NAME, &sid, auth::SESSION_TTL),
        );
        add_cookie(
            &mut a.resp,
            &auth::set_cookie(LOGIN_COOKIE, "", std::time::Duration::ZERO),
        );
        secure(&mut a.resp);
        (StatusCode::SEE_OTHER, Some(who), a.resp)
    }
    .await;
    let event = api_event(
        state,
        conn,
        who.as_ref(),
        KIND_API_WRITE,
        "/login",
        ("", &[]),
        status,
        json!({"console": true, "route": "/login", "method": "POST"}),
    );
    if status == StatusCode::SEE_OTHER {
        state.recorder.record(event);
    } else {
        state.record_refused(conn, status, event);
    }
    resp
}

fn forbidden(text: &str) -> Response<ApiBody> {
    let mut a = problem(
        StatusCode::FORBIDDEN,
        None,
        text,
        Some("open the page again and use its form"),
    );
    secure(&mut a.resp);
    a.resp
}

type Form = Vec<(String, String)>;

fn field<'a>(form: &'a Form, name: &str) -> Option<&'a str> {
    form.iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

async fn read_form(req: Request<hyper::body::Incoming>) -> Result<Form, Answer> {
    let bytes = crate::review_routes::read_body(req)
        .await
        .map_err(|r| problem(r.status, None, &r.body.error, None))?;
    let text = std::str::from_utf8(&bytes)
        .map_err(|_| problem(StatusCode::BAD_REQUEST, None, "the form is not UTF-8", None))?;
    params::parse_query(text).map_err(|e| problem(StatusCode::BAD_REQUEST, None, &e.0, None))
}

/// A console POST's form, once it is shown to come from this console: same origin, and the
/// caller's console-session CSRF token.
async fn checked_form(
    caller: &Caller,
    req: Request<hyper::body::Incoming>,
) -> Result<Form, Result<Answer, Answer>> {
    if let Err(e) = auth::same_origin(req.uri().authority().map(|a| a.as_str()), req.headers()) {
        return Err(Err(problem(
            StatusCode::FORBIDDEN,
            None,
            &e.to_string(),
            Some("open the page again and use its form"),
        )));
    }
    let form = read_form(req).await.map_err(Err)?;
    match field(&form, "csrf") {
        Some(t) if auth::same(t, &caller.csrf) => Ok(form),
        _ => Err(Err(problem(
            StatusCode::FORBIDDEN,
            None,
            "The form carries no valid CSRF token for your console session.",
            Some("open the page again and use its form"),
        ))),
    }
}

async fn post(
    state: &ApiState,
    caller: &Caller,
    viewer: &Viewer<'_>,
    page: &Page,
    form: &Form,
) -> Result<Answer, Answer> {
    match page {
        Page::Logout => Ok(redirect("/login")),
        Page::Access => {
            let resource = field(form, "resource").unwrap_or("").trim().to_string();
            let reason = field(form, "reason").unwrap_or("").to_string();
            let unmask = field(form, "unmask").is_some();
            let duration = tollgate_config::parse_duration(field(form, "for").unwrap_or(""))
                .map_err(|e| {
                    problem(
                        StatusCode::BAD_REQUEST,
                        Some(viewer),
                        &format!("For how long: {e}"),
                        Some("write a duration such as 30m or 2h"),
                    )
                })?;
            let (reviews, me) = (state.reviews.clone(), caller.who.clone());
            let asked = tokio::task::spawn_blocking(move || {
                if unmask {
                    reviews.request_unmask(&me, &resource, duration, &reason)
                } else {
                    reviews.request_access(&me, &resource, duration, &reason)
                }
            })
            .await;
            match asked {
                Ok(Ok(r)) => Ok(redirect(&format!("/reviews/{}", params::encode(&r.id)))),
                Ok(Err(e)) => Err(workflow_problem(viewer, e, None)),
                Err(e) => Err(store_problem(viewer, e)),
            }
        }
        Page::GrantRevoke(id) => {
            let reason = field(form, "reason").map(str::to_string);
            let (reviews, key, me) = (state.reviews.clone(), id.clone(), caller.who.clone());
            let revoked =
                tokio::task::spawn_blocking(move || reviews.revoke_grant(&key, &me, reason)).await;
            match revoked {
                Ok(Ok(_)) => Ok(redirect("/access")),
                Ok(Err(e)) => Err(workflow_problem(viewer, e, Some(id))),
                Err(e) => Err(store_problem(viewer, e)),
            }
        }
        Page::Decide { id, approve } => {
            let reason = field(form, "reason").map(str::to_string);
            let (reviews, key, me, approve) = (
                state.reviews.clone(),
                id.clone(),
                caller.who.clone(),
                *approve,
            );
            let decided =
                tokio::task::spawn_blocking(move || reviews.decide(&key, &me, approve, reason))
                    .await;
            match decided {
                Ok(Ok(_)) => Ok(redirect(&format!("/reviews/{}", params::encode(id)))),
                Ok(Err(e)) => Err(workflow_problem(viewer, e, Some(id))),
                Err(e) => Err(store_problem(viewer, e)),
            }
        }
        _ => unreachable!("only POST pages reach here"),
    }
}

/// A refusal of the review workflow, as the API words it.
fn workflow_problem(viewer: &Viewer, e: tollgate_review::ReviewError, id: Option<&str>) -> Answer {
    let r = crate::review_routes::review_refusal(e, id);
    problem(
        r.status,
        Some(viewer),
        &r.body.error,
        r.body.hint.as_deref(),
    )
}

fn store_problem(viewer: &Viewer, e: impl std::fmt::Display) -> Answer {
    let r = crate::routes::store_failed(e);
    problem(
        r.status,
        Some(viewer),
        &r.body.error,
        r.body.hint.as_deref(),
    )
}

async fn blocking<T: Send + 'static, E: std::fmt::Display + Send + 'static>(
    viewer: &Viewer<'_>,
    f: impl FnOnce() -> Result<T, E> + Send + 'static,
) -> Result<T, Answer> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_problem(viewer, e)),
        Err(e) => Err(store_problem(viewer, e)),
    }
}

fn may_read_sessions(state: &ApiState, who: &Identity) -> bool {
    who.in_any(&state.roles.auditor_groups) || who.in_any(&state.roles.admin_groups)
}

async fn get(
    state: &ApiState,
    caller: &Caller,
    viewer: &Viewer<'_>,
    page: &Page,
    query: &str,
) -> Result<Answer, Answer> {
    let who = &caller.who;
    let sessions_refused = || {
        problem(
            StatusCode::FORBIDDEN,
            Some(viewer),
            &format!(
                "{} may not read sessions: that needs the auditor or admin role.",
                who.subject
            ),
            Some("ask an administrator to add one of your groups to roles.auditor_groups"),
        )
    };
    match page {
        Page::Root => Ok(redirect("/reviews")),
        Page::Reviews => {
            let reviews = state.reviews.clone();
            let pending_filter = ReviewFilter {
                status: Some("pending".into()),
                limit: Some(200),
                ..Default::default()
            };
            let recent_filter = ReviewFilter {
                limit: Some(200),
                ..Default::default()
            };
            let (pending, recent) = blocking(viewer, move || {
                Ok::<_, tollgate_review::ReviewError>((
                    reviews.list(&pending_filter)?,
                    reviews.list(&recent_filter)?,
                ))
            })
            .await?;
            let visible = |r: &Review| crate::review_routes::may_see(state, who, r);
            let (to_decide, other): (Vec<Review>, Vec<Review>) = pending
                .into_iter()
                .filter(|r| visible(r))
                .partition(|r| state.reviews.may_decide(r, who));
            let decided: Vec<Review> = recent
                .into_iter()
                .filter(|r| r.status != "pending" && visible(r))
                .take(RECENT_DECIDED)
                .collect();
            Ok(html(
                StatusCode::OK,
                pages::reviews(viewer, &to_decide, &other, &decided),
            ))
        }
        Page::Review(id) => {
            let (reviews, key) = (state.reviews.clone(), id.clone());
            let review = blocking(viewer, move || reviews.get(&key))
                .await?
                .filter(|r| crate::review_routes::may_see(state, who, r));
            let Some(r) = review else {
                return Err(problem(
                    StatusCode::NOT_FOUND,
                    Some(viewer),
                    &format!("There is no review {id:?} that you may see."),
                    Some("reviews are visible to their requester, their approvers, auditors and admins"),
                ));
            };
            // What the requester ran on this resource lately: for whoever may decide, and
            // for those who may read sessions anyway.
            let recent = if state.reviews.may_decide(&r, who) || may_read_sessions(state, who) {
                let (store, subject, resource) =
                    (state.store.clone(), r.requester.clone(), r.resource.clone());
                blocking(viewer, move || recent_commands(&*store, subject, resource)).await?
            } else {
                Vec::new()
            };
            let forms = if state.reviews.may_decide(&r, who) {
                Ok(())
            } else if state.reviews.is_requester(&r, who) {
                Err(pages::NoForms::Requester)
            } else if r.votes.iter().any(|v| v.reviewer == who.subject) {
                Err(pages::NoForms::AlreadyVoted)
            } else {
                Err(pages::NoForms::NotAnApprover)
            };
            Ok(html(
                StatusCode::OK,
                pages::review(viewer, &r, forms, &recent),
            ))
        }
        Page::Access => {
            let reviews = state.reviews.clone();
            let filter = tollgate_review::GrantFilter {
                active: Some(true),
                ..Default::default()
            };
            let grants = blocking(viewer, move || reviews.grants(&filter)).await?;
            let admin = who.in_any(&state.roles.admin_groups);
            let grants: Vec<(tollgate_review::GrantView, bool)> = grants
                .into_iter()
                .filter_map(|g| {
                    let holder = state.reviews.is_holder(&g, who);
                    (holder || may_read_sessions(state, who)).then_some((g, holder || admin))
                })
                .collect();
            Ok(html(StatusCode::OK, pages::access(viewer, &grants)))
        }
        Page::Audit => {
            if !may_read_sessions(state, who) {
                return Err(sessions_refused());
            }
            let store = state.store.clone();
            let report = blocking(viewer, move || store.verify()).await?;
            Ok(html(StatusCode::OK, pages::audit(viewer, &report)))
        }
        Page::Resources => {
            if !may_read_sessions(state, who) {
                return Err(problem(
                    StatusCode::FORBIDDEN,
                    Some(viewer),
                    &format!(
                        "{} may not read the resources' configuration: that needs the auditor or admin role.",
                        who.subject
                    ),
                    Some("ask an administrator to add one of your groups to roles.auditor_groups"),
                ));
            }
            let config = state.config.load_full();
            let scan = state.latest_scan.load_full();
            Ok(html(
                StatusCode::OK,
                pages::resources(viewer, &config, scan.as_deref()),
            ))
        }
        Page::Sessions => {
            if !may_read_sessions(state, who) {
                return Err(sessions_refused());
            }
            let given: Form = params::parse_query(query)
                .map_err(|e| problem(StatusCode::BAD_REQUEST, Some(viewer), &e.0, None))?
                .into_iter()
                .filter(|(k, v)| !v.is_empty() && RECORDED_PARAMS.contains(&k.as_str()))
                .collect();
            let api_query: Vec<String> = given
                .iter()
                .map(|(k, v)| format!("{k}={}", params::encode(v)))
                .collect();
            let q = params::sessions_query(&api_query.join("&"))
                .map_err(|e| problem(StatusCode::BAD_REQUEST, Some(viewer), &e.0, None))?;
            let filter = SessionFilter {
                subject: q.subject,
                resource: q.resource,
                outcome: q.outcome,
                since_unix_ms: q.since_unix_ms,
                until_unix_ms: q.until_unix_ms,
                limit: Some(SESSIONS_PAGE + 1),
                offset: Some(q.offset),
            };
            let store = state.store.clone();
            let mut rows = blocking(viewer, move || store.sessions(&filter)).await?;
            let more = rows.len() > SESSIONS_PAGE;
            rows.truncate(SESSIONS_PAGE);
            let next = more.then(|| {
                let mut parts: Vec<String> = given
                    .iter()
                    .filter(|(k, _)| k != "offset")
                    .map(|(k, v)| format!("{k}={}", params::encode(v)))
                    .collect();
                parts.push(format!("offset={}", q.offset + SESSIONS_PAGE));
                format!("/sessions?{}", parts.join("&"))
            });
            let value = |k: &str| field(&given, k).unwrap_or("").to_string();
            let form = pages::SessionFilterForm {
                subject: value("subject"),
                resource: value("resource"),
                outcome: value("outcome"),
                since: value("since"),
                until: value("until"),
            };
            let rows: Vec<Session> = rows.into_iter().map(Session::from).collect();
            Ok(html(
                StatusCode::OK,
                pages::sessions(viewer, &form, &rows, next),
            ))
        }
        Page::Session(id) | Page::SessionEvents(id) => {
            if !may_read_sessions(state, who) {
                return Err(sessions_refused());
            }
            let (store, key) = (state.store.clone(), id.clone());
            let (row, events) = blocking(viewer, move || {
                Ok::<_, tollgate_store::StoreError>((store.session(&key)?, store.events(&key)?))
            })
            .await?;
            let events: Vec<Event> = events.into_iter().map(Event::from).collect();
            let Some(row) = row else {
                return Err(problem(
                    StatusCode::NOT_FOUND,
                    Some(viewer),
                    &format!("There is no session {id:?}."),
                    None,
                ));
            };
            if let Page::SessionEvents(_) = page {
                let mut out = Vec::with_capacity(events.len() * 512);
                for e in &events {
                    serde_json::to_writer(&mut out, e).expect("events serialize");
                    out.push(b'\n');
                }
                let mut resp = Response::new(body(out));
                let h = resp.headers_mut();
                h.insert(
                    CONTENT_TYPE,
                    HeaderValue::from_static("application/x-ndjson"),
                );
                if let Ok(v) = HeaderValue::from_str(&format!(
                    "attachment; filename=\"session-{}.jsonl\"",
                    id.chars()
                        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
                        .collect::<String>()
                )) {
                    h.insert("content-disposition", v);
                }
                return Ok(Answer {
                    status: StatusCode::OK,
                    resp,
                });
            }
            Ok(html(
                StatusCode::OK,
                pages::session(viewer, &Session::from(row), &events),
            ))
        }
        _ => unreachable!("only GET pages reach here"),
    }
}

/// Sessions and commands looked at for a review's "recent commands".
const RECENT_SESSIONS: usize = 5;
const RECENT_COMMANDS: usize = 10;

/// The requester's latest commands on the resource, newest first: (time, decision, text).
fn recent_commands(
    store: &dyn tollgate_store::Store,
    subject: String,
    resource: String,
) -> Result<Vec<pages::RecentCommand>, tollgate_store::StoreError> {
    let sessions = store.sessions(&SessionFilter {
        subject: Some(subject),
        resource: Some(resource),
        limit: Some(RECENT_SESSIONS),
        ..Default::default()
    })?;
    let mut out = Vec::new();
    for s in sessions {
        for e in store.events(&s.id)?.into_iter().rev() {
            if e.kind != "command" {
                continue;
            }
            let Some(text) = e.payload.get("text").and_then(|t| t.as_str()) else {
                continue;
            };
            out.push(pages::RecentCommand {
                at: params::format_time(e.at_unix_ms),
                at_unix_ms: e.at_unix_ms,
                action: e
                    .payload
                    .pointer("/decision/action")
                    .and_then(|a| a.as_str())
                    .map(str::to_string),
                text: text.to_string(),
                session: s.id.clone(),
            });
        }
    }
    out.sort_by_key(|c| std::cmp::Reverse(c.at_unix_ms));
    out.truncate(RECENT_COMMANDS);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pages_parse() {
        assert_eq!(Page::parse("/"), Some(Page::Root));
        assert_eq!(
            Page::parse("/reviews/rv_1"),
            Some(Page::Review("rv_1".into()))
        );
        assert_eq!(
            Page::parse("/reviews/rv_1/deny"),
            Some(Page::Decide {
                id: "rv_1".into(),
                approve: false
            })
        );
        assert_eq!(
            Page::parse("/sessions/a%2Fb/events.jsonl"),
            Some(Page::SessionEvents("a/b".into()))
        );
        for bad in [
            "/reviews/",
            "/reviews/a/b",
            "/sessions/a/b",
            "/console/x.css",
        ] {
            assert_eq!(Page::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn console_paths_leave_the_api_and_resources_alone() {
        for p in [
            "/",
            "/reviews",
            "/reviews/rv_1",
            "/sessions",
            "/login",
            "/console/console.css",
            "/access",
            "/grants/rv_1/revoke",
            "/resources",
        ] {
            assert!(is_console_path(p), "{p}");
        }
        for p in [
            "/api/v1/reviews",
            "/r/app/",
            "/reviewsx",
            "/.well-known/jwks.json",
            "/favicon.ico",
            "/grantsx",
            "/resourcesx",
        ] {
            assert!(!is_console_path(p), "{p}");
        }
    }
}
