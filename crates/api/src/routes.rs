//! Routing, authentication, role checks and the handlers; every request ends in one
//! `api.read` audit event.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::SystemTime;

use bytes::Bytes;
use http_body_util::{combinators::BoxBody, BodyExt, Full};
use hyper::body::{Body, Frame};
use hyper::header::{HeaderValue, AUTHORIZATION, CACHE_CONTROL, CONTENT_TYPE};
use hyper::{Method, Request, Response, StatusCode};
use serde::Serialize;
use serde_json::{json, Value};
use tollgate_identity::Identity;
use tollgate_store::{EventInput, SessionFilter, StoreError};

use crate::params::{self, BadParam};
use crate::view::{ErrorBody, Event, EventList, Session, SessionDetail, SessionsPage};
use crate::{ApiState, Conn, KIND_API_READ};

pub(crate) type ApiBody = BoxBody<Bytes, io::Error>;

/// Events per store query (and per chunk) of an export.
const EXPORT_PAGE: usize = 500;
/// Query parameters copied into `api.read` events (nothing else from the request is).
const RECORDED_PARAMS: &[&str] = &[
    "subject", "resource", "outcome", "since", "until", "limit", "offset",
];
const ROUTES_HINT: &str = "routes: GET /api/v1/sessions, /api/v1/sessions/{id}, /api/v1/sessions/{id}/events, /api/v1/export, /api/v1/audit/verify";

#[derive(Debug, Clone, PartialEq, Eq)]
enum Route {
    Sessions,
    Session(String),
    Events(String),
    Export,
    Verify,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let rest = path.strip_prefix("/api/v1/")?;
        let parts: Vec<&str> = rest.split('/').collect();
        let id = |s: &str| params::decode(s).ok().filter(|s| !s.is_empty());
        Some(match parts.as_slice() {
            ["sessions"] => Route::Sessions,
            ["sessions", s] => Route::Session(id(s)?),
            ["sessions", s, "events"] => Route::Events(id(s)?),
            ["export"] => Route::Export,
            ["audit", "verify"] => Route::Verify,
            _ => return None,
        })
    }

    fn pattern(&self) -> &'static str {
        match self {
            Route::Sessions => "/api/v1/sessions",
            Route::Session(_) => "/api/v1/sessions/{id}",
            Route::Events(_) => "/api/v1/sessions/{id}/events",
            Route::Export => "/api/v1/export",
            Route::Verify => "/api/v1/audit/verify",
        }
    }

    fn session_id(&self) -> Option<&str> {
        match self {
            Route::Session(id) | Route::Events(id) => Some(id),
            _ => None,
        }
    }
}

/// A refusal: status plus the JSON body a client sees.
pub(crate) struct Refusal {
    pub(crate) status: StatusCode,
    pub(crate) body: ErrorBody,
    /// The `WWW-Authenticate` challenge of a 401.
    pub(crate) challenge: &'static str,
}

pub(crate) fn refusal(status: StatusCode, error: impl Into<String>, hint: Option<&str>) -> Refusal {
    Refusal {
        status,
        body: ErrorBody {
            error: error.into(),
            hint: hint.map(str::to_string),
        },
        challenge: tollgate_http::CHALLENGE,
    }
}

impl From<BadParam> for Refusal {
    fn from(e: BadParam) -> Self {
        refusal(StatusCode::BAD_REQUEST, e.0, None)
    }
}

pub(crate) fn store_failed(e: impl std::fmt::Display) -> Refusal {
    tracing::error!(error = %e, "API store query failed");
    refusal(
        StatusCode::INTERNAL_SERVER_ERROR,
        "the audit store could not answer",
        Some("the gateway log has the reason; retry once the store is healthy"),
    )
}

fn full(status: StatusCode, content_type: &'static str, body: Vec<u8>) -> Response<ApiBody> {
    let mut resp = Response::new(Full::new(Bytes::from(body)).map_err(|n| match n {}).boxed());
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

pub(crate) fn json_response(status: StatusCode, value: &impl Serialize) -> Response<ApiBody> {
    let mut body = serde_json::to_vec(value).expect("API values serialize");
    body.push(b'\n');
    full(status, "application/json", body)
}

/// Data leaves only once the read that asked for it is in the audit journal (`503` otherwise).
pub(crate) async fn after_recording(
    state: &ApiState,
    event: EventInput,
    resp: Response<ApiBody>,
) -> Response<ApiBody> {
    if let Err(e) = state
        .recorder
        .append_async(std::slice::from_ref(&event))
        .await
    {
        tracing::error!(error = %e, "cannot record an API read; refusing it");
        return refused(&refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            "the audit store is unavailable, and reads are refused until they can be recorded",
            Some("retry once the gateway's /readyz is ready"),
        ));
    }
    resp
}

pub(crate) fn refused(r: &Refusal) -> Response<ApiBody> {
    let mut resp = json_response(r.status, &r.body);
    if r.status == StatusCode::UNAUTHORIZED {
        resp.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static(r.challenge),
        );
    }
    resp
}

/// Who is calling: an `Authorization: Bearer` token when one is sent (it is then the only
/// credential considered), else the verified client certificate.
pub(crate) async fn authenticate(
    state: &ApiState,
    conn: &Conn,
    req: &Request<impl Body>,
) -> Result<Identity, Refusal> {
    const HINT: &str = "present a client certificate issued by the gateway's CA (tollgate: --cert/--key or TOLLGATE_CERT/TOLLGATE_KEY) or a service token as \"Authorization: Bearer <token>\" (tollgate: --token or TOLLGATE_TOKEN)";
    tollgate_gate::identify(
        conn.cert.as_ref(),
        req.headers().get(AUTHORIZATION).map(|v| v.as_bytes()),
        &state.tokens.load_full(),
        &state.oidc,
    )
    .await
    .map_err(|e| {
        let hint = match e {
            tollgate_gate::AuthError::InvalidToken => "check the token (a service token of [[identity.tokens]], or an unexpired token of an [[identity.oidc]] issuer for one of its audiences), or use a client certificate",
            _ => HINT,
        };
        Refusal {
            challenge: tollgate_http::challenge_for(&e),
            ..refusal(StatusCode::UNAUTHORIZED, e.to_string(), Some(hint))
        }
    })
}

/// Reading sessions, events, exports and chain checks is for auditors and admins.
fn authorize(state: &ApiState, who: &Identity) -> Result<(), Refusal> {
    if who.in_any(&state.roles.auditor_groups) || who.in_any(&state.roles.admin_groups) {
        return Ok(());
    }
    Err(refusal(
        StatusCode::FORBIDDEN,
        format!(
            "{} may not read the audit trail: it needs the auditor role (a group in roles.auditor_groups) or the admin role (roles.admin_groups)",
            who.subject
        ),
        Some("ask an administrator to add one of your groups to roles.auditor_groups"),
    ))
}

pub(crate) async fn handle(
    state: &ApiState,
    conn: &Conn,
    req: Request<hyper::body::Incoming>,
) -> Response<ApiBody> {
    let path = req.uri().path().to_string();
    if path == crate::cert_routes::ISSUERS_PATH {
        return crate::cert_routes::issuers(state, &req);
    }
    if path == crate::cert_routes::PATH {
        return crate::cert_routes::handle(state, conn, req).await;
    }
    if crate::review_routes::is_review_path(&path) {
        return crate::review_routes::handle(state, conn, req).await;
    }
    let query = req.uri().query().unwrap_or("").to_string();
    let route = Route::parse(&path);
    let who = authenticate(state, conn, &req).await;

    let result = async {
        if req.method() != Method::GET {
            return Err(refusal(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{} is not supported here", req.method()),
                Some("these routes are read-only: use GET"),
            ));
        }
        let route = route.clone().ok_or_else(|| {
            refusal(
                StatusCode::NOT_FOUND,
                format!("no route {path}"),
                Some(ROUTES_HINT),
            )
        })?;
        let who = who.as_ref().map_err(|r| Refusal {
            status: r.status,
            body: r.body.clone(),
            challenge: r.challenge,
        })?;
        authorize(state, who)?;
        respond(state, &route, &query).await
    }
    .await;

    let status = match &result {
        Ok(r) => r.status(),
        Err(r) => r.status,
    };
    let event = access_event(
        state,
        conn,
        who.as_ref().ok(),
        route.as_ref(),
        &path,
        &query,
        status,
    );
    match result {
        Ok(resp) => after_recording(state, event, resp).await,
        Err(r) => {
            state.record_refused(conn, r.status, event);
            refused(&r)
        }
    }
}

fn access_event(
    state: &ApiState,
    conn: &Conn,
    who: Option<&Identity>,
    route: Option<&Route>,
    path: &str,
    query: &str,
    status: StatusCode,
) -> EventInput {
    api_event(
        state,
        conn,
        who,
        KIND_API_READ,
        path,
        (query, RECORDED_PARAMS),
        status,
        json!({
            "route": route.map_or("unknown", Route::pattern),
            "session": route.and_then(Route::session_id),
        }),
    )
}

/// The audit event of one API request: who asked, from where, what (`route_fields` names the
/// route and what it addressed), which of the `recorded` query parameters, and the answer.
#[allow(clippy::too_many_arguments)]
pub(crate) fn api_event(
    state: &ApiState,
    conn: &Conn,
    who: Option<&Identity>,
    kind: &str,
    path: &str,
    (query, recorded): (&str, &[&str]),
    status: StatusCode,
    route_fields: Value,
) -> EventInput {
    let recorded: serde_json::Map<String, Value> = params::parse_query(query)
        .unwrap_or_default()
        .into_iter()
        .filter(|(k, _)| recorded.contains(&k.as_str()))
        .map(|(k, v)| (k, Value::String(v)))
        .collect();
    let mut payload = json!({
        "listener": "https",
        "client_addr": conn.peer.to_string(),
        "subject": who.map(|w| w.subject.as_str()),
        "groups": who.map(|w| &w.groups),
        "auth_method": who.map(|w| w.method.as_str()),
        "path": path.chars().take(256).collect::<String>(),
        "query": recorded,
        "status": status.as_u16(),
    });
    if let (Value::Object(p), Value::Object(extra)) = (&mut payload, route_fields) {
        p.extend(extra);
    }
    EventInput {
        session_id: state.audit_session.clone(),
        kind: kind.into(),
        at: SystemTime::now(),
        payload,
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> Result<T, Refusal> {
    match tokio::task::spawn_blocking(f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(store_failed(e)),
        Err(e) => Err(store_failed(e)),
    }
}

fn not_found(id: &str) -> Refusal {
    refusal(
        StatusCode::NOT_FOUND,
        format!("no session {id:?}"),
        Some("list sessions with GET /api/v1/sessions (tollgate sessions list)"),
    )
}

async fn respond(
    state: &ApiState,
    route: &Route,
    query: &str,
) -> Result<Response<ApiBody>, Refusal> {
    let store = state.store.clone();
    match route {
        Route::Sessions => {
            let q = params::sessions_query(query)?;
            let filter = SessionFilter {
                subject: q.subject,
                resource: q.resource,
                outcome: q.outcome,
                since_unix_ms: q.since_unix_ms,
                until_unix_ms: q.until_unix_ms,
                // One more than asked: whether it comes back says if there is a next page.
                limit: Some(q.limit + 1),
                offset: Some(q.offset),
            };
            let mut rows = blocking(move || store.sessions(&filter)).await?;
            let next_offset = (rows.len() > q.limit).then_some(q.offset + q.limit);
            rows.truncate(q.limit);
            let page = SessionsPage {
                sessions: rows.into_iter().map(Session::from).collect(),
                next_offset,
            };
            Ok(json_response(StatusCode::OK, &page))
        }
        Route::Session(id) => {
            params::no_query(query)?;
            let id2 = id.clone();
            let (row, events) =
                blocking(move || Ok((store.session(&id2)?, store.events(&id2)?))).await?;
            let session = row.ok_or_else(|| not_found(id))?;
            Ok(json_response(
                StatusCode::OK,
                &SessionDetail {
                    session: session.into(),
                    events: events.into_iter().map(Event::from).collect(),
                },
            ))
        }
        Route::Events(id) => {
            params::no_query(query)?;
            let id2 = id.clone();
            let (row, events) =
                blocking(move || Ok((store.session(&id2)?, store.events(&id2)?))).await?;
            if row.is_none() && events.is_empty() {
                return Err(not_found(id));
            }
            Ok(json_response(
                StatusCode::OK,
                &EventList {
                    events: events.into_iter().map(Event::from).collect(),
                },
            ))
        }
        Route::Verify => {
            params::no_query(query)?;
            let report = blocking(move || store.verify()).await?;
            Ok(json_response(StatusCode::OK, &report))
        }
        Route::Export => {
            let q = params::export_query(query)?;
            // Fail before the 200 if the store cannot page at all.
            let probe = store.clone();
            blocking(move || probe.events_page(i64::MAX, None, None, 1)).await?;
            let (tx, rx) = tokio::sync::mpsc::channel(4);
            tokio::task::spawn_blocking(move || export(&*store, q, tx));
            let mut resp = Response::new(ChannelBody { rx }.boxed());
            let h = resp.headers_mut();
            h.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/x-ndjson"),
            );
            h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
            Ok(resp)
        }
    }
}

/// Pages through the store in id order, one chunk per page. A store failure mid-way ends the
/// body with an error, so the client sees a truncated (unterminated) response, never a short
/// export that looks complete.
fn export(
    store: &dyn tollgate_store::Store,
    q: params::ExportQuery,
    tx: tokio::sync::mpsc::Sender<Result<Bytes, io::Error>>,
) {
    let mut after = 0i64;
    loop {
        let page = match store.events_page(after, q.since_unix_ms, q.until_unix_ms, EXPORT_PAGE) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, "export stopped: the store failed");
                let _ = tx.blocking_send(Err(io::Error::other("store failed")));
                return;
            }
        };
        let Some(last) = page.last() else { return };
        after = last.id;
        let mut chunk = Vec::with_capacity(page.len() * 512);
        for e in page {
            serde_json::to_writer(&mut chunk, &Event::from(e)).expect("events serialize");
            chunk.push(b'\n');
        }
        if tx.blocking_send(Ok(Bytes::from(chunk))).is_err() {
            return; // the client went away
        }
    }
}

/// A response body fed by a channel (the export producer runs on the blocking pool).
struct ChannelBody {
    rx: tokio::sync::mpsc::Receiver<Result<Bytes, io::Error>>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.rx.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn export_pages_through_the_store_one_chunk_per_page() {
        use tollgate_store::{SqliteStore, Store};
        let store = SqliteStore::open_in_memory().unwrap();
        let at = |ms: u64| std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms);
        let events: Vec<EventInput> = (0..(2 * EXPORT_PAGE as u64 + 1))
            .map(|i| EventInput {
                session_id: format!("s{}", i % 3),
                kind: "command".into(),
                at: at(1000 + i),
                payload: json!({"n": i}),
            })
            .collect();
        store.append("c1", &events).unwrap();
        let run = |q: params::ExportQuery| {
            let (tx, mut rx) = tokio::sync::mpsc::channel(1);
            let producer = std::thread::scope(|s| {
                s.spawn(|| export(&store, q, tx));
                let mut chunks = Vec::new();
                while let Some(c) = rx.blocking_recv() {
                    chunks.push(c.unwrap());
                }
                chunks
            });
            let lines: Vec<Event> = producer
                .iter()
                .flat_map(|c| std::str::from_utf8(c).unwrap().lines())
                .map(|l| serde_json::from_str(l).unwrap())
                .collect();
            (producer.len(), lines)
        };
        let (chunks, lines) = run(params::ExportQuery::default());
        assert_eq!(chunks, 3);
        assert_eq!(lines.len(), 2 * EXPORT_PAGE + 1);
        assert!(lines
            .windows(2)
            .all(|w| w[0].chain_seq + 1 == w[1].chain_seq && w[1].prev_hash == w[0].hash));
        let (_, ranged) = run(params::ExportQuery {
            since_unix_ms: Some(1010),
            until_unix_ms: Some(1020),
        });
        let ns: Vec<i64> = ranged
            .iter()
            .map(|e| e.payload["n"].as_i64().unwrap())
            .collect();
        assert_eq!(ns, (10..20).collect::<Vec<_>>());
    }

    #[test]
    fn routes_parse_and_unknown_paths_do_not() {
        assert_eq!(Route::parse("/api/v1/sessions"), Some(Route::Sessions));
        assert_eq!(
            Route::parse("/api/v1/sessions/abc"),
            Some(Route::Session("abc".into()))
        );
        assert_eq!(
            Route::parse("/api/v1/sessions/a%2Fb/events"),
            Some(Route::Events("a/b".into()))
        );
        assert_eq!(Route::parse("/api/v1/export"), Some(Route::Export));
        assert_eq!(Route::parse("/api/v1/audit/verify"), Some(Route::Verify));
        for bad in [
            "/",
            "/api/v1/sessions/",
            "/api/v1/sessions/a/b",
            "/api/v2/sessions",
            "/api/v1/export/x",
        ] {
            assert_eq!(Route::parse(bad), None, "{bad}");
        }
    }
}
